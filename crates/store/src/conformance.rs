//! The conformance suite every [`Store`] backend runs: what a batch means, checked from the
//! outside through `load`, `commit`, `read_page`, `dedup_lookup` and `dedup_scan`, so that every backend, and the in-memory
//! reference the core is tested against ([`MemStore`](crate::MemStore)), agree.
//!
//! A backend implements [`Backend`] for a small test type (a temporary directory or database
//! and the store opened on it) and calls [`conformance_tests!`](crate::conformance_tests) in a
//! test file, which writes one `#[test]` per property:
//!
//! ```text
//! // The store first: fields drop in order, and it must close before its directory goes.
//! struct Redb { store: Option<RedbStore>, dir: tempfile::TempDir }
//!
//! impl ordo_store::conformance::Backend for Redb {
//!     const REFUSES_A_SEQ_STORED_TWICE: bool = false;
//!     fn open() -> Self { /* a new, empty store */ }
//!     fn store(&self) -> &dyn Store { self.store.as_ref().unwrap() }
//!     fn reopen(&mut self) { /* drop the store, open it again on the same data */ }
//! }
//!
//! ordo_store::conformance_tests!(Redb);
//! ```
//!
//! Each property is also a public function, generic over the backend. The properties check
//! what a backend must keep whatever its engine; what depends on the engine (recovering its
//! own files after a crash, a torn log record, the layout of older versions) a backend tests
//! itself. Where the contract leaves a backend latitude (keeping an expired dedup entry longer,
//! reporting a first seq for a trim that moved nothing), the suite accepts either choice.
//!
//! The records are built by [`conv`], [`msg`], [`messages`], [`position`] and [`cursor`], which
//! a backend's own tests may use too.

use crate::{Page, Store, StoreError};
use ordo_core::{
    AgeSweep, Batch, ConvPosition, ConvRecord, CursorRecord, DedupRecord, GroupPage, MemberPageAsk,
    Retention,
};
use ordo_protocol::{ConvKind, Message};
use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::Arc;

/// A backend under test: a store on data of its own, which can be closed and opened again.
pub trait Backend: Sized {
    /// Whether a batch that stores a seq its conversation already holds is refused whole, with
    /// [`StoreError::Conflict`] (a race between writers, not damage). A backend that cannot look without
    /// slowing every commit may trust its one writer (the core, whose numbering the simulation
    /// checks) and say `false`: the property is then not checked.
    const REFUSES_A_SEQ_STORED_TWICE: bool;

    /// Whether the backend can run here: a backend that needs a database server says why not
    /// (its test is then skipped, with the reason printed). It panics instead where a skip is
    /// not allowed (in CI, `CI=true`).
    fn available() -> Result<(), String> {
        Ok(())
    }

    /// Opens a new, empty store.
    fn open() -> Self;

    /// The store opened last.
    fn store(&self) -> &dyn Store;

    /// Closes the store and opens it again on the same data, as a restart of the server does:
    /// everything a `commit` returned for must be there.
    fn reopen(&mut self);
}

/// Writes one `#[test]` per property of the suite for the [`Backend`] given, each named as its
/// property (a function of [`conformance`](crate::conformance)).
#[macro_export]
macro_rules! conformance_tests {
    ($backend:ty) => {
        $crate::conformance_tests!(@each $backend;
            a_committed_batch_is_read_back,
            pages_start_and_end_anywhere,
            a_read_right_after_commit_sees_the_batch,
            retention_by_count_and_by_age,
            seq_ranges_move_apart_from_the_record,
            conversations_and_cursors_round_trip,
            dedup_entries_survive_a_reopen_and_are_forgotten_by_time,
            a_client_message_id_is_one_entry_per_user,
            a_dedup_lookup_sees_every_commit_at_once,
            a_seq_stored_twice_is_refused_whole,
            conversations_load_one_at_a_time_and_by_member,
            age_retention_sweeps_every_conversation_in_slices,
            groups_are_listed_in_pages_without_direct_or_deleted_ones,
            any_body_is_kept_as_sent,
        );
    };
    (@each $backend:ty; $($property:ident),+ $(,)?) => {
        $(
            #[test]
            fn $property() {
                if let Err(why) = <$backend as $crate::conformance::Backend>::available() {
                    eprintln!("SKIPPED {}: {why}", stringify!($property));
                    return;
                }
                $crate::conformance::$property::<$backend>();
            }
        )+
    };
}

/// The records of those of `ids` the store holds, in the order asked.
pub fn records(s: &dyn Store, ids: &[&str]) -> Vec<ConvRecord> {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let loaded = s.load_convs(&ids).expect("load conversations");
    assert_eq!(loaded.len(), ids.len(), "one answer per conversation asked");
    loaded.into_iter().flatten().map(|c| c.rec).collect()
}

/// The device positions stored for `ids`, in the order asked (each conversation's in key order).
pub fn stored_cursors(s: &dyn Store, ids: &[&str]) -> Vec<CursorRecord> {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let loaded = s.load_convs(&ids).expect("load conversations");
    loaded
        .into_iter()
        .flatten()
        .flat_map(|c| c.cursors)
        .collect()
}

