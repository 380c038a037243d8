//! A store may be dropped by the last async task that held it (a server's tasks end as its
//! runtime shuts down), on a thread that drives the runtime: there a synchronous connection
//! can neither be closed nor dropped in place. Dropping the store there must not panic (a
//! panic in that drop aborts the process), and its connections must still close.
//!
//! Runs in a schema of its own, dropped after. Without a reachable PostgreSQL the test is
//! skipped with the reason printed, except in CI (`CI=true`), where it fails.

use ordo_store::conformance::created;
use ordo_store::Store;
use ordo_store_postgres::test_schema::{connect_or_skip, TestSchema};
use ordo_store_postgres::PgStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Backends whose client named itself `app`.
fn backends(app: &str) -> i64 {
    let mut admin = connect_or_skip().expect("PostgreSQL was reachable a moment ago");
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .expect("count the store's connections")
        .get(0)
}

#[test]
fn a_store_dropped_on_an_async_runtime_thread_closes_its_connections() {
    let Some(schema) = TestSchema::create("async_drop") else {
        return;
    };
    let app = format!("ordo_async_drop_{:08x}", rand::random::<u32>());
    let url = format!("{} application_name={app}", schema.url());
    let store = PgStore::open(&url).expect("open the store");
    store
        .commit(Arc::new(created(1, "g", 3, 10)))
        .expect("a first batch, so that the pool holds a connection");
    assert!(backends(&app) >= 1, "the store holds a connection");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("a runtime");
    // Dropped inside a task, as the last holder of a server's store would drop it.
    runtime
        .block_on(async { tokio::spawn(async move { drop(store) }).await })
        .expect("the task that drops the store ends without a panic");
    drop(runtime);

    let until = Instant::now() + Duration::from_secs(20);
    while backends(&app) > 0 {
        assert!(
            Instant::now() < until,
            "the store's connections are still open 20 s after it was dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
