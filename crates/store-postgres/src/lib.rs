//! The PostgreSQL backend of [`ordo_store::Store`]: PostgreSQL as the system of record, so
//! that an accepted message lives on as many machines as PostgreSQL's own (synchronous)
//! replication puts it, and several servers can share one store.
//!
//! A batch is one transaction: its messages (the key (conversation, seq) is unique, so a history
//! can never fork: a second writer of the same seq gets [`StoreError::Conflict`] and nothing of
//! its batch is written), conversation records and seq ranges, dedup entries, device positions
//! and trims. The common batch (messages, seq ranges, positions) is one statement in
//! autocommit, one round trip; the others a transaction of several. It commits before
//! [`Store::commit`] returns; with `synchronous_commit = on` (PostgreSQL's default) that means
//! durable, on the standbys too when `synchronous_standby_names` says so. Every commit also
//! moves this writer's row in `ordo_writers` from the number of the attempt before it to its
//! own (the `chain` module), so that a commit whose answer was lost is read back, never
//! guessed (see [`StoreError::Unreachable`]), and a database that lost commits it confirmed
//! is noticed at the next one.
//!
//! A message is its own dedup entry (indexed by sender and client message id, and by time for
//! the dedup scan, which reads them in slices of time). `ordo_dedup` keeps only the entries of
//! messages a trim deletes while they are still in the dedup window, and those written on
//! their own; they expire by time in bounded steps: the cutoff the core gives is kept (in
//! `ordo_state`), and every commit deletes at most twice its own messages' worth of entries
//! older than it (plus a thousand), oldest first. Entries older than the cutoff are not
//! answered, wherever they are kept.
//!
//! The tables are created and migrated at open ([`schema`]); a database whose schema is newer
//! than this binary is refused. Tables live in the connection's `search_path` (one database or
//! schema per server, or per test).
//!
//! The [`Store`] trait is synchronous (it is called from the server's commit and lookup threads),
//! so this backend uses the synchronous `postgres` client over a small pool of its own
//! ([`Pool`]).

mod chain;
pub mod lease;
mod pool;
mod scan;
pub mod schema;
pub mod test_schema;

use chain::{Attempt, Chain};
use lease::Fences;
use ordo_core::{
    AgeSweep, Batch, CommitOutcome, ConvRecord, ConvState, CursorRecord, DedupRecord, Expired,
    GroupPage, MemberPage, MemberPageAsk, Snapshot, StoredMessage, MAX_GROUPS_LIMIT,
};
use ordo_protocol::{ConvEvent, ConvKind, Message};
use ordo_store::{DedupScan, Page, PageFill, ScanFrom, Store, StoreError};
pub use pool::{redact, Conn, Pool, Prepared, POOL_SIZE};
use postgres::error::SqlState;
use postgres::{Client, Row, Transaction};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Conversation ids read at once for an overview or a list of groups.
const ID_CHUNK: i64 = 256;
const GROUP_CHUNK: i64 = 16;
/// Dedup entries a commit deletes at least, beyond twice its own messages.
const EXPIRE_STEP: usize = 1000;

/// How long reading back the outcome of a commit waits for a lock held by that commit's own
/// transaction, if the database has not noticed its connection is gone yet.
const READ_BACK_LOCK_WAIT: &str = "5s";

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    /// Dedup entries accepted before this may be deleted (0: none).
    forget_before: Mutex<u64>,
    /// This store's row in `ordo_writers` (made at open): every commit moves it from the number
    /// of the attempt before to its own, so that the outcome of a commit whose answer was lost
    /// can be read back (see [`chain`]).
    writer: String,
    /// Where this writer's commit attempts stand (see [`chain`]).
    chain: Mutex<Chain>,
    /// For a node of a cluster: the partitions it holds, which every commit is fenced with
    /// (see [`lease`]).
    fences: Option<Arc<Fences>>,
}

/// The partitions a batch writes to and the epochs this node holds them at: the fence its
/// commit checks (both empty outside a cluster).
type FenceParams = (Vec<i32>, Vec<i64>);

/// Whether `e` means the database cannot serve this connection now (the connection broke or
/// could not be opened, the server is shutting down or starting, or it is a standby, as the
/// old primary's address may be after a failover): asking again on a new connection, once
/// it is back, may work.
fn unreachable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let Some(code) = e.code() else {
        // The client library's own error: only those of the connection itself (a bug, a row
        // that does not decode, must not be retried for ever).
        let text = e.to_string();
        return [
            "error communicating with the server",
            "error connecting to server",
            "timeout waiting for server",
        ]
        .iter()
        .any(|t| text.starts_with(t));
    };
    code.code().starts_with("08")
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(code)
}

/// What `e` says, with its causes (the client library's own text leaves out what the database
/// said).
pub(crate) fn text(e: &postgres::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A PostgreSQL error in the store's terms: a lost connection is `Unreachable` (trying again,
/// once the database is back, may work); anything else says what the store was doing.
fn db(context: &str) -> impl Fn(postgres::Error) -> StoreError + '_ {
    move |e| {
        if unreachable(&e) {
            StoreError::Unreachable(format!("PostgreSQL ({context}): {}", text(&e)))
        } else {
            StoreError::Engine {
                context: format!("PostgreSQL, {context}"),
                source: text(&e).into(),
            }
        }
    }
}

/// Brings the schema of the database at `url`, on its connection `c`, to this binary's version.
/// A connection that breaks meanwhile (the database restarts, or fails over, as a server
/// starts) is `Unreachable`: the next attempt's may hold.
pub(crate) fn apply_schema(c: &mut pool::Conn<'_>, url: &str) -> Result<(), StoreError> {
    match schema::migrate(c) {
        Ok(_) => Ok(()),
        Err(schema::SchemaError::Db(e)) if unreachable(&e) => {
            c.discard();
            Err(StoreError::Unreachable(format!(
                "PostgreSQL (applying the schema): {}",
                text(&e)
            )))
        }
        Err(e) => Err(StoreError::Open {
            path: redact(url),
            source: Box::new(e),
        }),
    }
}

