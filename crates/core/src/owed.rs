//! What a connection is owed: the pushes that did not fit its queue, kept as the few frames
//! that replace them, sent once the queue has room. A driver keeps one per connection whose
//! queue ran out of room for pushes (the server's router, the simulation), and tells the core
//! of each `msg` left out ([`crate::Core::push_missed`]).
//!
//! A `msg` or `notify` left out becomes one owed `notify` per conversation (the highest seq);
//! a `receipt` left out becomes one owed `receipt` per conversation and member (the highest
//! positions: receipts are cumulative). While something is owed for a conversation (or a
//! member's receipt), later frames of the same kind for it wait behind it, so a device is never
//! pushed past a seq it was not sent, and positions never go back.

use ordo_protocol::ServerFrame;
use std::collections::BTreeMap;

/// What one connection is owed.
#[derive(Default)]
pub struct Owed {
    /// conversation -> the highest seq of the pushes left out.
    notifies: BTreeMap<String, u64>,
    /// (conversation, member) -> the highest (delivered, read) of the receipts left out.
    receipts: BTreeMap<(String, String), (u64, u64)>,
}

/// What kind of frame `frame` is, for the queue: a push (may be left out and owed), or an
/// answer (must fit).
pub fn is_push(frame: &ServerFrame) -> bool {
    matches!(
        frame,
        ServerFrame::Msg(_) | ServerFrame::Notify { .. } | ServerFrame::Receipt { .. }
    )
}

impl Owed {
    /// How many frames are owed.
    pub fn len(&self) -> usize {
        self.notifies.len() + self.receipts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `frame` (a push) must wait behind something owed of the same conversation (or
    /// member's receipt).
    pub fn holds_back(&self, frame: &ServerFrame) -> bool {
        match frame {
            ServerFrame::Msg(m) => self.notifies.contains_key(&m.conv),
            ServerFrame::Notify { conv, .. } => self.notifies.contains_key(conv),
            ServerFrame::Receipt { conv, user, .. } => {
                self.receipts.contains_key(&(conv.clone(), user.clone()))
            }
            _ => false,
        }
    }

    /// Keeps what `frame` (a push left out) is owed as.
    pub fn owe(&mut self, frame: &ServerFrame) {
        match frame {
            ServerFrame::Msg(m) => self.owe_notify(&m.conv, m.seq),
            ServerFrame::Notify { conv, max_seq } => self.owe_notify(conv, *max_seq),
            ServerFrame::Receipt {
                conv,
                user,
                delivered,
                read,
            } => {
                let p = self
                    .receipts
                    .entry((conv.clone(), user.clone()))
                    .or_insert((0, 0));
                p.0 = p.0.max(*delivered);
                p.1 = p.1.max(*read);
            }
            _ => {}
        }
    }

    fn owe_notify(&mut self, conv: &str, seq: u64) {
        let top = self.notifies.entry(conv.to_string()).or_insert(seq);
        *top = (*top).max(seq);
    }

    /// The first frame owed (notifies first), taken out; [`put_back`](Self::put_back) it if it
    /// does not fit after all.
    pub fn take_first(&mut self) -> Option<ServerFrame> {
        if let Some((conv, max_seq)) = self.notifies.pop_first() {
            return Some(ServerFrame::Notify { conv, max_seq });
        }
        let ((conv, user), (delivered, read)) = self.receipts.pop_first()?;
        Some(ServerFrame::Receipt {
            conv,
            user,
            delivered,
            read,
        })
    }

    /// Owes again a frame [`take_first`](Self::take_first) gave.
    pub fn put_back(&mut self, frame: &ServerFrame) {
        self.owe(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_protocol::Message;

    fn msg(conv: &str, seq: u64) -> ServerFrame {
        ServerFrame::Msg(std::sync::Arc::new(Message {
            conv: conv.into(),
            seq,
            from: "a".into(),
            device: "d".into(),
            cmid: format!("c{seq}"),
            body: "b".into(),
            reply_to: None,
            ts: 1,
            event: None,
        }))
    }

    fn receipt(user: &str, delivered: u64, read: u64) -> ServerFrame {
        ServerFrame::Receipt {
            conv: "g".into(),
            user: user.into(),
            delivered,
            read,
        }
    }

    #[test]
    fn pushes_left_out_become_one_notify_per_conversation_and_one_receipt_per_member() {
        let mut o = Owed::default();
        assert!(!o.holds_back(&msg("g", 1)));
        o.owe(&msg("g", 4));
        o.owe(&msg("g", 5));
        o.owe(&ServerFrame::Notify {
            conv: "g".into(),
            max_seq: 3,
        });
        o.owe(&receipt("bob", 5, 2));
        o.owe(&receipt("bob", 4, 3));
        assert!(o.holds_back(&msg("g", 6)), "no push past the one left out");
        assert!(o.holds_back(&receipt("bob", 6, 6)));
        assert!(!o.holds_back(&receipt("carol", 1, 1)));
        assert!(!o.holds_back(&msg("h", 1)));
        assert_eq!(o.len(), 2);
        let first = o.take_first().unwrap();
        assert_eq!(
            first,
            ServerFrame::Notify {
                conv: "g".into(),
                max_seq: 5
            }
        );
        o.put_back(&first);
        assert_eq!(o.take_first(), Some(first));
        assert_eq!(
            o.take_first(),
            Some(receipt("bob", 5, 3)),
            "the highest of each"
        );
        assert_eq!(o.take_first(), None);
        assert!(o.is_empty());
    }
}
