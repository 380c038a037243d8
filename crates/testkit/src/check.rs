//! `ordo check` run as a child process by the tests that prove it passes: its JSON report,
//! checked for a pass with nothing lost, duplicated or out of order. Panics are its error
//! reporting: it is for tests only.

use std::path::Path;
use std::process::Command;

/// Runs `exe check ARGS --json` with `env` set (and `RUST_LOG` cleared); returns its report
/// after checking that it passed, settled, with nothing lost, unaccepted, duplicated, out of
/// order or gone back, and more than 50 messages accepted.
pub fn passing(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = Command::new(exe)
        .arg("check")
        .args(args)
        .arg("--json")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
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
    assert_eq!(report["settled"], true, "{report:#}");
    assert!(
        report["accepted"].as_u64().unwrap_or(0) > 50,
        "too few messages accepted:\n{report:#}"
    );
    report
}
