//! `ordo send`, `ordo tail` and `ordo chat`: the client SDK from the command line. Scripts use
//! `send` and `tail`, so their shapes (arguments, output lines, exit codes) are kept stable.
//!
//! Connection trouble goes to stderr as it happens ([`ConnReport`]): the first failure at once,
//! with its cause and when the next attempt is, later ones when the cause changes or every
//! [`REPEAT_AFTER`]. What retrying cannot mend ends the command at once: a server URL that
//! cannot work (exit 2, like any bad argument), a token the server refuses or a certificate
//! that does not verify (exit 1).

use clap::Args;
use ordo_client::{
    token_identity, Client, ClientError, ClientOptions, ConnectError, Connection, Event, Status,
    Target,
};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Where to connect and who we are.
#[derive(Args, Clone)]
pub struct Conn {
    /// WebSocket URL of the server: `ws://host:port`, or `wss://host:port` for a server with TLS
    /// (the client appends the endpoint's path, /v1/ws, itself).
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
    /// Give up (exit 1) if not every message is accepted within this many seconds; 0 waits for
    /// ever. Connection failures meanwhile are reported on stderr and retried. Messages not
    /// accepted stay in the outbox of --store for the next run on it; with the temporary store
    /// they are dropped.
    #[arg(
        long = "timeout",
        visible_alias = "timeout-secs",
        value_name = "SECS",
        default_value_t = 60
    )]
    timeout_secs: u64,
    /// Report progress on stderr (when the messages are safely queued, each acceptance, and every
    /// failed connection attempt rather than only changes).
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

/// The exit status for a server URL that cannot work: that of a bad argument.
const EXIT_USAGE: u8 = 2;

/// Why a command could not start, printed by [`Failure::exit`].
struct Failure {
    message: String,
    code: ExitCode,
}

impl Failure {
    fn exit(self, prog: &str) -> ExitCode {
        eprintln!("{prog}: {}", self.message);
        self.code
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Connect(c) if c.is_bad_url() => ExitCode::from(EXIT_USAGE),
            _ => ExitCode::FAILURE,
        };
        Failure {
            message: e.to_string(),
            code,
        }
    }
}

/// Opens the client on `store`, or on a temporary store kept alive by the returned guard. A
/// server URL that cannot work is refused here, before anything else.
async fn open(
    conn: &Conn,
    store: Option<PathBuf>,
) -> Result<(Client, Option<tempfile::TempDir>), Failure> {
    ordo_client::endpoint(&conn.server).map_err(|e| Failure::from(ClientError::Connect(e)))?;
    let (path, guard) = match store {
        Some(p) => (p, None),
        None => {
            let dir = tempfile::tempdir().map_err(|e| Failure {
                message: format!("cannot create a temp dir: {e}"),
                code: ExitCode::FAILURE,
            })?;
            (dir.path().join("client.redb"), Some(dir))
        }
    };
    let mut opts = ClientOptions::new(&conn.server, &conn.token, path);
    opts.ca = conn.ca.clone();
    let client = Client::open(opts).await?;
    Ok((client, guard))
}

/// The same connection failure is not repeated on stderr more often than this.
const REPEAT_AFTER: Duration = Duration::from_secs(10);

/// Reports the connection on stderr from the SDK's connection events: each failure with its
/// cause and when the next attempt is, but the same cause again only every [`REPEAT_AFTER`]
/// (every time with `verbose`); that it is back, once something was reported; and, to the
/// caller, the permanent error the client stopped on.
struct ConnReport {
    prog: &'static str,
    url: String,
    verbose: bool,
    /// The last failure printed since the last connection, and when.
    shown: Option<(String, Instant)>,
    /// The last failure, printed or not; `None` while connected.
    last: Option<ConnectError>,
    /// Whether a connection was ever made.
    connected_once: bool,
}

impl ConnReport {
    fn new(prog: &'static str, conn: &Conn, verbose: bool) -> Self {
        ConnReport {
            prog,
            url: conn.server.trim().trim_end_matches('/').to_string(),
            verbose,
            shown: None,
            last: None,
            connected_once: false,
        }
    }

