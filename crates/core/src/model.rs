//! The records the core hands to storage and gets back from it: what a conversation, a message,
//! a cursor and a dedup entry look like at rest, the [`Batch`] of changes committed atomically,
//! and the [`Snapshot`] the core is rebuilt from at start.
//!
//! Every store backend persists exactly these records; their shape is the contract between the
//! core and any store.

use ordo_protocol::{ConvKind, Message};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// How much history a conversation keeps. `None` keeps everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Messages older than this many milliseconds are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// Only the newest this many messages are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
}

impl Retention {
    pub fn is_keep_all(&self) -> bool {
        self.max_age_ms.is_none() && self.max_count.is_none()
    }

    /// This retention where set, `fallback` where not.
    pub fn or(self, fallback: Retention) -> Retention {
        Retention {
            max_age_ms: self.max_age_ms.or(fallback.max_age_ms),
            max_count: self.max_count.or(fallback.max_count),
        }
    }
}

/// A conversation at rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvRecord {
    pub id: String,
    pub kind: ConvKind,
    pub epoch: u64,
    /// Highest seq assigned (and, in a committed record, durable).
    pub max_seq: u64,
    /// Lowest seq still stored (max_seq + 1 when retention removed everything).
    pub first_seq: u64,
    pub members: BTreeSet<String>,
    /// The conversation's own retention; unset fields fall back to the server default.
    pub retention: Retention,
    pub created_ms: u64,
    /// A group's name, if the app gave it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A group's metadata: string keys and values the app keeps with it (see
    /// [`crate::owner::validate_group_info`] for the limits).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// A group deleted through the admin API: no members, no messages, no name; its id may be
    /// used for a new group (with a new epoch, its seqs going on after the old ones).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// A conversation's seq range, written alone when that is all that changed: the common case of a
/// batch, which must not rewrite the member list of a large group with every message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvPosition {
    pub id: String,
    /// Highest seq assigned (and, once committed, durable).
    pub max_seq: u64,
    /// Lowest seq still stored.
    pub first_seq: u64,
}

/// A message at rest: the protocol's message, which already carries every stored field.
pub type StoredMessage = Message;

/// One device's positions in one conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorRecord {
    pub conv: String,
    pub user: String,
    pub device: String,
    pub delivered: u64,
    pub read: u64,
}

/// What a (sender, client message id) pair was accepted as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    pub user: String,
    pub cmid: String,
    pub conv: String,
    pub seq: u64,
    pub ts: u64,
}

impl DedupRecord {
    /// The dedup entry a stored message stands for.
    pub fn of(m: &StoredMessage) -> Self {
        DedupRecord {
            user: m.from.clone(),
            cmid: m.cmid.clone(),
            conv: m.conv.clone(),
            seq: m.seq,
            ts: m.ts,
        }
    }
}

/// Everything a store must make durable in one atomic, fsynced commit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub id: u64,
    /// New messages, in seq order within each conversation. Shared with the core, which pushes
    /// them to devices once they are durable (and with the `msg` frames it pushes).
    pub messages: Vec<Arc<StoredMessage>>,
    /// Conversations created, or changed in membership or retention: the whole record (its seq
    /// range included).
    pub convs: Vec<ConvRecord>,
    /// Conversations whose seq range alone changed (new messages, count-based trims). Neither
    /// number ever moves back: a store keeps the larger of what it holds and what it is given. A
    /// conversation is in at most one of `convs` and `positions`.
    #[serde(default)]
    pub positions: Vec<ConvPosition>,
    /// Dedup entries to keep besides the messages' own: every message in `messages` is also the
    /// dedup entry (`from`, `cmid`) -> (`conv`, `seq`, `ts`), and a store keeps it as such.
    /// Earlier versions listed those entries here too; the core no longer fills it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dedup_put: Vec<DedupRecord>,
    /// Dedup entries accepted before this time are past their window and may be forgotten. A
    /// store may keep some of them longer (the core checks the window whenever it uses an
    /// entry), never an entry accepted at or after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_forget_before_ms: Option<u64>,
    /// Expired dedup entries to forget, (user, cmid): written by earlier versions, which named
    /// each expired entry; still read from their log records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dedup_delete: Vec<(String, String)>,
    pub cursors: Vec<CursorRecord>,
    /// Remove messages of `conv` with seq below the given one (count-based retention).
    pub trim_below: Vec<(String, u64)>,
    /// Remove messages of `conv` accepted before the given time (age-based retention). The store
    /// reports the resulting first seq in [`CommitOutcome::first_seqs`].
    pub trim_before_ms: Vec<(String, u64)>,
}

