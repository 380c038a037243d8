//! What only the embedded store has: the layouts of earlier versions are read and moved on
//! open, and retention removes from the file what it hides. What every backend must do is in the
//! conformance suite (test `conformance`).

use ordo_core::{Batch, DedupRecord, MemberPageAsk};
use ordo_protocol::Message;
use ordo_store::conformance::{conv, messages, msg, position, records};
use ordo_store::Store;
use ordo_store_redb::RedbStore;
use std::path::Path;
use std::sync::Arc;

/// A store written before ranges were kept apart has them only in the records: they are read
/// from there, and the first range written alone carries on from them.
#[test]
fn ranges_fall_back_to_the_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(Arc::new(Batch {
                id: 1,
                messages: messages("g", 1..=4, 10),
                convs: vec![conv("g", 4, 2)],
                ..Batch::default()
            }))
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
    assert_eq!(records(&store, &["g"]), vec![conv("g", 4, 2)]);
    assert_eq!(
        store
            .read_page("g", 1, 4, 10, usize::MAX)
            .unwrap()
            .first_seq,
        2
    );
    store
        .commit(Arc::new(Batch {
            id: 2,
            messages: vec![msg("g", 5, 50).into()],
            positions: vec![position("g", 5, 2)],
            ..Batch::default()
        }))
        .unwrap();
    assert_eq!(records(&store, &["g"]), vec![conv("g", 5, 2)]);
}

/// A store written when each message was its own row is read the same after opening.
#[test]
fn messages_stored_one_per_row_are_moved_into_runs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(Arc::new(Batch {
                id: 1,
                convs: vec![conv("g", 3, 1)],
                ..Batch::default()
            }))
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
        .commit(Arc::new(Batch {
            id: 2,
            messages: vec![msg("g", 4, 40).into()],
            positions: vec![position("g", 4, 1)],
            ..Batch::default()
        }))
        .unwrap();
    let page = store.read_page("g", 1, 4, 10, usize::MAX).unwrap();
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
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

/// The cmids of user `a` a full scan lists, sorted; each is also found by a lookup.
fn dedup_cmids(store: &RedbStore) -> Vec<String> {
    let mut got: Vec<String> = store
        .dedup_scan(None, usize::MAX)
        .unwrap()
        .entries
        .into_iter()
        .map(|d| d.cmid)
        .collect();
    got.sort();
    let keys: Vec<(String, String)> = got.iter().map(|c| ("a".into(), c.clone())).collect();
    let found = store.dedup_lookup(&keys).unwrap();
    assert!(
        found.iter().all(Option::is_some),
        "every key is found: {found:?}"
    );
    got
}

/// A backlog of expired dedup runs (the first expiry after a long downtime) is forgotten over
/// several transactions, oldest first, and carries on across a reopen; newer entries stay.
#[test]
fn a_large_backlog_of_expired_dedup_entries_is_forgotten_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    // 200 batches, one run each, accepted at t = 1..=200.
    for t in 1..=200u64 {
        store
            .commit(Arc::new(Batch {
                id: t,
                dedup_put: vec![dedup(&format!("old{t}"), t)],
                ..Batch::default()
            }))
            .unwrap();
    }
    store
        .commit(Arc::new(Batch {
            id: 201,
            dedup_put: vec![dedup("new", 1_000)],
            dedup_forget_before_ms: Some(500),
            ..Batch::default()
        }))
        .unwrap();
    let left = |store: &RedbStore| dedup_cmids(store).len();
    // One transaction forgets at most 64 runs: the oldest went, the newest expired ones wait.
    let after_one = left(&store);
    assert!(
        (1 + 200 - 64..=1 + 200 - 1).contains(&after_one),
        "{after_one} entries left after the first step"
    );
    let found = store
        .dedup_lookup(&[("a".into(), "old1".into()), ("a".into(), "old200".into())])
        .unwrap();
    assert_eq!(
        found,
        vec![None, Some(dedup("old200", 200))],
        "oldest first"
    );
    drop(store);
    // Later transactions (any batch) carry on, after a reopen too. (The applier may put several
    // batches in one transaction, so count until done, within a bound.)
    let store = RedbStore::open(dir.path()).unwrap();
    let mut id = 202;
    while dedup_cmids(&store).iter().any(|c| c.starts_with("old")) {
        assert!(
            id < 220,
            "the backlog is still there after {} batches",
            id - 202
        );
        store
            .commit(Arc::new(Batch {
                id,
                dedup_put: vec![dedup(&format!("later{id}"), 1_000 + id)],
                ..Batch::default()
            }))
            .unwrap();
        id += 1;
    }
    let cmids = dedup_cmids(&store);
    assert_eq!(
        cmids.len(),
        1 + (id - 202) as usize,
        "the newer entries stay: {cmids:?}"
    );
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
        .commit(Arc::new(Batch {
            id: 1,
            dedup_put: vec![dedup("z", 9)],
            ..Batch::default()
        }))
        .unwrap();
    assert_eq!(dedup_cmids(&store), ["x", "y", "z"]);
}

