//! Every frame of the protocol, client to server and server to client.
//!
//! Both directions are internally tagged enums: a frame is a map whose `type` field names the
//! variant, e.g. `{"type":"ping"}` (decoded in one pass, see [`crate::tagged`]). The same model is encoded as JSON (text frames) or as a
//! MessagePack map with the same field names (binary frames). Unknown fields are ignored so that
//! newer clients can talk to older servers.
//!
//! Times (`ts`, `server_time`) are milliseconds since the Unix epoch, by the server's clock.
//! Sequence numbers start at 1; `0` means "before the first message".

use crate::error_code::ErrorCode;
use crate::limits::Limits;
use crate::tagged::tagged_enum;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

tagged_enum! {
/// A frame a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame (remote "ClientFrame", decoder ClientFrameDecoder) {
    /// Send a message. Exactly one of `conv` (an existing conversation) or `to` (a user: the
    /// direct conversation with them, created on first send) must be set. `cmid` is the client
    /// message id: unique per sending user, reused on every resend of the same message.
    Send {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conv: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        cmid: String,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
    },
    /// Cumulative delivered positions: "this device has stored every message up to `seq`".
    Ack { acks: Vec<Position> },
    /// Cumulative read position of this device's user in one conversation.
    Read { conv: String, seq: u64 },
    /// Pull messages with seq > `after`, at most `limit` (server default and cap apply). Also
    /// acknowledges delivery up to `after`.
    Sync {
        conv: String,
        after: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Ask for one page of the overview of the conversations this user is a member of: those
    /// with an id after `after` (from the first when absent), in id order, at most `limit`
    /// (at most [`MAX_CONVS_LIMIT`](crate::limits::MAX_CONVS_LIMIT), the default). The answer
    /// says whether more follow.
    Convs {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Liveness check; answered by `pong` with the same nonce.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
}
}

/// A position in one conversation, as carried by `ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub conv: String,
    pub seq: u64,
}

/// A stored message as the server delivers it, pushed in `msg` or pulled in `synced`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub conv: String,
    pub seq: u64,
    /// Sending user; empty ([`SYSTEM`]) for a message of the system: one the app's backend
    /// posted as nobody, and every membership event.
    pub from: String,
    /// Sending device; empty for messages the admin API posted.
    pub device: String,
    pub cmid: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// When the server accepted it.
    pub ts: u64,
    /// Set on a system message that records a change of the conversation (members, name); its
    /// body is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<ConvEvent>,
}

/// The `from` of system messages: no user id is empty.
pub const SYSTEM: &str = "";

/// Most users one membership event names; a larger change is recorded as several events in a
/// row.
pub const MAX_EVENT_USERS: usize = 256;

impl ConvEvent {
    /// About how many bytes it takes (see [`ServerFrame::approx_len`]).
    pub fn approx_len(&self) -> usize {
        match self {
            ConvEvent::Joined { users }
            | ConvEvent::Left { users }
            | ConvEvent::Removed { users } => 32 + users.iter().map(|u| 8 + u.len()).sum::<usize>(),
            ConvEvent::Renamed { name } => 32 + name.len(),
        }
    }
}

/// A change of a conversation, recorded in its history as a system message, so that every
/// device sees it at the same place among the messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConvEvent {
    /// These users became members (the group was created with them, or they were added).
    Joined { users: Vec<String> },
    /// These users left the group (the app's backend reported that they chose to).
    Left { users: Vec<String> },
    /// These users were removed from the group.
    Removed { users: Vec<String> },
    /// The group's name changed (`name` empty: it has none now).
    Renamed { name: String },
}

/// One conversation in a `convs` overview.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvInfo {
    pub conv: String,
    pub kind: ConvKind,
    pub epoch: u64,
    /// Highest seq assigned so far (0 when empty).
    pub max_seq: u64,
    /// Lowest seq still stored; lower ones were removed by retention.
    pub first_seq: u64,
    /// This device's delivered position.
    pub delivered: u64,
    /// This user's read position.
    pub read: u64,
    /// How many members it has.
    #[serde(default)]
    pub member_count: u64,
    /// The lowest delivered position among the other members (the highest position of each
    /// member's devices); `max_seq` when there is no other member. A message of this user is
    /// delivered to everyone once its seq is at most this.
    #[serde(default)]
    pub others_delivered: u64,
    /// The same for read positions.
    #[serde(default)]
    pub others_read: u64,
    /// Every member with their delivered and read positions (maximum over their devices), in
    /// user order; empty (absent on the wire) for groups with more members than the server
    /// sends receipts for, where the aggregates above are all there is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberPosition>,
    /// The group's name, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvKind {
    Direct,
    Group,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPosition {
    pub user: String,
    pub delivered: u64,
    pub read: u64,
}

