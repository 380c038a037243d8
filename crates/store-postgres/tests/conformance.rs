//! The conformance suite against PostgreSQL: each test in a schema of its own in the database
//! `ORDO_TEST_POSTGRES` names (by default the local server's `test` database), dropped after;
//! a reopen connects again, as a restarted server does.
//!
//! Without a reachable PostgreSQL the tests are skipped with the reason printed, except in CI
//! (`CI=true`), where they fail.

use ordo_store::conformance::Backend;
use ordo_store::Store;
use ordo_store_postgres::PgStore;
use postgres::{Client, NoTls};

/// The database the tests make their schemas in.
fn base() -> String {
    std::env::var("ORDO_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

struct Pg {
    store: Option<PgStore>,
    schema: String,
}

impl Pg {
    fn url(&self) -> String {
        format!("{} options='-c search_path={}'", base(), self.schema)
    }
}

impl Backend for Pg {
    const REFUSES_A_SEQ_STORED_TWICE: bool = true;

    fn available() -> Result<(), String> {
        match Client::connect(&base(), NoTls) {
            Ok(_) => Ok(()),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!(
                    "PostgreSQL is needed in CI and cannot be reached at {}: {e}",
                    base()
                )
            }
            Err(e) => Err(format!(
                "no PostgreSQL at {} ({e}); set ORDO_TEST_POSTGRES to a database to run these",
                base()
            )),
        }
    }

    fn open() -> Self {
        let schema = format!("ordo_t_{:016x}", rand::random::<u64>());
        let mut admin = Client::connect(&base(), NoTls).expect("connect to PostgreSQL");
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .expect("create the test's schema");
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
        drop(self.store.take());
        if let Ok(mut admin) = Client::connect(&base(), NoTls) {
            let _ = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
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