fn corrupt(what: &'static str, detail: String) -> StoreError {
    StoreError::Corrupt { what, detail }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or a key=value string), creates
    /// or migrates the tables, and reads the store's own state. `Unreachable` if no connection
    /// can be opened.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let pool = Pool::new(url)?;
        // A database that cannot be reached is `Unreachable`: the caller may wait for it.
        let mut c = pool.get()?;
        apply_schema(&mut c, url)?;
        let forget: i64 = c
            .query_opt(
                "SELECT value FROM ordo_state WHERE key = 'dedup_forget_before'",
                &[],
            )
            .map_err(db("reading the store's state"))?
            .map_or(0, |r| r.get(0));
        // The row exists, committed, before any batch moves it: a read-back waits for a
        // commit in flight that updates a row, not for one that would insert it. It starts
        // with the newest acceptance time of every writer, so that forgetting old writers
        // below never loses it.
        let writer = format!("{:016x}", rand::random::<u64>());
        c.execute(
            "INSERT INTO ordo_writers (id, batch, updated, last_ts)
             SELECT $1, 0, now(), COALESCE(MAX(last_ts), 0) FROM ordo_writers",
            &[&writer],
        )
        .map_err(db("registering this writer"))?;
        // Rows of writers long gone: a writer's row matters only while its last commit's
        // outcome may still be asked about. (A live writer idle that long makes its row again.)
        c.execute(
            "DELETE FROM ordo_writers WHERE updated < now() - interval '30 days'",
            &[],
        )
        .map_err(db("forgetting old writers"))?;
        drop(c);
        Ok(PgStore {
            pool,
            forget_before: Mutex::new(u(forget)),
            writer,
            chain: Mutex::new(Chain::default()),
            fences: None,
        })
    }

    /// Opens the store for a node of a cluster: every commit is refused unless the node holds
    /// the leases of the partitions it writes to, at the epochs `fences` holds (see [`lease`]).
    pub fn open_fenced(url: &str, fences: Arc<Fences>) -> Result<PgStore, StoreError> {
        let mut store = PgStore::open(url)?;
        store.fences = Some(fences);
        Ok(store)
    }

    fn chain(&self) -> MutexGuard<'_, Chain> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a fence (see [`chain`]): reads back the last attempt of this writer that took
    /// effect, and moves its row to a fresh number, in one transaction, so that no attempt
    /// made before can take effect any more and the failed one is settled. Its commit waits,
    /// under synchronous replication, until everything before it (a lost commit among it) is
    /// on the standbys too: a commit whose answer was lost may have been durable on the
    /// primary alone, and must not be reported as committed until it is replicated as any
    /// other. It waits at most a few seconds for a lock held by a commit's own transaction
    /// (the database may not have noticed yet that its connection is gone). Any failure is
    /// `Unreachable`: what the failed attempt did is still unknown, and is asked again later.
    fn fence(&self, chain: &mut Chain) -> Result<(), StoreError> {
        let at = chain.fence_number();
        let mut c = self.pool.get()?;
        let mut read = || -> Result<Option<u64>, postgres::Error> {
            let mut tx = c.transaction()?;
            tx.batch_execute(&format!("SET LOCAL lock_timeout = '{READ_BACK_LOCK_WAIT}'"))?;
            let row = tx.query_opt(
                "SELECT last_attempt FROM ordo_writers WHERE id = $1 FOR UPDATE",
                &[&self.writer],
            )?;
            let found = match row {
                Some(r) => {
                    tx.execute(
                        "UPDATE ordo_writers SET batch = $2, updated = now() WHERE id = $1",
                        &[&self.writer, &i(at)],
                    )?;
                    Some(u(r.get(0)))
                }
                None => {
                    // Another server forgot the row as idle for a month: nothing this writer
                    // began since then moved it.
                    tx.execute(
                        "INSERT INTO ordo_writers (id, batch, updated, last_ts)
                         SELECT $1, $2, now(), COALESCE(MAX(last_ts), 0) FROM ordo_writers",
                        &[&self.writer, &i(at)],
                    )?;
                    None
                }
            };
            tx.commit()?;
            Ok(found)
        };
        let found = read().map_err(|e| {
            c.discard();
            StoreError::Unreachable(format!(
                "PostgreSQL (reading back what commits whose answer was lost did): {}",
                text(&e)
            ))
        })?;
        let base = chain.base();
        chain.fenced(at, found.unwrap_or(base));
        Ok(())
    }

    /// The outcome of `batch`, committed earlier, read from what is stored.
    fn outcome_of(&self, batch: &Batch) -> Result<CommitOutcome, StoreError> {
        let mut first_seqs = Vec::new();
        if batch.trim_before_ms.is_empty() {
            return Ok(CommitOutcome { first_seqs });
        }
        let mut c = self.pool.get()?;
        for (conv, _) in &batch.trim_before_ms {
            let first: i64 = c
                .query_opt("SELECT first_seq FROM ordo_convs WHERE id = $1", &[conv])
                .map_err(db("reading a trimmed conversation's first seq"))?
                .map_or(1, |r| r.get(0));
            first_seqs.push((conv.clone(), u(first)));
        }
        Ok(CommitOutcome { first_seqs })
    }

    fn conv_state(
        c: &mut impl postgres::GenericClient,
        id: &str,
    ) -> Result<Option<ConvState>, StoreError> {
        let Some(row) = c
            .query_opt(
                "SELECT record, max_seq, first_seq FROM ordo_convs WHERE id = $1",
                &[&id],
            )
            .map_err(db("loading a conversation"))?
        else {
            return Ok(None);
        };
        let rec = record_of(id, &row)?;
        let cursors = c
            .query(
                "SELECT user_id, device, delivered, read FROM ordo_cursors WHERE conv = $1 ORDER BY user_id, device",
                &[&id],
            )
            .map_err(db("loading device positions"))?
            .iter()
            .map(|r| CursorRecord {
                conv: id.to_string(),
                user: r.get(0),
                device: r.get(1),
                delivered: u(r.get(2)),
                read: u(r.get(3)),
            })
            .collect();
        Ok(Some(ConvState { rec, cursors }))
    }

    fn apply(
        &self,
        tx: &mut Transaction<'_>,
        st: &mut Prepared,
        b: &Batch,
        attempt: Attempt,
        fence: &FenceParams,
    ) -> Result<CommitOutcome, StoreError> {
        for rec in &b.convs {
            let json = serde_json::to_string(rec).map_err(|e| StoreError::Engine {
                context: "encoding a conversation".into(),
                source: Box::new(e),
            })?;
            let kind = match rec.kind {
                ConvKind::Direct => "direct",
                ConvKind::Group => "group",
            };
            run(
                tx,
                st,
                "INSERT INTO ordo_convs (id, kind, max_seq, first_seq, deleted, record)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET kind = EXCLUDED.kind,
                   max_seq = GREATEST(ordo_convs.max_seq, EXCLUDED.max_seq),
                   first_seq = GREATEST(ordo_convs.first_seq, EXCLUDED.first_seq),
                   deleted = EXCLUDED.deleted, record = EXCLUDED.record",
                &[
                    &rec.id,
                    &kind,
                    &i(rec.max_seq),
                    &i(rec.first_seq),
                    &rec.deleted,
                    &json,
                ],
            )
            .map_err(db("writing a conversation"))?;
            let members: Vec<&str> = rec.members.iter().map(String::as_str).collect();
            run(
                tx,
                st,
                "DELETE FROM ordo_members WHERE conv = $1 AND NOT (user_id = ANY($2))",
                &[&rec.id, &members],
            )
            .map_err(db("writing members"))?;
            run(
                tx,
                st,
                "INSERT INTO ordo_members (user_id, conv) SELECT u, $1 FROM UNNEST($2::text[]) AS u
                 ON CONFLICT DO NOTHING",
                &[&rec.id, &members],
            )
            .map_err(db("writing members"))?;
        }
        // The store's dedup cutoff, moved by the batch (kept in `ordo_state`; the store's own
        // copy moves only once the transaction committed, in `committed`).
        let mut cutoff = *self.forget_before.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(new) = b.dedup_forget_before_ms.filter(|n| *n > cutoff) {
            run(tx, st, "INSERT INTO ordo_state (key, value) VALUES ('dedup_forget_before', $1)
                 ON CONFLICT (key) DO UPDATE SET value = GREATEST(ordo_state.value, EXCLUDED.value)",
                &[&i(new)],
            )
            .map_err(db("keeping the dedup cutoff"))?;
            cutoff = new;
        }
        self.write_common(tx, st, b, attempt, cutoff, fence)
            .map_err(not_written)?;
        for (user, cmid) in &b.dedup_delete {
            run(
                tx,
                st,
                "DELETE FROM ordo_dedup WHERE user_id = $1 AND cmid = $2",
                &[user, cmid],
            )
            .map_err(db("forgetting a dedup entry"))?;
        }
        put_dedup(tx, st, b)?;
        // Trimmed messages take their dedup entries with them: those still in the window are
        // kept on their own first.
        let cutoff = i(cutoff);
        for (conv, below) in &b.trim_below {
            trim(tx, st, conv, i(*below), 0, cutoff)?;
            run(
                tx,
                st,
                "UPDATE ordo_convs SET first_seq = GREATEST(first_seq, $2) WHERE id = $1",
                &[conv, &i(*below)],
            )
            .map_err(db("trimming a conversation"))?;
        }
        let mut first_seqs = Vec::new();
        for (conv, before) in &b.trim_before_ms {
            trim(tx, st, conv, 0, i(*before), cutoff)?;
            let first: i64 = tx
                .query_one(
                    "SELECT COALESCE((SELECT MIN(seq) FROM ordo_messages WHERE conv = $1),
                                     (SELECT max_seq + 1 FROM ordo_convs WHERE id = $1), 1)",
                    &[conv],
                )
                .map_err(db("trimming a conversation by age"))?
                .get(0);
            run(
                tx,
                st,
                "UPDATE ordo_convs SET first_seq = GREATEST(first_seq, $2) WHERE id = $1",
                &[conv, &first],
            )
            .map_err(db("trimming a conversation by age"))?;
            first_seqs.push((conv.clone(), u(first)));
        }
        Ok(CommitOutcome { first_seqs })
    }

    /// The batch committed: the store's dedup cutoff moves with it.
    fn committed(&self, b: &Batch) {
        let mut before = self.forget_before.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(new) = b.dedup_forget_before_ms {
            *before = (*before).max(new);
        }
    }
}

