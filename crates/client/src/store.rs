//! The client's local store: one redb file holding the outbox, received messages, each
//! conversation's position and epoch, and our sent messages whose status can still move.
//!
//! Every `Persist` effect of the state machine is one transaction, fsynced before the driver
//! carries out the next effect: that is what makes "stored before acknowledged" and "in the
//! outbox before `send` returns" true across a crash.

use crate::outbox::Pending;
use crate::state::{ClientSnapshot, ConvSnapshot, SentSnapshot, StoreOp};
use ordo_protocol::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// order -> Pending
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// cmid -> order
const OUTBOX_IDS: TableDefinition<&str, u64> = TableDefinition::new("outbox_ids");
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const CONVS: TableDefinition<&str, &[u8]> = TableDefinition::new("convs");
const SENT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("sent");

#[derive(Debug, thiserror::Error)]
pub enum LocalStoreError {
    #[error("cannot open the client store {path}: {source}; is another client using it?")]
    Open { path: String, source: redb::Error },
    #[error("client store error: {0}")]
    Engine(#[from] redb::Error),
    #[error("client store record is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot encode a record: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

fn engine<E: Into<redb::Error>>(e: E) -> LocalStoreError {
    LocalStoreError::Engine(e.into())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, LocalStoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| LocalStoreError::Corrupt(e.to_string()))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, LocalStoreError> {
    Ok(rmp_serde::to_vec_named(v)?)
}

/// A conversation's row: what the state machine needs, plus how far the app has taken
/// messages from the event stream.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ConvRow {
    epoch: Option<u64>,
    contiguous: u64,
    read: u64,
    /// Highest seq the app has taken as an event; stored messages above it are handed again
    /// after a restart.
    handed: u64,
}

pub struct LocalStore {
    db: Database,
}

impl LocalStore {
    /// Opens or creates the store file at `path` (its directory is created if needed).
    pub fn open(path: &Path) -> Result<Self, LocalStoreError> {
        let err = |source: redb::Error| LocalStoreError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(e.into()))?;
        }
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let tx = db.begin_write().map_err(engine)?;
        {
            tx.open_table(OUTBOX).map_err(engine)?;
            tx.open_table(OUTBOX_IDS).map_err(engine)?;
            tx.open_table(MESSAGES).map_err(engine)?;
            tx.open_table(CONVS).map_err(engine)?;
            tx.open_table(SENT).map_err(engine)?;
        }
        tx.commit().map_err(engine)?;
        Ok(LocalStore { db })
    }

    /// What the state machine restarts from.
    pub fn snapshot(&self) -> Result<ClientSnapshot, LocalStoreError> {
        let tx = self.db.begin_read().map_err(engine)?;
        let mut snap = ClientSnapshot::default();
        for row in tx
            .open_table(OUTBOX)
            .map_err(engine)?
            .iter()
            .map_err(engine)?
        {
            let (_, v) = row.map_err(engine)?;
            snap.outbox.push(decode::<Pending>(v.value())?);
        }
        for row in tx
            .open_table(CONVS)
            .map_err(engine)?
            .iter()
            .map_err(engine)?
        {
            let (k, v) = row.map_err(engine)?;
            let r: ConvRow = decode(v.value())?;
            snap.convs.push(ConvSnapshot {
                conv: k.value().to_string(),
                epoch: r.epoch,
                contiguous: r.contiguous,
                read: r.read,
            });
        }
        for row in tx
            .open_table(SENT)
            .map_err(engine)?
            .iter()
            .map_err(engine)?
        {
            let (_, v) = row.map_err(engine)?;
            snap.sent.push(decode::<SentSnapshot>(v.value())?);
        }
        Ok(snap)
    }

    /// Applies the operations of one `Persist` effect in one fsynced transaction.
    pub fn apply(&self, ops: &[StoreOp]) -> Result<(), LocalStoreError> {
        let mut tx = self.db.begin_write().map_err(engine)?;
        tx.set_durability(Durability::Immediate).map_err(engine)?;
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(engine)?;
            let mut ids = tx.open_table(OUTBOX_IDS).map_err(engine)?;
            let mut messages = tx.open_table(MESSAGES).map_err(engine)?;
            let mut convs = tx.open_table(CONVS).map_err(engine)?;
            let mut sent = tx.open_table(SENT).map_err(engine)?;
            let conv_row = |convs: &redb::Table<&str, &[u8]>,
                            conv: &str|
             -> Result<ConvRow, LocalStoreError> {
                match convs.get(conv).map_err(engine)? {
                    Some(v) => decode(v.value()),
                    None => Ok(ConvRow::default()),
                }
            };
            for op in ops {
                match op {
                    StoreOp::PutPending(p) => {
                        let existing = ids.get(p.cmid.as_str()).map_err(engine)?.map(|g| g.value());
                        let order = match existing {
                            Some(o) => o,
                            None => {
                                let last = outbox.last().map_err(engine)?.map(|(k, _)| k.value());
                                last.map_or(1, |l| l + 1)
                            }
                        };
                        outbox
                            .insert(order, encode(p)?.as_slice())
                            .map_err(engine)?;
                        ids.insert(p.cmid.as_str(), order).map_err(engine)?;
                    }
                    StoreOp::RemovePending(cmid) => {
                        let order = ids
                            .remove(cmid.as_str())
                            .map_err(engine)?
                            .map(|g| g.value());
                        if let Some(o) = order {
                            outbox.remove(o).map_err(engine)?;
                        }
                    }
                    StoreOp::PutMessages {
                        conv,
                        messages: ms,
                        contiguous,
                    } => {
                        for m in ms {
                            messages
                                .insert((conv.as_str(), m.seq), encode(m)?.as_slice())
                                .map_err(engine)?;
                        }
                        let mut row = conv_row(&convs, conv)?;
                        row.contiguous = row.contiguous.max(*contiguous);
                        convs
                            .insert(conv.as_str(), encode(&row)?.as_slice())
                            .map_err(engine)?;
                    }
                    StoreOp::SetConv {
                        conv,
                        epoch,
                        contiguous,
                        reset,
                    } => {
                        let mut row = conv_row(&convs, conv)?;
                        row.epoch = *epoch;
                        if *reset {
                            messages
                                .retain_in(
                                    (conv.as_str(), 0)..=(conv.as_str(), u64::MAX),
                                    |_, _| false,
                                )
                                .map_err(engine)?;
                            row.contiguous = *contiguous;
                            row.read = 0;
                            row.handed = 0;
                        } else {
                            row.contiguous = row.contiguous.max(*contiguous);
                        }
                        convs
                            .insert(conv.as_str(), encode(&row)?.as_slice())
                            .map_err(engine)?;
                    }
                    StoreOp::SetRead { conv, seq } => {
                        let mut row = conv_row(&convs, conv)?;
                        row.read = row.read.max(*seq);
                        convs
                            .insert(conv.as_str(), encode(&row)?.as_slice())
                            .map_err(engine)?;
                    }
                    StoreOp::PutSent {
                        conv,
                        seq,
                        cmid,
                        status,
                    } => {
                        let s = SentSnapshot {
                            conv: conv.clone(),
                            seq: *seq,
                            cmid: cmid.clone(),
                            status: status.clone(),
                        };
                        if matches!(status, crate::state::Status::Read) {
                            sent.remove((conv.as_str(), *seq)).map_err(engine)?;
                        } else {
                            sent.insert((conv.as_str(), *seq), encode(&s)?.as_slice())
                                .map_err(engine)?;
                        }
                    }
                }
            }
        }
        tx.commit().map_err(engine)?;
        Ok(())
    }

    /// Records that the app took every message of `conv` up to `seq` from the event stream.
    pub fn set_handed(&self, conv: &str, seq: u64) -> Result<(), LocalStoreError> {
        let mut tx = self.db.begin_write().map_err(engine)?;
        tx.set_durability(Durability::Immediate).map_err(engine)?;
        {
            let mut convs = tx.open_table(CONVS).map_err(engine)?;
            let mut row: ConvRow = match convs.get(conv).map_err(engine)? {
                Some(v) => decode(v.value())?,
                None => ConvRow::default(),
            };
            row.handed = row.handed.max(seq);
            convs
                .insert(conv, encode(&row)?.as_slice())
                .map_err(engine)?;
        }
        tx.commit().map_err(engine)?;
        Ok(())
    }

    /// Stored messages the app has not taken yet, per conversation in seq order.
    pub fn unhanded(&self) -> Result<Vec<Message>, LocalStoreError> {
        let tx = self.db.begin_read().map_err(engine)?;
        let convs = tx.open_table(CONVS).map_err(engine)?;
        let messages = tx.open_table(MESSAGES).map_err(engine)?;
        let mut out = Vec::new();
        for row in convs.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let r: ConvRow = decode(v.value())?;
            let conv = k.value();
            if r.handed >= r.contiguous {
                continue;
            }
            for m in messages
                .range((conv, r.handed + 1)..=(conv, r.contiguous))
                .map_err(engine)?
            {
                let (_, v) = m.map_err(engine)?;
                out.push(decode(v.value())?);
            }
        }
        Ok(out)
    }

    /// Local history of `conv`: messages with seq > `after`, at most `limit`.
    pub fn history(
        &self,
        conv: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, LocalStoreError> {
        let tx = self.db.begin_read().map_err(engine)?;
        let messages = tx.open_table(MESSAGES).map_err(engine)?;
        let mut out = Vec::new();
        for m in messages
            .range((conv, after.saturating_add(1))..=(conv, u64::MAX))
            .map_err(engine)?
            .take(limit)
        {
            let (_, v) = m.map_err(engine)?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }
}
