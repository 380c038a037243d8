//! Bad input (G9): malformed and oversized frames get errors and harm nobody else.

use super::common::*;
use ordo_protocol::{Encoding, ErrorCode, ServerFrame};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The next frame that is not a push (a member gets other members' messages meanwhile).
async fn next_not_msg(c: &mut Client) -> ServerFrame {
    c.wait_for(|f| (!matches!(f, ServerFrame::Msg(_))).then(|| f.clone()))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_frames_get_errors_and_harm_nobody() {
    let server = Server::start(&["--max-frame-bytes", "4096", "--max-body-bytes", "1024"]).await;
    let conv = "g-bad";
    server
        .create_group(conv, &["alice", "bob"], serde_json::json!({}))
        .await;
    let g = Target::conv(conv);
    let mut bob = Client::connect(&server, "bob", "phone").await;
    // Bob's second device only watches: it must see every message pushed, once, in order.
    let mut watcher = Client::connect(&server, "bob", "tablet").await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    // The limits are announced in `welcome`.
    let mut probe = connect_raw(&server, "alice", Encoding::Json).await;
    match raw_frame(&mut probe).await {
        (true, ServerFrame::Welcome { limits, .. }) => {
            assert_eq!(
                (limits.max_frame_bytes, limits.max_body_bytes),
                (4096, 1024)
            )
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    probe.close().await;
    let before = cmids("before", 3);
    assert_eq!(bob.send_all(&g, &before, 3).await, [1, 2, 3]);

    // Not JSON: an error, and the connection still works.
    alice
        .wire
        .send_raw(WsMessage::Text("not json".into()))
        .await
        .expect("send");
    match next_not_msg(&mut alice).await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("expected error malformed, got {other:?}"),
    }
    alice.ping(1).await;
    // JSON, but no such frame type.
    alice
        .wire
        .send_raw(WsMessage::Text(r#"{"type":"launch_rockets"}"#.into()))
        .await
        .expect("send");
    match next_not_msg(&mut alice).await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("expected error malformed, got {other:?}"),
    }
    // Binary garbage (not MessagePack of a frame).
    alice
        .wire
        .send_raw(WsMessage::Binary(vec![0xc1, 0xff, 0x00, 0x13, 0x37].into()))
        .await
        .expect("send");
    match next_not_msg(&mut alice).await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("expected error malformed, got {other:?}"),
    }
    alice.ping(2).await;

    // A body over max_body_bytes in a frame under max_frame_bytes: rejected, not retryable.
    let big = "x".repeat(2000);
    alice.send(&send_frame(&g, "too-big", &big)).await;
    match next_not_msg(&mut alice).await {
        ServerFrame::Rejected {
            cmid,
            code,
            retryable,
            ..
        } => assert_eq!(
            (cmid.as_str(), code, retryable),
            ("too-big", ErrorCode::TooLarge, false)
        ),
        other => panic!("expected rejected too_large, got {other:?}"),
    }
    // Exactly at the limit is fine.
    let edge = "y".repeat(1024);
    assert_eq!(alice.send_one(&g, "at-limit", &edge).await.seq(), 4);

    // A frame over max_frame_bytes (but small enough for the WebSocket layer to read whole):
    // the socket is closed with 1009.
    let over = format!(
        r#"{{"type":"send","conv":"{conv}","cmid":"huge","body":"{}"}}"#,
        "z".repeat(4500)
    );
    alice
        .wire
        .send_raw(WsMessage::Text(over.into()))
        .await
        .expect("send");
    let (code, reason) = expect_close(&mut alice).await;
    assert_eq!(code, 1009, "close reason: {reason}");
    assert_eq!(CloseCode::from(code), CloseCode::Size);

    // Far over the limit: the WebSocket layer refuses it, also with 1009 (or, at worst, by
    // dropping the connection; never by accepting it).
    let mut mallory = Client::connect(&server, "alice", "tablet").await;
    let huge = format!(
        r#"{{"type":"send","conv":"{conv}","cmid":"huger","body":"{}"}}"#,
        "z".repeat(20_000)
    );
    mallory
        .wire
        .send_raw(WsMessage::Text(huge.into()))
        .await
        .expect("send");
    let ending = loop {
        match mallory.recv_raw().await {
            Ok(Some(WsMessage::Close(f))) => break format!("{:?}", f.map(|f| u16::from(f.code))),
            Ok(Some(WsMessage::Text(t))) => panic!("frame instead of a close: {t}"),
            Ok(Some(_)) => {}
            Ok(None) => break "end of stream".to_string(),
            Err(e) => break format!("error: {e}"),
        }
    };
    assert_eq!(ending, "Some(1009)", "a far oversized frame");

    // Other clients noticed nothing; everything accepted is intact.
    let after = cmids("after", 3);
    assert_eq!(bob.send_all(&g, &after, 3).await, [5, 6, 7]);
    let mut pushed = Vec::new();
    while pushed.len() < 7 {
        match watcher.next().await {
            ServerFrame::Msg(m) => pushed.push(Arc::unwrap_or_clone(m)),
            other => panic!("the watcher got {other:?}"),
        }
    }
    assert_seqs(&pushed, 1, 7, "the watcher's pushes");
    let all = bob.sync_all(conv, 0).await;
    assert_eq!(all, pushed);
    let got: Vec<(&str, &str)> = all
        .iter()
        .map(|m| (m.cmid.as_str(), m.body.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("before-0000", "before-0000"),
            ("before-0001", "before-0001"),
            ("before-0002", "before-0002"),
            ("at-limit", edge.as_str()),
            ("after-0000", "after-0000"),
            ("after-0001", "after-0001"),
            ("after-0002", "after-0002"),
        ]
    );
    // The closed client can come back.
    let mut alice = Client::connect(&server, "alice", "phone").await;
    assert_eq!(alice.sync_all(conv, 0).await, all);
}

/// A text message that is not UTF-8 cannot be answered with `error` (the WebSocket protocol
/// ends the connection there): it is closed with 1007 and a reason, and a new connection of the
/// same user is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_text_message_that_is_not_utf8_is_closed_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let server = Server::start(&[]).await;
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let bad = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    alice
        .wire
        .send_raw(WsMessage::Frame(bad))
        .await
        .expect("send");
    let (code, reason) = expect_close(&mut alice).await;
    assert_eq!(code, 1007, "{reason}");
    assert!(reason.contains("UTF-8"), "{reason}");
    let mut again = Client::connect(&server, "alice", "phone").await;
    again.ping(7).await;
}
