//! TLS: a server started with a certificate from a test CA made here serves `wss://` (the SDK
//! connects with `--ca`, and its messages go through) and nothing in plain text; a client that
//! does not trust the CA is refused; SIGHUP takes up a new certificate for new connections
//! while a connection made before stays open and usable.

use super::common::*;
use ordo_client::{Client as SdkClient, ClientOptions, Event, Status, Target};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA, and a certificate for `localhost` and 127.0.0.1 signed by it, each new: their PEM
/// files in `dir` (`ca.pem`, `cert.pem`, `key.pem`); returns the certificate's DER.
fn make_certs(dir: &Path, ca: &(CertificateParams, KeyPair)) -> CertificateDer<'static> {
    let key = KeyPair::generate().expect("key");
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let issuer = Issuer::from_params(&ca.0, &ca.1);
    let cert = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    cert.der().clone()
}

fn make_ca(dir: &Path) -> (CertificateParams, KeyPair) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("self-sign");
    std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
    (params, key)
}

/// The provider the product uses (ring).
#[allow(deprecated)]
fn tls_client(roots: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

/// The certificate the server on `port` shows a new connection, and its `/healthz` status line.
async fn handshake(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(CertificateDer<'static>, String), String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    Ok((cert, answer.lines().next().unwrap_or("").to_string()))
}

struct TlsServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    certs: PathBuf,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(certs: &Path, ca: Arc<rustls::ClientConfig>) -> TlsServer {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_ordo"))
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data")
        .arg(dir.path().join("data"))
        .args(["--secret", SECRET, "--admin-key", "tls-test-admin-key"])
        .args(["--rate-per-sec", "0"])
        .arg("--tls-cert")
        .arg(certs.join("cert.pem"))
        .arg("--tls-key")
        .arg(certs.join("key.pem"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ordo");
    let server = TlsServer {
        child,
        port,
        _dir: dir,
        certs: certs.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((_, status)) = handshake(port, ca.clone()).await {
            assert!(status.contains("200"), "{status}");
            return server;
        }
        assert!(Instant::now() < deadline, "the TLS server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sdk(server: &TlsServer, user: &str, dir: &Path) -> SdkClient {
    let mut opts = ClientOptions::new(
        format!("wss://localhost:{}", server.port),
        token(user, "phone"),
        dir.join(format!("{user}.redb")),
    );
    opts.ca = Some(server.certs.join("ca.pem"));
    SdkClient::open(opts).await.expect("open the SDK client")
}

/// Waits until `cmid` is at least sent (accepted by the server).
async fn sent(c: &mut SdkClient, cmid: &str) {
    loop {
        match tokio::time::timeout(WAIT, c.next_event()).await {
            Err(_) => panic!("{cmid} was not accepted in time"),
            Ok(None) => panic!("client closed"),
            Ok(Some(Event::Status {
                cmid: c2, status, ..
            })) if c2 == cmid => match status {
                Status::Pending => {}
                Status::Failed(r) => panic!("{cmid} failed: {r}"),
                _ => return,
            },
            Ok(Some(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_server_serves_wss_only_and_takes_a_new_certificate_on_sighup() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path());
    let first = make_certs(certs.path(), &ca);
    let ca_der = CertificateDer::from_pem_file(certs.path().join("ca.pem")).unwrap();
    let trusting = tls_client(std::slice::from_ref(&ca_der));
    let server = start(certs.path(), trusting.clone()).await;

    // The SDK over wss://, trusting the test CA.
    let clients = tempfile::tempdir().unwrap();
    let mut alice = sdk(&server, "alice", clients.path()).await;
    let cmid = alice
        .send(Target::User("bob".into()), "over TLS")
        .await
        .unwrap();
    sent(&mut alice, &cmid).await;

    // Plain text gets nothing; a client that does not trust the CA is refused.
    let plain = format!("ws://127.0.0.1:{}/v1/ws", server.port);
    assert!(tokio_tungstenite::connect_async(plain).await.is_err());
    let (other_ca, _) = {
        let d = tempfile::tempdir().unwrap();
        let (p, k) = make_ca(d.path());
        (p.self_signed(&k).unwrap().der().clone(), d)
    };
    let err = handshake(server.port, tls_client(&[other_ca]))
        .await
        .unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");

    // A new certificate, taken up on SIGHUP by new connections.
    let (shown, _) = handshake(server.port, trusting.clone()).await.unwrap();
    assert_eq!(shown, first);
    let second = make_certs(certs.path(), &ca);
    assert_ne!(second, first);
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (shown, status) = handshake(server.port, trusting.clone()).await.unwrap();
        assert!(status.contains("200"), "{status}");
        if shown == second {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not taken up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection made before is still open and usable.
    let cmid = alice
        .send(Target::User("bob".into()), "still here")
        .await
        .unwrap();
    sent(&mut alice, &cmid).await;

    // `ordo send` over wss:// with --ca.
    let out = Command::new(env!("CARGO_BIN_EXE_ordo"))
        .args([
            "send",
            "--server",
            &format!("wss://localhost:{}", server.port),
        ])
        .args(["--token", &token("carol", "laptop"), "--to", "bob"])
        .arg("--ca")
        .arg(certs.path().join("ca.pem"))
        .args(["--timeout-secs", "20", "from the command line"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
