//! The PostgreSQL backend of [`ordo_store::Store`]: PostgreSQL as the system of record, so
//! that an accepted message lives on as many machines as PostgreSQL's own (synchronous)
//! replication puts it, and several servers can share one store.
//!
//! A batch is one transaction: its messages (the key (conversation, seq) is unique, so a history
//! can never fork: a second writer of the same seq gets [`StoreError::Conflict`] and nothing of
//! its batch is written), conversation records and seq ranges, dedup entries, device positions
//! and trims. The transaction commits before [`Store::commit`] returns; with
//! `synchronous_commit = on` (PostgreSQL's default) that means durable, on the standbys too
//! when `synchronous_standby_names` says so.
//!
//! Dedup entries expire by time in bounded steps: the cutoff the core gives is kept (in
//! `ordo_state`), and every commit deletes at most twice its own messages' worth of entries
//! older than it (plus a thousand), oldest first, so expiry keeps up with the rate of new
//! entries and no commit carries one huge delete.
//!
//! The tables are created and migrated at open ([`schema`]); a database whose schema is newer
//! than this binary is refused. Tables live in the connection's `search_path` (one database or
//! schema per server, or per test).
//!
//! The [`Store`] trait is synchronous (it is called from the server's commit and lookup threads),
//! so this backend uses the synchronous `postgres` client over a small pool of its own
//! ([`Pool`]).

pub mod schema;
pub mod test_schema;

use ordo_core::{
    AgeSweep, Batch, CommitOutcome, ConvRecord, ConvState, CursorRecord, DedupRecord, Expired,
    GroupPage, MemberPage, MemberPageAsk, Snapshot, StoredMessage, MAX_GROUPS_LIMIT,
};
use ordo_protocol::{ConvEvent, ConvKind, Message};
use ordo_store::{DedupScan, Page, PageFill, ScanFrom, Store, StoreError};
use postgres::error::SqlState;
use postgres::{Client, NoTls, Row, Transaction};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Connections the pool opens at most; a caller waits for one past it.
pub const POOL_SIZE: usize = 8;
/// How long a caller waits for a connection of the pool.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Conversation ids read at once for an overview or a list of groups.
const ID_CHUNK: i64 = 256;
const GROUP_CHUNK: i64 = 16;
/// Dedup entries a commit deletes at least, beyond twice its own messages.
const EXPIRE_STEP: usize = 1000;

/// How long opening a connection may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection whose peer stops answering is found dead within about this long (TCP
/// keepalives, and unacknowledged data), rather than after the system's two hours.
const DEAD_PEER: Duration = Duration::from_secs(20);
/// How long reading back the outcome of a commit waits for a lock held by that commit's own
/// transaction, if the database has not noticed its connection is gone yet.
const READ_BACK_LOCK_WAIT: &str = "5s";

/// A few connections to one database, opened on demand, at most [`POOL_SIZE`].
pub struct Pool {
    url: String,
    config: postgres::Config,
    idle: Mutex<(Vec<Client>, usize)>,
    freed: Condvar,
}

/// A connection taken from the [`Pool`]; given back when dropped (unless it broke, or was
/// [discarded](Conn::discard)).
pub struct Conn<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    discard: bool,
}

impl Conn<'_> {
    /// Closes the connection when it is dropped instead of giving it back: after an error that
    /// says the server behind it can no longer serve (it shuts down, or is a standby now).
    pub fn discard(&mut self) {
        self.discard = true;
    }
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        match self.client.take() {
            Some(c) if !c.is_closed() && !self.discard => idle.0.push(c),
            // A broken connection is not kept: the next caller opens a new one. What broke it
            // (the database restarted, or failed over) most likely broke the idle ones too,
            // which would not know until used: they go as well.
            _ => {
                idle.1 -= 1 + idle.0.len();
                idle.0.clear();
                self.pool.freed.notify_all();
            }
        }
        self.pool.freed.notify_one();
    }
}

