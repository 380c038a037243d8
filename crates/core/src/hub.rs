//! The session hub, one half of the core: the connected devices. It checks a frame's form,
//! applies the per-user rate limit without reordering one connection's sends (the held-back
//! order), resolves a send to a user into their direct conversation, and asks the
//! conversation owner for the rest ([`Request`]). What the owner answers ([`ToHub`]) it turns
//! into frames: answers to a connection, and messages and receipts for every online device of
//! the members, pushed while the device is caught up and within its push window, or a single
//! `notify` telling it to pull.
//!
//! It knows nothing of sequencing, storage or membership; the owner knows nothing of
//! connections beyond the [`Origin`] of a request. See [`crate::seam`].

use crate::config::CoreConfig;
use crate::engine::{Action, SendRequest, SessionId};
use crate::error::CoreError;
use crate::held_back::{Held, MAX_HELD_CONVS, OVERFLOW_REASON};
use crate::rate::TokenBucket;
use crate::seam::{Accepted, Delivery, Origin, Request, SendCmd, ToHub};
use crate::session::{PushState, Session};
use foldhash::{HashMap, HashMapExt};
use ordo_protocol::{direct_conv_id, validate_id, ClientFrame, ConvEvent, IdKind, ServerFrame};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Most direct conversation ids a connection remembers (by peer) before it starts over.
const MAX_DIRECT_REMEMBERED: usize = 256;

/// What the hub made of a frame.
#[derive(Debug)]
pub enum Step {
    /// Answered by the hub alone.
    Done(Vec<Action>),
    /// For the conversation owner.
    Ask(Origin, Request),
}

/// Frames pushed and `notify`s sent so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    pub pushed: u64,
    pub notified: u64,
    /// Users whose send rate is tracked now.
    pub rate_buckets: u64,
}

pub struct Hub {
    cfg: CoreConfig,
    sessions: HashMap<SessionId, Session>,
    by_user: HashMap<String, BTreeSet<SessionId>>,
    buckets: HashMap<String, TokenBucket>,
    stats: HubStats,
}

impl Hub {
    pub fn new(cfg: CoreConfig) -> Self {
        Hub {
            cfg,
            sessions: HashMap::new(),
            by_user: HashMap::new(),
            buckets: HashMap::new(),
            stats: HubStats::default(),
        }
    }

    pub fn stats(&self) -> HubStats {
        HubStats {
            rate_buckets: self.buckets.len() as u64,
            ..self.stats
        }
    }

    pub fn connect(&mut self, session: SessionId, user: &str, device: &str) {
        self.sessions.insert(session, Session::new(user, device));
        self.by_user
            .entry(user.to_string())
            .or_default()
            .insert(session);
    }

