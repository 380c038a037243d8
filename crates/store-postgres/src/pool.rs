//! The backend's own connections: a few synchronous connections to one database, opened on
//! demand, each with the statements it has prepared (so that a statement is parsed and planned
//! once per connection, and each use is one round trip), and [`redact`] to keep passwords out
//! of messages.
//!
//! The `Store` trait is called from blocking threads (the server's commit and lookup threads),
//! and the synchronous `postgres` client fits them; no pool crate of that client keeps prepared
//! statements with its connections, so this small one does.
//!
//! A synchronous connection runs a small runtime of its own, which cannot be driven, nor
//! dropped, on a thread of an async runtime: a pool may still be dropped there (by the last
//! task holding its store, as a server stops), so its connections are closed by [`close`],
//! which moves them to a thread of their own when it must.

use ordo_store::StoreError;
use postgres::{Client, GenericClient, NoTls, Statement};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Connections the pool opens at most; a caller waits for one past it.
pub const POOL_SIZE: usize = 8;
/// How long a caller waits for a connection of the pool.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How long opening a connection may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection whose peer stops answering is found dead within about this long (TCP
/// keepalives, and unacknowledged data), rather than after the system's two hours.
const DEAD_PEER: Duration = Duration::from_secs(20);

/// A few connections to one database, opened on demand, at most [`POOL_SIZE`].
pub struct Pool {
    url: String,
    config: postgres::Config,
    idle: Mutex<(Vec<(Client, Prepared)>, usize)>,
    freed: Condvar,
}

/// A connection taken from the [`Pool`]; given back when dropped (unless it broke, or was
/// [discarded](Conn::discard)).
pub struct Conn<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    prepared: Prepared,
    discard: bool,
}

/// The statements a connection has prepared, by their text.
#[derive(Default)]
pub struct Prepared(HashMap<&'static str, Statement>);

impl Prepared {
    /// `sql` as a statement prepared on the connection `c` belongs to (on a transaction of it,
    /// too: a prepared statement outlives the transaction).
    pub fn get(
        &mut self,
        c: &mut impl GenericClient,
        sql: &'static str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = c.prepare(sql)?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }
}

impl Conn<'_> {
    /// The client and its prepared statements, to use together (a transaction borrows the
    /// client).
    pub fn split(&mut self) -> (&mut Client, &mut Prepared) {
        (
            self.client.as_mut().expect("present until dropped"),
            &mut self.prepared,
        )
    }

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
            Some(c) if !c.is_closed() && !self.discard => {
                idle.0.push((c, std::mem::take(&mut self.prepared)));
                drop(idle);
                self.pool.freed.notify_one();
            }
            // A broken connection is not kept: the next caller opens a new one. What broke it
            // (the database restarted, or failed over) most likely broke the idle ones too,
            // which would not know until used: they go as well, closed once the pool's lock
            // is let go (closing may wait on the network).
            broken => {
                idle.1 -= 1 + idle.0.len();
                let mut gone: Vec<Client> = idle.0.drain(..).map(|(c, _)| c).collect();
                gone.extend(broken);
                drop(idle);
                self.pool.freed.notify_all();
                close(gone);
            }
        }
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
            if let Some((c, prepared)) = idle.0.pop() {
                return Ok(Conn {
                    pool: self,
                    client: Some(c),
                    prepared,
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
                        prepared: Prepared::default(),
                        discard: false,
                    }),
                    Err(e) => {
                        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                        idle.1 -= 1;
                        // A waiter may open one now.
                        self.freed.notify_one();
                        Err(StoreError::Unreachable(format!(
                            "cannot connect to PostgreSQL at {}: {}",
                            redact(&self.url),
                            crate::text(&e)
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

impl Drop for Pool {
    fn drop(&mut self) {
        let idle = self.idle.get_mut().unwrap_or_else(|p| p.into_inner());
        close(idle.0.drain(..).map(|(c, _)| c).collect());
    }
}

/// Closes `clients`: here, unless this thread drives an async runtime, where a synchronous
/// client can neither be closed nor dropped (either panics); then on a thread of their own,
/// not waited for (closing a connection whose peer is gone may take until it is found dead).
fn close(clients: Vec<Client>) {
    if clients.is_empty() {
        return;
    }
    if tokio::runtime::Handle::try_current().is_err() {
        drop(clients);
        return;
    }
    // Not dropped with the closure should the thread not start: they are then left to the
    // process, which closes their sockets when it ends.
    let clients = std::mem::ManuallyDrop::new(clients);
    let spawned = std::thread::Builder::new()
        .name("ordo-pg-close".into())
        .spawn(move || drop(std::mem::ManuallyDrop::into_inner(clients)));
    if let Err(e) = spawned {
        eprintln!("cannot start a thread to close PostgreSQL connections, left open: {e}");
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