impl Pool {
    /// A pool for the database at `url` (a `postgres://` URL or a key=value string; several
    /// hosts and `target_session_attrs=read-write` pick the primary of a replicated cluster).
    /// Connections time out opening after 5 s unless the URL says otherwise, and a peer that
    /// stops answering is found dead in about 20 s.
    pub fn new(url: &str) -> Result<Pool, StoreError> {
        let mut config: postgres::Config = url.parse().map_err(|e| StoreError::Open {
            path: redact(url),
            source: format!("not a PostgreSQL connection string: {e}").into(),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // The database server gives up on a connection whose client is gone (a transaction
        // left open would hold this writer's row for hours: the read-back waits for it).
        let server_side = "-c idle_in_transaction_session_timeout=60s -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=5";
        let options = match config.get_options() {
            Some(o) => format!("{o} {server_side}"),
            None => server_side.to_string(),
        };
        config.options(&options);
        config
            .keepalives(true)
            .keepalives_idle(DEAD_PEER / 2)
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(5)
            .tcp_user_timeout(DEAD_PEER);
        Ok(Pool {
            url: url.to_string(),
            config,
            idle: Mutex::new((Vec::new(), 0)),
            freed: Condvar::new(),
        })
    }

    /// An idle connection, a new one while fewer than [`POOL_SIZE`] are open, or the next one
    /// given back.
    pub fn get(&self) -> Result<Conn<'_>, StoreError> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(c) = idle.0.pop() {
                return Ok(Conn {
                    pool: self,
                    client: Some(c),
                    discard: false,
                });
            }
            if idle.1 < POOL_SIZE {
                idle.1 += 1;
                drop(idle);
                return match self.config.connect(NoTls) {
                    Ok(c) => Ok(Conn {
                        pool: self,
                        client: Some(c),
                        discard: false,
                    }),
                    Err(e) => {
                        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                        idle.1 -= 1;
                        // A waiter may open one now.
                        self.freed.notify_one();
                        Err(StoreError::Unreachable(format!(
                            "cannot connect to PostgreSQL at {}: {e}",
                            redact(&self.url)
                        )))
                    }
                };
            }
            let (next, waited) = self
                .freed
                .wait_timeout(idle, POOL_WAIT)
                .unwrap_or_else(|p| p.into_inner());
            idle = next;
            if waited.timed_out() && idle.0.is_empty() && idle.1 >= POOL_SIZE {
                // Nothing took effect; the caller tries again later.
                return Err(StoreError::Unreachable(format!(
                    "no PostgreSQL connection free within {} s",
                    POOL_WAIT.as_secs()
                )));
            }
        }
    }
}

/// The connection string without its password (in a URL's user part, or a `password=`
/// setting of a key=value string or a URL's query), for messages.
pub fn redact(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    };
    let mut from = 0;
    while let Some(found) = out[from..].find("password=") {
        let start = from + found + "password=".len();
        let rest = &out[start..];
        let len = match rest.strip_prefix('\'') {
            // A quoted value: up to the closing quote not escaped by a backslash.
            Some(quoted) => {
                let mut end = quoted.len();
                let mut escaped = false;
                for (i, c) in quoted.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '\'' if !escaped => {
                            end = i + 1;
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                (end + 1).min(rest.len())
            }
            None => rest.find([' ', '&']).unwrap_or(rest.len()),
        };
        out.replace_range(start..start + len, "***");
        from = start + 3;
    }
    out
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    /// Dedup entries accepted before this may be deleted (0: none).
    forget_before: Mutex<u64>,
    /// This store's row in `ordo_writers` (made at open): every commit moves it to the number
    /// of its attempt, so that the outcome of a commit whose answer was lost can be read back.
    writer: String,
    /// Commit attempts made: each is numbered, so a read-back can tell exactly which one last
    /// took effect (batch ids cannot: a new core on the same store starts them again).
    attempts: std::sync::atomic::AtomicU64,
    /// The batch (id, attempt) whose COMMIT's answer was lost, until its outcome has been
    /// read back.
    unresolved: Mutex<Option<(u64, u64)>>,
}

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

