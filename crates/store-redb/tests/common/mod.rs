//! What the log tests share: batches of one conversation, and a crash imitated by copying the
//! store's files while it is open.
#![allow(dead_code)]

use ordo_core::{Batch, ConvRecord, Retention};
use ordo_protocol::{ConvKind, Message};
use ordo_store::Store;
use ordo_store_redb::RedbStore;
use std::path::Path;

pub fn conv(max_seq: u64) -> ConvRecord {
    ConvRecord {
        id: "g".into(),
        kind: ConvKind::Group,
        epoch: 7,
        max_seq,
        first_seq: 1,
        members: ["a".to_string(), "b".to_string()].into_iter().collect(),
        retention: Retention::default(),
        created_ms: 1,
        name: None,
        metadata: Default::default(),
        deleted: false,
    }
}

/// Batch `n` carries messages `(n-1)*per+1 ..= n*per` of conversation `g`.
pub fn batch(n: u64, per: u64, body_bytes: usize) -> Batch {
    let first = (n - 1) * per + 1;
    Batch {
        id: n,
        messages: (first..first + per)
            .map(|seq| {
                Message {
                    conv: "g".into(),
                    seq,
                    from: "a".into(),
                    device: "d".into(),
                    cmid: format!("c{seq}"),
                    body: format!("{seq:08}{}", "x".repeat(body_bytes)),
                    reply_to: None,
                    ts: seq,
                    event: None,
                }
                .into()
            })
            .collect(),
        convs: vec![conv(first + per - 1)],
        ..Batch::default()
    }
}

/// Copies the store's files as a crash would leave them.
pub fn crash_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["ordo.redb", "wal-0.log", "wal-1.log"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

pub fn seqs(store: &RedbStore) -> Vec<u64> {
    let page = store
        .read_page("g", 1, u64::MAX, u32::MAX, usize::MAX)
        .unwrap();
    page.messages.iter().map(|m| m.seq).collect()
}

/// A crashed copy of a store that logged `n` batches of 4 messages, one record each.
pub fn crashed_with(n: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    for k in 1..=n {
        store.commit(batch(k, 4, 40).into()).unwrap();
    }
    crash_copy(dir.path(), crashed.path());
    drop(store);
    crashed
}
