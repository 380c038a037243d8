//! Many idle sockets from one address lock nobody else out: 19,000 TCP connections from
//! 127.0.0.2 that never send a byte (no token, not even a request) leave `/healthz` answering
//! and a client on 127.0.0.1 sending. The server keeps at most `max_pending_per_ip` of them and
//! closes the rest as they arrive, and those it keeps are closed after `handshake_timeout_secs`.
//! (Its own test binary: the 19,000 sockets need most of this process's open-file limit.)

use ordo_testkit::device::{Device, Target};
use ordo_testkit::{ServerOptions, ServerProcess};
use std::time::{Duration, Instant};

const IDLE_SOCKETS: usize = 19_000;

#[tokio::test(flavor = "multi_thread")]
async fn idle_sockets_from_one_address_lock_nobody_else_out() {
    // The server runs with 4,096 open files, so that the idle sockets would take them all
    // if it kept them (a server with no limits is locked out by fewer than that).
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("ordo-4096-files");
    std::fs::write(
        &exe,
        format!(
            "#!/bin/sh\nulimit -n 4096 || exit 1\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_ordo")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let server = tokio::task::block_in_place(|| ServerProcess::start(ServerOptions::new(&exe)))
        .expect("start ordo");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let mut idle = Vec::with_capacity(IDLE_SOCKETS);
    let mut refused = 0;
    for _ in 0..IDLE_SOCKETS {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        match tokio::time::timeout(Duration::from_secs(5), sock.connect(addr)).await {
            Ok(Ok(s)) => idle.push(s),
            _ => refused += 1,
        }
    }
    eprintln!(
        "{} idle sockets connected from 127.0.0.2 ({refused} not)",
        idle.len()
    );

    let started = Instant::now();
    let health = reqwest::Client::new()
        .get(format!("{}/healthz", server.http_url()))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("/healthz answers");
    assert_eq!(health.status(), 200);
    eprintln!("/healthz answered in {:?}", started.elapsed());

    let started = Instant::now();
    let mut alice = Device::connect(&server, "alice", "phone").await;
    let sent = alice
        .send_one(&Target::to("bob"), "m-1", "still here")
        .await;
    assert_eq!(sent.seq(), 1, "{sent:?}");
    eprintln!(
        "a client on 127.0.0.1 connected and sent in {:?}",
        started.elapsed()
    );
    drop(idle);
}
