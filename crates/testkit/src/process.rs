//! `ordo serve` as a child process: on a free port and a temporary data directory, with its
//! own secret and admin key, started clean and stopped the hard or the polite way.
//!
//! The child never inherits the caller's `ORDO_*` variables (nor `RUST_LOG`): a server under
//! test runs with exactly the flags given here, so an exported `ORDO_RETENTION_MAX_COUNT` in the
//! caller's shell cannot silently change what is measured or checked.
//!
//! The calls block (they are used from plain threads by `ordo check` and from
//! `spawn_blocking` or `block_in_place` elsewhere); every wait has a deadline.

use crate::HarnessError;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest wait for a start (until `/healthz` answers) or for an exit after SIGTERM.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// Starts attempted on new ports when the server exits at once (most likely: the port was taken
/// by someone else between choosing and binding it).
const START_ATTEMPTS: u32 = 5;

/// How to run the server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The `ordo` binary.
    pub exe: PathBuf,
    /// Signs client tokens; random unless set.
    pub secret: Option<String>,
    /// Sends per second per user the server allows, also its burst (0: no limit).
    pub user_rate: f64,
    /// More `ordo serve` flags, after the harness's own.
    pub extra: Vec<String>,
}

impl ServerOptions {
    /// The `exe` server with a random secret, no send rate limit and no extra flags.
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        ServerOptions {
            exe: exe.into(),
            secret: None,
            user_rate: 0.0,
            extra: Vec::new(),
        }
    }
}

/// A running (or stopped) `ordo serve` and its data directory, removed when dropped (the
/// process is killed then too).
pub struct ServerProcess {
    opts: ServerOptions,
    secret: String,
    admin_key: String,
    port: u16,
    /// Holds `data/` (the server's data directory) and `server-<n>.log` (each run's stderr).
    root: tempfile::TempDir,
    child: Option<Child>,
    starts: u32,
}

impl ServerProcess {
    /// Starts a server on a fresh data directory and waits until it answers.
    pub fn start(opts: ServerOptions) -> Result<Self, HarnessError> {
        let root = tempfile::tempdir().map_err(|e| HarnessError::io("create a temp dir", e))?;
        let mut s = ServerProcess {
            secret: opts.secret.clone().unwrap_or_else(|| unique("secret")),
            admin_key: unique("admin"),
            port: free_port()?,
            root,
            child: None,
            starts: 0,
            opts,
        };
        s.restart()?;
        Ok(s)
    }

