//! What `ordo check` runs against. [`CheckTarget`] is the seam: today a local `ordo serve`
//! child process; later a cluster of nodes behind the same calls.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub trait CheckTarget: Send {
    /// Port the WebSocket and HTTP endpoints listen on now.
    fn port(&self) -> u16;
    /// The secret that signs client tokens.
    fn secret(&self) -> &str;
    fn admin_key(&self) -> &str;
    /// Kills the server the hard way (SIGKILL): no flush, no goodbye.
    fn kill(&mut self) -> Result<(), String>;
    /// Starts it again on the same data, and waits until it answers.
    fn restart(&mut self) -> Result<(), String>;
    fn is_running(&mut self) -> bool;
}

/// `ordo serve` as a child process on a temporary data directory.
pub struct LocalServer {
    exe: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    secret: String,
    admin_key: String,
    child: Option<Child>,
    starts: u32,
    /// Sends per second per user the server allows (0: no limit).
    user_rate: f64,
    /// More `ordo serve` flags.
    extra: Vec<String>,
}

impl LocalServer {
    pub fn start(user_rate: f64) -> Result<Self, String> {
        Self::start_with(user_rate, Vec::new())
    }

    /// Like [`start`](Self::start), with more `ordo serve` flags.
    pub fn start_with(user_rate: f64, extra: Vec<String>) -> Result<Self, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the ordo binary: {e}"))?;
        let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let mut s = LocalServer {
            exe,
            dir,
            port,
            secret: format!("check-secret-{:016x}", rand::random::<u64>()),
            admin_key: format!("check-admin-{:016x}", rand::random::<u64>()),
            child: None,
            starts: 0,
            user_rate,
            extra,
        };
        s.restart()?;
        Ok(s)
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 200")
    }
}

impl CheckTarget for LocalServer {
    fn port(&self) -> u16 {
        self.port
    }

    fn secret(&self) -> &str {
        &self.secret
    }

    fn admin_key(&self) -> &str {
        &self.admin_key
    }

    fn kill(&mut self) -> Result<(), String> {
        if let Some(mut c) = self.child.take() {
            c.kill()
                .map_err(|e| format!("cannot kill the server: {e}"))?;
            let _ = c.wait();
        }
        Ok(())
    }

    fn restart(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("server-{}.log", self.starts)))
                .map_err(|e| format!("cannot create the server log: {e}"))?;
        let child = Command::new(&self.exe)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data")
            .arg(self.data_dir())
            .args(["--secret", &self.secret, "--admin-key", &self.admin_key])
            .args(["--rate-per-sec", &self.user_rate.to_string()])
            .args(["--rate-burst", &self.user_rate.max(1.0).to_string()])
            .args(&self.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.healthy() {
                return Ok(());
            }
            if !self.is_running() {
                let log = std::fs::read_to_string(
                    self.dir.path().join(format!("server-{}.log", self.starts)),
                )
                .unwrap_or_default();
                return Err(format!("the server exited at start:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err("the server did not become healthy within 30 s".into())
    }

    fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
