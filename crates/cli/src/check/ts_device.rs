//! A TypeScript SDK device of the check: `sdk/typescript/tools/check-device.js` run by Node in a
//! process of its own, on a SQLite store file of its own, driven over JSON lines.
//!
//! The process prints `{"ready":true}` once its client is open, then every event as
//! `{"event":...}`, and answers commands written to its stdin (`send`, `pending`) with lines
//! carrying the same `id`. A reader task turns the event lines into [`ordo_client::Event`]s and
//! routes the answers to their callers. A crash is a SIGKILL: what the SQLite file holds is all
//! that survives, and the device is opened again by starting a new process on the same file.
//!
//! The SDK records a message as taken when the app asks for the next event, so a SIGKILL right
//! after a message line was printed may hand that message again after the restart (the SDK
//! documents this). [`Ended::may_repeat`] names that message when the last event line of the
//! process was one, and the ledger allows its repeat, once.

use ordo_client::{Event, Message, Status, Target};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// The device script, relative to the SDK's directory.
pub const SCRIPT: &str = "dist/tools/check-device.js";
/// Longest wait for a new process to open its client.
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for the answer to a command (a send waits for an fsync of the SQLite file).
const COMMAND_WAIT: Duration = Duration::from_secs(20);
/// Longest wait for a SIGKILLed process to be gone and its output to end.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// How to run the device script: found and checked once, before the run.
#[derive(Clone, Debug)]
pub struct Runtime {
    script: PathBuf,
    /// Node before 22 has the global WebSocket only behind `--experimental-websocket`.
    websocket_flag: bool,
}

