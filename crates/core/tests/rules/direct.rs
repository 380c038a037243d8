//! Direct conversations: created by the first send to a user, durable before anyone may read
//! them, the same conversation from either side, closed to everyone else.

use crate::support::*;
use ordo_protocol::{direct_conv_id, ConvKind, ErrorCode, ServerFrame};
use std::collections::BTreeSet;

#[test]
fn a_send_to_a_user_creates_the_direct_conversation() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    s.core.connect(2, "bob", "b1");
    s.core.connect(3, "carol", "c1");
    let id = direct_conv_id("alice", "bob");
    assert!(s.send_to(1, "bob", "hello").is_empty());
    // Not durable yet: nobody may read it.
    assert_eq!(code(s.core.sync(2, &id, 0, None)), ErrorCode::NotFound);
    assert!(s.overview(2).is_empty());

    let b = s.take();
    assert_eq!(b.convs.len(), 1);
    let rec = &b.convs[0];
    assert_eq!(rec.id, id);
    assert_eq!(rec.kind, ConvKind::Direct);
    assert_eq!(
        rec.members,
        BTreeSet::from(["alice".to_string(), "bob".to_string()])
    );
    assert_eq!((rec.max_seq, rec.first_seq), (1, 1));
    assert_ne!(rec.epoch, 0);
    let out = s.commit(&b);
    assert_eq!(
        accepted(&out, 1),
        vec![("hello".to_string(), id.clone(), 1, s.now)]
    );
    for sid in [1, 2] {
        match &frames(&out, sid)[..] {
            [.., ServerFrame::Msg(m)] => {
                assert_eq!((m.conv.as_str(), m.seq), (id.as_str(), 1));
                assert_eq!((m.from.as_str(), m.device.as_str()), ("alice", "a1"));
                assert_eq!(m.body, "body of hello");
            }
            other => panic!("session {sid}: {other:?}"),
        }
    }
    assert!(frames(&out, 3).is_empty());

    // Either side, by `to` or by id, lands in the same conversation.
    s.send_to(2, "alice", "re");
    s.send(2, &id, "re2");
    let (_, out) = s.flush();
    assert_eq!(
        accepted(&out, 2)
            .into_iter()
            .map(|a| (a.1, a.2))
            .collect::<Vec<_>>(),
        vec![(id.clone(), 2), (id.clone(), 3)]
    );
    let i = info(&mut s, 2, &id);
    assert_eq!((i.kind, i.max_seq, i.first_seq), (ConvKind::Direct, 3, 1));

    // A third user can neither write nor read it.
    assert_eq!(rejected(&s.send(3, &id, "intrude")).0, ErrorCode::NotFound);
    assert_eq!(code(s.core.sync(3, &id, 0, None)), ErrorCode::NotFound);
    assert!(s.overview(3).is_empty());
    assert!(s.core.take_batch().is_none());
}

#[test]
fn sends_to_many_users_each_land_in_their_own_direct_conversation() {
    // More peers than a connection remembers direct ids for, then the first ones again.
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    let peers: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    for (i, p) in peers.iter().enumerate() {
        s.send_to(1, p, &format!("first-{i}"));
        s.now += 1;
    }
    for (i, p) in peers.iter().enumerate().take(3) {
        s.send_to(1, p, &format!("again-{i}"));
    }
    let (_, out) = s.flush();
    let got = accepted(&out, 1);
    assert_eq!(got.len(), 303);
    for (cmid, conv, seq, _) in got {
        let (round, i) = cmid.split_once('-').unwrap();
        let i: usize = i.parse().unwrap();
        assert_eq!(conv, direct_conv_id("alice", &peers[i]), "{cmid}");
        assert_eq!(seq, if round == "first" { 1 } else { 2 }, "{cmid}");
    }
}
