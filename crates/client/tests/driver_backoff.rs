//! The driver's resend schedule, on tokio's paused clock: a server that accepts the WebSocket
//! but never answers a `send` sees the same client message id again after about 0.5 s, 1 s,
//! 2 s, 4 s ... (±30 % jitter), and the app is told `Failed` after the tenth attempt.

use futures_util::{SinkExt, StreamExt};
use ordo_client::{Client, ClientOptions, Event, Status, Target};
use ordo_protocol::{decode_client, encode, ClientFrame, Encoded, Encoding, Limits, ServerFrame};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A server that says `welcome`, answers `convs` with an empty overview, and reports the
/// arrival time of every `send` (and never accepts anything).
async fn silent_server(listener: TcpListener, sends: mpsc::UnboundedSender<(Instant, String)>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let sends = sends.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let welcome = ServerFrame::Welcome {
                user: "alice".into(),
                device: "a1".into(),
                protocol: 1,
                server_time: 0,
                limits: Limits::default(),
            };
            let text = |f: &ServerFrame| match encode(f, Encoding::Json) {
                Encoded::Text(s) => WsMessage::Text(s.into()),
                Encoded::Binary(b) => WsMessage::Binary(b.into()),
            };
            if ws.send(text(&welcome)).await.is_err() {
                return;
            }
            while let Some(Ok(WsMessage::Text(t))) = ws.next().await {
                match decode_client(t.as_bytes(), Encoding::Json) {
                    Ok(ClientFrame::Send { cmid, .. }) => {
                        let _ = sends.send((Instant::now(), cmid));
                    }
                    Ok(ClientFrame::Convs { .. }) => {
                        let reply = ServerFrame::Convs {
                            conversations: vec![],
                            has_more: false,
                        };
                        if ws.send(text(&reply)).await.is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
    }
}

#[tokio::test(start_paused = true)]
async fn unanswered_sends_are_retried_on_the_backoff_schedule_then_fail() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut sends) = mpsc::unbounded_channel();
    tokio::spawn(silent_server(listener, tx));

    let dir = tempfile::tempdir().unwrap();
    let opts = ClientOptions::new(
        format!("ws://{addr}"),
        "opaque-token",
        dir.path().join("c.redb"),
    );
    let mut client = Client::open(opts).await.unwrap();
    let cmid = client
        .send(Target::Conv("team".into()), "hello")
        .await
        .unwrap();

    let mut times = Vec::new();
    while times.len() < 10 {
        let (at, id) = tokio::time::timeout(Duration::from_secs(600), sends.recv())
            .await
            .expect("a resend")
            .expect("server running");
        assert_eq!(id, cmid, "every attempt carries the same client message id");
        times.push(at);
    }
    let gaps: Vec<u64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    let expected = [500u64, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000];
    for (i, (gap, want)) in gaps.iter().zip(expected).enumerate() {
        let (lo, hi) = (want * 7 / 10, want * 13 / 10 + 5);
        assert!(
            (lo..=hi).contains(gap),
            "gap {} was {gap} ms; expected {want} ms ± 30 % (all gaps: {gaps:?})",
            i + 1
        );
    }
    // After the tenth attempt goes unanswered, the app hears `Failed`.
    let failed = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            match client.next_event().await {
                Some(Event::Status {
                    cmid: c,
                    status: Status::Failed(reason),
                    ..
                }) if c == cmid => return reason,
                Some(_) => {}
                None => panic!("client closed"),
            }
        }
    })
    .await
    .expect("a Failed status");
    assert!(failed.contains("10 attempts"), "{failed}");
    assert!(
        client.pending().unwrap().is_empty(),
        "a failed message leaves the outbox"
    );
    client.close().await;
}