/// A store written before dedup entries were indexed by key (runs only) gets its key table
/// built on open: a resend accepted then is still found by a lookup.
#[test]
fn dedup_runs_without_a_key_table_are_indexed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    store
        .commit(Arc::new(Batch {
            id: 1,
            dedup_put: vec![dedup("x", 5), dedup("y", 7)],
            ..Batch::default()
        }))
        .unwrap();
    drop(store);
    {
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        let keys: redb::TableDefinition<(&str, &str), (&str, u64, u64)> =
            redb::TableDefinition::new("dedup_keys");
        assert!(tx.delete_table(keys).unwrap(), "the key table was there");
        tx.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    let found = store
        .dedup_lookup(&[("a".into(), "y".into()), ("a".into(), "w".into())])
        .unwrap();
    assert_eq!(found, vec![Some(dedup("y", 7)), None]);
    assert_eq!(dedup_cmids(&store), ["x", "y"]);
}

/// Runs written by a build that kept no key table (a downgrade, then this build again) are
/// indexed on open: a resend of a message accepted meanwhile is still found by a lookup.
#[test]
fn dedup_runs_written_without_their_keys_are_indexed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    store
        .commit(Arc::new(Batch {
            id: 1,
            dedup_put: vec![dedup("x", 5)],
            ..Batch::default()
        }))
        .unwrap();
    drop(store);
    {
        // What an older build writes: a run and the run counter, no key.
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let runs: redb::TableDefinition<(u64, u64), &[u8]> =
                redb::TableDefinition::new("dedup_runs");
            let mut meta = tx.open_table(meta).unwrap();
            let next = redb::ReadableTable::get(&meta, "next_dedup_run")
                .unwrap()
                .unwrap()
                .value();
            let run = rmp_serde::to_vec_named(&vec![dedup("y", 9)]).unwrap();
            tx.open_table(runs)
                .unwrap()
                .insert((9, next), run.as_slice())
                .unwrap();
            meta.insert("next_dedup_run", next + 1).unwrap();
        }
        tx.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    let found = store
        .dedup_lookup(&[("a".into(), "x".into()), ("a".into(), "y".into())])
        .unwrap();
    assert_eq!(found, vec![Some(dedup("x", 5)), Some(dedup("y", 9))]);
}

/// The ids of the conversations `member_convs` lists for `user`.
fn member_ids(store: &RedbStore, user: &str) -> Vec<String> {
    let ask = MemberPageAsk {
        user: user.to_string(),
        after: None,
        max_convs: usize::MAX,
        max_members: usize::MAX,
    };
    let listed = store.member_convs(&ask).unwrap();
    listed.convs.into_iter().map(|c| c.rec.id).collect()
}

/// A store written before members were indexed by user gets the index built on open.
#[test]
fn conversations_without_a_member_index_are_indexed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    store
        .commit(Arc::new(Batch {
            id: 1,
            convs: vec![conv("g", 0, 1), conv("h", 0, 1)],
            ..Batch::default()
        }))
        .unwrap();
    drop(store);
    {
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        let members: redb::TableDefinition<(&str, &str), ()> =
            redb::TableDefinition::new("members");
        assert!(tx.delete_table(members).unwrap(), "the index was there");
        tx.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(member_ids(&store, "a"), ["g", "h"]);
    assert_eq!(member_ids(&store, "b"), ["g", "h"]);
}

