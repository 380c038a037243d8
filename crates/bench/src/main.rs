//! `ordo-bench`: the same workloads against Ordo and against the systems users would pick
//! instead (Mosquitto with QoS 1 and QoS 2, NATS JetStream), on one machine, in one run.
//!
//! Each scenario (`pairs`, `fanout`, `catchup`, `connections`) is written once, in
//! [`scenario`], over the [`system::System`] trait; [`ordo`], [`mqtt`] and [`jetstream`] say how
//! to set up each part of a scenario on their system. Runs are alternated between systems (Ordo,
//! QoS 1, QoS 2, JetStream, Ordo, ...), and each system's row is the median of its runs
//! ([`report::median`]). `disk` measures the disk's own fdatasync latency, the floor under
//! Ordo's delivery latency; `chart` draws an SVG from the `--json` output.
//!
//! Not part of the product: the `ordo` binary links none of the peers' clients.

mod chart;
mod cpu;
mod disk;
mod jetstream;
mod mqtt;
mod ordo;
mod payload;
mod progress;
mod report;
mod scenario;
mod system;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ordo_testkit::pg_cluster::PgCluster;
use payload::Clock;
use report::Outcome;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ordo-bench",
    version,
    about = "Benchmarks: Ordo side by side with Mosquitto and NATS JetStream"
)]
struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// P sender/receiver pairs in 1:1 conversations, each sender with at most W unconfirmed
    /// messages; with --rate, senders keep a fixed total rate instead.
    Pairs(PairsCmd),
    /// One sender into a group of N members, all online: time until every member has each
    /// message.
    Fanout(FanoutCmd),
    /// A device offline while K messages arrive: time to receive them all once it reconnects.
    Catchup(CatchupCmd),
    /// N idle authenticated connections held open: server memory per connection, connect rate.
    Connections(ConnectionsCmd),
    /// A long run into one server (pairs at full speed): its memory every second, deliveries
    /// per window, then its restart time after a SIGKILL.
    Soak(SoakCmd),
    /// The disk's own fdatasync latency (append 4 KiB, fdatasync), in the given directory.
    Disk(disk::DiskArgs),
    /// Draw an SVG chart from the `--json` outputs of earlier runs.
    Chart(chart::ChartArgs),
}

/// Options every message scenario shares.
#[derive(Args, Clone)]
pub struct Common {
    /// Systems to measure, comma-separated [default: ordo,mqtt-qos1,mqtt-qos2,jetstream; with
    /// --nodes: ordo-pg,ordo-cluster,jetstream].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub systems: Vec<System>,
    /// Runs per system (alternated between systems); rows show the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print the result (every run and the medians) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Measure this running Ordo server (ws://host:port) instead of starting one. Tokens are
    /// minted with --admin-key or the key in --data.
    #[arg(long)]
    pub server: Option<String>,
    /// The running server's data directory (its `admin.key`), with --server.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The running server's admin key, with --server.
    #[arg(long, env = "ORDO_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Extra `ordo serve` flags for the server the bench starts (e.g. "--push-window 1024").
    #[arg(long, allow_hyphen_values = true)]
    pub serve_args: Option<String>,
    /// The `ordo` binary to start [default: `ordo` beside this program, built first if it is
    /// missing and this runs under `cargo run`].
    #[arg(long, env = "ORDO_BIN")]
    pub ordo: Option<PathBuf>,
    /// Mosquitto's address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: String,
    /// NATS's URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The PostgreSQL database the `ordo-pg` system keeps its store in (a `postgres://` URL or
    /// a key=value string); each run gets a schema of its own there, dropped after.
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    )]
    pub store: String,
    /// Runs `ordo-pg` on a PostgreSQL of the bench's own instead of `--store`: a primary and
    /// this many standbys with quorum commit (`synchronous_standby_names = 'ANY 1 (...)'`;
    /// 0: a lone primary), from the server binaries in `/usr/lib/postgresql/15/bin` (or
    /// `ORDO_PG_BIN`), removed after. Its CPU counts as PostgreSQL's.
    #[arg(long, conflicts_with = "store")]
    pub pg_cluster: Option<usize>,
    /// Nodes of the `ordo-cluster` system: `ordo serve --cluster` on a schema of the run's own
    /// in `--store` (or `--pg-cluster`'s primary) and on `--nats` [default: 3]. Given without
    /// --systems, the run measures a cluster of this many nodes beside one node on the same
    /// store and JetStream.
    #[arg(long)]
    pub nodes: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    Ordo,
    /// Ordo on the PostgreSQL store (`--store`).
    OrdoPg,
    /// Ordo as a cluster of `--nodes` nodes on the PostgreSQL store and NATS.
    OrdoCluster,
    MqttQos1,
    MqttQos2,
    Jetstream,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Ordo => "ordo",
            System::OrdoPg => "ordo-pg",
            System::OrdoCluster => "ordo-cluster",
            System::MqttQos1 => "mqtt-qos1",
            System::MqttQos2 => "mqtt-qos2",
            System::Jetstream => "jetstream",
        }
    }
}