    /// Takes note of `ev` (with the client's `connection` as of it); returns the error the
    /// client stopped on, if it did.
    fn event(&mut self, ev: &Event, connection: &Connection) -> Option<ConnectError> {
        match ev {
            Event::Connected => {
                if self.shown.is_some() {
                    eprintln!("{}: connected to {}", self.prog, self.url);
                }
                self.shown = None;
                self.last = None;
                self.connected_once = true;
                None
            }
            Event::ConnectFailed { .. } | Event::Disconnected => match connection {
                Connection::Stopped(cause) => Some(cause.clone()),
                Connection::Retrying {
                    cause,
                    failures,
                    retry_in,
                } => {
                    self.failure(cause, *failures, *retry_in);
                    None
                }
                _ => None,
            },
            _ => None,
        }
    }

    fn failure(&mut self, cause: &ConnectError, failures: u32, retry_in: Duration) {
        let text = cause.to_string();
        self.last = Some(cause.clone());
        let show = self.verbose
            || match &self.shown {
                None => true,
                Some((shown, at)) => *shown != text || at.elapsed() >= REPEAT_AFTER,
            };
        if !show {
            return;
        }
        let nth = if failures > 1 {
            format!(" (attempt {failures})")
        } else {
            String::new()
        };
        eprintln!(
            "{}: {text}{nth}; retrying in {:.1} s",
            self.prog,
            retry_in.as_secs_f32()
        );
        self.shown = Some((text, Instant::now()));
    }
}

pub fn send(args: SendArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    rt.block_on(async move {
        let store = args.store.clone();
        let (mut client, _guard) = match open(&args.conn, args.store).await {
            Ok(c) => c,
            Err(f) => return f.exit("ordo send"),
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
        let deadline = (args.timeout_secs > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs));
        // Also wait for messages left pending by an earlier run on the same store.
        let mut pending: HashMap<String, ()> = waiting.iter().map(|c| (c.clone(), ())).collect();
        let mut earlier = client_outbox_len(&client, &pending);
        let mut report = ConnReport::new("ordo send", &args.conn, args.verbose);
        // What becomes of the messages not accepted when we give up.
        let fate = |n: usize, connected: bool| match &store {
            Some(p) => format!(
                "{n} message(s) not accepted stay in the outbox of {} and go out with the next `ordo send --store {}`",
                p.display(),
                p.display()
            ),
            None if connected => format!(
                "{n} message(s) not accepted are dropped with the temporary store (some may have reached the server); with --store PATH they would be kept for a later run"
            ),
            None => format!(
                "{n} message(s) were not sent and are dropped with the temporary store; with --store PATH they would be kept for a later run"
            ),
        };
        while !pending.is_empty() || earlier > 0 {
            let next = match deadline {
                Some(d) => tokio::time::timeout_at(d, client.next_event()).await,
                None => Ok(client.next_event().await),
            };
            let ev = match next {
                Err(_) => {
                    eprintln!(
                        "ordo send: giving up: not accepted within {} s (--timeout)",
                        args.timeout_secs
                    );
                    if let Some(why) = &report.last {
                        eprintln!("ordo send: not connected: {why}");
                    }
                    eprintln!(
                        "ordo send: {}",
                        fate(pending.len() + earlier, report.connected_once)
                    );
                    return ExitCode::FAILURE;
                }
                Ok(None) => {
                    match client.stopped() {
                        Some(why) => eprintln!("ordo send: {why}"),
                        None => eprintln!("ordo send: the client stopped"),
                    }
                    eprintln!(
                        "ordo send: {}",
                        fate(pending.len() + earlier, report.connected_once)
                    );
                    return ExitCode::FAILURE;
                }
                Ok(Some(ev)) => ev,
            };
            if let Some(why) = report.event(&ev, client.connection()) {
                eprintln!("ordo send: {why}");
                eprintln!(
                    "ordo send: {}",
                    fate(pending.len() + earlier, report.connected_once)
                );
                return ExitCode::FAILURE;
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
            Err(f) => return f.exit("ordo tail"),
        };
        let mut report = ConnReport::new("ordo tail", &args.conn, false);
        let stdout = std::io::stdout();
        while let Some(ev) = client.next_event().await {
            if let Some(why) = report.event(&ev, client.connection()) {
                eprintln!("ordo tail: {why}");
                return ExitCode::FAILURE;
            }
            let line = match ev {
                Event::Message(m) => {
                    let mut line = serde_json::json!({
                        "conv": m.conv, "seq": m.seq, "from": m.from, "device": m.device,
                        "cmid": m.cmid, "body": m.body, "ts": m.ts,
                        "reply_to": m.reply_to,
                    });
                    if let Some(e) = &m.event {
                        line["event"] = serde_json::to_value(e).unwrap_or_default();
                    }
                    line
                }
                Event::Removed { conv, seq, left } => serde_json::json!({
                    "conv": conv, "removed": {"seq": seq, "left": left},
                }),
                Event::HistoryGap { conv, from, to } => serde_json::json!({
                    "conv": conv, "gap": {"from": from, "to": to},
                }),
                _ => continue,
            };
            let mut out = stdout.lock();
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return ExitCode::SUCCESS; // stdout closed: the reader went away
            }
        }
        if let Some(why) = client.stopped() {
            eprintln!("ordo tail: {why}");
        }
        ExitCode::FAILURE
    })
}

