//! Server settings: defaults, the optional TOML file, and how command-line flags and environment
//! variables override it (the `ordo` command does the parsing: it sets the fields it was given
//! over [`Config::from_file`] or the defaults, then calls [`Config::validate`]).

use ordo_core::{CoreConfig, Retention};
use ordo_protocol::Limits;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the WebSocket and HTTP endpoints listen on.
    pub listen: SocketAddr,
    /// Directory of the embedded store, the token secret and the admin key.
    pub data: PathBuf,
    /// A PostgreSQL database to store everything in instead of the embedded store (a
    /// `postgres://` URL or a `key=value` connection string); the token secret and the admin
    /// key stay in `data` unless given.
    pub store: Option<String>,
    /// Secret that signs client tokens; generated into `<data>/secret` when unset.
    pub secret: Option<String>,
    /// Key for the admin API; generated into `<data>/admin.key` when unset.
    pub admin_key: Option<String>,
    pub max_frame_bytes: usize,
    pub max_body_bytes: usize,
    pub max_sync_limit: u32,
    pub default_sync_limit: u32,
    /// Body bytes one `synced` page may carry before it ends early with `has_more`.
    pub max_sync_bytes: usize,
    pub max_acks_per_frame: usize,
    /// Pushed-but-unacknowledged messages per device and conversation before falling back to
    /// `notify`.
    pub push_window: u64,
    /// Groups larger than this get no receipt frames.
    pub receipt_max_members: usize,
    /// The most members a group may have (admin requests past it are refused).
    pub max_group_members: usize,
    /// Frames queued for one connection before it is dropped as too slow.
    pub outbound_queue: usize,
    /// Bytes of frames (about: strings by length, plus a little per frame) queued for one
    /// connection before it is dropped as too slow: with `outbound_queue`, what bounds the
    /// memory one connection that does not read can hold.
    pub outbound_bytes: usize,
    pub dedup_window_secs: u64,
    /// Dedup entries kept in memory, the most recent (the store holds every one of the
    /// window; an older resend is looked up there).
    pub dedup_cache_entries: usize,
    /// The dedup filter, in MiB: tells a new client message id from one that may have been
    /// seen, without a store lookup. About 3.5 bytes per message of the window keeps lookups of
    /// new ids near 1 % (every time slice of the filter is probed).
    pub dedup_filter_mib: usize,
    /// Conversations held in memory, the most recently used (the store holds them all; one
    /// not held is loaded when it is next used). About 2 KB each for a direct conversation.
    pub conv_cache_entries: usize,
    /// Sends per second per user (0: unlimited) and the burst allowed above it.
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    /// Server-wide retention for conversations that set none (unset: keep everything).
    pub retention_max_age_secs: Option<u64>,
    pub retention_max_count: Option<u64>,
    /// How often age-based retention and dedup expiry run.
    pub housekeeping_secs: u64,
    /// The embedded store's page cache (redb's), in MiB: pages of history and indexes kept in
    /// memory.
    pub store_cache_mib: usize,
    /// `text` or `json` logs.
    pub log_format: String,
    /// Sockets open at once, WebSockets included; more are closed as soon as accepted. Keep it
    /// below the process's open-file limit (`ulimit -n`), less a few hundred for the store.
    pub max_connections: usize,
    /// Connections from one address that have not finished a request yet (a WebSocket until
    /// its upgrade is answered); more from that address are closed as soon as accepted.
    pub max_pending_per_ip: usize,
    /// Seconds a connection has to send its request headers.
    pub handshake_timeout_secs: u64,
    /// Seconds a WebSocket may stay silent (not even answering the server's pings, sent every
    /// third of this) before it is closed.
    pub idle_timeout_secs: u64,
    /// WebSocket connections of one user at once; another is refused (HTTP 429).
    pub max_connections_per_user: usize,
    /// PEM file of the TLS certificate chain (leaf first): with `tls_key`, the server speaks
    /// only TLS (`wss://`, `https://`). Read again, with the key, on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// JSON Web Key Set file of the public keys RS256 and ES256 JWTs are checked with (read
    /// again on SIGHUP). HS256 JWTs are checked with `secret` and need no file.
    pub jwks: Option<PathBuf>,
    /// When set, a JWT's `iss` must be this.
    pub jwt_issuer: Option<String>,
    /// When set, a JWT's `aud` must name this.
    pub jwt_audience: Option<String>,
    /// Seconds of clock skew allowed on a JWT's `exp` and `nbf`.
    pub jwt_leeway_secs: u64,
    /// Where offline-push events are POSTed (`http://` or `https://`); none: no events.
    pub webhook_url: Option<String>,
    /// The secret events are signed with (HMAC-SHA256); required with `webhook_url`.
    pub webhook_secret: Option<String>,
    /// Bytes of a message's body an event carries as `preview` (cut at a character boundary);
    /// 0: no preview.
    pub webhook_preview_bytes: usize,
    /// Run as a node of a cluster: with the other nodes, on the PostgreSQL database `store`
    /// names and the NATS server `nats` names (see docs/scaling.md).
    pub cluster: bool,
    /// The NATS server the nodes of a cluster talk through (`nats://HOST:PORT`).
    pub nats: Option<String>,
    /// This node's id in its cluster (letters, digits, `-` and `_`; at most 64): generated at
    /// every start when unset.
    pub node_id: Option<String>,
    /// The cluster's partition count: the same on every node, for the cluster's whole life.
    pub partitions: u32,
    /// Milliseconds a partition's lease runs without renewal: a dead node's partitions are
    /// taken over within about this long.
    pub lease_ms: u64,
    /// NATS subjects of the cluster start with this (the same on every node).
    pub subject_prefix: String,
    /// Seconds a send forwarded to its conversation's node may stay unanswered before its
    /// connection is closed (its client reconnects and resends).
    pub forward_timeout_secs: u64,
    /// Serve the web chat app at `/` (`false`: `--no-web`; `/` is then a 404 like any unknown
    /// path).
    pub web: bool,
}