/// Conversations a build without the index added or changed (a downgrade, then this build
/// again) are indexed on open: their members see them in their overview.
#[test]
fn conversations_written_without_the_index_are_indexed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    store
        .commit(Arc::new(Batch {
            id: 1,
            convs: vec![conv("g", 0, 1)],
            ..Batch::default()
        }))
        .unwrap();
    drop(store);
    {
        // What an older build's applier writes: records (a new group h; carol joins g) and
        // the log position, no index.
        let db = redb::Database::create(dir.path().join("ordo.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let convs: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("convs");
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let mut convs = tx.open_table(convs).unwrap();
            let h = rmp_serde::to_vec_named(&conv("h", 0, 1)).unwrap();
            convs.insert("h", h.as_slice()).unwrap();
            let mut g = conv("g", 0, 1);
            g.members.insert("carol".into());
            let g = rmp_serde::to_vec_named(&g).unwrap();
            convs.insert("g", g.as_slice()).unwrap();
            let mut meta = tx.open_table(meta).unwrap();
            let applied = redb::ReadableTable::get(&meta, "wal_applied")
                .unwrap()
                .map_or(0, |v| v.value());
            meta.insert("wal_applied", applied + 1).unwrap();
        }
        tx.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(member_ids(&store, "a"), ["g", "h"]);
    assert_eq!(member_ids(&store, "carol"), ["g"]);
}

/// The seqs of `conv` in the file's message runs, hidden or not.
fn seqs_in_the_file(dir: &Path, conv: &str) -> Vec<u64> {
    let db = redb::Database::create(dir.join("ordo.redb")).unwrap();
    let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
    let runs: redb::TableDefinition<(&str, u64), &[u8]> =
        redb::TableDefinition::new("message_runs");
    let table = tx.open_table(runs).unwrap();
    let mut stored = Vec::new();
    for row in table.range((conv, 0)..=(conv, u64::MAX)).unwrap() {
        let run: Vec<Message> = rmp_serde::from_slice(row.unwrap().1.value()).unwrap();
        stored.extend(run.iter().map(|m| m.seq));
    }
    stored
}

/// Messages are stored in runs (per batch and conversation, at most 128 each): retention that
/// cuts through a run writes it again without the messages it removes, so that nothing removed
/// stays in the file. An age-based trim that removes nothing reports no first seq.
#[test]
fn retention_removes_from_the_file_what_it_hides() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    for (id, seqs) in [(1, 1..=10), (2, 11..=310)] {
        let last = *seqs.end();
        store
            .commit(Arc::new(Batch {
                id,
                messages: messages("g", seqs, 10),
                convs: vec![conv("g", last, 1)],
                ..Batch::default()
            }))
            .unwrap();
    }
    // By count, in the middle of the first run; by age, in the middle of a later one.
    store
        .commit(Arc::new(Batch {
            id: 3,
            convs: vec![conv("g", 310, 6)],
            trim_below: vec![("g".into(), 6)],
            ..Batch::default()
        }))
        .unwrap();
    drop(store);
    assert_eq!(
        seqs_in_the_file(dir.path(), "g"),
        (6..=310).collect::<Vec<_>>()
    );
    let store = RedbStore::open(dir.path()).unwrap();
    let out = store
        .commit(Arc::new(Batch {
            id: 4,
            trim_before_ms: vec![("g".into(), 10 * 200)],
            ..Batch::default()
        }))
        .unwrap();
    assert_eq!(out.first_seqs, vec![("g".to_string(), 200)]);
    let out = store
        .commit(Arc::new(Batch {
            id: 5,
            trim_before_ms: vec![("g".into(), 10 * 150)],
            ..Batch::default()
        }))
        .unwrap();
    assert!(out.first_seqs.is_empty(), "{:?}", out.first_seqs);
    drop(store);
    assert_eq!(
        seqs_in_the_file(dir.path(), "g"),
        (200..=310).collect::<Vec<_>>()
    );
}

/// A store file that is not a store (damaged, or something else) is refused as damage naming
/// the file, not as a permissions problem, and nothing is changed on disk.
#[test]
fn a_damaged_store_file_is_refused_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    drop(RedbStore::open(dir.path()).unwrap());
    let file = dir.path().join("ordo.redb");
    let len = std::fs::metadata(&file).unwrap().len() as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(&file, &garbage).unwrap();
    let err = match RedbStore::open(dir.path()) {
        Ok(_) => panic!("a damaged file was opened"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(text.contains("ordo.redb"), "{text}");
    assert!(
        !text.contains("writable"),
        "damage is not a permissions problem: {text}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        garbage,
        "the file is left as it was"
    );
}