/// One step of age-based retention, asked of the store ([`crate::Action::Sweep`]): which of the
/// stored conversations with id after `after` (from the first when `None`), in id order, at
/// most `max_convs` of them, hold a message accepted before `now_ms` minus their max age (their
/// own retention's, else `default_max_age_ms`; with neither, a conversation keeps everything).
/// The store answers with an [`Expired`]; the core trims those in its next batch. The core
/// holds only the conversations in use; the store holds them all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgeSweep {
    pub now_ms: u64,
    pub default_max_age_ms: Option<u64>,
    pub after: Option<String>,
    pub max_convs: u32,
}

/// The store's answer to an [`AgeSweep`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// (conversation, cutoff): each holds a message accepted before its cutoff.
    pub trims: Vec<(String, u64)>,
    /// The last conversation the step covered, if more may follow (the next step starts after
    /// it); `None` once it reached the end.
    pub swept_to: Option<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.convs.is_empty()
            && self.positions.is_empty()
            && self.dedup_put.is_empty()
            && self.dedup_forget_before_ms.is_none()
            && self.dedup_delete.is_empty()
            && self.cursors.is_empty()
            && self.trim_below.is_empty()
            && self.trim_before_ms.is_empty()
    }
}

/// What a store reports after committing a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    /// For every age-based trim: the conversation's first seq after it.
    pub first_seqs: Vec<(String, u64)>,
}

/// One conversation as stored: what the core loads when the conversation is first used
/// ([`crate::Action::Load`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvState {
    pub rec: ConvRecord,
    /// Every device position stored for it.
    pub cursors: Vec<CursorRecord>,
}

/// Which of a user's conversations one overview page lists ([`crate::Action::LoadMember`]):
/// those with an id after `after` (from the first when `None`), in id order, at most
/// `max_convs` of them, stopping after the conversation that brings the members' total to
/// `max_members` or more (so a page holds at least one conversation when there is one, and
/// reading it takes memory bounded by its members however large the groups).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberPageAsk {
    pub user: String,
    pub after: Option<String>,
    pub max_convs: usize,
    pub max_members: usize,
}

/// Most groups one page of [`GroupPage`] lists, and how many when not told.
pub const MAX_GROUPS_LIMIT: usize = 1000;
pub const DEFAULT_GROUPS_LIMIT: usize = 100;
/// A page of [`GroupPage`] ends early once its groups hold this many members (it always holds
/// one group, when there is one), so that a page of large groups stays small.
pub const MAX_GROUP_PAGE_MEMBERS: usize = 100_000;

/// One page of the stored groups, for the admin API: in id order, deleted groups left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupPage {
    pub groups: Vec<ConvRecord>,
    /// More groups follow the last one listed.
    pub has_more: bool,
}

impl GroupPage {
    /// The page of `limit` (at least 1) groups a backend reads from `records`: the stored
    /// conversations after the page's start, in id order (direct ones may be in it or not).
    /// The one rule every backend keeps.
    pub fn collect<E>(
        limit: usize,
        records: impl IntoIterator<Item = Result<ConvRecord, E>>,
    ) -> Result<GroupPage, E> {
        let limit = limit.clamp(1, MAX_GROUPS_LIMIT);
        let mut groups = Vec::new();
        let mut members = 0;
        for r in records {
            let r = r?;
            if r.kind != ConvKind::Group || r.deleted {
                continue;
            }
            members += r.members.len();
            if groups.len() == limit || (!groups.is_empty() && members > MAX_GROUP_PAGE_MEMBERS) {
                return Ok(GroupPage {
                    groups,
                    has_more: true,
                });
            }
            groups.push(r);
        }
        Ok(GroupPage {
            groups,
            has_more: false,
        })
    }
}