/// A PostgreSQL error in the store's terms: a lost connection is `Unreachable` (trying again,
/// once the database is back, may work); anything else says what the store was doing.
fn db(context: &str) -> impl Fn(postgres::Error) -> StoreError + '_ {
    move |e| {
        if unreachable(&e) {
            StoreError::Unreachable(format!("PostgreSQL ({context}): {e}"))
        } else {
            StoreError::Engine {
                context: format!("PostgreSQL, {context}"),
                source: Box::new(e),
            }
        }
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
        schema::migrate(&mut c).map_err(|e| StoreError::Open {
            path: redact(url),
            source: Box::new(e),
        })?;
        let forget: i64 = c
            .query_opt(
                "SELECT value FROM ordo_state WHERE key = 'dedup_forget_before'",
                &[],
            )
            .map_err(db("reading the store's state"))?
            .map_or(0, |r| r.get(0));
        // Rows of writers long gone: a writer's row matters only while its last commit's
        // outcome may still be asked about. (A live writer idle that long makes its row again.)
        c.execute(
            "DELETE FROM ordo_writers WHERE updated < now() - interval '30 days'",
            &[],
        )
        .map_err(db("forgetting old writers"))?;
        // The row exists, committed, before any batch moves it: a read-back waits for a
        // commit in flight that updates a row, not for one that would insert it.
        let writer = format!("{:016x}", rand::random::<u64>());
        c.execute(
            "INSERT INTO ordo_writers (id, batch, updated) VALUES ($1, 0, now())",
            &[&writer],
        )
        .map_err(db("registering this writer"))?;
        drop(c);
        Ok(PgStore {
            pool,
            forget_before: Mutex::new(u(forget)),
            writer,
            attempts: 0.into(),
            unresolved: Mutex::new(None),
        })
    }

    /// Whether commit attempt `attempt` (this writer's last) took effect: read back from this
    /// writer's row,
    /// in a transaction that writes it. Its own commit waits, under synchronous replication,
    /// until everything before it (the batch's commit among it) is on the standbys too: a
    /// commit whose answer was lost may have been durable on the primary alone, and must not
    /// be reported as committed until it is replicated as any other. It waits at most a few
    /// seconds for a lock held by the batch's own transaction (the database may not have
    /// noticed yet that its connection is gone). Any failure is `Unreachable`: the outcome
    /// is still unknown, and is asked again later.
    fn read_back(&self, attempt: u64) -> Result<bool, StoreError> {
        let mut c = self.pool.get()?;
        let mut read = || -> Result<bool, postgres::Error> {
            let mut tx = c.transaction()?;
            tx.batch_execute(&format!("SET LOCAL lock_timeout = '{READ_BACK_LOCK_WAIT}'"))?;
            let row = tx.query_opt(
                "UPDATE ordo_writers SET updated = now() WHERE id = $1 RETURNING batch",
                &[&self.writer],
            )?;
            tx.commit()?;
            Ok(row.is_some_and(|r| u(r.get(0)) == attempt))
        };
        read().map_err(|e| {
            StoreError::Unreachable(format!(
                "PostgreSQL (reading back whether a commit whose answer was lost took effect): {e}"
            ))
        })
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
        b: &Batch,
        attempt: u64,
    ) -> Result<CommitOutcome, StoreError> {
        let marked = tx
            .execute(
                "UPDATE ordo_writers SET batch = $2, updated = now() WHERE id = $1",
                &[&self.writer, &i(attempt)],
            )
            .map_err(db("marking the batch"))?;
        if marked == 0 {
            // Forgotten as long gone after a very long pause: made again.
            tx.execute(
                "INSERT INTO ordo_writers (id, batch, updated) VALUES ($1, $2, now())",
                &[&self.writer, &i(attempt)],
            )
            .map_err(db("marking the batch"))?;
        }
        for rec in &b.convs {
            let json = serde_json::to_string(rec).map_err(|e| StoreError::Engine {
                context: "encoding a conversation".into(),
                source: Box::new(e),
            })?;
            let kind = match rec.kind {
                ConvKind::Direct => "direct",
                ConvKind::Group => "group",
            };
            tx.execute(
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
            tx.execute(
                "DELETE FROM ordo_members WHERE conv = $1 AND NOT (user_id = ANY($2))",
                &[&rec.id, &members],
            )
            .map_err(db("writing members"))?;
            tx.execute(
                "INSERT INTO ordo_members (user_id, conv) SELECT u, $1 FROM UNNEST($2::text[]) AS u
                 ON CONFLICT DO NOTHING",
                &[&rec.id, &members],
            )
            .map_err(db("writing members"))?;
        }
        if !b.positions.is_empty() {
            let ids: Vec<&str> = b.positions.iter().map(|p| p.id.as_str()).collect();
            let max: Vec<i64> = b.positions.iter().map(|p| i(p.max_seq)).collect();
            let first: Vec<i64> = b.positions.iter().map(|p| i(p.first_seq)).collect();
            tx.execute(
                "UPDATE ordo_convs AS c SET max_seq = GREATEST(c.max_seq, p.max_seq),
                   first_seq = GREATEST(c.first_seq, p.first_seq)
                 FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS p(id, max_seq, first_seq)
                 WHERE c.id = p.id",
                &[&ids, &max, &first],
            )
            .map_err(db("moving seq ranges"))?;
        }
        if !b.messages.is_empty() {
            insert_messages(tx, &b.messages)?;
        }
        for (user, cmid) in &b.dedup_delete {
            tx.execute(
                "DELETE FROM ordo_dedup WHERE user_id = $1 AND cmid = $2",
                &[user, cmid],
            )
            .map_err(db("forgetting a dedup entry"))?;
        }
        self.expire_dedup(tx, b)?;
        put_dedup(tx, b)?;
        if !b.cursors.is_empty() {
            let conv: Vec<&str> = b.cursors.iter().map(|c| c.conv.as_str()).collect();
            let user: Vec<&str> = b.cursors.iter().map(|c| c.user.as_str()).collect();
            let device: Vec<&str> = b.cursors.iter().map(|c| c.device.as_str()).collect();
            let delivered: Vec<i64> = b.cursors.iter().map(|c| i(c.delivered)).collect();
            let read: Vec<i64> = b.cursors.iter().map(|c| i(c.read)).collect();
            tx.execute(
                "INSERT INTO ordo_cursors (conv, user_id, device, delivered, read)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])
                 ON CONFLICT (conv, user_id, device) DO UPDATE
                   SET delivered = EXCLUDED.delivered, read = EXCLUDED.read",
                &[&conv, &user, &device, &delivered, &read],
            )
            .map_err(db("writing device positions"))?;
        }
        for (conv, below) in &b.trim_below {
            tx.execute(
                "DELETE FROM ordo_messages WHERE conv = $1 AND seq < $2",
                &[conv, &i(*below)],
            )
            .map_err(db("trimming a conversation"))?;
            tx.execute(
                "UPDATE ordo_convs SET first_seq = GREATEST(first_seq, $2) WHERE id = $1",
                &[conv, &i(*below)],
            )
            .map_err(db("trimming a conversation"))?;
        }
        let mut first_seqs = Vec::new();
        for (conv, before) in &b.trim_before_ms {
            tx.execute(
                "DELETE FROM ordo_messages WHERE conv = $1 AND ts < $2",
                &[conv, &i(*before)],
            )
            .map_err(db("trimming a conversation by age"))?;
            let first: i64 = tx
                .query_one(
                    "SELECT COALESCE((SELECT MIN(seq) FROM ordo_messages WHERE conv = $1),
                                     (SELECT max_seq + 1 FROM ordo_convs WHERE id = $1), 1)",
                    &[conv],
                )
                .map_err(db("trimming a conversation by age"))?
                .get(0);
            tx.execute(
                "UPDATE ordo_convs SET first_seq = GREATEST(first_seq, $2) WHERE id = $1",
                &[conv, &first],
            )
            .map_err(db("trimming a conversation by age"))?;
            first_seqs.push((conv.clone(), u(first)));
        }
        Ok(CommitOutcome { first_seqs })
    }

    /// One bounded step of dedup expiry (see the crate's docs). The store's own cutoff is
    /// moved (by the caller) only once the transaction committed.
    fn expire_dedup(&self, tx: &mut Transaction<'_>, b: &Batch) -> Result<(), StoreError> {
        let mut before = *self.forget_before.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(new) = b.dedup_forget_before_ms.filter(|n| *n > before) {
            tx.execute(
                "INSERT INTO ordo_state (key, value) VALUES ('dedup_forget_before', $1)
                 ON CONFLICT (key) DO UPDATE SET value = GREATEST(ordo_state.value, EXCLUDED.value)",
                &[&i(new)],
            )
            .map_err(db("keeping the dedup cutoff"))?;
            before = new;
        }
        if before == 0 {
            return Ok(());
        }
        let step = i((b.messages.len() * 2 + EXPIRE_STEP) as u64);
        tx.execute(
            "DELETE FROM ordo_dedup WHERE (user_id, cmid) IN
               (SELECT user_id, cmid FROM ordo_dedup WHERE ts < $1 ORDER BY ts LIMIT $2)",
            &[&i(before), &step],
        )
        .map_err(db("expiring dedup entries"))?;
        Ok(())
    }

    /// The batch committed: the store's dedup cutoff moves with it.
    fn committed(&self, b: &Batch) {
        let mut before = self.forget_before.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(new) = b.dedup_forget_before_ms {
            *before = (*before).max(new);
        }
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

fn insert_messages(
    tx: &mut Transaction<'_>,
    msgs: &[std::sync::Arc<StoredMessage>],
) -> Result<(), StoreError> {
    let conv: Vec<&str> = msgs.iter().map(|m| m.conv.as_str()).collect();
    let seq: Vec<i64> = msgs.iter().map(|m| i(m.seq)).collect();
    let from: Vec<&str> = msgs.iter().map(|m| m.from.as_str()).collect();
    let device: Vec<&str> = msgs.iter().map(|m| m.device.as_str()).collect();
    let cmid: Vec<&str> = msgs.iter().map(|m| m.cmid.as_str()).collect();
    let body: Vec<&[u8]> = msgs.iter().map(|m| m.body.as_bytes()).collect();
    let reply_to: Vec<Option<i64>> = msgs.iter().map(|m| m.reply_to.map(i)).collect();
    let ts: Vec<i64> = msgs.iter().map(|m| i(m.ts)).collect();
    let event: Vec<Option<String>> = msgs
        .iter()
        .map(|m| m.event.as_ref().and_then(|e| serde_json::to_string(e).ok()))
        .collect();
    let inserted = tx.execute(
        "INSERT INTO ordo_messages (conv, seq, from_user, device, cmid, body, reply_to, ts, event)
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[],
                              $6::bytea[], $7::int8[], $8::int8[], $9::text[])",
        &[
            &conv, &seq, &from, &device, &cmid, &body, &reply_to, &ts, &event,
        ],
    );
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            // The transaction is aborted; which seq it was is read afresh by the caller.
            Err(StoreError::Conflict {
                conv: String::new(),
                seq: 0,
            })
        }
        Err(e) => Err(db("writing messages")(e)),
    }
}

