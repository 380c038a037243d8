//! In-memory state of one conversation: its durable record, the seq assigned so far, every
//! device's cursor, and the receipts last published per member.

use crate::model::{ConvRecord, CursorRecord};
use std::collections::HashMap;

/// A device's delivered and read positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub delivered: u64,
    pub read: u64,
}

#[derive(Clone, Debug)]
pub struct Conv {
    /// The record as it will be after the pending batch commits (`max_seq` = last assigned).
    pub rec: ConvRecord,
    /// Highest seq known durable: the highest any client may see.
    pub durable_seq: u64,
    /// Whether the conversation itself has been committed once.
    pub durable: bool,
    /// (user, device) -> positions.
    pub cursors: HashMap<(String, String), Cursor>,
    /// user -> (delivered, read) last published in a `receipt` (always durable values).
    pub published: HashMap<String, Cursor>,
}

impl Conv {
    pub fn new(rec: ConvRecord, durable: bool) -> Self {
        Conv {
            durable_seq: if durable { rec.max_seq } else { 0 },
            rec,
            durable,
            cursors: HashMap::new(),
            published: HashMap::new(),
        }
    }

    pub fn is_member(&self, user: &str) -> bool {
        self.rec.members.contains(user)
    }

    pub fn cursor(&self, user: &str, device: &str) -> Cursor {
        self.cursors
            .get(&(user.to_string(), device.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// The user's position over all their devices: the furthest any of them got.
    pub fn user_position(&self, user: &str) -> Cursor {
        let mut out = Cursor::default();
        for ((u, _), c) in &self.cursors {
            if u == user {
                out.delivered = out.delivered.max(c.delivered);
                out.read = out.read.max(c.read);
            }
        }
        out
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
