//! Two encodings: JSON and MessagePack clients share a conversation.

use super::common::*;
use ordo_protocol::{ClientFrame, Encoding, ServerFrame};

#[tokio::test(flavor = "multi_thread")]
async fn json_and_msgpack_clients_share_a_conversation() {
    let server = Server::start(&[]).await;
    let conv = "g-enc";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let mut alice = connect_raw(&server, "alice", Encoding::Json).await;
    let mut bob = connect_raw(&server, "bob", Encoding::MsgPack).await;
    let (text, f) = raw_frame(&mut alice).await;
    assert!(
        text && matches!(f, ServerFrame::Welcome { .. }),
        "alice: {f:?}"
    );
    let (text, f) = raw_frame(&mut bob).await;
    assert!(
        !text && matches!(f, ServerFrame::Welcome { .. }),
        "bob: {f:?}"
    );

    let g = Target::conv(conv);
    let body_a = "héllo from JSON 👋 \"quoted\"";
    let body_b = "hallo aus MessagePack ✓ \u{0}\n";
    alice.send(&send_frame(&g, "a-1", body_a)).await;
    // Alice (JSON) gets accepted and her own push as text...
    let mut alice_frames = Vec::new();
    while alice_frames.len() < 2 {
        let (text, f) = raw_frame(&mut alice).await;
        assert!(text, "alice got a binary frame: {f:?}");
        alice_frames.push(f);
    }
    assert!(
        matches!(&alice_frames[0], ServerFrame::Accepted { seq: 1, .. }),
        "{alice_frames:?}"
    );
    let ServerFrame::Msg(a_view_1) = alice_frames[1].clone() else {
        panic!("{alice_frames:?}")
    };
    // ...bob (MessagePack) gets the push as binary.
    let (text, f) = raw_frame(&mut bob).await;
    assert!(!text, "bob got a text frame: {f:?}");
    let ServerFrame::Msg(b_view_1) = f else {
        panic!("bob: {f:?}")
    };
    assert_eq!(a_view_1, b_view_1);
    assert_eq!((b_view_1.seq, b_view_1.body.as_str()), (1, body_a));

    bob.send(&send_frame(&g, "b-1", body_b)).await;
    let mut bob_frames = Vec::new();
    while bob_frames.len() < 2 {
        let (text, f) = raw_frame(&mut bob).await;
        assert!(!text, "bob got a text frame: {f:?}");
        bob_frames.push(f);
    }
    assert!(
        matches!(&bob_frames[0], ServerFrame::Accepted { seq: 2, .. }),
        "{bob_frames:?}"
    );
    let ServerFrame::Msg(b_view_2) = bob_frames[1].clone() else {
        panic!("{bob_frames:?}")
    };
    let (text, f) = raw_frame(&mut alice).await;
    assert!(text, "alice got a binary frame: {f:?}");
    let ServerFrame::Msg(a_view_2) = f else {
        panic!("alice: {f:?}")
    };
    assert_eq!(a_view_2, b_view_2);
    assert_eq!(
        (a_view_2.seq, a_view_2.body.as_str(), a_view_2.from.as_str()),
        (2, body_b, "bob")
    );

    // Pulls come in each client's own encoding too, with the same content.
    let sync = ClientFrame::Sync {
        conv: conv.into(),
        after: 0,
        limit: None,
    };
    alice.send(&sync).await;
    bob.send(&sync).await;
    let mut views = Vec::new();
    for (c, want_text) in [(&mut alice, true), (&mut bob, false)] {
        let msgs = loop {
            let (text, f) = raw_frame(c).await;
            assert_eq!(text, want_text, "{}: wrong kind for {f:?}", c.user);
            if let ServerFrame::Synced { messages, .. } = f {
                break messages;
            }
        };
        views.push(msgs);
    }
    assert_eq!(views[0], views[1]);
    assert_eq!(views[0], [(*a_view_1).clone(), (*a_view_2).clone()]);
}
