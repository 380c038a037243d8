//! `ordo check`: a chaos run against real processes, and the ledger that judges it.
//!
//! A real `ordo serve` runs as a child process (the test kit's [`ServerProcess`], this very
//! binary, started with `ORDO_*` variables cleared so the caller's environment cannot change the
//! server under test); SDK clients, each with its own
//! store, talk to it through a fault-injecting proxy ([`proxy`]) in a group and in direct
//! conversations at a steady rate. The server is SIGKILLed and restarted at random intervals;
//! clients crash (their driver stops mid-flight) and are reopened on their stores. After the
//! stormy part, faults stop and everything settles; then the ledger checks that every accepted
//! message reached every member device exactly once and in order, that each device's messages
//! kept their send order, and that receipts never went back.
//!
//! With `--ts-clients N`, N TypeScript SDK devices (`t0`, `t1`, ... of the same users, each a
//! Node process running `sdk/typescript/dist/tools/check-device.js` on a SQLite store, see
//! [`ts_device`]) send and receive beside the Rust ones ([`device`] drives either kind), and a
//! crash of one is a SIGKILL of its process. `--ts-sdk DIR` (or `ORDO_TS_SDK`) names the built
//! SDK; by default `sdk/typescript` is looked for above the current directory, then above the
//! `ordo` binary (`<repo>/target/<profile>/ordo`). Build it first with `npm ci && npx tsc -p .`.
//!
//! With `--pg-cluster N` the server runs on a PostgreSQL of the run's own (the test kit's
//! [`PgCluster`]: a primary and N synchronous standbys), and `--db-kills K` SIGKILLs its
//! primary K times during the storm, each time failing over to the standby furthest ahead (or,
//! without standbys, restarting it): every message the server acknowledged must still be
//! delivered.
//!
//! With `--nodes N` the server is a cluster ([`nodes`]): N `ordo serve --cluster` nodes on the
//! `--store` PostgreSQL and the `--nats` NATS server, each behind a client proxy of its own
//! and reaching NATS through a plain proxy of its own. Every device knows all the nodes and
//! starts at its own (device i at node i mod N), moving on when its node fails. Instead of
//! the single server's SIGKILLs, the storm strikes one random node at a time: a SIGKILL (then
//! a restart), a SIGSTOP past its lease (then a SIGCONT), a SIGTERM (it hands its partitions
//! over and must exit cleanly; then a restart), or a cut of its NATS connections; for kills,
//! pauses and SIGTERMs it measures how long the other nodes take to own every partition of the
//! stricken node. A takeover that does not finish, or a node that exits for any reason but
//! a lost partition or cannot be restarted, fails the check as a lost message does.

mod device;
mod ledger;
mod nodes;
mod proxy;
mod ts_device;

