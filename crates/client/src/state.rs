//! The client as a sans-IO state machine: frames, app calls and time in; [`Effect`]s out.
//!
//! Effects come out in the order they must be carried out, and the order is the safety
//! argument: a `Persist` always comes before the `Transmit` or `Event` that depends on it. So a
//! message is stored before it is acknowledged (the ack is a later effect) and before the app
//! hears of it, and a pending message is in the outbox on disk before `send` returns its id.
//! A driver that carries effects out in order and crashes anywhere loses nothing: on restart
//! the store says what was done.

use crate::backoff::RetryPolicy;
use crate::outbox::{Failure, Outbox, Pending, Target};
use crate::reorder::{Offer, ReorderBuffer};
use crate::sent::SentMessages;
use ordo_protocol::{ClientFrame, ConvEvent, ConvInfo, ErrorCode, Message, Position, ServerFrame};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    pub retry: RetryPolicy,
    /// Acknowledge at most this long after storing a message...
    pub ack_delay_ms: u64,
    /// ...or as soon as this many stored messages are unacknowledged in a conversation.
    pub ack_every: u64,
    /// Messages held behind a hole per conversation.
    pub reorder_capacity: usize,
    /// `limit` of each `sync`.
    pub sync_limit: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            retry: RetryPolicy::default(),
            ack_delay_ms: 200,
            ack_every: 64,
            reorder_capacity: 4096,
            sync_limit: 500,
        }
    }
}

/// Where a message the app sent stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// In the outbox, not yet accepted.
    Pending,
    /// Durable on the server with this seq (single tick).
    Sent(u64),
    /// Every other member has it on a device (double tick).
    Delivered,
    /// Every other member has read it (blue ticks).
    Read,
    /// Given up: the reason says why.
    Failed(String),
}

/// What the app is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The next message of a conversation, in seq order, each once. A system message (`from`
    /// empty) with [`Message::event`] set records a change of the group (members joined, left
    /// or removed, a new name) at its place in the history.
    Message(Message),
    /// This user was removed from group `conv` (or, with `left`, left it): `seq` is the event
    /// that says so, the last of the conversation this device gets. It was handed over as an
    /// [`Event::Message`] too if it was next in order; nothing of `conv` is fetched any more
    /// (the server no longer lets this user read it; what is stored locally stays).
    Removed {
        conv: String,
        seq: u64,
        left: bool,
    },
    Status {
        cmid: String,
        conv: Option<String>,
        status: Status,
    },
    /// A member's delivered/read position moved.
    Receipt {
        conv: String,
        user: String,
        delivered: u64,
        read: u64,
    },
    /// Seqs `from..=to` were removed by retention before this device got them.
    HistoryGap {
        conv: String,
        from: u64,
        to: u64,
    },
    /// The conversation's history was reset on the server; it is being fetched again from 1.
    EpochReset {
        conv: String,
        epoch: u64,
    },
    /// The server refused a frame other than a send.
    ServerError {
        code: ErrorCode,
        message: String,
    },
    Connected,
    Disconnected,
    /// A connection attempt failed. The driver tries again with backoff, unless the failure
    /// cannot mend by itself (a refused token, a bad URL, a certificate that does not verify):
    /// then this is the last event and the client stops. The typed cause is
    /// `Client::connection()` (the driver's `Connection`). `unauthorized`: the server refused
    /// the token, so only a new token will help.
    ConnectFailed {
        reason: String,
        unauthorized: bool,
    },
}

/// A change to the local store.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreOp {
    /// A message entered (or changed in) the outbox.
    PutPending(Pending),
    /// A message left the outbox (accepted, or failed).
    RemovePending(String),
    /// Received messages, contiguous, and the conversation's new contiguous position.
    PutMessages {
        conv: String,
        messages: Vec<Message>,
        contiguous: u64,
    },
    /// The conversation's epoch and contiguous position (after a gap or an epoch reset; a
    /// reset also drops the stored messages of the old epoch).
    SetConv {
        conv: String,
        epoch: Option<u64>,
        contiguous: u64,
        reset: bool,
    },
    /// This device's read position.
    SetRead { conv: String, seq: u64 },
    /// One of our messages got a seq, or its status moved.
    PutSent {
        conv: String,
        seq: u64,
        cmid: String,
        status: Status,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Persist(Vec<StoreOp>),
    Transmit(ClientFrame),
    Event(Event),
}

