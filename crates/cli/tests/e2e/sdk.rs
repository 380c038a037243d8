//! The client SDK and the `ordo send` / `ordo tail` commands against the real server: every
//! message exactly once, in order, on every device, through server kills and client kills.

use super::common::*;
use ordo_client::{Client as SdkClient, ClientOptions, Event, Message, Status, Target};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

async fn sdk(server: &Server, user: &str, device: &str, dir: &Path) -> SdkClient {
    let mut opts = ClientOptions::new(
        server.ws_url(),
        token(user, device),
        dir.join(format!("{user}-{device}.redb")),
    );
    // Come back quickly after a server kill, so the test does not wait on long backoffs.
    opts.reconnect.initial_ms = 100;
    opts.reconnect.max_ms = 1000;
    SdkClient::open(opts).await.expect("open the SDK client")
}

/// Takes events until `done` says so, collecting messages; panics after `WAIT` without one.
async fn pump(
    c: &mut SdkClient,
    got: &mut Vec<Message>,
    statuses: &mut HashMap<String, Status>,
    mut done: impl FnMut(&[Message], &HashMap<String, Status>) -> bool,
) {
    while !done(got, statuses) {
        match tokio::time::timeout(WAIT, c.next_event()).await {
            Err(_) => panic!(
                "no event for {WAIT:?}; have {} messages, {} statuses",
                got.len(),
                statuses.len()
            ),
            Ok(None) => panic!("client closed"),
            Ok(Some(Event::Message(m))) => got.push(m),
            Ok(Some(Event::Status { cmid, status, .. })) => {
                if let Status::Failed(r) = &status {
                    panic!("{cmid} failed: {r}");
                }
                statuses.insert(cmid, status);
            }
            Ok(Some(_)) => {}
        }
    }
}

fn assert_exactly_in_order(got: &[Message], n: usize, who: &str) {
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=n as u64).collect::<Vec<_>>(),
        "{who}: every seq once, in order"
    );
    let bodies: Vec<&str> = got.iter().map(|m| m.body.as_str()).collect();
    let want: Vec<String> = (0..n).map(|i| format!("m{i:03}")).collect();
    assert_eq!(bodies, want, "{who}: in the order alice sent them");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_device_gets_every_message_once_in_order_across_server_kills() {
    let mut server = Server::start(&[]).await;
    server
        .create_group("team", &["alice", "bob"], serde_json::json!({}))
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut alice = sdk(&server, "alice", "a1", dir.path()).await;
    let mut bob1 = sdk(&server, "bob", "b1", dir.path()).await;
    let mut bob2 = sdk(&server, "bob", "b2", dir.path()).await;

    const N: usize = 150;
    let mut a_got = Vec::new();
    let mut a_status = HashMap::new();
    for i in 0..N {
        alice
            .send(Target::Conv("team".into()), format!("m{i:03}"))
            .await
            .expect("queued");
        // Kill the server twice while messages are in flight.
        if i == 40 || i == 100 {
            pump(&mut alice, &mut a_got, &mut a_status, |_, s| {
                s.values().filter(|s| matches!(s, Status::Sent(_))).count() >= i / 2
            })
            .await;
            server.kill9();
            server.restart().await;
        }
    }
    pump(&mut alice, &mut a_got, &mut a_status, |g, s| {
        g.len() >= N && s.values().filter(|s| !matches!(s, Status::Pending)).count() >= N
    })
    .await;
    assert_exactly_in_order(&a_got, N, "alice");
    for (name, bob) in [("bob/b1", &mut bob1), ("bob/b2", &mut bob2)] {
        let mut got = Vec::new();
        let mut st = HashMap::new();
        pump(bob, &mut got, &mut st, |g, _| g.len() >= N).await;
        assert_exactly_in_order(&got, N, name);
        // Nothing more arrives: no duplicate after the last one.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    if let Some(Event::Message(m)) = bob.next_event().await {
                        return m;
                    }
                }
            })
            .await
            .is_err(),
            "{name}: a message after all {N}"
        );
    }
    alice.close().await;
    bob1.close().await;
    bob2.close().await;
}

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

