//! A connection to PostgreSQL that breaks, at the worst moments: between the store and the
//! database runs a TCP proxy of the test's own, which can cut a connection right after it
//! passed a commit on (the commit takes effect, its answer is lost), swallow the commit and
//! cut (it does not take effect), or refuse every connection (the database is gone). A commit
//! is the client's write holding a needle: the `COMMIT` of a transaction, or, for a batch the
//! store commits as one statement, a body of the batch. The store
//! must never guess: an unknown outcome is read back, [`StoreError::Unreachable`] means nothing
//! took effect, and giving the same batch again after it stores it exactly once.
//!
//! Each test runs in a schema of its own, dropped after. Without a reachable PostgreSQL the
//! tests are skipped with the reason printed, except in CI (`CI=true`), where they fail.

use ordo_core::Batch;
use ordo_store::conformance::{appended, created};
use ordo_store::{Store, StoreError};
use ordo_store_postgres::test_schema::TestSchema;
use ordo_store_postgres::PgStore;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PG: &str = "127.0.0.1:5432";

/// What the proxy does next.
const PASS: u8 = 0;
/// Passes the next commit on, waits for it to be done, then cuts that connection (once).
const CUT_AFTER_COMMIT: u8 = 1;
/// Swallows the next commit and cuts that connection (once).
const DROP_COMMIT: u8 = 2;
/// Cuts every connection and refuses new ones.
const REFUSE: u8 = 3;
/// As [`CUT_AFTER_COMMIT`], and refuses new connections from then on.
const CUT_AFTER_COMMIT_AND_REFUSE: u8 = 4;
/// As [`DROP_COMMIT`], and refuses new connections from then on.
const DROP_COMMIT_AND_REFUSE: u8 = 5;

struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    /// What marks the write that commits.
    needle: Arc<Mutex<Vec<u8>>>,
    /// Commits cut or swallowed so far.
    fired: Arc<AtomicU8>,
    /// Every connection's two sockets, to cut them all.
    open: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("its address").port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let needle = Arc::new(Mutex::new(b"COMMIT\0".to_vec()));
        let fired = Arc::new(AtomicU8::new(0));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (m, o, n, f) = (mode.clone(), open.clone(), needle.clone(), fired.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if m.load(Ordering::SeqCst) == REFUSE {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(PG) else {
                    continue;
                };
                let pair = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                o.lock().unwrap().push(pair);
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let (mode, needle, fired) = (m.clone(), n.clone(), f.clone());
                let held = Arc::new(AtomicU8::new(0));
                let h2 = held.clone();
                std::thread::spawn(move || pump_up(client, server, mode, needle, held, fired));
                std::thread::spawn(move || pump_down(s2, c2, h2));
            }
        });
        Proxy {
            port,
            mode,
            needle,
            fired,
            open,
        }
    }

    /// The next commit is the write holding `needle`.
    fn commit_marked_by(&self, needle: &[u8]) {
        *self.needle.lock().unwrap() = needle.to_vec();
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        if mode == REFUSE {
            for (c, s) in self.open.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Client to server, watching for the write that commits (holding the needle). `held` is set
/// before a commit whose answer is to be lost goes on: from then on nothing goes back to the
/// client.
fn pump_up(
    mut client: TcpStream,
    mut server: TcpStream,
    mode: Arc<AtomicU8>,
    needle: Arc<Mutex<Vec<u8>>>,
    held: Arc<AtomicU8>,
    fired: Arc<AtomicU8>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let needle = needle.lock().unwrap().clone();
        let commit = chunk.windows(needle.len()).any(|w| w == needle);
        if commit {
            let m = mode.load(Ordering::SeqCst);
            if [
                CUT_AFTER_COMMIT,
                DROP_COMMIT,
                CUT_AFTER_COMMIT_AND_REFUSE,
                DROP_COMMIT_AND_REFUSE,
            ]
            .contains(&m)
            {
                held.store(1, Ordering::SeqCst);
                fired.fetch_add(1, Ordering::SeqCst);
                let next = if [CUT_AFTER_COMMIT_AND_REFUSE, DROP_COMMIT_AND_REFUSE].contains(&m) {
                    REFUSE
                } else {
                    PASS
                };
                let _ = mode.compare_exchange(m, next, Ordering::SeqCst, Ordering::SeqCst);
                if ![DROP_COMMIT, DROP_COMMIT_AND_REFUSE].contains(&m) {
                    let _ = server.write_all(chunk);
                    // Time for the database to do it; its answer goes nowhere.
                    std::thread::sleep(Duration::from_millis(300));
                }
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
        }
        if server.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

fn pump_down(mut server: TcpStream, mut client: TcpStream, held: Arc<AtomicU8>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if held.load(Ordering::SeqCst) == 1 || client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}

/// A schema of the test's own and a store on it through the proxy; `None` (skipped) without a
/// PostgreSQL outside CI.
struct Setup {
    proxy: Proxy,
    store: PgStore,
    /// The schema's URL, straight to the database (not through the proxy).
    url: String,
    /// The schema's URL through the proxy.
    via_proxy: String,
    _schema: TestSchema,
}

fn setup(test: &str) -> Option<Setup> {
    let schema = TestSchema::create(test)?;
    let proxy = Proxy::start();
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=test connect_timeout=2 options='-c search_path={}'",
        proxy.port, schema.name
    );
    let store = PgStore::open(&url).expect("open the store through the proxy");
    Some(Setup {
        proxy,
        store,
        url: schema.url(),
        via_proxy: url,
        _schema: schema,
    })
}

fn commit(store: &PgStore, b: &Batch) -> Result<(), StoreError> {
    store.commit(Arc::new(b.clone())).map(|_| ())
}

/// The seqs of `conv` the store holds, each as often as it holds it.
fn stored(store: &PgStore, conv: &str) -> Vec<u64> {
    let page = store
        .read_page(conv, 1, u64::MAX, 1000, usize::MAX)
        .expect("read back");
    page.messages.iter().map(|m| m.seq).collect()
}

fn unreachable(r: Result<(), StoreError>) -> String {
    match r {
        Err(StoreError::Unreachable(why)) => why,
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[test]
fn a_connection_lost_while_the_schema_is_applied_is_unreachable_not_a_failure_to_open() {
    // A server starting while its database fails over loses the connection in the middle of
    // opening the store: it must be told to wait for the database, not that the store is bad.
    let Some(s) = setup("lost_at_open") else {
        return;
    };
    s.proxy.commit_marked_by(b"pg_advisory_lock");
    s.proxy.set(DROP_COMMIT);
    match PgStore::open(&s.via_proxy) {
        Err(StoreError::Unreachable(why)) => assert!(why.contains("schema"), "{why}"),
        Err(e) => panic!("a lost connection while opening is not Unreachable: {e:?}"),
        Ok(_) => panic!("the proxy did not cut the connection"),
    }
    assert_eq!(s.proxy.fired.load(Ordering::SeqCst), 1);
    // Once the database answers again, the store opens.
    PgStore::open(&s.via_proxy).expect("open once the connection holds");
}

#[test]
fn a_commit_whose_answer_is_lost_is_read_back_and_counts_once() {
    let Some(s) = setup("a_commit_whose_answer_is_lost_is_read_back_and_counts_once") else {
        return;
    };
    commit(&s.store, &created(1, "g", 3, 10)).expect("first batch");
    // A batch of messages is committed as one statement: its write holds their bodies.
    s.proxy.commit_marked_by(b"body 5");
    s.proxy.set(CUT_AFTER_COMMIT);
    let second = appended(2, "g", 4..=6, 10);
    // The answer is lost, the database is still there: read back at once, committed.
    commit(&s.store, &second).expect("read back as committed");
    assert_eq!(
        s.proxy.fired.load(Ordering::SeqCst),
        1,
        "the commit was cut"
    );
    assert_eq!(stored(&s.store, "g"), (1..=6).collect::<Vec<_>>());
    // It really is stored: the same seqs again are a conflict.
    assert!(matches!(
        commit(&s.store, &appended(3, "g", 4..=6, 10)),
        Err(StoreError::Conflict { seq: 4, .. })
    ));
}

#[test]
fn a_commit_that_never_reached_the_database_is_unreachable_and_taken_when_given_again() {
    let Some(s) =
        setup("a_commit_that_never_reached_the_database_is_unreachable_and_taken_when_given_again")
    else {
        return;
    };
    commit(&s.store, &created(1, "g", 3, 10)).expect("first batch");
    s.proxy.commit_marked_by(b"body 5");
    s.proxy.set(DROP_COMMIT);
    let second = appended(2, "g", 4..=6, 10);
    let why = unreachable(commit(&s.store, &second));
    assert!(why.contains("did not take effect"), "{why}");
    assert_eq!(stored(&s.store, "g"), vec![1, 2, 3]);
    commit(&s.store, &second).expect("given again, it is taken");
    assert_eq!(stored(&s.store, "g"), (1..=6).collect::<Vec<_>>());
}

#[test]
fn an_unknown_outcome_is_read_back_once_the_database_is_back_never_guessed() {
    let Some(s) = setup("an_unknown_outcome_is_read_back_once_the_database_is_back_never_guessed")
    else {
        return;
    };
    commit(&s.store, &created(1, "g", 3, 10)).expect("first batch");
    let second = appended(2, "g", 4..=6, 10);

    // Committed, answer lost, and the database gone before the store can ask.
    s.proxy.commit_marked_by(b"body 5");
    s.proxy.set(CUT_AFTER_COMMIT_AND_REFUSE);
    let why = unreachable(commit(&s.store, &second));
    assert!(why.contains("read back"), "{why}");
    assert_eq!(
        s.proxy.fired.load(Ordering::SeqCst),
        1,
        "the commit was cut"
    );
    s.proxy.set(REFUSE);
    // Still unknown while the database cannot be reached.
    unreachable(commit(&s.store, &second));
    s.proxy.set(PASS);
    // Back: it did commit, so the same batch is answered without being written again.
    commit(&s.store, &second).expect("read back as committed");
    assert_eq!(stored(&s.store, "g"), (1..=6).collect::<Vec<_>>());

    // And one that did not commit: written when given again.
    let third = appended(3, "g", 7..=8, 10);
    s.proxy.commit_marked_by(b"body 8");
    s.proxy.set(DROP_COMMIT);
    unreachable(commit(&s.store, &third));
    s.proxy.set(REFUSE);
    unreachable(commit(&s.store, &third));
    s.proxy.set(PASS);
    commit(&s.store, &third).expect("written now");
    assert_eq!(stored(&s.store, "g"), (1..=8).collect::<Vec<_>>());
}

#[test]
fn reads_while_the_database_is_gone_say_it_cannot_be_reached() {
    let Some(s) = setup("reads_while_the_database_is_gone_say_it_cannot_be_reached") else {
        return;
    };
    commit(&s.store, &created(1, "g", 3, 10)).expect("first batch");
    s.proxy.set(REFUSE);
    assert!(matches!(
        s.store.read_page("g", 1, 3, 10, 1 << 20),
        Err(StoreError::Unreachable(_))
    ));
    assert!(matches!(
        s.store.dedup_lookup(&[("a".into(), "c1".into())]),
        Err(StoreError::Unreachable(_))
    ));
    s.proxy.set(PASS);
    assert_eq!(stored(&s.store, "g"), vec![1, 2, 3]);
}

/// A batch that changes a conversation's record takes a transaction: its outcome hangs on the
/// COMMIT, which is read back just the same.
#[test]
fn a_transaction_whose_commit_answer_is_lost_is_read_back() {
    let Some(s) = setup("a_transaction_whose_commit_answer_is_lost_is_read_back") else {
        return;
    };
    s.proxy.set(CUT_AFTER_COMMIT);
    commit(&s.store, &created(1, "g", 3, 10)).expect("read back as committed");
    assert_eq!(
        s.proxy.fired.load(Ordering::SeqCst),
        1,
        "the COMMIT was cut"
    );
    assert_eq!(stored(&s.store, "g"), vec![1, 2, 3]);
    s.proxy.set(DROP_COMMIT);
    let h = created(2, "h", 2, 10);
    unreachable(commit(&s.store, &h));
    assert!(stored(&s.store, "h").is_empty());
    commit(&s.store, &h).expect("given again, it is taken");
    assert_eq!(stored(&s.store, "h"), vec![1, 2]);
}

/// The read-back's own answer is lost: a commit that never reached the database, then a
/// read-back (fence) that committed unseen. The next read-back must still find that the commit
/// did not take effect (the fence moved the row, not the last attempt that took effect), so
/// that the batch is written when given again, not reported as stored.
#[test]
fn a_read_back_whose_answer_is_lost_settles_nothing_wrongly() {
    let Some(s) = setup("a_read_back_whose_answer_is_lost_settles_nothing_wrongly") else {
        return;
    };
    commit(&s.store, &created(1, "g", 3, 10)).expect("first batch");
    let second = appended(2, "g", 4..=6, 10);
    // Swallowed, and the database gone before the store can read back.
    s.proxy.commit_marked_by(b"body 5");
    s.proxy.set(DROP_COMMIT_AND_REFUSE);
    unreachable(commit(&s.store, &second));
    // Back, but the read-back's COMMIT is cut after it went through.
    s.proxy.commit_marked_by(b"COMMIT\0");
    s.proxy.set(CUT_AFTER_COMMIT);
    unreachable(commit(&s.store, &second));
    assert_eq!(s.proxy.fired.load(Ordering::SeqCst), 2, "both were cut");
    assert_eq!(stored(&s.store, "g"), vec![1, 2, 3]);
    s.proxy.set(PASS);
    commit(&s.store, &second).expect("given again, it is written");
    assert_eq!(stored(&s.store, "g"), (1..=6).collect::<Vec<_>>());
}

/// The database lost commits it had confirmed (an asynchronous standby promoted, a backup
/// restored): this writer's row is behind its last commit. The next commit is refused, says
/// so, and writes nothing over the lost seqs.
#[test]
fn a_database_that_lost_confirmed_commits_is_noticed_at_the_next_one() {
    let Some(s) = setup("a_database_that_lost_confirmed_commits_is_noticed_at_the_next_one") else {
        return;
    };
    commit(&s.store, &created(1, "g", 3, 10)).expect("first batch");
    commit(&s.store, &appended(2, "g", 4..=6, 10)).expect("second batch");
    // The second batch and the row's move with it are lost, as a standby that lacked them
    // would have them.
    let mut c = postgres::Client::connect(&s.url, postgres::NoTls).expect("connect");
    c.batch_execute(
        "DELETE FROM ordo_messages WHERE seq > 3;
         UPDATE ordo_writers SET batch = batch - 1, last_attempt = last_attempt - 1
         WHERE id <> 'migrated';",
    )
    .expect("lose the last commit");
    match commit(&s.store, &appended(3, "g", 4..=5, 10)) {
        Err(StoreError::Engine { source, .. }) => {
            let why = source.to_string();
            assert!(why.contains("lost committed transactions"), "{why}");
        }
        other => panic!("expected the lost history to be noticed, got {other:?}"),
    }
    assert_eq!(stored(&s.store, "g"), vec![1, 2, 3]);
}
