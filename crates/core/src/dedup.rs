//! What the core remembers of accepted sends, for answering a resend inside the dedup window
//! with the original `accepted`, in bounded memory. The store holds every (user, client message
//! id) of the window; the core keeps two small things in front of it:
//!
//! - [`DedupCache`]: the most recent entries, exactly, up to a set number. Entries of batches
//!   not yet durable are never dropped (the store does not have them yet), so the cache may
//!   run over its size by what is in flight.
//! - [`DedupFilter`]: a Bloom filter of every key inside the window, in a fixed number of bytes,
//!   so that a new client message id (nearly every send) is known to be new without asking the
//!   store. It says "maybe" for every key it holds and for a few it does not; only a "maybe"
//!   that the cache cannot answer costs a store lookup ([`crate::Action::Lookup`]). After a
//!   restart it is empty until the keys already stored are added back
//!   ([`crate::Core::dedup_filter_add`]); until then every key the cache does not hold is
//!   looked up.
//!
//! The filter is written here rather than taken from a crate: it must forget by time (it is cut
//! into time slices, and a slice whose keys are all past the window is cleared whole), and
//! probe a few cache lines per key; Bloom filter crates grow by count and forget nothing.

use foldhash::fast::FixedState;
use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;

/// What one (user, client message id) was accepted as.
#[derive(Clone, Debug)]
pub struct DedupEntry {
    pub conv: Arc<str>,
    pub seq: u64,
    pub ts: u64,
    /// Its place in the cache's order.
    n: u64,
}

/// One entry in the order the cache forgets in.
#[derive(Debug)]
struct Remembered {
    n: u64,
    /// The batch that makes it durable: it stays until that batch committed.
    batch: u64,
    ts: u64,
    user: Arc<str>,
    cmid: Arc<str>,
}

/// The most recent dedup entries, by user then client message id (so that the check every send
/// makes looks up borrowed names without building a key), forgotten oldest first.
#[derive(Debug, Default)]
pub struct DedupCache {
    map: HashMap<Arc<str>, HashMap<Arc<str>, DedupEntry>>,
    order: VecDeque<Remembered>,
    next_n: u64,
    /// Every entry placed before this has been forgotten.
    gone_below: u64,
}

impl DedupCache {
    pub fn get(&self, user: &str, cmid: &str) -> Option<&DedupEntry> {
        self.map.get(user).and_then(|m| m.get(cmid))
    }

    /// Remembers what `cmid` of `user` was accepted as, made durable by batch `batch`.
    pub fn insert(
        &mut self,
        user: &Arc<str>,
        cmid: Arc<str>,
        conv: Arc<str>,
        seq: u64,
        ts: u64,
        batch: u64,
    ) {
        let n = self.next_n;
        self.next_n += 1;
        self.order.push_back(Remembered {
            n,
            batch,
            ts,
            user: user.clone(),
            cmid: cmid.clone(),
        });
        let entry = DedupEntry { conv, seq, ts, n };
        match self.map.get_mut(&**user) {
            Some(m) => {
                m.insert(cmid, entry);
            }
            None => {
                let mut m = HashMap::new();
                m.insert(cmid, entry);
                self.map.insert(user.clone(), m);
            }
        }
    }

    /// Entries remembered (a replaced one counts until its turn to go comes).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Where the cache stands now: a store lookup started now remembers it, and when the answer
    /// comes, [`lost_since`](Self::lost_since) says whether the cache may have forgotten an
    /// entry the store had not yet got when it answered.
    pub fn mark(&self) -> u64 {
        self.next_n
    }

    /// Whether an entry remembered at or after `mark` has been forgotten since.
    pub fn lost_since(&self, mark: u64) -> bool {
        self.gone_below > mark
    }

    /// Forgets the oldest entries until at most `cap` are left, keeping every entry of a batch
    /// after `durable_batch` (the last one committed).
    pub fn shrink(&mut self, cap: usize, durable_batch: u64) {
        while self.order.len() > cap && self.order.front().is_some_and(|r| r.batch <= durable_batch)
        {
            self.pop();
        }
    }