/// A group conversation `id` of members `a` and `b`, its seqs in `first_seq..=max_seq`, with a
/// name and metadata (which every case then checks come back as written).
pub fn conv(id: &str, max_seq: u64, first_seq: u64) -> ConvRecord {
    ConvRecord {
        id: id.into(),
        kind: ConvKind::Group,
        epoch: 7,
        max_seq,
        first_seq,
        members: ["a".to_string(), "b".to_string()].into_iter().collect(),
        retention: Retention::default(),
        created_ms: 1,
        name: Some(format!("Group {id}")),
        metadata: [("topic".to_string(), "tests".to_string())].into(),
        deleted: false,
    }
}

/// Message `seq` of `conv`, sent by `a` at `ts` with client message id `c<seq>` and the body
/// `body <seq>`; message 1 also carries a membership event (which then comes back with it).
pub fn msg(conv: &str, seq: u64, ts: u64) -> Message {
    Message {
        conv: conv.into(),
        seq,
        from: "a".into(),
        device: "d1".into(),
        cmid: format!("c{seq}"),
        body: format!("body {seq}"),
        reply_to: None,
        ts,
        event: (seq == 1).then(|| ordo_protocol::ConvEvent::Joined {
            users: vec!["a".into(), "b".into()],
        }),
    }
}

/// Messages `seqs` of `conv` as [`msg`] makes them, message `s` sent at `ts_step * s`.
pub fn messages(conv: &str, seqs: RangeInclusive<u64>, ts_step: u64) -> Vec<Arc<Message>> {
    seqs.map(|s| Arc::new(msg(conv, s, ts_step * s))).collect()
}

/// `conv`'s seq range alone: `first_seq..=max_seq`.
pub fn position(conv: &str, max_seq: u64, first_seq: u64) -> ConvPosition {
    ConvPosition {
        id: conv.into(),
        max_seq,
        first_seq,
    }
}

/// Batch `id`: creates `conv` ([`conv`]) with messages `1..=n` ([`messages`]).
pub fn created(id: u64, conv_id: &str, n: u64, ts_step: u64) -> Batch {
    Batch {
        id,
        messages: messages(conv_id, 1..=n, ts_step),
        convs: vec![conv(conv_id, n, 1)],
        ..Batch::default()
    }
}

/// Batch `id`: messages `seqs` of `conv` ([`messages`]), its range moved to end there.
pub fn appended(id: u64, conv: &str, seqs: RangeInclusive<u64>, ts_step: u64) -> Batch {
    Batch {
        id,
        positions: vec![position(conv, *seqs.end(), 1)],
        messages: messages(conv, seqs, ts_step),
        ..Batch::default()
    }
}

/// Batch `id`: `conv`'s messages below `below` go (count-based retention), its record ([`conv`],
/// up to `max_seq`) saying so.
fn trimmed_below(id: u64, conv_id: &str, max_seq: u64, below: u64) -> Batch {
    Batch {
        id,
        convs: vec![conv(conv_id, max_seq, below)],
        trim_below: vec![(conv_id.into(), below)],
        ..Batch::default()
    }
}

/// Batch `id`: `conv`'s messages accepted before `before_ms` go (age-based retention).
fn trimmed_by_age(id: u64, conv: &str, before_ms: u64) -> Batch {
    Batch {
        id,
        trim_before_ms: vec![(conv.into(), before_ms)],
        ..Batch::default()
    }
}

/// The positions of `user`'s `device` in `conv`.
pub fn cursor(conv: &str, user: &str, device: &str, delivered: u64, read: u64) -> CursorRecord {
    CursorRecord {
        conv: conv.into(),
        user: user.into(),
        device: device.into(),
        delivered,
        read,
    }
}