#[derive(Args, Clone, Serialize)]
pub struct PairsArgs {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Most unconfirmed messages per sender.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Body size in bytes (at least 16: the send time stamp).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Fixed total send rate in msgs/s across all senders. Latency counts from each message's
    /// actual send; how far senders fell behind their schedule (a full window holds them back)
    /// is reported as `behind_ms_p50`/`behind_ms_p99`.
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(Args)]
struct PairsCmd {
    #[command(flatten)]
    args: PairsArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone, Serialize)]
pub struct FanoutArgs {
    /// Group members, each with one online device (the sender is one of them).
    #[arg(long, default_value_t = 10_000)]
    pub members: usize,
    /// Messages sent, one after another: each is sent once every member has the previous one.
    #[arg(long, default_value_t = 20)]
    pub messages: usize,
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
}

#[derive(Args)]
struct FanoutCmd {
    #[command(flatten)]
    args: FanoutArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone, Serialize)]
pub struct CatchupArgs {
    /// Messages that arrive while the device is offline.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Most unconfirmed messages while filling.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
}

#[derive(Args)]
struct CatchupCmd {
    #[command(flatten)]
    args: CatchupArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone, Serialize)]
pub struct ConnectionsArgs {
    /// Idle connections to hold open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Source addresses 127.0.0.1 .. 127.0.0.N to spread them over (about 28,000 ports each).
    #[arg(long, default_value_t = 4)]
    pub sources: u8,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

#[derive(Args)]
struct ConnectionsCmd {
    #[command(flatten)]
    args: ConnectionsArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone, Serialize)]
pub struct SoakArgs {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Messages to send in all (senders carry on past it until --min-secs have passed).
    #[arg(long, default_value_t = 10_000_000)]
    pub messages: u64,
    /// Shortest run, in seconds.
    #[arg(long, default_value_t = 60)]
    pub min_secs: u64,
    /// Most unconfirmed messages per sender.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Seconds per throughput window.
    #[arg(long, default_value_t = 10)]
    pub window_secs: u64,
    /// Groups of two members to create before the run: conversations the server holds, and
    /// loads again when it restarts.
    #[arg(long, default_value_t = 0)]
    pub groups: usize,
}

#[derive(Args)]
struct SoakCmd {
    #[command(flatten)]
    args: SoakArgs,
    #[command(flatten)]
    common: Common,
}

/// What went wrong in a benchmark, and what to do about it.
#[derive(Debug)]
pub struct BenchError(pub String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `.map_err(fail("what was being done"))`: keeps the cause and says what failed.
pub fn fail<E: std::fmt::Display>(doing: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |e| BenchError(format!("{doing}: {e}"))
}

/// A name no earlier run used, for topics, client ids, streams and users.
pub fn run_tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Raises this process's open-file limit to `want` if the hard limit allows (each connection is
/// a file descriptor on both ends; the Ordo server the bench starts inherits the limit), and
/// fails with what to do if it cannot.
pub fn raise_fd_limit(want: u64) -> Result<(), BenchError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    let ok = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            false
        } else {
            if lim.rlim_max < want {
                let raised = libc::rlimit {
                    rlim_cur: want,
                    rlim_max: want,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    return Ok(());
                }
            }
            lim.rlim_cur = lim.rlim_max.min(want.max(lim.rlim_cur));
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur >= want
        }
    };
    if ok {
        Ok(())
    } else {
        Err(BenchError(format!(
            "this run needs {want} open files per process but the limit is {} (hard {}); raise the hard limit (ulimit -Hn, as root) or ask for fewer connections",
            lim.rlim_cur, lim.rlim_max
        )))
    }
}

