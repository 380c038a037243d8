//! The conformance suite against the embedded store, on a temporary directory; a reopen drops
//! the store and opens it again on the same files, as a restart of the server does.

use ordo_store::conformance::Backend;
use ordo_store::Store;
use ordo_store_redb::RedbStore;

struct Redb {
    // Dropped before the directory it lives in.
    store: Option<RedbStore>,
    dir: tempfile::TempDir,
}

impl Backend for Redb {
    /// The embedded store trusts its one writer, the core, not to store a seq twice: looking
    /// first would cost a B-tree read for every run the applier writes, after `commit` has
    /// returned.
    const REFUSES_A_SEQ_STORED_TWICE: bool = false;

    fn open() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Some(RedbStore::open(dir.path()).unwrap());
        Redb { store, dir }
    }

    fn store(&self) -> &dyn Store {
        self.store.as_ref().expect("the store is open")
    }

    fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(RedbStore::open(self.dir.path()).unwrap());
    }
}

ordo_store::conformance_tests!(Redb);
