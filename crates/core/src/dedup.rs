//! What each (sender, client message id) pair was accepted as, for answering resends inside the
//! dedup window with the original `accepted`. Kept by user then client message id, so that the
//! check every send makes looks up borrowed names without building a key.
//!
//! Names are shared (`Arc<str>`): the user with the session, the conversation with its state, the
//! client message id with the expiry queue, so that remembering a send allocates once.

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct DedupEntry {
    pub conv: Arc<str>,
    pub seq: u64,
    pub ts: u64,
}

#[derive(Clone, Debug, Default)]
pub struct DedupIndex(HashMap<Arc<str>, HashMap<Arc<str>, DedupEntry>>);

impl DedupIndex {
    pub fn get(&self, user: &str, cmid: &str) -> Option<&DedupEntry> {
        self.0.get(user).and_then(|m| m.get(cmid))
    }

    pub fn insert(&mut self, user: &Arc<str>, cmid: Arc<str>, entry: DedupEntry) {
        match self.0.get_mut(&**user) {
            Some(m) => {
                m.insert(cmid, entry);
            }
            None => {
                let mut m = HashMap::new();
                m.insert(cmid, entry);
                self.0.insert(user.clone(), m);
            }
        }
    }

    pub fn remove(&mut self, user: &str, cmid: &str) {
        if let Some(m) = self.0.get_mut(user) {
            m.remove(cmid);
            if m.is_empty() {
                self.0.remove(user);
            }
        }
    }
}
