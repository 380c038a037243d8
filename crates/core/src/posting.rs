//! Messages the app's backend posts through the admin API ([`AdminPost`]), and the system
//! messages that record a group's changes ([`ConvEvent`]).
//!
//! A backend post is sequenced like any client send: the same conversation seq, the same batch,
//! the same pushes. It is idempotent by its client message id, in the namespace of the user it
//! is posted as (the system's, [`SYSTEM`], when posted as nobody): the same id again is
//! answered with the seq it got the first time, whether the cache or the store remembers it.
//! It is answered ([`Action::Posted`]) once durable.
//!
//! A membership or name change of a group is recorded as a system message in the group
//! (`Owner::append_event`), in the batch of the change itself, so every device sees it at the
//! same place among the messages.

use crate::engine::{Action, Ticket};
use crate::error::CoreError;
use crate::line::LookedUp;
use crate::loading::Waiting;
use crate::model::*;
use crate::owner::{Out, Owner};
use ordo_protocol::{
    direct_conv_id, validate_id, ConvEvent, ConvKind, IdKind, Message, MAX_EVENT_USERS, SYSTEM,
};
use std::sync::Arc;

/// A message the app's backend posts: into `conv`, or (with `to` and `from`) into the direct
/// conversation of `from` and `to`; as user `from`, or as the system when `from` is `None`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdminPost {
    pub conv: Option<String>,
    pub to: Option<String>,
    pub from: Option<String>,
    pub cmid: String,
    pub body: String,
    pub reply_to: Option<u64>,
}

/// Where a backend post went.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Posted {
    pub conv: String,
    pub seq: u64,
    pub ts: u64,
    /// The same client message id was posted before: this is that message.
    pub duplicate: bool,
}

/// A post checked for form, on its way through the store lookup and the load of its
/// conversation.
#[derive(Clone, Debug)]
pub(crate) struct PostJob {
    pub ticket: Ticket,
    pub conv: String,
    /// For a direct conversation: the other member (it is created with the first message).
    pub peer: Option<String>,
    /// Whose namespace the client message id is in: the user posted as, or [`SYSTEM`].
    pub user: Arc<str>,
    pub cmid: String,
    pub body: String,
    pub reply_to: Option<u64>,
    /// What the store answered for the key, and the cache's mark when it was asked.
    pub looked_up: Option<LookedUp>,
    pub now_ms: u64,
}

impl Owner {
    /// Starts a backend post: answered with [`Action::Posted`] once durable (or at once, for a
    /// duplicate of a durable message or a refusal).
    pub fn post(&mut self, ticket: Ticket, post: AdminPost, now_ms: u64) -> Vec<Out> {
        if let Some(why) = &self.store_down {
            let e = CoreError::Unavailable(format!(
                "the store cannot be reached ({why}); post it again (same cmid) shortly"
            ));
            return vec![posted(ticket, Err(e))];
        }
        match self.post_job(ticket, post, now_ms) {
            Ok(job) => self.run_post(job),
            Err(e) => vec![posted(ticket, Err(e))],
        }
    }

    fn post_job(&self, ticket: Ticket, post: AdminPost, now_ms: u64) -> Result<PostJob, CoreError> {
        validate_id(IdKind::ClientMessage, &post.cmid)?;
        if let Some(f) = &post.from {
            validate_id(IdKind::User, f)?;
        }
        let max = self.cfg.limits.max_body_bytes;
        if post.body.len() > max {
            return Err(CoreError::BodyTooLarge {
                len: post.body.len(),
                max,
            });
        }
        let (conv, peer) = match (post.conv, post.to) {
            (Some(c), None) => {
                validate_id(IdKind::Conversation, &c)?;
                (c, None)
            }
            (None, Some(to)) => {
                validate_id(IdKind::User, &to)?;
                let from = post.from.as_deref().ok_or_else(|| {
                    CoreError::Invalid(
                        "a post with `to` needs `from`: a direct conversation is between two users"
                            .into(),
                    )
                })?;
                if from == to {
                    return Err(CoreError::Invalid(
                        "`from` and `to` are the same user; there is no direct conversation with oneself".into(),
                    ));
                }
                (direct_conv_id(from, &to), Some(to))
            }
            _ => {
                return Err(CoreError::Invalid(
                    "a post names exactly one of `conv` or `to`".into(),
                ))
            }
        };
        Ok(PostJob {
            ticket,
            conv,
            peer,
            user: Arc::from(post.from.as_deref().unwrap_or(SYSTEM)),
            cmid: post.cmid,
            body: post.body,
            reply_to: post.reply_to,
            looked_up: None,
            now_ms,
        })
    }