    /// Forgets the entries accepted `window_ms` or longer before `now_ms`.
    pub fn expire(&mut self, now_ms: u64, window_ms: u64) {
        while self
            .order
            .front()
            .is_some_and(|r| r.ts.saturating_add(window_ms) <= now_ms)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        let Some(r) = self.order.pop_front() else {
            return;
        };
        self.gone_below = r.n + 1;
        if let Some(m) = self.map.get_mut(&*r.user) {
            // Only if a newer entry of the same key has not replaced it.
            if m.get(&*r.cmid).is_some_and(|e| e.n == r.n) {
                m.remove(&*r.cmid);
            }
            if m.is_empty() {
                self.map.remove(&*r.user);
            }
        }
    }
}

/// Slices the window is cut into; one more than this is kept, so that the oldest slice still
/// holding keys inside the window is there while the newest fills.
const SLICES: u64 = 4;
/// Bits set per key, all in one 64-bit word (a blocked Bloom filter: one memory access per
/// slice probed).
const BITS_PER_KEY: u32 = 4;

/// A dedup key as the filter hashes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterKey(u64);

/// A Bloom filter of the dedup keys of the window in a fixed number of bytes, cut into time
/// slices; see the module docs.
#[derive(Debug)]
pub struct DedupFilter {
    hasher: FixedState,
    window_ms: u64,
    slice_ms: u64,
    words_per_slice: usize,
    slices: Vec<Slice>,
    /// Every key inside the window that the store holds is in the filter.
    complete: bool,
}

#[derive(Debug, Default)]
struct Slice {
    /// Which slice of time (acceptance time / slice length) it holds.
    index: u64,
    words: Vec<u64>,
}

impl DedupFilter {
    /// An empty filter of at most `bytes` for a window of `window_ms`; `seed` picks its hash
    /// (fixed in a simulation, random in production). It is not complete until
    /// [`set_complete`](Self::set_complete).
    pub fn new(bytes: usize, window_ms: u64, seed: u64) -> Self {
        let words = (bytes / 8 / (SLICES as usize + 1)).max(1);
        DedupFilter {
            hasher: FixedState::with_seed(seed),
            window_ms,
            // Rounded up: the slices must cover the whole window.
            slice_ms: window_ms.div_ceil(SLICES).max(1),
            words_per_slice: words,
            slices: (0..=SLICES).map(|_| Slice::default()).collect(),
            complete: false,
        }
    }

    /// The key's hash, computed once per send for both [`surely_new`](Self::surely_new_key)
    /// and [`insert`](Self::insert_key).
    pub fn key(&self, user: &str, cmid: &str) -> FilterKey {
        FilterKey(self.hasher.hash_one((user, cmid)))
    }

    fn probe(&self, key: FilterKey) -> (usize, u64) {
        let h = key.0;
        let word = ((h as u128 * self.words_per_slice as u128) >> 64) as usize;
        let mut bits = 0u64;
        for i in 0..BITS_PER_KEY {
            bits |= 1 << ((h >> (6 * i)) & 63);
        }
        (word, bits)
    }

    /// Adds a key accepted at `ts` (a key already past the window may be skipped).
    pub fn insert(&mut self, user: &str, cmid: &str, ts: u64) {
        self.insert_key(self.key(user, cmid), ts);
    }

    pub fn insert_key(&mut self, key: FilterKey, ts: u64) {
        let (word, bits) = self.probe(key);
        let index = ts / self.slice_ms;
        let words = self.words_per_slice;
        let slot = &mut self.slices[(index % (SLICES + 1)) as usize];
        if slot.words.is_empty() || slot.index < index {
            // The slice held here before is SLICES + 1 slices older: past the window.
            slot.index = index;
            slot.words.clear();
            slot.words.resize(words, 0);
        } else if slot.index > index {
            // This key is older than the window the slot now holds: past the window itself.
            return;
        }
        slot.words[word] |= bits;
    }

