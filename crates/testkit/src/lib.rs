//! Ordo's test kit: what the end-to-end tests, `ordo check` and `ordo-bench` share to run and
//! drive a real server, so that none of them has a copy of its own that could drift.
//!
//! - [`process`]: `ordo serve` as a child process on a free port and a temporary data
//!   directory, with `ORDO_*` variables cleared; waits for health; SIGKILL, SIGTERM, restart.
//! - [`admin`]: the admin API (groups, tokens, metrics).
//! - [`check`]: `ordo check` as a child process, and its report checked for a pass.
//! - [`mod@token`]: client tokens signed with a server's secret.
//! - [`wire`]: a raw protocol client (frames over a WebSocket, nothing else).
//! - [`device`]: one connected device for tests, with waits that fail loudly.
//! - [`pg_cluster`]: a PostgreSQL primary and standbys of the run's own, to SIGKILL and fail
//!   over.
//! - [`node_js`]: the JavaScript packages (the TypeScript SDK, the web app): npm installs and
//!   scripts run from `cargo test`.
//! - [`nodes`]: the nodes of an Ordo cluster (`ordo serve --cluster`), and each partition's
//!   owner as they report it.
//!
//! It is not part of the product: the `ordo` binary links it only for `ordo check`.

pub mod admin;
pub mod check;
pub mod device;
pub mod node_js;
pub mod nodes;
pub mod pg_cluster;
pub mod process;
pub mod token;
pub mod wire;

pub use admin::Admin;
pub use process::{ordo_exe, ServerOptions, ServerProcess};
pub use token::token;
pub use wire::{WireClient, WireError};

/// What went wrong while running or driving a server, and what to look at.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot {doing}: {source}")]
    Io {
        doing: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
    #[error("the server is not running")]
    NotRunning,
    #[error("{0}")]
    Request(String),
}

impl HarnessError {
    fn io(doing: &str, source: std::io::Error) -> Self {
        HarnessError::Io {
            doing: doing.to_string(),
            source,
        }
    }
}