impl Default for Config {
    fn default() -> Self {
        let core = CoreConfig::default();
        Config {
            listen: "127.0.0.1:7400".parse().expect("static address"),
            data: PathBuf::from("./ordo-data"),
            store: None,
            secret: None,
            admin_key: None,
            max_frame_bytes: core.limits.max_frame_bytes,
            max_body_bytes: core.limits.max_body_bytes,
            max_sync_limit: core.limits.max_sync_limit,
            default_sync_limit: core.default_sync_limit,
            max_sync_bytes: 1 << 20,
            max_acks_per_frame: core.limits.max_acks_per_frame,
            push_window: core.push_window,
            receipt_max_members: core.receipt_max_members,
            max_group_members: core.max_group_members,
            outbound_queue: 16_384,
            outbound_bytes: 8 << 20,
            dedup_window_secs: core.dedup_window_ms / 1000,
            dedup_cache_entries: core.dedup_cache_entries,
            dedup_filter_mib: core.dedup_filter_bytes >> 20,
            conv_cache_entries: core.conv_cache_entries,
            rate_per_sec: core.rate_per_sec,
            rate_burst: core.rate_burst,
            retention_max_age_secs: None,
            retention_max_count: None,
            housekeeping_secs: 60,
            store_cache_mib: ordo_store_redb::DEFAULT_CACHE_BYTES >> 20,
            log_format: "text".into(),
            max_connections: 19_500,
            max_pending_per_ip: 256,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 90,
            max_connections_per_user: 64,
            tls_cert: None,
            tls_key: None,
            jwks: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_secs: 30,
            webhook_url: None,
            webhook_secret: None,
            webhook_preview_bytes: 0,
            cluster: false,
            nats: None,
            node_id: None,
            partitions: 64,
            lease_ms: 2000,
            subject_prefix: "ordo".into(),
            forward_timeout_secs: 10,
            web: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file whose keys are the field names above; missing keys keep defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Refuses any setting outside its range, naming the setting, its value and the range (a
    /// value that passed used to break promises: a dedup window of 0 stored resends twice, a rate
    /// burst of NaN refused every send, huge sizes wrapped or panicked).
    pub fn validate(&self) -> Result<(), ConfigError> {
        const MIB: u64 = 1 << 20;
        let int = |name: &str, v: u64, lo: u64, hi: u64| -> Result<(), ConfigError> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{name} is {v}; it must be between {lo} and {hi}"
                )))
            }
        };
        let size = |v: usize| v as u64;
        int("max_body_bytes", size(self.max_body_bytes), 1, 16 * MIB)?;
        int(
            "max_frame_bytes",
            size(self.max_frame_bytes),
            // Room for the frame's other fields around the largest body.
            size(self.max_body_bytes) + 256,
            64 * MIB,
        )?;
        int("max_sync_limit", self.max_sync_limit.into(), 1, 100_000)?;
        if self.cluster {
            if self.store.is_none() {
                return Err(ConfigError::Invalid(
                    "a cluster's node needs --store, the PostgreSQL database every node shares"
                        .into(),
                ));
            }
            if self.nats.is_none() {
                return Err(ConfigError::Invalid(
                    "a cluster's node needs --nats, the NATS server every node talks through"
                        .into(),
                ));
            }
            if let Some(id) = &self.node_id {
                if id.is_empty()
                    || id.len() > 64
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(ConfigError::Invalid(format!(
                        "node_id {id:?}: 1 to 64 letters, digits, '-' or '_'"
                    )));
                }
            }
            if self.subject_prefix.is_empty()
                || !self
                    .subject_prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(ConfigError::Invalid(format!(
                    "subject_prefix {:?}: letters, digits, '-', '_' and '.'",
                    self.subject_prefix
                )));
            }
        }
        int(
            "partitions",
            self.partitions.into(),
            1,
            ordo_store_postgres::lease::MAX_PARTITIONS.into(),
        )?;
        int("lease_ms", self.lease_ms, 200, 600_000)?;
        int("forward_timeout_secs", self.forward_timeout_secs, 1, 3600)?;
        int(
            "default_sync_limit",
            self.default_sync_limit.into(),
            1,
            100_000,
        )?;
        int("max_sync_bytes", size(self.max_sync_bytes), 1, 64 * MIB)?;
        int(
            "max_acks_per_frame",
            size(self.max_acks_per_frame),
            1,
            100_000,
        )?;
        int("push_window", self.push_window, 1, 100_000)?;
        int(
            "receipt_max_members",
            size(self.receipt_max_members),
            0,
            10_000_000,
        )?;
        int(
            "max_group_members",
            size(self.max_group_members),
            2,
            10_000_000,
        )?;
        int("outbound_queue", size(self.outbound_queue), 16, 1_000_000)?;
        int(
            "outbound_bytes",
            size(self.outbound_bytes),
            64 << 10,
            1 << 30,
        )?;
        // Below a minute a client's ordinary retries outlive the window: a resend is stored twice.
        int("dedup_window_secs", self.dedup_window_secs, 60, 30 * 86_400)?;
        int(
            "dedup_cache_entries",
            size(self.dedup_cache_entries),
            1,
            100_000_000,
        )?;
        int("dedup_filter_mib", size(self.dedup_filter_mib), 1, 65_536)?;
        int(
            "conv_cache_entries",
            size(self.conv_cache_entries),
            0,
            100_000_000,
        )?;
        if let Some(v) = self.retention_max_age_secs {
            int("retention_max_age_secs", v, 1, 100 * 365 * 86_400)?;
        }
        if let Some(v) = self.retention_max_count {
            int("retention_max_count", v, 1, u64::MAX >> 1)?;
        }
        int("housekeeping_secs", self.housekeeping_secs, 1, 86_400)?;
        int("store_cache_mib", size(self.store_cache_mib), 1, 1 << 20)?;
        int("max_connections", size(self.max_connections), 1, 1_000_000)?;
        int(
            "max_pending_per_ip",
            size(self.max_pending_per_ip),
            1,
            1_000_000,
        )?;
        int(
            "handshake_timeout_secs",
            self.handshake_timeout_secs,
            1,
            600,
        )?;
        int("idle_timeout_secs", self.idle_timeout_secs, 3, 86_400)?;
        int("jwt_leeway_secs", self.jwt_leeway_secs, 0, 3600)?;
        int(
            "max_connections_per_user",
            size(self.max_connections_per_user),
            1,
            1_000_000,
        )?;
        let real = |name: &str, v: f64, lo: f64, hi: f64| -> Result<(), ConfigError> {
            // Written so that NaN fails too.
            if v >= lo && v <= hi {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{name} is {v}; it must be a number between {lo} and {hi}"
                )))
            }
        };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together: give both (PEM files) for TLS, or neither"
                    .into(),
            ));
        }
        if let Some(url) = &self.webhook_url {
            crate::webhook::Endpoint::parse(url).map_err(ConfigError::Invalid)?;
            if self.webhook_secret.as_deref().is_none_or(str::is_empty) {
                return Err(ConfigError::Invalid(
                    "webhook_url needs webhook_secret (--webhook-secret): the backend checks each event's signature with it".into(),
                ));
            }
        }
        int(
            "webhook_preview_bytes",
            size(self.webhook_preview_bytes),
            0,
            4096,
        )?;
        real("rate_per_sec", self.rate_per_sec, 0.0, 1e6)?;
        real("rate_burst", self.rate_burst, 1.0, 1e6)?;
        if self.log_format != "text" && self.log_format != "json" {
            return Err(ConfigError::Invalid(format!(
                "log_format is {:?}; it must be `text` or `json`",
                self.log_format
            )));
        }
        Ok(())
    }

    pub fn jwt_rules(&self) -> crate::jwt::JwtRules {
        crate::jwt::JwtRules {
            issuer: self.jwt_issuer.clone().filter(|s| !s.is_empty()),
            audience: self.jwt_audience.clone().filter(|s| !s.is_empty()),
            leeway_secs: self.jwt_leeway_secs,
        }
    }

    pub fn accept_limits(&self) -> crate::accept::AcceptLimits {
        crate::accept::AcceptLimits {
            max_connections: self.max_connections,
            max_pending_per_ip: self.max_pending_per_ip,
            handshake_timeout: std::time::Duration::from_secs(self.handshake_timeout_secs),
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_body_bytes: self.max_body_bytes,
            max_sync_limit: self.max_sync_limit,
            max_acks_per_frame: self.max_acks_per_frame,
        }
    }

    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            limits: self.limits(),
            push_window: self.push_window,
            receipt_max_members: self.receipt_max_members,
            max_group_members: self.max_group_members,
            dedup_window_ms: self.dedup_window_secs.saturating_mul(1000),
            dedup_cache_entries: self.dedup_cache_entries,
            dedup_filter_bytes: self.dedup_filter_mib << 20,
            max_parked_bytes: CoreConfig::default().max_parked_bytes,
            conv_cache_entries: self.conv_cache_entries,
            retention_sweep_convs: CoreConfig::default().retention_sweep_convs,
            retention_pass_ms: self.housekeeping_secs.saturating_mul(1000),
            rate_per_sec: self.rate_per_sec,
            rate_burst: self.rate_burst,
            default_retention: Retention {
                max_age_ms: self.retention_max_age_secs.map(|s| s.saturating_mul(1000)),
                max_count: self.retention_max_count,
            },
            // A default above the cap is served as the cap, like any request.
            default_sync_limit: self.default_sync_limit.min(self.max_sync_limit),
            offline_max_members: match self.webhook_url {
                Some(_) => crate::webhook::MAX_MEMBERS,
                None => 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_the_store_cache_is_a_setting() {
        let c = Config::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.store_cache_mib, 64);
        let c: Config = toml::from_str("store_cache_mib = 16").expect("parse");
        assert_eq!(c.store_cache_mib, 16);
        let zero = Config {
            store_cache_mib: 0,
            ..Config::default()
        };
        let e = zero.validate().expect_err("a store cache of 0 is refused");
        assert!(e.to_string().contains("store_cache_mib"), "{e}");
    }

    #[test]
    fn the_web_app_is_served_unless_turned_off() {
        assert!(Config::default().web);
        let c: Config = toml::from_str("web = false").expect("parse");
        assert!(!c.web);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn the_dedup_caches_are_settings() {
        let c: Config =
            toml::from_str("dedup_cache_entries = 10\ndedup_filter_mib = 2").expect("parse");
        assert!(c.validate().is_ok());
        let core = c.core();
        assert_eq!(
            (core.dedup_cache_entries, core.dedup_filter_bytes),
            (10, 2 << 20)
        );
        let none = Config {
            dedup_filter_mib: 0,
            ..Config::default()
        };
        let e = none.validate().expect_err("a filter of 0 is refused");
        assert!(e.to_string().contains("dedup_filter_mib"), "{e}");
    }

    /// Every value that used to pass and break a promise is refused, naming the setting and
    /// its range.
    #[test]
    fn settings_outside_their_range_are_refused_with_the_range() {
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 9] = [
            ("dedup_window_secs", |c| c.dedup_window_secs = 0),
            ("rate_burst", |c| c.rate_burst = f64::NAN),
            ("rate_per_sec", |c| c.rate_per_sec = f64::INFINITY),
            ("max_frame_bytes", |c| c.max_frame_bytes = usize::MAX),
            ("outbound_queue", |c| c.outbound_queue = usize::MAX),
            ("max_body_bytes", |c| c.max_body_bytes = usize::MAX),
            ("retention_max_age_secs", |c| {
                c.retention_max_age_secs = Some(u64::MAX)
            }),
            ("housekeeping_secs", |c| c.housekeeping_secs = u64::MAX),
            ("log_format", |c| c.log_format = "xml".into()),
        ];
        for (name, set) in cases {
            let mut c = Config::default();
            set(&mut c);
            let e = c.validate().expect_err(name).to_string();
            assert!(e.contains(name), "{name}: {e}");
            assert!(
                e.contains("between") || e.contains("must be"),
                "{name}: {e}"
            );
        }
        // The edges of a range are valid.
        let edge = Config {
            dedup_window_secs: 60,
            rate_burst: 1.0,
            outbound_queue: 65_536,
            ..Config::default()
        };
        assert!(edge.validate().is_ok());
    }
}