fn seqs(page: &Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

fn page(store: &dyn Store, conv: &str, from: u64, to: u64, limit: u32, max_bytes: usize) -> Page {
    store
        .read_page(conv, from, to, limit, max_bytes)
        .unwrap_or_else(|e| panic!("read_page({conv}, {from}, {to}, {limit}, {max_bytes}): {e}"))
}

fn commit(store: &dyn Store, batch: Batch) -> Vec<(String, u64)> {
    let id = batch.id;
    store
        .commit(batch.into())
        .unwrap_or_else(|e| panic!("commit of batch {id}: {e} ({e:?})"))
        .first_seqs
}

/// Runs `check` on the store, then again after a reopen: what it checks is durable.
fn now_and_after_reopen<B: Backend>(backend: &mut B, check: impl Fn(&dyn Store)) {
    check(backend.store());
    backend.reopen();
    check(backend.store());
}

/// A dedup entry as [`dedup_entries`] lists it: (user, cmid, conversation, seq, time).
fn entry(user: &str, cmid: &str, conv: &str, seq: u64, ts: u64) -> DedupEntryView {
    (user.into(), cmid.into(), conv.into(), seq, ts)
}

type DedupEntryView = (String, String, String, u64, u64);

/// The dedup entries the store holds, as (user, cmid, conv, seq, ts), sorted: what a full
/// `dedup_scan` lists (read two at a time, so that every scan resumes), the newest per key (a
/// scan may still list an entry a newer one of its key replaced). Each must be what
/// `dedup_lookup` answers for its key.
fn dedup_entries(store: &dyn Store) -> Vec<DedupEntryView> {
    let mut newest: BTreeMap<(String, String), DedupRecord> = BTreeMap::new();
    let mut from = None;
    for _ in 0..10_000 {
        let page = store.dedup_scan(from, 2).expect("dedup scan");
        for d in page.entries {
            let key = (d.user.clone(), d.cmid.clone());
            if newest.get(&key).is_none_or(|n| n.ts <= d.ts) {
                newest.insert(key, d);
            }
        }
        from = page.next;
        if from.is_none() {
            break;
        }
    }
    assert!(from.is_none(), "a dedup scan that does not end");
    let keys: Vec<(String, String)> = newest.keys().cloned().collect();
    let found = store.dedup_lookup(&keys).expect("dedup lookup");
    assert_eq!(found.len(), keys.len(), "one answer per key looked up");
    for (key, got) in keys.iter().zip(found) {
        assert_eq!(got.as_ref(), newest.get(key), "lookup of {key:?}");
    }
    newest
        .into_values()
        .map(|d| (d.user, d.cmid, d.conv, d.seq, d.ts))
        .collect()
}

/// A body is kept as sent, whatever characters it holds: NUL (which the protocol allows, and
/// a database's text type may not), control characters, any script and emoji.
pub fn any_body_is_kept_as_sent<B: Backend>() {
    let mut b = B::open();
    let bodies = [
        "nul\u{0}inside",
        "\u{0}",
        "tab\tnew\nline\r",
        "日本語 🙂 \u{7f}",
        "",
    ];
    let mut batch = created(1, "g", bodies.len() as u64, 10);
    for (m, body) in batch.messages.iter_mut().zip(bodies) {
        Arc::make_mut(m).body = body.to_string();
    }
    commit(b.store(), batch);
    now_and_after_reopen(&mut b, |s| {
        let got = page(s, "g", 1, u64::MAX, u32::MAX, usize::MAX);
        let got: Vec<&str> = got.messages.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(got, bodies);
    });
}

/// A committed batch is read back, across a reopen: its conversation record, its messages whole
/// and in seq order, `first_seq` with them. A page holds seqs in `from..=to`, at most `limit`,
/// and stops after the message that brings the bodies to `max_bytes`, so it holds at least one
/// message when there is one.
pub fn a_committed_batch_is_read_back<B: Backend>() {
    let mut b = B::open();
    // Beside its messages (each its own dedup entry), a batch may carry a dedup entry of its
    // own: a resend answered for another conversation.
    let batch = Batch {
        dedup_put: vec![DedupRecord {
            user: "b".into(),
            cmid: "elsewhere".into(),
            conv: "h".into(),
            seq: 9,
            ts: 5,
        }],
        ..created(1, "g", 3, 10)
    };
    let reported = commit(b.store(), batch);
    assert!(reported.is_empty(), "no age-based trim: {reported:?}");
    now_and_after_reopen(&mut b, |s| {
        assert_eq!(records(s, &["g"]), vec![conv("g", 3, 1)]);
        assert_eq!(
            dedup_entries(s),
            vec![
                entry("a", "c1", "g", 1, 10),
                entry("a", "c2", "g", 2, 20),
                entry("a", "c3", "g", 3, 30),
                entry("b", "elsewhere", "h", 9, 5),
            ]
        );
        let all = vec![msg("g", 1, 10), msg("g", 2, 20), msg("g", 3, 30)];
        let p = page(s, "g", 1, 3, 10, usize::MAX);
        assert_eq!((p.first_seq, &p.messages), (1, &all));
        let p = page(s, "g", 0, u64::MAX, u32::MAX, usize::MAX);
        assert_eq!(p.messages, all);
        assert_eq!(
            page(s, "g", 2, 3, 1, usize::MAX).messages,
            vec![all[1].clone()]
        );
        assert_eq!(seqs(&page(s, "g", 2, 2, 10, usize::MAX)), vec![2]);
        // The byte budget ends a page after the message that reaches it ("body 1" is 6 bytes).
        for (max_bytes, n) in [(13, 3), (12, 2), (7, 2), (6, 1), (1, 1), (0, 1)] {
            let p = page(s, "g", 1, 3, 10, max_bytes);
            assert_eq!(
                seqs(&p),
                (1..=n).collect::<Vec<_>>(),
                "max_bytes {max_bytes}"
            );
        }
        for (from, to, limit) in [(3, 2, 10), (4, 10, 10), (1, 3, 0)] {
            let p = page(s, "g", from, to, limit, usize::MAX);
            assert!(p.messages.is_empty(), "{from}..={to}, limit {limit}");
        }
        assert!(page(s, "nope", 1, 3, 10, usize::MAX).messages.is_empty());
    });
}

/// Pages start and end anywhere: inside what one batch stored, across batches of 1, 10 and 300
/// messages, with another conversation's messages in the same batches. Retention that cuts
/// through what one batch stored hides the part below the new first seq.
pub fn pages_start_and_end_anywhere<B: Backend>() {
    let mut b = B::open();
    let mut next = 1;
    for (id, n) in [(1, 1), (2, 10), (3, 300)] {
        let (g, h) = (
            messages("g", next..=next + n - 1, 10),
            messages("h", next..=next + n - 1, 10),
        );
        next += n;
        commit(
            b.store(),
            Batch {
                id,
                messages: g.into_iter().zip(h).flat_map(|(g, h)| [g, h]).collect(),
                convs: vec![conv("g", next - 1, 1), conv("h", next - 1, 1)],
                ..Batch::default()
            },
        );
    }
    let s = b.store();
    let p = page(s, "g", 5, 8, 100, usize::MAX);
    assert_eq!(seqs(&p), vec![5, 6, 7, 8]);
    assert!(p.messages.iter().all(|m| m.conv == "g"));
    assert_eq!(
        seqs(&page(s, "g", 1, 311, 1000, usize::MAX)),
        (1..=311).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&page(s, "g", 100, 311, 50, usize::MAX)),
        (100..150).collect::<Vec<_>>()
    );
    // Bodies of one-digit seqs are 6 bytes: the page stops at the message that reaches 20.
    assert_eq!(seqs(&page(s, "h", 2, 311, 100, 20)), vec![2, 3, 4, 5]);
    assert!(page(s, "g", 312, 400, 10, usize::MAX).messages.is_empty());

    // Count retention in the middle of the 10-message batch.
    commit(s, trimmed_below(4, "g", 311, 6));
    let p = page(s, "g", 1, 8, 100, usize::MAX);
    assert_eq!((p.first_seq, seqs(&p)), (6, vec![6, 7, 8]));
    // Age retention in the middle of the 300-message batch.
    let reported = commit(s, trimmed_by_age(5, "g", 10 * 200));
    assert_eq!(reported, vec![("g".to_string(), 200)]);
    // Nothing older than the cutoff is left: the first seq stays (reporting it is allowed).
    let reported = commit(s, trimmed_by_age(6, "g", 10 * 150));
    assert!(
        reported.iter().all(|r| *r == ("g".to_string(), 200)),
        "{reported:?}"
    );
    now_and_after_reopen(&mut b, |s| {
        let p = page(s, "g", 1, 202, 100, usize::MAX);
        assert_eq!((p.first_seq, seqs(&p)), (200, vec![200, 201, 202]));
        // The other conversation is untouched.
        let p = page(s, "h", 1, 3, 100, usize::MAX);
        assert_eq!((p.first_seq, seqs(&p)), (1, vec![1, 2, 3]));
    });
}

