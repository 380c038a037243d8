//! `ordo check` in CI: a short chaos run with at least five server kills, and the server holding
//! one conversation at a time, must find nothing lost, duplicated or out of order, whatever
//! `ORDO_*` variables the caller has exported; the same with TypeScript SDK devices (Node
//! processes, SIGKILLed) beside the Rust ones. On a PostgreSQL of the run's own, the same with
//! its primary SIGKILLed: ten failovers to a synchronous standby, and restarts of a lone
//! primary.

use super::common::{embedded_only, on_postgres};
use ordo_store_postgres::test_schema::TestSchema;

/// Runs `ordo check` with `args`; the report, after checking that it passed with nothing lost,
/// duplicated or out of order.
fn passing_check(args: &[&str]) -> serde_json::Value {
    ordo_testkit::check::passing(
        std::path::Path::new(env!("CARGO_BIN_EXE_ordo")),
        args,
        // Settings meant for some other server: had the server under test inherited them, it
        // would drop all but the last 3 messages of a conversation and refuse every body.
        &[
            ("ORDO_RETENTION_MAX_COUNT", "3"),
            ("ORDO_MAX_BODY_BYTES", "1"),
        ],
    )
}

#[test]
fn a_short_chaos_run_finds_no_violation() {
    // In the PostgreSQL suite, on a schema of its own.
    let schema = on_postgres()
        .then(|| TestSchema::create("a_short_chaos_run_finds_no_violation"))
        .flatten();
    let url = schema.as_ref().map(TestSchema::url);
    let store: Vec<&str> = match &url {
        Some(u) => vec!["--store", u.as_str()],
        None => vec![],
    };
    let report = passing_check(
        &[
            "--duration",
            "14",
            "--kill-every",
            "1",
            "--client-kill-every",
            "3",
            "--disconnect-every",
            "2",
            "--clients",
            "6",
            "--rate",
            "30",
            // Below what each user offers, so refusals and ordered resends are exercised.
            "--user-rate",
            "5",
            // One conversation held: the others are loaded and evicted all through the run.
            "--conv-cache-entries",
            "1",
        ]
        .into_iter()
        .chain(store)
        .collect::<Vec<_>>(),
    );
    assert!(
        report["server_kills"].as_u64().unwrap_or(0) >= 5,
        "at least five server kills:\n{report:#}"
    );
}

#[test]
fn typescript_devices_take_part_in_a_chaos_run() {
    use ordo_testkit::node_js;
    if !node_js::node_or_skip("typescript_devices_take_part_in_a_chaos_run") {
        return;
    }
    let sdk = node_js::repo_root().join("sdk/typescript");
    node_js::npm_ci(&sdk);
    node_js::run(&sdk, &["run", "build"], &[]);
    let schema = on_postgres()
        .then(|| TestSchema::create("typescript_devices_take_part_in_a_chaos_run"))
        .flatten();
    let url = schema.as_ref().map(TestSchema::url);
    let sdk = sdk.to_str().expect("the SDK's path is UTF-8");
    let mut args = vec![
        "--duration",
        "20",
        "--clients",
        "4",
        "--ts-clients",
        "2",
        "--ts-sdk",
        sdk,
        // About 20 crashes, a third of them SIGKILLs of the Node processes.
        "--client-kill-every",
        "1",
    ];
    if let Some(u) = &url {
        args.extend(["--store", u.as_str()]);
    }
    let report = passing_check(&args);
    assert_eq!(report["ts_devices"], 2, "{report:#}");
    for field in ["ts_sent", "ts_delivered", "ts_kills"] {
        assert!(
            report[field].as_u64().unwrap_or(0) > 0,
            "{field}: the TypeScript devices took part:\n{report:#}"
        );
    }
    assert_eq!(
        report["ts_exits"], 0,
        "a TypeScript device process ended by itself:\n{report:#}"
    );
}

/// Whether `test`, which runs a PostgreSQL of its own, runs here: once, in the embedded suite
/// (it needs no other database), and where the machine has the server binaries (in CI it
/// must).
fn runs_its_own_postgres(test: &str) -> bool {
    if embedded_only(test, "it runs its own PostgreSQL, once, in the e2e suite") {
        return false;
    }
    match ordo_testkit::pg_cluster::bin_dir() {
        Ok(_) => true,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("{why}"),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

#[test]
fn ten_database_failovers_lose_no_acknowledged_message() {
    if !runs_its_own_postgres("ten_database_failovers_lose_no_acknowledged_message") {
        return;
    }
    let report = passing_check(&[
        "--pg-cluster",
        "2",
        "--db-kills",
        "10",
        "--duration",
        "30",
        "--kill-every",
        "4",
        "--rate",
        "30",
    ]);
    assert_eq!(report["db_kills"], 10, "{report:#}");
}

#[test]
fn a_database_restarted_under_load_loses_nothing() {
    if !runs_its_own_postgres("a_database_restarted_under_load_loses_nothing") {
        return;
    }
    let report = passing_check(&[
        "--pg-cluster",
        "0",
        "--db-kills",
        "4",
        "--duration",
        "12",
        "--kill-every",
        "0",
        "--rate",
        "30",
    ]);
    assert_eq!(report["db_kills"], 4, "{report:#}");
}
