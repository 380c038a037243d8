//! Races of backend posts with client sends, loads and group deletion.

use crate::support::*;
use ordo_core::{Action, AdminOp, AdminPost, Posted, Retention};

fn post_as(from: Option<&str>, conv: &str, cmid: &str) -> AdminPost {
    AdminPost {
        conv: Some(conv.into()),
        to: None,
        from: from.map(str::to_string),
        cmid: cmid.into(),
        body: format!("posted {cmid}"),
        reply_to: None,
    }
}

fn posted(actions: &[Action], ticket: u64) -> Vec<Posted> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Posted {
                ticket: t,
                reply: Ok(p),
            } if *t == ticket => Some(p.clone()),
            Action::Posted {
                ticket: t,
                reply: Err(e),
            } if *t == ticket => panic!("post {ticket} refused: {e}"),
            _ => None,
        })
        .collect()
}

fn lookup_id(actions: &[Action]) -> u64 {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Lookup { id, .. } => Some(*id),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a lookup is asked: {actions:?}"))
}

/// Stored messages of `conv` with `cmid`.
fn stored_with(s: &Sim, conv: &str, cmid: &str) -> Vec<u64> {
    s.store
        .read(&ordo_core::SyncPlan {
            conv: conv.into(),
            epoch: 0,
            from: 1,
            to: u64::MAX,
            limit: 10_000,
        })
        .iter()
        .filter(|m| m.cmid == cmid)
        .map(|m| m.seq)
        .collect()
}

/// A post's lookup is outstanding while the client sends the same (user, cmid) and it is
/// appended at once: the post is the same message.
#[test]
fn post_then_send_same_key_is_one_message() {
    let mut s = alice_and_bob_in_g(cfg());
    let now = s.now;
    let asked = s.core.post(1, post_as(Some("alice"), "g", "k"), now);
    let id = lookup_id(&asked);
    let sent = s.send(1, "g", "k");
    assert!(sent.is_empty(), "{sent:?}");
    let mut out = s.core.looked_up(id, None, now);
    out = s.answer_lookups(out);
    let (_, done) = s.flush();
    out.extend(done);
    let p = posted(&out, 1);
    let a = accepted(&out, 1);
    assert_eq!(p.len(), 1, "{out:?}");
    assert_eq!(a.len(), 1, "{out:?}");
    assert_eq!(p[0].seq, a[0].2);
    assert!(p[0].duplicate);
    assert_eq!(stored_with(&s, "g", "k"), vec![a[0].2]);
}

/// After a restart with a cold conversation and no dedup filter: a post and a client send of the
/// same key both wait for lookups and for the load: one message.
#[test]
fn post_and_send_same_key_while_loading_is_one_message() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "m1");
    s.flush();
    s.restart_cold(cfg());
    s.core.connect(1, "alice", "a1");
    let now = s.now;
    let p_asked = s.core.post(1, post_as(Some("alice"), "g", "k"), now);
    let p_id = lookup_id(&p_asked);
    let s_asked = s.core.send(1, req("g", "k"), now);
    let s_id = lookup_id(&s_asked);
    let mut out = Vec::new();
    // The send's answer first, then the post's; the load after both.
    let a1 = s.core.looked_up(s_id, None, now);
    let a2 = s.core.looked_up(p_id, None, now);
    out.extend(s.answer_lookups(a1));
    out.extend(s.answer_lookups(a2));
    let (_, done) = s.flush();
    out.extend(done);
    let p = posted(&out, 1);
    let a = accepted(&out, 1);
    assert_eq!((p.len(), a.len()), (1, 1), "{out:?}");
    assert_eq!(p[0].seq, a[0].2);
    assert_eq!(stored_with(&s, "g", "k").len(), 1);
}

/// The backend retries a post while the first is still waiting: one message, both answered with
/// its seq.
#[test]
fn a_post_retried_while_the_first_waits_is_one_message() {
    let mut s = alice_and_bob_in_g(cfg());
    s.flush();
    s.restart_cold(cfg());
    let now = s.now;
    let a = s.core.post(1, post_as(None, "g", "k"), now);
    let b = s.core.post(2, post_as(None, "g", "k"), now);
    let (ia, ib) = (lookup_id(&a), lookup_id(&b));
    let mut out = Vec::new();
    let x = s.core.looked_up(ib, None, now);
    out.extend(s.answer_lookups(x));
    let x = s.core.looked_up(ia, None, now);
    out.extend(s.answer_lookups(x));
    let (_, done) = s.flush();
    out.extend(done);
    let (pa, pb) = (posted(&out, 1), posted(&out, 2));
    assert_eq!((pa.len(), pb.len()), (1, 1), "{out:?}");
    assert_eq!(pa[0].seq, pb[0].seq);
    assert_eq!(stored_with(&s, "g", "k").len(), 1);
}

/// DeleteGroup's batch is in flight when the id is created again and a message is sent to the
/// new group: the store ends with the new group and only its message.
#[test]
fn delete_then_create_while_in_flight() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "old");
    s.flush();
    let now = s.now;
    s.core
        .admin(5, AdminOp::DeleteGroup { id: "g".into() }, now)
        .unwrap();
    let b1 = s.take();
    s.create_group(6, "g", &["alice"], Retention::default());
    assert!(s.send(1, "g", "new").is_empty());
    let now = s.now;
    let posted_early = s.core.post(9, post_as(None, "g", "sys"), now);
    let _ = s.answer_lookups(posted_early);
    let mut out = s.commit(&b1);
    let (_, done) = s.flush();
    out.extend(done);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::AdminDone {
            ticket: 5,
            reply: Ok(_)
        }
    )));
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::AdminDone { ticket: 6, reply: Ok(g) } if !g.deleted)));
    assert_eq!(posted(&out, 9).len(), 1);
    assert!(stored_with(&s, "g", "old").is_empty());
    assert_eq!(stored_with(&s, "g", "new").len(), 1);
    assert_eq!(stored_with(&s, "g", "sys").len(), 1);
    let g = s.core.group("g").unwrap();
    assert!(!g.deleted);
    assert_eq!(g.members.len(), 1);
}

/// A group made again under a deleted group's id is a new group: it reports when it was made,
/// not when the deleted one was.
#[test]
fn a_recreated_group_reports_its_own_creation_time() {
    let mut s = alice_and_bob_in_g(cfg());
    let first = s.core.group("g").unwrap().created_ms;
    s.now += 3_600_000;
    let now = s.now;
    s.core
        .admin(5, AdminOp::DeleteGroup { id: "g".into() }, now)
        .unwrap();
    s.flush();
    s.create_group(6, "g", &["alice"], Retention::default());
    s.flush();
    let g = s.core.group("g").unwrap();
    assert_eq!(
        g.created_ms, now,
        "the new group says it was created at {} (the deleted group's time {first})",
        g.created_ms
    );
}
