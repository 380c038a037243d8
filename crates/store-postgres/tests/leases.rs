//! Leases of a cluster's partitions and the fence on every commit: two nodes that both believe
//! they own a partition can never both commit for it.
//!
//! Each test runs in a schema of its own, dropped after. Without a reachable PostgreSQL the
//! tests are skipped with the reason printed, except in CI (`CI=true`), where they fail.

use ordo_core::partition::partition_of;
use ordo_store::conformance::{appended, created};
use ordo_store::{Store, StoreError};
use ordo_store_postgres::lease::{Fences, LeaseTable};
use ordo_store_postgres::test_schema::TestSchema;
use ordo_store_postgres::PgStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARTS: u32 = 16;
/// A short lease, so that the tests need not wait long for one to run out.
const LEASE_MS: u64 = 300;

/// A node: its view of the lease table, its fences and its store.
struct Node {
    leases: LeaseTable,
    fences: Arc<Fences>,
    store: PgStore,
}

fn node(schema: &TestSchema, id: &str) -> Node {
    let leases = LeaseTable::open(&schema.url(), id, PARTS).expect("open the lease table");
    let fences = Fences::new(id, PARTS);
    let store = PgStore::open_fenced(&schema.url(), fences.clone()).expect("open the store");
    Node {
        leases,
        fences,
        store,
    }
}

impl Node {
    /// Takes `part`, which must be free, and fences commits with it.
    fn take(&self, part: u32) -> u64 {
        let epoch = self
            .leases
            .acquire(part, LEASE_MS)
            .expect("reach the lease table")
            .expect("the partition is free");
        self.fences.hold(part, epoch);
        epoch
    }
}

fn seqs(store: &PgStore, conv: &str) -> Vec<(u64, String)> {
    store
        .read_page(conv, 1, u64::MAX, 1000, usize::MAX)
        .expect("read the history")
        .messages
        .into_iter()
        .map(|m| (m.seq, m.body))
        .collect()
}

fn fenced(r: Result<ordo_core::CommitOutcome, StoreError>) -> String {
    match r {
        Err(e @ StoreError::Fenced { .. }) => e.to_string(),
        other => panic!("expected the commit to be fenced, got {other:?}"),
    }
}

#[test]
fn two_nodes_that_both_believe_they_own_a_partition_only_one_commits() {
    let Some(schema) = TestSchema::create("two_owners") else {
        return;
    };
    let (a, b) = (node(&schema, "node-a"), node(&schema, "node-b"));
    let part = partition_of("c", PARTS);
    assert_eq!(a.take(part), 1);
    a.store
        .commit(Arc::new(created(1, "c", 3, 1)))
        .expect("the owner commits");
    // While a's lease runs, b cannot take the partition.
    assert_eq!(b.leases.acquire(part, LEASE_MS).expect("reach it"), None);

    // a stops renewing (paused, cut off); its lease runs out and b takes over, at a new epoch,
    // and goes on from what a committed.
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));
    assert_eq!(b.take(part), 2);
    let state = b.store.load_convs(&["c".into()]).expect("load")[0]
        .clone()
        .expect("b sees a's conversation");
    assert_eq!(state.rec.max_seq, 3);
    b.store
        .commit(Arc::new(appended(1, "c", 4..=5, 1)))
        .expect("the new owner commits");

    // a still believes it owns the partition at epoch 1. Its next seq is one b took: refused,
    // as a lost lease rather than a mere conflict.
    let why = fenced(a.store.commit(Arc::new(appended(2, "c", 4..=4, 1))));
    assert!(why.contains(&format!("partition {part}")), "{why}");
    assert!(why.contains("held by node-b"), "{why}");
    // A seq nobody took is refused all the same: the fence, not the unique key, stops it.
    let why = fenced(a.store.commit(Arc::new(appended(3, "c", 6..=6, 1))));
    assert!(why.contains("now at epoch 2, held by node-b"), "{why}");
    // Renewing tells a it lost the partition.
    assert_eq!(
        a.leases.renew(&a.fences.held(), LEASE_MS).expect("renew"),
        Vec::<u32>::new()
    );

    let history = seqs(&b.store, "c");
    assert_eq!(
        history.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    // b still commits.
    b.store
        .commit(Arc::new(appended(2, "c", 6..=6, 1)))
        .expect("the owner commits on");
}

