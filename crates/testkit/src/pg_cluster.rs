//! A PostgreSQL of the run's own: a primary and its synchronous standbys, each a `postgres`
//! process on a free port with its data in a temporary directory, started from the server
//! binaries of the machine (`/usr/lib/postgresql/15/bin`, or the directory `ORDO_PG_BIN`
//! names). It exists so that tests and `ordo check` can do to a database what they do to
//! Ordo: SIGKILL it.
//!
//! With standbys, commits wait for any one of them (`synchronous_standby_names = 'ANY 1 (...)'`,
//! `synchronous_commit = on`): an acknowledged commit is on two machines. [`PgCluster::fail_primary`]
//! SIGKILLs every process of the primary at once, promotes the standby that received the most
//! WAL (it holds every commit that was acknowledged: each is on at least one standby), points
//! the other standbys at it, and rebuilds the dead node as a new standby from a fresh base
//! backup. Without standbys it restarts the primary in place (crash recovery). Clients find
//! the primary through [`PgCluster::url`]: every node's address with
//! `target_session_attrs=read-write`.
//!
//! PostgreSQL refuses to run as root: run as root, the processes run as the `postgres` user,
//! which owns the directories.

use crate::HarnessError;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to accept connections after it is started.
const START_WAIT: Duration = Duration::from_secs(60);

/// One PostgreSQL server process.
struct Node {
    /// Its name, also its `application_name` as a standby.
    name: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A primary and `standbys` synchronous standbys of the run's own; stopped and removed on
/// drop.
pub struct PgCluster {
    bin: PathBuf,
    root: tempfile::TempDir,
    nodes: Vec<Node>,
    primary: usize,
    /// Run the processes as this user (when the run is root's).
    owner: Option<(u32, u32)>,
}

/// What one [`PgCluster::fail_primary`] did.
#[derive(Clone, Debug)]
pub struct Failover {
    /// From the SIGKILL until a commit can complete again: the new primary accepts writes and
    /// (with standbys left) one streams from it.
    pub took: Duration,
    /// The node that is primary now.
    pub primary: String,
}

/// The directory of the PostgreSQL server binaries, if this machine has them.
pub fn bin_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os("ORDO_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    if dir.join("initdb").exists() && dir.join("postgres").exists() {
        Ok(dir)
    } else {
        Err(format!(
            "no PostgreSQL server binaries in {} (set ORDO_PG_BIN to the directory holding initdb and postgres)",
            dir.display()
        ))
    }
}

fn err(doing: &str, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Start(format!("cannot {doing}: {e}"))
}

