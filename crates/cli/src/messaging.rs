//! `ordo send`, `ordo tail` and `ordo chat`: the client SDK from the command line. Scripts use
//! `send` and `tail`, so their shapes (arguments, output lines, exit codes) are kept stable.

use clap::Args;
use ordo_client::{token_identity, Client, ClientOptions, Event, Status, Target};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// Where to connect and who we are.
#[derive(Args, Clone)]
pub struct Conn {
    /// WebSocket URL of the server (`ws://` or `wss://`).
    #[arg(long, env = "ORDO_SERVER", default_value = "ws://127.0.0.1:7400")]
    server: String,
    /// Client token (from `ordo token` or the admin API).
    #[arg(long, env = "ORDO_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM file of a CA to trust for `wss://` beside the system's roots (a private CA).
    #[arg(long, env = "ORDO_CA")]
    ca: Option<PathBuf>,
}

/// Exactly one of `--to` and `--group`.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct Dest {
    /// A user: the direct conversation with them.
    #[arg(long)]
    to: Option<String>,
    /// A group id.
    #[arg(long)]
    group: Option<String>,
}

impl Dest {
    fn target(&self) -> Target {
        match (&self.to, &self.group) {
            (Some(u), _) => Target::User(u.clone()),
            (_, Some(g)) => Target::Conv(g.clone()),
            _ => unreachable!("clap requires one of --to and --group"),
        }
    }

    /// The conversation id, given our own user id.
    fn conv(&self, me: &str) -> String {
        match (&self.to, &self.group) {
            (Some(u), _) => ordo_client::direct_conv_id(me, u),
            (_, Some(g)) => g.clone(),
            _ => unreachable!("clap requires one of --to and --group"),
        }
    }
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    dest: Dest,
    /// Local store; messages not yet accepted stay in it for the next run. Without it a
    /// temporary store is used.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Give up (exit 1) if not everything is accepted within this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Report progress on stderr (when the messages are safely queued, and each acceptance).
    #[arg(long, short)]
    verbose: bool,
    /// Messages, each argument one message, sent in this order.
    text: Vec<String>,
}