use clap::Args;
use device::{Counts, Ctrl, Device, Opener};
use ledger::{Ledger, Report};
use nodes::{Nodes, Tally};
use ordo_client::{ClientOptions, Target};
use ordo_testkit::pg_cluster::PgCluster;
use ordo_testkit::{Admin, ServerOptions, ServerProcess};
use proxy::{FaultProxy, Faults};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Args)]
pub struct CheckArgs {
    /// Seconds of faults and traffic (then everything settles and is verified).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Rust SDK clients (devices); users get one or two devices each.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// TypeScript SDK clients besides: each a Node process (devices t0, t1, ... of the same
    /// users) on a SQLite store, SIGKILLed to crash it.
    #[arg(long, default_value_t = 0)]
    ts_clients: usize,
    /// The TypeScript SDK's directory, built (`npm ci && npx tsc -p .`). Unset: `sdk/typescript`
    /// above the current directory or the `ordo` binary.
    #[arg(long, env = "ORDO_TS_SDK", value_name = "DIR")]
    ts_sdk: Option<PathBuf>,
    /// Mean seconds between server SIGKILLs, each then restarted (0: never); with --nodes,
    /// between node faults.
    #[arg(long, default_value_t = 5.0)]
    kill_every: f64,
    /// Mean seconds between client crashes (0: never).
    #[arg(long, default_value_t = 8.0)]
    client_kill_every: f64,
    /// Mean seconds a connection lives before the proxy cuts it (0: never).
    #[arg(long, default_value_t = 3.0)]
    disconnect_every: f64,
    /// Messages per second, all clients together.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// The server's per-user send limit (sends per second, also the burst); set it below what
    /// a user offers to exercise refusals and resends under the limit. 0: no limit.
    #[arg(long, default_value_t = 0.0)]
    user_rate: f64,
    /// Conversations the server holds in memory; set it below the number in use (the run has a
    /// few groups and direct conversations) to exercise loading and eviction. 0: as few as it
    /// can. Unset: the server's default.
    #[arg(long)]
    conv_cache_entries: Option<usize>,
    /// Run the server on this PostgreSQL database (`ordo serve --store`), which must hold no
    /// Ordo data yet (an empty database, or a `key=value` string with
    /// `options='-c search_path=SCHEMA'` naming an empty schema). Unset: the embedded store.
    /// Required with --nodes.
    #[arg(long, conflicts_with = "pg_cluster")]
    store: Option<String>,
    /// Run the server as a cluster of this many nodes (at least 2) sharing --store and --nats:
    /// each a node behind its own proxy, clients spread over them and knowing them all. The
    /// storm strikes one node at a time (a SIGKILL, a SIGSTOP past its 2 s lease, a SIGTERM,
    /// or a cut of its NATS connections), measures how long the others take to own every
    /// partition of a killed, paused or stopped node, and fails the check if that takes over
    /// 20 s, a SIGTERM does not end in a clean exit, or a node exits for any reason but a lost
    /// partition.
    #[arg(
        long,
        requires = "store",
        conflicts_with_all = ["pg_cluster", "db_kills"],
        value_parser = clap::value_parser!(u32).range(2..)
    )]
    nodes: Option<u32>,
    /// The NATS server of the --nodes cluster.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Run the server on a PostgreSQL of the run's own, started in temporary directories from
    /// the machine's PostgreSQL server binaries (`/usr/lib/postgresql/15/bin`, or `ORDO_PG_BIN`):
    /// a primary and this many standbys, commits waiting for any one of them.
    #[arg(long, value_name = "STANDBYS")]
    pg_cluster: Option<usize>,
    /// SIGKILLs of the `--pg-cluster` primary, spread over the duration: each fails over to
    /// the standby furthest ahead (which is then the primary), or, without standbys, restarts
    /// the primary. The storm lasts until all are done.
    #[arg(long, default_value_t = 0, requires = "pg_cluster")]
    db_kills: u64,
    /// Seed of every random choice (printed; pass it again to replay the same plan).
    #[arg(long)]
    seed: Option<u64>,
    /// Longest wait for everything to be delivered once faults stop.
    #[arg(long, default_value_t = 120)]
    settle_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: CheckArgs) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ordo check: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(check(args)) {
        Ok((report, json)) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                report.print();
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("ordo check: {e}");
            ExitCode::from(2)
        }
    }
}

