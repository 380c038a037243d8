//! Admin and membership: admin requests are validated, membership changes apply, and both take
//! effect (and are answered) only once their batch is durable.

use crate::support::*;
use ordo_core::{Action, AdminOp, CoreConfig, CoreError, Retention};
use ordo_protocol::{direct_conv_id, ConvEvent, ErrorCode, ServerFrame};
use std::collections::BTreeSet;

#[test]
fn admin_validates_and_membership_changes_apply() {
    let mut s = alice_and_bob_in_g(cfg());
    s.core.connect(3, "carol", "c1");
    let create = |id: &str, members: &[&str]| AdminOp::CreateGroup {
        id: id.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        retention: Retention::default(),
        name: None,
        metadata: Default::default(),
    };
    let now = s.now;
    assert_eq!(
        code(s.core.admin(1, create("g", &["alice"]), now)),
        ErrorCode::Invalid,
        "already exists"
    );
    assert!(matches!(
        s.core.admin(1, create("g", &["alice"]), now),
        Err(CoreError::AlreadyExists(_))
    ));
    assert_eq!(
        code(s.core.admin(1, create("d_abc", &["alice"]), now)),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(s.core.admin(1, create("bad id", &["alice"]), now)),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(s.core.admin(1, create("ok", &["bad user"]), now)),
        ErrorCode::Invalid
    );
    let update = |id: &str, add: &[&str], remove: &[&str]| AdminOp::UpdateGroup {
        id: id.into(),
        add: add.iter().map(|m| m.to_string()).collect(),
        remove: remove.iter().map(|m| m.to_string()).collect(),
        retention: None,
        leave: vec![],
        name: None,
        metadata: None,
    };
    // Not held: the store is asked, and the answer comes once it said it holds none.
    let asked = s
        .core
        .admin(1, update("nope", &["carol"], &[]), now)
        .unwrap();
    let out = s.answer_lookups(asked);
    assert!(
        matches!(&out[..], [Action::AdminDone { ticket: 1, reply: Err(e) }] if e.code() == ErrorCode::NotFound),
        "{out:?}"
    );
    let direct = direct_conv_id("alice", "bob");
    s.send_to(1, "bob", "d");
    s.flush();
    assert_eq!(
        code(s.core.admin(1, update(&direct, &["carol"], &[]), now)),
        ErrorCode::NotFound,
        "direct conversations have fixed members"
    );
    assert!(s.core.take_batch().is_none(), "failed admin stores nothing");

    s.core
        .admin(7, update("g", &["carol"], &["bob"]), now)
        .unwrap();
    let (batches, out) = s.flush();
    assert_eq!(
        batches[0].convs[0].members,
        BTreeSet::from(["alice".to_string(), "carol".to_string()])
    );
    assert!(matches!(
        &out[0],
        Action::AdminDone {
            ticket: 7,
            reply: Ok(_)
        }
    ));
    // The change is in the group's history, in the batch of the change: carol's joining, then
    // bob's removal, as system messages.
    let events: Vec<_> = batches[0]
        .messages
        .iter()
        .map(|m| (m.seq, m.from.as_str(), m.body.as_str(), m.event.clone()))
        .collect();
    let users = |u: &str| vec![u.to_string()];
    assert_eq!(
        events,
        vec![
            (
                1,
                "",
                "",
                Some(ConvEvent::Joined {
                    users: users("carol")
                })
            ),
            (
                2,
                "",
                "",
                Some(ConvEvent::Removed {
                    users: users("bob")
                })
            ),
        ]
    );
    assert_eq!(msg_seqs(&out, 1), vec![1, 2]);
    assert_eq!(msg_seqs(&out, 3), vec![1, 2]);
    assert_eq!(msg_seqs(&out, 2), vec![2], "bob is told he was removed");
    assert_eq!(rejected(&s.send(2, "g", "b")).0, ErrorCode::NotFound);
    assert_eq!(code(s.core.sync(2, "g", 0, None)), ErrorCode::NotFound);
    assert!(s.send(3, "g", "c").is_empty());
    let (_, out) = s.flush();
    assert_eq!(msg_seqs(&out, 1), vec![3]);
    assert_eq!(msg_seqs(&out, 3), vec![3]);
    assert!(
        frames(&out, 2).is_empty(),
        "a removed member gets nothing more"
    );
    assert_eq!(s.core.group("g").unwrap().max_seq, 3);
}

// Regressions: each test below once failed on a real defect of the core.

/// The admin reply of a batch is built from the live record, so it includes later changes that
/// are still pending.
#[test]
fn an_admin_reply_describes_only_what_its_batch_made_durable() {
    let mut s = Sim::new(cfg());
    s.create_group(1, "g", &["alice"], Retention::default());
    let b1 = s.take();
    s.add_member(2, "g", "mallory");
    let out = s.commit(&b1);
    match &out[..] {
        [Action::AdminDone {
            ticket: 1,
            reply: Ok(rec),
        }] => assert_eq!(
            rec.members,
            BTreeSet::from(["alice".to_string()]),
            "mallory's addition is not durable"
        ),
        other => panic!("{other:?}"),
    }
}

