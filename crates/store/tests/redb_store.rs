//! The embedded store keeps what it committed across a reopen, applies retention, and serves
//! pages in seq order.

use ordo_core::{Batch, ConvPosition, ConvRecord, CursorRecord, DedupRecord, Retention};
use ordo_protocol::{ConvKind, Message};
use ordo_store::{RedbStore, Store};

fn conv(id: &str, max_seq: u64, first_seq: u64) -> ConvRecord {
    ConvRecord {
        id: id.into(),
        kind: ConvKind::Group,
        epoch: 7,
        max_seq,
        first_seq,
        members: ["a".to_string(), "b".to_string()].into_iter().collect(),
        retention: Retention::default(),
        created_ms: 1,
    }
}

fn msg(conv: &str, seq: u64, ts: u64) -> Message {
    Message {
        conv: conv.into(),
        seq,
        from: "a".into(),
        device: "d1".into(),
        cmid: format!("c{seq}"),
        body: format!("body {seq}"),
        reply_to: None,
        ts,
    }
}

#[test]
fn commit_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        let batch = Batch {
            id: 1,
            messages: (1..=3).map(|s| msg("g", s, 10 * s).into()).collect(),
            convs: vec![conv("g", 3, 1)],
            // An entry besides the messages' own (which every message is).
            dedup_put: vec![DedupRecord {
                user: "b".into(),
                cmid: "elsewhere".into(),
                conv: "h".into(),
                seq: 9,
                ts: 5,
            }],
            cursors: vec![CursorRecord {
                conv: "g".into(),
                user: "b".into(),
                device: "phone".into(),
                delivered: 2,
                read: 1,
            }],
            ..Batch::default()
        };
        store.commit(batch).unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.convs, vec![conv("g", 3, 1)]);
    assert_eq!(snap.cursors.len(), 1);
    assert_eq!(snap.cursors[0].delivered, 2);
    let mut dedup: Vec<(String, String, u64)> = snap
        .dedup
        .iter()
        .map(|d| (d.user.clone(), d.cmid.clone(), d.seq))
        .collect();
    dedup.sort();
    assert_eq!(
        dedup,
        [
            ("a".into(), "c1".into(), 1),
            ("a".into(), "c2".into(), 2),
            ("a".into(), "c3".into(), 3),
            ("b".into(), "elsewhere".into(), 9)
        ]
    );
    let page = store.read_page("g", 1, 3, 10, usize::MAX).unwrap();
    assert_eq!(page.first_seq, 1);
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let page = store.read_page("g", 2, 3, 1, usize::MAX).unwrap();
    assert_eq!(page.messages, vec![msg("g", 2, 20)]);
    assert_eq!(
        store
            .read_page("nope", 1, 3, 10, usize::MAX)
            .unwrap()
            .messages,
        vec![]
    );
    // The byte budget ends a page after the message that reaches it ("body 1" is 6 bytes).
    let page = store.read_page("g", 1, 3, 10, 7).unwrap();
    assert_eq!(page.messages.len(), 2);
    let page = store.read_page("g", 1, 3, 10, 1).unwrap();
    assert_eq!(page.messages.len(), 1);
}

