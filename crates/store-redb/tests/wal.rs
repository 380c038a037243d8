//! The write-ahead log: a batch is durable once `commit` returns, whatever state the B-tree file
//! was left in. A crash is imitated by copying the data directory while the store is still open
//! (what a killed process leaves: everything written, nothing more), and by damaging the log's
//! tail the way a write cut off mid-record would.

mod common;

use common::{batch, conv, crash_copy, seqs};
use ordo_store::Store;
use ordo_store_redb::{wal, RedbStore};
use std::sync::Arc;

#[test]
fn what_commit_returned_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    for n in 1..=20 {
        store.commit(batch(n, 5, 50).into()).unwrap();
    }
    crash_copy(dir.path(), crashed.path());
    drop(store);
    let reopened = RedbStore::open(crashed.path()).unwrap();
    assert_eq!(seqs(&reopened), (1..=100).collect::<Vec<_>>());
    let loaded = reopened.load_convs(&["g".to_string()]).unwrap();
    assert_eq!(loaded[0].as_ref().map(|c| c.rec.max_seq), Some(100));
    // And it goes on from there, across another crash.
    for n in 21..=30 {
        reopened.commit(batch(n, 5, 50).into()).unwrap();
    }
    let again = tempfile::tempdir().unwrap();
    crash_copy(crashed.path(), again.path());
    drop(reopened);
    let store = RedbStore::open(again.path()).unwrap();
    assert_eq!(seqs(&store), (1..=150).collect::<Vec<_>>());
}

#[test]
fn a_torn_last_record_is_dropped_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    for n in 1..=3 {
        store.commit(batch(n, 4, 20).into()).unwrap();
    }
    crash_copy(dir.path(), crashed.path());
    drop(store);
    // Cut the last record short: zero its last bytes, as a write interrupted by the crash
    // would leave them (the batch was never acknowledged, since its sync had not returned).
    let log = crashed.path().join("wal-0.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).unwrap();
    for b in &mut bytes[end - 10..=end] {
        *b = 0;
    }
    std::fs::write(&log, &bytes).unwrap();
    let store = RedbStore::open(crashed.path()).unwrap();
    let got = seqs(&store);
    // Batches 1 and 2 were logged before; batch 3 may or may not have reached the B-tree file,
    // but nothing is half there and the numbering has no hole.
    assert!(
        got == (1..=8).collect::<Vec<_>>() || got == (1..=12).collect::<Vec<_>>(),
        "{got:?}"
    );
    let next = got.len() as u64 / 4 + 1;
    store.commit(batch(next, 4, 20).into()).unwrap();
    assert_eq!(seqs(&store).len() as u64, next * 4);
}

#[test]
fn the_log_moves_between_its_segments_and_stale_records_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    // 2 KiB bodies, 64 per batch: about 130 KiB a record, so writing moves between the two
    // segments several times (each time after a checkpoint) and they fill with stale records.
    let per = 64u64;
    let batches = 5 * wal::SWITCH_BYTES / (per * 2048) + 10;
    let mut crashes = Vec::new();
    for n in 1..=batches {
        store.commit(batch(n, per, 2048).into()).unwrap();
        // Crash at a few points: in the first segment, just after a move, in the second.
        if [batches / 4, batches / 2 + 1, batches - 1].contains(&n) {
            let crashed = tempfile::tempdir().unwrap();
            crash_copy(dir.path(), crashed.path());
            crashes.push((n, crashed));
        }
    }
    drop(store);
    for (n, crashed) in &crashes {
        let store = RedbStore::open(crashed.path()).unwrap();
        assert_eq!(
            seqs(&store),
            (1..=n * per).collect::<Vec<_>>(),
            "crash after batch {n}"
        );
    }
    // A clean reopen of the original replays nothing twice either.
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(seqs(&store), (1..=batches * per).collect::<Vec<_>>());
}

#[test]
fn a_batch_larger_than_the_log_is_committed_directly() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    store.commit(batch(1, 3, 10).into()).unwrap();
    // Messages of 64 KiB, more of them than the whole log holds, as seqs 4.. .
    let big = wal::SEGMENT_BYTES / (64 << 10) + 100;
    let mut b = batch(1, big, 64 << 10);
    for m in &mut b.messages {
        Arc::make_mut(m).seq += 3;
    }
    let last = 3 + big;
    b.convs = vec![conv(last)];
    store.commit(b.into()).unwrap();
    // Logging goes on after it.
    let mut after = batch(1, 2, 10);
    for m in &mut after.messages {
        Arc::make_mut(m).seq += last;
    }
    let last = last + 2;
    after.convs = vec![conv(last)];
    store.commit(after.into()).unwrap();
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), crashed.path());
    drop(store);
    let store = RedbStore::open(crashed.path()).unwrap();
    assert_eq!(seqs(&store), (1..=last).collect::<Vec<_>>());
}
