//! What each (sender, client message id) pair was accepted as, for answering resends inside the
//! dedup window with the original `accepted`. Kept by user then client message id, so that the
//! check every send makes looks up borrowed names without building a key.

use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct DedupEntry {
    pub conv: String,
    pub seq: u64,
    pub ts: u64,
}

#[derive(Clone, Debug, Default)]
pub struct DedupIndex(HashMap<String, HashMap<String, DedupEntry>>);

impl DedupIndex {
    pub fn get(&self, user: &str, cmid: &str) -> Option<&DedupEntry> {
        self.0.get(user).and_then(|m| m.get(cmid))
    }

    pub fn insert(&mut self, user: &str, cmid: &str, entry: DedupEntry) {
        match self.0.get_mut(user) {
            Some(m) => {
                m.insert(cmid.to_string(), entry);
            }
            None => {
                let m = HashMap::from([(cmid.to_string(), entry)]);
                self.0.insert(user.to_string(), m);
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