/// A read sees every batch whose `commit` returned, however soon after it is asked for.
pub fn a_read_right_after_commit_sees_the_batch<B: Backend>() {
    let b = B::open();
    let s = b.store();
    commit(s, created(1, "g", 3, 1));
    for n in 2..=200u64 {
        commit(s, appended(n, "g", (n - 1) * 3 + 1..=n * 3, 1));
        let p = page(s, "g", 1, u64::MAX, u32::MAX, usize::MAX);
        assert_eq!(p.messages.len() as u64, n * 3, "after batch {n}");
    }
    assert_eq!(records(s, &["g"]), vec![conv("g", 600, 1)]);
}

/// Retention removes below a seq (by count) and before a time (by age); both move `first_seq`,
/// an age-based trim reports the new first seq, and a conversation whose every message is too
/// old has its first seq past its max seq.
pub fn retention_by_count_and_by_age<B: Backend>() {
    let mut b = B::open();
    let s = b.store();
    commit(s, created(1, "g", 10, 100));
    // Count: keep from seq 4.
    commit(s, trimmed_below(2, "g", 10, 4));
    let p = page(s, "g", 1, 10, 100, usize::MAX);
    assert_eq!((p.first_seq, seqs(&p)), (4, (4..=10).collect::<Vec<_>>()));
    // Age: everything accepted before t=650 goes (seqs 4, 5, 6).
    let reported = commit(s, trimmed_by_age(3, "g", 650));
    assert_eq!(reported, vec![("g".to_string(), 7)]);
    now_and_after_reopen(&mut b, |s| {
        let p = page(s, "g", 1, 10, 100, usize::MAX);
        assert_eq!((p.first_seq, seqs(&p)), (7, vec![7, 8, 9, 10]));
        assert_eq!(records(s, &["g"]), vec![conv("g", 10, 7)]);
    });
    // Everything too old: first_seq moves past max_seq.
    let reported = commit(b.store(), trimmed_by_age(4, "g", 10_000));
    assert_eq!(reported, vec![("g".to_string(), 11)]);
    now_and_after_reopen(&mut b, |s| {
        let p = page(s, "g", 1, 10, 100, usize::MAX);
        assert_eq!((p.first_seq, seqs(&p)), (11, Vec::<u64>::new()));
        assert_eq!(records(s, &["g"]), vec![conv("g", 10, 11)]);
        // A trimmed message's client message id is still known: its resend inside the dedup
        // window must not become a second message.
        let keys: Vec<(String, String)> = [1, 5, 10]
            .iter()
            .map(|n| ("a".to_string(), format!("c{n}")))
            .collect();
        let found = s.dedup_lookup(&keys).expect("dedup lookup");
        let seqs: Vec<Option<u64>> = found.iter().map(|d| d.as_ref().map(|d| d.seq)).collect();
        assert_eq!(seqs, vec![Some(1), Some(5), Some(10)]);
        assert_eq!(dedup_entries(s).len(), 10);
    });
    // Past the dedup window, they may go.
    commit(
        b.store(),
        Batch {
            id: 5,
            dedup_forget_before_ms: Some(10_000),
            ..Batch::default()
        },
    );
    now_and_after_reopen(&mut b, |s| {
        assert!(dedup_entries(s).is_empty());
    });
}