/// Deletes the messages of `conv` with seq below `below_seq` or accepted before `before_ms`,
/// keeping the dedup entries of those accepted at or after `cutoff` (still in the window) on
/// their own.
fn trim(
    tx: &mut Transaction<'_>,
    st: &mut Prepared,
    conv: &str,
    below_seq: i64,
    before_ms: i64,
    cutoff: i64,
) -> Result<(), StoreError> {
    run(
        tx,
        st,
        "INSERT INTO ordo_dedup (user_id, cmid, conv, seq, ts)
         SELECT DISTINCT ON (from_user, cmid) from_user, cmid, conv, seq, ts
         FROM ordo_messages WHERE conv = $1 AND (seq < $2 OR ts < $3) AND ts >= $4
         ORDER BY from_user, cmid, ts DESC
         ON CONFLICT (user_id, cmid) DO UPDATE
           SET conv = EXCLUDED.conv, seq = EXCLUDED.seq, ts = EXCLUDED.ts
           WHERE ordo_dedup.ts <= EXCLUDED.ts",
        &[&conv, &below_seq, &before_ms, &cutoff],
    )
    .map_err(db("keeping the dedup entries of trimmed messages"))?;
    run(
        tx,
        st,
        "DELETE FROM ordo_messages WHERE conv = $1 AND (seq < $2 OR ts < $3)",
        &[&conv, &below_seq, &before_ms],
    )
    .map_err(db("trimming a conversation"))?;
    Ok(())
}

