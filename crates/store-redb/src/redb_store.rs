//! The embedded default store: a write-ahead log ([`crate::wal`]) in front of a redb B-tree file.
//!
//! Group commit happens above (the server hands over one batch per commit). Here a batch is
//! durable once its log record is synced (one sequential write, one `fdatasync`), and `commit`
//! returns then. The applier thread then writes it into the B-tree in a transaction that is not
//! synced (`Durability::None`), which also records the batch's log seqno in the `meta` table;
//! reads wait until every batch logged before they started is applied, so they never miss a
//! message that was reported durable. When the log moves to its other segment (every
//! [`wal::SWITCH_BYTES`](crate::wal::SWITCH_BYTES)), the applier makes the B-tree durable up to
//! the end of the segment left (an empty durable commit: a checkpoint), after which that segment
//! may be written over. On open, log records newer than the B-tree's recorded seqno are applied
//! again, so a crash loses nothing that was synced.
//!
//! A batch whose result depends on what is stored (age-based retention reports the new first
//! seq) is applied before `commit` returns, as is one too large for the log.
//!
//! Records are MessagePack-encoded; keys are tuples so that a conversation's messages are
//! contiguous and ordered by seq. Messages are stored in runs, one row per conversation per
//! batch (see [`MESSAGE_RUNS`]), because a B-tree costs per row inserted.

use crate::error::{applier_stopped, encoding, engine};
use crate::wal::{
    self,
    files::{LogFiles, OsFiles},
    Wal,
};
use ordo_core::{
    AgeSweep, Batch, CommitOutcome, ConvRecord, ConvState, CursorRecord, DedupRecord, Expired,
    GroupPage, MemberPage, MemberPageAsk, Snapshot, MAX_GROUPS_LIMIT, MAX_GROUP_PAGE_MEMBERS,
};
use ordo_protocol::{ConvKind, Message, DIRECT_PREFIX};
use ordo_store::{DedupScan, Page, PageFill, ScanFrom, Store, StoreError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{mpsc, Arc, Condvar, Mutex};

/// (conv, seq of the run's last message) -> a run: consecutive messages of one conversation
/// committed in one batch, at most [`RUN_MAX`], in seq order (a MessagePack array). One B-tree
/// row per run rather than per message: under load a batch carries tens of messages per
/// conversation, and the row insert, not the bytes, is what a B-tree write costs.
const MESSAGE_RUNS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("message_runs");
/// Most messages in one run, and most body bytes (a run ends at the message that reaches it): a
/// read decodes whole runs, so they stay short.
const RUN_MAX: usize = 128;
const RUN_MAX_BYTES: usize = 64 * 1024;
/// The layout before runs, one row per message, keyed (conv, seq); moved into runs on open.
const MESSAGES_BY_SEQ: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const CONVS: TableDefinition<&str, &[u8]> = TableDefinition::new("convs");
/// conv -> (max_seq, first_seq). A conversation's seq range moves with every message, its record
/// (with the member list) only when it is created or changed, so the range is kept apart; where
/// both have one, the larger numbers hold. A store written before this table existed has ranges
/// only in the records, which is why reads fall back to them.
const RANGES: TableDefinition<&str, (u64, u64)> = TableDefinition::new("conv_ranges");
/// (user, conv) -> (): who is a member of what, for a user's overview without reading every
/// conversation. Written with the conversation records. A store written before this table
/// existed gets it built on open, and so does one a build without it wrote to meanwhile (a
/// downgrade, then this build again): see [`MEMBERS_THROUGH`].
const MEMBERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("members");
/// `members_through` -> the log record up to which [`MEMBERS`] is current: written with
/// `wal_applied` by every transaction of this build, so a difference means another build applied
/// records since.
const MEMBERS_THROUGH: &str = "members_through";
/// (conv, user, device) -> (delivered, read)
const CURSORS: TableDefinition<(&str, &str, &str), (u64, u64)> = TableDefinition::new("cursors");
/// (acceptance time of the run's newest entry, run number) -> dedup entries from one batch (each
/// message is one), at most [`RUN_MAX`] (a MessagePack array). Runs, not a row per entry, for the same reason as
/// messages; a run is forgotten once its newest entry is past the window, and the core checks
/// the window of every entry it uses, so the older entries a run keeps meanwhile are harmless.
const DEDUP_RUNS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dedup_runs");
/// (user, cmid) -> (conv, seq, acceptance time): the newest entry of each key, for looking a
/// resend up. Written with the runs; an entry goes when the run it came from is forgotten,
/// unless a newer entry of its key replaced it meanwhile. Stores written before this table
/// existed get it built from their runs on open.
const DEDUP_KEYS: TableDefinition<(&str, &str), (&str, u64, u64)> =
    TableDefinition::new("dedup_keys");
/// The layout before runs: (user, cmid) -> entry; moved into runs on open.
const DEDUP_BY_KEY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("dedup");
/// `forget_before` -> dedup runs older than this are still to be forgotten: a transaction forgets
/// at most [`FORGET_RUNS_AT_ONCE`] runs and leaves the rest to the next ones, so that a large
/// backlog (the first expiry after a long downtime) never makes one huge transaction.
const FORGET_BEFORE: &str = "forget_before";
/// Most dedup runs one transaction forgets.
const FORGET_RUNS_AT_ONCE: usize = 64;
/// `wal_applied` -> seqno of the last log record applied to the B-tree.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const WAL_APPLIED: &str = "wal_applied";
/// `store_id` -> a random number naming this store, made with it: it is in both log headers and
/// in every log record's check value, so a log and a store file from different stores are never
/// used together, and nothing but this store's own records passes as one.
pub(crate) const STORE_ID: &str = "store_id";
/// `log_made` -> 1 once the log was made for [`STORE_ID`]: from then on its segments must be
/// there (before, a crash while making it leaves it to be made again).
pub(crate) const LOG_MADE: &str = "log_made";
/// `next_dedup_run` -> the number the next dedup run gets (keys stay unique within a millisecond).
const NEXT_DEDUP_RUN: &str = "next_dedup_run";
/// `dedup_keys_through` -> every dedup run numbered below this has its entries in `dedup_keys`.
/// Equal to `next_dedup_run` unless a build that kept no key table wrote runs meanwhile (a
/// downgrade and an upgrade again): the runs from here on are indexed on open.
const DEDUP_KEYS_THROUGH: &str = "dedup_keys_through";

/// redb's page cache unless configured otherwise: 64 MiB. redb's own default (1 GiB) is most of
/// a small machine; the log in front of the B-tree makes writes independent of the cache, and
/// reads of recent history hit the operating system's page cache anyway.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

pub struct RedbStore {
    db: Arc<Database>,
    wal: Mutex<Wal>,
    applied: Arc<Applied>,
    /// Batches logged and not yet applied go to the applier thread through here.
    to_applier: Mutex<Option<mpsc::Sender<Job>>>,
    applier: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How far the applier got, shared between it, `commit` and readers.
#[derive(Default)]
struct Applied {
    state: Mutex<Progress>,
    changed: Condvar,
}

/// Most log records the applier writes in one B-tree transaction.
const MAX_APPLY_AT_ONCE: usize = 64;
/// Most log records replayed at open in one B-tree transaction: a restart after a crash replays
/// up to two segments of the log, which can be tens of thousands of small records.
const REPLAY_AT_ONCE: usize = 1024;

/// Work for the applier thread, in log order.
enum Job {
    /// Write a logged batch into the B-tree.
    Apply(u64, Arc<Batch>),
    /// Make the B-tree durable up to this seqno (everything before it is applied by then).
    Checkpoint(u64),
}

#[derive(Default)]
struct Progress {
    /// Seqno of the last batch handed to the applier.
    queued: Option<u64>,
    /// Seqno of the last batch applied.
    applied: Option<u64>,
    /// Seqno up to which the B-tree is durable.
    checkpointed: Option<u64>,
    /// Set when applying failed: the B-tree no longer follows the log (reopen to replay it).
    failed: Option<String>,
}

impl Applied {
    /// Waits until everything queued so far is applied.
    fn wait_caught_up(&self) -> Result<(), StoreError> {
        let target = self.state.lock().unwrap_or_else(|p| p.into_inner()).queued;
        self.wait_until(|s| s.applied >= target)
    }

    /// Waits until the B-tree is durable up to `seqno`.
    fn wait_checkpointed(&self, seqno: u64) -> Result<(), StoreError> {
        self.wait_until(|s| s.checkpointed >= Some(seqno))
    }

    /// Waits until `done` holds, or fails with the applier's failure.
    fn wait_until(&self, done: impl Fn(&Progress) -> bool) -> Result<(), StoreError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = &s.failed {
                return Err(applier_stopped(e));
            }
            if done(&s) {
                return Ok(());
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn is_checkpointed(&self, seqno: u64) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failed.is_none() && s.checkpointed >= Some(seqno)
    }

    /// The applier's failure, if it failed.
    fn check(&self) -> Result<(), StoreError> {
        match &self.state.lock().unwrap_or_else(|p| p.into_inner()).failed {
            Some(e) => Err(applier_stopped(e)),
            None => Ok(()),
        }
    }

    /// Records a failure and wakes everyone waiting: nothing is applied after it.
    fn fail(&self, why: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.failed.is_none() {
            s.failed = Some(why);
        }
        drop(s);
        self.changed.notify_all();
    }
}

/// Marks the applier failed if its thread ends by panicking, so that no one waits for it.
struct PanicGuard<'a>(&'a Applied);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail("the applier thread panicked".into());
        }
    }
}