/// A conversation's seq range moves without its record (`positions`: a large group's member
/// list is not rewritten with every message), never moves back, and survives a reopen; `load`
/// returns the record with its current range, and a page nothing below its first seq.
pub fn seq_ranges_move_apart_from_the_record<B: Backend>() {
    let mut b = B::open();
    let s = b.store();
    commit(s, created(1, "g", 2, 10));
    commit(s, appended(2, "g", 3..=5, 10));
    let moved = |id, max_seq, first_seq| Batch {
        id,
        positions: vec![position("g", max_seq, first_seq)],
        ..Batch::default()
    };
    // Lower numbers than stored change nothing.
    commit(s, moved(3, 4, 1));
    // A page holds nothing below the first seq, even where only the range says so.
    commit(s, moved(4, 5, 2));
    let p = page(s, "g", 1, 5, 10, usize::MAX);
    assert_eq!((p.first_seq, seqs(&p)), (2, vec![2, 3, 4, 5]));
    commit(
        s,
        Batch {
            trim_below: vec![("g".into(), 3)],
            ..moved(5, 5, 3)
        },
    );
    now_and_after_reopen(&mut b, |s| {
        let p = page(s, "g", 1, 5, 10, usize::MAX);
        assert_eq!((p.first_seq, seqs(&p)), (3, vec![3, 4, 5]));
        assert_eq!(records(s, &["g"]), vec![conv("g", 5, 3)]);
    });
    // Age-based retention moves the range too.
    let reported = commit(b.store(), trimmed_by_age(6, "g", 45));
    assert_eq!(reported, vec![("g".to_string(), 5)]);
    now_and_after_reopen(&mut b, |s| {
        assert_eq!(records(s, &["g"]), vec![conv("g", 5, 5)]);
    });
}

/// Conversation records (kind, epoch, members, retention, creation time) and device cursors
/// come back from `load` as committed, across a reopen; a record committed again replaces the
/// one before (a member removed, retention changed), and so does a device's cursor.
pub fn conversations_and_cursors_round_trip<B: Backend>() {
    let mut b = B::open();
    let group = ConvRecord {
        members: ["a", "b", "c"].iter().map(|u| u.to_string()).collect(),
        retention: Retention {
            max_age_ms: Some(86_400_000),
            max_count: Some(50),
        },
        epoch: 3,
        created_ms: 1_000,
        ..conv("g", 0, 1)
    };
    let direct = ConvRecord {
        kind: ConvKind::Direct,
        retention: Retention {
            max_age_ms: None,
            max_count: Some(10),
        },
        ..conv("d:a:b", 0, 1)
    };
    commit(
        b.store(),
        Batch {
            id: 1,
            convs: vec![group.clone(), direct.clone()],
            cursors: vec![
                cursor("g", "b", "phone", 0, 0),
                cursor("g", "b", "laptop", 0, 0),
                cursor("d:a:b", "a", "d1", 0, 0),
            ],
            ..Batch::default()
        },
    );
    let changed = ConvRecord {
        members: ["a", "c"].iter().map(|u| u.to_string()).collect(),
        retention: Retention {
            max_age_ms: None,
            max_count: Some(5),
        },
        ..group.clone()
    };
    commit(
        b.store(),
        Batch {
            id: 2,
            convs: vec![changed.clone()],
            cursors: vec![
                cursor("g", "b", "phone", 2, 1),
                cursor("g", "c", "tab", 1, 1),
            ],
            ..Batch::default()
        },
    );
    now_and_after_reopen(&mut b, |s| {
        let convs = records(s, &["d:a:b", "g"]);
        assert_eq!(convs, vec![direct.clone(), changed.clone()]);
        let mut cursors = stored_cursors(s, &["d:a:b", "g"]);
        cursors.sort_by(|x, y| (&x.conv, &x.user, &x.device).cmp(&(&y.conv, &y.user, &y.device)));
        assert_eq!(
            cursors,
            vec![
                cursor("d:a:b", "a", "d1", 0, 0),
                cursor("g", "b", "laptop", 0, 0),
                cursor("g", "b", "phone", 2, 1),
                cursor("g", "c", "tab", 1, 1),
            ]
        );
    });
}

