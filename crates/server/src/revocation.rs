//! Revoked tokens: the admin API cuts off a user's tokens (or one device's) issued before a
//! time, for a stolen token or a signed-out device.
//!
//! A revocation is `(user, device or every device, before)`: a token of that user (and device)
//! whose `iat` is before `before` is refused, and so is one without `iat` (its age is unknown).
//! Tokens issued at or after `before` work, so a user who gets a new token is back at once.
//! Connections already open with a revoked token are closed with 4003 as soon as the
//! revocation is stored: each connection watches [`Revocations::subscribe`].
//!
//! The list lives in `<data>/revocations.json`, written whole to a temporary file, flushed and
//! renamed over the old one before a revocation is answered, so it survives a crash and a
//! restart; a file that cannot be read stops the start (it is never taken as "no
//! revocations"). At most [`MAX_REVOCATIONS`] entries: one per user and one per (user, device)
//! revoked, a later revocation of the same one moving its time.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use tokio::sync::watch;

/// Most entries the list holds.
pub const MAX_REVOCATIONS: usize = 100_000;

const FILE: &str = "revocations.json";

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({reason}); it lists revoked tokens, so the server does not start without it: mend it from a backup, or delete it to forget every revocation")]
    Damaged { path: String, reason: String },
    #[error("cannot store the revocation in {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the list of revocations is full ({MAX_REVOCATIONS} users and devices); revoke whole users instead of single devices, or remove old entries from {0}")]
    Full(String),
}

/// One entry of the list, as stored and as answered by the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Tokens issued before this (unix seconds) are refused.
    pub before: u64,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    revocations: Vec<Revocation>,
}

#[derive(Default)]
struct List {
    users: HashMap<String, u64>,
    devices: HashMap<(String, String), u64>,
}

impl List {
    fn entries(&self) -> Vec<Revocation> {
        let mut out: Vec<Revocation> = self
            .users
            .iter()
            .map(|(u, b)| Revocation {
                user: u.clone(),
                device: None,
                before: *b,
            })
            .chain(self.devices.iter().map(|((u, d), b)| Revocation {
                user: u.clone(),
                device: Some(d.clone()),
                before: *b,
            }))
            .collect();
        out.sort_by(|a, b| (&a.user, &a.device).cmp(&(&b.user, &b.device)));
        out
    }

    fn len(&self) -> usize {
        self.users.len() + self.devices.len()
    }
}

/// The revocations in force, shared by the HTTP handlers and every connection.
pub struct Revocations {
    path: PathBuf,
    list: RwLock<List>,
    /// Held by the one revocation being written: the file is written outside `list`'s lock,
    /// so that token checks never wait for a disk.
    writing: Mutex<()>,
    changed: watch::Sender<u64>,
}

impl Revocations {
    /// Reads `<dir>/revocations.json` (none yet: nothing is revoked).
    pub fn open(dir: &Path) -> Result<Revocations, RevocationError> {
        let path = dir.join(FILE);
        let shown = || path.display().to_string();
        let mut list = List::default();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let stored: Stored =
                    serde_json::from_slice(&bytes).map_err(|e| RevocationError::Damaged {
                        path: shown(),
                        reason: e.to_string(),
                    })?;
                if stored.version != 1 {
                    return Err(RevocationError::Damaged {
                        path: shown(),
                        reason: format!(
                            "version {} is newer than this server knows",
                            stored.version
                        ),
                    });
                }
                for r in stored.revocations {
                    match r.device {
                        None => list.users.insert(r.user, r.before),
                        Some(d) => list.devices.insert((r.user, d), r.before),
                    };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RevocationError::Read {
                    path: shown(),
                    source,
                })
            }
        }
        Ok(Revocations {
            path,
            list: RwLock::new(list),
            writing: Mutex::new(()),
            changed: watch::channel(0).0,
        })
    }

    /// Stores a revocation (blocking: it writes and flushes the file) and tells every
    /// connection. A later `before` for the same user (or device) replaces an earlier one; an
    /// earlier one changes nothing. Returns the entry in force.
    pub fn revoke(
        &self,
        user: &str,
        device: Option<&str>,
        before: u64,
    ) -> Result<Revocation, RevocationError> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        let current = match device {
            None => list.users.get(user).copied(),
            Some(d) => list
                .devices
                .get(&(user.to_string(), d.to_string()))
                .copied(),
        };
        let entry = Revocation {
            user: user.to_string(),
            device: device.map(str::to_string),
            before: current.unwrap_or(0).max(before),
        };
        if current == Some(entry.before) {
            return Ok(entry);
        }
        if current.is_none() && list.len() >= MAX_REVOCATIONS {
            return Err(RevocationError::Full(self.path.display().to_string()));
        }
        let mut next = list.entries();
        drop(list);
        next.retain(|r| !(r.user == entry.user && r.device == entry.device));
        next.push(entry.clone());
        self.write(&next)?;
        // On disk: now in force.
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        match device {
            None => list.users.insert(user.to_string(), entry.before),
            Some(d) => list
                .devices
                .insert((user.to_string(), d.to_string()), entry.before),
        };
        drop(list);
        self.changed.send_modify(|n| *n += 1);
        Ok(entry)
    }

    /// The revocation that refuses a token of `user` on `device` issued at `iat`, if any.
    pub fn refuses(&self, user: &str, device: &str, iat: Option<u64>) -> Option<Revocation> {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        let issued = iat.unwrap_or(0);
        if let Some(&before) = list.users.get(user).filter(|b| issued < **b) {
            return Some(Revocation {
                user: user.to_string(),
                device: None,
                before,
            });
        }
        let key = (user.to_string(), device.to_string());
        list.devices
            .get(&key)
            .filter(|b| issued < **b)
            .map(|&before| Revocation {
                user: user.to_string(),
                device: Some(device.to_string()),
                before,
            })
    }

    /// Changes whenever a revocation is stored.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn write(&self, entries: &[Revocation]) -> Result<(), RevocationError> {
        let err = |source| RevocationError::Write {
            path: self.path.display().to_string(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let json = serde_json::to_vec_pretty(&Stored {
            version: 1,
            revocations: entries.to_vec(),
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&json).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_refuse_older_tokens_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revocations::open(dir.path()).unwrap();
        assert_eq!(r.refuses("alice", "phone", Some(5)), None);
        let seen = r.subscribe();
        r.revoke("alice", None, 100).unwrap();
        assert!(seen.has_changed().unwrap());
        assert!(r.refuses("alice", "phone", Some(99)).is_some());
        assert!(r.refuses("alice", "phone", None).is_some());
        assert_eq!(r.refuses("alice", "phone", Some(100)), None);
        assert_eq!(r.refuses("bob", "phone", Some(1)), None);
        // An earlier time does not move it back.
        assert_eq!(r.revoke("alice", None, 50).unwrap().before, 100);
        r.revoke("bob", Some("laptop"), 200).unwrap();
        assert!(r.refuses("bob", "laptop", Some(150)).is_some());
        assert_eq!(r.refuses("bob", "phone", Some(150)), None);
        drop(r);
        let r = Revocations::open(dir.path()).unwrap();
        assert!(r.refuses("alice", "tablet", Some(99)).is_some());
        assert!(r.refuses("bob", "laptop", Some(150)).is_some());
        assert_eq!(r.refuses("bob", "phone", Some(150)), None);
    }

    #[test]
    fn a_damaged_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{\"version\":1,\"revoc").unwrap();
        let e = Revocations::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("damaged"), "{e}");
    }
}