    pub fn disconnect(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.remove(&session) {
            if let Some(set) = self.by_user.get_mut(&*s.user) {
                set.remove(&session);
                if set.is_empty() {
                    self.by_user.remove(&*s.user);
                }
            }
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// See [`crate::Core::push_missed`]: the device has been sent `conv` only up to before
    /// `seq`, and counts as notified (the driver sends the `notify`).
    pub fn push_missed(&mut self, session: SessionId, conv: &str, seq: u64) {
        let Some(st) = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.convs.get_mut(conv))
        else {
            return;
        };
        st.sent_up_to = st.sent_up_to.min(seq.saturating_sub(1));
        if !st.notified {
            st.notified = true;
            self.stats.notified += 1;
        }
    }

    /// Who a connected session is, as the owner is told.
    pub fn origin(&self, session: SessionId) -> Option<Origin> {
        self.sessions.get(&session).map(|s| Origin {
            session,
            user: s.user.clone(),
            device: s.device.clone(),
        })
    }

    /// Handles one decoded frame from a connected device as far as the hub can.
    pub fn on_frame(&mut self, session: SessionId, frame: ClientFrame, now_ms: u64) -> Step {
        let Some(origin) = self.origin(session) else {
            return Step::Done(Vec::new());
        };
        let req = match frame {
            ClientFrame::Send {
                conv,
                to,
                cmid,
                body,
                reply_to,
            } => {
                let req = SendRequest {
                    conv: conv.as_deref(),
                    to: to.as_deref(),
                    cmid,
                    body,
                    reply_to,
                };
                return self.send(session, req, now_ms);
            }
            ClientFrame::Ack { acks } => {
                let max = self.cfg.limits.max_acks_per_frame;
                if acks.len() > max {
                    let e = CoreError::Invalid(format!(
                        "ack carries {} positions; the limit is {max}",
                        acks.len()
                    ));
                    return Step::Done(vec![error(session, &e, "ack")]);
                }
                Request::Ack(acks)
            }
            ClientFrame::Read { conv, seq } => Request::Read { conv, seq },
            ClientFrame::Sync { conv, after, limit } => Request::Sync { conv, after, limit },
            ClientFrame::Convs { after, limit } => Request::Overview { after, limit },
            ClientFrame::Ping { nonce } => {
                return Step::Done(vec![Action::Send {
                    session,
                    frame: ServerFrame::Pong {
                        nonce,
                        server_time: now_ms,
                    },
                }])
            }
        };
        Step::Ask(origin, req)
    }

    /// A `send`: checked for form, resolved to its conversation, admitted by rate (without
    /// reordering the connection's sends), then passed to the owner.
    pub fn send(&mut self, session: SessionId, req: SendRequest<'_>, now_ms: u64) -> Step {
        let Some(origin) = self.origin(session) else {
            return Step::Done(Vec::new());
        };
        match self.check_send(&origin, &req) {
            Ok((conv, peer)) => {
                let verdict = self.admit(session, &conv, &req.cmid, &origin.user, now_ms);
                if let Err(e @ CoreError::HeldBackFull { .. }) = &verdict {
                    // The order of this connection's refused sends can no longer be kept.
                    return Step::Done(vec![
                        rejected(session, req.cmid, e),
                        Action::Close {
                            session,
                            reason: OVERFLOW_REASON.into(),
                        },
                    ]);
                }
                Step::Ask(
                    origin,
                    Request::Send(SendCmd {
                        conv,
                        peer,
                        cmid: req.cmid,
                        body: req.body,
                        reply_to: req.reply_to,
                        verdict,
                    }),
                )
            }
            // Only a stored message takes the request's id and body; a refused one still has
            // them.
            Err(e) => Step::Done(vec![rejected(session, req.cmid, &e)]),
        }
    }

    /// A send's form: its ids, its body's size; the conversation it goes to.
    fn check_send(
        &mut self,
        origin: &Origin,
        req: &SendRequest<'_>,
    ) -> Result<(Arc<str>, Option<String>), CoreError> {
        validate_id(IdKind::ClientMessage, &req.cmid)?;
        let (conv, peer) = match (req.conv, req.to) {
            (Some(c), None) => {
                validate_id(IdKind::Conversation, c)?;
                (Arc::from(c), None)
            }
            (None, Some(peer)) => {
                validate_id(IdKind::User, peer)?;
                let id = self.direct_conv(origin.session, &origin.user, peer);
                (id, Some(peer.to_string()))
            }
            _ => {
                return Err(CoreError::Invalid(
                    "a send names exactly one of `conv` or `to`".into(),
                ))
            }
        };
        // A resend carries the same body: one too large was never accepted.
        if req.body.len() > self.cfg.limits.max_body_bytes {
            return Err(CoreError::BodyTooLarge {
                len: req.body.len(),
                max: self.cfg.limits.max_body_bytes,
            });
        }
        Ok((conv, peer))
    }

    /// The direct conversation of `user` (the session's) with `peer`, remembered per session: a
    /// client sending to a user names them on every send, and the id is a SHA-256 to compute.
    fn direct_conv(&mut self, session: SessionId, user: &str, peer: &str) -> Arc<str> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Arc::from(direct_conv_id(user, peer));
        };
        let known = s.direct.get_or_insert_with(Default::default);
        if let Some(id) = known.get(peer) {
            return id.clone();
        }
        if known.len() >= MAX_DIRECT_REMEMBERED {
            known.clear();
        }
        let id: Arc<str> = Arc::from(direct_conv_id(user, peer));
        known.insert(peer.to_string(), id.clone());
        id
    }

    /// The per-user rate limit, applied so that it never reorders one device's messages: once a
    /// send is refused for rate, the same connection's later new sends into that conversation
    /// are refused too until the refused one is resent (see [`crate::held_back`]). The verdict
    /// goes to the owner with the send, which applies it only to a new message.
    fn admit(
        &mut self,
        session: SessionId,
        conv_id: &str,
        cmid: &str,
        user: &str,
        now_ms: u64,
    ) -> Result<(), CoreError> {
        let (rate, burst) = (self.cfg.rate_per_sec, self.cfg.rate_burst);
        if rate > 0.0
            && !self.buckets.contains_key(user)
            && self.buckets.len() >= 2 * self.sessions.len() + MIN_BUCKETS_KEPT
        {
            prune_buckets(&mut self.buckets, &self.sessions, rate, burst, now_ms);
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return Ok(());
        };
        match s.held_back.check(conv_id, cmid, now_ms) {
            Ok(()) => {}
            Err(Held::Behind(earlier)) => {
                return Err(CoreError::HeldBack {
                    earlier,
                    retry_after_ms: 1,
                })
            }
            Err(Held::Full) => {
                return Err(CoreError::HeldBackFull {
                    max: MAX_HELD_CONVS,
                });
            }
        }
        let mut overflow = false;
        if rate > 0.0 && !self.buckets.contains_key(user) {
            self.buckets
                .insert(user.to_string(), TokenBucket::new(burst, now_ms));
        }
        let taken = match self.buckets.get_mut(user) {
            Some(b) => b.take(rate, burst, now_ms),
            None => Ok(()),
        };
        match taken {
            Ok(()) => s.held_back.went(conv_id, cmid),
            Err(_) => overflow = !s.held_back.refused(conv_id, cmid, now_ms),
        }
        if overflow {
            return Err(CoreError::HeldBackFull {
                max: MAX_HELD_CONVS,
            });
        }
        taken.map_err(CoreError::RateLimited)
    }

    /// The owner did not take an admitted send (it refused it, or answered a resend from
    /// dedup): the user gets its token back, as if it had never been admitted.
    fn give_back(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        if let Some(b) = self.buckets.get_mut(&*s.user) {
            b.give_back(self.cfg.rate_burst);
        }
    }

    /// A send held back in `conv` will not be resent (it turned out to be a resend of a message
    /// accepted before, or the owner refused it for good): it holds nothing back.
    fn forget_held(&mut self, session: SessionId, conv: &str, cmid: &str) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.held_back.forget(conv, cmid);
        }
    }

    /// Carries out what the owner said, appending the frames it makes to `out`.
    pub fn on_event(&mut self, event: ToHub, out: &mut Vec<Action>) {
        match event {
            ToHub::Frame { session, frame } => out.push(Action::Send { session, frame }),
            ToHub::Close { session, reason } => out.push(Action::Close { session, reason }),
            ToHub::Accepted(Accepted {
                session,
                cmid,
                conv,
                seq,
                ts,
                duplicate,
                admitted,
            }) => {
                if duplicate && admitted {
                    self.give_back(session);
                }
                // Answered (perhaps to another copy of the frame): it holds nothing back.
                self.forget_held(session, &conv, &cmid);
                out.push(Action::Send {
                    session,
                    frame: ServerFrame::Accepted {
                        cmid: cmid.to_string(),
                        conv: conv.to_string(),
                        seq,
                        ts,
                    },
                });
            }
            ToHub::Refused {
                session,
                conv,
                cmid,
                error,
                admitted,
            } => {
                if admitted {
                    self.give_back(session);
                }
                // The client does not resend a send refused for good.
                if !error.code().retryable() {
                    self.forget_held(session, &conv, &cmid);
                }
                out.push(rejected(session, cmid, &error));
            }
            ToHub::Deliver(d) => self.deliver(d, out),
            ToHub::Receipt {
                conv,
                user,
                delivered,
                read,
                rec,
            } => {
                let frame = ServerFrame::Receipt {
                    conv,
                    user,
                    delivered,
                    read,
                };
                for member in &rec.members {
                    for sid in self.by_user.get(member).into_iter().flatten() {
                        out.push(Action::Send {
                            session: *sid,
                            frame: frame.clone(),
                        });
                    }
                }
            }
            ToHub::Left { conv, users } => {
                for sid in users.iter().flat_map(|u| self.by_user.get(u)).flatten() {
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.convs.remove(&conv);
                    }
                }
            }
            ToHub::Served {
                session,
                conv,
                up_to,
                has_more,
                durable_seq,
                delivered,
            } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    return;
                };
                // A connection's push position starts at its device's delivered position,
                // whichever comes first: a push or a (possibly partial) sync.
                let st = s.convs.entry(conv.clone()).or_insert(PushState {
                    sent_up_to: delivered,
                    notified: false,
                });
                st.sent_up_to = st.sent_up_to.max(up_to);
                st.notified = false;
                if !has_more && durable_seq > st.sent_up_to {
                    st.notified = true;
                    self.stats.notified += 1;
                    out.push(Action::Send {
                        session,
                        frame: ServerFrame::Notify {
                            conv,
                            max_seq: durable_seq,
                        },
                    });
                }
            }
        }
    }

    /// Pushes a durable message to every online device of every member that is next to it and
    /// within its window; a device that is not gets one `notify` until it syncs.
    fn deliver(&mut self, d: Delivery, out: &mut Vec<Action>) {
        let m = d.msg;
        let window = self.cfg.push_window;
        let mut pushed = Vec::new();
        let report = d.rec.members.len() <= self.cfg.offline_max_members && m.event.is_none();
        let mut offline = Vec::new();
        for user in &d.rec.members {
            let Some(sids) = self.by_user.get(user) else {
                if report && *user != m.from {
                    offline.push(user.clone());
                }
                continue;
            };
            for sid in sids {
                let Some(s) = self.sessions.get_mut(sid) else {
                    continue;
                };
                let cursor = d.cursors.get(user, &s.device);
                if !s.convs.contains_key(&m.conv) {
                    let st = PushState {
                        sent_up_to: cursor.delivered,
                        notified: false,
                    };
                    s.convs.insert(m.conv.clone(), st);
                }
                let Some(st) = s.convs.get_mut(&m.conv) else {
                    continue;
                };
                let in_window = m.seq.saturating_sub(cursor.delivered) <= window;
                if st.sent_up_to + 1 == m.seq && in_window {
                    st.sent_up_to = m.seq;
                    self.stats.pushed += 1;
                    pushed.push(*sid);
                } else if !st.notified && st.sent_up_to < m.seq {
                    st.notified = true;
                    self.stats.notified += 1;
                    out.push(Action::Send {
                        session: *sid,
                        frame: ServerFrame::Notify {
                            conv: m.conv.clone(),
                            max_seq: d.durable_seq,
                        },
                    });
                }
            }
        }
        // Users removed from the group (or gone) are no longer members, but their connected
        // devices are pushed the event that says so, as the conversation's last message for
        // them (out of turn if they were behind: they cannot sync it any more).
        if let Some(ConvEvent::Removed { users } | ConvEvent::Left { users }) = &m.event {
            for user in users.iter().filter(|u| !d.rec.members.contains(*u)) {
                pushed.extend(self.by_user.get(user).into_iter().flatten().copied());
            }
        }
        if !offline.is_empty() {
            out.push(Action::Offline {
                msg: m.clone(),
                epoch: d.rec.epoch,
                users: offline,
            });
        }
        if !pushed.is_empty() {
            out.push(Action::Broadcast {
                sessions: pushed,
                frame: ServerFrame::Msg(m),
            });
        }
    }
}

