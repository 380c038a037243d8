//! The one entry point for a decoded client frame: every frame's rule lives here, so that the
//! server and the simulation run the same rules rather than each its own copy of them.
//!
//! A driver decodes the bytes (and enforces the frame size limit, which needs the bytes), then
//! hands the frame to [`Core::on_frame`]. Most frames are answered from memory
//! ([`Handled::Done`]: carry out the actions). A `sync` needs history from the store
//! ([`Handled::Read`]): the driver reads the plan's page (off the core's task, if reading can
//! block) and gives it back to [`Core::serve_page`], which builds the `synced` answer and moves
//! the connection's push position. Only frames for which [`may_read`] is true can need a read,
//! so a driver that reads elsewhere (the server reads on the connection's task) waits for an
//! answer only for those: a `send`, the hot path, never waits.
//!
//! The driver must serve a connection's page before it hands the core that connection's next
//! frame, so that the core handles a connection's frames in the order it sent them and the
//! answers it gives at once come out in that order (an `accepted` waits for its batch's commit).

#[cfg(doc)]
use crate::engine::Core;
use crate::engine::{Action, SyncPlan};
use ordo_protocol::ClientFrame;

/// What a client frame asks of the driver.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Carry out these actions; the frame is fully handled.
    Done(Vec<Action>),
    /// Read this page from the store and hand it to [`Core::serve_page`].
    Read(SyncPlan),
    /// Carry out these actions (a load); the frame waits for a conversation to be loaded. For
    /// a frame [`may_read`] names, keep its reply until [`Action::Reply`] comes for the
    /// connection.
    Waits(Vec<Action>),
}

