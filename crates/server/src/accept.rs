//! Accepting connections: who gets a socket at all, and for how long before it has said what it
//! wants. This replaces a plain accept loop because every connection costs a file descriptor
//! from the moment it is accepted, before it has sent a byte, and a process has a fixed number
//! of them: without limits, anyone who opens sockets and says nothing (no token, not even a
//! whole HTTP request) locks every client and `/healthz` out.
//!
//! - At most `max_connections` in all, WebSockets included; a connection beyond is closed as
//!   soon as it is accepted (and counted in `ordo_connections_refused_total`).
//! - At most `max_pending_per_ip` connections from one address that have not finished a request
//!   yet (a WebSocket counts until its upgrade is answered): one address cannot take the
//!   server's sockets, however many it opens; others, and a load balancer's many clients over
//!   few addresses once they have sent their requests, are served.
//! - Request headers must arrive within `handshake_timeout` of the connection (or of the
//!   previous response, on a kept-alive connection), or the connection is closed.
//!
//! After the upgrade, a WebSocket is watched by its connection task (`conn.rs`: idle timeout,
//! pings) and counted per user (`http.rs`).

use crate::metrics as m;
use crate::tls::Tls;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The limits of [`serve`].
#[derive(Clone, Debug)]
pub struct AcceptLimits {
    pub max_connections: usize,
    pub max_pending_per_ip: usize,
    pub handshake_timeout: Duration,
}

/// Open files kept for everything but client sockets: the store's files, the listener, logs.
const RESERVED_FILES: usize = 128;

/// `max` connections, lowered (with a warning) to what the process's open-file limit leaves
/// after [`RESERVED_FILES`]: past that limit the accept loop could take no connection at all,
/// and the store could open no file.
pub fn fit_open_files(max: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return max;
    }
    let room = usize::try_from(lim.rlim_cur)
        .unwrap_or(usize::MAX)
        .saturating_sub(RESERVED_FILES)
        .max(1);
    if max > room {
        tracing::warn!(
            max_connections = max,
            open_file_limit = lim.rlim_cur,
            using = room,
            "max_connections is above what the open-file limit (ulimit -n) allows; raise the limit to use it"
        );
        room
    } else {
        max
    }
}

/// Counts of connections, shared by the accept loop and the connections' guards.
#[derive(Default)]
struct Counts {
    total: usize,
    pending: HashMap<IpAddr, usize>,
}

type Shared = Arc<Mutex<Counts>>;

fn counts(shared: &Shared) -> std::sync::MutexGuard<'_, Counts> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection's place in the total; given back when the socket is dropped (for a WebSocket,
/// when the upgraded connection ends).
struct Slot(Shared);

impl Drop for Slot {
    fn drop(&mut self) {
        counts(&self.0).total -= 1;
        metrics::gauge!(m::SOCKETS).decrement(1.0);
    }
}

/// One connection's place among its address's pending ones; given back when it has finished
/// its requests (served, upgraded, or closed).
struct Pending(Shared, IpAddr);

impl Drop for Pending {
    fn drop(&mut self) {
        let mut c = counts(&self.0);
        if let Some(n) = c.pending.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                c.pending.remove(&self.1);
            }
        }
    }
}

/// Admits a connection from `ip`, or says why not.
fn admit(
    shared: &Shared,
    limits: &AcceptLimits,
    ip: IpAddr,
) -> Result<(Slot, Pending), &'static str> {
    let mut c = counts(shared);
    if c.total >= limits.max_connections {
        return Err("max_connections");
    }
    let pending = c.pending.get(&ip).copied().unwrap_or(0);
    if pending >= limits.max_pending_per_ip {
        return Err("max_pending_per_ip");
    }
    c.total += 1;
    *c.pending.entry(ip).or_insert(0) += 1;
    drop(c);
    metrics::gauge!(m::SOCKETS).increment(1.0);
    Ok((Slot(shared.clone()), Pending(shared.clone(), ip)))
}

/// A socket (plain or TLS) that holds its [`Slot`]: hyper hands the socket itself to the
/// upgraded WebSocket, so the slot lives exactly as long as the connection.
struct Counted<S> {
    io: S,
    _slot: Slot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given: the handshake, too, must finish
/// within the handshake timeout) until `stop` turns true; then stops accepting and asks every
/// connection to finish what it is doing (WebSockets are closed by their own tasks).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: AcceptLimits,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
) {
    let shared: Shared = Arc::default();
    loop {
        let accepted = tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors (or another resource): wait a little rather than
                // spin; connection errors of a single peer are its own business.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (slot, pending) = match admit(&shared, &limits, peer.ip()) {
            Ok(s) => s,
            Err(limit) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "limit" => limit).increment(1);
                drop(tcp);
                continue;
            }
        };
        // Frames are small and latency matters: never let Nagle hold one back waiting for an
        // ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        let timeout = limits.handshake_timeout;
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _pending = pending;
            match acceptor {
                None => {
                    let io = Counted {
                        io: tcp,
                        _slot: slot,
                    };
                    serve_http(io, service, timeout, stop).await;
                }
                Some(acceptor) => {
                    let started = tokio::time::Instant::now();
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let io = Counted {
                        io: tls,
                        _slot: slot,
                    };
                    let left = timeout.saturating_sub(started.elapsed());
                    serve_http(io, service, left.max(Duration::from_millis(1)), stop).await;
                }
            }
        });
    }
}

/// Serves HTTP/1.1 (and WebSocket upgrades) on one connection, its request headers due within
/// `timeout`, until it ends or `stop` turns true.
async fn serve_http<S>(
    io: Counted<S>,
    service: TowerToHyperService<Router>,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        }
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_and_gives_back() {
        let shared: Shared = Arc::default();
        let limits = AcceptLimits {
            max_connections: 3,
            max_pending_per_ip: 2,
            handshake_timeout: Duration::from_secs(1),
        };
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let first = admit(&shared, &limits, a).unwrap();
        let second = admit(&shared, &limits, a).unwrap();
        assert_eq!(admit(&shared, &limits, a).err(), Some("max_pending_per_ip"));
        let third = admit(&shared, &limits, b).unwrap();
        assert_eq!(admit(&shared, &limits, b).err(), Some("max_connections"));
        // A connection past its request (upgraded) no longer counts as pending ...
        drop(first.1);
        let (slot, _) = (first.0, ());
        assert_eq!(admit(&shared, &limits, a).err(), Some("max_connections"));
        // ... but counts in the total until its socket goes.
        drop(slot);
        let fourth = admit(&shared, &limits, a).unwrap();
        drop((second, third, fourth));
        let c = counts(&shared);
        assert_eq!((c.total, c.pending.len()), (0, 0));
    }
}
