//! The conformance suite against the in-memory reference backend. Its reopen hands the same
//! data to a new store, as a restart of a durable backend would.

use ordo_store::conformance::Backend;
use ordo_store::{MemStore, Store};

struct Memory(MemStore);

impl Backend for Memory {
    const REFUSES_A_SEQ_STORED_TWICE: bool = true;

    fn open() -> Self {
        Memory(MemStore::default())
    }

    fn store(&self) -> &dyn Store {
        &self.0
    }

    fn reopen(&mut self) {
        let data = std::mem::take(&mut self.0).into_inner();
        self.0 = MemStore::new(data);
    }
}

ordo_store::conformance_tests!(Memory);