/// Whether `frame` may be answered with [`Handled::Read`]; for every other frame
/// [`Core::on_frame`] returns [`Handled::Done`].
pub fn may_read(frame: &ClientFrame) -> bool {
    matches!(frame, ClientFrame::Sync { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CoreConfig;
    use crate::engine::{AdminOp, Core, SessionId};
    use crate::memory_store::MemoryStore;
    use crate::model::{Retention, Snapshot};
    use ordo_protocol::{ErrorCode, Position, ServerFrame};

    const ALICE: SessionId = 1;
    const BOB: SessionId = 2;
    const EVE: SessionId = 3;

    /// A core with group `g` of alice and bob (committed), each connected once, eve connected
    /// but not a member, and the store that holds what was committed.
    fn setup() -> (Core, MemoryStore) {
        let cfg = CoreConfig {
            rate_per_sec: 0.0,
            ..CoreConfig::default()
        };
        let mut core = Core::new(cfg, 7, Snapshot::default());
        core.dedup_filter_complete();
        let mut store = MemoryStore::default();
        let op = AdminOp::CreateGroup {
            id: "g".into(),
            members: vec!["alice".into(), "bob".into()],
            retention: Retention::default(),
            name: None,
            metadata: Default::default(),
        };
        // The core asks whether the group exists: the new store holds nothing.
        for a in core.admin(1, op, 1_000).expect("a valid group") {
            if let Action::Load { conv } = a {
                let _ = core.loaded(&conv, store.load_conv(&conv), 1_000);
            }
        }
        commit_all(&mut core, &mut store);
        core.connect(ALICE, "alice", "phone");
        core.connect(BOB, "bob", "phone");
        core.connect(EVE, "eve", "phone");
        (core, store)
    }

    /// Answers the loads among `actions` from `store` at once; returns the other actions.
    fn answer(core: &mut Core, store: &MemoryStore, actions: Vec<Action>) -> Vec<Action> {
        let mut out = Vec::new();
        for a in actions {
            match a {
                Action::Load { conv } => {
                    let more = core.loaded(&conv, store.load_conv(&conv), 2_000);
                    out.extend(answer(core, store, more));
                }
                Action::LoadMember { id, ask } => {
                    let more = core.member_convs_loaded(id, store.member_convs(&ask));
                    out.extend(answer(core, store, more));
                }
                other => out.push(other),
            }
        }
        out
    }

    fn commit_all(core: &mut Core, store: &mut MemoryStore) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(b) = core.take_batch() {
            let outcome = store.apply(&b).expect("no seq stored twice");
            out.extend(core.commit_done(b.id, outcome));
        }
        out
    }

    fn send(core: &mut Core, session: SessionId, cmid: &str) -> Handled {
        let frame = ClientFrame::Send {
            conv: Some("g".into()),
            to: None,
            cmid: cmid.into(),
            body: format!("body of {cmid}"),
            reply_to: None,
        };
        core.on_frame(session, frame, 2_000)
    }

    fn done(h: Handled) -> Vec<Action> {
        match h {
            Handled::Done(a) => a,
            Handled::Read(p) => panic!("expected actions, got a read of {p:?}"),
            Handled::Waits(a) => panic!("expected actions, got a wait for {a:?}"),
        }
    }

    /// The frames sent to `session`, in order.
    fn frames_to(actions: &[Action], session: SessionId) -> Vec<ServerFrame> {
        crate::engine::per_session(actions.to_vec())
            .into_iter()
            .filter_map(|a| match a {
                Action::Send { session: s, frame } if s == session => Some(frame),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ping_is_answered_with_pong_at_the_drivers_time() {
        let (mut core, _) = setup();
        let out = done(core.on_frame(ALICE, ClientFrame::Ping { nonce: Some(9) }, 4_321));
        assert_eq!(
            frames_to(&out, ALICE),
            vec![ServerFrame::Pong {
                nonce: Some(9),
                server_time: 4_321
            }]
        );
    }

    #[test]
    fn send_is_answered_at_commit_and_pushed() {
        let (mut core, mut store) = setup();
        assert_eq!(done(send(&mut core, ALICE, "m1")), vec![]);
        let out = commit_all(&mut core, &mut store);
        assert!(frames_to(&out, ALICE)
            .iter()
            .any(|f| matches!(f, ServerFrame::Accepted { seq: 1, .. })));
        assert!(frames_to(&out, BOB)
            .iter()
            .any(|f| matches!(f, ServerFrame::Msg(m) if m.seq == 1)));
    }

    #[test]
    fn convs_lists_only_the_users_conversations() {
        let (mut core, store) = setup();
        let asked = done(core.on_frame(ALICE, convs(), 2_000));
        let out = answer(&mut core, &store, asked);
        match frames_to(&out, ALICE).as_slice() {
            [ServerFrame::Convs {
                conversations,
                has_more: false,
            }] => {
                let ids: Vec<&str> = conversations.iter().map(|c| c.conv.as_str()).collect();
                assert_eq!(ids, vec!["g"]);
            }
            other => panic!("expected one convs frame, got {other:?}"),
        }
        let asked = done(core.on_frame(EVE, convs(), 2_000));
        let out = answer(&mut core, &store, asked);
        assert_eq!(
            frames_to(&out, EVE),
            vec![ServerFrame::Convs {
                conversations: vec![],
                has_more: false,
            }]
        );
    }

    fn convs() -> ClientFrame {
        ClientFrame::Convs {
            after: None,
            limit: None,
        }
    }

    #[test]
    fn ack_over_the_limit_is_refused_whole() {
        let (mut core, mut store) = setup();
        let _ = send(&mut core, ALICE, "m1");
        commit_all(&mut core, &mut store);
        let max = core.config().limits.max_acks_per_frame;
        let acks = vec![
            Position {
                conv: "g".into(),
                seq: 1,
            };
            max + 1
        ];
        let out = done(core.on_frame(BOB, ClientFrame::Ack { acks }, 2_000));
        assert_eq!(
            frames_to(&out, BOB),
            vec![ServerFrame::error_about(
                ErrorCode::Invalid,
                format!("ack carries {} positions; the limit is {max}", max + 1),
                "ack",
                None
            )]
        );
        // Nothing was applied: no cursor moved, so nothing is pending.
        assert!(!core.has_pending());
    }

    #[test]
    fn valid_acks_apply_even_next_to_a_refused_one() {
        let (mut core, mut store) = setup();
        let _ = send(&mut core, ALICE, "m1");
        commit_all(&mut core, &mut store);
        let acks = vec![
            Position {
                conv: "nope".into(),
                seq: 1,
            },
            Position {
                conv: "g".into(),
                seq: 1,
            },
        ];
        // "nope" is not held: its position waits for the store, which holds no such thing.
        let out = match core.on_frame(BOB, ClientFrame::Ack { acks }, 2_000) {
            Handled::Done(a) => answer(&mut core, &store, a),
            other => panic!("an ack is handled at once, got {other:?}"),
        };
        // The error names what it answers: the refused position's conversation.
        assert_eq!(
            frames_to(&out, BOB),
            vec![ServerFrame::error_about(
                ErrorCode::NotFound,
                "conversation \"nope\" does not exist or you are not a member of it",
                "ack",
                Some("nope")
            )]
        );
        commit_all(&mut core, &mut store);
        assert_eq!(store.position("g", "bob"), (1, 0));
    }

    #[test]
    fn read_of_a_non_member_is_refused() {
        let (mut core, _) = setup();
        let frame = ClientFrame::Read {
            conv: "g".into(),
            seq: 1,
        };
        let out = done(core.on_frame(EVE, frame, 2_000));
        assert_eq!(frames_to(&out, EVE), vec![not_found_about("read")]);
    }

    /// What a non-member of "g" is answered to a `request` frame naming it.
    fn not_found_about(request: &str) -> ServerFrame {
        ServerFrame::error_about(
            ErrorCode::NotFound,
            "conversation \"g\" does not exist or you are not a member of it",
            request,
            Some("g"),
        )
    }

    #[test]
    fn sync_of_a_non_member_is_refused_without_a_read() {
        let (mut core, _) = setup();
        let frame = ClientFrame::Sync {
            conv: "g".into(),
            after: 0,
            limit: None,
        };
        assert!(may_read(&frame));
        let out = done(core.on_frame(EVE, frame, 2_000));
        assert_eq!(frames_to(&out, EVE), vec![not_found_about("sync")]);
    }

    #[test]
    fn only_sync_may_read() {
        assert!(!may_read(&convs()));
        assert!(!may_read(&ClientFrame::Ping { nonce: None }));
        assert!(!may_read(&ClientFrame::Read {
            conv: "g".into(),
            seq: 1
        }));
        assert!(!may_read(&ClientFrame::Ack { acks: vec![] }));
    }

    /// Three messages in `g`, then bob syncs with a limit of 2.
    fn partial_sync() -> (Core, MemoryStore, SyncPlan) {
        let (mut core, mut store) = setup();
        for cmid in ["m1", "m2", "m3"] {
            let _ = send(&mut core, ALICE, cmid);
        }
        commit_all(&mut core, &mut store);
        let frame = ClientFrame::Sync {
            conv: "g".into(),
            after: 0,
            limit: Some(2),
        };
        let plan = match core.on_frame(BOB, frame, 3_000) {
            Handled::Read(plan) => plan,
            Handled::Done(a) | Handled::Waits(a) => panic!("expected a read, got {a:?}"),
        };
        assert_eq!((plan.from, plan.to, plan.limit), (1, 3, 2));
        (core, store, plan)
    }

    #[test]
    fn a_short_page_has_more() {
        let (mut core, store, plan) = partial_sync();
        let page = store.read(&plan);
        let out = core.serve_page(BOB, plan, page, 1);
        match frames_to(&out, BOB).as_slice() {
            [ServerFrame::Synced {
                conv,
                messages,
                has_more,
                first_seq,
                max_seq,
                ..
            }] => {
                assert_eq!(conv, "g");
                assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
                assert!(has_more);
                assert_eq!((*first_seq, *max_seq), (1, 3));
            }
            other => panic!("expected one synced frame, got {other:?}"),
        }
    }

    #[test]
    fn a_full_page_has_no_more_and_clamps_a_later_trim() {
        let (mut core, store, mut plan) = partial_sync();
        plan.limit = 10;
        let page = store.read(&plan);
        // The store trimmed everything after the plan was made: first_seq is past its end.
        let out = core.serve_page(BOB, plan, page, 9);
        match frames_to(&out, BOB).as_slice() {
            [ServerFrame::Synced {
                messages,
                has_more,
                first_seq,
                max_seq,
                ..
            }] => {
                assert_eq!(messages.len(), 3);
                assert!(!has_more);
                assert_eq!((*first_seq, *max_seq), (4, 3));
            }
            other => panic!("expected one synced frame, got {other:?}"),
        }
    }

    #[test]
    fn a_page_behind_newer_messages_is_followed_by_notify() {
        let (mut core, mut store) = setup();
        core.disconnect(BOB);
        for cmid in ["m1", "m2", "m3"] {
            let _ = send(&mut core, ALICE, cmid);
        }
        commit_all(&mut core, &mut store);
        core.connect(BOB, "bob", "phone");
        let frame = ClientFrame::Sync {
            conv: "g".into(),
            after: 0,
            limit: None,
        };
        let plan = match core.on_frame(BOB, frame, 3_000) {
            Handled::Read(plan) => plan,
            Handled::Done(a) | Handled::Waits(a) => panic!("expected a read, got {a:?}"),
        };
        let page = store.read(&plan);
        // A fourth message becomes durable while the page is read. Bob's connection is not
        // next to it (its push position is its delivered position, 0), so it gets a notify.
        let _ = send(&mut core, ALICE, "m4");
        let committed = commit_all(&mut core, &mut store);
        let notify = ServerFrame::Notify {
            conv: "g".into(),
            max_seq: 4,
        };
        assert_eq!(frames_to(&committed, BOB), vec![notify.clone()]);
        // The page covers up to 3 and has no more: bob would not ask again, so he is told again.
        let out = core.serve_page(BOB, plan, page, 1);
        let to_bob = frames_to(&out, BOB);
        assert_eq!(to_bob.len(), 2, "{to_bob:?}");
        assert!(matches!(
            &to_bob[0],
            ServerFrame::Synced {
                has_more: false,
                max_seq: 3,
                messages,
                ..
            } if messages.len() == 3
        ));
        assert_eq!(to_bob[1], notify);
    }
}