impl RedbStore {
    /// Whether `dir` holds a store (its B-tree file).
    pub fn exists_in(dir: &Path) -> bool {
        dir.join("ordo.redb").exists()
    }

    /// Opens (or creates) the store file `ordo.redb` inside `dir`, creating `dir` if needed,
    /// with a page cache of [`DEFAULT_CACHE_BYTES`]. After a crash redb repairs the file on open
    /// before returning.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Like [`open`](Self::open), with redb's page cache (pages read or written, kept in memory)
    /// at most `cache_bytes`: the store's part of the server's resident memory.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let files = OsFiles {
            dir: dir.to_path_buf(),
        };
        Self::open_with_log(dir, cache_bytes, &files)
    }

    /// Like [`open_with_cache`](Self::open_with_cache), with the log's segment files in `files`
    /// rather than in `dir`: the seam crash tests put a disk under that keeps only what was
    /// synced.
    pub fn open_with_log(
        dir: &Path,
        cache_bytes: usize,
        files: &dyn LogFiles,
    ) -> Result<Self, StoreError> {
        let path = dir.join("ordo.redb");
        let open_err = |source: redb::Error| StoreError::Open {
            path: path.display().to_string(),
            source: source.into(),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.into()))?;
        if !path.try_exists().map_err(|e| open_err(e.into()))? && Wal::exists(files)? {
            let whose = match Wal::header_store_id(files)? {
                Some(id) => format!("the write-ahead log of store {id:016x}"),
                None => "a write-ahead log".to_string(),
            };
            return Err(StoreError::Corrupt {
                what: "the store's files",
                detail: format!(
                    "{} is missing, but {whose} is there ({}): the store file was deleted or moved, and starting over from the log would bring back only its last slice. Put ordo.redb back; to start an empty store here instead, move the wal-*.log files away as well",
                    path.display(),
                    files.show("wal-*.log")
                ),
            });
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| match e.into() {
                // Damage is not a permissions problem: say it is damage (redb reports a file
                // that is not a database at all as invalid data).
                redb::Error::Corrupted(d) => StoreError::Corrupt {
                    what: "the store file",
                    detail: format!("{}: {d}", path.display()),
                },
                redb::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    StoreError::Corrupt {
                        what: "the store file",
                        detail: format!(
                            "{}: {e}; keep a copy of the data directory before trying anything else",
                            path.display()
                        ),
                    }
                }
                other => open_err(other),
            })?;
        // Create every table once so that readers never meet a missing one.
        let mut tx = db.begin_write().map_err(engine)?;
        tx.set_quick_repair(true);
        let keys_indexed = has_table(&tx, DEDUP_KEYS.name())?;
        let members_indexed = has_table(&tx, MEMBERS.name())?;
        {
            tx.open_table(DEDUP_KEYS).map_err(engine)?;
            tx.open_table(MEMBERS).map_err(engine)?;
            tx.open_table(MESSAGE_RUNS).map_err(engine)?;
            tx.open_table(CONVS).map_err(engine)?;
            tx.open_table(RANGES).map_err(engine)?;
            tx.open_table(CURSORS).map_err(engine)?;
            tx.open_table(DEDUP_RUNS).map_err(engine)?;
            tx.open_table(META).map_err(engine)?;
        }
        move_messages_into_runs(&tx)?;
        move_dedup_into_runs(&tx)?;
        index_dedup_runs(&tx, keys_indexed)?;
        index_members(&tx, members_indexed)?;
        tx.commit().map_err(engine)?;
        let (mut log, due, before) = open_log(&db, &path, files)?;
        replay(&db, &due)?;
        let applied = due.last().map(|r| r.seqno).or(before);
        // Whatever the B-tree holds now becomes durable, so the log can start over.
        checkpoint(&db)?;
        log.reset(applied.map_or(0, |a| a + 1));
        let db = Arc::new(db);
        let progress = Arc::new(Applied::default());
        {
            let mut s = progress.state.lock().unwrap_or_else(|p| p.into_inner());
            s.queued = applied;
            s.applied = applied;
            s.checkpointed = applied;
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let (adb, ap) = (db.clone(), progress.clone());
        let applier = std::thread::Builder::new()
            .name("ordo-apply".into())
            .spawn(move || apply_loop(&adb, &ap, rx))
            .map_err(|e| StoreError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
        Ok(RedbStore {
            db,
            wal: Mutex::new(log),
            applied: progress,
            to_applier: Mutex::new(Some(tx)),
            applier: Mutex::new(Some(applier)),
        })
    }
}

