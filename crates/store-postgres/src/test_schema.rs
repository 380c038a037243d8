//! A schema of its own for one test, in the database `ORDO_TEST_POSTGRES` names (by default
//! the local server's `test` database: `host=127.0.0.1 port=5432 user=postgres dbname=test`),
//! dropped when the [`TestSchema`] is. Used by this crate's tests, the end-to-end tests and the
//! tools that run servers on PostgreSQL, so that each leaves the database as it found it.
//!
//! Without a reachable PostgreSQL a test is skipped with the reason printed, except in CI
//! (`CI=true`), where it fails: there, PostgreSQL is part of the machine.

use postgres::{Client, NoTls};

/// The database tests make their schemas in.
pub fn base() -> String {
    std::env::var("ORDO_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// A connection to [`base`]; `Err(why)` without one outside CI, a panic in CI.
pub fn connect_or_skip() -> Result<Client, String> {
    match Client::connect(&base(), NoTls) {
        Ok(c) => Ok(c),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "PostgreSQL is needed in CI and cannot be reached at {}: {e}",
                base()
            )
        }
        Err(e) => Err(format!(
            "no PostgreSQL at {} ({e}); set ORDO_TEST_POSTGRES to a database to run this",
            base()
        )),
    }
}

/// A schema made for one test, dropped (with everything in it) on drop.
pub struct TestSchema {
    pub name: String,
}

impl TestSchema {
    /// A new schema; `None` (after printing that `test` is skipped, and why) without a
    /// PostgreSQL outside CI.
    pub fn create(test: &str) -> Option<TestSchema> {
        let mut admin = match connect_or_skip() {
            Ok(c) => c,
            Err(why) => {
                eprintln!("SKIPPED {test}: {why}");
                return None;
            }
        };
        let name = format!("ordo_t_{:016x}", rand::random::<u64>());
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .expect("create the test's schema");
        Some(TestSchema { name })
    }

    /// A key=value connection string for the schema in [`base`].
    pub fn url(&self) -> String {
        format!("{} options='-c search_path={}'", base(), self.name)
    }

    /// The same as a `postgres://` URL, for command lines split on spaces.
    pub fn uri(&self) -> String {
        let config: postgres::Config = base().parse().expect("ORDO_TEST_POSTGRES parses");
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let mut user = config.get_user().unwrap_or("postgres").to_string();
        if let Some(p) = config.get_password() {
            user = format!("{user}:{}", String::from_utf8_lossy(p));
        }
        let db = config.get_dbname().unwrap_or("test");
        format!(
            "postgres://{user}@{host}:{port}/{db}?options=-c%20search_path%3D{}",
            self.name
        )
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // On a thread of its own: the synchronous client starts a runtime, which it cannot do
        // on a thread of another (a test's), where this may be dropped, even while unwinding.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(mut admin) = Client::connect(&base(), NoTls) {
                let _ = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"));
            }
        })
        .join();
    }
}
