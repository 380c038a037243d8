//! The in-memory reference backend: [`ordo_core::MemoryStore`] as a [`Store`].

use crate::{Page, PageFill, Store, StoreError};
use ordo_core::{Batch, CommitOutcome, MemoryStore, Snapshot};
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

    fn commit(&self, batch: Batch) -> Result<CommitOutcome, StoreError> {
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
}
