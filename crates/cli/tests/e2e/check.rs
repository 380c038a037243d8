//! `ordo check` in CI: a short chaos run with at least five server kills, and the server holding
//! one conversation at a time, must find nothing lost, duplicated or out of order, whatever
//! `ORDO_*` variables the caller has exported.

use std::process::Command;

#[test]
fn a_short_chaos_run_finds_no_violation() {
    let out = Command::new(env!("CARGO_BIN_EXE_ordo"))
        .args([
            "check",
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
            "--json",
        ])
        .env_remove("RUST_LOG")
        // Settings meant for some other server: had the server under test inherited them, it
        // would drop all but the last 3 messages of a conversation and refuse every body.
        .env("ORDO_RETENTION_MAX_COUNT", "3")
        .env("ORDO_MAX_BODY_BYTES", "1")
        .output()
        .expect("run ordo check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "ordo check failed:\n{report:#}");
    for field in [
        "lost",
        "unaccepted",
        "duplicated",
        "misordered",
        "receipt_regressions",
    ] {
        assert_eq!(report[field], 0, "{field}:\n{report:#}");
    }
    assert_eq!(report["settled"], true);
    assert!(
        report["server_kills"].as_u64().unwrap_or(0) >= 5,
        "at least five server kills:\n{report:#}"
    );
    assert!(report["accepted"].as_u64().unwrap_or(0) > 50);
}
