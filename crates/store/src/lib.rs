//! Storage for Ordo: the [`Store`] trait the server commits batches through, and
//! [`RedbStore`], the embedded default that needs no external service.
//!
//! A store has three jobs: make a [`Batch`] durable atomically (messages, their seqs and dedup
//! keys in one fsynced commit, so `accepted` is never sent for something a crash can take back),
//! rebuild the core's [`Snapshot`] at start, and serve pages of history to `sync`. The trait is
//! shaped so that a PostgreSQL backend can implement the same three calls.

mod error;
mod redb_store;
pub mod wal;

pub use error::StoreError;
pub use redb_store::RedbStore;

use ordo_core::{Batch, CommitOutcome, Snapshot, StoredMessage};

/// A page of one conversation's history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Lowest seq still stored (and served), as of the same snapshot the messages were read
    /// from.
    pub first_seq: u64,
    /// Messages in seq order, none below `first_seq`.
    pub messages: Vec<StoredMessage>,
}

pub trait Store: Send + Sync + 'static {
    /// Reads everything the core needs to start.
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// Makes the whole batch durable, or nothing of it. Returns only once it is on disk.
    fn commit(&self, batch: Batch) -> Result<CommitOutcome, StoreError>;

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
}
