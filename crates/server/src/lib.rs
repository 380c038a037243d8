//! The Ordo server: the tokio runtime side of the delivery rules.
//!
//! [`start`] opens the embedded store, rebuilds the core from it, starts the router task (the
//! one owner of the core) and its commit thread, and serves WebSocket and HTTP with axum.
//! Shutdown closes every connection with 1001, lets the router commit what is pending, and
//! returns once it is on disk.

mod accept;
pub mod auth;
pub mod cluster;
pub mod config;
mod conn;
mod http;
pub mod jwt;
pub mod metrics;
pub mod revocation;
mod router;
pub mod tls;
mod web;
pub mod webhook;

pub use config::{Config, ConfigError};

use auth::TokenKey;
use ordo_protocol::Limits;
use ordo_store::{Store, StoreError};
use ordo_store_redb::RedbStore;
use router::{Command, Router};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How long shutdown waits for connections to finish their close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Lifetime of tokens issued without an explicit one: 30 days.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read or create {what} in {dir}: {source}")]
    Secret {
        what: &'static str,
        dir: String,
        source: std::io::Error,
    },
    #[error("{path} ({what}) is missing, but {dir} already holds a store: a new one would not match what was issued with the old one. Put the file back, or give it with {flag}; to start over with a new one on purpose, write one into {path} yourself")]
    SecretMissing {
        what: &'static str,
        path: String,
        dir: String,
        flag: &'static str,
    },
    #[error("cannot listen on {addr}: {source}; is another server running there? (change it with --listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Jwks(#[from] jwt::JwksError),
    #[error(transparent)]
    Revocations(#[from] revocation::RevocationError),
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    /// A cluster's node could not join (NATS could not be reached, or the lease table read).
    #[error("cannot join the cluster: {0}")]
    Cluster(String),
}

/// Reads the TLS certificate and key, and the JWKS file, again on every SIGHUP until the server
/// stops; a failed read is logged and what is in use stays.
fn reload_on_sighup(
    tls: Option<Arc<tls::Tls>>,
    tokens: Arc<auth::Authenticator>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    if let Some(tls) = &tls {
                        match tls.reload() {
                            Ok(()) => tracing::info!("SIGHUP: TLS certificate and key read again"),
                            Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the TLS certificate in use"),
                        }
                    }
                    if tokens.jwt.has_jwks() {
                        match tokens.jwt.reload() {
                            Ok(n) => tracing::info!(keys = n, "SIGHUP: JWKS file read again"),
                            Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the JWKS keys in use"),
                        }
                    }
                    if tls.is_none() && !tokens.jwt.has_jwks() {
                        tracing::info!("SIGHUP: nothing to read again (no TLS certificate, no JWKS file)");
                    }
                }
            }
        }
    });
    Ok(())
}

/// What every request handler and connection shares.
#[derive(Clone)]
pub(crate) struct AppState {
    router: mpsc::Sender<Command>,
    store: Arc<dyn Store>,
    limits: Limits,
    max_sync_bytes: usize,
    outbound_queue: usize,
    outbound_bytes: usize,
    tokens: Arc<auth::Authenticator>,
    admin_key: Arc<str>,
    shutdown: watch::Receiver<bool>,
    /// Held by every connection task; shutdown waits until all are dropped.
    live: mpsc::Sender<()>,
    /// WebSocket connections per user.
    users: Arc<http::UserConnections>,
    /// How long a WebSocket may stay silent.
    idle_timeout: Duration,
    /// On a cluster's node: what its lease keeper last saw.
    cluster: Option<cluster::SharedStatus>,
}

/// The token secret: flag/env value, or `<data>/secret`, created on first use. Never created
/// where `data` already holds a store: every token issued would then fail.
pub fn token_key(secret: Option<&str>, data: &std::path::Path) -> Result<TokenKey, ServerError> {
    let fresh = !RedbStore::exists_in(data);
    let s = secret_of(
        secret,
        data,
        "secret",
        "the token secret",
        SECRET_FLAG,
        fresh,
    )?;
    Ok(TokenKey::new(s.as_bytes()))
}