/// Why [`PgStore::write_common`] wrote nothing: a seq stored twice is a conflict (which seq is
/// read afresh by the caller); a writer's row behind the attempt it follows means the database
/// lost commits it confirmed (the server stops); a row moved past it, or a deadlock, is worth
/// giving again; anything else as [`db`] says. (In autocommit a broken connection leaves the
/// outcome unknown instead: the caller sees to that first.)
fn not_written(e: postgres::Error) -> StoreError {
    match e.code() {
        Some(&SqlState::UNIQUE_VIOLATION) => StoreError::Conflict {
            conv: String::new(),
            seq: 0,
        },
        Some(c) if c.code() == lease::FENCED => StoreError::Fenced {
            lease: "a partition this batch writes to".into(),
            detail: text(&e),
        },
        Some(c) if c.code() == FOLLOWS_BEHIND => StoreError::Engine {
            context: "PostgreSQL, committing a batch".into(),
            source: format!("this server's row in ordo_writers is behind a commit the database confirmed ({}): the database lost committed transactions (was an asynchronous standby promoted, or a backup restored?); restart the server so that it reads the store afresh", text(&e)).into(),
        },
        // Refused as a whole, and worth giving again: its fence settles it.
        Some(c) if c.code() == FOLLOWS_PASSED || c == &SqlState::T_R_DEADLOCK_DETECTED => {
            StoreError::Unreachable(format!(
                "PostgreSQL (the commit was refused and is given again: {})",
                text(&e)
            ))
        }
        _ => db("writing the batch")(e),
    }
}

/// Runs `sql`, prepared once per connection, in the transaction.
fn run(
    tx: &mut Transaction<'_>,
    st: &mut Prepared,
    sql: &'static str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<u64, postgres::Error> {
    let statement = st.get(tx, sql)?;
    tx.execute(&statement, params)
}

/// How a commit failed.
enum Failed {
    /// The connection broke while the commit was on its way or being made: whether it took
    /// effect is not known (it is read back).
    Unknown(postgres::Error),
    /// It did not take effect.
    Store(StoreError),
}

/// `ordo_follows` (schema step 7): the writer's row holds less than the attempt a commit
/// follows (which took effect: one commit runs at a time).
const FOLLOWS_BEHIND: &str = "OR002";
/// `ordo_follows`: the writer's row moved past the attempt a commit follows (a fence).
const FOLLOWS_PASSED: &str = "OR001";

/// How a failed statement of a commit ended: see [`Failed`]. In autocommit (`autocommit`), a
/// broken connection leaves the outcome unknown; in a transaction not yet committed, nothing
/// took effect.
fn failed(e: postgres::Error, autocommit: bool) -> Failed {
    match autocommit && unreachable(&e) {
        true => Failed::Unknown(e),
        false => Failed::Store(not_written(e)),
    }
}

impl PgStore {
    /// Whether the batch holds only what the one-statement commit writes: messages, seq
    /// ranges, device positions and a step of dedup expiry (the common batch); conversation
    /// records, trims and dedup changes of their own take the transaction.
    fn fits_one_statement(&self, b: &Batch) -> bool {
        let before = *self.forget_before.lock().unwrap_or_else(|p| p.into_inner());
        b.convs.is_empty()
            && b.trim_below.is_empty()
            && b.trim_before_ms.is_empty()
            && b.dedup_put.is_empty()
            && b.dedup_delete.is_empty()
            && b.dedup_forget_before_ms.is_none_or(|n| n <= before)
    }

    /// One attempt at committing `batch`.
    fn try_commit(&self, batch: &Batch, attempt: Attempt) -> Result<CommitOutcome, Failed> {
        let fence = match &self.fences {
            Some(f) => f.of_batch(batch).map_err(Failed::Store)?,
            None => (Vec::new(), Vec::new()),
        };
        let mut c = self.pool.get().map_err(Failed::Store)?;
        let (client, st) = c.split();
        let result = if self.fits_one_statement(batch) {
            self.commit_in_one(client, st, batch, attempt, &fence)
        } else {
            self.commit_in_transaction(client, st, batch, attempt, &fence)
        };
        if matches!(
            result,
            Err(Failed::Unknown(_) | Failed::Store(StoreError::Unreachable(_)))
        ) {
            c.discard();
        }
        result
    }

    /// Commits a common batch as one statement ([`PgStore::write_common`], run in autocommit):
    /// one round trip to the database, where a transaction takes one for each statement, and
    /// its begin and commit.
    fn commit_in_one(
        &self,
        c: &mut Client,
        st: &mut Prepared,
        b: &Batch,
        attempt: Attempt,
        fence: &FenceParams,
    ) -> Result<CommitOutcome, Failed> {
        let cutoff = *self.forget_before.lock().unwrap_or_else(|p| p.into_inner());
        self.write_common(c, st, b, attempt, cutoff, fence)
            .map_err(|e| failed(e, true))?;
        Ok(CommitOutcome::default())
    }

