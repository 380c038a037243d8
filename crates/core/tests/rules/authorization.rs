//! G8: authorization. A non-member may neither write, read, acknowledge nor see a
//! conversation; an unknown conversation is not found, and naming a direct id does not create
//! it.

use crate::support::*;
use ordo_core::Action;
use ordo_core::Retention;
use ordo_protocol::{direct_conv_id, ErrorCode, ServerFrame};

/// A non-member gets, word for word, the answer for a conversation that does not exist: the
/// answer tells no one which conversations exist or who has talked to whom.
#[test]
fn non_members_get_the_answer_for_a_conversation_that_does_not_exist() {
    let mut s = Sim::new(cfg());
    s.group("g", &["alice", "bob"], Retention::default());
    s.core.connect(1, "alice", "a1");
    s.core.connect(3, "carol", "c1");
    s.send(1, "g", "m1");
    s.flush();

    let (c, retryable, _) = rejected(&s.send(3, "g", "x"));
    assert_eq!((c, retryable), (ErrorCode::NotFound, false));
    // Word for word, but for the id.
    let said = |out: Vec<Action>, id: &str| match &out[..] {
        [Action::Send {
            frame: ServerFrame::Rejected { code, message, .. },
            ..
        }] => (*code, message.replace(id, "ID")),
        other => panic!("expected one rejection, got {other:?}"),
    };
    assert_eq!(
        said(s.send(3, "g", "y"), "\"g\""),
        said(s.send(3, "h", "y"), "\"h\"")
    );
    let answer = |r: Result<_, ordo_core::CoreError>, id: &str| {
        r.err().map(|e| e.to_string().replace(id, "ID"))
    };
    assert_eq!(
        answer(s.core.sync(3, "g", 0, None), "\"g\""),
        answer(s.core.sync(3, "h", 0, None), "\"h\"")
    );
    assert_eq!(code(s.core.sync(3, "g", 0, None)), ErrorCode::NotFound);
    assert_eq!(code(s.core.ack(3, "g", 1)), ErrorCode::NotFound);
    assert_eq!(code(s.core.read(3, "g", 1)), ErrorCode::NotFound);
    assert!(s.overview(3).is_empty());
    assert!(s.core.take_batch().is_none(), "nothing stored");
    assert_eq!(s.store.seqs("g"), vec![1]);
    assert!(s.store.cursors.is_empty());
}

#[test]
fn unknown_conversations_are_not_found() {
    let mut s = Sim::new(cfg());
    s.core.connect(1, "alice", "a1");
    assert_eq!(rejected(&s.send(1, "nope", "x")).0, ErrorCode::NotFound);
    // A direct id is created only by `to`, never by naming it.
    let d = direct_conv_id("alice", "bob");
    assert_eq!(rejected(&s.send(1, &d, "y")).0, ErrorCode::NotFound);
    assert_eq!(code(s.core.sync(1, "nope", 0, None)), ErrorCode::NotFound);
    assert_eq!(code(s.core.ack(1, "nope", 1)), ErrorCode::NotFound);
    assert_eq!(code(s.core.read(1, "nope", 1)), ErrorCode::NotFound);
    assert!(s.core.take_batch().is_none());
    // The rejected cmid was not remembered: it can be used for a real message.
    s.group("g", &["alice"], Retention::default());
    assert!(s.send(1, "g", "x").is_empty());
}