async fn check(args: CheckArgs) -> Result<(Report, bool), String> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("ordo check: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let ts_runtime = if args.ts_clients > 0 {
        let sdk = ts_device::find_sdk(args.ts_sdk.as_deref())?;
        Some(ts_device::runtime(&sdk).await?)
    } else {
        None
    };

    let mut opts = ServerOptions::new(
        std::env::current_exe().map_err(|e| format!("cannot find the ordo binary: {e}"))?,
    );
    opts.user_rate = args.user_rate;
    if let Some(n) = args.conv_cache_entries {
        opts.extra
            .extend(["--conv-cache-entries".into(), n.to_string()]);
    }
    if let (Some(url), None) = (&args.store, args.nodes) {
        opts.extra.extend(["--store".into(), url.clone()]);
    }
    let cluster = match args.pg_cluster {
        None => None,
        Some(standbys) => {
            let c = tokio::task::spawn_blocking(move || PgCluster::start(standbys))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot start PostgreSQL: {e}"))?;
            eprintln!(
                "ordo check: PostgreSQL primary and {standbys} standbys at {}",
                c.url()
            );
            opts.extra.extend(["--store".into(), c.url()]);
            Some(Arc::new(Mutex::new(c)))
        }
    };
    let servers = Servers::start(&args, opts, seed).await?;
    let (secret, admin) = servers.secret_and_admin()?;

    let faults = Faults {
        mean_life: if args.disconnect_every > 0.0 {
            Duration::from_secs_f64(args.disconnect_every)
        } else {
            Duration::from_secs(1 << 30)
        },
        stall_chance: 0.01,
        max_stall: Duration::from_millis(300),
    };
    // A proxy per server; device i knows them all, starting at its own (i mod their number).
    let mut proxies = Vec::new();
    for port in servers.ports() {
        let p = FaultProxy::start(port, faults.clone(), rng.random())
            .await
            .map_err(|e| format!("cannot start the proxy: {e}"))?;
        proxies.push(p);
    }
    let urls: Vec<String> = proxies.iter().map(|p| format!("ws://{}", p.addr)).collect();

    // Users, devices and conversations.
    let clients = args.clients.max(2);
    let users = (clients * 2 / 3).max(2);
    let names: Vec<String> = (0..users).map(|u| format!("u{u}")).collect();
    admin
        .create_group("chk", &names)
        .await
        .map_err(|e| e.to_string())?;
    // Rust devices d0, d1, ... of users 0, 1, ... in turn, then TypeScript devices t0, t1, ...
    // spread over the users the same way.
    let device = |u: usize, id: String| {
        let peer = (u + 1) % users;
        Device {
            user: names[u].clone(),
            device: id,
            targets: vec![
                (Target::Conv("chk".into()), "chk".into()),
                (
                    Target::User(names[peer].clone()),
                    ordo_client::direct_conv_id(&names[u], &names[peer]),
                ),
            ],
        }
    };
    let devices: Vec<Device> = (0..clients)
        .map(|i| device(i % users, format!("d{}", i / users)))
        .chain((0..args.ts_clients).map(|j| device(j % users, format!("t{j}"))))
        .collect();
    let mut members: Vec<(String, Vec<String>)> = vec![("chk".into(), names.clone())];
    for u in 0..users {
        let peer = (u + 1) % users;
        let conv = ordo_client::direct_conv_id(&names[u], &names[peer]);
        if !members.iter().any(|(c, _)| *c == conv) {
            members.push((conv, vec![names[u].clone(), names[peer].clone()]));
        }
    }
    let ledger = Arc::new(Mutex::new(
        Ledger::new(
            devices
                .iter()
                .map(|d| (d.user.clone(), d.device.clone()))
                .collect(),
            members,
        )
        .ts_devices_from(clients),
    ));

    // Device tasks.
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let per_device_rate = (args.rate / devices.len() as f64).max(0.01);
    let counts = Arc::new(Counts::default());
    let mut ctrls = Vec::new();
    let mut tasks = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        // Valid far beyond any run.
        let token = ordo_testkit::token(&secret, &d.user, &d.device, 10 * 365 * 86_400)
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::unbounded_channel();
        ctrls.push(tx);
        let urls = rotated(&urls, i).join(",");
        let opener = match (&ts_runtime, i < clients) {
            (Some(runtime), false) => Opener::Ts(ts_device::Spec {
                runtime: runtime.clone(),
                urls,
                token,
                store: dir.path().join(format!("{}-{}.sqlite", d.user, d.device)),
                name: format!("{}/{}", d.user, d.device),
            }),
            _ => {
                let mut o = ClientOptions::new(
                    urls,
                    token,
                    dir.path().join(format!("{}-{}.redb", d.user, d.device)),
                );
                o.reconnect.initial_ms = 100;
                o.reconnect.max_ms = 2000;
                o.config.retry.max_attempts = None; // under chaos, keep trying: never give up
                o.config.retry.max_ms = 2000;
                Opener::Rust(o)
            }
        };
        tasks.push(tokio::spawn(device::run(
            i,
            d.clone(),
            opener,
            ledger.clone(),
            rx,
            per_device_rate,
            rng.random(),
            counts.clone(),
        )));
    }

    // The storm: server (or node) faults and client crashes until the duration is over.
    let storm_end = Instant::now() + Duration::from_secs(args.duration);
    let server_kills = Arc::new(AtomicU64::new(0));
    let stop_killing = Arc::new(AtomicBool::new(false));
    let killer = servers.storm(
        args.kill_every,
        rng.random(),
        server_kills.clone(),
        stop_killing.clone(),
    );
    let db_killer = {
        let (cluster, kills) = (cluster.clone(), args.db_kills);
        let every = Duration::from_secs(args.duration) / (kills as u32 + 1);
        let storm_start = Instant::now();
        tokio::task::spawn_blocking(move || -> Result<Vec<u64>, String> {
            let mut took = Vec::new();
            let Some(cluster) = cluster else {
                return Ok(took);
            };
            for k in 1..=kills {
                let at = storm_start + every * k as u32;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let mut c = cluster.lock().map_err(|_| "cluster lock poisoned")?;
                let f = c.fail_primary().map_err(|e| e.to_string())?;
                eprintln!(
                    "ordo check: database primary killed; {} took writes after {} ms",
                    f.primary,
                    f.took.as_millis()
                );
                took.push(f.took.as_millis() as u64);
            }
            Ok(took)
        })
    };
    while Instant::now() < storm_end {
        let wait = if args.client_kill_every > 0.0 {
            exp_secs(&mut rng, args.client_kill_every)
        } else {
            storm_end.saturating_duration_since(Instant::now())
        };
        tokio::time::sleep(wait.min(storm_end.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= storm_end || args.client_kill_every <= 0.0 {
            break;
        }
        let victim = rng.random_range(0..ctrls.len());
        let _ = ctrls[victim].send(Ctrl::Crash);
    }

    let db_recovery_ms = db_killer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("database control failed: {e}"))?;
    // Calm: no more faults, no more new messages; wait for everything to arrive.
    stop_killing.store(true, Ordering::Relaxed);
    let mut tally = killer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("server control failed: {e}"))?;
    for p in &proxies {
        p.set_faults(false);
    }
    for c in &ctrls {
        let _ = c.send(Ctrl::StopSending);
    }
    servers.calm(&mut tally, true).await?;
    let settle_deadline = Instant::now() + Duration::from_secs(args.settle_secs);
    let mut settled = false;
    while Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if ledger.lock().map_err(|_| "ledger lock poisoned")?.settled() {
            settled = true;
            break;
        }
    }
    drop(ctrls);
    for t in tasks {
        t.abort();
    }
    // Nodes that stopped themselves while things settled count too (left down: it is over).
    servers.calm(&mut tally, false).await?;

    let mut report = ledger
        .lock()
        .map_err(|_| "ledger lock poisoned")?
        .verify(settled);
    report.seed = seed;
    report.seconds = started.elapsed().as_secs_f64();
    report.server_kills = server_kills.load(Ordering::Relaxed);
    report.db_kills = db_recovery_ms.len() as u64;
    report.db_recovery_ms = db_recovery_ms;
    report.client_kills = counts.client_kills.load(Ordering::Relaxed);
    report.ts_kills = counts.ts_kills.load(Ordering::Relaxed);
    report.ts_exits = counts.ts_exits.load(Ordering::Relaxed);
    report.disconnects = proxies
        .iter()
        .map(|p| p.disconnects.load(Ordering::Relaxed))
        .sum();
    report.nodes = servers.nodes();
    report.node_kills = tally.node_kills;
    report.node_pauses = tally.node_pauses;
    report.nats_cuts = tally.nats_cuts;
    report.node_stops = tally.node_stops;
    report.handover_ms = tally.handover_ms;
    report.self_stops = tally.self_stops;
    report.takeover_ms = tally.takeover_ms;
    report.node_failures = tally.failures.len() as u64;
    report.violations.extend(tally.failures);
    if let (false, Servers::Cluster(nodes)) = (report.passed(), &servers) {
        let dir = std::env::temp_dir().join(format!("ordo-check-{seed}"));
        match nodes.keep_logs(&dir).await {
            Ok(()) => eprintln!("ordo check: the nodes' logs are in {}", dir.display()),
            Err(e) => eprintln!("ordo check: the nodes' logs could not be kept: {e}"),
        }
    }
    Ok((report, args.json))
}

