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