/// Every message is its own dedup entry (sender, cmid) -> (conv, seq, ts), and `dedup_put`
/// adds others; they come back from `load` across a reopen. `dedup_forget_before_ms` forgets
/// by acceptance time: never an entry accepted at or after the cutoff (nor one the same batch
/// puts); an entry before it may be kept a while with a newer one of its own batch, but a batch
/// whose every entry is older is forgotten whole.
pub fn dedup_entries_survive_a_reopen_and_are_forgotten_by_time<B: Backend>() {
    let mut b = B::open();
    let put = |cmid: &str, ts: u64| DedupRecord {
        user: "b".into(),
        cmid: cmid.into(),
        conv: "h".into(),
        seq: ts,
        ts,
    };
    // Messages 1 and 2 at 10 and 20, entries put at 20 and 30, message 3 at 30.
    commit(b.store(), created(1, "g", 2, 10));
    commit(
        b.store(),
        Batch {
            id: 2,
            dedup_put: vec![put("b1", 20), put("b2", 30)],
            ..Batch::default()
        },
    );
    commit(b.store(), appended(3, "g", 3..=3, 10));
    now_and_after_reopen(&mut b, |s| {
        assert_eq!(
            dedup_entries(s),
            vec![
                entry("a", "c1", "g", 1, 10),
                entry("a", "c2", "g", 2, 20),
                entry("a", "c3", "g", 3, 30),
                entry("b", "b1", "h", 20, 20),
                entry("b", "b2", "h", 30, 30),
            ]
        );
    });
    // Before 25: batch 1's entries go, b1 (20) may stay with b2 (30). A resend of cmid c1
    // accepted again past its window is put by the same batch and stays.
    let mut again = appended(4, "g", 4..=4, 10);
    Arc::make_mut(&mut again.messages[0]).cmid = "c1".into();
    again.dedup_forget_before_ms = Some(25);
    commit(b.store(), again);
    now_and_after_reopen(&mut b, |s| {
        let mut got = dedup_entries(s);
        got.retain(|e| *e != entry("b", "b1", "h", 20, 20));
        assert_eq!(
            got,
            vec![
                entry("a", "c1", "g", 4, 40),
                entry("a", "c3", "g", 3, 30),
                entry("b", "b2", "h", 30, 30),
            ],
            "the renewed entry, not the forgotten one"
        );
    });
    commit(
        b.store(),
        Batch {
            id: 5,
            dedup_forget_before_ms: Some(41),
            ..Batch::default()
        },
    );
    now_and_after_reopen(&mut b, |s| {
        assert!(dedup_entries(s).is_empty());
    });
}

/// A client message id belongs to its sender: the same id used by two users is two entries;
/// one user's id used again (past its window, in another conversation) replaces that user's
/// entry, and a lookup answers the newer one.
pub fn a_client_message_id_is_one_entry_per_user<B: Backend>() {
    let mut b = B::open();
    let sent = |conv: &str, seq: u64, from: &str, ts: u64| {
        let mut m = msg(conv, seq, ts);
        m.from = from.into();
        m.cmid = "x".into();
        Arc::new(m)
    };
    commit(
        b.store(),
        Batch {
            id: 1,
            messages: vec![sent("g", 1, "a", 10), sent("g", 2, "b", 11)],
            convs: vec![conv("g", 2, 1)],
            ..Batch::default()
        },
    );
    commit(
        b.store(),
        Batch {
            id: 2,
            messages: vec![sent("h", 1, "a", 20)],
            convs: vec![conv("h", 1, 1)],
            ..Batch::default()
        },
    );
    now_and_after_reopen(&mut b, |s| {
        let x = |user: &str, conv: &str, seq, ts| {
            (user.to_string(), "x".to_string(), conv.to_string(), seq, ts)
        };
        assert_eq!(
            dedup_entries(s),
            vec![x("a", "h", 1, 20), x("b", "g", 2, 11)]
        );
        assert_eq!(page(s, "g", 1, 2, 10, usize::MAX).messages.len(), 2);
        assert_eq!(page(s, "h", 1, 1, 10, usize::MAX).messages.len(), 1);
    });
    // Forgetting the first batch's time leaves the newer entry of the reused id alone.
    commit(
        b.store(),
        Batch {
            id: 3,
            dedup_forget_before_ms: Some(12),
            ..Batch::default()
        },
    );
    now_and_after_reopen(&mut b, |s| {
        let got = s
            .dedup_lookup(&[("a".into(), "x".into()), ("b".into(), "x".into())])
            .expect("dedup lookup");
        assert_eq!(
            got[0].as_ref().map(|d| (d.conv.as_str(), d.ts)),
            Some(("h", 20))
        );
        assert_eq!(got[1], None, "b's entry was accepted before the cutoff");
    });
}

/// A lookup right after a commit returned sees the batch's entries (no reopen, no waiting), in
/// the order of the keys asked, a key asked twice answered twice, and an unknown key as none.
/// Many entries in many batches are all found, and a scan lists each.
pub fn a_dedup_lookup_sees_every_commit_at_once<B: Backend>() {
    let b = B::open();
    let s = b.store();
    commit(s, created(1, "g", 1, 10));
    for id in 2..=60u64 {
        let n = (id - 1) * 5;
        commit(s, appended(id, "g", n - 3..=n + 1, 1));
        let keys: Vec<(String, String)> = [n + 1, 1, n + 1, 10_000, n - 3]
            .iter()
            .map(|seq| ("a".to_string(), format!("c{seq}")))
            .collect();
        let got = s.dedup_lookup(&keys).expect("dedup lookup");
        let seqs: Vec<Option<u64>> = got.iter().map(|d| d.as_ref().map(|d| d.seq)).collect();
        assert_eq!(
            seqs,
            [Some(n + 1), Some(1), Some(n + 1), None, Some(n - 3)],
            "after batch {id}"
        );
        assert!(got.iter().flatten().all(|d| d.conv == "g" && d.user == "a"));
    }
    assert_eq!(dedup_entries(s).len(), 296);
    assert_eq!(s.dedup_lookup(&[]).expect("an empty lookup"), vec![]);
}