const SECRET_FLAG: &str = "--secret or ORDO_SECRET";

/// The admin key: flag/env value, or `<data>/admin.key`, created on first use. Made anew (with
/// a warning) if the file is lost: it signs nothing that was handed out, only the operator's
/// own requests.
pub fn admin_key(given: Option<&str>, data: &std::path::Path) -> Result<String, ServerError> {
    if given.is_none_or(str::is_empty)
        && RedbStore::exists_in(data)
        && !data.join("admin.key").exists()
    {
        tracing::warn!(
            path = %data.join("admin.key").display(),
            "the admin key is missing; made a new one (requests with the old one are refused)"
        );
    }
    secret_of(
        given,
        data,
        "admin.key",
        "the admin key",
        "--admin-key or ORDO_ADMIN_KEY",
        true,
    )
}

fn secret_of(
    given: Option<&str>,
    data: &std::path::Path,
    name: &str,
    what: &'static str,
    flag: &'static str,
    may_create: bool,
) -> Result<String, ServerError> {
    auth::load_or_create_secret(given, data, name, may_create).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound && !may_create {
            ServerError::SecretMissing {
                what,
                path: data.join(name).display().to_string(),
                dir: data.display().to_string(),
                flag,
            }
        } else {
            ServerError::Secret {
                what,
                dir: data.display().to_string(),
                source,
            }
        }
    })
}

/// A running server.
pub struct RunningServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes connections, commits what is pending and waits until it is durable.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// Waits until the server stops.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Io(std::io::Error::other(e.to_string()))),
        }
    }

    /// A handle that stops the server when sent `true` (for signal handlers).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Connections the kernel may hold for the server before it accepts them (capped by the
/// system's `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Waits (a bounded while) until `store` is the last reference left, the threads and tasks that
/// held the others having ended, then drops it: a store's drop finishes its work and closes its
/// files.
async fn close_store(store: Arc<dyn Store>) {
    let until = tokio::time::Instant::now() + CLOSE_GRACE;
    while Arc::strong_count(&store) > 1 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if Arc::strong_count(&store) > 1 {
        tracing::warn!("the store is still in use after the server stopped; it closes when the last user lets go");
    }
    let _ = tokio::task::spawn_blocking(move || drop(store)).await;
}

/// How long a starting server waits for its database to be reachable (it may be restarting, or
/// failing over) before it gives up.
const DATABASE_WAIT: Duration = Duration::from_secs(60);

/// Opens the PostgreSQL store (fenced with `fences` on a cluster's node), waiting up to
/// [`DATABASE_WAIT`] for a database that cannot be reached yet.
async fn open_database(
    url: String,
    fences: Option<Arc<ordo_store_postgres::lease::Fences>>,
) -> Result<ordo_store_postgres::PgStore, ServerError> {
    wait_for_database(move || match fences.clone() {
        Some(f) => ordo_store_postgres::PgStore::open_fenced(&url, f),
        None => ordo_store_postgres::PgStore::open(&url),
    })
    .await
}

/// Runs `open` (which blocks) until the database answers it, or [`DATABASE_WAIT`] passes:
/// `Unreachable` means the database restarts, fails over, or is not up yet.
pub(crate) async fn wait_for_database<T: Send + 'static>(
    open: impl Fn() -> Result<T, StoreError> + Clone + Send + 'static,
) -> Result<T, ServerError> {
    let started = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        let opened = tokio::task::spawn_blocking(open.clone())
            .await
            .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))?;
        match opened {
            Err(StoreError::Unreachable(why)) if started.elapsed() < DATABASE_WAIT => {
                tracing::warn!(error = %why, "waiting for the database");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => return Ok(other?),
        }
    }
}

