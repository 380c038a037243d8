//! `ordo check --nodes N`: the server under test as the N nodes of a cluster (`ordo serve
//! --cluster`) on one PostgreSQL database and one NATS server, and the node faults of the
//! storm.
//!
//! Each node reaches NATS through a plain TCP proxy of its own ([`FaultProxy::plain`]), so
//! that the check can cut one node's NATS connections without touching the others'. One fault
//! at a time, on a random node: a SIGKILL (then a restart), a SIGSTOP past the lease (then a
//! SIGCONT), a SIGTERM (the node hands its partitions over and must exit cleanly; then a
//! restart), or a NATS cut. For a kill, a pause and a SIGTERM the check measures the takeover:
//! how long until, by a surviving node's `/v1/admin/cluster`, every partition has a live owner
//! and none is the stricken node (for a SIGTERM, from the signal, the handover included). A
//! takeover that does not finish in [`TAKEOVER_LIMIT`] fails the check.
//!
//! A paused node resumed after its leases ran out may find that another took over a partition
//! it had work on; it then stops itself (fail-stop, "no longer owns" in its log). That is
//! expected: before every fault the check restarts every node found exited and counts it as a
//! self-stop. A node that exited for any other reason, or cannot be restarted, fails the
//! check.

use super::proxy::FaultProxy;
use super::same_port;
use ordo_testkit::{Admin, HarnessError, ServerOptions, ServerProcess};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The nodes' lease: a dead node's partitions move after about this long.
const LEASE: Duration = Duration::from_millis(2000);
/// A pause lasts this much past the lease, so that the node surely lost its leases.
const PAUSE_PAST_LEASE: Duration = Duration::from_millis(1500);
/// Longest wait for a takeover before it counts as a failure.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(20);
/// How often a takeover is polled.
const POLL: Duration = Duration::from_millis(50);
/// Longest wait for one status request (a busy node must not hold up the poll).
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait, at the start, for every node to join and every partition to have an owner.
const JOIN_LIMIT: Duration = Duration::from_secs(60);
/// Log lines of a node quoted in a violation.
const TAIL_LINES: usize = 12;
/// What a node that stopped itself over a lost partition says as it exits.
const FAIL_STOP: &str = "no longer owns";
/// What a panicking thread says (a fail-stop is an orderly exit, not a panic).
const PANIC: &str = "panicked at";

/// One node: its process, its id and the proxy in front of its NATS.
struct Node {
    id: String,
    process: Arc<Mutex<ServerProcess>>,
    /// The port the node listens on (kept across restarts, see [`same_port`]).
    port: u16,
    admin: Admin,
    nats: FaultProxy,
    /// Left down by a failed restart: found exited again, it is not a self-stop.
    failed_restart: AtomicBool,
}

/// The cluster under test.
pub struct Nodes {
    nodes: Vec<Node>,
}

/// What the node faults did, for the report.
#[derive(Default)]
pub struct Tally {
    pub node_kills: u64,
    pub node_pauses: u64,
    pub nats_cuts: u64,
    pub node_stops: u64,
    pub self_stops: u64,
    pub takeover_ms: Vec<u64>,
    pub handover_ms: Vec<u64>,
    /// Takeovers not finished in time, failed restarts, unexplained exits: in words.
    pub failures: Vec<String>,
}

/// Which fault a node gets.
#[derive(Clone, Copy)]
enum Fault {
    Kill,
    Pause,
    Term,
    CutNats,
}