    /// The port its WebSocket and HTTP endpoints listen on now.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The secret that signs client tokens.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// This server's admin API key (each server has its own).
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Everything the most recent run wrote to stderr (empty if it cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// The last lines the most recent run wrote to stderr, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill9(&mut self) -> Result<(), HarnessError> {
        if let Some(mut c) = self.child.take() {
            c.kill()
                .map_err(|e| HarnessError::io("SIGKILL the server", e))?;
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes as a whole (a long GC pause, a VM migration), its sockets
    /// stay open and its timers stop; [`Self::resume`] lets it go on.
    pub fn pause(&mut self) -> Result<(), HarnessError> {
        self.signal(libc::SIGSTOP, "send SIGSTOP to the server")
    }

    /// Whether the running server is stopped (by SIGSTOP, and not resumed since), as the
    /// kernel reports it in `/proc`; `None` where that cannot be read (not Linux, not running).
    pub fn is_stopped(&self) -> Option<bool> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (command) state ...`: the command may hold spaces and parentheses.
        let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
        Some(state == "T")
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&mut self) -> Result<(), HarnessError> {
        self.signal(libc::SIGCONT, "send SIGCONT to the server")
    }

    fn signal(&mut self, sig: libc::c_int, doing: &str) -> Result<(), HarnessError> {
        let c = self.child.as_mut().ok_or(HarnessError::NotRunning)?;
        // Not reaped yet (an exited child stays a zombie until waited for), so the id is still
        // ours; one that exited meanwhile is simply not running.
        if !matches!(c.try_wait(), Ok(None)) {
            return Err(HarnessError::NotRunning);
        }
        let pid = c.id() as libc::pid_t;
        // SAFETY: `pid` is our own child, not yet reaped, so it cannot have been reused.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(HarnessError::io(doing, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit and returns its status.
    pub fn sigterm(&mut self) -> Result<ExitStatus, HarnessError> {
        let mut c = self.child.take().ok_or(HarnessError::NotRunning)?;
        let pid = c.id() as libc::pid_t;
        // SAFETY: `pid` is our own child, not yet reaped, so it cannot have been reused.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(HarnessError::io(
                "send SIGTERM to the server",
                std::io::Error::last_os_error(),
            ));
        }
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = c
                .try_wait()
                .map_err(|e| HarnessError::io("wait for the server", e))?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err(HarnessError::Start(format!(
                    "the server did not exit within {} s of SIGTERM:\n{}",
                    START_DEADLINE.as_secs(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server (again) on the same data directory and waits until it answers: on the
    /// same port if it is free, else on a new one.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        if self.is_running() {
            return Err(HarnessError::Start("the server is already running".into()));
        }
        for _ in 0..START_ATTEMPTS {
            let mut child = self.spawn()?;
            let deadline = Instant::now() + START_DEADLINE;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if self.is_up() {
                    self.child = Some(child);
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HarnessError::Start(format!(
                        "the server did not answer /healthz within {} s:\n{}",
                        START_DEADLINE.as_secs(),
                        self.log_tail()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // It exited at once. A taken port is worth another try; anything else is not.
            let log = self.log_tail();
            if !log.contains("cannot listen on") {
                return Err(HarnessError::Start(format!(
                    "the server exited at start:\n{log}"
                )));
            }
            self.port = free_port()?;
        }
        Err(HarnessError::Start(format!(
            "the server could not be started in {START_ATTEMPTS} attempts:\n{}",
            self.log_tail()
        )))
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.root.path().join(format!("server-{n}.log"))
    }

    fn spawn(&mut self) -> Result<Child, HarnessError> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts))
            .map_err(|e| HarnessError::io("create the server log", e))?;
        let rate = self.opts.user_rate;
        let mut cmd = Command::new(&self.opts.exe);
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data")
            .arg(self.data_dir())
            .args(["--secret", &self.secret, "--admin-key", &self.admin_key])
            .args(["--rate-per-sec", &rate.to_string()])
            .args(["--rate-burst", &rate.max(1.0).to_string()])
            .args(&self.opts.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ORDO_") {
                cmd.env_remove(k);
            }
        }
        cmd.spawn()
            .map_err(|e| HarnessError::io(&format!("start {}", self.opts.exe.display()), e))
    }

    /// Healthy, and ours: `/healthz` answers 200 and the admin API takes our key (a server that
    /// does not is someone else's, on a port that was reused).
    fn is_up(&self) -> bool {
        http_status(self.port, "/healthz", None) == Some(200)
            && http_status(
                self.port,
                "/v1/admin/groups/no-such-group",
                Some(&self.admin_key),
            )
            .is_some_and(|s| s != 401)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// The status of `GET path` on 127.0.0.1:`port`, or `None` if nothing answered in 2 s. A
/// readiness probe only (one request, `Connection: close`); API calls go through
/// [`crate::Admin`].
fn http_status(port: u16, path: &str, bearer: Option<&str>) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let auth = bearer
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
}

fn free_port() -> Result<u16, HarnessError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("find a free port", e))
}

/// A name no other server of this machine uses (process id, counter, time, random bits).
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "test-{what}-{}-{}-{nanos}-{:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// The `ordo` binary to run: `ORDO_BIN` if set, else `ordo` beside the running executable (or
/// beside its parent directory, where cargo puts test binaries: `target/<profile>/deps/..`).
pub fn ordo_exe() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("ORDO_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(|e| HarnessError::io("find this executable", e))?;
    let dir = me.parent().unwrap_or(Path::new("."));
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let candidate = d.join("ordo");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(HarnessError::Start(format!(
        "cannot find the `ordo` binary beside {}: build it (`cargo build --release --bin ordo`) or name it with ORDO_BIN",
        me.display()
    )))
}