    /// What every batch writes, as one statement (data-modifying parts of one `WITH`): the
    /// messages; this writer's row moved from the attempt it follows to `attempt` (the whole
    /// statement is refused if the row holds anything else: see [`chain`]); the seq ranges,
    /// the device positions, and one bounded step of dedup expiry before `cutoff` (see the
    /// crate's docs). For a node of a cluster it is also refused whole unless the node holds
    /// the leases of `fence` at their epochs, which it locks against a takeover until it ends
    /// (see [`lease`]).
    fn write_common(
        &self,
        c: &mut impl postgres::GenericClient,
        st: &mut Prepared,
        b: &Batch,
        attempt: Attempt,
        cutoff: u64,
        fence: &FenceParams,
    ) -> Result<(), postgres::Error> {
        let node = self.fences.as_ref().map_or("", |f| f.node());
        let msgs = &b.messages;
        let newest = i(msgs.iter().map(|m| m.ts).max().unwrap_or(0));
        let (number, follows) = (i(attempt.number), i(attempt.follows));
        let m = MessageColumns::of(msgs);
        let pos_id: Vec<&str> = b.positions.iter().map(|p| p.id.as_str()).collect();
        let pos_max: Vec<i64> = b.positions.iter().map(|p| i(p.max_seq)).collect();
        let pos_first: Vec<i64> = b.positions.iter().map(|p| i(p.first_seq)).collect();
        let cur_conv: Vec<&str> = b.cursors.iter().map(|c| c.conv.as_str()).collect();
        let cur_user: Vec<&str> = b.cursors.iter().map(|c| c.user.as_str()).collect();
        let cur_device: Vec<&str> = b.cursors.iter().map(|c| c.device.as_str()).collect();
        let delivered: Vec<i64> = b.cursors.iter().map(|c| i(c.delivered)).collect();
        let read: Vec<i64> = b.cursors.iter().map(|c| i(c.read)).collect();
        let before = i(cutoff);
        let step = i((msgs.len() * 2 + EXPIRE_STEP) as u64);
        let statement = st.get(
            c,
            "WITH
                   m AS (INSERT INTO ordo_messages
                           (conv, seq, from_user, device, cmid, body, reply_to, ts, event)
                         SELECT * FROM UNNEST($5::text[], $6::int8[], $7::text[], $8::text[],
                           $9::text[], $10::bytea[], $11::int8[], $12::int8[], $13::text[])
                         RETURNING 1),
                   w AS (UPDATE ordo_writers
                         SET batch = CASE WHEN batch = $2 THEN $3 ELSE batch END,
                           last_attempt = CASE WHEN batch = $2 THEN $3 ELSE last_attempt END,
                           updated = now(), last_ts = GREATEST(last_ts, $4)
                         WHERE id = $1 RETURNING batch),
                   p AS (UPDATE ordo_convs AS c SET max_seq = GREATEST(c.max_seq, p.max_seq),
                           first_seq = GREATEST(c.first_seq, p.first_seq)
                         FROM UNNEST($14::text[], $15::int8[], $16::int8[])
                           AS p(id, max_seq, first_seq)
                         WHERE c.id = p.id RETURNING 1),
                   k AS (INSERT INTO ordo_cursors (conv, user_id, device, delivered, read)
                         SELECT * FROM UNNEST($17::text[], $18::text[], $19::text[],
                           $20::int8[], $21::int8[])
                         ON CONFLICT (conv, user_id, device) DO UPDATE
                           SET delivered = EXCLUDED.delivered, read = EXCLUDED.read
                         RETURNING 1),
                   e AS (DELETE FROM ordo_dedup WHERE (user_id, cmid) IN
                           (SELECT user_id, cmid FROM ordo_dedup WHERE ts < $22::int8
                            ORDER BY ts LIMIT $23::int8)
                         RETURNING 1),
                   f AS (SELECT 1 FROM UNNEST($24::int4[], $25::int8[]) AS h(part, epoch)
                         JOIN ordo_leases l
                           ON l.part = h.part AND l.epoch = h.epoch AND l.node = $26
                         FOR SHARE OF l)
                 SELECT ordo_fenced((SELECT count(*) FROM f), cardinality($24::int4[])),
                   (SELECT count(*) FROM m),
                   ordo_follows((SELECT batch FROM w), $2::int8, $3::int8)",
        )?;
        c.query_one(
            &statement,
            &[
                &[&self.writer as Param, &follows, &number, &newest][..],
                &m.params(),
                &[
                    &pos_id,
                    &pos_max,
                    &pos_first,
                    &cur_conv,
                    &cur_user,
                    &cur_device,
                    &delivered,
                    &read,
                    &before,
                    &step,
                    &fence.0,
                    &fence.1,
                    &node,
                ],
            ]
            .concat(),
        )?;
        Ok(())
    }

    /// Commits any batch in a transaction of its own.
    fn commit_in_transaction(
        &self,
        c: &mut Client,
        st: &mut Prepared,
        b: &Batch,
        attempt: Attempt,
        fence: &FenceParams,
    ) -> Result<CommitOutcome, Failed> {
        let mut tx = c
            .transaction()
            .map_err(|e| Failed::Store(db("starting a commit")(e)))?;
        let outcome = self
            .apply(&mut tx, st, b, attempt, fence)
            .map_err(Failed::Store)?;
        match tx.commit() {
            Ok(()) => Ok(outcome),
            Err(e) if unreachable(&e) => Err(Failed::Unknown(e)),
            Err(e) => Err(Failed::Store(db("committing a batch")(e))),
        }
    }

    /// `batch` took effect (a read-back said so): its outcome, read from what is stored.
    fn took_effect(&self, batch: &Batch) -> Result<CommitOutcome, StoreError> {
        let outcome = self.outcome_of(batch)?;
        self.committed(batch);
        Ok(outcome)
    }

    /// For a node of a cluster whose batch stored a seq twice or was fenced: whether it lost
    /// the lease of a partition the batch writes to (a seq stored twice is then its new
    /// owner's), as [`StoreError::Fenced`] naming the partition and who holds it now.
    fn lost_lease(&self, batch: &Batch) -> Option<StoreError> {
        let fences = self.fences.as_ref()?;
        let (parts, epochs) = match fences.of_batch(batch) {
            Ok(f) => f,
            Err(e) => return Some(e),
        };
        let row = self.pool.get().ok()?.split().0.query_opt(
            "SELECT l.part, l.node, l.epoch, h.epoch FROM UNNEST($1::int4[], $2::int8[])
               AS h(part, epoch) JOIN ordo_leases l ON l.part = h.part
             WHERE l.epoch <> h.epoch OR l.node IS DISTINCT FROM $3 LIMIT 1",
            &[&parts, &epochs, &fences.node()],
        );
        let row = row.ok()??;
        let (part, node, now, held) = (
            row.get::<_, i32>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
        );
        Some(StoreError::Fenced {
            lease: format!("partition {part}"),
            detail: format!(
                "node {} held it at epoch {held}; it is now at epoch {now}, held by {}",
                fences.node(),
                node.as_deref().unwrap_or("no node")
            ),
        })
    }