/// The SDK's directory: `given` (`--ts-sdk` or `ORDO_TS_SDK`), else `sdk/typescript` found from
/// the current directory upwards, else from the `ordo` binary's directory upwards (the binary
/// of a build is `<repo>/target/<profile>/ordo`).
pub fn find_sdk(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(dir) = given {
        return Ok(dir.to_path_buf());
    }
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    let starts: Vec<&Path> = cwd.iter().chain(exe.iter()).map(PathBuf::as_path).collect();
    starts
        .iter()
        .flat_map(|p| p.ancestors())
        .map(|a| a.join("sdk/typescript"))
        .find(|d| d.join("package.json").is_file())
        .ok_or_else(|| {
            format!(
                "cannot find the TypeScript SDK (sdk/typescript) above {}: pass --ts-sdk DIR or set ORDO_TS_SDK",
                starts
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// Checks that `sdk` is built and that Node runs; how to start the device script.
pub async fn runtime(sdk: &Path) -> Result<Runtime, String> {
    let script = sdk.join(SCRIPT);
    if !script.is_file() {
        return Err(format!(
            "{} is missing: build the TypeScript SDK with `npm ci && npx tsc -p .` in {}",
            script.display(),
            sdk.display()
        ));
    }
    if !sdk.join("node_modules/better-sqlite3").is_dir() {
        return Err(format!(
            "the TypeScript SDK's dependencies (better-sqlite3) are not installed: run `npm ci` in {}",
            sdk.display()
        ));
    }
    let out = timeout(
        Duration::from_secs(20),
        Command::new("node").arg("--version").output(),
    )
    .await
    .map_err(|_| "`node --version` did not answer within 20 s".to_string())?
    .map_err(|e| format!("cannot run node ({e}): install Node.js 20.10 or later"))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| {
            format!("`node --version` said {version:?}: install Node.js 20.10 or later")
        })?;
    if major < 20 {
        return Err(format!(
            "node is {version}: the TypeScript SDK needs Node.js 20.10 or later"
        ));
    }
    Ok(Runtime {
        script,
        websocket_flag: major < 22,
    })
}

/// One TypeScript device: what its process is started with.
#[derive(Clone, Debug)]
pub struct Spec {
    pub runtime: Runtime,
    /// Comma-separated server URLs.
    pub urls: String,
    pub token: String,
    pub store: PathBuf,
    /// `user/device`, for the log.
    pub name: String,
}

/// What the reader task passes on.
enum Out {
    Event(Event),
    /// Standard output ended (the process is gone); `last_message`: its last event line was
    /// this message.
    Exited {
        last_message: Option<Message>,
    },
}

type Replies = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A running device process.
pub struct TsDevice {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Out>,
    replies: Replies,
    next_id: u64,
    /// The process's standard output ended: the last message line, if its last event was one.
    exited: Option<Option<Message>>,
    /// Why the process is taken for dead although it may still run (a command went unanswered).
    hung: Option<String>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_task: tokio::task::JoinHandle<()>,
}

/// What is left of a device process once it is gone.
pub struct Ended {
    /// Events it printed that the caller had not taken yet, in order.
    pub events: Vec<Event>,
    /// The message it may hand again after a restart (see the module doc).
    pub may_repeat: Option<Message>,
    /// How it ended, with the last lines of its standard error.
    pub how: String,
}

impl TsDevice {
    /// Starts the process and waits until its client is open.
    pub async fn open(spec: &Spec) -> Result<TsDevice, String> {
        let mut cmd = Command::new("node");
        if spec.runtime.websocket_flag {
            cmd.arg("--experimental-websocket");
        }
        cmd.arg(&spec.runtime.script)
            .arg(&spec.urls)
            .arg(&spec.token)
            .arg(&spec.store)
            // Only Node's own warnings (the experimental WebSocket on every start).
            .env("NODE_NO_WARNINGS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run node ({e}): install Node.js 20.10 or later"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("the device process has no pipes".into());
        };
        let (tx, events) = mpsc::unbounded_channel();
        let (ready_tx, ready) = oneshot::channel();
        let replies = Replies::default();
        tokio::spawn(read_stdout(
            stdout,
            tx,
            replies.clone(),
            ready_tx,
            spec.name.clone(),
        ));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_task = tokio::spawn(read_stderr(stderr, stderr_tail.clone(), spec.name.clone()));
        let dev = TsDevice {
            name: spec.name.clone(),
            child,
            stdin: Some(stdin),
            events,
            replies,
            next_id: 1,
            exited: None,
            hung: None,
            stderr_tail,
            stderr_task,
        };
        let why = match timeout(OPEN_WAIT, ready).await {
            Ok(Ok(())) => return Ok(dev),
            Ok(Err(_)) => "exited before its client was open".to_string(),
            Err(_) => format!("did not open its client within {} s", OPEN_WAIT.as_secs()),
        };
        Err(format!("{} {why}: {}", spec.name, dev.kill().await.how))
    }

    /// The next event it printed; `None` once the process is gone or taken for dead (then
    /// [`kill`](Self::kill) says how it ended). Cancel-safe.
    pub async fn next_event(&mut self) -> Option<Event> {
        if self.exited.is_some() || self.hung.is_some() {
            return None;
        }
        match self.events.recv().await {
            Some(Out::Event(e)) => Some(e),
            Some(Out::Exited { last_message }) => {
                self.exited = Some(last_message);
                None
            }
            None => {
                self.exited = Some(None);
                None
            }
        }
    }

    /// Queues a message; its client message id once it is in the outbox on disk.
    pub async fn send(&mut self, target: Target, body: String) -> Result<String, String> {
        let target = match target {
            Target::Conv(c) => json!({ "conv": c }),
            Target::User(u) => json!({ "user": u }),
        };
        let v = self
            .command(json!({ "send": { "target": target, "body": body } }))
            .await?;
        match v["cmid"].as_str() {
            Some(cmid) => Ok(cmid.to_string()),
            None => Err(answer_error(&v)),
        }
    }

    /// Messages in its outbox.
    pub async fn pending(&mut self) -> Result<u64, String> {
        let v = self.command(json!({ "pending": true })).await?;
        v["pending"].as_u64().ok_or_else(|| answer_error(&v))
    }

    async fn command(&mut self, mut cmd: Value) -> Result<Value, String> {
        if let Some(why) = &self.hung {
            return Err(why.clone());
        }
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(format!("{} is closed", self.name));
        };
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = id.into();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut r) = self.replies.lock() {
            r.insert(id, tx);
        }
        let line = format!("{cmd}\n");
        let name = &self.name;
        let asked = async {
            stdin
                .write_all(line.as_bytes())
                .await
                .map_err(|e| format!("cannot write to {name}: {e}"))?;
            rx.await
                .map_err(|_| format!("{name} exited before answering"))
        };
        match timeout(COMMAND_WAIT, asked).await {
            Ok(answer) => answer,
            Err(_) => {
                let why = format!(
                    "{} answered no command within {} s",
                    self.name,
                    COMMAND_WAIT.as_secs()
                );
                self.hung = Some(why.clone());
                Err(why)
            }
        }
    }

    /// SIGKILLs the process (if it still runs), waits until it is gone and its output has
    /// ended, and returns what it left.
    pub async fn kill(mut self) -> Ended {
        let _ = self.child.start_kill();
        self.stdin = None;
        let mut how = match timeout(EXIT_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("cannot wait for it: {e}"),
            Err(_) => format!("still running {} s after SIGKILL", EXIT_WAIT.as_secs()),
        };
        if let Some(why) = &self.hung {
            how = format!("{why}; {how}");
        }
        let mut events = Vec::new();
        let may_repeat = match self.exited.take() {
            Some(last) => last,
            None => loop {
                match timeout(EXIT_WAIT, self.events.recv()).await {
                    Ok(Some(Out::Event(e))) => events.push(e),
                    Ok(Some(Out::Exited { last_message })) => break last_message,
                    Ok(None) => break None,
                    Err(_) => {
                        how.push_str("; its output did not end");
                        break None;
                    }
                }
            },
        };
        let _ = timeout(Duration::from_secs(1), &mut self.stderr_task).await;
        if let Ok(tail) = self.stderr_tail.lock() {
            if !tail.is_empty() {
                how = format!(
                    "{how}; its last words: {}",
                    tail.iter().cloned().collect::<Vec<_>>().join(" | ")
                );
            }
        }
        Ended {
            events,
            may_repeat,
            how,
        }
    }
}

fn answer_error(v: &Value) -> String {
    v["error"]
        .as_str()
        .map_or_else(|| format!("an answer not understood: {v}"), str::to_string)
}

/// Reads the process's standard output to its end: events to `events`, answers to their
/// callers, the ready line to `ready`; then says it ended.
async fn read_stdout(
    stdout: tokio::process::ChildStdout,
    events: mpsc::UnboundedSender<Out>,
    replies: Replies,
    ready: oneshot::Sender<()>,
    name: String,
) {
    let mut ready = Some(ready);
    let mut last_message = None;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                eprintln!("ordo check: {name}: cannot read its output: {e}");
                break;
            }
        };
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("ordo check: {name}: a line that is not JSON ({e}): {line}");
                continue;
            }
        };
        if let Some(ev) = v.get("event") {
            last_message = None;
            match to_event(ev.clone()) {
                Ok(ev) => {
                    if let Event::Message(m) = &ev {
                        last_message = Some(m.clone());
                    }
                    let _ = events.send(Out::Event(ev));
                }
                Err(e) => eprintln!("ordo check: {name}: an event not understood ({e}): {line}"),
            }
        } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
            let tx = replies.lock().ok().and_then(|mut r| r.remove(&id));
            if let Some(tx) = tx {
                let _ = tx.send(v);
            }
        } else if v.get("ready") == Some(&Value::Bool(true)) {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
        } else {
            eprintln!("ordo check: {name}: a line not understood: {line}");
        }
    }
    if let Ok(mut r) = replies.lock() {
        r.clear();
    }
    let _ = events.send(Out::Exited { last_message });
}

