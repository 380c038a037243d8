//! `ordo serve`: settings from flags, `ORDO_*` environment variables and an optional TOML file
//! (flags and env win over the file, the file over defaults), then run until SIGTERM or Ctrl-C.

use clap::Args;
use ordo_server::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "ORDO_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7400].
    #[arg(long, env = "ORDO_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./ordo-data].
    #[arg(long, env = "ORDO_DATA")]
    data: Option<PathBuf>,
    /// Store everything in this PostgreSQL database instead of the embedded store
    /// (postgres://USER@HOST:PORT/DB); the secret and admin key stay in --data unless given.
    #[arg(long, env = "ORDO_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Run as a node of a cluster sharing --store (PostgreSQL) and --nats with the other nodes.
    #[arg(long, env = "ORDO_CLUSTER")]
    cluster: bool,
    /// The NATS server a cluster's nodes talk through (nats://HOST:PORT).
    #[arg(long, env = "ORDO_NATS")]
    nats: Option<String>,
    /// This node's id in its cluster [default: generated at each start].
    #[arg(long, env = "ORDO_NODE_ID")]
    node_id: Option<String>,
    /// The cluster's partition count, the same on every node [default: 64].
    #[arg(long, env = "ORDO_PARTITIONS")]
    partitions: Option<u32>,
    /// Milliseconds a partition's lease runs without renewal: how soon a dead node's
    /// partitions are taken over [default: 2000].
    #[arg(long, env = "ORDO_LEASE_MS")]
    lease_ms: Option<u64>,
    /// NATS subjects of the cluster start with this [default: ordo].
    #[arg(long, env = "ORDO_SUBJECT_PREFIX")]
    subject_prefix: Option<String>,
    /// Token-signing secret (default: generated into `<data>/secret`).
    #[arg(long, env = "ORDO_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Admin API key (default: generated into `<data>/admin.key`).
    #[arg(long, env = "ORDO_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Largest WebSocket message in bytes [default: 65536].
    #[arg(long, env = "ORDO_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Largest message body in bytes [default: 32768].
    #[arg(long, env = "ORDO_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Most messages one sync returns [default: 1000].
    #[arg(long, env = "ORDO_MAX_SYNC_LIMIT")]
    max_sync_limit: Option<u32>,
    /// Unacknowledged pushes per device and conversation before `notify` [default: 256].
    #[arg(long, env = "ORDO_PUSH_WINDOW")]
    push_window: Option<u64>,
    /// Groups larger than this get no receipt frames [default: 1000].
    #[arg(long, env = "ORDO_RECEIPT_MAX_MEMBERS")]
    receipt_max_members: Option<usize>,
    /// The most members a group may have [default: 100000].
    #[arg(long, env = "ORDO_MAX_GROUP_MEMBERS")]
    max_group_members: Option<usize>,
    /// How long resends are recognised, in seconds [default: 86400].
    #[arg(long, env = "ORDO_DEDUP_WINDOW_SECS")]
    dedup_window_secs: Option<u64>,
    /// Dedup entries kept in memory (the most recent; older ones are looked up in the store)
    /// [default: 100000].
    #[arg(long, env = "ORDO_DEDUP_CACHE_ENTRIES")]
    dedup_cache_entries: Option<usize>,
    /// The filter of client message ids seen inside the dedup window, in MiB [default: 32].
    #[arg(long, env = "ORDO_DEDUP_FILTER_MIB")]
    dedup_filter_mib: Option<usize>,
    /// Conversations held in memory (the most recently used; others are loaded from the store
    /// when used) [default: 50000].
    #[arg(long, env = "ORDO_CONV_CACHE_ENTRIES")]
    conv_cache_entries: Option<usize>,
    /// Sends per second per user, 0 for no limit [default: 1000].
    #[arg(long, env = "ORDO_RATE_PER_SEC")]
    rate_per_sec: Option<f64>,
    /// Burst above the rate [default: 2000].
    #[arg(long, env = "ORDO_RATE_BURST")]
    rate_burst: Option<f64>,
    /// Drop messages older than this many seconds (server-wide default; unset keeps all).
    #[arg(long, env = "ORDO_RETENTION_MAX_AGE_SECS")]
    retention_max_age_secs: Option<u64>,
    /// Keep only this many newest messages per conversation (server-wide default).
    #[arg(long, env = "ORDO_RETENTION_MAX_COUNT")]
    retention_max_count: Option<u64>,
    /// How often retention and dedup expiry run, in seconds [default: 60].
    #[arg(long, env = "ORDO_HOUSEKEEPING_SECS")]
    housekeeping_secs: Option<u64>,
    /// The embedded store's page cache in MiB [default: 64].
    #[arg(long, env = "ORDO_STORE_CACHE_MIB")]
    store_cache_mib: Option<usize>,
    /// `text` or `json` [default: text].
    #[arg(long, env = "ORDO_LOG_FORMAT")]
    log_format: Option<String>,
    /// Sockets open at once, WebSockets included [default: 19500].
    #[arg(long, env = "ORDO_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections from one address not past their request yet [default: 256].
    #[arg(long, env = "ORDO_MAX_PENDING_PER_IP")]
    max_pending_per_ip: Option<usize>,
    /// Seconds a connection has to send its request headers [default: 10].
    #[arg(long, env = "ORDO_HANDSHAKE_TIMEOUT_SECS")]
    handshake_timeout_secs: Option<u64>,
    /// Seconds a WebSocket may stay silent, pings unanswered, before it is closed [default: 90].
    #[arg(long, env = "ORDO_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// WebSocket connections of one user at once [default: 64].
    #[arg(long, env = "ORDO_MAX_CONNECTIONS_PER_USER")]
    max_connections_per_user: Option<usize>,
    /// PEM file of the TLS certificate chain (with --tls-key: serve wss:// and https:// only;
    /// both files are read again on SIGHUP).
    #[arg(long, env = "ORDO_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM file of the TLS private key.
    #[arg(long, env = "ORDO_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// JSON Web Key Set file of the public keys RS256/ES256 JWTs are checked with (read again on
    /// SIGHUP); HS256 JWTs use the token secret and need none.
    #[arg(long, env = "ORDO_JWKS")]
    jwks: Option<PathBuf>,
    /// A JWT's `iss` must be this.
    #[arg(long, env = "ORDO_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// A JWT's `aud` must name this.
    #[arg(long, env = "ORDO_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Seconds of clock skew allowed on a JWT's exp and nbf [default: 30].
    #[arg(long, env = "ORDO_JWT_LEEWAY_SECS")]
    jwt_leeway_secs: Option<u64>,
    /// URL (http:// or https://) offline-push events are POSTed to: for each message, the
    /// members with no connected device (conversations of up to 1,000 members).
    #[arg(long, env = "ORDO_WEBHOOK_URL", requires = "webhook_secret")]
    webhook_url: Option<String>,
    /// Secret the events are signed with (header Ordo-Signature, HMAC-SHA256).
    #[arg(long, env = "ORDO_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Bytes of the message body an event carries as `preview` [default: 0: none].
    #[arg(long, env = "ORDO_WEBHOOK_PREVIEW_BYTES")]
    webhook_preview_bytes: Option<usize>,
    /// Do not serve the web chat app at / (`web = false` in the file).
    #[arg(long, env = "ORDO_NO_WEB")]
    no_web: bool,
}