    /// Whether the key may have been accepted inside the window before `now_ms`. `false` is
    /// certain only once the filter is complete.
    pub fn may_hold(&self, user: &str, cmid: &str, now_ms: u64) -> bool {
        self.may_hold_key(self.key(user, cmid), now_ms)
    }

    pub fn may_hold_key(&self, key: FilterKey, now_ms: u64) -> bool {
        let (word, bits) = self.probe(key);
        self.slices.iter().any(|s| {
            !s.words.is_empty()
                && (s.index + 1)
                    .saturating_mul(self.slice_ms)
                    .saturating_add(self.window_ms)
                    > now_ms
                && s.words[word] & bits == bits
        })
    }

    /// Whether the key is certainly new: the filter is complete and does not hold it.
    pub fn surely_new(&self, user: &str, cmid: &str, now_ms: u64) -> bool {
        self.surely_new_key(self.key(user, cmid), now_ms)
    }

    pub fn surely_new_key(&self, key: FilterKey, now_ms: u64) -> bool {
        self.complete && !self.may_hold_key(key, now_ms)
    }

    pub fn set_complete(&mut self) {
        self.complete = true;
    }

    /// Keys the store holds may be missing (see [`crate::owner::Owner::dedup_filter_incomplete`]).
    pub fn set_incomplete(&mut self) {
        self.complete = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn the_filter_holds_every_key_inside_the_window_and_forgets_by_time() {
        let mut f = DedupFilter::new(64 << 10, 24 * HOUR, 1);
        f.set_complete();
        for i in 0..5_000u64 {
            f.insert("u", &format!("c{i}"), i * 20_000);
        }
        let now = 5_000 * 20_000;
        for i in 0..5_000u64 {
            let inside = i * 20_000 + 24 * HOUR > now;
            if inside {
                assert!(f.may_hold("u", &format!("c{i}"), now), "key {i}");
            }
        }
        let fresh = (0..10_000)
            .filter(|i| f.surely_new("v", &format!("n{i}"), now))
            .count();
        assert!(fresh > 9_000, "only {fresh} of 10000 new keys known new");
        // Two windows later every slice is past, and nothing is held.
        let later = now + 2 * 24 * HOUR;
        assert!((0..5_000).all(|i| !f.may_hold("u", &format!("c{i}"), later)));
    }

    #[test]
    fn an_incomplete_filter_is_never_sure() {
        let f = DedupFilter::new(1 << 10, HOUR, 1);
        assert!(!f.surely_new("u", "c", 5));
    }

    #[test]
    fn the_cache_forgets_the_oldest_durable_entries_and_says_when() {
        let mut c = DedupCache::default();
        let u: Arc<str> = Arc::from("u");
        let conv: Arc<str> = Arc::from("g");
        for i in 0..10u64 {
            c.insert(
                &u,
                Arc::from(format!("c{i}")),
                conv.clone(),
                i + 1,
                i,
                i / 5 + 1,
            );
        }
        let mark = c.mark();
        // Batch 2 (c5..c9) is not durable: only batch 1's entries may go.
        c.shrink(2, 1);
        assert_eq!(c.len(), 5);
        assert!(c.get("u", "c4").is_none() && c.get("u", "c5").is_some());
        assert!(!c.lost_since(mark));
        c.insert(&u, Arc::from("c5"), conv.clone(), 99, 20, 3);
        c.shrink(2, 3);
        assert_eq!(
            c.get("u", "c5").map(|e| e.seq),
            Some(99),
            "the newer entry stays"
        );
        assert!(
            !c.lost_since(mark),
            "only entries placed before the mark went"
        );
        c.expire(21 + 10, 10);
        assert!(c.is_empty() && c.get("u", "c5").is_none());
        assert!(c.lost_since(mark));
    }
}