/// Shows the process's standard error, each line under its device's name, and keeps the
/// last few to say how it ended.
async fn read_stderr(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    name: String,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        eprintln!("ordo check: {name}: {line}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == 3 {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

/// An event as the TypeScript SDK writes it (`src/state.ts`).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TsEvent {
    Message {
        message: Message,
    },
    Removed {
        conv: String,
        seq: u64,
        left: bool,
    },
    Status {
        cmid: String,
        conv: Option<String>,
        status: TsStatus,
    },
    Receipt {
        conv: String,
        user: String,
        delivered: u64,
        read: u64,
    },
    HistoryGap {
        conv: String,
        from: u64,
        to: u64,
    },
    EpochReset {
        conv: String,
        epoch: u64,
    },
    ServerError {
        code: Value,
        message: String,
    },
    Connected,
    Disconnected,
    ConnectFailed {
        reason: String,
        unauthorized: bool,
    },
}

#[derive(Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum TsStatus {
    Pending,
    Sent { seq: u64 },
    Delivered,
    Read,
    Failed { reason: String },
}

/// The Rust SDK's event for a TypeScript SDK's event.
fn to_event(v: Value) -> Result<Event, serde_json::Error> {
    Ok(match serde_json::from_value(v)? {
        TsEvent::Message { message } => Event::Message(message),
        TsEvent::Removed { conv, seq, left } => Event::Removed { conv, seq, left },
        TsEvent::Status { cmid, conv, status } => Event::Status {
            cmid,
            conv,
            status: match status {
                TsStatus::Pending => Status::Pending,
                TsStatus::Sent { seq } => Status::Sent(seq),
                TsStatus::Delivered => Status::Delivered,
                TsStatus::Read => Status::Read,
                TsStatus::Failed { reason } => Status::Failed(reason),
            },
        },
        TsEvent::Receipt {
            conv,
            user,
            delivered,
            read,
        } => Event::Receipt {
            conv,
            user,
            delivered,
            read,
        },
        TsEvent::HistoryGap { conv, from, to } => Event::HistoryGap { conv, from, to },
        TsEvent::EpochReset { conv, epoch } => Event::EpochReset { conv, epoch },
        TsEvent::ServerError { code, message } => Event::ServerError {
            code: serde_json::from_value(code)?,
            message,
        },
        TsEvent::Connected => Event::Connected,
        TsEvent::Disconnected => Event::Disconnected,
        TsEvent::ConnectFailed {
            reason,
            unauthorized,
        } => Event::ConnectFailed {
            reason,
            unauthorized,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_convert_from_the_typescript_shapes() {
        let m = to_event(json!({"type": "message", "message": {
            "conv": "g", "seq": 3, "from": "u0", "device": "t0", "cmid": "t0-1",
            "body": "u0/t0#1", "ts": 17, "event": {"kind": "joined", "users": ["u1"]}
        }}))
        .unwrap();
        match m {
            Event::Message(m) => {
                assert_eq!((m.conv.as_str(), m.seq, m.cmid.as_str()), ("g", 3, "t0-1"));
                assert!(m.event.is_some() && m.reply_to.is_none());
            }
            other => panic!("{other:?}"),
        }
        let s = to_event(json!({"type": "status", "cmid": "c", "conv": "g",
            "status": {"state": "sent", "seq": 9}}))
        .unwrap();
        assert_eq!(
            s,
            Event::Status {
                cmid: "c".into(),
                conv: Some("g".into()),
                status: Status::Sent(9)
            }
        );
        let s = to_event(json!({"type": "status", "cmid": "c", "conv": null,
            "status": {"state": "failed", "reason": "no"}}))
        .unwrap();
        assert!(matches!(
            s,
            Event::Status {
                conv: None,
                status: Status::Failed(_),
                ..
            }
        ));
        let f = to_event(json!({"type": "connect_failed", "reason": "r",
            "unauthorized": false, "permanent": true}))
        .unwrap();
        assert!(matches!(f, Event::ConnectFailed { .. }));
        let e = to_event(json!({"type": "server_error", "code": "not_found", "message": "m"}));
        assert!(matches!(e, Ok(Event::ServerError { .. })));
        assert!(to_event(json!({"type": "receipt", "conv": "g", "user": "u"})).is_err());
    }
}