    /// The seq of `batch` stored twice (read after its attempt was rolled back), as a
    /// conflict.
    fn which_conflict(&self, batch: &Batch) -> StoreError {
        let conv: Vec<&str> = batch.messages.iter().map(|m| m.conv.as_str()).collect();
        let seq: Vec<i64> = batch.messages.iter().map(|m| i(m.seq)).collect();
        let row = self.pool.get().and_then(|mut c| {
            c.query_opt(
                "SELECT m.conv, m.seq FROM ordo_messages m
                 JOIN UNNEST($1::text[], $2::int8[]) AS b(conv, seq)
                   ON m.conv = b.conv AND m.seq = b.seq LIMIT 1",
                &[&conv, &seq],
            )
            .map_err(db("finding a seq stored twice"))
        });
        let row = match row {
            Ok(row) => row,
            Err(e) => return e,
        };
        let (conv, seq) = match row {
            Some(r) => (r.get::<_, String>(0), u(r.get(1))),
            // Stored twice within the batch itself.
            None => {
                let mut seen = std::collections::HashSet::new();
                batch
                    .messages
                    .iter()
                    .find(|m| !seen.insert((m.conv.as_str(), m.seq)))
                    .map_or((String::new(), 0), |m| (m.conv.clone(), m.seq))
            }
        };
        StoreError::Conflict { conv, seq }
    }
}

/// A read-only transaction over one snapshot: what it reads is as of one moment, after every
/// commit that returned before it began.
fn snapshot<'a>(c: &'a mut Client, what: &str) -> Result<Transaction<'a>, StoreError> {
    c.build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(db(what))
}

fn record_of(id: &str, row: &Row) -> Result<ConvRecord, StoreError> {
    let json: String = row.get(0);
    let mut rec: ConvRecord = serde_json::from_str(&json)
        .map_err(|e| corrupt("conversation", format!("record of {id:?}: {e}")))?;
    rec.max_seq = rec.max_seq.max(u(row.get(1)));
    rec.first_seq = rec.first_seq.max(u(row.get(2)));
    Ok(rec)
}

/// Messages as the columns of `ordo_messages`, one array each, for `UNNEST`.
struct MessageColumns<'a> {
    conv: Vec<&'a str>,
    seq: Vec<i64>,
    from: Vec<&'a str>,
    device: Vec<&'a str>,
    cmid: Vec<&'a str>,
    body: Vec<&'a [u8]>,
    reply_to: Vec<Option<i64>>,
    ts: Vec<i64>,
    event: Vec<Option<String>>,
}

/// A statement parameter.
type Param<'a> = &'a (dyn postgres::types::ToSql + Sync);

impl<'a> MessageColumns<'a> {
    /// The columns as nine statement parameters, in the table's order.
    fn params(&self) -> [Param<'_>; 9] {
        [
            &self.conv,
            &self.seq,
            &self.from,
            &self.device,
            &self.cmid,
            &self.body,
            &self.reply_to,
            &self.ts,
            &self.event,
        ]
    }

    fn of(msgs: &'a [std::sync::Arc<StoredMessage>]) -> Self {
        MessageColumns {
            conv: msgs.iter().map(|m| m.conv.as_str()).collect(),
            seq: msgs.iter().map(|m| i(m.seq)).collect(),
            from: msgs.iter().map(|m| m.from.as_str()).collect(),
            device: msgs.iter().map(|m| m.device.as_str()).collect(),
            cmid: msgs.iter().map(|m| m.cmid.as_str()).collect(),
            body: msgs.iter().map(|m| m.body.as_bytes()).collect(),
            reply_to: msgs.iter().map(|m| m.reply_to.map(i)).collect(),
            ts: msgs.iter().map(|m| i(m.ts)).collect(),
            // An event that does not encode cannot happen (plain data); stored as none.
            event: msgs
                .iter()
                .map(|m| m.event.as_ref().and_then(|e| serde_json::to_string(e).ok()))
                .collect(),
        }
    }
}

/// The batch's dedup entries of their own (`dedup_put`, which earlier versions wrote), the last
/// of each key, kept unless the store holds a newer entry of that key. (A message is its own
/// entry, indexed where it is stored.)
fn put_dedup(tx: &mut Transaction<'_>, st: &mut Prepared, b: &Batch) -> Result<(), StoreError> {
    let mut last: HashMap<(String, String), DedupRecord> = HashMap::new();
    for d in b.dedup_put.iter().cloned() {
        last.insert((d.user.clone(), d.cmid.clone()), d);
    }
    if last.is_empty() {
        return Ok(());
    }
    let entries: Vec<&DedupRecord> = last.values().collect();
    let user: Vec<&str> = entries.iter().map(|d| d.user.as_str()).collect();
    let cmid: Vec<&str> = entries.iter().map(|d| d.cmid.as_str()).collect();
    let conv: Vec<&str> = entries.iter().map(|d| d.conv.as_str()).collect();
    let seq: Vec<i64> = entries.iter().map(|d| i(d.seq)).collect();
    let ts: Vec<i64> = entries.iter().map(|d| i(d.ts)).collect();
    run(
        tx,
        st,
        "INSERT INTO ordo_dedup (user_id, cmid, conv, seq, ts)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])
         ON CONFLICT (user_id, cmid) DO UPDATE
           SET conv = EXCLUDED.conv, seq = EXCLUDED.seq, ts = EXCLUDED.ts
           WHERE ordo_dedup.ts <= EXCLUDED.ts",
        &[&user, &cmid, &conv, &seq, &ts],
    )
    .map_err(db("writing dedup entries"))?;
    Ok(())
}

