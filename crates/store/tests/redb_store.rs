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
            messages: (1..=3).map(|s| msg("g", s, 10 * s)).collect(),
            convs: vec![conv("g", 3, 1)],
            dedup_put: vec![DedupRecord {
                user: "a".into(),
                cmid: "c1".into(),
                conv: "g".into(),
                seq: 1,
                ts: 10,
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
    assert_eq!(snap.dedup.len(), 1);
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
            messages: (1..=10).map(|s| msg("g", s, 100 * s)).collect(),
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
                messages: (1..=2).map(|s| msg("g", s, 10 * s)).collect(),
                convs: vec![conv("g", 2, 1)],
                ..Batch::default()
            })
            .unwrap();
        store
            .commit(Batch {
                id: 2,
                messages: (3..=5).map(|s| msg("g", s, 10 * s)).collect(),
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
                messages: (1..=4).map(|s| msg("g", s, 10 * s)).collect(),
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
            messages: vec![msg("g", 5, 50)],
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
