//! A failed commit is fail-stop: the waiting sender is told to retry (`unavailable`), the server
//! stops with an error, and after a restart on the same data nothing was lost, nothing half
//! written is visible, and numbering continues without a hole. A store that cannot be reached
//! is waited out instead: the batch is tried again until it goes through, and meanwhile new
//! sends are refused with `unavailable` and a time to retry after.

use futures_util::{SinkExt, StreamExt};
use ordo_core::{
    AgeSweep, Batch, CommitOutcome, ConvState, DedupRecord, Expired, GroupPage, MemberPage,
    MemberPageAsk, Snapshot,
};
use ordo_server::auth::{Claims, TokenKey};
use ordo_server::{start_with_store, Config, ServerError};
use ordo_store::{DedupScan, Page, ScanFrom, Store, StoreError};
use ordo_store_redb::RedbStore;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The real embedded store, with a switch that makes every further commit fail like a disk
/// error would, and one that makes it fail as a database server that cannot be reached would
/// (nothing taken; `refused` counts those commits).
struct FailingStore {
    inner: RedbStore,
    fail: Arc<AtomicBool>,
    unreachable: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

impl Store for FailingStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn load_convs(&self, ids: &[String]) -> Result<Vec<Option<ConvState>>, StoreError> {
        self.inner.load_convs(ids)
    }

    fn member_convs(&self, ask: &MemberPageAsk) -> Result<MemberPage, StoreError> {
        self.inner.member_convs(ask)
    }

    fn groups(&self, after: Option<&str>, limit: usize) -> Result<GroupPage, StoreError> {
        self.inner.groups(after, limit)
    }

    fn commit(&self, batch: std::sync::Arc<Batch>) -> Result<CommitOutcome, StoreError> {
        if self.fail.load(Ordering::SeqCst) && !batch.is_empty() {
            return Err(StoreError::Io {
                path: "ordo.redb".into(),
                source: std::io::Error::other("injected: disk write failed"),
            });
        }
        if self.unreachable.load(Ordering::SeqCst) && !batch.is_empty() {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unreachable(
                "injected: db.internal:5432 refused the connection".into(),
            ));
        }
        self.inner.commit(batch)
    }

    fn read_page(
        &self,
        conv: &str,
        from: u64,
        to: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        self.inner.read_page(conv, from, to, limit, max_bytes)
    }

    fn dedup_lookup(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<DedupRecord>>, StoreError> {
        self.inner.dedup_lookup(keys)
    }

    fn expired(&self, sweep: &AgeSweep) -> Result<Expired, StoreError> {
        self.inner.expired(sweep)
    }

    fn dedup_scan(&self, from: Option<ScanFrom>, max: usize) -> Result<DedupScan, StoreError> {
        self.inner.dedup_scan(from, max)
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: std::net::SocketAddr, user: &str) -> Ws {
    let token = TokenKey::new(b"secret")
        .sign(&Claims {
            user: user.into(),
            device: "d1".into(),
            exp: u64::MAX / 2,
            iat: None,
        })
        .unwrap();
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}"))
        .await
        .unwrap();
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next frame of the given type, skipping others.
async fn next_of(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a frame in time")
            .expect("connection open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == ty {
                return v;
            }
        }
    }
}

fn config(dir: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.to_path_buf(),
        secret: Some("secret".into()),
        admin_key: Some("admin".into()),
        ..Config::default()
    }
}

async fn open_store(dir: &std::path::Path, fail: Arc<AtomicBool>) -> Arc<dyn Store> {
    open_switched(dir, fail, Arc::default(), Arc::default()).await
}

