//! The storage seam of Ordo: the [`Store`] trait the server commits batches through, the
//! [`Page`] of history it reads back, and [`StoreError`], errors in terms no backend owns. No
//! storage engine lives here.
//!
//! A store has four jobs: make a [`Batch`] durable atomically (messages, their seqs and dedup
//! keys in one commit, so `accepted` is never sent for something a crash can take back), load
//! conversations when the core first needs them ([`Store::load_convs`], and a user's all at
//! once for an overview, [`Store::member_convs`]), serve pages of history to `sync`, and answer
//! what a (user, client message id) was accepted as: the core keeps only recent dedup keys in
//! memory and asks the store about the rest ([`Store::dedup_lookup`], [`Store::dedup_scan`]).
//! Nothing the store is asked at start ([`Store::load`]) grows with what it holds.
//!
//! # Backends
//!
//! A backend is a crate of its own that depends on this one and implements [`Store`]:
//! `ordo-store-redb` (`crates/store-redb`) is the embedded default, a write-ahead log in front
//! of a redb B-tree file; a PostgreSQL backend is to be the next. Each converts its engine's
//! errors into [`StoreError`] and runs the [`conformance`] suite in its tests (with
//! [`conformance_tests!`]), which holds every backend to the same meaning of a batch. What the
//! suite cannot check from outside (crash recovery of the backend's own files, for one) the
//! backend tests itself.
//!
//! [`MemStore`] is the in-memory reference backend: `ordo_core::MemoryStore`, the store the
//! rules tests and the simulation check the core against, behind a lock. It keeps nothing
//! durable; it is for tests, and it runs the conformance suite too, so that the reference and
//! the real backends are checked against one another.

pub mod conformance;
mod error;
mod memory;

pub use error::{BoxError, StoreError};
pub use memory::MemStore;

use ordo_core::{
    AgeSweep, Batch, CommitOutcome, ConvState, DedupRecord, Expired, GroupPage, MemberPage,
    MemberPageAsk, Snapshot, StoredMessage,
};

/// A page of one conversation's history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Lowest seq still stored (and served), as of the same snapshot the messages were read
    /// from.
    pub first_seq: u64,
    /// Messages in seq order, none below `first_seq`.
    pub messages: Vec<StoredMessage>,
}

/// A page being filled: the one home of `read_page`'s budget (at most `limit` messages, and
/// nothing after the message that brings the bodies to `max_bytes`), so that every backend
/// cuts pages alike. A backend starts one with [`PageFill::start`], pushes messages of the
/// range in seq order until [`PageFill::push`] says the page is full, and takes the
/// [`Page`].
pub struct PageFill {
    page: Page,
    limit: usize,
    max_bytes: usize,
    bytes: usize,
}

impl PageFill {
    /// A page of seqs `from..=to` of a conversation whose lowest stored seq is `first_seq`, and
    /// the seq to start reading at; `Err` holds the finished (empty) page when the range has
    /// nothing to read.
    pub fn start(
        first_seq: u64,
        from: u64,
        to: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<(PageFill, u64), Page> {
        let page = Page {
            first_seq,
            messages: Vec::new(),
        };
        let start = from.max(first_seq);
        if start > to || limit == 0 {
            return Err(page);
        }
        let fill = PageFill {
            page,
            limit: limit as usize,
            max_bytes,
            bytes: 0,
        };
        Ok((fill, start))
    }

    /// Adds the next message of the range; true once the page is full.
    pub fn push(&mut self, m: StoredMessage) -> bool {
        self.bytes += m.body.len();
        self.page.messages.push(m);
        self.page.messages.len() >= self.limit || self.bytes >= self.max_bytes
    }

    pub fn finish(self) -> Page {
        self.page
    }
}

/// Where a [`Store::dedup_scan`] goes on: opaque to everyone but the backend that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanFrom(pub Vec<u8>);

/// One page of a [`Store::dedup_scan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupScan {
    pub entries: Vec<DedupRecord>,
    /// Where the next page starts; `None` once every entry has been listed.
    pub next: Option<ScanFrom>,
}

/// What the server needs of a store. Every backend implements it; see the crate's docs and
/// "A new store backend" in docs/architecture.md for what each call must keep.
pub trait Store: Send + Sync + 'static {
    /// Reads what the core needs to start: little, whatever is stored.
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// Each conversation of `ids` as stored (record and device positions), in the same order;
    /// `None` for one the store does not hold. Sees every batch whose `commit` returned before
    /// this call.
    fn load_convs(&self, ids: &[String]) -> Result<Vec<Option<ConvState>>, StoreError>;

    /// One page of the conversations a user is a member of, as stored, in id order: see
    /// [`MemberPageAsk`] for what the page holds ([`MemberPage::collect`] keeps the rule). Sees
    /// every batch whose `commit` returned before this call. A backend answers it from an
    /// index by user, starting at `after`, not by reading every conversation.
    fn member_convs(&self, ask: &MemberPageAsk) -> Result<MemberPage, StoreError>;

    /// One page of the groups with id after `after` (from the first when `None`), at most
    /// `limit`, in id order, deleted groups left out, each as stored (its seq range included):
    /// [`GroupPage::collect`] keeps the rule. Sees every batch whose `commit` returned before
    /// this call. A backend skips the direct conversations rather than reading them all.
    fn groups(&self, after: Option<&str>, limit: usize) -> Result<GroupPage, StoreError>;

    /// Makes the whole batch durable, or nothing of it. Returns only once it is durable. Called
    /// by one thread, one batch at a time, in order.
    ///
    /// [`StoreError::Unreachable`] means the batch did not take effect, or that whether it did
    /// is not known yet (the connection broke during its commit); the caller gives the same
    /// batch again, and no other, until it gets another answer, and the backend then applies
    /// it exactly once (it reads back what the lost commit did before anything else). Any
    /// other error stops the server.
    fn commit(&self, batch: std::sync::Arc<Batch>) -> Result<CommitOutcome, StoreError>;

    /// Reads messages of `conv` with seq in `from..=to`, at most `limit` of them, and stops
    /// after the first message that brings the bodies' total to `max_bytes` or more (so a page
    /// always holds at least one message when there is one).
    fn read_page(
        &self,
        conv: &str,
        from: u64,
        to: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError>;

    /// What each (user, client message id) of `keys` was last accepted as, in the same order;
    /// `None` for a key the store does not hold. Sees every batch whose `commit` returned
    /// before this call. A backend may still return an entry past the dedup window that it
    /// has not forgotten yet (the core checks the window), never one older than a newer entry
    /// of the same key.
    fn dedup_lookup(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<DedupRecord>>, StoreError>;

    /// One step of age-based retention ([`AgeSweep`]): which conversations of the slice hold a
    /// message accepted before their cutoff, and where the next step starts. Reads only: the
    /// core trims the ones named in a batch of its own. Sees every batch whose `commit`
    /// returned before this call.
    fn expired(&self, sweep: &AgeSweep) -> Result<Expired, StoreError>;

    /// Lists the stored dedup entries, about `max` at a time, oldest first, from `from` (the
    /// start when `None`). Together the pages hold every entry committed before the scan
    /// started that the store has not forgotten (and maybe entries a newer one of the same key
    /// replaced). A restarted core rebuilds its filter of dedup keys from this.
    fn dedup_scan(&self, from: Option<ScanFrom>, max: usize) -> Result<DedupScan, StoreError>;
}