/// Every message bob can pull from the direct conversation with alice, via a new device (a
/// fresh SDK store).
async fn bodies_bob_sees(
    server: &Server,
    dir: &Path,
    device: &str,
    expect_at_least: usize,
) -> Vec<String> {
    let mut bob = sdk(server, "bob", device, dir).await;
    let mut got = Vec::new();
    let mut st = HashMap::new();
    pump(&mut bob, &mut got, &mut st, |g, _| {
        g.len() >= expect_at_least
    })
    .await;
    // Let anything extra (a duplicate) show up.
    let deadline = Instant::now() + Duration::from_millis(700);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(100), bob.next_event()).await {
            Ok(Some(Event::Message(m))) => got.push(m),
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    bob.close().await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=got.len() as u64).collect::<Vec<_>>());
    got.into_iter().map(|m| m.body).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_killed_with_pending_messages_delivers_each_exactly_once() {
    let mut server = Server::start(&[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("alice-cli.redb");
    let store_s = store.to_str().expect("utf-8 path").to_string();
    let alice = token("alice", "cli");
    let url = server.ws_url();

    // 1. The server is down: `ordo send` can only queue. Kill it with its messages pending.
    server.kill9();
    let mut child: Child = ordo(&[
        "send",
        "--server",
        &url,
        "--token",
        &alice,
        "--to",
        "bob",
        "--store",
        &store_s,
        "--verbose",
        "p1",
        "p2",
        "p3",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn ordo send");
    // Wait until it says all three are queued (in the outbox on disk), then kill it.
    let stderr = child.stderr.take().expect("piped stderr");
    let queued = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("3 message(s) queued"))
    })
    .await
    .expect("reader");
    assert!(queued.is_some(), "ordo send never reported the queue");
    child.kill().expect("SIGKILL ordo send");
    child.wait().expect("reap");
    let outbox = ordo_client::LocalStore::open(&store)
        .and_then(|s| s.snapshot())
        .expect("read the killed client's store")
        .outbox;
    assert_eq!(outbox.len(), 3, "all three pending on disk");

    // 2. Server back; a new run on the same store sends the leftovers first, then its own.
    server.restart().await;
    let out = ordo(&[
        "send", "--server", &url, "--token", &alice, "--to", "bob", "--store", &store_s, "p4",
    ])
    .output()
    .expect("run ordo send");
    assert!(
        out.status.success(),
        "ordo send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        bodies_bob_sees(&server, dir.path(), "check1", 4).await,
        ["p1", "p2", "p3", "p4"]
    );

    // 3. Killed mid-stream while the server is up: some accepted, some not; a rerun with no
    //    new text flushes the rest. Every queued message arrives once, in order.
    let texts: Vec<String> = (0..200).map(|i| format!("q{i:03}")).collect();
    let mut args = vec![
        "send", "--server", &url, "--token", &alice, "--to", "bob", "--store", &store_s,
    ];
    args.extend(texts.iter().map(String::as_str));
    let mut child = ordo(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ordo send");
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.kill().expect("SIGKILL ordo send");
    child.wait().expect("reap");
    let out = ordo(&[
        "send", "--server", &url, "--token", &alice, "--to", "bob", "--store", &store_s,
    ])
    .output()
    .expect("run ordo send");
    assert!(
        out.status.success(),
        "flushing the outbox failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = bodies_bob_sees(&server, dir.path(), "check2", 5).await;
    assert_eq!(&seen[..4], ["p1", "p2", "p3", "p4"]);
    let rest = &seen[4..];
    assert_eq!(
        rest,
        &texts[..rest.len()],
        "a prefix of the 200, each once, in order"
    );
}

/// Reads JSON lines from a `tail` child until `n` arrived.
fn read_lines(child: &mut Child, n: usize) -> Vec<serde_json::Value> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    while out.len() < n {
        let line = rx.recv_timeout(WAIT).expect("a line from ordo tail");
        out.push(serde_json::from_str(&line).expect("a JSON line"));
    }
    // Anything more within a moment would be a duplicate.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(700)) {
        out.push(serde_json::from_str(&line).expect("a JSON line"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_tail_prints_only_what_it_had_not_printed() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("bob-tail.redb");
    let bob = token("bob", "tail");
    let url = server.ws_url();
    let tail = |store: &Path| {
        ordo(&[
            "tail",
            "--server",
            &url,
            "--token",
            &bob,
            "--store",
            store.to_str().expect("utf-8 path"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ordo tail")
    };
    let mut alice = sdk(&server, "alice", "a1", dir.path()).await;
    let mut a_got = Vec::new();
    let mut a_st = HashMap::new();

    let mut t = tail(&store);
    for i in 0..20 {
        alice
            .send(Target::User("bob".into()), format!("m{i:03}"))
            .await
            .expect("queued");
    }
    let first = tokio::task::spawn_blocking(move || {
        let lines = read_lines(&mut t, 20);
        t.kill().expect("SIGKILL tail");
        t.wait().expect("reap");
        lines
    })
    .await
    .expect("reader");
    let seqs: Vec<u64> = first
        .iter()
        .map(|l| l["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    // The protocol's field names (docs/protocol.md, `msg`).
    assert_eq!(first[0]["from"], "alice");
    assert_eq!(first[0]["body"], "m000");
    assert!(first[0]["cmid"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(first[0]["conv"]
        .as_str()
        .is_some_and(|c| c.starts_with("d_")));

    for i in 20..30 {
        alice
            .send(Target::User("bob".into()), format!("m{i:03}"))
            .await
            .expect("queued");
    }
    pump(&mut alice, &mut a_got, &mut a_st, |_, s| {
        s.values().filter(|s| !matches!(s, Status::Pending)).count() >= 30
    })
    .await;
    let mut t = tail(&store);
    let second = tokio::task::spawn_blocking(move || {
        let lines = read_lines(&mut t, 10);
        t.kill().expect("SIGKILL tail");
        t.wait().expect("reap");
        lines
    })
    .await
    .expect("reader");
    let seqs: Vec<u64> = second
        .iter()
        .map(|l| l["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (21..=30).collect::<Vec<_>>(),
        "only the new ones, once"
    );
    alice.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_ends_send_and_tail_with_the_reason() {
    let server = Server::start(&[]).await;
    let url = server.ws_url();
    for cmd in [
        vec![
            "send",
            "--server",
            &url,
            "--token",
            "bad.token",
            "--to",
            "bob",
            "hi",
        ],
        vec![
            "tail",
            "--server",
            &url,
            "--token",
            "bad.token",
            "--store",
            "/nonexistent-dir/x",
        ],
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("t.redb");
        let mut args = cmd.clone();
        if args[0] == "tail" {
            args[6] = store.to_str().expect("utf-8 path");
        }
        let out = ordo(&args).output().expect("run ordo");
        assert!(!out.status.success(), "{} must fail", args[0]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("401") && err.contains("token"),
            "{}: the reason names the refused token: {err}",
            args[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_shows_each_state_of_a_message() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = server.ws_url();
    let alice = token("alice", "chat");
    let mut child = ordo(&["chat", "--server", &url, "--token", &alice, "--to", "bob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ordo chat");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| loop {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no line with {what:?}"));
        if line.contains(what) {
            return line;
        }
    };
    wait_for("(connected)");
    use std::io::Write;
    writeln!(stdin, "hello bob").expect("type a line");
    stdin.flush().expect("flush");
    wait_for("[pending] hello bob");
    wait_for("[sent #1] hello bob");

    // Bob's device takes the message and reads it: alice's chat shows delivered, then read.
    let mut bob = sdk(&server, "bob", "b1", dir.path()).await;
    let mut got = Vec::new();
    let mut st = HashMap::new();
    pump(&mut bob, &mut got, &mut st, |g, _| !g.is_empty()).await;
    assert_eq!(got[0].body, "hello bob");
    wait_for("[delivered] hello bob");
    bob.mark_read(&got[0].conv, got[0].seq).expect("mark read");
    wait_for("[read] hello bob");

    // Bob answers; alice's chat prints it.
    bob.send(Target::User("alice".into()), "hi alice")
        .await
        .expect("queued");
    let line = wait_for("hi alice");
    assert!(line.contains("2 bob: hi alice"), "{line}");
    drop(stdin); // Ctrl-D
    let status = tokio::task::spawn_blocking(move || child.wait().expect("wait chat"))
        .await
        .expect("join");
    assert!(status.success());
    bob.close().await;
}