/// A batch that stores a seq its conversation already holds is refused with a `Conflict` error
/// (not `Corrupt`: nothing stored is damaged), not a panic, and leaves no trace: none of its messages, records, cursors,
/// dedup entries or trims is applied (a batch is all or nothing). Checked only for backends that
/// refuse ([`Backend::REFUSES_A_SEQ_STORED_TWICE`]).
pub fn a_seq_stored_twice_is_refused_whole<B: Backend>() {
    if !B::REFUSES_A_SEQ_STORED_TWICE {
        return;
    }
    let mut b = B::open();
    commit(
        b.store(),
        Batch {
            cursors: vec![cursor("g", "b", "phone", 1, 1)],
            ..created(1, "g", 3, 10)
        },
    );
    let mut twice = msg("g", 2, 50);
    twice.cmid = "again".into();
    let refused = b.store().commit(Arc::new(Batch {
        id: 2,
        messages: vec![msg("g", 4, 40).into(), twice.into(), msg("h", 1, 40).into()],
        convs: vec![conv("g", 4, 2), conv("h", 1, 1)],
        cursors: vec![cursor("g", "b", "phone", 3, 3)],
        dedup_put: vec![DedupRecord {
            user: "b".into(),
            cmid: "elsewhere".into(),
            conv: "g".into(),
            seq: 9,
            ts: 40,
        }],
        trim_below: vec![("g".into(), 2)],
        dedup_forget_before_ms: Some(100),
        ..Batch::default()
    }));
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "a seq stored twice: {refused:?}"
    );
    now_and_after_reopen(&mut b, |s| {
        assert_eq!(records(s, &["g", "h"]), vec![conv("g", 3, 1)]);
        assert_eq!(
            stored_cursors(s, &["g", "h"]),
            vec![cursor("g", "b", "phone", 1, 1)]
        );
        assert_eq!(
            dedup_entries(s)
                .into_iter()
                .map(|e| e.1)
                .collect::<Vec<_>>(),
            ["c1", "c2", "c3"]
        );
        let p = page(s, "g", 1, 10, 10, usize::MAX);
        assert_eq!(
            p,
            Page {
                first_seq: 1,
                messages: vec![msg("g", 1, 10), msg("g", 2, 20), msg("g", 3, 30)],
            }
        );
        assert!(page(s, "h", 1, 10, 10, usize::MAX).messages.is_empty());
    });
}

/// `load_convs` answers each id asked (`None` for one not stored) with its record and device
/// positions; `member_convs` lists exactly the conversations a user is a member of, in id
/// order, following membership changes, across a reopen, in pages (after an id, at most so
/// many conversations, and stopping once the members read reach a bound).
pub fn conversations_load_one_at_a_time_and_by_member<B: Backend>() {
    let mut b = B::open();
    let s = b.store();
    let with = |id: &str, members: &[&str]| ConvRecord {
        members: members.iter().map(|m| m.to_string()).collect(),
        ..conv(id, 0, 1)
    };
    commit(
        s,
        Batch {
            id: 1,
            convs: vec![
                with("g", &["a", "b"]),
                with("h", &["a", "c"]),
                with("d:a:b", &["a", "b"]),
            ],
            cursors: vec![
                cursor("g", "b", "phone", 0, 0),
                cursor("h", "c", "tab", 0, 0),
            ],
            ..Batch::default()
        },
    );
    // b leaves g; c joins it.
    commit(
        s,
        Batch {
            id: 2,
            convs: vec![with("g", &["a", "c"])],
            ..Batch::default()
        },
    );
    now_and_after_reopen(&mut b, |s| {
        let page = |user: &str, after: Option<&str>, max_convs, max_members| {
            let ask = MemberPageAsk {
                user: user.to_string(),
                after: after.map(str::to_string),
                max_convs,
                max_members,
            };
            let page = s.member_convs(&ask).expect("member_convs");
            let ids: Vec<String> = page.convs.iter().map(|c| c.rec.id.clone()).collect();
            (ids, page.more)
        };
        let ids = |user: &str| page(user, None, usize::MAX, usize::MAX).0;
        assert_eq!(ids("a"), ["d:a:b", "g", "h"]);
        assert_eq!(ids("b"), ["d:a:b"]);
        assert_eq!(ids("c"), ["g", "h"]);
        assert!(ids("nobody").is_empty());
        // Pages: after an id (listed or not), at most so many, and bounded in members read.
        let all = usize::MAX;
        assert_eq!(
            page("a", None, 2, all),
            (vec!["d:a:b".into(), "g".into()], true)
        );
        assert_eq!(page("a", Some("g"), 2, all), (vec!["h".into()], false));
        assert_eq!(
            page("a", Some("e"), 5, all),
            (vec!["g".into(), "h".into()], false)
        );
        assert_eq!(page("a", Some("h"), 5, all), (vec![], false));
        assert_eq!(page("a", None, 5, 1), (vec!["d:a:b".into()], true));
        assert_eq!(
            page("a", None, 5, 3),
            (vec!["d:a:b".into(), "g".into()], true)
        );
        assert_eq!(page("b", Some("d:a:b"), 5, 1), (vec![], false));
        let h = s
            .member_convs(&MemberPageAsk {
                user: "c".into(),
                after: Some("g".into()),
                max_convs: 1,
                max_members: all,
            })
            .expect("member_convs")
            .convs
            .into_iter()
            .find(|c| c.rec.id == "h")
            .expect("h listed");
        assert_eq!(h.cursors, vec![cursor("h", "c", "tab", 0, 0)]);
        let loaded = s
            .load_convs(&["missing".to_string(), "g".to_string()])
            .expect("load_convs");
        assert_eq!(loaded.len(), 2);
        assert!(loaded[0].is_none());
        let g = loaded[1].as_ref().expect("g is stored");
        assert_eq!(g.rec, with("g", &["a", "c"]));
        assert_eq!(g.cursors, vec![cursor("g", "b", "phone", 0, 0)]);
    });
}