/// Opens the log of the store in `db` and returns it with the records to replay (those after
/// what the B-tree holds) and the seqno of the last record the B-tree holds.
///
/// The store's id ([`STORE_ID`]) ties its files together: it is made with the store, written into
/// both log headers, and checked on every open. A store from a build that wrote the log format
/// without headers is upgraded here: its records are replayed and made durable first, then it
/// gets its id and a log in the current format.
fn open_log(
    db: &Database,
    path: &Path,
    files: &dyn LogFiles,
) -> Result<(Wal, Vec<wal::Record>, Option<u64>), StoreError> {
    let id = meta_get(db, STORE_ID)?;
    if id.is_none() {
        if let Some(id) = Wal::header_store_id(files)? {
            return Err(StoreError::Corrupt {
                what: "the store's files",
                detail: format!(
                    "{} has no store id, but the write-ahead log beside it belongs to store {id:016x}: the store file was replaced (by one of an earlier build, or from elsewhere). Put the store's own ordo.redb back",
                    path.display()
                ),
            });
        }
    }
    // A new store, one an earlier build wrote, or one an earlier build wrote to after this one
    // (a downgrade and an upgrade again): replay its log as that build would have (only the run
    // that follows what the B-tree holds), make it durable, and make the log anew.
    if id.is_none() || Wal::written_in_format_1(files)? {
        let applied = meta_get(db, WAL_APPLIED)?;
        let old = Wal::read_format_1(files)?;
        let found = old.len();
        let mut due: Vec<wal::Record> = Vec::new();
        for r in old {
            let next = due
                .last()
                .map_or(applied.map_or(0, |a| a + 1), |l| l.seqno + 1);
            if r.seqno < next {
                continue;
            }
            if r.seqno > next {
                tracing::warn!(
                    after = next.saturating_sub(1),
                    "the log of an earlier build has records past a gap; that build would not have replayed them either"
                );
                break;
            }
            due.push(r);
        }
        if found > 0 {
            tracing::info!(
                records = due.len(),
                "upgrading a log written by an earlier build"
            );
        }
        replay(db, &due)?;
        let id = id.unwrap_or_else(|| loop {
            let id = rand::random::<u64>();
            if id != 0 {
                break id;
            }
        });
        meta_set(db, &[(STORE_ID, id), (LOG_MADE, 0)])?;
    }
    let store_id = meta_get(db, STORE_ID)?.unwrap_or_default();
    if meta_get(db, LOG_MADE)? != Some(1) {
        // Nothing can have been logged for this id yet: make the log (again, after a crash
        // half-way through making it), then record that it exists.
        Wal::create(files, store_id)?;
        meta_set(db, &[(LOG_MADE, 1)])?;
    }
    let before = meta_get(db, WAL_APPLIED)?;
    let (log, due) = Wal::open(files, store_id, before)?;
    Ok((log, due, before))
}

/// Gives every conversation a new epoch (random, non-zero, below 2^53, never its old one), a
/// slice of conversations per durable transaction (so that memory stays bounded however many
/// there are): for `ordo store salvage`, after history may have been lost where no record says
/// which conversations it was in. Returns how many conversations there are. Cut short, it is
/// run again whole (a second new epoch is as good as the first).
pub(crate) fn move_epochs(db: &Database) -> Result<u64, StoreError> {
    const SLICE: usize = 10_000;
    let mut moved = 0;
    let mut after: Option<String> = None;
    loop {
        let mut tx = db.begin_write().map_err(engine)?;
        tx.set_durability(Durability::Immediate).map_err(engine)?;
        tx.set_quick_repair(true);
        let mut records = Vec::new();
        {
            let mut convs = tx.open_table(CONVS).map_err(engine)?;
            let rows = match after.as_deref() {
                Some(a) => {
                    convs.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                }
                None => convs.range::<&str>(..),
            }
            .map_err(engine)?;
            for row in rows.take(SLICE) {
                let (k, v) = row.map_err(engine)?;
                let rec: ConvRecord = decode("conversation", k.value(), v.value())?;
                records.push(rec);
            }
            for rec in &mut records {
                let old = rec.epoch;
                rec.epoch = loop {
                    let e = rand::random::<u64>() & ((1 << 53) - 1);
                    if e != 0 && e != old {
                        break e;
                    }
                };
                convs
                    .insert(rec.id.as_str(), encode(&*rec)?.as_slice())
                    .map_err(engine)?;
            }
        }
        tx.commit().map_err(engine)?;
        moved += records.len() as u64;
        match records.pop() {
            Some(last) if records.len() + 1 == SLICE => after = Some(last.id),
            _ => return Ok(moved),
        }
    }
}

/// A value of the `meta` table.
pub(crate) fn meta_get(db: &Database, key: &str) -> Result<Option<u64>, StoreError> {
    let tx = db.begin_read().map_err(engine)?;
    let meta = tx.open_table(META).map_err(engine)?;
    let v = meta.get(key).map_err(engine)?;
    Ok(v.map(|g| g.value()))
}

/// Sets values of the `meta` table, durably (with everything applied before).
fn meta_set(db: &Database, values: &[(&str, u64)]) -> Result<(), StoreError> {
    let mut tx = db.begin_write().map_err(engine)?;
    tx.set_durability(Durability::Immediate).map_err(engine)?;
    tx.set_quick_repair(true);
    {
        let mut meta = tx.open_table(META).map_err(engine)?;
        for (k, v) in values {
            meta.insert(*k, *v).map_err(engine)?;
        }
    }
    tx.commit().map_err(engine)?;
    Ok(())
}

/// Applies log records left by the last run to the B-tree (not durably: the caller checkpoints).
pub(crate) fn replay(db: &Database, due: &[wal::Record]) -> Result<(), StoreError> {
    // Many records per transaction, as the applier does; a chunk that fails is applied again
    // record by record (nothing of it was committed), to name the record that fails.
    for chunk in due.chunks(REPLAY_AT_ONCE) {
        let batches: Vec<&Batch> = chunk.iter().map(|r| &r.batch).collect();
        let last = chunk.last().map(|r| r.seqno);
        if apply(db, &batches, last, Durability::None).is_ok() {
            continue;
        }
        for r in chunk {
            apply(db, &[&r.batch], Some(r.seqno), Durability::None).map_err(|e| match e {
                    // Damage met while replaying: say which acknowledged batch it stops.
                    StoreError::Corrupt { detail, .. } => StoreError::Corrupt {
                        what: "write-ahead log replay",
                        detail: format!(
                            "log record {} (a batch that was acknowledged) cannot be applied: {detail}; keep a copy of the data directory before trying anything else",
                            r.seqno
                        ),
                    },
                    // A failed write or a full disk is not damage: fix it and start again.
                    other => StoreError::Engine {
                        context: format!(
                            "replaying log record {} (a batch that was acknowledged); fix the cause and start the server again",
                            r.seqno
                        ),
                        source: Box::new(other),
                    },
                })?;
        }
    }
    if !due.is_empty() {
        tracing::info!(
            records = due.len(),
            "applied write-ahead log records left by the last run"
        );
    }
    Ok(())
}