/// One page of a user's conversations as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberPage {
    pub convs: Vec<ConvState>,
    /// Whether the user is a member of conversations after the last one listed.
    pub more: bool,
}

impl MemberPage {
    /// The page `ask` lists, from `ids` (conversations that may have the user as a member, in
    /// id order) and `load` (a conversation as stored): the one rule every store keeps. Only
    /// conversations whose record names the user are listed; once the page is full, `more`
    /// tells whether `ids` goes on (an id past the page is not read, so `more` may promise a
    /// conversation the user has left since the index was written: the next page is empty).
    pub fn collect<E>(
        ask: &MemberPageAsk,
        ids: impl IntoIterator<Item = Result<String, E>>,
        mut load: impl FnMut(&str) -> Result<Option<ConvState>, E>,
    ) -> Result<MemberPage, E> {
        let mut page = MemberPage::default();
        let mut members = 0usize;
        for id in ids {
            let id = id?;
            if ask.after.as_deref().is_some_and(|a| id.as_str() <= a) {
                continue;
            }
            if page.convs.len() >= ask.max_convs.max(1) || members >= ask.max_members.max(1) {
                page.more = true;
                break;
            }
            let Some(state) = load(&id)? else { continue };
            if state.rec.members.contains(&ask.user) {
                members += state.rec.members.len();
                page.convs.push(state);
            }
        }
        Ok(page)
    }
}

/// What the core needs of the store at start: little, so that a start does not depend on how
/// much is stored. Conversations are loaded when first used ([`crate::Action::Load`]); dedup
/// entries are asked for one key at a time ([`crate::Action::Lookup`]) and the filter of them
/// is rebuilt in the background ([`crate::Core::dedup_filter_add`]).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The newest acceptance time the store holds (0 if none): a restarted server's clock
    /// starts no earlier, so that acceptance times never go back.
    pub last_ts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: &str, members: usize) -> ConvRecord {
        ConvRecord {
            id: id.into(),
            kind: ConvKind::Group,
            epoch: 1,
            max_seq: 0,
            first_seq: 1,
            members: (0..members).map(|i| format!("u{i}")).collect(),
            retention: Retention::default(),
            created_ms: 0,
            name: None,
            metadata: BTreeMap::new(),
            deleted: false,
        }
    }

    #[test]
    fn a_group_page_ends_early_at_its_member_budget() {
        let page = |recs: Vec<ConvRecord>, limit| {
            GroupPage::collect(limit, recs.into_iter().map(Ok::<_, ()>)).unwrap()
        };
        let big = MAX_GROUP_PAGE_MEMBERS * 3 / 5;
        // Two large groups do not fit one page; the first comes alone, with more to follow.
        let p = page(vec![group("a", big), group("b", big)], 10);
        assert_eq!(p.groups.len(), 1);
        assert!(p.has_more);
        // One larger than the budget still comes, alone.
        let p = page(
            vec![group("a", MAX_GROUP_PAGE_MEMBERS + 1), group("b", 1)],
            10,
        );
        assert_eq!((p.groups.len(), p.has_more), (1, true));
        // Small groups: the count limit.
        let p = page((0..5).map(|i| group(&format!("g{i}"), 3)).collect(), 3);
        assert_eq!((p.groups.len(), p.has_more), (3, true));
        let p = page((0..3).map(|i| group(&format!("g{i}"), 3)).collect(), 3);
        assert_eq!((p.groups.len(), p.has_more), (3, false));
    }
}