/// An age sweep covers the stored conversations in id order, `max_convs` at a time, each by
/// its own max age or else the default; it names those holding a message older than their
/// cutoff (nothing is removed until a batch trims them), says where the next step starts, and
/// ends with `swept_to` `None`.
pub fn age_retention_sweeps_every_conversation_in_slices<B: Backend>() {
    let mut b = B::open();
    let s = b.store();
    let aged = ConvRecord {
        retention: Retention {
            max_age_ms: Some(500),
            max_count: None,
        },
        ..conv("g1", 10, 1)
    };
    // Messages at t = 100, 200, ... 1000 in each.
    let all = [
        messages("g1", 1..=10, 100),
        messages("g2", 1..=10, 100),
        messages("g3", 1..=10, 100),
    ];
    commit(
        s,
        Batch {
            id: 1,
            messages: all.concat(),
            convs: vec![aged, conv("g2", 10, 1), conv("g3", 10, 1)],
            ..Batch::default()
        },
    );
    let sweep = |after: Option<&str>, default: Option<u64>| AgeSweep {
        now_ms: 1_000,
        default_max_age_ms: default,
        after: after.map(str::to_string),
        max_convs: 2,
    };
    // g1 keeps what is younger than 500 ms at t = 1000; g2 has no max age.
    let first = s.expired(&sweep(None, None)).expect("sweep");
    assert_eq!(first.trims, vec![("g1".to_string(), 500)]);
    assert_eq!(first.swept_to.as_deref(), Some("g2"));
    let last = s.expired(&sweep(Some("g2"), None)).expect("sweep");
    assert!(last.trims.is_empty(), "{:?}", last.trims);
    assert_eq!(last.swept_to, None);
    // Nothing was removed by asking.
    assert_eq!(seqs(&page(s, "g1", 1, 10, 100, usize::MAX)).len(), 10);
    let reported = commit(s, trimmed_by_age(2, "g1", 500));
    assert_eq!(reported, vec![("g1".to_string(), 5)]);
    now_and_after_reopen(&mut b, |s| {
        // Trimmed: g1 has nothing past its age any more; a default max age names the others.
        let again = s.expired(&sweep(None, None)).expect("sweep");
        assert!(again.trims.is_empty(), "{:?}", again.trims);
        let with_default = s.expired(&sweep(Some("g1"), Some(250))).expect("sweep");
        assert_eq!(
            with_default.trims,
            vec![("g2".to_string(), 750), ("g3".to_string(), 750)]
        );
    });
}

/// The admin API's list of groups: in id order, pages resuming after their last id, direct
/// conversations and deleted groups left out, each record with its seq range; across a reopen.
pub fn groups_are_listed_in_pages_without_direct_or_deleted_ones<B: Backend>() {
    let mut b = B::open();
    let direct = |id: &str| ConvRecord {
        kind: ConvKind::Direct,
        name: None,
        metadata: Default::default(),
        ..conv(id, 0, 1)
    };
    let deleted = ConvRecord {
        deleted: true,
        members: Default::default(),
        ..conv("c-gone", 4, 5)
    };
    commit(
        b.store(),
        Batch {
            id: 1,
            convs: vec![
                conv("a-team", 0, 1),
                conv("b-team", 0, 1),
                direct("d_0001"),
                direct("d_ffff"),
                deleted,
                conv("e-team", 0, 1),
                conv("zz", 0, 1),
            ],
            ..Batch::default()
        },
    );
    // A seq range moved apart from the record shows in the listing.
    commit(
        b.store(),
        Batch {
            id: 2,
            messages: messages("b-team", 1..=2, 1),
            positions: vec![position("b-team", 2, 1)],
            ..Batch::default()
        },
    );
    now_and_after_reopen(&mut b, |s| {
        let ids = |p: &GroupPage| p.groups.iter().map(|g| g.id.clone()).collect::<Vec<_>>();
        let first = s.groups(None, 2).expect("groups");
        assert_eq!(ids(&first), ["a-team", "b-team"]);
        assert!(first.has_more);
        assert_eq!(first.groups[1], conv("b-team", 2, 1));
        let second = s.groups(Some("b-team"), 2).expect("groups");
        assert_eq!(ids(&second), ["e-team", "zz"]);
        let last = s.groups(Some("zz"), 2).expect("groups");
        assert!(last.groups.is_empty() && !last.has_more);
        let all = s.groups(None, 100).expect("groups");
        assert_eq!(ids(&all), ["a-team", "b-team", "e-team", "zz"]);
        assert!(!all.has_more);
        // A page may start inside the direct conversations' ids.
        assert_eq!(
            ids(&s.groups(Some("d_0001"), 1).expect("groups")),
            ["e-team"]
        );
    });
}