impl Nodes {
    /// Starts `n` nodes of one cluster on `store` and `nats` (each through its own proxy),
    /// sharing `base`'s options and one secret, and waits until every node has joined and
    /// every partition has a live owner.
    pub async fn start(
        n: usize,
        base: &ServerOptions,
        store: &str,
        nats: &str,
        seed: u64,
    ) -> Result<Nodes, String> {
        let (creds, upstream) = nats_address(nats)?;
        let secret = format!("chk-{seed:x}-{:016x}", rand::random::<u64>());
        let mut starting = Vec::with_capacity(n);
        for i in 0..n {
            let proxy = FaultProxy::plain(upstream.clone())
                .await
                .map_err(|e| format!("cannot start the NATS proxy: {e}"))?;
            let id = format!("node{i}");
            let mut opts = base.clone();
            opts.secret = Some(secret.clone());
            opts.extra.extend([
                "--cluster".into(),
                "--store".into(),
                store.to_string(),
                "--nats".into(),
                format!("nats://{creds}{}", proxy.addr),
                "--node-id".into(),
                id.clone(),
                "--subject-prefix".into(),
                format!("chk{seed:x}"),
                "--lease-ms".into(),
                LEASE.as_millis().to_string(),
            ]);
            // All at once: they join the way a cluster's nodes come up together.
            let started = tokio::task::spawn_blocking(move || ServerProcess::start(opts));
            starting.push((id, proxy, started));
        }
        let mut nodes = Vec::with_capacity(n);
        for (id, nats, started) in starting {
            let s = started
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot start `ordo serve --cluster` as {id}: {e}"))?;
            let admin = Admin::new(&s.http_url(), s.admin_key()).map_err(|e| e.to_string())?;
            nodes.push(Node {
                id,
                port: s.port(),
                process: Arc::new(Mutex::new(s)),
                admin,
                nats,
                failed_restart: AtomicBool::new(false),
            });
        }
        let nodes = Nodes { nodes };
        nodes.joined().await?;
        Ok(nodes)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The ports the nodes listen on, node 0 first.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The secret that signs client tokens (every node's).
    pub fn secret(&self) -> Result<String, String> {
        let s = self.nodes[0]
            .process
            .lock()
            .map_err(|_| "node lock poisoned")?;
        Ok(s.secret().to_string())
    }

    /// Node 0's admin API, where the check creates its group.
    pub fn admin(&self) -> &Admin {
        &self.nodes[0].admin
    }

    /// Waits until node 0 sees every node live and every partition owned.
    async fn joined(&self) -> Result<(), String> {
        let deadline = Instant::now() + JOIN_LIMIT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(body) = status(&self.nodes[0].admin).await {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let live = v["live_nodes"].as_array().map_or(0, Vec::len);
                if live == self.nodes.len() && taken_over(&body, None) {
                    return Ok(());
                }
                last = body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "the cluster did not form within {} s (node0 last said {last}):\n{}",
            JOIN_LIMIT.as_secs(),
            self.tail(0)
        ))
    }

    /// The storm's node faults until `stop`: one at a time, on a random node, at intervals
    /// uniform around `mean` seconds (none if `mean` is 0).
    pub async fn storm(
        self: Arc<Self>,
        mean: f64,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> Result<Tally, String> {
        let mut tally = Tally::default();
        if mean <= 0.0 {
            return Ok(tally);
        }
        let mut r = StdRng::seed_from_u64(seed);
        loop {
            let until = Instant::now() + Duration::from_secs_f64(mean * r.random_range(0.5..1.5));
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return Ok(tally);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.ensure_running(&mut tally, true).await?;
            let victim = r.random_range(0..self.nodes.len());
            let fault =
                [Fault::Kill, Fault::Pause, Fault::Term, Fault::CutNats][r.random_range(0..4)];
            match fault {
                Fault::Kill => self.kill(victim, &mut tally).await?,
                Fault::Pause => self.pause(victim, &mut tally).await?,
                Fault::Term => self.term(victim, &mut tally).await?,
                Fault::CutNats => {
                    let cut = self.nodes[victim].nats.cut_all();
                    tally.nats_cuts += 1;
                    eprintln!(
                        "ordo check: {}'s {cut} NATS connections cut",
                        self.nodes[victim].id
                    );
                }
            }
        }
    }

    /// SIGKILL node `i`, wait for the others to take its partitions over, restart it.
    async fn kill(&self, i: usize, tally: &mut Tally) -> Result<(), String> {
        let held = self.held(i).await;
        self.with(i, |s| s.kill9().map_err(|e| e.to_string()))
            .await??;
        let killed = Instant::now();
        tally.node_kills += 1;
        self.takeover(i, held, killed, "SIGKILL", tally).await;
        self.restart(i, tally).await
    }

    /// SIGTERM node `i`: it hands its partitions over (the others hold them once it is gone,
    /// without waiting for its leases to run out) and exits cleanly; then it is restarted.
    async fn term(&self, i: usize, tally: &mut Tally) -> Result<(), String> {
        let held = self.held(i).await;
        let stopped = Instant::now();
        let status = self.with(i, |s| s.sigterm()).await?;
        tally.node_stops += 1;
        match status {
            Ok(st) if st.success() => {}
            Ok(st) => tally.failures.push(format!(
                "{} exited with {st} after SIGTERM; its log ends:\n{}",
                self.nodes[i].id,
                self.tail(i)
            )),
            // It exited since the last look: the next fault restarts it.
            Err(HarnessError::NotRunning) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        let mut took = Tally::default();
        self.takeover(i, held, stopped, "SIGTERM", &mut took).await;
        tally.handover_ms.extend(took.takeover_ms);
        tally.failures.extend(took.failures);
        self.restart(i, tally).await
    }

    /// SIGSTOP node `i` until its leases surely ran out and the others took its partitions
    /// over (or gave up waiting: resumed earlier, it would take them back and hide a takeover
    /// that never happened), then SIGCONT; restart it if it then stops itself.
    async fn pause(&self, i: usize, tally: &mut Tally) -> Result<(), String> {
        let held = self.held(i).await;
        match self.with(i, |s| s.pause()).await? {
            Ok(()) => {}
            // It exited since the last look: the next fault restarts it.
            Err(HarnessError::NotRunning) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        let paused = Instant::now();
        tally.node_pauses += 1;
        let ((), ()) = tokio::join!(
            self.takeover(i, held, paused, "SIGSTOP", tally),
            tokio::time::sleep(LEASE + PAUSE_PAST_LEASE)
        );
        if self.with(i, |s| s.is_stopped()).await? == Some(false) {
            tally.failures.push(format!(
                "{} was resumed during its SIGSTOP by something other than this check, so the \
                 pause did not happen as planned (the kernel sends SIGHUP and SIGCONT to a \
                 process group left without a parent in its session while one of its members is \
                 stopped: run the check from a shell that keeps it as a job, not detached)",
                self.nodes[i].id
            ));
        }
        match self.with(i, |s| s.resume()).await? {
            Ok(()) | Err(HarnessError::NotRunning) => {}
            Err(e) => return Err(e.to_string()),
        }
        // Resumed, it finds its leases lost at its next round and may stop itself then.
        tokio::time::sleep(LEASE / 2).await;
        self.ensure_running(tally, true).await
    }

    /// How many partitions node `i` owns, as the first other node that answers sees it.
    async fn held(&self, i: usize) -> Option<usize> {
        let gone = self.nodes[i].id.as_str();
        for n in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            if let Some(body) = status(&n.1.admin).await {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let owners = v["owners"].as_array()?;
                return Some(
                    owners
                        .iter()
                        .filter(|o| o[0].as_str() == Some(gone))
                        .count(),
                );
            }
        }
        None
    }

    /// Polls the survivors until node `i` owns no partition and every partition has an owner;
    /// records how long that took from `since` (unless the node `held` none: then there was
    /// nothing to take over, and the time says nothing), or a failure after
    /// [`TAKEOVER_LIMIT`].
    async fn takeover(
        &self,
        i: usize,
        held: Option<usize>,
        since: Instant,
        what: &str,
        tally: &mut Tally,
    ) {
        let gone = self.nodes[i].id.as_str();
        let mut last = None;
        while since.elapsed() < TAKEOVER_LIMIT {
            // The first survivor that answers (another may be down by now).
            for (j, n) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                if let Some(body) = status(&n.admin).await {
                    if taken_over(&body, Some(gone)) {
                        let ms = since.elapsed().as_millis() as u64;
                        if held == Some(0) {
                            eprintln!("ordo check: {gone} {what}; it owned no partition");
                        } else {
                            eprintln!(
                                "ordo check: {gone} {what}; partitions taken over after {ms} ms"
                            );
                            tally.takeover_ms.push(ms);
                        }
                        return;
                    }
                    last = Some((j, body));
                    break;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        let seen = match last {
            Some((j, body)) => format!(
                "{} last said {body}; its log ends:\n{}",
                self.nodes[j].id,
                self.tail(j)
            ),
            None => "no other node answered /v1/admin/cluster".into(),
        };
        tally.failures.push(format!(
            "{gone}'s partitions were not all taken over within {} s of its {what}: {seen}",
            TAKEOVER_LIMIT.as_secs()
        ));
    }

    /// Restarts every node found exited (counted as self-stops, except those a failed restart
    /// left down); with `restart` false only counts them (the end of the run).
    pub async fn ensure_running(&self, tally: &mut Tally, restart: bool) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let (running, tail) = self
                .with(i, |s| (s.is_running(), last_lines(&s.log(), TAIL_LINES)))
                .await?;
            if running {
                continue;
            }
            let node = &self.nodes[i];
            if !node.failed_restart.load(Ordering::Relaxed) {
                tally.self_stops += 1;
                eprintln!("ordo check: {} exited by itself", node.id);
                let why = if !tail.contains(FAIL_STOP) {
                    Some("not over a lost partition")
                } else if tail.contains(PANIC) {
                    Some("over a lost partition, but panicked on the way out")
                } else {
                    None
                };
                if let Some(why) = why {
                    tally.failures.push(format!(
                        "{} exited by itself, {why}; its log ends:\n{tail}",
                        node.id
                    ));
                }
            }
            if restart {
                self.restart(i, tally).await?;
            }
        }
        Ok(())
    }

    /// Starts node `i` again on its port; a start that fails is a failure of the run (the node
    /// stays down until the next try), one that had to move to another port ends the check.
    async fn restart(&self, i: usize, tally: &mut Tally) -> Result<(), String> {
        let port = self.nodes[i].port;
        let result = self
            .with(i, move |s| match s.restart() {
                Ok(()) => same_port(s, port).map(|()| None),
                Err(e) => Ok(Some(e.to_string())),
            })
            .await??;
        let node = &self.nodes[i];
        node.failed_restart
            .store(result.is_some(), Ordering::Relaxed);
        if let Some(e) = result {
            tally
                .failures
                .push(format!("{} could not be restarted: {e}", node.id));
        }
        Ok(())
    }

    /// Runs `f` on node `i`'s process on a blocking thread (its calls block).
    async fn with<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce(&mut ServerProcess) -> T + Send + 'static,
    ) -> Result<T, String> {
        let process = self.nodes[i].process.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = process.lock().map_err(|_| "node lock poisoned")?;
            Ok(f(&mut s))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Copies every node's logs (one file per start) into `dir`/`node<i>`, which outlive the
    /// run (the nodes' own directories do not): what a failed check is debugged from. What
    /// `dir` held (an earlier run's logs) is removed first.
    pub async fn keep_logs(&self, dir: &Path) -> Result<(), String> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| format!("cannot empty {}: {e}", dir.display()))?;
        }
        for i in 0..self.nodes.len() {
            let to = dir.join(&self.nodes[i].id);
            let from = self
                .with(i, |s| s.data_dir().parent().map(Path::to_path_buf))
                .await?
                .ok_or("a node's data directory has no parent")?;
            std::fs::create_dir_all(&to)
                .map_err(|e| format!("cannot create {}: {e}", to.display()))?;
            let entries = std::fs::read_dir(&from)
                .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().ends_with(".log") {
                    std::fs::copy(entry.path(), to.join(&name))
                        .map_err(|e| format!("cannot copy {}: {e}", entry.path().display()))?;
                }
            }
        }
        Ok(())
    }

    /// The last lines of node `i`'s log (empty if its lock is held).
    fn tail(&self, i: usize) -> String {
        match self.nodes[i].process.try_lock() {
            Ok(s) => last_lines(&s.log(), TAIL_LINES),
            Err(_) => String::new(),
        }
    }
}