fn rejected(session: SessionId, cmid: String, e: &CoreError) -> Action {
    Action::Send {
        session,
        frame: ServerFrame::rejected(cmid, e.code(), e.to_string(), e.retry_after_ms()),
    }
}

/// Rate buckets are kept for this many users at least, beyond twice the connections.
const MIN_BUCKETS_KEPT: usize = 1024;

/// Forgets the rate buckets that a new one would be no different from: users with no
/// connection whose bucket has refilled to the burst. Run when the buckets outgrow the
/// connections (twice, plus [`MIN_BUCKETS_KEPT`]), so that the map is bounded by the users
/// connected and those that sent within the last burst's refill time, not by every user who
/// ever sent; a user cannot empty their bucket, reconnect and find it full before it would
/// have refilled anyway.
fn prune_buckets(
    buckets: &mut HashMap<String, TokenBucket>,
    sessions: &HashMap<SessionId, Session>,
    rate: f64,
    burst: f64,
    now_ms: u64,
) {
    let connected: std::collections::HashSet<&str> = sessions.values().map(|s| &*s.user).collect();
    buckets.retain(|user, b| connected.contains(user.as_str()) || !b.is_full(rate, burst, now_ms));
}

/// An error answer to a connection's `request` frame (its `type`; one that names no single
/// conversation).
pub(crate) fn error(session: SessionId, e: &CoreError, request: &str) -> Action {
    Action::Send {
        session,
        frame: ServerFrame::error_about(e.code(), e.to_string(), request, None),
    }
}
