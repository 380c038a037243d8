//! Conversations on demand: the core holds only those in use, loads the others from the store
//! when a frame, send or admin request needs them, and evicts the least recently used; nothing a
//! client sees depends on whether a conversation was held.

use crate::support::*;
use ordo_core::{Action, CoreConfig, Handled, MemberPageAsk, Retention};
use ordo_protocol::{ClientFrame, ServerFrame};

/// The default configuration with `n` conversations held at most.
fn holding(n: usize) -> CoreConfig {
    CoreConfig {
        conv_cache_entries: n,
        ..cfg()
    }
}

/// The loads among `actions`.
fn loads(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Load { conv } => Some(conv.clone()),
            _ => None,
        })
        .collect()
}

/// `sid` syncs `g` after `after`; g is not held, so the sync waits for it: returns the load.
fn sync_waits_for_g(s: &mut Sim, sid: u64, after: u64) -> Vec<Action> {
    let frame = ClientFrame::Sync {
        conv: "g".into(),
        after,
        limit: None,
    };
    let Handled::Waits(asked) = s.core.on_frame(sid, frame, s.now) else {
        panic!("the sync waits for g");
    };
    assert_eq!(loads(&asked), ["g"]);
    asked
}

/// The plan of the waiting `sync` answered among `actions`.
fn planned(actions: &[Action]) -> ordo_core::SyncPlan {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Reply { plan: Some(p), .. } => Some(p.clone()),
            _ => None,
        })
        .expect("the sync's plan comes with the load")
}

#[test]
fn an_evicted_conversation_is_loaded_again_with_its_numbering_and_positions() {
    let mut s = Sim::new(holding(1));
    s.group("g1", &["alice", "bob"], Retention::default());
    s.group("g2", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.send_many(1, "g1", 1..=3);
    s.flush();
    s.frame(
        2,
        ClientFrame::Ack {
            acks: vec![ordo_protocol::Position {
                conv: "g1".into(),
                seq: 2,
            }],
        },
    );
    s.flush();
    // Using g2 pushes g1 out.
    s.send(1, "g2", "x1");
    s.flush();
    assert_eq!(s.core.convs_held(), 1);
    let asked = s.core.send(1, req("g1", "m4"), s.now);
    assert_eq!(loads(&asked), ["g1"], "g1 is loaded again");
    s.answer_lookups(asked);
    let (batches, _) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g1"), [4]);
    let i = info(&mut s, 2, "g1");
    assert_eq!((i.max_seq, i.delivered), (4, 2));
}

#[test]
fn sends_into_a_conversation_being_loaded_wait_and_keep_their_order() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "m1");
    s.flush();
    s.restart(cfg());
    s.core.connect(1, "alice", "a1");
    let first = s.core.send(1, req("g", "m2"), s.now);
    assert_eq!(loads(&first), ["g"]);
    // The second waits behind the first, and the load is asked once.
    let second = s.core.send(1, req("g", "m3"), s.now);
    assert!(loads(&second).is_empty(), "{second:?}");
    assert!(
        !s.core.has_pending(),
        "nothing is sequenced before the load"
    );
    s.answer_lookups(first);
    let (batches, out) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), [2, 3]);
    let acc: Vec<u64> = accepted(&out, 1).iter().map(|a| a.2).collect();
    assert_eq!(acc, [2, 3]);
}

#[test]
fn a_sync_of_a_conversation_not_held_waits_for_it_and_is_answered() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send_many(1, "g", 1..=3);
    s.flush();
    s.restart(cfg());
    s.core.connect(2, "bob", "b1");
    let asked = sync_waits_for_g(&mut s, 2, 1);
    let answered = s.answer_lookups(asked);
    let plan = planned(&answered);
    assert_eq!((plan.from, plan.to), (2, 3));
}