/// What the local store holds about one conversation, to restart from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSnapshot {
    pub conv: String,
    pub epoch: Option<u64>,
    pub contiguous: u64,
    pub read: u64,
}

/// One of our sent messages whose status can still move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentSnapshot {
    pub conv: String,
    pub seq: u64,
    pub cmid: String,
    pub status: Status,
}

/// Everything the state machine restarts from.
#[derive(Clone, Debug, Default)]
pub struct ClientSnapshot {
    pub outbox: Vec<Pending>,
    pub convs: Vec<ConvSnapshot>,
    pub sent: Vec<SentSnapshot>,
}

struct ConvState {
    epoch: Option<u64>,
    reorder: ReorderBuffer,
    /// A `sync` is outstanding.
    syncing: bool,
    /// Highest seq acknowledged to the server (by `ack` or by a `sync`'s `after`).
    acked: u64,
    read: u64,
    /// Read position the server is known to have.
    read_sent: u64,
    members: Vec<String>,
    /// `members` came from an overview (not guessed): statuses may be derived from them.
    members_known: bool,
    /// user -> (delivered, read), from receipts and overviews.
    positions: HashMap<String, (u64, u64)>,
    /// For a group too large to have its members listed: the lowest (delivered, read) among
    /// the other members, from the last overview.
    others: Option<(u64, u64)>,
}

pub struct ClientState {
    cfg: ClientConfig,
    device: String,
    /// Our own user id, once the server said it.
    user: Option<String>,
    connected: bool,
    outbox: Outbox,
    convs: HashMap<String, ConvState>,
    /// Per conversation, our messages not yet read by everyone.
    sent: HashMap<String, SentMessages>,
    effects: VecDeque<Effect>,
    /// A `convs` request is outstanding.
    overview_pending: bool,
    rng: u64,
    ack_due: Option<u64>,
    /// Test-only: safeguards switched off by the simulation (all on unless it says so).
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::Faults,
}

impl ClientState {
    /// `seed` drives jitter and client message ids: random in production, fixed in a
    /// simulation.
    pub fn new(cfg: ClientConfig, device: &str, seed: u64, snap: ClientSnapshot) -> Self {
        let mut convs = HashMap::new();
        for c in snap.convs {
            convs.insert(
                c.conv.clone(),
                ConvState {
                    epoch: c.epoch,
                    reorder: ReorderBuffer::new(c.contiguous, cfg.reorder_capacity),
                    syncing: false,
                    acked: 0,
                    read: c.read,
                    read_sent: 0,
                    members: Vec::new(),
                    members_known: false,
                    positions: HashMap::new(),
                    others: None,
                },
            );
        }
        let mut sent: HashMap<String, SentMessages> = HashMap::new();
        for s in snap.sent {
            sent.entry(s.conv).or_default().put(s.seq, s.cmid, s.status);
        }
        ClientState {
            outbox: Outbox::new(cfg.retry.clone(), snap.outbox),
            cfg,
            device: device.to_string(),
            user: None,
            connected: false,
            convs,
            sent,
            effects: VecDeque::new(),
            overview_pending: false,
            rng: seed | 1,
            ack_due: None,
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::Faults::default(),
        }
    }