/// The applier thread: writes logged batches into the B-tree, in log order, and checkpoints.
/// It stops at the first failure: applying anything after a batch that did not apply would
/// record the B-tree as further along the log than it is.
fn apply_loop(db: &Database, progress: &Applied, jobs: mpsc::Receiver<Job>) {
    let _guard = PanicGuard(progress);
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => match jobs.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let (seqno, is_checkpoint, result) = match job {
            Job::Apply(seqno, batch) => {
                // Whatever else is already queued goes into the same transaction (up to a
                // point): one B-tree commit for many log records.
                let mut batches = vec![batch];
                let mut last = seqno;
                while batches.len() < MAX_APPLY_AT_ONCE {
                    match jobs.try_recv() {
                        Ok(Job::Apply(s, b)) => {
                            batches.push(b);
                            last = s;
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let refs: Vec<&Batch> = batches.iter().map(|b| &**b).collect();
                (
                    last,
                    false,
                    apply(db, &refs, Some(last), Durability::None).map(|_| ()),
                )
            }
            Job::Checkpoint(seqno) => (seqno, true, checkpoint(db)),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, seqno, "cannot apply the write-ahead log to the B-tree");
            progress.fail(format!("log record {seqno}: {e}"));
            return;
        }
        let mut s = progress.state.lock().unwrap_or_else(|p| p.into_inner());
        if is_checkpoint {
            s.checkpointed = Some(seqno);
        } else {
            s.applied = Some(seqno);
        }
        drop(s);
        progress.changed.notify_all();
    }
}

impl RedbStore {
    fn queue(&self, job: Job) -> Result<(), StoreError> {
        let sent = self
            .to_applier
            .lock()
            .ok()
            .and_then(|tx| tx.as_ref().map(|tx| tx.send(job).is_ok()));
        if sent == Some(true) {
            Ok(())
        } else {
            let why = "the applier thread has stopped".to_string();
            // Whoever waits for what was just queued must not wait for ever.
            self.applied.fail(why.clone());
            Err(applier_stopped(&why))
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Let the applier finish what is queued, then make the B-tree durable: a clean stop
        // leaves it current and the log with nothing to replay (so even a build that cannot
        // read this log's format loses nothing after a clean stop).
        if let Ok(mut tx) = self.to_applier.lock() {
            tx.take();
        }
        if let Some(h) = self.applier.lock().ok().and_then(|mut h| h.take()) {
            let _ = h.join();
        }
        if self.applied.check().is_ok() {
            if let Err(e) = checkpoint(&self.db) {
                tracing::warn!(error = %e, "cannot checkpoint the store as it closes; the next start replays the log");
            }
        }
    }
}

/// Makes every commit so far durable: an empty write transaction with immediate durability.
///
/// Every durable commit saves redb's allocator state (quick repair): after a crash, redb opens
/// from the last durable commit without walking the whole file to rebuild it, so that a restart
/// takes about as long with ten million stored messages as with none.
pub(crate) fn checkpoint(db: &Database) -> Result<(), StoreError> {
    let mut tx = db.begin_write().map_err(engine)?;
    tx.set_durability(Durability::Immediate).map_err(engine)?;
    tx.set_quick_repair(true);
    tx.commit().map_err(engine)?;
    Ok(())
}

/// Decodes the record of kind `what` stored under `key`; a record that does not decode is
/// damage, named by table row: "ordo.redb, <what> at <key>: <why>".
fn decode<T: DeserializeOwned>(
    what: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what,
        detail: format!("{}, {what} at {key}: {e}", crate::error::FILE),
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec_named(v).map_err(encoding)
}

/// Encodes `v` into `buf`, replacing what it held: the runs written per batch reuse one buffer
/// instead of growing a new one each.
fn encode_into<'b, T: serde::Serialize>(
    buf: &'b mut Vec<u8>,
    v: &T,
) -> Result<&'b [u8], StoreError> {
    buf.clear();
    rmp_serde::encode::write_named(buf, v).map_err(encoding)?;
    Ok(buf)
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let mut snap = Snapshot::default();
        // Runs are keyed by their newest entry's time first: the last holds the newest.
        let dedup = tx.open_table(DEDUP_RUNS).map_err(engine)?;
        if let Some((k, _)) = dedup.last().map_err(engine)? {
            snap.last_ts = k.value().0;
        }
        Ok(snap)
    }

    fn load_convs(&self, ids: &[String]) -> Result<Vec<Option<ConvState>>, StoreError> {
        // Everything reported durable before this call is in the B-tree first.
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let convs = tx.open_table(CONVS).map_err(engine)?;
        let ranges = tx.open_table(RANGES).map_err(engine)?;
        let cursors = tx.open_table(CURSORS).map_err(engine)?;
        ids.iter()
            .map(|id| load_conv(&convs, &ranges, &cursors, id))
            .collect()
    }

    fn member_convs(&self, ask: &MemberPageAsk) -> Result<MemberPage, StoreError> {
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let convs = tx.open_table(CONVS).map_err(engine)?;
        let ranges = tx.open_table(RANGES).map_err(engine)?;
        let cursors = tx.open_table(CURSORS).map_err(engine)?;
        let members = tx.open_table(MEMBERS).map_err(engine)?;
        let user = ask.user.as_str();
        let start = (user, ask.after.as_deref().unwrap_or(""));
        let ids = members
            .range(start..)
            .map_err(engine)?
            .map(|row| {
                row.map_err(engine).map(|(k, _)| {
                    let (u, conv) = k.value();
                    (u == user).then(|| conv.to_string())
                })
            })
            .map_while(|row| row.transpose());
        // The record is the truth (the index may name a group the user has left only if an
        // older build changed it; see `MEMBERS`): `collect` keeps only records naming the user.
        MemberPage::collect(ask, ids, |id| load_conv(&convs, &ranges, &cursors, id))
    }

    fn groups(&self, after: Option<&str>, limit: usize) -> Result<GroupPage, StoreError> {
        let limit = limit.clamp(1, MAX_GROUPS_LIMIT);
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let convs = tx.open_table(CONVS).map_err(engine)?;
        let ranges = tx.open_table(RANGES).map_err(engine)?;
        // Direct conversations (`d_...`, maybe millions) are one block of keys: jumped over,
        // not read. `d`` is the first key after every `d_...`.
        let past_direct = format!("{}`", &DIRECT_PREFIX[..DIRECT_PREFIX.len() - 1]);
        let mut start = after.unwrap_or("").to_string();
        let mut skip_start = after.is_some();
        let mut records = Vec::new();
        let mut members = 0;
        'scan: loop {
            for row in convs.range(start.as_str()..).map_err(engine)? {
                let (k, v) = row.map_err(engine)?;
                let id = k.value();
                if std::mem::take(&mut skip_start) && id == start {
                    continue;
                }
                if id.starts_with(DIRECT_PREFIX) {
                    start.clone_from(&past_direct);
                    continue 'scan;
                }
                let mut rec: ConvRecord = decode("conversation", id, v.value())?;
                if rec.kind != ConvKind::Group || rec.deleted {
                    continue;
                }
                if let Some(r) = ranges.get(id).map_err(engine)? {
                    let (max_seq, first_seq) = r.value();
                    rec.max_seq = rec.max_seq.max(max_seq);
                    rec.first_seq = rec.first_seq.max(first_seq);
                }
                members += rec.members.len();
                records.push(Ok(rec));
                // Enough for `collect` to cut the page and know that more follow.
                if records.len() > limit || (members > MAX_GROUP_PAGE_MEMBERS && records.len() > 1)
                {
                    break 'scan;
                }
            }
            break;
        }
        GroupPage::collect(limit, records)
    }

    fn commit(&self, batch: Arc<Batch>) -> Result<CommitOutcome, StoreError> {
        if batch.is_empty() {
            return Ok(CommitOutcome::default());
        }
        // A poisoned lock means an earlier commit failed half-way: the server stops on the
        // first failure, so carry on with the log as it is (its state is on disk).
        let mut log = self.wal.lock().unwrap_or_else(|p| p.into_inner());
        // After the applier failed, nothing more is acknowledged: the server stops.
        self.applied.check()?;
        let len = log.encode(&batch)?;
        if !Wal::fits_empty(len) {
            // Larger than a whole log segment: commit it to the B-tree directly, synced.
            self.applied.wait_caught_up()?;
            let applied = log.next_seqno().checked_sub(1);
            return apply(&self.db, &[&batch], applied, Durability::Immediate);
        }
        let must_switch = !log.fits(len);
        if must_switch || log.active_used() >= wal::SWITCH_BYTES {
            // The other segment may be written over once the B-tree is durable up to its end;
            // wait for that only if this segment is full.
            let other = log.other_last();
            let free = other.is_none_or(|l| self.applied.is_checkpointed(l));
            if must_switch && !free {
                if let Some(l) = other {
                    self.applied.wait_checkpointed(l)?;
                }
            }
            if free || must_switch {
                if let Some(left) = log.switch() {
                    self.queue(Job::Checkpoint(left))?;
                }
            }
        }
        let seqno = log.append()?;
        let outcome = if batch.trim_before_ms.is_empty() {
            self.applied
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .queued = Some(seqno);
            self.queue(Job::Apply(seqno, batch))?;
            CommitOutcome::default()
        } else {
            // Its outcome comes from what is stored: apply it here, after everything before it.
            self.applied.wait_caught_up()?;
            let outcome = apply(&self.db, &[&batch], Some(seqno), Durability::None)?;
            let mut s = self.applied.state.lock().unwrap_or_else(|p| p.into_inner());
            s.queued = Some(seqno);
            s.applied = Some(seqno);
            outcome
        };
        Ok(outcome)
    }

    fn read_page(
        &self,
        conv: &str,
        from: u64,
        to: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        // Everything reported durable before this read was asked for is in the B-tree first.
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let convs = tx.open_table(CONVS).map_err(engine)?;
        let ranges = tx.open_table(RANGES).map_err(engine)?;
        let Some((_, first_seq)) = stored_range(&convs, &ranges, conv)? else {
            return Ok(Page::default());
        };
        let (mut fill, start) = match PageFill::start(first_seq, from, to, limit, max_bytes) {
            Ok(f) => f,
            Err(empty) => return Ok(empty),
        };
        let runs = tx.open_table(MESSAGE_RUNS).map_err(engine)?;
        // The first run that ends at or after `start` holds it (or the next message after it).
        'runs: for row in runs
            .range((conv, start)..=(conv, u64::MAX))
            .map_err(engine)?
        {
            let (k, v) = row.map_err(engine)?;
            let (c, last) = k.value();
            let run: Vec<Message> = decode("message run", format!("({c}, {last})"), v.value())?;
            for m in run {
                if m.seq < start {
                    continue;
                }
                if m.seq > to || fill.push(m) {
                    break 'runs;
                }
            }
        }
        Ok(fill.finish())
    }

    fn expired(&self, sweep: &AgeSweep) -> Result<Expired, StoreError> {
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let convs = tx.open_table(CONVS).map_err(engine)?;
        let ranges = tx.open_table(RANGES).map_err(engine)?;
        let runs = tx.open_table(MESSAGE_RUNS).map_err(engine)?;
        let max = sweep.max_convs.max(1) as usize;
        let mut out = Expired::default();
        let mut covered = 0;
        let from = sweep.after.as_deref().unwrap_or("");
        for row in convs.range(from..).map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let id = k.value();
            if sweep.after.as_deref() == Some(id) {
                continue;
            }
            if covered >= max {
                break;
            }
            covered += 1;
            if covered == max {
                out.swept_to = Some(id.to_string());
            }
            let rec: ConvRecord = decode("conversation", id, v.value())?;
            let Some(age) = rec.retention.max_age_ms.or(sweep.default_max_age_ms) else {
                continue;
            };
            let cutoff = sweep.now_ms.saturating_sub(age);
            let first_seq = match ranges.get(id).map_err(engine)? {
                Some(r) => r.value().1.max(rec.first_seq),
                None => rec.first_seq,
            };
            // The oldest message still served is in the first run that reaches `first_seq`.
            let Some(row) = runs
                .range((id, first_seq)..=(id, u64::MAX))
                .map_err(engine)?
                .next()
            else {
                continue;
            };
            let (rk, rv) = row.map_err(engine)?;
            let at = format!("({id}, {})", rk.value().1);
            let run: Vec<Message> = decode("message run", at, rv.value())?;
            if run.iter().any(|m| m.seq >= first_seq && m.ts < cutoff) {
                out.trims.push((id.to_string(), cutoff));
            }
        }
        Ok(out)
    }

    fn dedup_lookup(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<DedupRecord>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Every batch whose commit returned is in the B-tree first.
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let table = tx.open_table(DEDUP_KEYS).map_err(engine)?;
        keys.iter()
            .map(|(user, cmid)| {
                let found = table.get((user.as_str(), cmid.as_str())).map_err(engine)?;
                Ok(found.map(|v| {
                    let (conv, seq, ts) = v.value();
                    DedupRecord {
                        user: user.clone(),
                        cmid: cmid.clone(),
                        conv: conv.to_string(),
                        seq,
                        ts,
                    }
                }))
            })
            .collect()
    }

    fn dedup_scan(&self, from: Option<ScanFrom>, max: usize) -> Result<DedupScan, StoreError> {
        let after = match from {
            None => None,
            Some(ScanFrom(raw)) => {
                let at: [u8; 16] = raw.as_slice().try_into().map_err(|_| StoreError::Engine {
                    context: "dedup scan".into(),
                    source: format!(
                        "a scan position of {} bytes that this store did not make",
                        raw.len()
                    )
                    .into(),
                })?;
                let (time, run) = at.split_at(8);
                Some((
                    u64::from_be_bytes(time.try_into().unwrap_or_default()),
                    u64::from_be_bytes(run.try_into().unwrap_or_default()),
                ))
            }
        };
        self.applied.wait_caught_up()?;
        let tx = self.db.begin_read().map_err(engine)?;
        let runs = tx.open_table(DEDUP_RUNS).map_err(engine)?;
        let range = match after {
            None => runs.range::<(u64, u64)>(..),
            Some(a) => runs.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
        }
        .map_err(engine)?;
        let mut scan = DedupScan::default();
        let mut last = None;
        for row in range {
            if scan.entries.len() >= max.max(1) {
                // More remain: go on after the last run listed.
                scan.next = last.map(|(time, run): (u64, u64)| {
                    let mut at = time.to_be_bytes().to_vec();
                    at.extend_from_slice(&run.to_be_bytes());
                    ScanFrom(at)
                });
                break;
            }
            let (k, v) = row.map_err(engine)?;
            let (time, run) = k.value();
            let at = format!("(time {time}, run {run})");
            scan.entries
                .extend(decode::<Vec<DedupRecord>>("dedup run", at, v.value())?);
            last = Some((time, run));
        }
        Ok(scan)
    }
}

