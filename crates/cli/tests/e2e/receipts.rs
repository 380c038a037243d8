//! Receipts (G7): delivered and read positions reach the sender and never go back.

use super::common::*;
use ordo_protocol::{direct_conv_id, ServerFrame};

#[tokio::test(flavor = "multi_thread")]
async fn receipts_reach_the_sender_and_never_go_back() {
    let server = Server::start(&[]).await;
    let conv = direct_conv_id("alice", "bob");
    let mut alice = Client::connect(&server, "alice", "phone").await;
    let mut bob = Client::connect(&server, "bob", "phone").await;
    let to_bob = Target::to("bob");
    assert_eq!(alice.send_all(&to_bob, &cmids("r", 3), 3).await, [1, 2, 3]);
    let mut pushed = Vec::new();
    while pushed.len() < 3 {
        if let ServerFrame::Msg(m) = bob.next().await {
            pushed.push(m.seq);
        }
    }
    assert_eq!(pushed, [1, 2, 3]);

    // Every receipt about bob that alice sees, in order.
    let mut seen: Vec<(u64, u64)> = Vec::new();
    async fn next_bob_receipt(
        alice: &mut Client,
        conv: &str,
        seen: &mut Vec<(u64, u64)>,
    ) -> (u64, u64) {
        let r = alice
            .wait_for(|f| match f {
                ServerFrame::Receipt {
                    conv: c,
                    user,
                    delivered,
                    read,
                } if user == "bob" => {
                    assert_eq!(c, conv);
                    Some((*delivered, *read))
                }
                _ => None,
            })
            .await;
        seen.push(r);
        r
    }

    bob.ack(&conv, 3).await;
    assert_eq!(next_bob_receipt(&mut alice, &conv, &mut seen).await, (3, 0));
    // A stale ack, then a read: the read is reported, delivered stays at 3.
    bob.ack(&conv, 1).await;
    bob.read(&conv, 2).await;
    assert_eq!(next_bob_receipt(&mut alice, &conv, &mut seen).await, (3, 2));
    // A stale read, then a read past the end (clamped to what exists).
    bob.read(&conv, 1).await;
    bob.read(&conv, 99).await;
    assert_eq!(next_bob_receipt(&mut alice, &conv, &mut seen).await, (3, 3));
    // A new message: delivered moves on, read stays.
    assert_eq!(alice.send_one(&to_bob, "r-new", "new").await.seq(), 4);
    bob.ack(&conv, 4).await;
    assert_eq!(next_bob_receipt(&mut alice, &conv, &mut seen).await, (4, 3));
    // Reading implies delivery.
    assert_eq!(alice.send_one(&to_bob, "r-newer", "newer").await.seq(), 5);
    bob.read(&conv, 5).await;
    assert_eq!(next_bob_receipt(&mut alice, &conv, &mut seen).await, (5, 5));
    assert!(
        seen.windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "receipts went back: {seen:?}"
    );

    // The overview agrees, for both.
    for c in [&mut alice, &mut bob] {
        let info = c.convs().await;
        let bob_pos = info[0]
            .members
            .iter()
            .find(|m| m.user == "bob")
            .map(|m| (m.delivered, m.read));
        assert_eq!(bob_pos, Some((5, 5)), "{}'s overview", c.user);
    }
}
