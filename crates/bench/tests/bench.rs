//! `ordo-bench` end to end, with small counts: every scenario runs against the real server and,
//! where the scenario has peers, against the local Mosquitto and NATS JetStream, and reports
//! what each system delivered. This checks the harness (nothing lost, nothing counted twice, the
//! JSON and the chart), not speed: the numbers belong in docs/benchmarks.md.
//!
//! Mosquitto (127.0.0.1:1883) and NATS with JetStream (127.0.0.1:4222) must be running. With
//! `CI=true` a missing service fails the test; elsewhere the peers are left out with a note.

use serde_json::Value;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The `ordo` binary the bench starts: the workspace's, built here if this test binary was
/// built without it (`cargo test -p ordo-bench`).
fn ordo() -> &'static PathBuf {
    static ORDO: OnceLock<PathBuf> = OnceLock::new();
    ORDO.get_or_init(|| {
        if let Ok(p) = ordo_testkit::ordo_exe() {
            return p;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bin", "ordo"])
            .status()
            .expect("run cargo build --bin ordo");
        assert!(status.success(), "cargo build --bin ordo failed");
        ordo_testkit::ordo_exe().expect("the ordo binary after cargo build")
    })
}

/// `ordo-bench` with `args`, starting the workspace's `ordo`.
fn ordo_bench(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ordo-bench"));
    cmd.args(args)
        .arg("--ordo")
        .arg(ordo())
        .env_remove("RUST_LOG");
    cmd
}

fn up(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some()
}

/// The systems to measure: the peers only where their service answers (required in CI).
fn systems() -> &'static str {
    let mosquitto = up("127.0.0.1:1883");
    let nats = up("127.0.0.1:4222");
    if mosquitto && nats {
        return "ordo,mqtt-qos1,mqtt-qos2,jetstream";
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "Mosquitto (127.0.0.1:1883, up: {mosquitto}) and NATS JetStream (127.0.0.1:4222, up: {nats}) must run in CI"
        );
    }
    eprintln!("SKIPPING the peers: Mosquitto up {mosquitto}, NATS up {nats}; measuring Ordo only");
    "ordo"
}

fn bench(args: &[&str]) -> Value {
    let out = ordo_bench(args)
        .args(["--runs", "1", "--json"])
        .output()
        .expect("run ordo-bench");
    assert!(
        out.status.success(),
        "ordo-bench {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

fn row<'a>(doc: &'a Value, system: &str) -> &'a Value {
    doc["medians"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["system"] == system))
        .unwrap_or_else(|| panic!("no row for {system} in {doc:#}"))
}

#[test]
fn pairs_deliver_every_message_once_on_every_system_and_chart_draws_them() {
    let systems = systems();
    let doc = bench(&[
        "pairs",
        "--systems",
        systems,
        "--pairs",
        "2",
        "--messages",
        "300",
        "--window",
        "8",
    ]);
    assert_eq!(doc["scenario"], "pairs");
    for system in systems.split(',') {
        let r = row(&doc, system);
        assert_eq!(r["sent"], 600, "{system}: {r:#}");
        assert_eq!(r["accepted"], 600, "{system}: {r:#}");
        // Mosquitto QoS 2 past its 20 in-flight messages per client drops messages it has
        // confirmed; with a window of 8 it must not.
        assert_eq!(r["delivered"], 600, "{system}: {r:#}");
        assert_eq!(r["extra"]["lost"], 0.0, "{system}: {r:#}");
        assert_eq!(r["delivery_ms"]["count"], 600, "{system}: {r:#}");
        assert!(r["delivered_per_sec"].as_f64().unwrap() > 0.0);
    }
    assert!(
        row(&doc, "ordo")["extra"]["messages_per_fsync"]
            .as_f64()
            .unwrap()
            >= 1.0
    );

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.json");
    std::fs::write(&input, doc.to_string()).unwrap();
    let svg = dir.path().join("chart.svg");
    let status = Command::new(env!("CARGO_BIN_EXE_ordo-bench"))
        .args(["chart", "--output"])
        .arg(&svg)
        .arg(&input)
        .status()
        .unwrap();
    assert!(status.success());
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg"));
    assert_eq!(svg.matches("<rect x=").count(), systems.split(',').count());
}

