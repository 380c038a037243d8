//! The embedded default backend of Ordo's [`Store`](ordo_store::Store): [`RedbStore`], a
//! write-ahead log ([`wal`]) in front of a redb B-tree file in the server's data directory. It
//! needs no external service.
//!
//! Its errors are [`ordo_store::StoreError`]s: redb's and MessagePack's errors are converted
//! where they arise. It runs `ordo-store`'s conformance suite (test `conformance`); its own
//! tests cover what only it has: crash recovery from the log (test `wal`), the layouts of
//! earlier versions and what retention leaves in the file (test `redb_store`).

mod error;
mod redb_store;
mod salvage;
mod verify;
pub mod wal;

pub use redb_store::{RedbStore, DEFAULT_CACHE_BYTES};
pub use salvage::{salvage, Salvage};
pub use verify::{verify, Verification};