    /// Test-only: switches off the safeguards `faults` names, so that the simulation can show
    /// it catches the resulting bugs. Only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub fn set_faults(&mut self, faults: crate::fault::Faults) {
        self.faults = faults;
    }

    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Highest seq of `conv` stored without a hole.
    pub fn contiguous(&self, conv: &str) -> u64 {
        self.convs.get(conv).map_or(0, |c| c.reorder.contiguous())
    }

    /// When [`tick`](Self::tick) should be called next.
    pub fn next_deadline(&self) -> Option<u64> {
        let outbox = if self.connected {
            self.outbox.next_due()
        } else {
            None
        };
        match (outbox, self.ack_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn conv_mut(&mut self, conv: &str) -> &mut ConvState {
        let cap = self.cfg.reorder_capacity;
        self.convs
            .entry(conv.to_string())
            .or_insert_with(|| ConvState {
                epoch: None,
                reorder: ReorderBuffer::new(0, cap),
                syncing: false,
                acked: 0,
                read: 0,
                read_sent: 0,
                members: Vec::new(),
                members_known: false,
                positions: HashMap::new(),
                others: None,
            })
    }

    // ----- app calls -----

    /// Queues a message. Returns its client message id at once; the message is in the outbox
    /// (first effect: persist) and its status is `Pending`.
    pub fn send(
        &mut self,
        target: Target,
        body: String,
        reply_to: Option<u64>,
        now: u64,
    ) -> String {
        let (a, b) = (self.next_u64(), self.next_u64() as u32);
        // Ids are at most 128 bytes: keep the device part short.
        let prefix: String = self.device.chars().take(32).collect();
        let cmid = format!("{prefix}-{a:016x}{b:08x}");
        let p = Pending {
            cmid: cmid.clone(),
            target: target.clone(),
            body,
            reply_to,
            attempts: 0,
            due_ms: 0,
            in_flight: false,
        };
        self.outbox.push(p.clone());
        self.effects
            .push_back(Effect::Persist(vec![StoreOp::PutPending(p)]));
        let conv = match target {
            Target::Conv(c) => Some(c),
            Target::User(_) => None,
        };
        self.event(Event::Status {
            cmid: cmid.clone(),
            conv,
            status: Status::Pending,
        });
        self.flush_outbox(now);
        cmid
    }

    /// The app showed the user everything up to `seq` of `conv`.
    pub fn mark_read(&mut self, conv: &str, seq: u64) {
        let connected = self.connected;
        let c = self.conv_mut(conv);
        let seq = seq.min(c.reorder.contiguous());
        if seq <= c.read {
            return;
        }
        c.read = seq;
        let send = connected && seq > c.read_sent;
        if send {
            c.read_sent = seq;
        }
        self.effects
            .push_back(Effect::Persist(vec![StoreOp::SetRead {
                conv: conv.to_string(),
                seq,
            }]));
        if send {
            self.transmit(ClientFrame::Read {
                conv: conv.to_string(),
                seq,
            });
        }
    }

    // ----- connection -----

    /// The WebSocket is up: resend the outbox in order, then ask for the overview (which
    /// leads to a `sync` of every conversation that moved while we were away).
    pub fn connected(&mut self, now: u64) {
        self.connected = true;
        self.event(Event::Connected);
        self.outbox.all_due_now();
        self.flush_outbox(now);
        self.request_overview();
    }

    /// Asks for the overview (members and positions of every conversation), once at a time;
    /// its pages are asked for one after the other.
    fn request_overview(&mut self) {
        if self.connected && !self.overview_pending {
            self.overview_pending = true;
            self.transmit(ClientFrame::Convs {
                after: None,
                limit: None,
            });
        }
    }

    pub fn disconnected(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.overview_pending = false;
        for c in self.convs.values_mut() {
            c.syncing = false;
            c.read_sent = 0;
        }
        self.ack_due = None;
        self.event(Event::Disconnected);
    }

    /// Timers: resends that are due, and the batched ack.
    pub fn tick(&mut self, now: u64) {
        if self.connected {
            self.flush_outbox(now);
        }
        if self.ack_due.is_some_and(|d| d <= now) {
            self.flush_acks();
        }
    }

    // ----- frames -----

    pub fn frame(&mut self, f: ServerFrame, now: u64) {
        match f {
            ServerFrame::Welcome { user, .. } => self.user = Some(user),
            ServerFrame::Accepted {
                cmid, conv, seq, ..
            } => {
                self.on_accepted(cmid, conv, seq);
                // Anything held back behind it may go now.
                self.flush_outbox(now);
            }
            ServerFrame::Rejected {
                cmid,
                code,
                message,
                retryable,
                retry_after_ms,
            } => {
                if retryable {
                    self.outbox.retry_later(&cmid, now, retry_after_ms);
                } else if let Some(p) = self.outbox.reject(&cmid) {
                    self.effects
                        .push_back(Effect::Persist(vec![StoreOp::RemovePending(
                            p.cmid.clone(),
                        )]));
                    self.event(Event::Status {
                        cmid,
                        conv: match p.target {
                            Target::Conv(c) => Some(c),
                            Target::User(_) => None,
                        },
                        status: Status::Failed(format!("{code}: {message}")),
                    });
                }
            }
            ServerFrame::Msg(m) => self.on_message(Arc::unwrap_or_clone(m), now),
            ServerFrame::Notify { conv, max_seq } => {
                if max_seq > self.contiguous(&conv) {
                    self.start_sync(&conv);
                }
            }
            ServerFrame::Synced {
                conv,
                epoch,
                messages,
                has_more,
                first_seq,
                max_seq,
            } => self.on_synced(conv, epoch, messages, has_more, first_seq, max_seq, now),
            ServerFrame::Receipt {
                conv,
                user,
                delivered,
                read,
            } => self.on_receipt(conv, user, delivered, read),
            ServerFrame::Convs {
                conversations,
                has_more,
            } => {
                let last = conversations.last().map(|c| c.conv.clone());
                for info in conversations {
                    self.on_conv_info(info);
                }
                match last {
                    Some(after) if has_more && self.connected => {
                        self.transmit(ClientFrame::Convs {
                            after: Some(after),
                            limit: None,
                        });
                    }
                    _ => self.overview_pending = false,
                }
            }
            ServerFrame::Error {
                code,
                message,
                request,
                conv,
            } => {
                match (request.as_deref(), conv.as_deref()) {
                    // The overview failed: the next reason to ask asks again.
                    (Some("convs"), _) => self.overview_pending = false,
                    // That sync failed: the next notify, push or overview asks again.
                    (Some("sync"), Some(conv)) => {
                        if let Some(c) = self.convs.get_mut(conv) {
                            c.syncing = false;
                        }
                    }
                    (Some(_), _) => {}
                    // Not tied to a request (an older server): any sync may have failed.
                    (None, _) => {
                        for c in self.convs.values_mut() {
                            c.syncing = false;
                        }
                    }
                }
                self.event(Event::ServerError { code, message });
            }
            ServerFrame::Pong { .. } => {}
        }
    }

    fn on_accepted(&mut self, cmid: String, conv: String, seq: u64) {
        let Some(_) = self.outbox.accepted(&cmid) else {
            return; // an answer to a resend we already had
        };
        self.sent
            .entry(conv.clone())
            .or_default()
            .put(seq, cmid.clone(), Status::Sent(seq));
        self.effects.push_back(Effect::Persist(vec![
            StoreOp::RemovePending(cmid.clone()),
            StoreOp::PutSent {
                conv: conv.clone(),
                seq,
                cmid: cmid.clone(),
                status: Status::Sent(seq),
            },
        ]));
        self.event(Event::Status {
            cmid,
            conv: Some(conv.clone()),
            status: Status::Sent(seq),
        });
        // A receipt may have arrived before the accept.
        self.update_statuses(&conv);
    }

    fn on_message(&mut self, m: Message, now: u64) {
        let conv = m.conv.clone();
        let removed = match (&self.user, &m.event) {
            (Some(me), Some(ConvEvent::Removed { users })) if users.contains(me) => Some(false),
            (Some(me), Some(ConvEvent::Left { users })) if users.contains(me) => Some(true),
            _ => None,
        };
        if let Some(left) = removed {
            let seq = m.seq;
            // Handed over if it is next; a gap before it is not synced (it cannot be).
            if let Offer::Ready(ready) = self.conv_mut(&conv).reorder.offer(m) {
                self.store_and_hand(&conv, ready, now);
            }
            self.event(Event::Removed { conv, seq, left });
            return;
        }
        // Test-only sabotage: a message behind a hole goes to the app at once.
        #[cfg(feature = "fault-injection")]
        let early = self.faults.no_reorder.then(|| m.clone());
        let offer = self.conv_mut(&conv).reorder.offer(m);
        match offer {
            Offer::Duplicate => {}
            Offer::Gap { .. } => {
                #[cfg(feature = "fault-injection")]
                if let Some(m) = early {
                    self.event(Event::Message(m));
                }
                self.start_sync(&conv)
            }
            Offer::Ready(ready) => self.store_and_hand(&conv, ready, now),
        }
    }

    fn store_and_hand(&mut self, conv: &str, ready: Vec<Message>, now: u64) {
        if ready.is_empty() {
            return;
        }
        let contiguous = self.contiguous(conv);
        self.effects
            .push_back(Effect::Persist(vec![StoreOp::PutMessages {
                conv: conv.to_string(),
                messages: ready.clone(),
                contiguous,
            }]));
        for m in ready {
            self.event(Event::Message(m));
        }
        let every = self.cfg.ack_every;
        let c = self.conv_mut(conv);
        if contiguous.saturating_sub(c.acked) >= every {
            self.flush_acks();
        } else if self.ack_due.is_none() {
            self.ack_due = Some(now + self.cfg.ack_delay_ms);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_synced(
        &mut self,
        conv: String,
        epoch: u64,
        messages: Vec<Message>,
        has_more: bool,
        first_seq: u64,
        max_seq: u64,
        now: u64,
    ) {
        let c = self.conv_mut(&conv);
        c.syncing = false;
        match c.epoch {
            Some(e) if e != epoch => {
                // History was reset: what we hold belongs to another history. Start over.
                c.epoch = Some(epoch);
                c.reorder.reset(0);
                c.acked = 0;
                c.read = 0;
                self.persist_conv(&conv, epoch, 0, true);
                self.event(Event::EpochReset {
                    conv: conv.clone(),
                    epoch,
                });
                self.start_sync(&conv);
                return;
            }
            Some(_) => {}
            None => {
                c.epoch = Some(epoch);
                let contiguous = c.reorder.contiguous();
                self.persist_conv(&conv, epoch, contiguous, false);
            }
        }
        let c = self.conv_mut(&conv);
        let (gap, mut ready) = c.reorder.skip_to(first_seq);
        if let Some((from, to)) = gap {
            self.persist_conv(&conv, epoch, to, false);
            self.event(Event::HistoryGap {
                conv: conv.clone(),
                from,
                to,
            });
        }
        for m in messages {
            if let Offer::Ready(r) = self.conv_mut(&conv).reorder.offer(m) {
                ready.extend(r);
            }
        }
        // `skip_to` may have released buffered messages after the gap; hand them on with the
        // page, as one stored run.
        ready.sort_by_key(|m| m.seq);
        self.store_and_hand(&conv, ready, now);
        if has_more || self.contiguous(&conv) < max_seq {
            self.start_sync(&conv);
        }
    }

    fn on_conv_info(&mut self, info: ConvInfo) {
        let connected = self.connected;
        let c = self.conv_mut(&info.conv);
        c.members = info.members.iter().map(|m| m.user.clone()).collect();
        c.members_known = true;
        // A group too large to list its members comes with the aggregates only.
        c.others = (info.members.is_empty() && info.member_count > 1)
            .then_some((info.others_delivered, info.others_read));
        for m in &info.members {
            // A receipt may be newer than the overview: positions only move forward.
            let p = c.positions.entry(m.user.clone()).or_insert((0, 0));
            p.0 = p.0.max(m.delivered);
            p.1 = p.1.max(m.read);
        }
        // The server may hold an older delivered position than what we stored (our last ack
        // was lost with the connection): acknowledge again soon.
        let ack_again = c.reorder.contiguous() > info.delivered;
        c.acked = info.delivered;
        c.read_sent = info.read;
        let resend_read = connected && c.read > info.read;
        let read = c.read;
        if resend_read {
            c.read_sent = read;
        }
        let behind = match c.epoch {
            Some(e) if e != info.epoch => true, // the sync answer will reset it
            _ => info.max_seq > c.reorder.contiguous(),
        };
        if resend_read {
            self.transmit(ClientFrame::Read {
                conv: info.conv.clone(),
                seq: read,
            });
        }
        if behind {
            self.start_sync(&info.conv);
        } else if ack_again && self.ack_due.is_none() {
            self.ack_due = Some(0);
        }
        self.update_statuses(&info.conv);
    }

    fn on_receipt(&mut self, conv: String, user: String, delivered: u64, read: u64) {
        let c = self.conv_mut(&conv);
        let e = c.positions.entry(user.clone()).or_insert((0, 0));
        e.0 = e.0.max(delivered);
        e.1 = e.1.max(read);
        // Members are learnt from the overview only: guessing them from receipts would call a
        // message delivered while a member we have not heard of still lacks it.
        let stale = !c.members_known || !c.members.contains(&user);
        if stale {
            self.request_overview();
        }
        self.event(Event::Receipt {
            conv: conv.clone(),
            user,
            delivered,
            read,
        });
        self.update_statuses(&conv);
    }

    /// Moves our sent messages in `conv` to Delivered / Read once every other member got there.
    fn update_statuses(&mut self, conv: &str) {
        let Some(me) = self.user.clone() else {
            return;
        };
        let Some(c) = self.convs.get(conv) else {
            return;
        };
        if !c.members_known {
            // A conversation new since the last overview: learn its members first.
            if self.sent.get(conv).is_some_and(|s| !s.is_empty()) {
                self.request_overview();
            }
            return;
        }
        let (delivered, read) = match c.others {
            Some(low) => low,
            None => {
                let others: Vec<&String> = c.members.iter().filter(|u| **u != me).collect();
                if others.is_empty() {
                    return;
                }
                let pos = |u: &String| c.positions.get(u).copied().unwrap_or((0, 0));
                let delivered = others.iter().map(|u| pos(u).0).min().unwrap_or(0);
                let read = others.iter().map(|u| pos(u).1).min().unwrap_or(0);
                (delivered, read)
            }
        };
        let mut ops = Vec::new();
        let mut events = Vec::new();
        let Some(mine) = self.sent.get_mut(conv) else {
            return;
        };
        // Only the messages whose status moves; read ones are forgotten (read is final).
        for (seq, cmid, status) in mine.advance(delivered, read) {
            ops.push(StoreOp::PutSent {
                conv: conv.to_string(),
                seq,
                cmid: cmid.clone(),
                status: status.clone(),
            });
            events.push(Event::Status {
                cmid,
                conv: Some(conv.to_string()),
                status,
            });
        }
        if mine.is_empty() {
            self.sent.remove(conv);
        }
        if !ops.is_empty() {
            self.effects.push_back(Effect::Persist(ops));
        }
        for e in events {
            self.event(e);
        }
    }

    // ----- helpers -----

    fn start_sync(&mut self, conv: &str) {
        if !self.connected {
            return;
        }
        let limit = self.cfg.sync_limit;
        let c = self.conv_mut(conv);
        if c.syncing {
            return;
        }
        c.syncing = true;
        let after = c.reorder.contiguous();
        // The sync's `after` acknowledges everything up to it.
        c.acked = c.acked.max(after);
        self.transmit(ClientFrame::Sync {
            conv: conv.to_string(),
            after,
            limit: Some(limit),
        });
    }

    fn flush_acks(&mut self) {
        self.ack_due = None;
        if !self.connected {
            return;
        }
        let mut acks = Vec::new();
        for (conv, c) in self.convs.iter_mut() {
            let contiguous = c.reorder.contiguous();
            if contiguous > c.acked {
                c.acked = contiguous;
                acks.push(Position {
                    conv: conv.clone(),
                    seq: contiguous,
                });
            }
        }
        if !acks.is_empty() {
            acks.sort_by(|a, b| a.conv.cmp(&b.conv));
            self.transmit(ClientFrame::Ack { acks });
        }
    }

    fn flush_outbox(&mut self, now: u64) {
        if !self.connected {
            return;
        }
        let mut units: Vec<f64> = Vec::new();
        for _ in 0..self.outbox.len() {
            let u = self.unit();
            units.push(u);
        }
        let mut it = units.into_iter();
        let (send, failed) = self.outbox.take_due(now, || it.next().unwrap_or(0.5));
        for p in send {
            self.transmit(p.frame());
        }
        for (p, why) in failed {
            self.effects
                .push_back(Effect::Persist(vec![StoreOp::RemovePending(
                    p.cmid.clone(),
                )]));
            let reason = match why {
                Failure::Exhausted { attempts } => {
                    format!("not accepted after {attempts} attempts")
                }
                Failure::Rejected { code, message } => format!("{code}: {message}"),
            };
            self.event(Event::Status {
                cmid: p.cmid,
                conv: match p.target {
                    Target::Conv(c) => Some(c),
                    Target::User(_) => None,
                },
                status: Status::Failed(reason),
            });
        }
    }

    /// Stores a conversation's epoch and contiguous position (`reset`: the old history goes).
    fn persist_conv(&mut self, conv: &str, epoch: u64, contiguous: u64, reset: bool) {
        self.effects
            .push_back(Effect::Persist(vec![StoreOp::SetConv {
                conv: conv.to_string(),
                epoch: Some(epoch),
                contiguous,
                reset,
            }]));
    }

    fn transmit(&mut self, f: ClientFrame) {
        self.effects.push_back(Effect::Transmit(f));
    }

    fn event(&mut self, e: Event) {
        self.effects.push_back(Effect::Event(e));
    }
}