/// Opens the store (the embedded one in `cfg.data`, or the PostgreSQL database `cfg.store`
/// names) and starts serving. Returns once the listener is bound.
pub async fn start(cfg: Config) -> Result<RunningServer, ServerError> {
    cfg.validate()?;
    if let Some(url) = cfg.store.clone() {
        // The data directory still holds the secrets, the revocations and the webhook queue.
        std::fs::create_dir_all(&cfg.data).map_err(ServerError::Io)?;
        let node = match cfg.cluster {
            true => Some(cluster::open_node(&cfg, &url).await?),
            false => None,
        };
        let fences = node.as_ref().map(|n| n.fences.clone());
        let store: Arc<dyn Store> = Arc::new(open_database(url, fences).await?);
        // A database that holds messages already has tokens out: never a new secret for it.
        let probe = store.clone();
        let holds_data = tokio::task::spawn_blocking(move || probe.load())
            .await
            .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))??
            .last_ts
            > 0;
        secret_of(
            cfg.secret.as_deref(),
            &cfg.data,
            "secret",
            "the token secret",
            SECRET_FLAG,
            !holds_data,
        )?;
        return start_inner(cfg, store, node).await;
    }
    // Before the store is made: a new store gets new secrets, an existing one never does.
    token_key(cfg.secret.as_deref(), &cfg.data)?;
    admin_key(cfg.admin_key.as_deref(), &cfg.data)?;
    let data = cfg.data.clone();
    let cache = cfg.store_cache_mib.saturating_mul(1 << 20);
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || RedbStore::open_with_cache(&data, cache))
            .await
            .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))??,
    );
    start_with_store(cfg, store).await
}

/// Starts serving on any [`Store`] (the token secret and admin key still live in `cfg.data`).
pub async fn start_with_store(
    cfg: Config,
    store: Arc<dyn Store>,
) -> Result<RunningServer, ServerError> {
    if cfg.cluster {
        return Err(ServerError::Config(ConfigError::Invalid(
            "a cluster's node opens its own store: use start".into(),
        )));
    }
    start_inner(cfg, store, None).await
}