/// The servers under test: one `ordo serve`, or the nodes of a cluster.
enum Servers {
    One {
        server: Arc<Mutex<ServerProcess>>,
        port: u16,
    },
    Cluster(Arc<Nodes>),
}

impl Servers {
    /// One server with `opts`, or with `--nodes` that many nodes on `--store` and `--nats`.
    async fn start(args: &CheckArgs, opts: ServerOptions, seed: u64) -> Result<Servers, String> {
        if let Some(n) = args.nodes {
            let store = args.store.as_deref().ok_or("--nodes needs --store")?;
            let nodes = Nodes::start(n as usize, &opts, store, &args.nats, seed).await?;
            eprintln!(
                "ordo check: {n} nodes on ports {:?}, every partition owned",
                nodes.ports()
            );
            return Ok(Servers::Cluster(Arc::new(nodes)));
        }
        let server = tokio::task::spawn_blocking(move || ServerProcess::start(opts))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot start `ordo serve`: {e}"))?;
        Ok(Servers::One {
            port: server.port(),
            server: Arc::new(Mutex::new(server)),
        })
    }

    /// The token secret, and the admin API the check creates its group through (node 0's).
    fn secret_and_admin(&self) -> Result<(String, Admin), String> {
        match self {
            Servers::One { server, .. } => {
                let s = server.lock().map_err(|_| "server lock poisoned")?;
                let admin = Admin::new(&s.http_url(), s.admin_key()).map_err(|e| e.to_string())?;
                Ok((s.secret().to_string(), admin))
            }
            Servers::Cluster(nodes) => Ok((nodes.secret()?, nodes.admin().clone())),
        }
    }

