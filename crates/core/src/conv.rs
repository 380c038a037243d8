//! In-memory state of one conversation, kept twice where it matters: the *live* view (what the
//! pending batch will make true: last assigned seq, members after pending admin changes, every
//! ack received) and the *durable* view (what the store has committed). Anything a client can
//! observe (membership checks for reads, fan-out, receipts, overviews, admin replies) is taken
//! from the durable view, so nothing observed can be taken back by a crash.

use crate::model::{ConvRecord, CursorRecord};
use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

/// A device's delivered and read positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub delivered: u64,
    pub read: u64,
}

#[derive(Clone, Debug)]
pub struct Conv {
    /// The conversation's id, shared with what refers to it (dedup entries, waiting senders).
    pub id: Arc<str>,
    /// The record as it will be after the pending batch commits (`max_seq` = last assigned).
    pub rec: ConvRecord,
    /// The record as last committed; `None` until the conversation's first commit. Shared
    /// with the deliveries that name its members.
    pub durable_rec: Option<Arc<ConvRecord>>,
    /// Highest seq known durable: the highest any client may see.
    pub durable_seq: u64,
    /// Positions, including acks not yet committed. Shared with the deliveries that need a
    /// device's position.
    pub cursors: Arc<Cursors>,
    /// Positions as committed.
    pub durable_cursors: Cursors,
    /// user -> (delivered, read) last published in a `receipt` (always durable values).
    pub published: HashMap<String, Cursor>,
    /// When it was last used (a stamp of the core's), for eviction.
    pub used: u64,
    /// The commit (a count of the core's) that last changed it.
    pub changed: u64,
}

impl Conv {
    pub fn new(rec: ConvRecord, durable: bool) -> Self {
        Conv {
            id: Arc::from(rec.id.as_str()),
            durable_seq: if durable { rec.max_seq } else { 0 },
            durable_rec: durable.then(|| Arc::new(rec.clone())),
            rec,
            cursors: Arc::default(),
            durable_cursors: Cursors::default(),
            published: HashMap::new(),
            used: 0,
            changed: 0,
        }
    }

    pub fn is_durable(&self) -> bool {
        self.durable_rec.is_some()
    }

    /// Membership after pending changes: decides what may be written.
    pub fn is_member(&self, user: &str) -> bool {
        self.rec.members.contains(user)
    }

    /// Membership as committed: decides what may be read and who is sent what.
    pub fn is_durable_member(&self, user: &str) -> bool {
        self.durable_rec
            .as_ref()
            .is_some_and(|r| r.members.contains(user))
    }

    pub fn durable_members(&self) -> impl Iterator<Item = &String> {
        self.durable_rec.iter().flat_map(|r| r.members.iter())
    }

    pub fn durable_member_count(&self) -> usize {
        self.durable_rec.as_ref().map_or(0, |r| r.members.len())
    }

    /// Lowest seq still stored, as committed.
    pub fn durable_first_seq(&self) -> u64 {
        self.durable_rec
            .as_ref()
            .map_or(1, |r| r.first_seq.min(self.durable_seq + 1))
    }

    pub fn cursor(&self, user: &str, device: &str) -> Cursor {
        self.cursors.get(user, device)
    }

    pub fn durable_cursor(&self, user: &str, device: &str) -> Cursor {
        self.durable_cursors.get(user, device)
    }

    /// The user's committed position over all their devices: the furthest any of them got.
    pub fn durable_user_position(&self, user: &str) -> Cursor {
        self.durable_cursors.user_position(user)
    }

    pub fn cursor_record(&self, user: &str, device: &str) -> CursorRecord {
        let c = self.cursor(user, device);
        CursorRecord {
            conv: self.rec.id.clone(),
            user: user.to_string(),
            device: device.to_string(),
            delivered: c.delivered,
            read: c.read,
        }
    }
}

/// Every device's positions in one conversation, by user then device: looked up by borrowed
/// names (a fan-out reads one per member), and a user's devices found without a scan.
#[derive(Clone, Debug, Default)]
pub struct Cursors(HashMap<String, HashMap<String, Cursor>>);

impl Cursors {
    pub fn get(&self, user: &str, device: &str) -> Cursor {
        self.0
            .get(user)
            .and_then(|d| d.get(device))
            .copied()
            .unwrap_or_default()
    }

    /// The device's positions, made (at zero) if it has none yet.
    pub fn entry(&mut self, user: &str, device: &str) -> &mut Cursor {
        if !self.0.contains_key(user) {
            self.0.insert(user.to_string(), HashMap::new());
        }
        let devices = self.0.get_mut(user).expect("inserted above");
        if !devices.contains_key(device) {
            devices.insert(device.to_string(), Cursor::default());
        }
        devices.get_mut(device).expect("inserted above")
    }

    /// The furthest any of the user's devices got.
    pub fn user_position(&self, user: &str) -> Cursor {
        let mut out = Cursor::default();
        for c in self.0.get(user).into_iter().flat_map(|d| d.values()) {
            out.delivered = out.delivered.max(c.delivered);
            out.read = out.read.max(c.read);
        }
        out
    }

    /// Users with at least one device position.
    pub fn users(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}
