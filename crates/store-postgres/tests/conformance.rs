//! The conformance suite against PostgreSQL: each test in a schema of its own in the database
//! `ORDO_TEST_POSTGRES` names (by default the local server's `test` database), dropped after;
//! a reopen connects again, as a restarted server does.
//!
//! Without a reachable PostgreSQL the tests are skipped with the reason printed, except in CI
//! (`CI=true`), where they fail.

use ordo_store::conformance::Backend;
use ordo_store::Store;
use ordo_store_postgres::test_schema::{connect_or_skip, TestSchema};
use ordo_store_postgres::PgStore;
use postgres::{Client, NoTls};

struct Pg {
    store: Option<PgStore>,
    schema: TestSchema,
}

impl Pg {
    fn url(&self) -> String {
        self.schema.url()
    }
}

impl Backend for Pg {
    const REFUSES_A_SEQ_STORED_TWICE: bool = true;

    fn available() -> Result<(), String> {
        connect_or_skip().map(drop)
    }

    fn open() -> Self {
        let schema = TestSchema::create("conformance").expect("PostgreSQL is available");
        let mut pg = Pg {
            store: None,
            schema,
        };
        pg.store = Some(PgStore::open(&pg.url()).expect("open the store"));
        pg
    }

    fn store(&self) -> &dyn Store {
        self.store.as_ref().expect("the store is open")
    }

    fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(PgStore::open(&self.url()).expect("open the store again"));
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Closed before the schema is dropped.
        drop(self.store.take());
    }
}

ordo_store::conformance_tests!(Pg);

/// A database whose schema is newer than this binary knows is refused, and left as it is.
#[test]
fn a_newer_schema_is_refused() {
    if let Err(why) = Pg::available() {
        eprintln!("SKIPPED a_newer_schema_is_refused: {why}");
        return;
    }
    let pg = Pg::open();
    let mut admin = Client::connect(&pg.url(), NoTls).expect("connect");
    admin
        .batch_execute("UPDATE ordo_schema SET version = version + 1")
        .expect("move the version");
    let e = PgStore::open(&pg.url()).err().expect("refused").to_string();
    assert!(e.contains("newer than this ordo knows"), "{e}");
    let version: i64 = admin
        .query_one("SELECT version FROM ordo_schema", &[])
        .expect("version")
        .get(0);
    assert_eq!(
        version,
        ordo_store_postgres::schema::current() + 1,
        "left as it is"
    );
}
