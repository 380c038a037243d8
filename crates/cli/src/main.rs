//! The `ordo` command: `serve` runs the server, `token` mints a client token, `send`, `tail`
//! and `chat` use the client SDK, `check` proves the delivery contract against a real server
//! under faults, `store verify` reports on a data directory and `store salvage` gets a store
//! with a damaged log going again. (Benchmarks against other systems are a separate tool,
//! `ordo-bench`.)

mod check;
mod messaging;
mod serve;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ordo",
    version,
    about = "Ordo: ordered, exactly-once message delivery"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (embedded store; no external service needed).
    Serve(Box<serve::ServeArgs>),
    /// Print a client token for USER's DEVICE, signed with the data directory's secret.
    Token {
        /// The server's data directory (its `secret` file signs the token; created if missing).
        #[arg(long, env = "ORDO_DATA", default_value = "./ordo-data")]
        data: PathBuf,
        /// Sign with this secret instead of `<data>/secret`.
        #[arg(long, env = "ORDO_SECRET", hide_env_values = true)]
        secret: Option<String>,
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = ordo_server::DEFAULT_TOKEN_TTL_SECS)]
        ttl_secs: u64,
    },
    /// Send each TEXT as one message, in order; exit 0 once all are accepted.
    ///
    /// While the server cannot be reached, each new cause is reported on stderr with the time of
    /// the next attempt, and the messages wait in the outbox until --timeout. Exit status: 0 all
    /// accepted; 1 not all accepted in time, a message rejected, the token refused by the
    /// server (401) or its TLS certificate not verifying; 2 a server URL that cannot work (not
    /// ws:// or wss://, or ending with /v1/ws, which the client appends itself).
    Send(messaging::SendArgs),
    /// Print every message received, one JSON object per line, until killed.
    ///
    /// A message: conv, seq, from, device, cmid, body, ts, reply_to, and `event` for a
    /// membership event (docs/protocol.md, `msg`). Also `{"conv", "gap": {from, to}}` for seqs
    /// removed by retention before they arrived, and `{"conv", "removed": {seq, left}}` once
    /// this user is removed from (or left) a group.
    ///
    /// Connection failures are reported on stderr (each new cause, with the time of the next
    /// attempt) and retried for ever; a token refused by the server, a certificate that does not
    /// verify (exit 1) or a server URL that cannot work (exit 2) end it at once.
    Tail(messaging::TailArgs),
    /// Line-mode chat in one conversation, showing each message's state as it changes.
    ///
    /// It starts once the server has taken the connection; connection failures are reported on
    /// stderr and retried, and lines typed meanwhile wait as pending. A token refused by the
    /// server, a certificate that does not verify (exit 1) or a server URL that cannot work
    /// (exit 2) end it at once.
    Chat(messaging::ChatArgs),
    /// Chaos run against a real server: kills, cut connections, client crashes; then verify
    /// that every accepted message reached every device exactly once, in order.
    Check(check::CheckArgs),
    /// Look after the data directory of a stopped server.
    #[command(subcommand)]
    Store(StoreCmd),
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Report what the store holds (its id, the log's segments and records) and whether it would
    /// open as it is; changes nothing. Exits 0 if it would open, 1 if not.
    Verify {
        /// The server's data directory.
        #[arg(long, env = "ORDO_DATA", default_value = "./ordo-data")]
        data: PathBuf,
    },
    /// Get a store whose log is damaged going again: replay the records before the damage, drop
    /// those stranded after it (listing their messages), move every conversation's epoch so
    /// devices sync anew, and make the log anew (the damaged segments are kept aside). Without
    /// --apply it only reports what it would do. Stop the server and keep a copy of the data
    /// directory first. Exits 0 when the store opens afterwards (or needed nothing).
    Salvage {
        /// The server's data directory.
        #[arg(long, env = "ORDO_DATA", default_value = "./ordo-data")]
        data: PathBuf,
        /// Do it (otherwise only report).
        #[arg(long)]
        apply: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve(args) => serve::run(*args),
        Cmd::Token {
            data,
            secret,
            user,
            device,
            ttl_secs,
        } => {
            if ttl_secs == 0 {
                eprintln!(
                    "ordo token: --ttl-secs must be at least 1 (0 would print an expired token)"
                );
                return ExitCode::from(2);
            }
            let fresh = secret.is_none() && !data.join("secret").exists();
            let key = match ordo_server::token_key(secret.as_deref(), &data) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("ordo token: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if fresh {
                eprintln!(
                    "ordo token: generated a new token secret in {}; only a server started with --data {} accepts this token",
                    data.join("secret").display(),
                    data.display()
                );
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let claims = ordo_server::auth::Claims {
                user,
                device,
                exp: now.saturating_add(ttl_secs),
                iat: Some(now),
            };
            match key.sign(&claims) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ordo token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Send(args) => messaging::send(args),
        Cmd::Tail(args) => messaging::tail(args),
        Cmd::Chat(args) => messaging::chat(args),
        Cmd::Check(args) => check::run(args),
        Cmd::Store(StoreCmd::Verify { data }) => {
            if !ordo_store_redb::RedbStore::exists_in(&data) {
                eprintln!(
                    "ordo store verify: {} holds no store (no ordo.redb)",
                    data.display()
                );
                return ExitCode::from(2);
            }
            let v = ordo_store_redb::verify(&data);
            for line in &v.lines {
                println!("{line}");
            }
            if v.opens {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Store(StoreCmd::Salvage { data, apply }) => {
            match ordo_store_redb::salvage(&data, apply) {
                Ok(s) => {
                    for line in &s.lines {
                        println!("{line}");
                    }
                    if s.opens {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("ordo store salvage: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