/// Writes `batches`, in order, into the B-tree in one transaction with `durability`, recording
/// `seqno` as the last log record applied.
fn apply(
    db: &Database,
    batches: &[&Batch],
    seqno: Option<u64>,
    durability: Durability,
) -> Result<CommitOutcome, StoreError> {
    let mut outcome = CommitOutcome::default();
    let mut tx = db.begin_write().map_err(engine)?;
    tx.set_durability(durability).map_err(engine)?;
    // A durable commit saves the allocator state, as a checkpoint does.
    tx.set_quick_repair(!matches!(durability, Durability::None));
    let mut meta = tx.open_table(META).map_err(engine)?;
    if let Some(seqno) = seqno {
        meta.insert(WAL_APPLIED, seqno).map_err(engine)?;
        meta.insert(MEMBERS_THROUGH, seqno).map_err(engine)?;
    }
    let mut scratch = Vec::new();
    // Each table opened once for all the batches (a replay applies a thousand at a time).
    let mut runs = tx.open_table(MESSAGE_RUNS).map_err(engine)?;
    let mut convs = tx.open_table(CONVS).map_err(engine)?;
    let mut ranges = tx.open_table(RANGES).map_err(engine)?;
    let mut cursors = tx.open_table(CURSORS).map_err(engine)?;
    let mut dedup = tx.open_table(DEDUP_RUNS).map_err(engine)?;
    let mut keys = tx.open_table(DEDUP_KEYS).map_err(engine)?;
    let mut members = tx.open_table(MEMBERS).map_err(engine)?;
    let stored_forget = meta.get(FORGET_BEFORE).map_err(engine)?.map(|g| g.value());
    let mut forget_before = stored_forget;
    let mut forget_budget = FORGET_RUNS_AT_ONCE;
    for batch in batches {
        for run in message_runs(&batch.messages) {
            if let Some(last) = run.last() {
                runs.insert(
                    (last.conv.as_str(), last.seq),
                    encode_into(&mut scratch, &run)?,
                )
                .map_err(engine)?;
            }
        }
        for (conv, below) in &batch.trim_below {
            runs.retain_in((conv.as_str(), 0)..(conv.as_str(), *below), |_, _| false)
                .map_err(engine)?;
            drop_run_head(&mut runs, conv, *below)?;
        }
        for c in &batch.convs {
            let old = convs
                .insert(c.id.as_str(), encode(c)?.as_slice())
                .map_err(engine)?
                .map(|g| decode::<ConvRecord>("conversation", &c.id, g.value()))
                .transpose()?;
            index_record(&mut members, old.as_ref(), c)?;
            raise_range(&mut ranges, &c.id, c.max_seq, c.first_seq)?;
        }
        for p in &batch.positions {
            raise_range(&mut ranges, &p.id, p.max_seq, p.first_seq)?;
        }
        for (conv, cutoff) in &batch.trim_before_ms {
            if let Some(first) = trim_before(&mut runs, &convs, &mut ranges, conv, *cutoff)? {
                outcome.first_seqs.push((conv.clone(), first));
            }
        }
        for c in &batch.cursors {
            cursors
                .insert(
                    (c.conv.as_str(), c.user.as_str(), c.device.as_str()),
                    (c.delivered, c.read),
                )
                .map_err(engine)?;
        }
        // Forgetting first; what this batch puts is newer than the cutoff anyway. (Log records
        // of earlier versions name expired entries in `dedup_delete`: those entries are in runs
        // now and are forgotten with them.)
        forget_before = forget_before.max(batch.dedup_forget_before_ms);
        if let Some(before) = forget_before {
            if forget_dedup_runs(&mut dedup, &mut keys, before, &mut forget_budget)? {
                forget_before = None;
            }
        }
        // Every message is its own dedup entry; `dedup_put` holds any others.
        let entries: Vec<DedupView> = (batch.dedup_put.iter().map(DedupView::record))
            .chain(batch.messages.iter().map(|m| DedupView::message(m)))
            .collect();
        put_dedup_runs(&mut meta, &mut dedup, &entries, &mut scratch)?;
        // In key order, so that neighbouring inserts share B-tree pages (for a key given twice,
        // the later entry is inserted last and stays).
        let mut by_key: Vec<&DedupView> = entries.iter().collect();
        by_key.sort_by(|a, b| (a.user, a.cmid).cmp(&(b.user, b.cmid)));
        for d in by_key {
            keys.insert((d.user, d.cmid), (d.conv, d.seq, d.ts))
                .map_err(engine)?;
        }
    }
    if forget_before != stored_forget {
        match forget_before {
            Some(before) => meta.insert(FORGET_BEFORE, before).map_err(engine)?,
            None => meta.remove(FORGET_BEFORE).map_err(engine)?,
        };
    }
    drop((runs, convs, ranges, cursors, dedup, keys, members, meta));
    tx.commit().map_err(engine)?;
    Ok(outcome)
}