    fn ports(&self) -> Vec<u16> {
        match self {
            Servers::One { port, .. } => vec![*port],
            Servers::Cluster(nodes) => nodes.ports(),
        }
    }

    /// Cluster nodes (0: one server).
    fn nodes(&self) -> usize {
        match self {
            Servers::One { .. } => 0,
            Servers::Cluster(nodes) => nodes.len(),
        }
    }

    /// The faults of the storm until `stop`, at intervals around `mean` seconds (none if 0):
    /// SIGKILLs of the one server (counted in `kills`), or the node faults of a cluster.
    fn storm(
        &self,
        mean: f64,
        seed: u64,
        kills: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<Result<Tally, String>> {
        match self {
            Servers::One { server, port } => {
                let (server, port) = (server.clone(), *port);
                tokio::task::spawn_blocking(move || {
                    kill_server(&server, port, mean, seed, &kills, &stop).map(|()| Tally::default())
                })
            }
            Servers::Cluster(nodes) => tokio::spawn(nodes.clone().storm(mean, seed, stop)),
        }
    }

    /// Faults are over: restarts whatever is down (with `restart` false only counts cluster
    /// nodes that stopped themselves).
    async fn calm(&self, tally: &mut Tally, restart: bool) -> Result<(), String> {
        match self {
            Servers::One { server, port } if restart => {
                let (server, port) = (server.clone(), *port);
                tokio::task::spawn_blocking(move || -> Result<(), String> {
                    let mut s = server.lock().map_err(|_| "server lock poisoned")?;
                    if !s.is_running() {
                        s.restart().map_err(|e| e.to_string())?;
                        same_port(&s, port)?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Servers::One { .. } => Ok(()),
            Servers::Cluster(nodes) => nodes.ensure_running(tally, restart).await,
        }
    }
}

/// The single server's storm: SIGKILLs at intervals uniform around `mean` seconds, each then
/// restarted after a short while, until `stop`.
fn kill_server(
    server: &Mutex<ServerProcess>,
    port: u16,
    mean: f64,
    seed: u64,
    kills: &AtomicU64,
    stop: &AtomicBool,
) -> Result<(), String> {
    if mean <= 0.0 {
        return Ok(());
    }
    let mut r = StdRng::seed_from_u64(seed);
    loop {
        // Uniform around the mean, so that a run of a given length sees a predictable number
        // of kills.
        let wait = Duration::from_secs_f64(mean * r.random_range(0.5..1.5));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let down = Duration::from_millis(r.random_range(50..600));
        let mut s = server.lock().map_err(|_| "server lock poisoned")?;
        s.kill9().map_err(|e| e.to_string())?;
        kills.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(down);
        s.restart().map_err(|e| e.to_string())?;
        same_port(&s, port)?;
    }
}

/// `urls` starting at `i` mod their number, then on in turn.
fn rotated(urls: &[String], i: usize) -> Vec<String> {
    let k = i % urls.len().max(1);
    urls[k..].iter().chain(&urls[..k]).cloned().collect()
}

/// The proxy and the clients know the server by its first port: a restart that had to move
/// (someone else took the port while it was down) ends the run rather than leave every client
/// dialling a dead port.
fn same_port(s: &ServerProcess, port: u16) -> Result<(), String> {
    if s.port() == port {
        Ok(())
    } else {
        Err(format!(
            "port {port} was taken while the server was down; it came back on {} instead, which the proxy does not know: run the check again",
            s.port()
        ))
    }
}

fn exp_secs(r: &mut StdRng, mean: f64) -> Duration {
    let u: f64 = r.random_range(0.0001..1.0);
    Duration::from_secs_f64(mean * -u.ln())
}