/// A `nats://` URL split into its credentials (`user:pass@`, kept for the nodes, or empty)
/// and the `host:port` the proxy dials (port 4222 if none is named).
fn nats_address(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("nats://").ok_or_else(|| {
        format!("--nats {url:?} is not a nats://HOST:PORT address such as nats://127.0.0.1:4222")
    })?;
    let rest = rest.split('/').next().unwrap_or(rest);
    let (creds, host_port) = match rest.rsplit_once('@') {
        Some((c, h)) => (format!("{c}@"), h),
        None => (String::new(), rest),
    };
    if host_port.is_empty() {
        return Err(format!("--nats {url:?} names no host"));
    }
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:4222")
    };
    Ok((creds, host_port))
}

/// A node's `/v1/admin/cluster` body, or `None` if it did not answer 200 in time.
async fn status(admin: &Admin) -> Option<String> {
    match tokio::time::timeout(STATUS_TIMEOUT, admin.get("/v1/admin/cluster")).await {
        Ok(Ok(r)) if r.status == 200 => Some(r.body),
        _ => None,
    }
}

/// Whether a cluster status shows every partition with a live owner, none of them `gone`.
fn taken_over(body: &str, gone: Option<&str>) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return false;
    };
    let Some(owners) = v["owners"].as_array() else {
        return false;
    };
    !owners.is_empty()
        && owners.iter().all(|o| match o[0].as_str() {
            Some(node) => Some(node) != gone,
            None => false,
        })
}