/// Removes `conv`'s messages accepted before `cutoff`; its new first seq if that moved.
fn trim_before(
    runs: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    convs: &impl ReadableTable<&'static str, &'static [u8]>,
    ranges: &mut redb::Table<&'static str, (u64, u64)>,
    conv: &str,
    cutoff: u64,
) -> Result<Option<u64>, StoreError> {
    // Acceptance times only grow along a conversation: whole runs older than the cutoff go,
    // and the first newer message is the new first seq.
    let mut doomed = Vec::new();
    let mut first = None;
    for row in runs.range((conv, 0)..=(conv, u64::MAX)).map_err(engine)? {
        let (k, v) = row.map_err(engine)?;
        let at = format!("({conv}, {})", k.value().1);
        let run: Vec<Message> = decode("message run", at, v.value())?;
        if let Some(m) = run.iter().find(|m| m.ts >= cutoff) {
            first = Some(m.seq);
            break;
        }
        doomed.push(k.value().1);
    }
    for last in &doomed {
        runs.remove((conv, *last)).map_err(engine)?;
    }
    if let Some(first) = first {
        drop_run_head(runs, conv, first)?;
    }
    let Some((max_seq, first_seq)) = stored_range(convs, ranges, conv)? else {
        return Ok(None);
    };
    let new_first = first.unwrap_or(max_seq + 1).max(first_seq);
    if new_first <= first_seq {
        return Ok(None);
    }
    raise_range(ranges, conv, max_seq, new_first)?;
    Ok(Some(new_first))
}