#[derive(Args)]
pub struct TailArgs {
    #[command(flatten)]
    conn: Conn,
    /// Local store: a restarted tail on the same store prints only what it had not printed.
    #[arg(long)]
    store: PathBuf,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    dest: Dest,
    /// Local store [default: a temporary one].
    #[arg(long)]
    store: Option<PathBuf>,
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("ordo: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

/// Opens the client on `store`, or on a temporary store kept alive by the returned guard.
async fn open(
    conn: &Conn,
    store: Option<PathBuf>,
) -> Result<(Client, Option<tempfile::TempDir>), String> {
    let (path, guard) = match store {
        Some(p) => (p, None),
        None => {
            let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
            (dir.path().join("client.redb"), Some(dir))
        }
    };
    let mut opts = ClientOptions::new(&conn.server, &conn.token, path);
    opts.ca = conn.ca.clone();
    let client = Client::open(opts).await.map_err(|e| e.to_string())?;
    Ok((client, guard))
}

pub fn send(args: SendArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    rt.block_on(async move {
        let kept = args.store.is_some();
        let (mut client, _guard) = match open(&args.conn, args.store).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ordo send: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut waiting: Vec<String> = Vec::new();
        for text in &args.text {
            match client.send(args.dest.target(), text.clone()).await {
                Ok(cmid) => waiting.push(cmid),
                Err(e) => {
                    eprintln!("ordo send: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        if args.verbose {
            eprintln!(
                "ordo send: {} message(s) queued; waiting for the server to accept them",
                waiting.len()
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
        // Also wait for messages left pending by an earlier run on the same store.
        let mut pending: HashMap<String, ()> = waiting.iter().map(|c| (c.clone(), ())).collect();
        let mut earlier = client_outbox_len(&client, &pending);
        let mut last_connect_error: Option<String> = None;
        while !pending.is_empty() || earlier > 0 {
            let ev = match tokio::time::timeout_at(deadline, client.next_event()).await {
                Err(_) => {
                    let fate = if kept {
                        "they stay in the store and go out with the next run on it"
                    } else {
                        "they were not sent (with --store PATH they would be kept for a later run)"
                    };
                    eprintln!(
                        "ordo send: {} message(s) not accepted within {} s; {fate}",
                        pending.len() + earlier,
                        args.timeout_secs
                    );
                    if let Some(why) = &last_connect_error {
                        eprintln!("ordo send: the last connection attempt failed: {why}");
                    }
                    return ExitCode::FAILURE;
                }
                Ok(None) => {
                    eprintln!("ordo send: the client stopped");
                    return ExitCode::FAILURE;
                }
                Ok(Some(ev)) => ev,
            };
            match &ev {
                Event::ConnectFailed {
                    reason,
                    unauthorized: true,
                } => {
                    eprintln!("ordo send: {reason}");
                    return ExitCode::FAILURE;
                }
                Event::ConnectFailed { reason, .. } => last_connect_error = Some(reason.clone()),
                Event::Connected => last_connect_error = None,
                _ => {}
            }
            if let Event::Status { cmid, status, conv } = ev {
                let ours = pending.contains_key(&cmid);
                if let (Status::Sent(seq), true) = (&status, args.verbose) {
                    eprintln!(
                        "ordo send: {cmid} accepted as seq {seq} of {}",
                        conv.unwrap_or_default()
                    );
                }
                match status {
                    Status::Sent(_) if ours => {
                        pending.remove(&cmid);
                    }
                    Status::Sent(_) => earlier = earlier.saturating_sub(1),
                    Status::Failed(reason) => {
                        eprintln!("ordo send: message {cmid} was rejected: {reason}");
                        return ExitCode::FAILURE;
                    }
                    _ => {}
                }
            }
        }
        client.close().await;
        ExitCode::SUCCESS
    })
}

/// Messages in the outbox that this run did not queue (left by an earlier, interrupted run).
fn client_outbox_len(client: &Client, ours: &HashMap<String, ()>) -> usize {
    client
        .pending()
        .map(|p| p.iter().filter(|c| !ours.contains_key(*c)).count())
        .unwrap_or(0)
}

pub fn tail(args: TailArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    rt.block_on(async move {
        let (mut client, _guard) = match open(&args.conn, Some(args.store)).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ordo tail: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stdout = std::io::stdout();
        while let Some(ev) = client.next_event().await {
            let line = match ev {
                Event::Message(m) => serde_json::json!({
                    "conv": m.conv, "seq": m.seq, "from": m.from, "device": m.device,
                    "cmid": m.cmid, "body": m.body, "ts": m.ts,
                    "reply_to": m.reply_to,
                }),
                Event::HistoryGap { conv, from, to } => serde_json::json!({
                    "conv": conv, "gap": {"from": from, "to": to},
                }),
                Event::ConnectFailed {
                    reason,
                    unauthorized: true,
                } => {
                    eprintln!("ordo tail: {reason}");
                    return ExitCode::FAILURE;
                }
                _ => continue,
            };
            let mut out = stdout.lock();
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return ExitCode::SUCCESS; // stdout closed: the reader went away
            }
        }
        ExitCode::FAILURE
    })
}

pub fn chat(args: ChatArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    rt.block_on(async move {
        let Some((me, _)) = token_identity(&args.conn.token) else {
            eprintln!("ordo chat: the token is not an Ordo token (expected <payload>.<signature>)");
            return ExitCode::FAILURE;
        };
        let conv = args.dest.conv(&me);
        let (mut client, _guard) = match open(&args.conn, args.store).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ordo chat: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("chatting in {conv} as {me}; type a line and press enter, Ctrl-D to quit");
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut mine: HashMap<String, String> = HashMap::new();
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(text)) if !text.trim().is_empty() => {
                        match client.send(args.dest.target(), text.clone()).await {
                            Ok(cmid) => { mine.insert(cmid, text); }
                            Err(e) => eprintln!("! {e}"),
                        }
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                },
                ev = client.next_event() => match ev {
                    None => break,
                    Some(Event::Message(m)) if m.conv == conv => {
                        if m.from == me && mine.contains_key(&m.cmid) {
                            continue; // our own line, shown with its status instead
                        }
                        println!("{:>5} {}: {}", m.seq, m.from, m.body);
                        let _ = client.mark_read(&m.conv, m.seq);
                    }
                    Some(Event::Status { cmid, status, .. }) => {
                        if let Some(text) = mine.get(&cmid) {
                            let s = match status {
                                Status::Pending => "pending".to_string(),
                                Status::Sent(seq) => format!("sent #{seq}"),
                                Status::Delivered => "delivered".to_string(),
                                Status::Read => "read".to_string(),
                                Status::Failed(r) => format!("failed: {r}"),
                            };
                            println!("      [{s}] {text}");
                        }
                    }
                    Some(Event::HistoryGap { conv: c, from, to }) if c == conv => {
                        println!("      (messages {from}..{to} were removed by retention)");
                    }
                    Some(Event::ConnectFailed { reason, unauthorized: true }) => {
                        eprintln!("ordo chat: {reason}");
                        return ExitCode::FAILURE;
                    }
                    Some(Event::Connected) => println!("      (connected)"),
                    Some(Event::Disconnected) => println!("      (disconnected; reconnecting)"),
                    Some(_) => {}
                },
            }
        }
        client.close().await;
        ExitCode::SUCCESS
    })
}