/// The lines of stdin, read on a thread of their own: a blocking read cannot be cancelled, and
/// a runtime that owned it would wait for Enter before it could shut down. The process ends
/// without waiting for it. `None` at end of input.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn chat(args: ChatArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    rt.block_on(async move {
        let Some((me, _)) = token_identity(&args.conn.token) else {
            eprintln!(
                "ordo chat: the token is not an Ordo token (expected <payload>.<signature> as printed by `ordo token`, or a JWT with `sub` and `device` claims)"
            );
            return ExitCode::FAILURE;
        };
        let conv = args.dest.conv(&me);
        let (mut client, _guard) = match open(&args.conn, args.store).await {
            Ok(c) => c,
            Err(f) => return f.exit("ordo chat"),
        };
        let mut report = ConnReport::new("ordo chat", &args.conn, false);
        let mut lines = stdin_lines();
        let mut mine: HashMap<String, String> = HashMap::new();
        loop {
            tokio::select! {
                line = lines.recv() => match line {
                    Some(text) if !text.trim().is_empty() => {
                        match client.send(args.dest.target(), text.clone()).await {
                            Ok(cmid) => { mine.insert(cmid, text); }
                            Err(ClientError::Connect(why)) => {
                                eprintln!("ordo chat: {why}");
                                return ExitCode::FAILURE;
                            }
                            Err(e) => eprintln!("! {e}"),
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                ev = client.next_event() => {
                    let Some(ev) = ev else {
                        if let Some(why) = client.stopped() {
                            eprintln!("ordo chat: {why}");
                            return ExitCode::FAILURE;
                        }
                        break;
                    };
                    let first = matches!(ev, Event::Connected) && !report.connected_once;
                    if let Some(why) = report.event(&ev, client.connection()) {
                        eprintln!("ordo chat: {why}");
                        return ExitCode::FAILURE;
                    }
                    match ev {
                        Event::Message(m) if m.conv == conv => {
                            if m.from == me && mine.contains_key(&m.cmid) {
                                continue; // our own line, shown with its status instead
                            }
                            println!("{:>5} {}: {}", m.seq, m.from, m.body);
                            let _ = client.mark_read(&m.conv, m.seq);
                        }
                        Event::Status { cmid, status, .. } => {
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
                        Event::HistoryGap { conv: c, from, to } if c == conv => {
                            println!("      (messages {from}..{to} were removed by retention)");
                        }
                        Event::Connected => {
                            if first {
                                // Only now is the server known to take us.
                                println!(
                                    "chatting in {conv} as {me}; type a line and press enter, Ctrl-D to quit"
                                );
                            }
                            println!("      (connected)");
                        }
                        // On stderr too (ConnReport), with the cause and the next attempt.
                        Event::Disconnected => println!("      (disconnected; reconnecting)"),
                        _ => {}
                    }
                }
            }
        }
        client.close().await;
        ExitCode::SUCCESS
    })
}