/// One conversation's record (with its stored range) and device positions.
fn load_conv(
    convs: &impl ReadableTable<&'static str, &'static [u8]>,
    ranges: &impl ReadableTable<&'static str, (u64, u64)>,
    cursors: &impl ReadableTable<(&'static str, &'static str, &'static str), (u64, u64)>,
    id: &str,
) -> Result<Option<ConvState>, StoreError> {
    let Some(raw) = convs.get(id).map_err(engine)? else {
        return Ok(None);
    };
    let mut rec: ConvRecord = decode("conversation", id, raw.value())?;
    if let Some(r) = ranges.get(id).map_err(engine)? {
        let (max_seq, first_seq) = r.value();
        rec.max_seq = rec.max_seq.max(max_seq);
        rec.first_seq = rec.first_seq.max(first_seq);
    }
    let mut out = Vec::new();
    for row in cursors.range((id, "", "")..).map_err(engine)? {
        let (k, v) = row.map_err(engine)?;
        let (conv, user, device) = k.value();
        if conv != id {
            break;
        }
        let (delivered, read) = v.value();
        out.push(CursorRecord {
            conv: conv.to_string(),
            user: user.to_string(),
            device: device.to_string(),
            delivered,
            read,
        });
    }
    Ok(Some(ConvState { rec, cursors: out }))
}

/// Keeps [`MEMBERS`] in step with a conversation record written over `old`.
fn index_record(
    members: &mut redb::Table<(&'static str, &'static str), ()>,
    old: Option<&ConvRecord>,
    new: &ConvRecord,
) -> Result<(), StoreError> {
    let none = BTreeSet::new();
    let before = old.map_or(&none, |o| &o.members);
    for u in before.difference(&new.members) {
        members
            .remove((u.as_str(), new.id.as_str()))
            .map_err(engine)?;
    }
    for u in new.members.difference(before) {
        members
            .insert((u.as_str(), new.id.as_str()), ())
            .map_err(engine)?;
    }
    Ok(())
}

/// Builds [`MEMBERS`] from the conversation records if it was missing (`had_table` false: a
/// store from before the table) or another build applied log records since it was last
/// current ([`MEMBERS_THROUGH`] behind `wal_applied`: a build without the table may have
/// created groups or changed their members).
fn index_members(tx: &redb::WriteTransaction, had_table: bool) -> Result<(), StoreError> {
    let convs = tx.open_table(CONVS).map_err(engine)?;
    let mut meta = tx.open_table(META).map_err(engine)?;
    let get = |key: &str| -> Result<Option<u64>, StoreError> {
        Ok(meta.get(key).map_err(engine)?.map(|g| g.value()))
    };
    let applied = get(WAL_APPLIED)?;
    if had_table && get(MEMBERS_THROUGH)? == applied {
        return Ok(());
    }
    let mut members = tx.open_table(MEMBERS).map_err(engine)?;
    members.retain(|_, _| false).map_err(engine)?;
    let mut count = 0u64;
    for row in convs.iter().map_err(engine)? {
        let (k, v) = row.map_err(engine)?;
        let rec: ConvRecord = decode("conversation", k.value(), v.value())?;
        for u in &rec.members {
            members
                .insert((u.as_str(), rec.id.as_str()), ())
                .map_err(engine)?;
        }
        count += 1;
    }
    if let Some(applied) = applied {
        meta.insert(MEMBERS_THROUGH, applied).map_err(engine)?;
    }
    if count > 0 {
        tracing::info!(
            conversations = count,
            "indexed conversation members by user"
        );
    }
    Ok(())
}

/// A conversation's (max_seq, first_seq) as stored; `None` if there is no such conversation.
fn stored_range(
    convs: &impl ReadableTable<&'static str, &'static [u8]>,
    ranges: &impl ReadableTable<&'static str, (u64, u64)>,
    conv: &str,
) -> Result<Option<(u64, u64)>, StoreError> {
    let Some(raw) = convs.get(conv).map_err(engine)? else {
        return Ok(None);
    };
    if let Some(r) = ranges.get(conv).map_err(engine)? {
        return Ok(Some(r.value()));
    }
    let rec: ConvRecord = decode("conversation", conv, raw.value())?;
    Ok(Some((rec.max_seq, rec.first_seq)))
}

/// Moves a conversation's stored range up to (`max_seq`, `first_seq`); it never moves back.
fn raise_range(
    ranges: &mut redb::Table<&'static str, (u64, u64)>,
    conv: &str,
    max_seq: u64,
    first_seq: u64,
) -> Result<(), StoreError> {
    let old = ranges.get(conv).map_err(engine)?.map(|g| g.value());
    let new = old.map_or((max_seq, first_seq), |(m, f)| {
        (m.max(max_seq), f.max(first_seq))
    });
    if old != Some(new) {
        ranges.insert(conv, new).map_err(engine)?;
    }
    Ok(())
}

/// The batch's messages as runs: per conversation, consecutive seqs, at most [`RUN_MAX`] each.
fn message_runs(messages: &[Arc<Message>]) -> Vec<Vec<&Message>> {
    let mut by_conv: std::collections::BTreeMap<&str, Vec<&Message>> = Default::default();
    for m in messages {
        by_conv.entry(m.conv.as_str()).or_default().push(m);
    }
    let mut runs = Vec::new();
    for (_, msgs) in by_conv {
        let mut run: Vec<&Message> = Vec::new();
        let mut bytes = 0;
        for m in msgs {
            let follows = run.last().is_some_and(|p| p.seq + 1 == m.seq);
            if !run.is_empty() && (!follows || run.len() >= RUN_MAX || bytes >= RUN_MAX_BYTES) {
                runs.push(std::mem::take(&mut run));
                bytes = 0;
            }
            bytes += m.body.len();
            run.push(m);
        }
        if !run.is_empty() {
            runs.push(run);
        }
    }
    runs
}

/// Whether the store has a table of this name (the layouts before runs had other tables).
fn has_table(tx: &redb::WriteTransaction, name: &str) -> Result<bool, StoreError> {
    Ok(tx.list_tables().map_err(engine)?.any(|t| t.name() == name))
}

/// Moves messages stored one row each (the layout before runs) into runs of one, in the same
/// transaction as the rest of opening, and drops the old table.
fn move_messages_into_runs(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    if !has_table(tx, MESSAGES_BY_SEQ.name())? {
        return Ok(());
    }
    {
        let old = tx.open_table(MESSAGES_BY_SEQ).map_err(engine)?;
        let mut runs = tx.open_table(MESSAGE_RUNS).map_err(engine)?;
        let mut moved = 0u64;
        for row in old.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let (c, seq) = k.value();
            let m: Message = decode("message", format!("({c}, {seq})"), v.value())?;
            runs.insert((m.conv.as_str(), m.seq), encode(&[&m])?.as_slice())
                .map_err(engine)?;
            moved += 1;
        }
        tracing::info!(
            messages = moved,
            "moved stored messages into the run layout"
        );
    }
    tx.delete_table(MESSAGES_BY_SEQ).map_err(engine)?;
    Ok(())
}

/// A dedup entry as stored: [`DedupRecord`]'s fields, borrowed from a message or a record.
#[derive(serde::Serialize)]
struct DedupView<'a> {
    user: &'a str,
    cmid: &'a str,
    conv: &'a str,
    seq: u64,
    ts: u64,
}

impl<'a> DedupView<'a> {
    fn record(d: &'a DedupRecord) -> Self {
        DedupView {
            user: &d.user,
            cmid: &d.cmid,
            conv: &d.conv,
            seq: d.seq,
            ts: d.ts,
        }
    }

