//! A fault-injecting TCP proxy between clients and the server: connections are cut after a
//! random lifetime (sometimes in the middle of a frame), and each direction stalls now and
//! then. Faults can be switched off for the quiet phase at the end of a check.
//!
//! With its faults off from the start ([`FaultProxy::plain`]) it is a plain TCP proxy whose
//! only fault is the one it is asked for: [`FaultProxy::cut_all`] cuts every open connection
//! at once (how `ordo check --nodes` cuts a node off NATS; new connections go through).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};

#[derive(Clone, Debug)]
pub struct Faults {
    /// Mean lifetime of a connection before the proxy cuts it.
    pub mean_life: Duration,
    /// Chance, per chunk forwarded, of a stall.
    pub stall_chance: f64,
    /// Longest stall.
    pub max_stall: Duration,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    enabled: Arc<AtomicBool>,
    /// Connections cut by their random lifetime (not those cut by [`Self::cut_all`]).
    pub disconnects: Arc<AtomicU64>,
    /// Bumped by [`Self::cut_all`]; every connection watches it.
    cut: watch::Sender<u64>,
    /// Connections open now (both ends connected).
    open: Arc<AtomicU64>,
}

/// Counts a connection open while it lives.
struct OpenGuard(Arc<AtomicU64>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FaultProxy {
    /// A proxy to the server on 127.0.0.1:`upstream_port`, faults on.
    pub async fn start(upstream_port: u16, faults: Faults, seed: u64) -> std::io::Result<Self> {
        Self::start_to(format!("127.0.0.1:{upstream_port}"), faults, seed).await
    }

    /// A proxy to `upstream` (`host:port`) with no faults of its own, ever: connections end
    /// only when either side closes them or [`Self::cut_all`] cuts them.
    pub async fn plain(upstream: String) -> std::io::Result<Self> {
        let faults = Faults {
            mean_life: Duration::from_secs(1 << 30),
            stall_chance: 0.0,
            max_stall: Duration::ZERO,
        };
        let p = Self::start_to(upstream, faults, 0).await?;
        p.set_faults(false);
        Ok(p)
    }

    /// A proxy to `upstream` (`host:port`), faults on.
    pub async fn start_to(upstream: String, faults: Faults, seed: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let enabled = Arc::new(AtomicBool::new(true));
        let disconnects = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let (cut, _) = watch::channel(0u64);
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        let (en, dc, op, cut_tx) = (
            enabled.clone(),
            disconnects.clone(),
            open.clone(),
            cut.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let (en, dc, rng, faults) = (en.clone(), dc.clone(), rng.clone(), faults.clone());
                // Subscribed at accept: a cut asked for after this moment cuts this connection.
                let mut cut_rx = cut_tx.subscribe();
                let op = op.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream.as_str()).await else {
                        return; // server down: the client sees the connection fail
                    };
                    op.fetch_add(1, Ordering::Relaxed);
                    let _open = OpenGuard(op);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (life, seed_a, seed_b) = {
                        let mut r = rng.lock().await;
                        let u: f64 = r.random_range(0.0001..1.0);
                        let life = faults.mean_life.mul_f64(-u.ln());
                        (life, r.random::<u64>(), r.random::<u64>())
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let cut = tokio::time::sleep(life);
                    tokio::pin!(cut);
                    let a = pipe(cr, sw, en.clone(), faults.clone(), seed_a);
                    let b = pipe(sr, cw, en.clone(), faults.clone(), seed_b);
                    tokio::select! {
                        _ = a => {}
                        _ = b => {}
                        _ = &mut cut, if en.load(Ordering::Relaxed) => {
                            dc.fetch_add(1, Ordering::Relaxed);
                        }
                        _ = cut_rx.changed() => {}
                    }
                    // Dropping both halves closes both connections.
                });
            }
        });
        Ok(FaultProxy {
            addr,
            enabled,
            disconnects,
            cut,
            open,
        })
    }

    pub fn set_faults(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Cuts every connection open now, whether faults are on or off (new ones go through);
    /// returns how many were open.
    pub fn cut_all(&self) -> u64 {
        let open = self.open.load(Ordering::Relaxed);
        self.cut.send_modify(|n| *n += 1);
        open
    }
}

/// Copies one direction; with faults on, sometimes stalls, and sometimes forwards only part of
/// a chunk and then ends (a connection cut in the middle of a frame).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    enabled: Arc<AtomicBool>,
    faults: Faults,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if enabled.load(Ordering::Relaxed) {
            if rng.random_bool(faults.stall_chance.clamp(0.0, 1.0)) {
                let ms = rng.random_range(0..=faults.max_stall.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if n > 1 && rng.random_bool(0.002) {
                let part = rng.random_range(1..n);
                let _ = to.write_all(&buf[..part]).await;
                return; // cut mid-frame
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