async fn open_switched(
    dir: &std::path::Path,
    fail: Arc<AtomicBool>,
    unreachable: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
) -> Arc<dyn Store> {
    // The previous server's store may take a moment to be dropped and release its lock.
    for _ in 0..100 {
        if let Ok(inner) = RedbStore::open(dir) {
            return Arc::new(FailingStore {
                inner,
                fail,
                unreachable,
                refused,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("store still locked");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_commit_stops_the_server_and_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let server = start_with_store(
        config(dir.path()),
        open_store(dir.path(), fail.clone()).await,
    )
    .await
    .unwrap();
    let mut ws = connect(server.local_addr(), "alice").await;
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m1","body":"one"}),
    )
    .await;
    let a = next_of(&mut ws, "accepted").await;
    assert_eq!(a["seq"], 1);

    fail.store(true, Ordering::SeqCst);
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m2","body":"two"}),
    )
    .await;
    let r = next_of(&mut ws, "rejected").await;
    assert_eq!(r["cmid"], "m2");
    assert_eq!(r["code"], "unavailable");
    assert_eq!(r["retryable"], true);
    let stopped = tokio::time::timeout(Duration::from_secs(20), server.wait())
        .await
        .expect("the server stops by itself");
    assert!(
        matches!(stopped, Err(ServerError::Store(_))),
        "stops with the storage error, got {stopped:?}"
    );

    // Restart on the same data: m1 is there, m2 is not, and m2's resend takes seq 2.
    fail.store(false, Ordering::SeqCst);
    let server = start_with_store(config(dir.path()), open_store(dir.path(), fail).await)
        .await
        .unwrap();
    let mut ws = connect(server.local_addr(), "alice").await;
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m1","body":"one"}),
    )
    .await;
    let a = next_of(&mut ws, "accepted").await;
    assert_eq!(
        (a["cmid"].clone(), a["seq"].clone()),
        (json!("m1"), json!(1))
    );
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m2","body":"two"}),
    )
    .await;
    let a = next_of(&mut ws, "accepted").await;
    assert_eq!(
        (a["cmid"].clone(), a["seq"].clone()),
        (json!("m2"), json!(2))
    );
    let conv = a["conv"].as_str().unwrap().to_string();
    send(&mut ws, json!({"type":"sync","conv":conv,"after":0})).await;
    let page = next_of(&mut ws, "synced").await;
    let got: Vec<(String, u64)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["cmid"].as_str().unwrap().to_string(),
                m["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![("m1".to_string(), 1), ("m2".to_string(), 2)]);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_cannot_be_reached_is_waited_out_and_new_sends_are_refused_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (unreachable, refused) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let store = open_switched(
        dir.path(),
        Arc::default(),
        unreachable.clone(),
        refused.clone(),
    )
    .await;
    let server = start_with_store(config(dir.path()), store).await.unwrap();
    let mut ws = connect(server.local_addr(), "alice").await;
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m1","body":"one"}),
    )
    .await;
    assert_eq!(next_of(&mut ws, "accepted").await["seq"], 1);

    // The database goes away: m2's batch cannot be committed, and is tried again.
    unreachable.store(true, Ordering::SeqCst);
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m2","body":"two"}),
    )
    .await;
    // Tried twice: the first failure has reached the router (which reads it before any frame).
    while refused.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m3","body":"three"}),
    )
    .await;
    let r = next_of(&mut ws, "rejected").await;
    assert_eq!(r["cmid"], "m3");
    assert_eq!(r["code"], "unavailable");
    assert_eq!(r["retryable"], true);
    assert_eq!(r["retry_after_ms"], 1000);
    let text = r.to_string();
    assert!(
        !text.contains("db.internal"),
        "the store's address stays on the server: {text}"
    );

    // Back: m2 is accepted (nothing was answered for it before), and m3's resend follows it.
    unreachable.store(false, Ordering::SeqCst);
    let a = next_of(&mut ws, "accepted").await;
    assert_eq!(
        (a["cmid"].clone(), a["seq"].clone()),
        (json!("m2"), json!(2))
    );
    send(
        &mut ws,
        json!({"type":"send","to":"bob","cmid":"m3","body":"three"}),
    )
    .await;
    let a = next_of(&mut ws, "accepted").await;
    assert_eq!(
        (a["cmid"].clone(), a["seq"].clone()),
        (json!("m3"), json!(3))
    );
    assert!(refused.load(Ordering::SeqCst) >= 2);
    server.shutdown().await.unwrap();
}