#[test]
fn fixed_rate_pairs_report_the_disk_floor() {
    let doc = bench(&[
        "pairs",
        "--systems",
        "ordo",
        "--pairs",
        "2",
        "--messages",
        "100",
        "--rate",
        "400",
    ]);
    assert_eq!(doc["scenario"], "pairs-fixed-rate");
    let r = row(&doc, "ordo");
    assert_eq!(r["delivered"], 200, "{r:#}");
    assert!(
        r["extra"]["disk_fdatasync_p99_ms"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    // 200 messages at 400/s take about half a second; they cannot all be in at once.
    assert!(r["seconds"].as_f64().unwrap() >= 0.4, "{r:#}");
}

#[test]
fn fanout_reaches_every_member_on_every_system() {
    let systems = systems();
    let doc = bench(&[
        "fanout",
        "--systems",
        systems,
        "--members",
        "30",
        "--messages",
        "4",
    ]);
    for system in systems.split(',') {
        let r = row(&doc, system);
        assert_eq!(r["delivered"], 120, "{system}: {r:#}");
        assert_eq!(r["extra"]["lost"], 0.0, "{system}: {r:#}");
        assert!(
            r["extra"]["fanout_ms_max"].as_f64().unwrap() > 0.0,
            "{system}: {r:#}"
        );
    }
}

#[test]
fn catchup_brings_an_offline_device_everything() {
    let systems = systems();
    // A window of 8: Mosquitto drops QoS 2 messages past 20 in flight per client.
    let doc = bench(&[
        "catchup",
        "--systems",
        systems,
        "--messages",
        "500",
        "--window",
        "8",
    ]);
    for system in systems.split(',') {
        let r = row(&doc, system);
        assert_eq!(r["sent"], 500, "{system}: {r:#}");
        assert!(
            r["extra"]["catchup_ms"].as_f64().unwrap() > 0.0,
            "{system}: {r:#}"
        );
        // Mosquitto keeps at most 1000 messages for an offline client (its default), so 500
        // all arrive everywhere.
        assert_eq!(r["delivered"], 500, "{system}: {r:#}");
    }
}

#[test]
fn connections_are_held_and_measured() {
    let doc = bench(&[
        "connections",
        "--systems",
        "ordo",
        "--connections",
        "200",
        "--sources",
        "2",
    ]);
    let r = row(&doc, "ordo");
    assert_eq!(r["extra"]["connections"], 200.0, "{r:#}");
    assert!(
        r["extra"]["server_bytes_per_connection"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    assert!(
        r["extra"]["connects_per_sec"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
}

#[test]
fn soak_reports_memory_throughput_windows_and_the_restart() {
    let doc = bench(&[
        "soak",
        "--systems",
        "ordo",
        "--pairs",
        "2",
        "--messages",
        "2000",
        "--min-secs",
        "2",
        "--window-secs",
        "1",
        "--groups",
        "50",
    ]);
    assert_eq!(doc["scenario"], "soak");
    let r = row(&doc, "ordo");
    assert!(r["sent"].as_u64().unwrap() >= 2000, "{r:#}");
    assert_eq!(r["delivered"], r["sent"], "{r:#}");
    assert_eq!(r["extra"]["lost"], 0.0, "{r:#}");
    assert_eq!(r["extra"]["groups"], 50.0, "{r:#}");
    for key in [
        "rss_peak_mib",
        "rss_final_mib",
        "rss_after_restart_mib",
        "data_mib",
        "restart_healthz_ms",
        "restart_first_accept_ms",
        "window_000_msgs_per_sec",
        "window_min_msgs_per_sec",
    ] {
        assert!(
            r["extra"][key].as_f64().unwrap_or(0.0) > 0.0,
            "{key}: {r:#}"
        );
    }
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    for (args, says) in [
        (&["pairs", "--pairs", "0"][..], "--pairs"),
        (&["pairs", "--body-bytes", "4"][..], "--body-bytes"),
        (&["pairs", "--rate=-5"][..], "--rate"),
        (
            &["connections", "--systems", "jetstream"][..],
            "connections scenario",
        ),
        (&["soak", "--systems", "mqtt-qos1"][..], "soak scenario"),
    ] {
        let out = ordo_bench(args).args(["--runs", "1"]).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
