//! The in-memory reference backend: [`ordo_core::MemoryStore`] as a [`Store`].

use crate::{DedupScan, Page, PageFill, ScanFrom, Store, StoreError};
use ordo_core::{
    AgeSweep, Batch, CommitOutcome, ConvState, DedupRecord, Expired, GroupPage, MemberPage,
    MemberPageAsk, MemoryStore, Snapshot,
};
use std::sync::{Mutex, MutexGuard};

/// The in-memory reference backend: [`MemoryStore`], the store the core's rules tests and the
/// simulation check the core against, behind a lock so that it can serve as a [`Store`].
/// Nothing is durable: dropping it loses everything. It is for tests, and it runs the
/// [`conformance`](crate::conformance) suite like every backend.
///
/// A batch that stores a seq its conversation already holds is refused whole with
/// [`StoreError::Conflict`].
#[derive(Debug, Default)]
pub struct MemStore(Mutex<MemoryStore>);

impl MemStore {
    /// A backend over what `store` holds.
    pub fn new(store: MemoryStore) -> Self {
        MemStore(Mutex::new(store))
    }

    /// What the committed batches add up to.
    pub fn into_inner(self) -> MemoryStore {
        self.0.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, MemoryStore> {
        // `apply` checks a batch before it changes anything, so a panic elsewhere while the
        // lock was held cannot have left a batch half applied.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self.lock().snapshot())
    }

    fn load_convs(&self, ids: &[String]) -> Result<Vec<Option<ConvState>>, StoreError> {
        let store = self.lock();
        Ok(ids.iter().map(|id| store.load_conv(id)).collect())
    }

    fn member_convs(&self, ask: &MemberPageAsk) -> Result<MemberPage, StoreError> {
        Ok(self.lock().member_convs(ask))
    }

    fn groups(&self, after: Option<&str>, limit: usize) -> Result<GroupPage, StoreError> {
        Ok(self.lock().groups(after, limit))
    }

    fn commit(&self, batch: std::sync::Arc<Batch>) -> Result<CommitOutcome, StoreError> {
        self.lock().apply(&batch).map_err(|e| StoreError::Conflict {
            conv: e.conv,
            seq: e.seq,
        })
    }

    fn read_page(
        &self,
        conv: &str,
        from: u64,
        to: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let store = self.lock();
        let Some(rec) = store.convs.get(conv) else {
            return Ok(Page::default());
        };
        let (mut fill, start) = match PageFill::start(rec.first_seq, from, to, limit, max_bytes) {
            Ok(f) => f,
            Err(empty) => return Ok(empty),
        };
        for (_, m) in store
            .messages
            .range((conv.to_string(), start)..=(conv.to_string(), to))
        {
            if fill.push(m.clone()) {
                break;
            }
        }
        Ok(fill.finish())
    }

    fn dedup_lookup(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<DedupRecord>>, StoreError> {
        let store = self.lock();
        Ok(keys
            .iter()
            .map(|(user, cmid)| store.dedup_lookup(user, cmid))
            .collect())
    }

    fn expired(&self, sweep: &AgeSweep) -> Result<Expired, StoreError> {
        Ok(self.lock().expired(sweep))
    }

    fn dedup_scan(&self, from: Option<ScanFrom>, max: usize) -> Result<DedupScan, StoreError> {
        let after = from.map(|f| decode_position(&f.0)).transpose()?;
        let entries = self.lock().dedup_scan(after.as_ref(), max.max(1));
        let next = match entries.last() {
            Some(last) if entries.len() >= max.max(1) => Some(ScanFrom(encode_position(last))),
            _ => None,
        };
        Ok(DedupScan { entries, next })
    }
}

/// A scan position: the last entry listed, as (time, user, cmid); ids never hold a NUL.
fn encode_position(d: &DedupRecord) -> Vec<u8> {
    let mut out = d.ts.to_be_bytes().to_vec();
    out.extend_from_slice(d.user.as_bytes());
    out.push(0);
    out.extend_from_slice(d.cmid.as_bytes());
    out
}

fn decode_position(raw: &[u8]) -> Result<DedupRecord, StoreError> {
    let bad = || StoreError::Engine {
        context: "dedup scan".into(),
        source: format!(
            "a scan position of {} bytes that this store did not make",
            raw.len()
        )
        .into(),
    };
    let (ts, rest) = raw.split_first_chunk::<8>().ok_or_else(bad)?;
    let text = std::str::from_utf8(rest).map_err(|_| bad())?;
    let (user, cmid) = text.split_once('\0').ok_or_else(bad)?;
    Ok(DedupRecord {
        user: user.into(),
        cmid: cmid.into(),
        conv: String::new(),
        seq: 0,
        ts: u64::from_be_bytes(*ts),
    })
}