async fn start_inner(
    cfg: Config,
    store: Arc<dyn Store>,
    node: Option<cluster::Node>,
) -> Result<RunningServer, ServerError> {
    cfg.validate()?;
    let _ = metrics::handle();
    if cfg.secret.as_ref().is_some_and(|s| s.len() < 16) {
        tracing::warn!(
            "the token secret is short; anyone who guesses it can forge tokens: use at least 32 random characters"
        );
    }
    // `start` made it already if the store is new; a caller with a store of its own opened it
    // before, so here a missing file is made.
    let secret = secret_of(
        cfg.secret.as_deref(),
        &cfg.data,
        "secret",
        "the token secret",
        SECRET_FLAG,
        true,
    )?;
    let tokens = Arc::new(auth::Authenticator {
        own: TokenKey::new(secret.as_bytes()),
        jwt: jwt::JwtVerifier::new(secret.as_bytes(), cfg.jwks.as_deref(), cfg.jwt_rules())?,
        revocations: revocation::Revocations::open(&cfg.data)?,
    });
    let admin = admin_key(cfg.admin_key.as_deref(), &cfg.data)?;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load(cert, key)?)),
        _ => None,
    };

    // It reads from the store: off the async threads (a store may block, or run a runtime of
    // its own, as the PostgreSQL client does).
    let (core_cfg, router_store) = (cfg.core(), store.clone());
    let housekeeping = Duration::from_secs(cfg.housekeeping_secs);
    let mut router =
        tokio::task::spawn_blocking(move || Router::new(core_cfg, router_store, housekeeping))
            .await
            .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))??;
    let (router_tx, router_rx) = mpsc::channel(8192);
    let (stop, stop_rx) = watch::channel(false);
    let joined = match node {
        Some(node) => Some(
            node.join(
                &cfg,
                &mut router,
                router_tx.clone(),
                store.clone(),
                stop_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let cluster_status = joined.as_ref().map(|j| j.status.clone());
    let remote_store = joined.as_ref().map(|j| j.store.clone());
    let mut webhook_task = None;
    if let Some(url) = &cfg.webhook_url {
        let endpoint = webhook::Endpoint::parse(url).map_err(ConfigError::Invalid)?;
        let (sender, task) = webhook::start(
            endpoint,
            cfg.webhook_secret.clone().unwrap_or_default(),
            cfg.webhook_preview_bytes,
            &cfg.data,
        )?;
        router.set_webhook(sender);
        webhook_task = Some(task);
    }
    let router_stop = stop.clone();
    let router_task = tokio::spawn(async move {
        let result = router.run(router_rx).await;
        // Whatever ended the router ends the server.
        let _ = router_stop.send(true);
        result
    });

    // A deep accept queue: after a restart every client reconnects at once, and a connection
    // the queue has no room for waits a whole second for the retry of its SYN.
    let listener = (|| {
        let sock = if cfg.listen.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(cfg.listen)?;
        sock.listen(LISTEN_BACKLOG)
    })()
    .map_err(|source| ServerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let addr = listener.local_addr()?;
    let (live, mut all_closed) = mpsc::channel::<()>(1);
    // The server's own reference, dropped last: the store is closed (its files free for the
    // next start) before `wait` returns.
    let own_store = store.clone();
    let state = AppState {
        router: router_tx.clone(),
        store,
        limits: cfg.limits(),
        max_sync_bytes: cfg.max_sync_bytes,
        outbound_queue: cfg.outbound_queue,
        outbound_bytes: cfg.outbound_bytes,
        tokens,
        admin_key: admin.into(),
        shutdown: stop_rx.clone(),
        live,
        users: Arc::new(http::UserConnections::new(cfg.max_connections_per_user)),
        idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
        cluster: cluster_status,
    };
    let tokens = state.tokens.clone();
    let app = http::routes(state, cfg.web);
    tracing::info!(%addr, data = %cfg.data.display(), tls = tls.is_some(), jwks = tokens.jwt.has_jwks(), "ordo listening");
    // Always: without a handler, SIGHUP would end the process.
    reload_on_sighup(tls.clone(), tokens, stop_rx.clone())?;

    let mut accept_limits = cfg.accept_limits();
    accept_limits.max_connections = accept::fit_open_files(accept_limits.max_connections);
    let task = tokio::spawn(async move {
        accept::serve(listener, app, accept_limits, tls, stop_rx).await;
        // WebSocket connections outlive the accept loop: wait until each has sent its close
        // frame (bounded, so a stuck peer cannot hold the server up).
        let _ = tokio::time::timeout(CLOSE_GRACE, all_closed.recv()).await;
        // A cluster's node hands its partitions over (the router drains each) and leaves.
        if let Some(j) = joined {
            j.leave().await;
        }
        // Connections are closed; let the router commit what is pending.
        let (done, finished) = oneshot::channel();
        if router_tx.send(Command::Shutdown { done }).await.is_ok() {
            let _ = finished.await;
        }
        drop(router_tx);
        let routed = router_task.await;
        // Remote sessions' tasks may still wait on NATS: they no longer hold the store.
        if let Some(r) = remote_store {
            drop(r.release());
        }
        // The router is gone: the webhook task writes what it was handed and ends.
        if let Some(t) = webhook_task {
            let _ = tokio::time::timeout(CLOSE_GRACE, t).await;
        }
        close_store(own_store).await;
        match routed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "stopped after a storage failure");
                return Err(ServerError::Store(e));
            }
            Err(e) => return Err(ServerError::Io(std::io::Error::other(e.to_string()))),
        }
        tracing::info!("ordo stopped; everything accepted is on disk");
        Ok(())
    });
    Ok(RunningServer { addr, stop, task })
}