#[derive(Serialize)]
struct Results<'a, P: Serialize> {
    scenario: &'a str,
    params: &'a P,
    runs: &'a [Outcome],
    medians: &'a [Outcome],
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    match args.scenario {
        Scenario::Disk(a) => return disk::run(a),
        Scenario::Chart(a) => return chart::run(a),
        _ => {}
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ordo-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match args.scenario {
            Scenario::Pairs(c) => {
                if c.args.body_bytes < payload::STAMP_LEN {
                    return Err(BenchError(format!(
                        "--body-bytes must be at least {} (the send time stamp)",
                        payload::STAMP_LEN
                    )));
                }
                if c.args.pairs == 0 || c.args.window == 0 || c.args.messages == 0 {
                    return Err(BenchError(
                        "--pairs, --window and --messages must be at least 1".into(),
                    ));
                }
                if c.args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                    return Err(BenchError(
                        "--rate must be a positive number of messages per second".into(),
                    ));
                }
                let name = if c.args.rate.is_some() {
                    "pairs-fixed-rate"
                } else {
                    "pairs"
                };
                series(name, &c.args, &c.common, Run::Pairs(&c.args)).await
            }
            Scenario::Fanout(c) => {
                if c.args.members == 0 || c.args.messages == 0 {
                    return Err(BenchError(
                        "--members and --messages must be at least 1".into(),
                    ));
                }
                series("fanout", &c.args, &c.common, Run::Fanout(&c.args)).await
            }
            Scenario::Catchup(c) => {
                if c.args.messages == 0 || c.args.window == 0 {
                    return Err(BenchError(
                        "--messages and --window must be at least 1".into(),
                    ));
                }
                series("catchup", &c.args, &c.common, Run::Catchup(&c.args)).await
            }
            Scenario::Connections(c) => {
                series("connections", &c.args, &c.common, Run::Connections(&c.args)).await
            }
            Scenario::Soak(c) => {
                if c.args.pairs == 0 || c.args.window == 0 || c.args.messages == 0 {
                    return Err(BenchError(
                        "--pairs, --window and --messages must be at least 1".into(),
                    ));
                }
                if c.args.body_bytes < payload::STAMP_LEN {
                    return Err(BenchError(format!(
                        "--body-bytes must be at least {} (the send time stamp)",
                        payload::STAMP_LEN
                    )));
                }
                series("soak", &c.args, &c.common, Run::Soak(&c.args)).await
            }
            Scenario::Disk(_) | Scenario::Chart(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ordo-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One scenario with its parameters.
#[derive(Clone, Copy)]
enum Run<'a> {
    Pairs(&'a PairsArgs),
    Fanout(&'a FanoutArgs),
    Catchup(&'a CatchupArgs),
    Connections(&'a ConnectionsArgs),
    Soak(&'a SoakArgs),
}

/// One run of `run` on a fresh set-up of `system`.
async fn run_once(system: System, common: &Common, run: Run<'_>) -> Result<Outcome, BenchError> {
    let only_ordo = match run {
        Run::Connections(_) => Some("connections"),
        Run::Soak(_) => Some("soak"),
        _ => None,
    };
    let ordo = matches!(system, System::Ordo | System::OrdoPg);
    if matches!(system, System::OrdoCluster) && !matches!(run, Run::Pairs(_) | Run::Fanout(_)) {
        return Err(BenchError(
            "ordo-cluster runs the pairs and fanout scenarios".into(),
        ));
    }
    if let (Some(scenario), false) = (only_ordo, ordo) {
        return Err(BenchError(format!(
            "the {scenario} scenario measures Ordo's server only (not {}); run it with --systems ordo",
            system.name()
        )));
    }
    match system {
        System::Ordo => run_on(ordo::Ordo::start(common, false).await?, run).await,
        System::OrdoPg => run_on(ordo::Ordo::start(common, true).await?, run).await,
        System::OrdoCluster => run_on(ordo::Ordo::start_cluster(common).await?, run).await,
        System::MqttQos1 => run_on(mqtt::Mqtt::new(&common.mqtt, 1)?, run).await,
        System::MqttQos2 => run_on(mqtt::Mqtt::new(&common.mqtt, 2)?, run).await,
        System::Jetstream => run_on(jetstream::JetStream::open(&common.nats).await?, run).await,
    }
}

/// Runs `run` on `sys` (the same scenario code for every system), then cleans up after it.
async fn run_on<S: system::System>(mut sys: S, run: Run<'_>) -> Result<Outcome, BenchError> {
    let clock = Clock::new();
    let result = match run {
        Run::Pairs(a) => scenario::pairs(&mut sys, a, &clock).await,
        Run::Fanout(a) => scenario::fanout(&mut sys, a, &clock).await,
        Run::Catchup(a) => scenario::catchup(&mut sys, a, &clock).await,
        Run::Connections(a) => scenario::connections(&mut sys, a).await,
        Run::Soak(a) => scenario::soak(&mut sys, a, &clock).await,
    };
    sys.close(result).await
}

/// Runs `run` for every system, `common.runs` times, alternating systems, then prints the
/// medians (and with `--json` every run).
async fn series<P: Serialize>(
    scenario: &str,
    params: &P,
    common: &Common,
    run: Run<'_>,
) -> Result<(), BenchError> {
    let with_systems;
    let common = match (common.systems.is_empty(), common.nodes) {
        (false, _) => common,
        (true, nodes) => {
            with_systems = Common {
                systems: match nodes {
                    Some(_) => vec![System::OrdoPg, System::OrdoCluster, System::Jetstream],
                    None => vec![
                        System::Ordo,
                        System::MqttQos1,
                        System::MqttQos2,
                        System::Jetstream,
                    ],
                },
                ..common.clone()
            };
            &with_systems
        }
    };
    if common.runs == 0 || common.systems.is_empty() {
        return Err(BenchError("--runs and --systems must not be empty".into()));
    }
    // Before any server is started: a child keeps the limit it was started with.
    match run {
        Run::Fanout(a) => raise_fd_limit(a.members as u64 + 1024)?,
        Run::Connections(a) => raise_fd_limit(a.connections as u64 + 512)?,
        Run::Pairs(_) | Run::Catchup(_) | Run::Soak(_) => {}
    }
    let cluster = match common.pg_cluster {
        Some(n)
            if common.systems.contains(&System::OrdoPg)
                || common.systems.contains(&System::OrdoCluster) =>
        {
            if !common.json {
                eprintln!("{scenario}: starting PostgreSQL with {n} standby(s)");
            }
            let c = tokio::task::spawn_blocking(move || PgCluster::start(n))
                .await
                .map_err(|e| BenchError(e.to_string()))?
                .map_err(|e| BenchError(format!("--pg-cluster: {e}")))?;
            Some(c)
        }
        _ => None,
    };
    let on_cluster;
    let common = match &cluster {
        Some(c) => {
            on_cluster = Common {
                store: c.url(),
                ..common.clone()
            };
            &on_cluster
        }
        None => common,
    };
    let mut runs: Vec<Outcome> = Vec::new();
    for round in 0..common.runs {
        for &sys in &common.systems {
            if !common.json {
                eprintln!(
                    "{scenario}: {} run {}/{}",
                    sys.name(),
                    round + 1,
                    common.runs
                );
            }
            let outcome = run_once(sys, common, run)
                .await
                .map_err(|e| BenchError(format!("{scenario} on {}: {e}", sys.name())))?;
            runs.push(outcome);
        }
    }
    let medians: Vec<Outcome> = common
        .systems
        .iter()
        .filter_map(|s| {
            let mine: Vec<Outcome> = runs
                .iter()
                .filter(|r| r.system == s.name())
                .cloned()
                .collect();
            report::median(&mine)
        })
        .collect();
    if common.json {
        let doc = Results {
            scenario,
            params,
            runs: &runs,
            medians: &medians,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(fail("cannot write JSON"))?
        );
    } else {
        println!(
            "{scenario} ({}), median of {} run(s):",
            serde_json::to_string(params).unwrap_or_default(),
            common.runs
        );
        print!("{}", report::table(&medians));
    }
    Ok(())
}