fn message_of(row: &Row) -> Result<Message, StoreError> {
    let conv: String = row.get(0);
    let seq = u(row.get(1));
    let event: Option<String> = row.get(8);
    let event = match event {
        None => None,
        Some(json) => Some(
            serde_json::from_str::<ConvEvent>(&json)
                .map_err(|e| corrupt("message", format!("event of {conv:?} seq {seq}: {e}")))?,
        ),
    };
    Ok(Message {
        seq,
        from: row.get(2),
        device: row.get(3),
        cmid: row.get(4),
        body: String::from_utf8(row.get(5))
            .map_err(|e| corrupt("message", format!("body of {conv:?} seq {seq}: {e}")))?,
        reply_to: row.get::<_, Option<i64>>(6).map(u),
        ts: u(row.get(7)),
        event,
        conv,
    })
}

fn dedup_of(row: &Row) -> DedupRecord {
    DedupRecord {
        user: row.get(0),
        cmid: row.get(1),
        conv: row.get(2),
        seq: u(row.get(3)),
        ts: u(row.get(4)),
    }
}

impl Store for PgStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut c = self.pool.get()?;
        let last: i64 = c
            .query_one(
                "SELECT GREATEST((SELECT COALESCE(MAX(last_ts), 0) FROM ordo_writers),
                                 (SELECT COALESCE(MAX(ts), 0) FROM ordo_dedup))",
                &[],
            )
            .map_err(db("reading the newest acceptance time"))?
            .get(0);
        Ok(Snapshot { last_ts: u(last) })
    }

    fn load_convs(&self, ids: &[String]) -> Result<Vec<Option<ConvState>>, StoreError> {
        let mut c = self.pool.get()?;
        let mut tx = snapshot(&mut c, "loading conversations")?;
        let out = ids
            .iter()
            .map(|id| Self::conv_state(&mut tx, id))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().map_err(db("loading conversations"))?;
        Ok(out)
    }

    fn member_convs(&self, ask: &MemberPageAsk) -> Result<MemberPage, StoreError> {
        // Ids come from the index in chunks, on a connection of their own, as `collect` takes
        // them; conversations are loaded on another. A page reads only what it lists.
        let mut index = self.pool.get()?;
        let mut loads = self.pool.get()?;
        let mut after = ask.after.clone().unwrap_or_default();
        let mut chunk = Vec::new().into_iter();
        let mut done = false;
        let ids = std::iter::from_fn(|| loop {
            if let Some(id) = chunk.next() {
                return Some(Ok(id));
            }
            if done {
                return None;
            }
            let rows = match index.query(
                "SELECT conv FROM ordo_members WHERE user_id = $1 AND conv > $2
                 ORDER BY conv LIMIT $3",
                &[&ask.user, &after, &ID_CHUNK],
            ) {
                Ok(rows) => rows,
                Err(e) => {
                    done = true;
                    return Some(Err(db("listing a user's conversations")(e)));
                }
            };
            done = (rows.len() as i64) < ID_CHUNK;
            let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            if let Some(last) = ids.last() {
                after.clone_from(last);
            }
            chunk = ids.into_iter();
        });
        MemberPage::collect(ask, ids, |id| Self::conv_state(&mut *loads, id))
    }

    fn groups(&self, after: Option<&str>, limit: usize) -> Result<GroupPage, StoreError> {
        let limit = limit.clamp(1, MAX_GROUPS_LIMIT);
        let mut c = self.pool.get()?;
        let mut records = Vec::new();
        let mut from = after.unwrap_or("").to_string();
        let mut members = 0usize;
        // In chunks: a page of large groups ends early, and is not read whole first.
        'read: loop {
            let rows = c
                .query(
                    "SELECT record, max_seq, first_seq, id FROM ordo_convs
                     WHERE id > $1 AND kind = 'group' AND NOT deleted ORDER BY id LIMIT $2",
                    &[&from, &GROUP_CHUNK],
                )
                .map_err(db("listing groups"))?;
            let last = rows.len() < GROUP_CHUNK as usize;
            for row in &rows {
                let id: String = row.get(3);
                let rec = record_of(&id, row)?;
                members += rec.members.len();
                from = id;
                records.push(Ok::<_, StoreError>(rec));
                if records.len() > limit
                    || (members > ordo_core::MAX_GROUP_PAGE_MEMBERS && records.len() > 1)
                {
                    break 'read;
                }
            }
            if last {
                break;
            }
        }
        GroupPage::collect(limit, records)
    }

    fn commit(&self, batch: Arc<Batch>) -> Result<CommitOutcome, StoreError> {
        if batch.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let mut chain = self.chain();
        if let Some(number) = chain.failed_attempt(&batch) {
            // Given again after its attempt failed: what that attempt did is read back (a
            // fence settles it), never guessed.
            if chain.fate(number).is_none() {
                self.fence(&mut chain)?;
            }
            if chain.fate(number) == Some(true) {
                drop(chain);
                let outcome = self.took_effect(&batch)?;
                self.chain().settle(&batch);
                return Ok(outcome);
            }
            chain.settle(&batch);
        }
        if let Some(id) = chain.took_effect_unanswered(&batch) {
            return Err(StoreError::Engine {
                context: "PostgreSQL, committing a batch".into(),
                source: format!("batch {id}, whose answer was lost, did commit, but batch {} was given instead of it again (a fault of the server's commit thread); restart the server, which reads the store afresh", batch.id).into(),
            });
        }
        if chain.broken() {
            self.fence(&mut chain)?;
        }
        let attempt = chain.start();
        drop(chain);
        match self.try_commit(&batch, attempt) {
            Ok(outcome) => {
                self.chain().finished(&batch, attempt, true);
                self.committed(&batch);
                Ok(outcome)
            }
            Err(Failed::Unknown(e)) => {
                // The attempt may or may not have taken effect: read it back at once if the
                // database can still be reached, else when the batch is given again.
                let mut chain = self.chain();
                chain.finished(&batch, attempt, false);
                if self.fence(&mut chain).is_err() {
                    return Err(StoreError::Unreachable(format!(
                        "PostgreSQL (the connection broke during the commit: {}; whether it took effect is read back once the database can be reached)", text(&e)
                    )));
                }
                if chain.fate(attempt.number) != Some(true) {
                    return Err(StoreError::Unreachable(format!(
                        "PostgreSQL (the connection broke during the commit, which did not take effect: {})", text(&e)
                    )));
                }
                drop(chain);
                let outcome = self.took_effect(&batch)?;
                self.chain().settle(&batch);
                Ok(outcome)
            }
            Err(Failed::Store(e)) => {
                self.chain().finished(&batch, attempt, false);
                Err(match e {
                    StoreError::Conflict { .. } => self
                        .lost_lease(&batch)
                        .unwrap_or_else(|| self.which_conflict(&batch)),
                    // Named: which partition, and who holds it now.
                    e @ StoreError::Fenced { .. } => self.lost_lease(&batch).unwrap_or(e),
                    e => e,
                })
            }
        }
    }

    fn read_page(
        &self,
        conv: &str,
        from: u64,
        to: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let mut c = self.pool.get()?;
        let (client, st) = c.split();
        let mut tx = snapshot(client, "reading history")?;
        let first = st
            .get(&mut tx, "SELECT first_seq FROM ordo_convs WHERE id = $1")
            .map_err(db("reading history"))?;
        let first_seq = tx
            .query_opt(&first, &[&conv])
            .map_err(db("reading history"))?
            .map_or(1, |r| u(r.get(0)));
        let (mut fill, start) = match PageFill::start(first_seq, from, to, limit, max_bytes) {
            Ok(f) => f,
            Err(empty) => return Ok(empty),
        };
        let range = st
            .get(
                &mut tx,
                "SELECT conv, seq, from_user, device, cmid, body, reply_to, ts, event
                 FROM ordo_messages WHERE conv = $1 AND seq >= $2 AND seq <= $3
                 ORDER BY seq LIMIT $4",
            )
            .map_err(db("reading history"))?;
        let rows = tx
            .query(&range, &[&conv, &i(start), &i(to), &i64::from(limit)])
            .map_err(db("reading history"))?;
        for row in &rows {
            if fill.push(message_of(row)?) {
                break;
            }
        }
        tx.commit().map_err(db("reading history"))?;
        Ok(fill.finish())
    }

    fn dedup_lookup(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<Option<DedupRecord>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.pool.get()?;
        let user: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let cmid: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let (client, st) = c.split();
        let lookup = st
            .get(
                client,
                "SELECT m.from_user, m.cmid, m.conv, m.seq, m.ts FROM ordo_messages m
                 JOIN UNNEST($1::text[], $2::text[]) AS k(user_id, cmid)
                   ON m.from_user = k.user_id AND m.cmid = k.cmid
                 WHERE m.ts >= $3::int8
                 UNION ALL
                 SELECT d.user_id, d.cmid, d.conv, d.seq, d.ts FROM ordo_dedup d
                 JOIN UNNEST($1::text[], $2::text[]) AS k(user_id, cmid)
                   ON d.user_id = k.user_id AND d.cmid = k.cmid
                 WHERE d.ts >= $3::int8",
            )
            .map_err(db("looking up client message ids"))?;
        // Entries accepted before the store's cutoff are forgotten, wherever they are kept.
        let cutoff = i(*self.forget_before.lock().unwrap_or_else(|p| p.into_inner()));
        let rows = client
            .query(&lookup, &[&user, &cmid, &cutoff])
            .map_err(db("looking up client message ids"))?;
        // The newest of each key, from the messages and the entries kept on their own.
        let mut found: HashMap<(String, String), DedupRecord> = HashMap::new();
        for d in rows.iter().map(dedup_of) {
            let key = (d.user.clone(), d.cmid.clone());
            if found.get(&key).is_none_or(|f| f.ts <= d.ts) {
                found.insert(key, d);
            }
        }
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    fn expired(&self, sweep: &AgeSweep) -> Result<Expired, StoreError> {
        let mut c = self.pool.get()?;
        let max = i64::from(sweep.max_convs.max(1));
        let after = sweep.after.clone().unwrap_or_default();
        let rows = c
            .query(
                "SELECT record, max_seq, first_seq, id FROM ordo_convs WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &max],
            )
            .map_err(db("sweeping for retention"))?;
        let swept_to = (rows.len() as i64 >= max)
            .then(|| rows.last().map(|r| r.get::<_, String>(3)))
            .flatten();
        let mut trims = Vec::new();
        for row in &rows {
            let id: String = row.get(3);
            let rec = record_of(&id, row)?;
            let Some(age) = rec.retention.max_age_ms.or(sweep.default_max_age_ms) else {
                continue;
            };
            let cutoff = sweep.now_ms.saturating_sub(age);
            let oldest = c
                .query_opt(
                    "SELECT ts FROM ordo_messages WHERE conv = $1 AND seq >= $2 ORDER BY seq LIMIT 1",
                    &[&id, &i(rec.first_seq)],
                )
                .map_err(db("sweeping for retention"))?;
            if oldest.is_some_and(|r| u(r.get(0)) < cutoff) {
                trims.push((id, cutoff));
            }
        }
        Ok(Expired { trims, swept_to })
    }

    fn dedup_scan(&self, from: Option<ScanFrom>, max: usize) -> Result<DedupScan, StoreError> {
        let cutoff = *self.forget_before.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = self.pool.get()?;
        scan::page(&mut c, from, max, cutoff)
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_left_out_of_messages() {
        for (url, want) in [
            (
                "postgres://ordo:s3cret@db:5432/ordo",
                "postgres://ordo:***@db:5432/ordo",
            ),
            (
                "host=db user=ordo password=s3cret dbname=ordo",
                "host=db user=ordo password=*** dbname=ordo",
            ),
            (
                "host=db password='it\\'s a \\\\ secret' dbname=ordo",
                "host=db password=*** dbname=ordo",
            ),
            (
                "postgres://db/ordo?user=ordo&password=s3cret&sslmode=disable",
                "postgres://db/ordo?user=ordo&password=***&sslmode=disable",
            ),
            ("host=db user=ordo", "host=db user=ordo"),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
    }
}
