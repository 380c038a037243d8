//! The router hands offline events to the webhook task without waiting; while the task is
//! busy (its queue write is an fsync) what waits in between must stay bounded in bytes, not only
//! in events: one event carries up to 999 user ids of up to 128 bytes (and a preview of up to
//! 4 KiB), and 10,000 of them would hold about 1.5 GB.

use ordo_protocol::Message;
use ordo_server::webhook::{start, Endpoint};

/// Resident set size of this process, in bytes.
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm resident pages");
    pages * 4096
}

// A current-thread runtime: the webhook task does not run while the test does not yield, as
// when it waits for its queue's fsync while the router goes on offering.
#[tokio::test(flavor = "current_thread")]
async fn the_hand_over_to_the_webhook_task_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::parse("http://127.0.0.1:9/hooks").unwrap();
    let (sender, _task) = start(endpoint, "whsec".into(), 0, dir.path()).unwrap();
    let msg = Message {
        conv: "team".into(),
        seq: 1,
        from: "alice".into(),
        device: "phone".into(),
        cmid: "c1".into(),
        body: "hello".into(),
        reply_to: None,
        ts: 1,
        event: None,
    };
    // A conversation of 1,000 members, 999 of them offline, with ids of the longest allowed.
    let users: Vec<String> = (0..999).map(|i| format!("{i:0>128}")).collect();
    let before = rss_bytes();
    // 700 messages: far fewer than the channel's 10,000 events.
    for seq in 1..=700u64 {
        let m = Message { seq, ..msg.clone() };
        sender.offer(&m, 7, users.clone());
    }
    let grown = rss_bytes().saturating_sub(before);
    let bound = 64 << 20;
    assert!(
        grown <= bound,
        "the hand-over to the webhook task holds {} MiB after 700 events (10,000 such events \
         would hold about {} MiB)",
        grown >> 20,
        (grown / 700 * 10_000) >> 20
    );
}
