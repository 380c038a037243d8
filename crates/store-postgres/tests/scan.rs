//! The dedup scan over messages in slices of time: whatever the spacing of acceptance times
//! (bursts in one millisecond, gaps of days), every entry from the cutoff on is listed exactly
//! once, whatever the page size. Skipped without a PostgreSQL outside CI, as the other tests.

use ordo_core::{Batch, ConvPosition};
use ordo_store::conformance::{conv, msg};
use ordo_store::Store;
use ordo_store_postgres::test_schema::TestSchema;
use ordo_store_postgres::PgStore;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Acceptance times: a burst of 300 in one millisecond, single messages days apart, runs a
/// second apart, another burst.
fn times() -> Vec<u64> {
    let start = 1_700_000_000_000u64;
    let mut ts = vec![start; 300];
    ts.extend((1..=40).map(|d| start + d * 86_400_000));
    let later = start + 41 * 86_400_000;
    ts.extend((0..200).map(|s| later + s * 1_000));
    ts.extend(vec![later + 500_000; 150]);
    ts
}

fn scan_all(store: &PgStore, page: usize) -> Vec<(String, u64)> {
    let mut from = None;
    let mut got = Vec::new();
    for _ in 0..100_000 {
        let p = store.dedup_scan(from, page).expect("scan");
        got.extend(p.entries.into_iter().map(|d| (d.conv, d.seq)));
        from = p.next;
        if from.is_none() {
            return got;
        }
    }
    panic!("a scan that does not end");
}

#[test]
fn every_entry_is_listed_once_whatever_the_spacing_and_the_page() {
    let Some(schema) = TestSchema::create("every_entry_is_listed_once") else {
        return;
    };
    let store = PgStore::open(&schema.url()).expect("open");
    let ts = times();
    let n = ts.len() as u64;
    let messages = ts
        .iter()
        .enumerate()
        .map(|(k, t)| Arc::new(msg("g", k as u64 + 1, *t)))
        .collect();
    store
        .commit(Arc::new(Batch {
            id: 1,
            messages,
            convs: vec![conv("g", n, 1)],
            ..Batch::default()
        }))
        .expect("commit");
    let all: Vec<(String, u64)> = (1..=n).map(|s| ("g".to_string(), s)).collect();
    for page in [1, 7, 64, 1000] {
        let mut got = scan_all(&store, page);
        assert_eq!(got.len() as u64, n, "page {page}: each once");
        got.sort();
        assert_eq!(got, all, "page {page}");
    }
    // From a cutoff on: the first burst and the first 10 days are forgotten.
    let cutoff = ts[0] + 10 * 86_400_000 + 1;
    store
        .commit(Arc::new(Batch {
            id: 2,
            dedup_forget_before_ms: Some(cutoff),
            positions: vec![ConvPosition {
                id: "g".into(),
                max_seq: n,
                first_seq: 1,
            }],
            ..Batch::default()
        }))
        .expect("commit");
    let kept: BTreeSet<(String, u64)> = scan_all(&store, 5).into_iter().collect();
    let want: BTreeSet<(String, u64)> = ts
        .iter()
        .enumerate()
        .filter(|(_, t)| **t >= cutoff)
        .map(|(k, _)| ("g".to_string(), k as u64 + 1))
        .collect();
    assert_eq!(kept, want);
}

/// A trim while the scan runs moves entries from the messages to `ordo_dedup`: every entry is
/// still listed, in one place or the other.
#[test]
fn a_trim_during_the_scan_loses_no_entry() {
    let Some(schema) = TestSchema::create("a_trim_during_the_scan_loses_no_entry") else {
        return;
    };
    let store = PgStore::open(&schema.url()).expect("open");
    let messages = (1..=40u64)
        .map(|s| Arc::new(msg("g", s, 1_700_000_000_000 + s)))
        .collect();
    store
        .commit(Arc::new(Batch {
            id: 1,
            messages,
            convs: vec![conv("g", 40, 1)],
            ..Batch::default()
        }))
        .expect("commit");
    let mut from = None;
    let mut got = BTreeSet::new();
    for page in 0..1000 {
        if page == 3 {
            // Count-based retention keeps seqs 31..=40.
            store
                .commit(Arc::new(Batch {
                    id: 2,
                    convs: vec![conv("g", 40, 31)],
                    trim_below: vec![("g".into(), 31)],
                    ..Batch::default()
                }))
                .expect("trim");
        }
        let p = store.dedup_scan(from, 5).expect("scan");
        got.extend(p.entries.into_iter().map(|d| (d.cmid, d.seq)));
        from = p.next;
        if from.is_none() {
            break;
        }
    }
    assert!(from.is_none(), "the scan ends");
    let want: BTreeSet<(String, u64)> = (1..=40).map(|s| (format!("c{s}"), s)).collect();
    assert_eq!(got, want);
}

/// A store written by schema version 3 (a dedup row beside every message) opens with its
/// newest acceptance time, and its dedup entries listed and found.
#[test]
fn a_version_3_store_keeps_its_entries_and_newest_time() {
    let Some(schema) = TestSchema::create("a_version_3_store_keeps_its_entries") else {
        return;
    };
    let mut c = postgres::Client::connect(&schema.url(), postgres::NoTls).expect("connect");
    ordo_store_postgres::schema::migrate_to(&mut c, 3).expect("schema version 3");
    for s in 1..=60i64 {
        let ts = 1_700_000_000_000i64 + s;
        c.execute(
            "INSERT INTO ordo_messages (conv, seq, from_user, device, cmid, body, reply_to, ts, event)
             VALUES ('g', $1, 'a', 'd1', $2, $3, NULL, $4, NULL)",
            &[&s, &format!("c{s}"), &b"hi".as_slice(), &ts],
        )
        .expect("a message as version 3 wrote it");
        c.execute(
            "INSERT INTO ordo_dedup (user_id, cmid, conv, seq, ts) VALUES ('a', $1, 'g', $2, $3)",
            &[&format!("c{s}"), &s, &ts],
        )
        .expect("its dedup row");
    }
    drop(c);
    let store = PgStore::open(&schema.url()).expect("open, migrating");
    assert_eq!(store.load().expect("load").last_ts, 1_700_000_000_060);
    let listed: BTreeSet<(String, u64)> = scan_all(&store, 7).into_iter().collect();
    assert_eq!(listed.len(), 60, "every entry listed");
    let found = store
        .dedup_lookup(&[("a".into(), "c60".into())])
        .expect("lookup");
    assert_eq!(found[0].as_ref().map(|d| d.seq), Some(60));
}