/// The dedup entries of the batch (its messages' and `dedup_put`), the last of each key, kept
/// unless the store holds a newer entry of that key.
fn put_dedup(tx: &mut Transaction<'_>, b: &Batch) -> Result<(), StoreError> {
    let mut last: HashMap<(String, String), DedupRecord> = HashMap::new();
    let own = b.messages.iter().map(|m| DedupRecord::of(m));
    for d in b.dedup_put.iter().cloned().chain(own) {
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
    tx.execute(
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
            .query_one("SELECT COALESCE(MAX(ts), 0) FROM ordo_dedup", &[])
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

    fn commit(&self, batch: std::sync::Arc<Batch>) -> Result<CommitOutcome, StoreError> {
        if batch.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let mut unresolved = self.unresolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, attempt)) = *unresolved {
            // The last commit's answer was lost: what it did is read back, never guessed. Until
            // that is known (and the outcome read), it stays unresolved.
            if self.read_back(attempt)? {
                if id != batch.id {
                    return Err(StoreError::Engine {
                        context: "PostgreSQL, committing a batch".into(),
                        source: format!("batch {id}, whose answer was lost, did commit, but batch {} was given instead of it again", batch.id).into(),
                    });
                }
                let outcome = self.outcome_of(&batch)?;
                *unresolved = None;
                self.committed(&batch);
                return Ok(outcome);
            }
            *unresolved = None;
        }
        let attempt = self
            .attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut c = self.pool.get()?;
        // (A connection that broke is not given back to the pool.)
        let mut tx = c.transaction().map_err(db("starting a commit"))?;
        match self.apply(&mut tx, &batch, attempt) {
            Ok(outcome) => match tx.commit() {
                Ok(()) => {
                    self.committed(&batch);
                    Ok(outcome)
                }
                Err(e) if unreachable(&e) => {
                    // The COMMIT may or may not have taken effect: read it back, at once if
                    // the database can still be reached, else before the next commit.
                    c.discard();
                    drop(c);
                    *unresolved = Some((batch.id, attempt));
                    let took = self.read_back(attempt).map_err(|_| {
                        StoreError::Unreachable(format!(
                            "PostgreSQL (the connection broke during COMMIT: {e}; whether it took effect is read back once the database can be reached)"
                        ))
                    })?;
                    *unresolved = None;
                    if !took {
                        return Err(StoreError::Unreachable(format!(
                            "PostgreSQL (the connection broke during COMMIT, which did not take effect: {e})"
                        )));
                    }
                    self.committed(&batch);
                    Ok(outcome)
                }
                Err(e) => Err(db("committing a batch")(e)),
            },
            Err(e @ StoreError::Unreachable(_)) => {
                drop(tx);
                c.discard();
                Err(e)
            }
            Err(StoreError::Conflict { .. }) => {
                drop(tx);
                // Which seq: read after the rollback.
                let conv: Vec<&str> = batch.messages.iter().map(|m| m.conv.as_str()).collect();
                let seq: Vec<i64> = batch.messages.iter().map(|m| i(m.seq)).collect();
                let row = c
                    .query_opt(
                        "SELECT m.conv, m.seq FROM ordo_messages m
                         JOIN UNNEST($1::text[], $2::int8[]) AS b(conv, seq)
                           ON m.conv = b.conv AND m.seq = b.seq LIMIT 1",
                        &[&conv, &seq],
                    )
                    .map_err(db("finding a seq stored twice"))?;
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
                Err(StoreError::Conflict { conv, seq })
            }
            Err(e) => Err(e),
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
        let mut tx = snapshot(&mut c, "reading history")?;
        let first_seq = tx
            .query_opt("SELECT first_seq FROM ordo_convs WHERE id = $1", &[&conv])
            .map_err(db("reading history"))?
            .map_or(1, |r| u(r.get(0)));
        let (mut fill, start) = match PageFill::start(first_seq, from, to, limit, max_bytes) {
            Ok(f) => f,
            Err(empty) => return Ok(empty),
        };
        let rows = tx
            .query(
                "SELECT conv, seq, from_user, device, cmid, body, reply_to, ts, event
                 FROM ordo_messages WHERE conv = $1 AND seq >= $2 AND seq <= $3
                 ORDER BY seq LIMIT $4",
                &[&conv, &i(start), &i(to), &i64::from(limit)],
            )
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
        let rows = c
            .query(
                "SELECT d.user_id, d.cmid, d.conv, d.seq, d.ts FROM ordo_dedup d
                 JOIN UNNEST($1::text[], $2::text[]) AS k(user_id, cmid)
                   ON d.user_id = k.user_id AND d.cmid = k.cmid",
                &[&user, &cmid],
            )
            .map_err(db("looking up client message ids"))?;
        let found: HashMap<(String, String), DedupRecord> = rows
            .iter()
            .map(dedup_of)
            .map(|d| ((d.user.clone(), d.cmid.clone()), d))
            .collect();
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
        let after = match &from {
            None => None,
            Some(ScanFrom(raw)) => Some(
                serde_json::from_slice::<(u64, String, String)>(raw).map_err(|e| {
                    StoreError::Engine {
                        context: "dedup scan".into(),
                        source: format!("a scan position this store did not make: {e}").into(),
                    }
                })?,
            ),
        };
        let mut c = self.pool.get()?;
        let max = max.max(1);
        let rows = match &after {
            None => c.query(
                "SELECT user_id, cmid, conv, seq, ts FROM ordo_dedup ORDER BY ts, user_id, cmid LIMIT $1",
                &[&i(max as u64)],
            ),
            Some((ts, user, cmid)) => c.query(
                "SELECT user_id, cmid, conv, seq, ts FROM ordo_dedup
                 WHERE (ts, user_id, cmid) > ($1, $2, $3) ORDER BY ts, user_id, cmid LIMIT $4",
                &[&i(*ts), user, cmid, &i(max as u64)],
            ),
        }
        .map_err(db("scanning dedup entries"))?;
        let entries: Vec<DedupRecord> = rows.iter().map(dedup_of).collect();
        let next = (entries.len() >= max)
            .then(|| entries.last())
            .flatten()
            .map(|d| ScanFrom(serde_json::to_vec(&(d.ts, &d.user, &d.cmid)).unwrap_or_default()));
        Ok(DedupScan { entries, next })
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
