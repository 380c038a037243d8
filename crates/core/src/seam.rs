//! What the two halves of the core say to each other: the [`Hub`](crate::hub::Hub) (the
//! session hub: connections, push windows, `notify`, the held-back order of refused sends, rate
//! buckets) asks the [`Owner`](crate::owner::Owner) (the conversation owner: sequencing, dedup,
//! membership, cursors, retention, batches) with a [`Request`] on behalf of one connection, its
//! [`Origin`]; the owner answers with [`ToHub`] events, addressed to a connection (answers to
//! its requests) or to users (a message made durable, a receipt, members removed).
//!
//! Everything that crosses is plain data, owned or shared read-only: nothing in it points into
//! the other half's state. In one process the [`Core`](crate::Core) hands the events across at
//! once; across nodes they can travel as messages. Each direction must keep its order (a
//! connection's requests, the owner's answers and deliveries), as the simulation's delaying
//! channels do. Losing a [`ToHub::Deliver`] is survivable but not free: the hub's push position
//! stays behind, so the device's next message comes as a `notify` and it syncs; a lost *last*
//! message shows up only with the next one or the device's next sync (see
//! docs/architecture.md).

use crate::conv::Cursors;
use crate::engine::SessionId;
use crate::error::CoreError;
use crate::model::ConvRecord;
use ordo_protocol::Message;
use ordo_protocol::{Position, ServerFrame};
use std::sync::Arc;

/// The connection a request comes from: the owner answers it by `session` and decides by
/// `user` and `device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub session: SessionId,
    pub user: Arc<str>,
    pub device: Arc<str>,
}

/// A `send`, checked for well-formedness and admitted by the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendCmd {
    /// The conversation (for a send to a user, the id of the direct conversation with them).
    pub conv: Arc<str>,
    /// For a send to a user: that user (the direct conversation is created on the first send).
    pub peer: Option<String>,
    pub cmid: String,
    pub body: String,
    pub reply_to: Option<u64>,
    /// The hub's rate verdict: `Err` if the send is over the user's rate, or held back behind
    /// one of its connection's sends that was refused. The owner answers a resend of a message
    /// it accepted before all the same (a resend is not a new send) and refuses anything new
    /// with this error.
    pub verdict: Result<(), CoreError>,
}

/// What a connection asks of the conversation owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Send(SendCmd),
    Ack(Vec<Position>),
    Read {
        conv: String,
        seq: u64,
    },
    Sync {
        conv: String,
        after: u64,
        limit: Option<u32>,
    },
    /// `convs`: one page of the user's conversations.
    Overview {
        after: Option<String>,
        limit: Option<u32>,
    },
}

impl Request {
    /// The `type` of the frame this request came from, and the conversation it named (for an
    /// `ack`, none: each refused position names its own): what an `error` answering it names.
    pub fn about(&self) -> (&'static str, Option<&str>) {
        match self {
            Request::Send(cmd) => ("send", Some(&*cmd.conv)),
            Request::Ack(_) => ("ack", None),
            Request::Read { conv, .. } => ("read", Some(conv)),
            Request::Sync { conv, .. } => ("sync", Some(conv)),
            Request::Overview { .. } => ("convs", None),
        }
    }
}

/// A message made durable, for the online devices of the conversation's members.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// The conversation's highest durable seq (for a `notify`).
    pub durable_seq: u64,
    /// The conversation as committed: who is sent the message.
    pub rec: Arc<ConvRecord>,
    /// Every device's positions: a connection that was not pushed this conversation yet
    /// counts as caught up to its device's delivered position.
    pub cursors: Arc<Cursors>,
}

/// A send's answer: the seq it was accepted as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub session: SessionId,
    pub cmid: Arc<str>,
    pub conv: Arc<str>,
    pub seq: u64,
    pub ts: u64,
    /// A resend of a message accepted before (answered once the original is durable).
    pub duplicate: bool,
    /// The send had the hub's go-ahead (took a rate token).
    pub admitted: bool,
}

/// What the owner tells the hub.
#[derive(Clone, Debug)]
pub enum ToHub {
    /// An answer to one connection (an error, `synced`, `convs`).
    Frame {
        session: SessionId,
        frame: ServerFrame,
    },
    /// A send is durable (or, with `duplicate`, was already: a resend answered from dedup).
    Accepted(Accepted),
    /// A send was refused; `conv` is the conversation it went to.
    Refused {
        session: SessionId,
        conv: Arc<str>,
        cmid: String,
        error: CoreError,
        /// The send had the hub's go-ahead (took a rate token).
        admitted: bool,
    },
    Deliver(Delivery),
    /// A user's positions in a conversation moved (durably): tell every member's devices.
    Receipt {
        conv: String,
        user: String,
        delivered: u64,
        read: u64,
        rec: Arc<ConvRecord>,
    },
    /// Close this connection: the order of its refused sends can no longer be kept (see
    /// [`crate::held_back`]).
    Close {
        session: SessionId,
        reason: String,
    },
    /// These users are no longer members of `conv`: nothing more is pushed to them there.
    Left {
        conv: String,
        users: Vec<String>,
    },
    /// A `sync` page covering up to `up_to` went out to `session`; `durable_seq` is the
    /// conversation's highest durable seq and `delivered` the device's delivered position.
    Served {
        session: SessionId,
        conv: String,
        up_to: u64,
        has_more: bool,
        durable_seq: u64,
        delivered: u64,
    },
}