#[test]
fn a_node_never_writes_to_a_partition_it_does_not_hold() {
    let Some(schema) = TestSchema::create("not_held") else {
        return;
    };
    let a = node(&schema, "node-a");
    let why = fenced(a.store.commit(Arc::new(created(1, "c", 2, 1))));
    assert!(why.contains("does not hold its lease"), "{why}");
    assert!(seqs(&a.store, "c").is_empty());
    // A batch over two partitions, one of them not held, writes to neither.
    let (c1, c2) = (
        "x1",
        (0..)
            .map(|n| format!("y{n}"))
            .find(|c| partition_of(c, PARTS) != partition_of("x1", PARTS))
            .expect("another partition"),
    );
    a.take(partition_of(c1, PARTS));
    let mut both = created(2, c1, 1, 1);
    let other = created(2, &c2, 1, 1);
    both.messages.extend(other.messages);
    both.convs.extend(other.convs);
    fenced(a.store.commit(Arc::new(both)));
    assert!(seqs(&a.store, c1).is_empty());
    a.take(partition_of(&c2, PARTS));
    a.store
        .commit(Arc::new(created(3, &c2, 1, 1)))
        .expect("held now");
}

#[test]
fn a_takeover_waits_for_a_commit_in_flight_and_then_sees_it() {
    let Some(schema) = TestSchema::create("takeover_waits") else {
        return;
    };
    let (a, b) = (node(&schema, "node-a"), node(&schema, "node-b"));
    let part = partition_of("c", PARTS);
    let epoch = a.take(part);
    // A commit of a's in flight: its transaction holds the lease row as the commit statement
    // does, and has written a message.
    let mut raw = postgres::Client::connect(&schema.url(), postgres::NoTls).expect("connect");
    let mut tx = raw.transaction().expect("begin");
    let locked = tx
        .query(
            "SELECT 1 FROM ordo_leases WHERE part = $1 AND epoch = $2 AND node = 'node-a' FOR SHARE",
            &[&(part as i32), &(epoch as i64)],
        )
        .expect("lock the lease row");
    assert_eq!(locked.len(), 1);
    tx.execute(
        "INSERT INTO ordo_messages (conv, seq, from_user, device, cmid, body, ts)
         VALUES ('c', 1, 'u', 'd', 'm1', 'in flight', 1)",
        &[],
    )
    .expect("write");
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));
    // The lease ran out meanwhile: b's takeover waits for the commit in flight.
    let started = Instant::now();
    let taker = std::thread::spawn(move || {
        let epoch = b.leases.acquire(part, LEASE_MS).expect("reach it");
        (epoch, seqs(&b.store, "c"), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !taker.is_finished(),
        "the takeover did not wait for the commit in flight"
    );
    tx.commit().expect("the commit in flight ends");
    let (epoch_b, seen, waited) = taker.join().expect("the taker");
    assert_eq!(epoch_b, Some(epoch + 1));
    assert!(waited >= Duration::from_millis(500));
    // What the old owner committed before the takeover is what the new owner starts from.
    assert_eq!(seen, vec![(1, "in flight".to_string())]);
}

#[test]
fn leases_are_renewed_given_back_and_counted_alike_by_every_node() {
    let Some(schema) = TestSchema::create("lease_life") else {
        return;
    };
    let (a, b) = (node(&schema, "node-a"), node(&schema, "node-b"));
    let (p, q) = (1, 2);
    let (ep, eq) = (a.take(p), a.take(q));
    // Renewed past the first lease's end, a keeps both.
    std::thread::sleep(Duration::from_millis(LEASE_MS / 2));
    let mut kept = a.leases.renew(&a.fences.held(), LEASE_MS).expect("renew");
    kept.sort_unstable();
    assert_eq!(kept, vec![p, q]);
    std::thread::sleep(Duration::from_millis(LEASE_MS / 2 + 50));
    assert_eq!(b.leases.acquire(p, LEASE_MS).expect("reach"), None);
    // Given back, a partition is free at once.
    a.leases.release(q, eq).expect("release");
    assert_eq!(b.leases.acquire(q, LEASE_MS).expect("reach"), Some(eq + 1));
    let table = a.leases.table().expect("the table");
    assert_eq!(table.len(), PARTS as usize);
    assert_eq!(table[p as usize].node.as_deref(), Some("node-a"));
    assert_eq!(table[p as usize].epoch, ep);
    assert!(table[p as usize].live);
    assert_eq!(table[q as usize].node.as_deref(), Some("node-b"));
    // Both nodes are live; one that leaves is not.
    assert_eq!(
        a.leases.heartbeat("", 10_000).expect("beat"),
        vec!["node-a"]
    );
    assert_eq!(
        b.leases.heartbeat("", 10_000).expect("beat"),
        vec!["node-a", "node-b"]
    );
    a.leases.leave().expect("leave");
    assert_eq!(
        b.leases.heartbeat("", 10_000).expect("beat"),
        vec!["node-b"]
    );
    // A node started with another partition count is refused.
    let Err(e) = LeaseTable::open(&schema.url(), "node-c", PARTS * 2) else {
        panic!("a second partition count was taken");
    };
    assert!(
        e.to_string().contains(&format!("--partitions {PARTS}")),
        "{e}"
    );
}