impl ServeArgs {
    fn config(self) -> Result<Config, ordo_server::ConfigError> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            listen,
            data,
            max_frame_bytes,
            max_body_bytes,
            max_sync_limit,
            push_window,
            receipt_max_members,
            max_group_members,
            dedup_window_secs,
            dedup_cache_entries,
            dedup_filter_mib,
            conv_cache_entries,
            rate_per_sec,
            rate_burst,
            housekeeping_secs,
            store_cache_mib,
            log_format,
            max_connections,
            max_pending_per_ip,
            handshake_timeout_secs,
            idle_timeout_secs,
            max_connections_per_user,
            jwt_leeway_secs,
            webhook_preview_bytes
        );
        if self.jwks.is_some() {
            c.jwks = self.jwks;
        }
        for (given, field) in [
            (self.jwt_issuer, &mut c.jwt_issuer),
            (self.jwt_audience, &mut c.jwt_audience),
            (self.webhook_url, &mut c.webhook_url),
            (self.store, &mut c.store),
            (self.webhook_secret, &mut c.webhook_secret),
        ] {
            if given.is_some() {
                *field = given;
            }
        }
        if self.secret.is_some() {
            c.secret = self.secret;
        }
        c.cluster |= self.cluster;
        if self.no_web {
            c.web = false;
        }
        if self.nats.is_some() {
            c.nats = self.nats;
        }
        if self.node_id.is_some() {
            c.node_id = self.node_id;
        }
        if let Some(p) = self.partitions {
            c.partitions = p;
        }
        if let Some(l) = self.lease_ms {
            c.lease_ms = l;
        }
        if let Some(p) = self.subject_prefix {
            c.subject_prefix = p;
        }
        if self.admin_key.is_some() {
            c.admin_key = self.admin_key;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert;
            c.tls_key = self.tls_key;
        }
        if self.retention_max_age_secs.is_some() {
            c.retention_max_age_secs = self.retention_max_age_secs;
        }
        if self.retention_max_count.is_some() {
            c.retention_max_count = self.retention_max_count;
        }
        c.validate()?;
        Ok(c)
    }
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

pub fn run(args: ServeArgs) -> ExitCode {
    let cfg = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ordo serve: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(&cfg.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ordo serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let server = match ordo_server::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ordo serve: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stop = server.stopper();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stopping: closing connections and flushing");
            let _ = stop.send(true);
        });
        match server.wait().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ordo serve: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