#[test]
fn a_sync_of_an_unknown_conversation_is_answered_not_found_after_the_load() {
    let mut s = alice_and_bob_in_g(cfg());
    let frame = ClientFrame::Sync {
        conv: "nowhere".into(),
        after: 0,
        limit: None,
    };
    let out = s.frame(1, frame);
    assert!(
        matches!(
            &frames(&out, 1)[..],
            [ServerFrame::Error {
                code: ordo_protocol::ErrorCode::NotFound,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn the_overview_of_a_user_comes_from_the_store() {
    let mut s = Sim::new(holding(0));
    s.group("g1", &["alice", "bob"], Retention::default());
    s.group("g2", &["bob", "carol"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.send(1, "g1", "m1");
    s.flush();
    assert_eq!(s.core.convs_held(), 0, "nothing held beyond the cache");
    s.core.connect(2, "bob", "b1");
    let ids: Vec<String> = s.overview(2).into_iter().map(|c| c.conv).collect();
    assert_eq!(ids, ["g1", "g2"]);
    assert_eq!(info(&mut s, 2, "g1").max_seq, 1);
}

#[test]
fn conversations_with_unfinished_work_are_not_evicted() {
    let mut s = Sim::new(holding(0));
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.send(1, "g", "m1");
    let b = s.take();
    s.send(1, "g", "m2");
    s.core.evict();
    assert_eq!(s.core.convs_held(), 1, "pending and in flight: held");
    s.commit(&b);
    assert_eq!(s.core.convs_held(), 1, "m2 still pending");
    s.flush();
    assert_eq!(s.core.convs_held(), 0);
    assert_eq!(s.store.seqs("g"), [1, 2]);
}

#[test]
fn an_overview_listed_while_a_conversation_was_evicted_is_listed_again() {
    let mut s = Sim::new(holding(0));
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    let asked = match s.core.on_frame(2, convs(None, None), s.now) {
        Handled::Done(a) => a,
        other => panic!("an overview is asked at once: {other:?}"),
    };
    let (id, ask) = match &asked[..] {
        [Action::LoadMember { id, ask }] => (*id, ask.clone()),
        other => panic!("expected one list asked, got {other:?}"),
    };
    // The store's list as it stands now...
    let stale = s.store.member_convs(&ask);
    // ...then g moves on and is evicted before the list comes back.
    s.send(1, "g", "m1");
    s.flush();
    assert_eq!(s.core.convs_held(), 0);
    let again = s.core.member_convs_loaded(id, stale);
    assert!(
        matches!(&again[..], [Action::LoadMember { .. }]),
        "the list is asked again rather than answered from before m1: {again:?}"
    );
    let out = s.answer_lookups(again);
    let infos: Vec<_> = frames(&out, 2)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Convs { conversations, .. } => Some(conversations),
            _ => None,
        })
        .collect();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0][0].max_seq, 1);
}

fn convs(after: Option<&str>, limit: Option<u32>) -> ClientFrame {
    ClientFrame::Convs {
        after: after.map(str::to_string),
        limit,
    }
}

/// Asks for `sid`'s overview and returns the id of the list asked of the store.
fn ask_overview(s: &mut Sim, sid: u64) -> (u64, MemberPageAsk) {
    ask_page(s, sid, None, None)
}

/// Asks for a page of `sid`'s overview and returns the id of the list asked of the store.
fn ask_page(
    s: &mut Sim,
    sid: u64,
    after: Option<&str>,
    limit: Option<u32>,
) -> (u64, MemberPageAsk) {
    match s.core.on_frame(sid, convs(after, limit), s.now) {
        Handled::Done(a) => match &a[..] {
            [Action::LoadMember { id, ask }] => (*id, ask.clone()),
            other => panic!("expected one list asked, got {other:?}"),
        },
        other => panic!("an overview is asked at once: {other:?}"),
    }
}

/// The `convs` frames among `out` for `sid`.
fn overviews(out: &[Action], sid: u64) -> Vec<Vec<ordo_protocol::ConvInfo>> {
    pages(out, sid).into_iter().map(|(c, _)| c).collect()
}

/// The `convs` frames among `out` for `sid`, with whether more follow.
fn pages(out: &[Action], sid: u64) -> Vec<(Vec<ordo_protocol::ConvInfo>, bool)> {
    frames(out, sid)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Convs {
                conversations,
                has_more,
            } => Some((conversations, has_more)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_load_read_before_a_retention_trim_gets_the_new_first_seq() {
    let mut s = Sim::new(holding(0));
    let aged = Retention {
        max_age_ms: Some(1_000),
        max_count: None,
    };
    s.group("g", &["alice", "bob"], aged);
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.send_many(1, "g", 1..=3);
    s.flush();
    s.now += 5_000;
    s.send(1, "g", "m4");
    s.flush();
    assert_eq!(s.core.convs_held(), 0);
    // Retention names g; its trim goes in flight.
    s.retention(s.now);
    let trim = s.take();
    assert_eq!(trim.trim_before_ms.len(), 1);
    // Meanwhile bob syncs g: the store reads it before the trim is durable...
    let _ = sync_waits_for_g(&mut s, 2, 0);
    let read_before = s.store.load_conv("g");
    // ...the trim commits, and then the load's answer arrives.
    s.commit(&trim);
    assert_eq!(s.store.first_seq("g"), 4);
    let out = s.core.loaded("g", read_before, s.now);
    assert_eq!(planned(&out).to, 4);
    assert_eq!(
        info(&mut s, 2, "g").first_seq,
        4,
        "not the first seq read before"
    );
}

#[test]
fn a_bulk_eviction_does_not_list_unrelated_overviews_again() {
    // The default cache: one bulk eviction drops 5,000 conversations.
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(2, "bob", "b1");
    let (id, ask) = ask_overview(&mut s, 2);
    let list = s.store.member_convs(&ask);
    for i in 0..cfg().conv_cache_entries + 1 {
        let mut rec = list.convs[0].rec.clone();
        rec.id = format!("other{i}");
        s.core.warm(ordo_core::ConvState {
            rec,
            cursors: Vec::new(),
        });
    }
    s.core.evict();
    assert!(s.core.convs_held() < cfg().conv_cache_entries);
    let out = s.core.member_convs_loaded(id, list);
    assert_eq!(
        overviews(&out, 2).len(),
        1,
        "answered, not asked again: {out:?}"
    );
}

#[test]
fn an_overview_includes_a_conversation_joined_while_it_was_listed() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.group("h", &["alice"], Retention::default());
    s.core.connect(2, "bob", "b1");
    let (id, ask) = ask_overview(&mut s, 2);
    let list = s.store.member_convs(&ask);
    // bob joins h after the store listed his conversations.
    s.add_member(50, "h", "bob");
    s.flush();
    let out = s.core.member_convs_loaded(id, list);
    let ids: Vec<String> = overviews(&out, 2)
        .into_iter()
        .flatten()
        .map(|c| c.conv)
        .collect();
    assert_eq!(ids, ["g", "h"]);
}

#[test]
fn a_list_that_stays_stale_is_shown_but_never_held() {
    let mut s = Sim::new(holding(1));
    s.group("g", &["alice", "bob"], Retention::default());
    s.group("h", &["alice"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    let (mut id, ask) = ask_overview(&mut s, 2);
    let mut sent = 0;
    let out = loop {
        // The store lists bob's conversations; then g moves on and h pushes it out, before the
        // list comes back, every time.
        let list = s.store.member_convs(&ask);
        sent += 1;
        s.send(1, "g", &format!("m{sent}"));
        s.flush();
        s.send(1, "h", &format!("x{sent}"));
        s.flush();
        let out = s.core.member_convs_loaded(id, list);
        match &out[..] {
            [Action::LoadMember { id: again, .. }] => id = *again,
            _ => break out,
        }
    };
    assert_eq!(overviews(&out, 2).len(), 1, "answered after a few attempts");
    assert!(sent > 1, "listed again at least once");
    // The next send into g is numbered after the last one (g was not held from the stale list).
    s.send(1, "g", "last");
    let (batches, _) = s.flush();
    assert_eq!(batch_seqs(&batches[0], "g"), [sent + 1]);
}

#[test]
fn an_overview_comes_in_pages_that_together_list_every_conversation_once() {
    let mut s = Sim::new(holding(2));
    let ids: Vec<String> = (1..=7).map(|i| format!("g{i}")).collect();
    for id in &ids {
        s.group(id, &["alice", "bob"], Retention::default());
    }
    s.group("other", &["alice"], Retention::default());
    s.core.connect(2, "bob", "b1");
    assert!(s.overview_page(2, None, Some(3)).1, "more than one page");
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let (page, more) = s.overview_page(2, after.clone(), Some(3));
        assert!(page.len() <= 3);
        listed.extend(page.iter().map(|c| c.conv.clone()));
        after = listed.last().cloned();
        if !more {
            break;
        }
    }
    assert_eq!(listed, ids, "in id order, each once, only bob's");
    // The whole overview in one go (the default limit) is the same list.
    let all: Vec<String> = s.overview(2).into_iter().map(|c| c.conv).collect();
    assert_eq!(all, ids);
    let (page, more) = s.overview_page(2, Some("g7".into()), None);
    assert!(page.is_empty() && !more, "nothing after the last");
}

#[test]
fn a_conversation_joined_while_a_page_was_listed_is_added_only_inside_its_range() {
    let mut s = Sim::new(cfg());
    for id in ["a", "b", "c"] {
        s.group(id, &["alice", "bob"], Retention::default());
    }
    s.group("bb", &["alice"], Retention::default());
    s.group("z", &["alice"], Retention::default());
    s.core.connect(2, "bob", "b1");
    let (id, ask) = ask_page(&mut s, 2, None, Some(2));
    let list = s.store.member_convs(&ask);
    // bob joins bb (inside the page's range a..=b? no: after b) and z (after it) meanwhile.
    s.add_member(50, "bb", "bob");
    s.add_member(51, "z", "bob");
    s.flush();
    let out = s.core.member_convs_loaded(id, list);
    let got: Vec<(Vec<String>, bool)> = pages(&out, 2)
        .into_iter()
        .map(|(p, more)| (p.into_iter().map(|c| c.conv).collect(), more))
        .collect();
    assert_eq!(got, [(vec!["a".to_string(), "b".to_string()], true)]);
    // The next page starts after b and finds both.
    let (page, more) = s.overview_page(2, Some("b".into()), Some(10));
    let ids: Vec<String> = page.into_iter().map(|c| c.conv).collect();
    assert_eq!(ids, ["bb", "c", "z"]);
    assert!(!more);
}

#[test]
fn a_group_past_receipt_max_members_is_listed_with_aggregates_instead_of_members() {
    let mut s = big_and_small();
    s.core.connect(3, "carol", "c1");
    for i in 1..=3 {
        s.send(1, "big", &format!("big{i}"));
    }
    for i in 1..=2 {
        s.send(1, "small", &format!("small{i}"));
    }
    s.flush();
    s.frame(
        2,
        ClientFrame::Ack {
            acks: vec![
                ordo_protocol::Position {
                    conv: "big".into(),
                    seq: 3,
                },
                ordo_protocol::Position {
                    conv: "small".into(),
                    seq: 2,
                },
            ],
        },
    );
    s.frame(
        2,
        ClientFrame::Read {
            conv: "big".into(),
            seq: 2,
        },
    );
    s.frame(
        3,
        ClientFrame::Ack {
            acks: vec![ordo_protocol::Position {
                conv: "big".into(),
                seq: 1,
            }],
        },
    );
    s.flush();
    let all = s.overview(1);
    let big = all.iter().find(|c| c.conv == "big").expect("big listed");
    assert_eq!(big.member_count, 3);
    assert!(big.members.is_empty(), "too many to list: {big:?}");
    assert_eq!((big.others_delivered, big.others_read), (1, 0));
    let small = all
        .iter()
        .find(|c| c.conv == "small")
        .expect("small listed");
    assert_eq!(small.member_count, 2);
    assert_eq!(small.members.len(), 2);
    assert_eq!((small.others_delivered, small.others_read), (2, 0));
    // bob's view of big: alice (the sender, at 0 by her device) and carol are the others.
    let big = info(&mut s, 2, "big");
    assert_eq!((big.others_delivered, big.others_read), (0, 0));
}

#[test]
fn an_overview_page_of_many_listed_members_ends_early_by_size() {
    // 999 and alice: as many as are listed by default.
    let members: Vec<String> = (0..999).map(|i| format!("member-{i:04}")).collect();
    let mut s = Sim::new(cfg());
    for g in 0..20 {
        let mut m: Vec<&str> = members.iter().map(String::as_str).collect();
        m.push("alice");
        s.group(&format!("g{g:02}"), &m, Retention::default());
    }
    s.core.connect(1, "alice", "a1");
    let (page, more) = s.overview_page(1, None, None);
    assert!(
        more,
        "20 groups of 1,000 listed members do not fit one page"
    );
    assert!(!page.is_empty() && page.len() < 20, "{} listed", page.len());
    let size: usize = page.iter().map(ServerFrame::info_len).sum();
    assert!(size < 400 * 1024, "about 256 KiB, not {size}");
    assert_eq!(s.overview(1).len(), 20, "the pages list them all");
}

#[test]
fn a_page_whose_conversations_were_all_left_meanwhile_lists_the_next_instead_of_none() {
    let mut s = Sim::new(cfg());
    for id in ["g1", "g2", "g3"] {
        s.group(id, &["alice", "bob"], Retention::default());
    }
    s.core.connect(2, "bob", "b1");
    let (id, ask) = ask_page(&mut s, 2, None, Some(1));
    let list = s.store.member_convs(&ask);
    // bob leaves g1 after the store listed it.
    let op = ordo_core::AdminOp::UpdateGroup {
        id: "g1".into(),
        add: vec![],
        remove: vec!["bob".into()],
        retention: None,
        leave: vec![],
        name: None,
        metadata: None,
    };
    let actions = s.core.admin(60, op, s.now).expect("a valid change");
    s.answer_lookups(actions);
    s.flush();
    let out = s.core.member_convs_loaded(id, list);
    assert!(
        pages(&out, 2).is_empty(),
        "no empty page with more to come: {out:?}"
    );
    let out = s.answer_lookups(out);
    let got: Vec<(Vec<String>, bool)> = pages(&out, 2)
        .into_iter()
        .map(|(p, more)| (p.into_iter().map(|c| c.conv).collect(), more))
        .collect();
    assert_eq!(got, [(vec!["g2".to_string()], true)]);
}