#[test]
fn retention_by_count_and_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    store
        .commit(Batch {
            id: 1,
            messages: (1..=10).map(|s| msg("g", s, 100 * s).into()).collect(),
            convs: vec![conv("g", 10, 1)],
            ..Batch::default()
        })
        .unwrap();
    // Count: keep from seq 4.
    store
        .commit(Batch {
            id: 2,
            convs: vec![conv("g", 10, 4)],
            trim_below: vec![("g".into(), 4)],
            ..Batch::default()
        })
        .unwrap();
    let page = store.read_page("g", 1, 10, 100, usize::MAX).unwrap();
    assert_eq!(page.first_seq, 4);
    assert_eq!(page.messages.first().map(|m| m.seq), Some(4));
    assert_eq!(page.messages.len(), 7);
    // Age: everything accepted before t=650 goes (seqs 4, 5, 6).
    let out = store
        .commit(Batch {
            id: 3,
            trim_before_ms: vec![("g".into(), 650)],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(out.first_seqs, vec![("g".to_string(), 7)]);
    let page = store.read_page("g", 1, 10, 100, usize::MAX).unwrap();
    assert_eq!(page.first_seq, 7);
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![7, 8, 9, 10]
    );
    // Everything too old: first_seq moves past max_seq.
    let out = store
        .commit(Batch {
            id: 4,
            trim_before_ms: vec![("g".into(), 10_000)],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(out.first_seqs, vec![("g".to_string(), 11)]);
    assert!(store
        .read_page("g", 1, 10, 100, usize::MAX)
        .unwrap()
        .messages
        .is_empty());
}

/// A conversation's seq range moves without its record (a large group's member list is not
/// rewritten with every message), never moves back, and survives a reopen.
#[test]
fn seq_ranges_move_apart_from_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let position = |max_seq, first_seq| ConvPosition {
        id: "g".into(),
        max_seq,
        first_seq,
    };
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(Batch {
                id: 1,
                messages: (1..=2).map(|s| msg("g", s, 10 * s).into()).collect(),
                convs: vec![conv("g", 2, 1)],
                ..Batch::default()
            })
            .unwrap();
        store
            .commit(Batch {
                id: 2,
                messages: (3..=5).map(|s| msg("g", s, 10 * s).into()).collect(),
                positions: vec![position(5, 1)],
                ..Batch::default()
            })
            .unwrap();
        // Lower numbers than stored change nothing.
        store
            .commit(Batch {
                id: 3,
                positions: vec![position(4, 1)],
                ..Batch::default()
            })
            .unwrap();
        store
            .commit(Batch {
                id: 4,
                positions: vec![position(5, 3)],
                trim_below: vec![("g".into(), 3)],
                ..Batch::default()
            })
            .unwrap();
        let page = store.read_page("g", 1, 5, 10, usize::MAX).unwrap();
        assert_eq!(page.first_seq, 3);
        assert_eq!(page.messages.len(), 3);
        assert_eq!(store.load().unwrap().convs, vec![conv("g", 5, 3)]);
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap().convs, vec![conv("g", 5, 3)]);
    // Age-based retention moves the range too.
    let out = store
        .commit(Batch {
            id: 5,
            trim_before_ms: vec![("g".into(), 45)],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(out.first_seqs, vec![("g".to_string(), 5)]);
    assert_eq!(store.load().unwrap().convs, vec![conv("g", 5, 5)]);
}

/// A store written before ranges were kept apart has them only in the records: they are read
/// from there, and the first range written alone carries on from them.
#[test]
fn ranges_fall_back_to_the_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(Batch {
                id: 1,
                messages: (1..=4).map(|s| msg("g", s, 10 * s).into()).collect(),
                convs: vec![conv("g", 4, 2)],
                ..Batch::default()
            })
            .unwrap();
    }
    {
        // What such a store looks like: no range table.
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        let ranges: redb::TableDefinition<&str, (u64, u64)> =
            redb::TableDefinition::new("conv_ranges");
        assert!(tx.delete_table(ranges).unwrap());
        tx.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap().convs, vec![conv("g", 4, 2)]);
    assert_eq!(
        store
            .read_page("g", 1, 4, 10, usize::MAX)
            .unwrap()
            .first_seq,
        2
    );
    store
        .commit(Batch {
            id: 2,
            messages: vec![msg("g", 5, 50).into()],
            positions: vec![ConvPosition {
                id: "g".into(),
                max_seq: 5,
                first_seq: 2,
            }],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(store.load().unwrap().convs, vec![conv("g", 5, 2)]);
}

fn seqs(page: &ordo_store::Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

/// Messages are stored in runs (per batch and conversation); a page starts and ends anywhere
/// inside a run, and retention that cuts a run in two hides its first part.
#[test]
fn pages_start_and_end_inside_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    // Batches of 1, 10 and 300 messages (the last is stored as runs of at most 128), with a
    // second conversation interleaved.
    let mut next = 1;
    for (id, n) in [(1, 1), (2, 10), (3, 300)] {
        let mut messages = Vec::new();
        for s in next..next + n {
            messages.push(msg("g", s, 10 * s).into());
            messages.push(msg("h", s, 10 * s).into());
        }
        next += n;
        store
            .commit(Batch {
                id,
                messages,
                convs: vec![conv("g", next - 1, 1), conv("h", next - 1, 1)],
                ..Batch::default()
            })
            .unwrap();
    }
    let page = store.read_page("g", 5, 8, 100, usize::MAX).unwrap();
    assert_eq!(seqs(&page), vec![5, 6, 7, 8]);
    assert!(page.messages.iter().all(|m| m.conv == "g"));
    let page = store.read_page("g", 1, 311, 1000, usize::MAX).unwrap();
    assert_eq!(seqs(&page), (1..=311).collect::<Vec<_>>());
    let page = store.read_page("g", 100, 311, 50, usize::MAX).unwrap();
    assert_eq!(seqs(&page), (100..150).collect::<Vec<_>>());
    // Bodies of one-digit seqs are 6 bytes: the page stops at the message that reaches 20.
    let page = store.read_page("h", 2, 311, 100, 20).unwrap();
    assert_eq!(seqs(&page), vec![2, 3, 4, 5]);
    assert!(store
        .read_page("g", 312, 400, 10, usize::MAX)
        .unwrap()
        .messages
        .is_empty());

    // Count retention in the middle of the 10-message run: it stays, half hidden.
    store
        .commit(Batch {
            id: 4,
            convs: vec![conv("g", 311, 6)],
            trim_below: vec![("g".into(), 6)],
            ..Batch::default()
        })
        .unwrap();
    let page = store.read_page("g", 1, 8, 100, usize::MAX).unwrap();
    assert_eq!((page.first_seq, seqs(&page)), (6, vec![6, 7, 8]));
    // Age retention in the middle of a run: the first seq moves though the run stays.
    let out = store
        .commit(Batch {
            id: 5,
            trim_before_ms: vec![("g".into(), 10 * 200)],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(out.first_seqs, vec![("g".to_string(), 200)]);
    let page = store.read_page("g", 1, 202, 100, usize::MAX).unwrap();
    assert_eq!((page.first_seq, seqs(&page)), (200, vec![200, 201, 202]));
    // Nothing older than the cutoff is left to remove: no change is reported.
    let out = store
        .commit(Batch {
            id: 6,
            trim_before_ms: vec![("g".into(), 10 * 150)],
            ..Batch::default()
        })
        .unwrap();
    assert!(out.first_seqs.is_empty());
    // The other conversation is untouched.
    let page = store.read_page("h", 1, 3, 100, usize::MAX).unwrap();
    assert_eq!((page.first_seq, seqs(&page)), (1, vec![1, 2, 3]));
    drop(store);
    // What retention removed is gone from the file, not only hidden.
    let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
    let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
    let runs: redb::TableDefinition<(&str, u64), &[u8]> =
        redb::TableDefinition::new("message_runs");
    let table = tx.open_table(runs).unwrap();
    let mut stored = Vec::new();
    for row in table.range(("g", 0)..=("g", u64::MAX)).unwrap() {
        let run: Vec<Message> = rmp_serde::from_slice(row.unwrap().1.value()).unwrap();
        stored.extend(run.iter().map(|m| m.seq));
    }
    assert_eq!(stored, (200..=311).collect::<Vec<_>>());
}

/// A store written when each message was its own row is read the same after opening.
#[test]
fn messages_stored_one_per_row_are_moved_into_runs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(Batch {
                id: 1,
                convs: vec![conv("g", 3, 1)],
                ..Batch::default()
            })
            .unwrap();
    }
    {
        // What such a store holds: a `messages` table keyed (conv, seq).
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let old: redb::TableDefinition<(&str, u64), &[u8]> =
                redb::TableDefinition::new("messages");
            let mut t = tx.open_table(old).unwrap();
            for s in 1..=3 {
                let v = rmp_serde::to_vec_named(&msg("g", s, 10 * s)).unwrap();
                t.insert(("g", s), v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    let page = store.read_page("g", 2, 3, 10, usize::MAX).unwrap();
    assert_eq!(page.messages, vec![msg("g", 2, 20), msg("g", 3, 30)]);
    store
        .commit(Batch {
            id: 2,
            messages: vec![msg("g", 4, 40).into()],
            positions: vec![ConvPosition {
                id: "g".into(),
                max_seq: 4,
                first_seq: 1,
            }],
            ..Batch::default()
        })
        .unwrap();
    let page = store.read_page("g", 1, 4, 10, usize::MAX).unwrap();
    assert_eq!(seqs(&page), vec![1, 2, 3, 4]);
    drop(store);
    // Moved once: the old table is gone.
    let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
    let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
    assert!(!tx
        .list_tables()
        .unwrap()
        .any(|t| { redb::TableHandle::name(&t) == "messages" }));
}

fn dedup(cmid: &str, ts: u64) -> DedupRecord {
    DedupRecord {
        user: "a".into(),
        cmid: cmid.into(),
        conv: "g".into(),
        seq: ts,
        ts,
    }
}

fn dedup_cmids(store: &RedbStore) -> Vec<String> {
    let mut got: Vec<String> = store
        .load()
        .unwrap()
        .dedup
        .into_iter()
        .map(|d| d.cmid)
        .collect();
    got.sort();
    got
}

/// Dedup entries are forgotten by acceptance time: never one accepted at or after the cutoff;
/// older ones once every entry stored with them is older too.
#[test]
fn dedup_entries_are_forgotten_by_time() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        for (id, entries) in [
            (1, vec![dedup("a1", 10), dedup("a2", 11)]),
            (2, vec![dedup("b1", 20), dedup("b2", 30)]),
            (3, vec![dedup("c1", 40)]),
        ] {
            store
                .commit(Batch {
                    id,
                    dedup_put: entries,
                    ..Batch::default()
                })
                .unwrap();
        }
        assert_eq!(dedup_cmids(&store), ["a1", "a2", "b1", "b2", "c1"]);
        // Before 25: batch 1's entries go; b1 (20) stays with b2 (30).
        store
            .commit(Batch {
                id: 4,
                dedup_forget_before_ms: Some(25),
                dedup_put: vec![dedup("a1", 50)],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(dedup_cmids(&store), ["a1", "b1", "b2", "c1"]);
    }
    let store = RedbStore::open(dir.path()).unwrap();
    let snap = store.load().unwrap();
    let a1: Vec<u64> = snap
        .dedup
        .iter()
        .filter(|d| d.cmid == "a1")
        .map(|d| d.ts)
        .collect();
    assert_eq!(a1, vec![50], "the renewed entry, not the forgotten one");
    store
        .commit(Batch {
            id: 5,
            dedup_forget_before_ms: Some(51),
            ..Batch::default()
        })
        .unwrap();
    assert!(dedup_cmids(&store).is_empty());
}

/// A store written when each dedup entry was its own row is read the same after opening.
#[test]
fn dedup_entries_stored_one_per_row_are_moved_into_runs() {
    let dir = tempfile::tempdir().unwrap();
    drop(RedbStore::open(dir.path()).unwrap());
    {
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let old: redb::TableDefinition<(&str, &str), &[u8]> =
                redb::TableDefinition::new("dedup");
            let mut t = tx.open_table(old).unwrap();
            for (cmid, ts) in [("x", 5), ("y", 7)] {
                let v = rmp_serde::to_vec_named(&dedup(cmid, ts)).unwrap();
                t.insert(("a", cmid), v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(dedup_cmids(&store), ["x", "y"]);
    store
        .commit(Batch {
            id: 1,
            dedup_put: vec![dedup("z", 9)],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(dedup_cmids(&store), ["x", "y", "z"]);
}
