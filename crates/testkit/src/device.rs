//! One connected device for tests: the raw protocol client ([`WireClient`]) with the waits a
//! test needs (the next frame, the answer to a send or a sync), each bounded by [`WAIT`] and
//! failing loudly, naming the device, when it runs out. Panics are its error reporting: it is
//! for tests only.

use crate::process::ServerProcess;
use crate::wire::{WireClient, WireError};
use ordo_protocol::{ClientFrame, ConvInfo, Encoding, ErrorCode, Message, Position, ServerFrame};
use std::collections::HashMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Deadline for any single wait (a frame, a connect); CI machines are small and shared.
pub const WAIT: Duration = Duration::from_secs(20);

/// Lifetime of the tokens tests mint.
const TOKEN_TTL_SECS: u64 = 3600;

/// Where a `send` goes.
#[derive(Clone, Debug)]
pub enum Target {
    Conv(String),
    To(String),
}

impl Target {
    pub fn conv(id: &str) -> Target {
        Target::Conv(id.to_string())
    }

    pub fn to(user: &str) -> Target {
        Target::To(user.to_string())
    }
}

pub fn send_frame(target: &Target, cmid: &str, body: &str) -> ClientFrame {
    let (conv, to) = match target {
        Target::Conv(c) => (Some(c.clone()), None),
        Target::To(u) => (None, Some(u.clone())),
    };
    ClientFrame::Send {
        conv,
        to,
        cmid: cmid.to_string(),
        body: body.to_string(),
        reply_to: None,
    }
}

/// One connected device.
pub struct Device {
    pub wire: WireClient,
    pub user: String,
    pub device: String,
}

impl Device {
    /// Connects `user`'s `device` to `server` (JSON) and reads `welcome`.
    pub async fn connect(server: &ServerProcess, user: &str, device: &str) -> Device {
        Self::connect_with(server, user, device, Encoding::Json).await
    }

    /// Like [`connect`](Self::connect), speaking `enc`.
    pub async fn connect_with(
        server: &ServerProcess,
        user: &str,
        device: &str,
        enc: Encoding,
    ) -> Device {
        let token = crate::token(server.secret(), user, device, TOKEN_TTL_SECS)
            .unwrap_or_else(|e| panic!("token for {user}/{device}: {e}"));
        let wire = tokio::time::timeout(WAIT, WireClient::connect(&server.ws_url(), &token, enc))
            .await
            .unwrap_or_else(|_| panic!("connect {user}/{device}: timed out"))
            .unwrap_or_else(|e| panic!("connect {user}/{device}: {e}"));
        let mut c = Device {
            wire,
            user: user.into(),
            device: device.into(),
        };
        match c.next().await {
            ServerFrame::Welcome {
                user: u, device: d, ..
            } => {
                assert_eq!((u.as_str(), d.as_str()), (user, device), "welcome names us");
            }
            other => panic!("{user}/{device}: expected welcome, got {other:?}"),
        }
        c
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        self.wire
            .send(frame)
            .await
            .unwrap_or_else(|e| panic!("{}/{}: send failed: {e}", self.user, self.device));
    }

    /// The next frame, whatever it is (panics after [`WAIT`]).
    pub async fn next(&mut self) -> ServerFrame {
        match self.wire.recv_timeout(WAIT).await {
            Ok(f) => f,
            Err(e) => panic!("{}/{}: waiting for a frame: {e}", self.user, self.device),
        }
    }