    fn message(m: &'a Message) -> Self {
        DedupView {
            user: &m.from,
            cmid: &m.cmid,
            conv: &m.conv,
            seq: m.seq,
            ts: m.ts,
        }
    }
}

/// Stores `entries` as dedup runs of at most [`RUN_MAX`], numbered from the `meta` counter.
fn put_dedup_runs(
    meta: &mut redb::Table<&'static str, u64>,
    dedup: &mut redb::Table<(u64, u64), &[u8]>,
    entries: &[DedupView],
    scratch: &mut Vec<u8>,
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut next = meta
        .get(NEXT_DEDUP_RUN)
        .map_err(engine)?
        .map_or(0, |g| g.value());
    for run in entries.chunks(RUN_MAX) {
        let newest = run.iter().map(|d| d.ts).max().unwrap_or(0);
        dedup
            .insert((newest, next), encode_into(scratch, &run)?)
            .map_err(engine)?;
        next += 1;
    }
    meta.insert(NEXT_DEDUP_RUN, next).map_err(engine)?;
    // Its caller indexes these entries by key in the same transaction.
    meta.insert(DEDUP_KEYS_THROUGH, next).map_err(engine)?;
    Ok(())
}

/// Forgets the dedup runs whose newest entry was accepted before `before`, and the key of each
/// of their entries unless a newer entry of that key replaced it, at most `budget` runs (which
/// it counts down). Run by run, oldest first, so that memory holds one run (at most
/// [`RUN_MAX`] entries) at a time. True once no run older than `before` is left.
fn forget_dedup_runs(
    dedup: &mut redb::Table<(u64, u64), &[u8]>,
    keys: &mut redb::Table<(&str, &str), (&str, u64, u64)>,
    before: u64,
    budget: &mut usize,
) -> Result<bool, StoreError> {
    loop {
        let oldest = dedup
            .first()
            .map_err(engine)?
            .map(|(k, v)| (k.value(), v.value().to_vec()));
        let Some(((time, run), raw)) = oldest else {
            return Ok(true);
        };
        if time >= before {
            return Ok(true);
        }
        if *budget == 0 {
            return Ok(false);
        }
        *budget -= 1;
        let at = format!("(time {time}, run {run})");
        for d in decode::<Vec<DedupRecord>>("dedup run", at, &raw)? {
            let key = (d.user.as_str(), d.cmid.as_str());
            let same = keys
                .get(key)
                .map_err(engine)?
                .is_some_and(|v| v.value() == (d.conv.as_str(), d.seq, d.ts));
            if same {
                keys.remove(key).map_err(engine)?;
            }
        }
        dedup.remove((time, run)).map_err(engine)?;
    }
}

/// Builds the key table's entries for the runs that lack them, oldest first (a newer entry of a
/// key replaces an older one, never the other way): every run if the store had no key table
/// (`indexed` false), else the runs from `dedup_keys_through` on, written by a build that kept
/// none. Then records that every run is indexed.
fn index_dedup_runs(tx: &redb::WriteTransaction, indexed: bool) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META).map_err(engine)?;
    let next = meta.get(NEXT_DEDUP_RUN).map_err(engine)?.map(|g| g.value());
    let through = meta
        .get(DEDUP_KEYS_THROUGH)
        .map_err(engine)?
        .map(|g| g.value());
    let from = match (indexed, through) {
        (false, _) => 0,
        (true, Some(t)) if Some(t) == next => return Ok(()),
        (true, Some(t)) => t,
        // A key table from before the marker: index every run again (harmless).
        (true, None) => 0,
    };
    let runs = tx.open_table(DEDUP_RUNS).map_err(engine)?;
    let mut keys = tx.open_table(DEDUP_KEYS).map_err(engine)?;
    let mut entries = Vec::new();
    for row in runs.iter().map_err(engine)? {
        let (k, v) = row.map_err(engine)?;
        let (time, run) = k.value();
        if run < from {
            continue;
        }
        let at = format!("(time {time}, run {run})");
        entries.extend(decode::<Vec<DedupRecord>>("dedup run", at, v.value())?);
    }
    entries.sort_by_key(|d| d.ts);
    for d in &entries {
        let key = (d.user.as_str(), d.cmid.as_str());
        let newer = keys
            .get(key)
            .map_err(engine)?
            .is_some_and(|v| v.value().2 > d.ts);
        if !newer {
            keys.insert(key, (d.conv.as_str(), d.seq, d.ts))
                .map_err(engine)?;
        }
    }
    if !entries.is_empty() {
        tracing::info!(entries = entries.len(), "indexed dedup entries by key");
    }
    if let Some(next) = next {
        meta.insert(DEDUP_KEYS_THROUGH, next).map_err(engine)?;
    }
    Ok(())
}

/// Moves dedup entries stored one row each (the layout before runs) into runs, oldest first,
/// indexes them by key, and drops the old table.
fn move_dedup_into_runs(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    if !has_table(tx, DEDUP_BY_KEY.name())? {
        return Ok(());
    }
    let mut entries = Vec::new();
    {
        let old = tx.open_table(DEDUP_BY_KEY).map_err(engine)?;
        for row in old.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let (user, cmid) = k.value();
            let at = format!("({user}, {cmid})");
            entries.push(decode::<DedupRecord>("dedup entry", at, v.value())?);
        }
    }
    entries.sort_by_key(|d| d.ts);
    let views: Vec<DedupView> = entries.iter().map(DedupView::record).collect();
    let mut dedup = tx.open_table(DEDUP_RUNS).map_err(engine)?;
    let mut meta = tx.open_table(META).map_err(engine)?;
    put_dedup_runs(&mut meta, &mut dedup, &views, &mut Vec::new())?;
    drop((dedup, meta));
    let mut keys = tx.open_table(DEDUP_KEYS).map_err(engine)?;
    for d in &views {
        keys.insert((d.user, d.cmid), (d.conv, d.seq, d.ts))
            .map_err(engine)?;
    }
    drop(keys);
    tx.delete_table(DEDUP_BY_KEY).map_err(engine)?;
    tracing::info!(
        entries = entries.len(),
        "moved dedup entries into the run layout"
    );
    Ok(())
}

/// Retention removed `conv`'s messages below `first`: the run that holds `first`, if it also
/// holds older messages, is written again without them (whole older runs are already gone), so
/// that nothing removed stays on disk.
fn drop_run_head(
    runs: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    conv: &str,
    first: u64,
) -> Result<(), StoreError> {
    let found = runs
        .range((conv, first)..=(conv, u64::MAX))
        .map_err(engine)?
        .next()
        .map(|row| row.map(|(k, v)| (k.value().1, v.value().to_vec())))
        .transpose()
        .map_err(engine)?;
    let Some((last, raw)) = found else {
        return Ok(());
    };
    let run: Vec<Message> = decode("message run", format!("({conv}, {last})"), &raw)?;
    if run.first().is_none_or(|m| m.seq >= first) {
        return Ok(());
    }
    let kept: Vec<&Message> = run.iter().filter(|m| m.seq >= first).collect();
    if kept.is_empty() {
        runs.remove((conv, last)).map_err(engine)?;
    } else {
        runs.insert((conv, last), encode(&kept)?.as_slice())
            .map_err(engine)?;
    }
    Ok(())
}
