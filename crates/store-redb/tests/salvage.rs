//! `ordo store salvage` on the damage a crash cannot produce: the records before the damage
//! are kept, those stranded after it are dropped and listed, every conversation's epoch moves,
//! the damaged segments are set aside and the store opens and takes batches again. Without
//! `apply` nothing changes; a healthy store needs nothing; a missing store file is refused.

mod common;

use common::{batch, crashed_with, seqs};
use ordo_store::Store;
use ordo_store_redb::wal::scan::{HEADER_BYTES, RECORD_MAGIC};
use ordo_store_redb::{salvage, RedbStore};
use std::path::Path;

/// Flips one bit in the payload of the record at index `k` of `wal-0.log`.
fn damage_record(dir: &Path, k: usize) {
    let log = dir.join("wal-0.log");
    let mut seg = std::fs::read(&log).unwrap();
    let mut at = HEADER_BYTES as usize;
    for _ in 0..k {
        assert_eq!(seg[at..at + 4], RECORD_MAGIC);
        let len = u32::from_le_bytes(seg[at + 4..at + 8].try_into().unwrap()) as usize;
        at += 20 + len;
    }
    let len = u32::from_le_bytes(seg[at + 4..at + 8].try_into().unwrap()) as usize;
    seg[at + 20 + len / 2] ^= 0x10;
    std::fs::write(&log, &seg).unwrap();
}

fn epoch(store: &RedbStore) -> u64 {
    store.load_convs(&["g".to_string()]).unwrap()[0]
        .as_ref()
        .expect("g is stored")
        .rec
        .epoch
}

#[test]
fn a_damaged_record_is_salvaged_keeping_what_precedes_it() {
    let dir = crashed_with(30);
    // Record 10 (the eleventh: seqnos start at 0) holds messages 41..=44.
    damage_record(dir.path(), 10);
    assert!(RedbStore::open(dir.path()).is_err());

    let report = salvage(dir.path(), false).unwrap();
    let text = report.lines.join("\n");
    assert!(!report.changed && !report.opens, "{text}");
    assert!(text.contains("record 10 is missing"), "{text}");
    assert!(text.contains("records 0..=9"), "{text}");
    assert!(
        text.contains("conversation \"g\", messages 45..=120"),
        "the stranded records' messages are listed: {text}"
    );
    assert!(text.contains("--apply"), "{text}");
    assert!(
        RedbStore::open(dir.path()).is_err(),
        "a report changes nothing"
    );

    let done = salvage(dir.path(), true).unwrap();
    let text = done.lines.join("\n");
    assert!(done.changed && done.opens, "{text}");
    assert!(dir.path().join("wal-0.log.damaged").exists(), "{text}");
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(seqs(&store), (1..=40).collect::<Vec<_>>());
    assert_ne!(epoch(&store), 7, "the epoch moved: devices sync anew");
    // It takes batches again: seq 41 anew, under the new epoch.
    store.commit(batch(11, 4, 40).into()).unwrap();
    drop(store);
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(seqs(&store), (1..=44).collect::<Vec<_>>());
    drop(store);
    let again = salvage(dir.path(), true).unwrap();
    assert!(!again.changed && again.opens, "{:?}", again.lines);
}

#[test]
fn a_deleted_segment_is_salvaged_from_the_other() {
    let dir = crashed_with(8);
    std::fs::remove_file(dir.path().join("wal-1.log")).unwrap();
    assert!(RedbStore::open(dir.path()).is_err());
    let done = salvage(dir.path(), true).unwrap();
    let text = done.lines.join("\n");
    assert!(text.contains("wal-1.log is missing"), "{text}");
    assert!(done.opens, "{text}");
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(seqs(&store), (1..=32).collect::<Vec<_>>());
    assert_ne!(epoch(&store), 7);
}

#[test]
fn a_healthy_store_needs_no_salvage_and_a_missing_store_file_cannot_be_salvaged() {
    let dir = crashed_with(3);
    let report = salvage(dir.path(), true).unwrap();
    assert!(!report.changed && report.opens, "{:?}", report.lines);
    assert!(report.lines.join("\n").contains("nothing to salvage"));
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(epoch(&store), 7, "untouched");
    drop(store);

    std::fs::remove_file(dir.path().join("ordo.redb")).unwrap();
    let err = match salvage(dir.path(), true) {
        Err(e) => e,
        Ok(s) => panic!("salvaged without a store file: {:?}", s.lines),
    };
    assert!(err.contains("backup"), "{err}");
    assert!(!dir.path().join("ordo.redb").exists(), "nothing was made");
}
