//! A damaged log is refused, never replayed short: the cases a crash cannot produce (a record
//! damaged with later ones behind it, a segment truncated, zeroed, deleted or taken from
//! another store, the store file deleted beside its log) each stop the store from opening with
//! a message that names the file and what is wrong, and leave the files as they were. Only a
//! torn last record is dropped (test `wal`). A store of the earlier log format is upgraded.

mod common;

use common::{batch, crash_copy, crashed_with, seqs};
use ordo_store::Store;
use ordo_store_redb::wal::scan::{HEADER_BYTES, RECORD_MAGIC};
use ordo_store_redb::wal::SEGMENT_BYTES;
use ordo_store_redb::RedbStore;
use redb::{ReadableDatabase, ReadableTable};
use std::path::Path;

/// Offsets and lengths of the records at the start of a segment, following their lengths.
fn records(seg: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_BYTES as usize;
    while seg[at..at + 4] == RECORD_MAGIC {
        let len = u32::from_le_bytes(seg[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push((at, 20 + len));
        at += 20 + len;
    }
    out
}

/// The log's files (whichever are there), to check that a refusal changed nothing in them. (The
/// B-tree file may be changed: redb repairs it after a crash as it opens it.)
fn snapshot(dir: &Path) -> Vec<Option<Vec<u8>>> {
    ["wal-0.log", "wal-1.log"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).ok())
        .collect()
}

/// Opens `dir`, which must be refused; returns the message after checking that the log was
/// left as it was.
fn refused(dir: &Path) -> String {
    let before = snapshot(dir);
    let err = match RedbStore::open(dir) {
        Ok(_) => panic!("a damaged store was opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        snapshot(dir) == before,
        "a refusal changes nothing in the log: {err}"
    );
    err
}

#[test]
fn a_damaged_record_with_later_records_behind_it_is_refused_naming_file_and_offset() {
    let dir = crashed_with(30);
    let log = dir.path().join("wal-0.log");
    let mut seg = std::fs::read(&log).unwrap();
    let recs = records(&seg);
    assert_eq!(recs.len(), 30);
    // One bit in the payload of the tenth record (seqno 9).
    let (at, len) = recs[9];
    seg[at + len / 2] ^= 0x10;
    std::fs::write(&log, &seg).unwrap();
    let err = refused(dir.path());
    assert!(err.contains("wal-0.log"), "{err}");
    assert!(err.contains(&format!("offset {at}")), "{err}");
    assert!(err.contains("checksum"), "{err}");
    assert!(err.contains("record 10"), "{err}");
    assert!(err.contains("keep a copy"), "{err}");
}

#[test]
fn a_damaged_record_header_is_refused_too() {
    let dir = crashed_with(12);
    let log = dir.path().join("wal-0.log");
    let mut seg = std::fs::read(&log).unwrap();
    let (at, _) = records(&seg)[4];
    // Its length field: the chain can no longer find where the next record starts.
    seg[at + 5] ^= 0x01;
    std::fs::write(&log, &seg).unwrap();
    let err = refused(dir.path());
    assert!(err.contains(&format!("offset {at}")), "{err}");
    assert!(err.contains("record 5"), "{err}");
}

#[test]
fn a_truncated_segment_is_refused() {
    let dir = crashed_with(10);
    let log = dir.path().join("wal-0.log");
    let seg = std::fs::read(&log).unwrap();
    let (at, _) = *records(&seg).last().unwrap();
    // Cut inside the last record, as `truncate` would: a crash never shortens a segment.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(at as u64 + 10)
        .unwrap();
    let err = refused(dir.path());
    assert!(err.contains("wal-0.log"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains(&SEGMENT_BYTES.to_string()), "{err}");
}

#[test]
fn deleted_segments_are_refused() {
    for gone in [&["wal-1.log"][..], &["wal-0.log", "wal-1.log"]] {
        let dir = crashed_with(3);
        for f in gone {
            std::fs::remove_file(dir.path().join(f)).unwrap();
        }
        let err = refused(dir.path());
        assert!(err.contains("missing"), "{err}");
        assert!(err.contains(gone[0]), "{err}");
    }
}

#[test]
fn zeroed_segments_are_refused() {
    let dir = crashed_with(3);
    for f in ["wal-0.log", "wal-1.log"] {
        std::fs::write(dir.path().join(f), vec![0u8; SEGMENT_BYTES as usize]).unwrap();
    }
    let err = refused(dir.path());
    assert!(err.contains("wal-0.log"), "{err}");
    assert!(err.contains("zeroed"), "{err}");
}

#[test]
fn a_store_file_deleted_beside_its_log_is_refused() {
    let dir = crashed_with(3);
    std::fs::remove_file(dir.path().join("ordo.redb")).unwrap();
    let err = refused(dir.path());
    assert!(err.contains("ordo.redb is missing"), "{err}");
    assert!(err.contains("wal-"), "{err}");
}

#[test]
fn a_log_and_a_store_file_of_two_stores_are_refused() {
    let a = crashed_with(3);
    let b = crashed_with(5);
    for f in ["wal-0.log", "wal-1.log"] {
        std::fs::copy(b.path().join(f), a.path().join(f)).unwrap();
    }
    let err = refused(a.path());
    assert!(err.contains("another store"), "{err}");
    // And the store file of one beside the log of the other, the other way round.
    std::fs::copy(a.path().join("ordo.redb"), b.path().join("ordo.redb")).unwrap();
    let err = refused(b.path());
    assert!(err.contains("another store"), "{err}");
}

#[test]
fn swapped_segments_are_refused() {
    let dir = crashed_with(3);
    let p = |f: &str| dir.path().join(f);
    std::fs::rename(p("wal-0.log"), p("tmp")).unwrap();
    std::fs::rename(p("wal-1.log"), p("wal-0.log")).unwrap();
    std::fs::rename(p("tmp"), p("wal-1.log")).unwrap();
    let err = refused(dir.path());
    assert!(err.contains("header of segment 1"), "{err}");
}

/// A well-formed record that this store did not write (here: placed right after a torn last
/// record, with the next seqno, checked with another store id, as a record spelled out inside
/// a message body or left by another store would be) is never replayed, nor taken for damage.
#[test]
fn a_record_this_store_did_not_write_is_never_replayed() {
    let dir = crashed_with(3);
    let log = dir.path().join("wal-0.log");
    let mut seg = std::fs::read(&log).unwrap();
    let (at, len) = *records(&seg).last().unwrap();
    // Tear the last record (seqno 2) ...
    for b in &mut seg[at + len - 8..at + len] {
        *b = 0;
    }
    // ... and put a forged batch 3 (messages 9..=12 and more) behind it, with seqno 2 and 3.
    let mut place = at + len;
    for seqno in [2u64, 3] {
        let payload = rmp_serde::to_vec_named(&batch(seqno + 1, 4, 40)).unwrap();
        let mut h = crc32fast::Hasher::new();
        h.update(&0x0bad_5eedu64.to_le_bytes());
        h.update(&(payload.len() as u32).to_le_bytes());
        h.update(&seqno.to_le_bytes());
        h.update(&payload);
        let mut rec = RECORD_MAGIC.to_vec();
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(&seqno.to_le_bytes());
        rec.extend_from_slice(&h.finalize().to_le_bytes());
        rec.extend_from_slice(&payload);
        seg[place..place + rec.len()].copy_from_slice(&rec);
        place += rec.len();
    }
    std::fs::write(&log, &seg).unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(seqs(&store), (1..=8).collect::<Vec<_>>());
    // The next batch gets seqno 2 again (the torn one was never acknowledged) and is kept.
    store.commit(batch(3, 4, 40).into()).unwrap();
    assert_eq!(seqs(&store), (1..=12).collect::<Vec<_>>());
}

/// The log format before store ids (no header, records from offset 0, a checksum of seqno and
/// payload): what it holds after the B-tree's last record is replayed, then the log is made
/// anew in the current format, and logging goes on; the same after a downgrade wrote that
/// format over the current one.
#[test]
fn a_log_of_the_earlier_format_is_replayed_and_made_anew() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store.commit(batch(1, 4, 40).into()).unwrap();
    }
    // What such a store looks like: no store id in the B-tree, ...
    {
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let mut t = tx.open_table(meta).unwrap();
            assert_eq!(t.get("wal_applied").unwrap().map(|v| v.value()), Some(0));
            t.remove("store_id").unwrap().unwrap();
            t.remove("log_made").unwrap().unwrap();
        }
        tx.commit().unwrap();
    }
    // ... and the log's records (seqno 1 and 2: batches 2 and 3, not yet in the B-tree) from
    // offset 0; a stale record (seqno 0) in the other segment.
    let v1 = |records: &[(u64, u64)]| {
        let mut seg = Vec::new();
        for &(seqno, n) in records {
            let payload = rmp_serde::to_vec_named(&batch(n, 4, 40)).unwrap();
            let mut h = crc32fast::Hasher::new();
            h.update(&seqno.to_le_bytes());
            h.update(&payload);
            seg.extend_from_slice(&0x4f52_4457u32.to_le_bytes());
            seg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            seg.extend_from_slice(&seqno.to_le_bytes());
            seg.extend_from_slice(&h.finalize().to_le_bytes());
            seg.extend_from_slice(&payload);
        }
        seg.resize(SEGMENT_BYTES as usize, 0);
        seg
    };
    std::fs::write(dir.path().join("wal-0.log"), v1(&[(1, 2), (2, 3)])).unwrap();
    std::fs::write(dir.path().join("wal-1.log"), v1(&[(0, 1)])).unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(seqs(&store), (1..=12).collect::<Vec<_>>());
    for f in ["wal-0.log", "wal-1.log"] {
        let head = std::fs::read(dir.path().join(f)).unwrap();
        assert_eq!(&head[..8], b"ORDOWAL\0", "{f} is in the current format");
    }
    store.commit(batch(4, 4, 40).into()).unwrap();
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), crashed.path());
    drop(store);
    let store = RedbStore::open(crashed.path()).unwrap();
    assert_eq!(seqs(&store), (1..=16).collect::<Vec<_>>());
    drop(store);
    // A downgrade: an earlier build writes its records from offset 0, over the header (after a
    // clean stop, which left nothing to replay). The next start replays them and goes on.
    let applied = {
        let db = redb::Database::create(crashed.path().join("ordo.redb")).unwrap();
        let tx = db.begin_read().unwrap();
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let t = tx.open_table(meta).unwrap();
        let v = t.get("wal_applied").unwrap().unwrap().value();
        v
    };
    let mut seg = v1(&[(applied + 1, 5), (applied + 2, 6)]);
    seg.truncate(SEGMENT_BYTES as usize);
    std::fs::write(crashed.path().join("wal-0.log"), seg).unwrap();
    let store = RedbStore::open(crashed.path()).unwrap();
    assert_eq!(seqs(&store), (1..=24).collect::<Vec<_>>());
    let head = std::fs::read(crashed.path().join("wal-0.log")).unwrap();
    assert_eq!(&head[..8], b"ORDOWAL\0", "made anew");
}