    /// Takes a post as far as it goes: answered from dedup, waiting for the store (a lookup or
    /// a load), or appended.
    pub(crate) fn run_post(&mut self, mut job: PostJob) -> Vec<Out> {
        let ticket = job.ticket;
        let window = self.cfg.dedup_window_ms;
        let now_ms = job.now_ms;
        let known = self
            .dedup
            .get(&job.user, &job.cmid)
            .filter(|d| now_ms < d.ts.saturating_add(window))
            .map(|d| (d.conv.to_string(), d.seq, d.ts));
        let stored = match &job.looked_up {
            Some((Some(d), _)) if now_ms < d.ts.saturating_add(window) => {
                Some((d.conv.clone(), d.seq, d.ts))
            }
            _ => None,
        };
        if let Some((conv, seq, ts)) = known.or(stored) {
            if conv != job.conv {
                return vec![posted(
                    ticket,
                    Err(CoreError::Invalid(format!(
                        "client message id {:?} was already used in conversation {conv:?}; use a new id for each message",
                        job.cmid
                    ))),
                )];
            }
            self.stats.dedup_hits += 1;
            let p = Posted {
                conv,
                seq,
                ts,
                duplicate: true,
            };
            let durable = self.convs.get(&p.conv).is_none_or(|c| c.durable_seq >= seq);
            if durable {
                return vec![posted(ticket, Ok(p))];
            }
            self.pending.posts.push((ticket, p));
            return Vec::new();
        }
        // Not in the cache: the store is asked (once, and again if the cache forgot entries
        // since, which the store may not have held when it answered).
        let asked_before = job
            .looked_up
            .as_ref()
            .is_some_and(|(_, mark)| !self.dedup.lost_since(*mark));
        if !asked_before {
            let id = self.next_lookup;
            self.next_lookup += 1;
            let (user, cmid) = (job.user.to_string(), job.cmid.clone());
            job.looked_up = None;
            self.post_lookups.insert(id, (job, self.dedup.mark()));
            self.stats.dedup_lookups += 1;
            return vec![Out::Io(Action::Lookup { id, user, cmid })];
        }
        if !self.touch_held(&job.conv) && self.is_cold(&job.conv) {
            let conv = job.conv.clone();
            return self.wait_for(&conv, Waiting::Post(job));
        }
        match self.append_post(job) {
            Ok(()) => Vec::new(),
            Err(e) => vec![posted(ticket, Err(e))],
        }
    }

    /// The store's answer to the lookup of a post's key; the answer back if `id` was not one.
    pub(crate) fn post_looked_up(
        &mut self,
        id: u64,
        found: Option<DedupRecord>,
    ) -> Result<Vec<Out>, Option<DedupRecord>> {
        let Some((mut job, mark)) = self.post_lookups.remove(&id) else {
            return Err(found);
        };
        job.looked_up = Some((found, mark));
        Ok(self.run_post(job))
    }