    /// Reads frames until `pick` returns `Some`, dropping the others.
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        loop {
            let f = self.next().await;
            if let Some(t) = pick(&f) {
                return t;
            }
        }
    }

    /// Sends one message and waits for its `accepted` (or `rejected`), dropping other frames.
    pub async fn send_one(&mut self, target: &Target, cmid: &str, body: &str) -> SendResult {
        self.send(&send_frame(target, cmid, body)).await;
        let want = cmid.to_string();
        self.wait_for(|f| match f {
            ServerFrame::Accepted {
                cmid, seq, conv, ..
            } if *cmid == want => Some(SendResult::Accepted {
                conv: conv.clone(),
                seq: *seq,
            }),
            ServerFrame::Rejected { cmid, code, .. } if *cmid == want => {
                Some(SendResult::Rejected(*code))
            }
            _ => None,
        })
        .await
    }

    /// Sends every cmid (body = cmid) with at most `window` unanswered, and returns each
    /// accepted seq, in send order. Other frames (pushes, notifies, receipts) are dropped.
    /// Panics on a rejection.
    pub async fn send_all(&mut self, target: &Target, cmids: &[String], window: usize) -> Vec<u64> {
        let mut seqs: HashMap<String, u64> = HashMap::new();
        let mut next = 0;
        while seqs.len() < cmids.len() {
            while next < cmids.len() && next - seqs.len() < window {
                let c = &cmids[next];
                self.send(&send_frame(target, c, c)).await;
                next += 1;
            }
            match self.next().await {
                ServerFrame::Accepted { cmid, seq, .. } => {
                    assert!(
                        seqs.insert(cmid.clone(), seq).is_none(),
                        "two `accepted` for {cmid}"
                    );
                }
                ServerFrame::Rejected {
                    cmid,
                    code,
                    message,
                    ..
                } => {
                    panic!("{cmid} rejected: {code} {message}")
                }
                _ => {}
            }
        }
        cmids.iter().map(|c| seqs[c]).collect()
    }

    /// One `sync`; drops frames other than its answer (and panics on an `error`).
    pub async fn sync(&mut self, conv: &str, after: u64, limit: Option<u32>) -> Synced {
        self.send(&ClientFrame::Sync {
            conv: conv.into(),
            after,
            limit,
        })
        .await;
        let want = conv.to_string();
        self.wait_for(|f| match f {
            ServerFrame::Synced {
                conv,
                epoch,
                messages,
                has_more,
                first_seq,
                max_seq,
            } if *conv == want => Some(Synced {
                epoch: *epoch,
                messages: messages.clone(),
                has_more: *has_more,
                first_seq: *first_seq,
                max_seq: *max_seq,
            }),
            ServerFrame::Error { code, message, .. } => {
                panic!("sync {want}: error {code} {message}")
            }
            _ => None,
        })
        .await
    }

    /// Pages through the whole conversation after `after`; returns every message.
    pub async fn sync_all(&mut self, conv: &str, after: u64) -> Vec<Message> {
        let mut out: Vec<Message> = Vec::new();
        let mut after = after;
        loop {
            let page = self.sync(conv, after, Some(200)).await;
            if let Some(last) = page.messages.last() {
                after = last.seq;
            }
            out.extend(page.messages);
            if !page.has_more {
                return out;
            }
        }
    }

    /// Every conversation of the overview, page after page.
    pub async fn convs(&mut self) -> Vec<ConvInfo> {
        let mut out: Vec<ConvInfo> = Vec::new();
        loop {
            let after = out.last().map(|c| c.conv.clone());
            let (page, more) = self.convs_page(after, None).await;
            out.extend(page);
            if !more {
                return out;
            }
        }
    }

    /// One page of the overview: its conversations and whether more follow.
    pub async fn convs_page(
        &mut self,
        after: Option<String>,
        limit: Option<u32>,
    ) -> (Vec<ConvInfo>, bool) {
        self.send(&ClientFrame::Convs { after, limit }).await;
        self.wait_for(|f| match f {
            ServerFrame::Convs {
                conversations,
                has_more,
            } => Some((conversations.clone(), *has_more)),
            _ => None,
        })
        .await
    }

    pub async fn ack(&mut self, conv: &str, seq: u64) {
        self.send(&ClientFrame::Ack {
            acks: vec![Position {
                conv: conv.into(),
                seq,
            }],
        })
        .await;
    }

    pub async fn read(&mut self, conv: &str, seq: u64) {
        self.send(&ClientFrame::Read {
            conv: conv.into(),
            seq,
        })
        .await;
    }

    /// A ping round trip: proves the connection is alive and everything sent before it was
    /// handled by the connection.
    pub async fn ping(&mut self, nonce: u64) {
        self.send(&ClientFrame::Ping { nonce: Some(nonce) }).await;
        self.wait_for(|f| match f {
            ServerFrame::Pong { nonce: n, .. } if *n == Some(nonce) => Some(()),
            _ => None,
        })
        .await
    }

    /// The raw next WebSocket message, `None` once the stream ended.
    pub async fn recv_raw(&mut self) -> Result<Option<WsMessage>, WireError> {
        self.wire.recv_raw(WAIT).await
    }

    pub async fn close(self) {
        self.wire.close().await;
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendResult {
    Accepted { conv: String, seq: u64 },
    Rejected(ErrorCode),
}

impl SendResult {
    pub fn seq(&self) -> u64 {
        match self {
            SendResult::Accepted { seq, .. } => *seq,
            SendResult::Rejected(c) => panic!("expected accepted, got rejected {c}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Synced {
    pub epoch: u64,
    pub messages: Vec<Message>,
    pub has_more: bool,
    pub first_seq: u64,
    pub max_seq: u64,
}

pub fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

/// `prefix-0000`, `prefix-0001`, ...
pub fn cmids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}