/// The last `n` lines of a log, leaving out blank lines and the frames of panics' backtraces
/// (they would crowd out what the node said).
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !backtrace_frame(l))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `  12: symbol`, `      at file:line`, or the heading of a backtrace.
fn backtrace_frame(line: &str) -> bool {
    let l = line.trim_start();
    l.starts_with("at ")
        || l == "stack backtrace:"
        || l.starts_with("note: ")
        || l.split_once(": ").is_some_and(|(n, _)| {
            !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && line.starts_with(' ')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_takeover_needs_every_partition_owned_and_none_by_the_gone_node() {
        let done = r#"{"owners":[["node0",3],["node2",1]]}"#;
        assert!(taken_over(done, Some("node1")));
        assert!(!taken_over(done, Some("node2")));
        assert!(!taken_over(r#"{"owners":[["node0",3],null]}"#, None));
        assert!(!taken_over(r#"{"owners":[]}"#, None));
        assert!(!taken_over("not json", None));
    }

    #[test]
    fn backtraces_are_left_out_of_log_excerpts() {
        let log = "ERROR stopped\nthread 'x' panicked at a.rs:1:2:\nboom\nstack backtrace:\n   0: f\n             at a.rs:1:2\n  12:     0x55 - g\nthread caused non-unwinding panic. aborting.";
        assert_eq!(
            last_lines(log, 12),
            "ERROR stopped\nthread 'x' panicked at a.rs:1:2:\nboom\nthread caused non-unwinding panic. aborting."
        );
        assert_eq!(
            last_lines(log, 1),
            "thread caused non-unwinding panic. aborting."
        );
    }

    #[test]
    fn nats_addresses() {
        let plain = nats_address("nats://127.0.0.1:4222").unwrap();
        assert_eq!(plain, (String::new(), "127.0.0.1:4222".into()));
        let creds = nats_address("nats://u:p@nats").unwrap();
        assert_eq!(creds, ("u:p@".into(), "nats:4222".into()));
        assert!(nats_address("127.0.0.1:4222").is_err());
    }
}