tagged_enum! {
/// A frame the server sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame (remote "ServerFrame", decoder ServerFrameDecoder) {
    /// First frame on every connection.
    Welcome {
        user: String,
        device: String,
        protocol: u32,
        server_time: u64,
        limits: Limits,
    },
    /// The message with this `cmid` is durable with this `seq`. Sent again, identical, for a
    /// duplicate resend.
    Accepted {
        cmid: String,
        conv: String,
        seq: u64,
        ts: u64,
    },
    /// The message with this `cmid` was not stored.
    Rejected {
        cmid: String,
        code: ErrorCode,
        message: String,
        retryable: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// A new message pushed to a device that is caught up in this conversation. (Shared: the
    /// server pushes one message to many devices and also stores it; the wire form is the
    /// message's fields.)
    Msg(Arc<Message>),
    /// There are messages up to `max_seq` that were not pushed: pull them with `sync`.
    Notify { conv: String, max_seq: u64 },
    /// The answer to `sync`.
    Synced {
        conv: String,
        epoch: u64,
        messages: Vec<Message>,
        /// More messages follow the last one returned; sync again after it.
        has_more: bool,
        /// Lowest seq still stored. If it is greater than `after + 1`, the range in between
        /// was removed by retention.
        first_seq: u64,
        max_seq: u64,
    },
    /// A member's delivered/read positions changed (cumulative, never decreasing).
    Receipt {
        conv: String,
        user: String,
        delivered: u64,
        read: u64,
    },
    /// The answer to `convs`: one page, and whether more conversations follow the last one
    /// listed (ask again with `after` set to it).
    Convs {
        conversations: Vec<ConvInfo>,
        #[serde(default)]
        has_more: bool,
    },
    /// A frame could not be served. The connection stays open. `request` names the frame it
    /// answers (its `type`: `sync`, `read`, `ack`, `convs`; absent for a frame that could not
    /// be read at all) and `conv` the conversation that frame named (for an `ack`, the position
    /// refused), so that a client with several requests in flight knows which one failed.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conv: Option<String>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
        server_time: u64,
    },
}
}

impl ServerFrame {
    /// About how many bytes this frame takes, encoded or held: what a connection's outbound
    /// budget counts. Strings by their length plus a fixed allowance per frame and per nested
    /// record; cheap enough to take for every frame queued.
    pub fn approx_len(&self) -> usize {
        const FRAME: usize = 64;
        const RECORD: usize = 96;
        let msg = |m: &Message| {
            RECORD
                + m.conv.len()
                + m.from.len()
                + m.device.len()
                + m.cmid.len()
                + m.body.len()
                + m.event.as_ref().map_or(0, ConvEvent::approx_len)
        };
        match self {
            ServerFrame::Msg(m) => FRAME + msg(m),
            ServerFrame::Synced { messages, .. } => FRAME + messages.iter().map(msg).sum::<usize>(),
            ServerFrame::Convs { conversations, .. } => {
                FRAME + conversations.iter().map(Self::info_len).sum::<usize>()
            }
            ServerFrame::Rejected { cmid, message, .. } => FRAME + cmid.len() + message.len(),
            ServerFrame::Error { message, conv, .. } => {
                FRAME + message.len() + conv.as_ref().map_or(0, String::len)
            }
            ServerFrame::Accepted { cmid, conv, .. } => FRAME + cmid.len() + conv.len(),
            _ => FRAME * 2,
        }
    }

    /// About how many bytes one `convs` entry takes (see [`ServerFrame::approx_len`]).
    pub fn info_len(c: &ConvInfo) -> usize {
        const RECORD: usize = 160;
        RECORD
            + c.conv.len()
            + c.name.as_ref().map_or(0, String::len)
            + c.members.iter().map(|p| 48 + p.user.len()).sum::<usize>()
    }

    /// An `error` answering a frame that could not be read (nothing to name).
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            request: None,
            conv: None,
        }
    }

    /// An `error` answering a `request` frame (its `type`) that named `conv`.
    pub fn error_about(
        code: ErrorCode,
        message: impl Into<String>,
        request: &str,
        conv: Option<&str>,
    ) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            request: Some(request.to_string()),
            conv: conv.map(str::to_string),
        }
    }

    pub fn rejected(
        cmid: impl Into<String>,
        code: ErrorCode,
        message: impl Into<String>,
        retry_after_ms: Option<u64>,
    ) -> Self {
        ServerFrame::Rejected {
            cmid: cmid.into(),
            code,
            message: message.into(),
            retryable: code.retryable(),
            retry_after_ms,
        }
    }
}
