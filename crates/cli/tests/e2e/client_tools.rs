//! The client commands (`ordo send`, `tail`, `chat`) when the server cannot be had: a server
//! that is down is reported on stderr at once, with the cause and the next attempt, and not
//! over and over; `send --timeout` gives up with a message that says where the messages are;
//! what retrying cannot mend (a URL that is not a WebSocket URL, one that ends with the
//! endpoint's path, a token the server refuses, a certificate that does not verify) ends each
//! command at once, with a clear message and a non-zero exit, `chat` without waiting for input.
//!
//! The limits below are generous: the tests check what is said and that the commands end
//! long before they would by retrying, not how fast.

use super::common::*;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Far below what retrying would take (`send` gives up after 60 s by default, `tail` and `chat`
/// never), far above what a slow machine needs to start a process.
const PROMPTLY: Duration = Duration::from_secs(30);

fn ordo(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ordo"));
    c.args(args).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("ORDO_") {
            c.env_remove(k);
        }
    }
    c
}

/// A port nothing listens on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The lines `r` gives, as they come.
fn lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (up to [`PROMPTLY`]) for a line of `rx` that contains `what`; the lines before it go
/// into `seen`.
fn wait_line(rx: &mpsc::Receiver<String>, what: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(what) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {what:?} within {PROMPTLY:?}; got {seen:#?}"),
        }
    }
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to its end, which must come within `limit`. Its stdin stays open and empty, so a
/// command that waited for input would not end.
fn run_within(mut cmd: Command, limit: Duration) -> Finished {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ordo");
    let stdin = child.stdin.take();
    let out = read_all(child.stdout.take().expect("stdout"));
    let err = read_all(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            kill(&mut child);
            panic!(
                "still running after {limit:?}; stderr so far: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    Finished {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn send_with_the_server_down_says_why_at_once_and_gives_up_at_its_timeout() {
    let url = format!("ws://127.0.0.1:{}", free_port());
    let alice = token("alice", "cli");
    let refused = format!("cannot connect to {url}: connection refused; retrying in ");
    tokio::task::block_in_place(|| {
        // With its default timeout (60 s), the cause is on stderr long before.
        let mut child = ordo(&[
            "send", "--server", &url, "--token", &alice, "--to", "bob", "hi",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ordo send");
        let err = lines(child.stderr.take().expect("stderr"));
        let line = wait_line(&err, &refused, &mut Vec::new());
        assert!(line.starts_with("ordo send: "), "{line}");
        assert!(
            line.ends_with(" s"),
            "says when the next attempt is: {line}"
        );
        kill(&mut child);

        // --timeout 3, with a store: gives up, says why, and the message waits in the store.
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("alice.redb");
        let store_s = store.to_str().expect("utf-8 path");
        let cmd = ["send", "--server", &url, "--token", &alice, "--to", "bob"];
        let mut with_store = ordo(&cmd);
        with_store.args(["--store", store_s, "--timeout", "3", "hi"]);
        let out = run_within(with_store, PROMPTLY);
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(
            out.stderr.contains("not accepted within 3 s (--timeout)"),
            "{}",
            out.stderr
        );
        assert_eq!(
            out.stderr.matches(&refused).count(),
            1,
            "the same cause is said once, not at every attempt: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&format!(
                "not connected: cannot connect to {url}: connection refused"
            )),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr
                .contains(&format!("stay in the outbox of {store_s}")),
            "{}",
            out.stderr
        );
        let outbox = ordo_client::LocalStore::open(&store)
            .and_then(|s| s.snapshot())
            .expect("read the store")
            .outbox;
        assert_eq!(outbox.len(), 1, "the message waits in the outbox");

        // Without a store: it says the message was not sent.
        let mut temp = ordo(&cmd);
        temp.args(["--timeout", "3", "hi"]);
        let out = run_within(temp, PROMPTLY);
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(
            out.stderr.contains("were not sent and are dropped"),
            "{}",
            out.stderr
        );
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn urls_that_cannot_work_end_send_tail_and_chat_at_once() {
    let server = Server::start(&[]).await;
    let good = server.ws_url();
    let host = good.trim_start_matches("ws://").to_string();
    let alice = token("alice", "cli");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("s.redb");
    let store = store.to_str().expect("utf-8 path");
    let cases = [
        (
            format!("http://{host}"),
            format!("http://{host} is not a WebSocket URL; use {good}"),
        ),
        (
            format!("https://{host}"),
            format!("https://{host} is not a WebSocket URL; use wss://{host}"),
        ),
        (host.clone(), format!("{host} has no scheme; use {good}")),
        (
            format!("{good}/v1/ws"),
            format!("{good}/v1/ws ends with /v1/ws, which the client appends itself; use {good}"),
        ),
    ];
    tokio::task::block_in_place(|| {
        for (url, want) in &cases {
            for cmd in ["send", "tail", "chat"] {
                let mut args = vec![cmd, "--server", url, "--token", &alice];
                match cmd {
                    "send" => args.extend(["--to", "bob", "hi"]),
                    "tail" => args.extend(["--store", store]),
                    _ => args.extend(["--to", "bob"]),
                }
                let out = run_within(ordo(&args), PROMPTLY);
                assert_eq!(
                    out.status.code(),
                    Some(2),
                    "{cmd} {url}: exit 2, a bad argument; stderr: {}",
                    out.stderr
                );
                assert!(
                    out.stderr.contains(&format!("ordo {cmd}: {want}")),
                    "{cmd} {url}: {}",
                    out.stderr
                );
                assert!(!out.stdout.contains("chatting in"), "{}", out.stdout);
            }
        }
    });
}

/// The message of the server's JSON answer to an upgrade with `token`.
async fn refusal(server: &Server, token: &str) -> String {
    let e = match ordo_testkit::wire::WireClient::connect(
        &server.ws_url(),
        token,
        ordo_protocol::Encoding::Json,
    )
    .await
    {
        Ok(_) => panic!("the server took a token signed with another secret"),
        Err(e) => e,
    };
    let ordo_testkit::wire::WireError::Ws(tokio_tungstenite::tungstenite::Error::Http(resp)) = e
    else {
        panic!("expected an HTTP refusal, got {e}");
    };
    assert_eq!(resp.status().as_u16(), 401);
    let body: serde_json::Value =
        serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("a JSON body");
    body["error"]["message"]
        .as_str()
        .expect("a message")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_ends_send_tail_and_chat_at_once_with_the_servers_message() {
    let server = Server::start(&[]).await;
    let url = server.ws_url();
    // Well formed, signed with another secret: only the server can tell.
    let bad = ordo_testkit::token("not-the-servers-secret", "alice", "cli", 3600).expect("sign");
    let message = refusal(&server, &bad).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("s.redb");
    let store = store.to_str().expect("utf-8 path");
    tokio::task::block_in_place(|| {
        for cmd in ["send", "tail", "chat"] {
            let mut args = vec![cmd, "--server", &url, "--token", &bad];
            match cmd {
                "send" => args.extend(["--to", "bob", "hi"]),
                "tail" => args.extend(["--store", store]),
                _ => args.extend(["--to", "bob"]),
            }
            // chat's stdin stays open: it must not wait for a line to notice.
            let out = run_within(ordo(&args), PROMPTLY);
            assert_eq!(out.status.code(), Some(1), "{cmd}: {}", out.stderr);
            let want = format!("ordo {cmd}: {url} refused the token (HTTP 401): {message}");
            assert!(out.stderr.contains(&want), "{cmd}: {}", out.stderr);
            assert!(
                !out.stderr.contains("retrying"),
                "{cmd}: a refused token is not retried: {}",
                out.stderr
            );
            assert!(
                !out.stdout.contains("chatting in"),
                "{cmd}: no chat before the server took the connection: {}",
                out.stdout
            );
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_reports_the_server_down_back_and_gone_again() {
    let mut server = Server::start(&[]).await;
    let url = server.ws_url();
    server.kill9();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("bob.redb");
    let bob = token("bob", "tail");
    let mut child = ordo(&[
        "tail",
        "--server",
        &url,
        "--token",
        &bob,
        "--store",
        store.to_str().expect("utf-8 path"),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn ordo tail");
    let err = lines(child.stderr.take().expect("stderr"));
    let mut seen = Vec::new();
    tokio::task::block_in_place(|| {
        wait_line(
            &err,
            &format!("ordo tail: cannot connect to {url}: connection refused; retrying in "),
            &mut seen,
        )
    });
    server.restart().await;
    assert_eq!(server.ws_url(), url, "the server came back on its port");
    tokio::task::block_in_place(|| {
        wait_line(&err, &format!("ordo tail: connected to {url}"), &mut seen)
    });
    server.kill9();
    let line = tokio::task::block_in_place(|| {
        wait_line(
            &err,
            &format!("ordo tail: lost the connection to {url}: "),
            &mut seen,
        )
    });
    assert!(line.contains("; retrying in "), "{line}");
    kill(&mut child);
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_starts_only_once_the_server_takes_it() {
    let mut server = Server::start(&[]).await;
    let url = server.ws_url();
    server.kill9();
    let alice = token("alice", "chat");
    let mut child = ordo(&["chat", "--server", &url, "--token", &alice, "--to", "bob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ordo chat");
    let stdin = child.stdin.take().expect("stdin");
    let out = lines(child.stdout.take().expect("stdout"));
    let err = lines(child.stderr.take().expect("stderr"));
    tokio::task::block_in_place(|| {
        wait_line(
            &err,
            &format!("ordo chat: cannot connect to {url}: connection refused; retrying in "),
            &mut Vec::new(),
        )
    });
    assert!(
        out.try_recv().is_err(),
        "nothing on stdout (no \"chatting in\") before the server takes the connection"
    );
    server.restart().await;
    assert_eq!(server.ws_url(), url, "the server came back on its port");
    let mut seen = Vec::new();
    let first = tokio::task::block_in_place(|| wait_line(&out, "chatting in", &mut seen));
    assert!(seen.is_empty(), "the first line: {seen:?}");
    assert!(first.contains("as alice"), "{first}");
    tokio::task::block_in_place(|| wait_line(&out, "(connected)", &mut seen));
    drop(stdin); // Ctrl-D
    let status = tokio::task::block_in_place(|| child.wait()).expect("wait chat");
    assert!(status.success());
}

// ----- TLS -----

/// A self-signed certificate for localhost in `dir` (`cert.pem`, `key.pem`), and another CA's
/// certificate (`other-ca.pem`), which does not vouch for it.
fn certs(dir: &Path) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-sign");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
    let other = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&other).expect("self-sign");
    std::fs::write(dir.join("other-ca.pem"), ca.pem()).expect("write");
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_that_does_not_verify_ends_send_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    certs(dir.path());
    let port = free_port();
    let _server = Killed(
        ordo(&["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(["--secret", SECRET, "--admin-key", "client-tools-admin-key"])
            .arg("--tls-cert")
            .arg(dir.path().join("cert.pem"))
            .arg("--tls-key")
            .arg(dir.path().join("key.pem"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ordo serve"),
    );
    let deadline = Instant::now() + PROMPTLY;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the TLS server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("wss://localhost:{port}");
    // A CA is given (so the check does not depend on the system's roots), just not this
    // server's.
    let mut cmd = ordo(&[
        "send",
        "--server",
        &url,
        "--token",
        &token("alice", "cli"),
        "--to",
        "bob",
        "hi",
    ]);
    cmd.arg("--ca").arg(dir.path().join("other-ca.pem"));
    let out = tokio::task::block_in_place(|| run_within(cmd, PROMPTLY));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "ordo send: the TLS certificate of {url} does not verify"
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("retrying"), "{}", out.stderr);
}