impl PgCluster {
    /// Starts a primary and `standbys` standbys, and waits until every standby streams from
    /// the primary.
    pub fn start(standbys: usize) -> Result<PgCluster, HarnessError> {
        let bin = bin_dir().map_err(HarnessError::Start)?;
        let root = tempfile::Builder::new()
            .prefix("ordo-pg-")
            .tempdir()
            .map_err(|e| HarnessError::io("make a directory for PostgreSQL", e))?;
        // SAFETY: geteuid has no preconditions.
        let owner = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user()?)
        } else {
            None
        };
        let mut c = PgCluster {
            bin,
            root,
            nodes: Vec::new(),
            primary: 0,
            owner,
        };
        c.own(c.root.path())?;
        let names: Vec<String> = (0..=standbys).map(|i| format!("n{i}")).collect();
        for name in &names {
            let port = free_port_below_ephemeral()?;
            let dir = c.root.path().join(name);
            c.nodes.push(Node {
                name: name.clone(),
                port,
                dir,
                child: None,
            });
        }
        c.init_primary(standbys)?;
        c.launch(0)?;
        for i in 1..=standbys {
            c.base_backup(i)?;
            c.launch(i)?;
        }
        c.wait_streaming(standbys)?;
        Ok(c)
    }

    /// A connection string that finds the primary among every node.
    pub fn url(&self) -> String {
        let hosts: Vec<&str> = self.nodes.iter().map(|_| "127.0.0.1").collect();
        let ports: Vec<String> = self.nodes.iter().map(|n| n.port.to_string()).collect();
        format!(
            "host={} port={} user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=2",
            hosts.join(","),
            ports.join(",")
        )
    }

    /// The primary's name.
    pub fn primary(&self) -> &str {
        &self.nodes[self.primary].name
    }

    fn own(&self, path: &Path) -> Result<(), HarnessError> {
        if let Some((uid, gid)) = self.owner {
            chown(path, Some(uid), Some(gid))
                .map_err(|e| HarnessError::io(&format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }

    /// A command of the server binaries, run as the owner of the directories.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, mut cmd: Command, doing: &str) -> Result<(), HarnessError> {
        let out = cmd.output().map_err(|e| HarnessError::io(doing, e))?;
        if !out.status.success() {
            return Err(HarnessError::Start(format!(
                "cannot {doing}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    fn init_primary(&mut self, standbys: usize) -> Result<(), HarnessError> {
        let dir = self.nodes[0].dir.clone();
        let mut cmd = self.command("initdb");
        cmd.args(["-U", "postgres", "-A", "trust", "--no-sync", "-D"])
            .arg(&dir);
        self.run(cmd, "initdb a PostgreSQL primary")?;
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let sync = if standbys > 0 {
            format!("ANY 1 ({})", names.join(", "))
        } else {
            String::new()
        };
        let conf = format!(
            "\n# Written by the Ordo test kit.\n\
             listen_addresses = '127.0.0.1'\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             wal_keep_size = '256MB'\n\
             hot_standby = on\n\
             wal_retrieve_retry_interval = '100ms'\n\
             synchronous_commit = on\n\
             synchronous_standby_names = '{sync}'\n\
             shared_buffers = '32MB'\n\
             max_connections = 50\n\
             fsync = on\n"
        );
        append(&dir.join("postgresql.conf"), &conf)?;
        self.node_conf(0)
    }

    /// The settings that differ per node: its port and socket directory, and (for a standby)
    /// where its primary is and its name there.
    fn node_conf(&self, i: usize) -> Result<(), HarnessError> {
        let n = &self.nodes[i];
        let mut conf = format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            n.port,
            n.dir.display()
        );
        if i != self.primary {
            conf.push_str(&format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={}'\n",
                self.nodes[self.primary].port, n.name
            ));
        }
        append(&n.dir.join("postgresql.auto.conf"), &conf)
    }

    /// Makes node `i` a standby of the primary, from a fresh base backup.
    fn base_backup(&mut self, i: usize) -> Result<(), HarnessError> {
        let dir = self.nodes[i].dir.clone();
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| HarnessError::io(&format!("remove {}", dir.display()), e))?;
        }
        let mut cmd = self.command("pg_basebackup");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-X",
            "stream",
            "-c",
            "fast",
            "-R",
        ])
        .args(["-p", &self.nodes[self.primary].port.to_string(), "-D"])
        .arg(&dir);
        self.run(cmd, "take a base backup for a standby")?;
        self.node_conf(i)
    }

    /// Starts node `i` and waits until it accepts connections.
    fn launch(&mut self, i: usize) -> Result<(), HarnessError> {
        let log =
            std::fs::File::create(self.root.path().join(format!("{}.log", self.nodes[i].name)))
                .map_err(|e| HarnessError::io("create a PostgreSQL log", e))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.nodes[i].dir)
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a SIGKILL takes every process of the server at once.
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| HarnessError::io("start postgres", e))?;
        self.nodes[i].child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        let url = self.node_url(i);
        loop {
            if postgres::Client::connect(&url, postgres::NoTls).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(HarnessError::Start(format!(
                        "postgres {} exited ({status}); see {}",
                        self.nodes[i].name,
                        self.root
                            .path()
                            .join(format!("{}.log", self.nodes[i].name))
                            .display()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Start(format!(
                    "postgres {} did not accept connections within {} s",
                    self.nodes[i].name,
                    START_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn node_url(&self, i: usize) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
            self.nodes[i].port
        )
    }

    fn sql(&self, i: usize, query: &str) -> Result<Vec<postgres::Row>, HarnessError> {
        let mut c = postgres::Client::connect(&self.node_url(i), postgres::NoTls)
            .map_err(|e| err(&format!("connect to postgres {}", self.nodes[i].name), e))?;
        c.query(query, &[])
            .map_err(|e| err(&format!("run {query:?} on {}", self.nodes[i].name), e))
    }

    /// Waits until `want` standbys stream from the primary.
    fn wait_streaming(&self, want: usize) -> Result<(), HarnessError> {
        let want = want as i64;
        let deadline = Instant::now() + START_WAIT;
        loop {
            let rows = self.sql(
                self.primary,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )?;
            if rows.first().is_some_and(|r| r.get::<_, i64>(0) >= want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Start(format!(
                    "the standbys did not stream from the primary within {} s",
                    START_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the node's postmaster and every process it started (each of which runs in a
    /// session of its own, so not in the postmaster's group), and waits until all are gone.
    fn kill(&mut self, i: usize) {
        let Some(mut c) = self.nodes[i].child.take() else {
            return;
        };
        let postmaster = c.id() as i32;
        let mut pids = children_of(postmaster);
        pids.push(postmaster);
        for pid in &pids {
            // SAFETY: kill has no memory-safety preconditions; these are the node's processes.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        let _ = c.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILLs the primary (every process of it); then, with standbys, promotes the one that
    /// received the most WAL, points the others at it and rebuilds the dead node as a standby;
    /// without, starts the primary again.
    pub fn fail_primary(&mut self) -> Result<Failover, HarnessError> {
        let started = Instant::now();
        let dead = self.primary;
        self.kill(dead);
        if self.nodes.len() == 1 {
            self.launch(dead)?;
            return Ok(Failover {
                took: started.elapsed(),
                primary: self.nodes[dead].name.clone(),
            });
        }
        // The standby furthest ahead holds every acknowledged commit.
        let mut best: Option<(usize, i64)> = None;
        for i in (0..self.nodes.len()).filter(|&i| i != dead) {
            let rows = self.sql(
                i,
                "SELECT pg_wal_lsn_diff(COALESCE(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), '0/0')::bigint",
            )?;
            let lsn: i64 = rows.first().map_or(0, |r| r.get(0));
            if best.is_none_or(|(_, b)| lsn > b) {
                best = Some((i, lsn));
            }
        }
        let (next, _) = best.ok_or_else(|| HarnessError::Start("no standby to promote".into()))?;
        let promoted = self.sql(next, "SELECT pg_promote(true, 60)")?;
        if !promoted.first().is_some_and(|r| r.get::<_, bool>(0)) {
            return Err(HarnessError::Start(format!(
                "postgres {} was not promoted within 60 s",
                self.nodes[next].name
            )));
        }
        self.primary = next;
        let others = self.nodes.len() - 2;
        for i in (0..self.nodes.len()).filter(|&i| i != next && i != dead) {
            let conninfo = format!(
                "host=127.0.0.1 port={} user=postgres application_name={}",
                self.nodes[next].port, self.nodes[i].name
            );
            self.sql(
                i,
                &format!("ALTER SYSTEM SET primary_conninfo = '{conninfo}'"),
            )?;
            self.sql(i, "SELECT pg_reload_conf()")?;
        }
        if others > 0 {
            self.wait_streaming(1)?;
        }
        let mut took = started.elapsed();
        self.base_backup(dead)?;
        self.launch(dead)?;
        self.wait_streaming(self.nodes.len() - 1)?;
        if others == 0 {
            took = started.elapsed();
        }
        Ok(Failover {
            took,
            primary: self.nodes[next].name.clone(),
        })
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// The processes whose parent is `pid` (from `/proc`).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            // The parent is the second field after the command, which is in parentheses.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let after = &s[s.rfind(')')? + 1..];
                    after.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A free port below the system's range for outgoing connections, so that no client socket
/// takes it while its node is down.
fn free_port_below_ephemeral() -> Result<u16, HarnessError> {
    for _ in 0..200 {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(HarnessError::Start(
        "no free port for PostgreSQL in 20000..32000".into(),
    ))
}

fn append(path: &Path, text: &str) -> Result<(), HarnessError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| HarnessError::io(&format!("open {}", path.display()), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| HarnessError::io(&format!("write {}", path.display()), e))
}

/// The `postgres` user's uid and gid, to run the server as when the run is root's.
fn postgres_user() -> Result<(u32, u32), HarnessError> {
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam gets a valid C string; the record it returns is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(HarnessError::Start(
            "PostgreSQL does not run as root, and there is no `postgres` user to run it as".into(),
        ));
    }
    // SAFETY: pw is non-null and points at the static record getpwnam filled.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}
