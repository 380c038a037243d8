//! `ordo bench send`: N concurrent senders, each with at most W unaccepted messages, against a
//! running server. Reports accepted msgs/s, accept-latency percentiles (send to `accepted`,
//! which includes the fsync), and how many messages shared one fsync (from `/metrics`).

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use ordo::wire::WireClient;
use ordo_protocol::{ClientFrame, Encoding, ServerFrame};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// WebSocket base URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:7400")]
    server: String,
    /// Admin key (mints the senders' tokens); read from `<data>/admin.key` when unset.
    #[arg(long, env = "ORDO_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// The server's data directory, to find `admin.key`.
    #[arg(long, env = "ORDO_DATA", default_value = "./ordo-data")]
    data: PathBuf,
    /// Concurrent senders (each its own user and connection).
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Most unaccepted messages per sender.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    #[arg(long, value_enum, default_value_t = Enc::Msgpack)]
    encoding: Enc,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Enc {
    Json,
    Msgpack,
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Wire(#[from] ordo::wire::WireError),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Other(String),
}

pub fn run(args: BenchArgs) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ordo bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ordo bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The HTTP base URL of the server named by a `ws://host:port` URL (a trailing `/v1/ws` is
/// tolerated).
fn http_base(ws: &str) -> Result<String, BenchError> {
    let rest = ws
        .strip_prefix("ws://")
        .map(|r| format!("http://{r}"))
        .or_else(|| ws.strip_prefix("wss://").map(|r| format!("https://{r}")))
        .ok_or_else(|| {
            BenchError::Other(format!(
                "--server {ws:?} must be a WebSocket URL such as ws://127.0.0.1:7400"
            ))
        })?;
    Ok(rest
        .trim_end_matches('/')
        .trim_end_matches("/v1/ws")
        .to_string())
}

/// Turns an HTTP failure into what went wrong and what to do.
fn explain(e: reqwest::Error, base: &str) -> BenchError {
    if e.is_connect() {
        return BenchError::Other(format!(
            "cannot reach the server at {base}: is `ordo serve` running there?"
        ));
    }
    if e.status().is_some_and(|s| s.as_u16() == 401) {
        return BenchError::Other(
            "the server refused the admin key: pass the server's key with --admin-key, or --data with its data directory".into(),
        );
    }
    BenchError::Http(e)
}

/// Reads the counters we need from the Prometheus text.
async fn scrape(http: &reqwest::Client, base: &str) -> Result<HashMap<String, f64>, BenchError> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(|e| explain(e, base))?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

async fn bench(args: BenchArgs) -> Result<(), BenchError> {
    let admin = match args.admin_key.clone() {
        Some(k) => k,
        None => std::fs::read_to_string(args.data.join("admin.key"))
            .map(|s| s.trim().to_string())
            .map_err(|e| {
                BenchError::Other(format!(
                    "no --admin-key and cannot read {}: {e}",
                    args.data.join("admin.key").display()
                ))
            })?,
    };
    let base = http_base(&args.server)?;
    let server = base.replacen("http", "ws", 1);
    let http = reqwest::Client::new();
    let run_id = std::process::id();
    let mut tokens = Vec::new();
    for i in 0..args.senders {
        let resp: serde_json::Value = http
            .post(format!("{base}/v1/admin/tokens"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"user": format!("bench-{run_id}-{i}"), "device": "d"}))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| explain(e, &base))?
            .json()
            .await?;
        let t = resp["token"]
            .as_str()
            .ok_or_else(|| BenchError::Other("token endpoint returned no token".into()))?;
        tokens.push(t.to_string());
    }
    let before = scrape(&http, &base).await?;
    let enc = match args.encoding {
        Enc::Json => Encoding::Json,
        Enc::Msgpack => Encoding::MsgPack,
    };
    let body = "x".repeat(args.body_bytes);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let server = server.clone();
        let body = body.clone();
        let (messages, window) = (args.messages, args.window);
        tasks.push(tokio::spawn(async move {
            sender(server, token, enc, i, run_id, messages, window, body).await
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let mut accepted = 0u64;
    let mut retries = 0u64;
    for t in tasks {
        let (h, n, r) = t.await.map_err(|e| BenchError::Other(e.to_string()))??;
        hist.add(&h).map_err(|e| BenchError::Other(e.to_string()))?;
        accepted += n;
        retries += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = scrape(&http, &base).await?;
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let commits = delta("ordo_commits_total");
    let committed_msgs = delta("ordo_commit_batch_messages_sum");
    let per_fsync = if commits > 0.0 {
        committed_msgs / commits
    } else {
        0.0
    };
    let rate = accepted as f64 / elapsed;
    let p = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "senders": args.senders, "messages_per_sender": args.messages,
                "window": args.window, "body_bytes": args.body_bytes,
                "accepted": accepted, "rate_limited_retries": retries,
                "seconds": elapsed, "accepted_per_sec": rate,
                "commits": commits, "messages_per_fsync": per_fsync,
                "accept_latency_ms": {"p50": p(0.5), "p90": p(0.9), "p99": p(0.99),
                    "p999": p(0.999), "max": hist.max() as f64 / 1000.0},
            })
        );
    } else {
        println!(
            "senders {}  messages {}  window {}  body {} B",
            args.senders, accepted, args.window, args.body_bytes
        );
        println!("accepted/s         {rate:>10.0}");
        println!("messages per fsync {per_fsync:>10.1}   ({commits:.0} commits)");
        println!(
            "accept latency ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            hist.max() as f64 / 1000.0
        );
        if retries > 0 {
            println!("rate-limited resends {retries} (start the server with --rate-per-sec 0 to measure raw speed)");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    server: String,
    token: String,
    enc: Encoding,
    i: usize,
    run_id: u32,
    messages: usize,
    window: usize,
    body: String,
) -> Result<(Histogram<u64>, u64, u64), BenchError> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let mut c = WireClient::connect(&server, &token, enc).await?;
    let peer = format!("bench-{run_id}-peer-{i}");
    let mut in_flight: HashMap<String, Instant> = HashMap::new();
    let (mut next, mut done, mut retries) = (0usize, 0u64, 0u64);
    let frame = |k: usize| ClientFrame::Send {
        conv: None,
        to: Some(peer.clone()),
        cmid: format!("m{k}"),
        body: body.clone(),
        reply_to: None,
    };
    while (done as usize) < messages {
        while next < messages && in_flight.len() < window {
            in_flight.insert(format!("m{next}"), Instant::now());
            c.send(&frame(next)).await?;
            next += 1;
        }
        match c.recv_timeout(Duration::from_secs(30)).await? {
            ServerFrame::Accepted { cmid, .. } => {
                if let Some(t) = in_flight.remove(&cmid) {
                    hist.saturating_record(t.elapsed().as_micros() as u64);
                    done += 1;
                }
            }
            ServerFrame::Rejected {
                cmid,
                retryable: true,
                retry_after_ms,
                ..
            } => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(retry_after_ms.unwrap_or(10))).await;
                let k: usize = cmid[1..].parse().unwrap_or(0);
                c.send(&frame(k)).await?;
            }
            ServerFrame::Rejected { message, .. } | ServerFrame::Error { message, .. } => {
                return Err(BenchError::Other(format!(
                    "server refused a send: {message}"
                )));
            }
            _ => {}
        }
    }
    c.close().await;
    Ok((hist, done, retries))
}