    /// A new message of a post whose conversation is held.
    fn append_post(&mut self, job: PostJob) -> Result<(), CoreError> {
        let now_ms = job.now_ms;
        if !self.convs.contains_key(&job.conv) {
            let Some(peer) = &job.peer else {
                return Err(CoreError::NoSuchConversation(job.conv));
            };
            if job.reply_to.is_some() {
                return Err(CoreError::Invalid(
                    "reply_to names a seq, but this conversation has no messages yet".into(),
                ));
            }
            let (conv, user) = (job.conv.clone(), job.user.clone());
            self.new_direct(&conv, &user, &peer.clone(), now_ms);
        }
        let c = &self.convs[&job.conv];
        if c.rec.deleted {
            return Err(CoreError::NoSuchConversation(job.conv));
        }
        if &*job.user != SYSTEM && !c.is_member(&job.user) {
            return Err(CoreError::Invalid(format!(
                "{:?} is not a member of {:?}; add them first, or post as the system (no `from`)",
                &*job.user, job.conv
            )));
        }
        if let Some(r) = job.reply_to {
            if r == 0 || r > c.rec.max_seq {
                return Err(CoreError::Invalid(format!(
                    "reply_to {r} is not a seq of conversation {:?} (1..={})",
                    job.conv, c.rec.max_seq
                )));
            }
        }
        let seq = self.push_message(Message {
            conv: job.conv.clone(),
            seq: 0,
            from: job.user.to_string(),
            device: String::new(),
            cmid: job.cmid.clone(),
            body: job.body,
            reply_to: job.reply_to,
            ts: now_ms,
            event: None,
        });
        let cmid: Arc<str> = Arc::from(job.cmid.as_str());
        let fkey = self.filter.key(&job.user, &job.cmid);
        self.filter.insert_key(fkey, now_ms);
        let conv_key: Arc<str> = Arc::from(job.conv.as_str());
        self.dedup
            .insert(&job.user, cmid, conv_key, seq, now_ms, self.next_batch);
        self.pending.posts.push((
            job.ticket,
            Posted {
                conv: job.conv.clone(),
                seq,
                ts: now_ms,
                duplicate: false,
            },
        ));
        self.touch(&job.conv);
        Ok(())
    }

    /// Holds the new direct conversation `conv` of `user` and `peer` (not yet stored: it is,
    /// with its first message).
    pub(crate) fn new_direct(&mut self, conv: &str, user: &str, peer: &str, now_ms: u64) {
        let rec = ConvRecord {
            id: conv.to_string(),
            kind: ConvKind::Direct,
            epoch: self.rng.next_epoch(),
            max_seq: 0,
            first_seq: 1,
            members: [user.to_string(), peer.to_string()].into(),
            retention: Retention::default(),
            created_ms: now_ms,
            name: None,
            metadata: Default::default(),
            deleted: false,
        };
        self.convs
            .insert(conv.to_string(), crate::conv::Conv::new(rec, false));
    }

    /// Records `event` in group `conv` (held) as a system message of the next batch; a list of
    /// users longer than [`MAX_EVENT_USERS`] becomes several messages in a row.
    pub(crate) fn append_event(&mut self, conv: &str, event: ConvEvent, now_ms: u64) {
        let parts: Vec<ConvEvent> = match event {
            ConvEvent::Joined { users } => chunks(users, |users| ConvEvent::Joined { users }),
            ConvEvent::Left { users } => chunks(users, |users| ConvEvent::Left { users }),
            ConvEvent::Removed { users } => chunks(users, |users| ConvEvent::Removed { users }),
            e @ ConvEvent::Renamed { .. } => vec![e],
        };
        for event in parts {
            let Some(c) = self.convs.get(conv) else {
                return;
            };
            // Unique, and never a client's: `#` is not allowed in client message ids.
            let cmid = format!("#event:{conv}:{}:{}", c.rec.epoch, c.rec.max_seq + 1);
            self.push_message(Message {
                conv: conv.to_string(),
                seq: 0,
                from: SYSTEM.to_string(),
                device: String::new(),
                cmid,
                body: String::new(),
                reply_to: None,
                ts: now_ms,
                event: Some(event),
            });
        }
    }

    /// Gives `m` the next seq of its conversation (held) and adds it to the next batch.
    fn push_message(&mut self, mut m: Message) -> u64 {
        let Some(c) = self.convs.get_mut(&m.conv) else {
            return 0;
        };
        c.rec.max_seq += 1;
        m.seq = c.rec.max_seq;
        let seq = m.seq;
        self.newest_ts = self.newest_ts.max(m.ts);
        self.dedup_stored_since.get_or_insert(m.ts);
        if !self.pending.convs.contains(&m.conv) {
            self.pending.convs.insert(m.conv.clone());
        }
        self.pending.messages.push(Arc::new(m));
        seq
    }
}

fn chunks(users: Vec<String>, make: impl Fn(Vec<String>) -> ConvEvent) -> Vec<ConvEvent> {
    users
        .chunks(MAX_EVENT_USERS)
        .map(|c| make(c.to_vec()))
        .collect()
}

pub(crate) fn posted(ticket: Ticket, reply: Result<Posted, CoreError>) -> Out {
    Out::Io(Action::Posted { ticket, reply })
}
