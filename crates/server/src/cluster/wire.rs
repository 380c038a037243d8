//! What the nodes of a cluster say to each other over NATS, and on which subjects.
//!
//! Each node listens on `<prefix>.node.<node id>`; a message is one [`NodeMsg`], encoded as
//! MessagePack with field names (as the protocol's binary frames are). Client frames and server
//! frames travel inside as the protocol defines them. NATS delivers at most once, in order from
//! one publisher to one subscriber: a frame a node forwards carries its number in its
//! connection's stream to that node, so that the owner notices a lost one (and closes the
//! connection, whose client resends in order) rather than sequence a later send before it.

use ordo_core::{AdminOp, AdminPost, SessionId};
use ordo_protocol::{ClientFrame, ErrorCode, ServerFrame};
use serde::{Deserialize, Serialize};

/// A node's process: its id, and this start's incarnation (random at every start). A
/// connection is a process's: its session id means nothing to the next process of the same node
/// id, so remote sessions are known by both.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    pub node: std::sync::Arc<str>,
    pub inc: u64,
}

/// One message between nodes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum NodeMsg {
    /// From a connection's node to every other: the connection is open (sent when it opens,
    /// and again every few seconds for as long as it stays open: a node forgets connections it
    /// has not heard of for a while).
    Open {
        from: Peer,
        sessions: Vec<OpenSession>,
    },
    /// The connection closed.
    Close { from: Peer, session: SessionId },
    /// A frame of a connection for a conversation the receiving node owns; `n` counts the
    /// frames of this connection sent to that node, from 1.
    Frame {
        from: Peer,
        session: SessionId,
        n: u64,
        frame: ClientFrame,
    },
    /// A `msg` the owner pushed did not fit the connection's queue: the owner pushes nothing
    /// more of the conversation until the device syncs (the connection's node owes it a
    /// `notify`).
    Missed {
        from: Peer,
        session: SessionId,
        conv: String,
        seq: u64,
    },
    /// From an owner to a connection's node: frames for it, in order. `inc` is the incarnation
    /// of the process the connection belongs to (another process of that node drops them).
    Out {
        inc: u64,
        session: SessionId,
        frames: Vec<ServerFrame>,
    },
    /// From an owner to a connection's node: close the connection (its stream of frames lost
    /// one, or the owner dropped it): the client reconnects and resends in order.
    Kick {
        inc: u64,
        session: SessionId,
        reason: String,
    },
    /// An admin request for a group the receiving node owns; answered on the NATS reply
    /// subject with a `Result<AdminReply, WireError>`.
    Admin { op: AdminOp },
    /// A backend post into a conversation the receiving node owns; answered with a
    /// `Result<Posted, WireError>`.
    Post { post: AdminPost },
}

/// A connection as its node announces it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpenSession {
    pub session: SessionId,
    pub user: String,
    pub device: String,
}

/// An error another node answered with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

/// The subject node `node` listens on.
pub fn node_subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.node.{node}")
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(msg).map_err(|e| e.to_string())
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_between_nodes_as_they_were() {
        let msg = NodeMsg::Frame {
            from: Peer {
                node: "n1".into(),
                inc: 9,
            },
            session: 7,
            n: 3,
            frame: ClientFrame::Send {
                conv: Some("g".into()),
                to: None,
                cmid: "m1".into(),
                body: "hi".into(),
                reply_to: None,
            },
        };
        let back: NodeMsg = decode(&encode(&msg).expect("encode")).expect("decode");
        assert_eq!(format!("{back:?}"), format!("{msg:?}"));
        let out = NodeMsg::Out {
            inc: 9,
            session: 7,
            frames: vec![ServerFrame::error(ErrorCode::Unavailable, "x")],
        };
        let back: NodeMsg = decode(&encode(&out).expect("encode")).expect("decode");
        assert_eq!(format!("{back:?}"), format!("{out:?}"));
    }
}