/// Membership changes take effect in memory when the admin request arrives, before the batch
/// holding them is durable: a user being added can read the history at once, and if the store
/// then fails (or the server crashes) the addition never happened, yet the history was served.
#[test]
fn an_added_member_reads_only_once_the_addition_is_durable() {
    let mut s = alice_alone_in_g(cfg());
    s.core.connect(2, "carol", "c1");
    s.send(1, "g", "secret");
    s.flush();
    s.add_member(3, "g", "carol");
    // Not committed: the admin has no answer yet, and a crash would undo the addition.
    assert_eq!(code(s.core.sync(2, "g", 0, None)), ErrorCode::NotFound);
}

/// A group has at most `max_group_members` members: a creation or a change that would go past
/// it is refused whole (`invalid`, naming the limit) and stores nothing; up to it is fine, and a
/// change that adds and removes is counted as it would leave the group.
#[test]
fn groups_have_at_most_max_group_members() {
    let mut s = alice_and_bob_in_g(CoreConfig {
        max_group_members: 3,
        ..cfg()
    });
    let now = s.now;
    let users = |u: &[&str]| u.iter().map(|m| m.to_string()).collect::<Vec<_>>();
    let create = |id: &str, members: &[&str]| AdminOp::CreateGroup {
        id: id.into(),
        members: users(members),
        retention: Retention::default(),
        name: None,
        metadata: Default::default(),
    };
    let update = |add: &[&str], remove: &[&str]| AdminOp::UpdateGroup {
        id: "g".into(),
        add: users(add),
        remove: users(remove),
        retention: None,
        leave: vec![],
        name: None,
        metadata: None,
    };
    match s.core.admin(1, create("big", &["a", "b", "c", "d"]), now) {
        Err(e) => {
            assert_eq!(e.code(), ErrorCode::Invalid);
            assert!(e.to_string().contains("max_group_members"), "{e}");
        }
        Ok(out) => panic!("a group of 4 with a limit of 3: {out:?}"),
    }
    // g has alice and bob: two more is one too many, ...
    assert_eq!(
        code(s.core.admin(2, update(&["carol", "dave"], &[]), now)),
        ErrorCode::Invalid
    );
    assert!(
        s.core.take_batch().is_none(),
        "a refused change stores nothing"
    );
    // ... unless one leaves in the same change.
    s.core
        .admin(3, update(&["carol", "dave"], &["bob"]), now)
        .unwrap();
    // (A new id is looked up in the store first.)
    let asked = s
        .core
        .admin(4, create("three", &["a", "b", "c"]), now)
        .unwrap();
    s.answer_lookups(asked);
    let (batches, _) = s.flush();
    let sizes: Vec<usize> = batches
        .iter()
        .flat_map(|b| &b.convs)
        .map(|c| c.members.len())
        .collect();
    assert_eq!(sizes, vec![3, 3]);
}

/// Deleting a group removes every member (their connected devices are pushed the event), and
/// its batch trims every message; nothing more goes in; the id makes a new group, with a new
/// epoch, its seqs going on.
#[test]
fn a_deleted_group_is_emptied_and_its_id_can_be_used_again() {
    let mut s = alice_and_bob_in_g(cfg());
    s.send(1, "g", "m1");
    s.flush();
    let epoch = s.core.group("g").unwrap().epoch;
    let now = s.now;
    s.core
        .admin(5, AdminOp::DeleteGroup { id: "g".into() }, now)
        .unwrap();
    let (batches, out) = s.flush();
    let b = &batches[0];
    assert_eq!(
        b.trim_below,
        vec![("g".to_string(), 3)],
        "every message goes"
    );
    assert!(b.convs[0].deleted && b.convs[0].members.is_empty());
    assert_eq!(msg_seqs(&out, 1), vec![2], "alice is told");
    assert_eq!(msg_seqs(&out, 2), vec![2], "bob is told");
    assert!(matches!(
        &s.core
            .admin(6, AdminOp::Get { id: "g".into() }, now)
            .unwrap()[..],
        [Action::AdminDone {
            reply: Err(CoreError::NoSuchConversation(_)),
            ..
        }]
    ));
    assert_eq!(rejected(&s.send(1, "g", "m2")).0, ErrorCode::NotFound);
    assert_eq!(
        code(
            s.core
                .admin(7, AdminOp::DeleteGroup { id: "g".into() }, now)
        ),
        ErrorCode::NotFound
    );
    s.create_group(8, "g", &["alice"], Retention::default());
    s.flush();
    let g = s.core.group("g").unwrap();
    assert!(!g.deleted);
    assert_ne!(g.epoch, epoch);
    assert_eq!((g.first_seq, g.max_seq), (3, 2));
    assert!(s.send(1, "g", "m3").is_empty());
    let (_, out) = s.flush();
    // Told to sync rather than pushed: the sync brings the new epoch.
    assert!(msg_seqs(&out, 1).is_empty());
    assert!(frames(&out, 1)
        .iter()
        .any(|f| matches!(f, ServerFrame::Notify { max_seq: 3, .. })));
}
