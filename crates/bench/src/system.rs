//! What a system under test is to the scenarios: the [`System`] trait that Ordo
//! ([`crate::ordo`]), Mosquitto ([`crate::mqtt`]) and NATS JetStream ([`crate::jetstream`])
//! implement, and what every implementation shares.
//!
//! A scenario ([`crate::scenario`]) is written once over [`System`]: a system only says how to
//! set up its receivers ([`Subscribe`]) and senders ([`Publish`]) for each scenario and how to
//! clean up after a run; what they sent, had confirmed and received becomes the run's
//! [`Outcome`] in the scenario. Also here: the runs' time limits ([`IDLE`]), set-up of many
//! connections at once ([`set_up`]), stamped message bodies ([`Bodies`]), the receive loop's
//! bookkeeping ([`Receiving`]) and tasks that are aborted when a run fails part way ([`Task`]).

use crate::payload::Clock;
use crate::progress::Progress;
use crate::report::{Latency, Outcome};
use crate::{fail, BenchError};
use futures_util::{StreamExt, TryStreamExt};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

/// How long any wait goes on with nothing new arriving before the run gives up on the rest.
pub const IDLE: Duration = Duration::from_secs(10);
/// Connections (with their subscriptions or consumers) set up at once.
pub const SETUP_CONCURRENCY: usize = 64;

/// A system the scenarios run on, set up for one run (a fresh server, stream or set of client
/// ids) and cleaned up by [`System::close`]. Each method sets up one part of a scenario; the
/// scenario calls them in the order their docs give, awaiting each.
pub trait System {
    type Receiver: Subscribe;
    type Sender: Publish;
    /// An idle connection held open by the `connections` scenario.
    type Idle: Send + 'static;

    /// The name in reports: `ordo`, `mqtt-qos1`, `mqtt-qos2`, `jetstream`.
    fn name(&self) -> &'static str;

    /// `pairs`: receivers 0..`n`, each online and ready, before any sender.
    fn pair_receivers(
        &mut self,
        n: usize,
        body_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Self::Receiver>, BenchError>>;

    /// `pairs`: the sender to receiver `i`, with at most `window` messages unconfirmed.
    fn pair_sender(
        &mut self,
        i: usize,
        window: usize,
        bodies: Bodies,
    ) -> impl Future<Output = Result<Self::Sender, BenchError>>;

    /// `fanout`: the `members` receivers of one group, each online and ready.
    fn group_receivers(
        &mut self,
        members: usize,
        body_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Self::Receiver>, BenchError>>;

    /// `fanout`: the group's one sender (one message unconfirmed at a time).
    fn group_sender(
        &mut self,
        bodies: Bodies,
    ) -> impl Future<Output = Result<Self::Sender, BenchError>>;

    /// `catchup`: the receiver set up so that it will get what is sent, then offline.
    fn offline_receiver(
        &mut self,
        body_bytes: usize,
    ) -> impl Future<Output = Result<(), BenchError>>;

    /// `catchup`: the sender to the offline receiver.
    fn catchup_sender(
        &mut self,
        window: usize,
        bodies: Bodies,
    ) -> impl Future<Output = Result<Self::Sender, BenchError>>;

    /// `catchup`: the offline receiver back online, ready to take what it missed.
    fn reconnect_receiver(
        &mut self,
        body_bytes: usize,
    ) -> impl Future<Output = Result<Self::Receiver, BenchError>>;

    /// `connections`: the process whose resident memory the scenario reads, if the system
    /// knows it.
    fn server_pid(&self) -> Option<u32> {
        None
    }

    /// The processes whose CPU time a run reports per delivered message, by group name (the
    /// server, the database behind it).
    fn cpu_groups(&self) -> Vec<(&'static str, crate::cpu::Procs)> {
        Vec::new()
    }

    /// `soak --groups`: creates `n` groups of two members each (conversations the server must
    /// hold and load again after its restart).
    fn create_groups(&self, n: usize) -> impl Future<Output = Result<(), BenchError>> {
        let name = self.name();
        async move {
            Err(BenchError(format!(
                "{name} cannot create {n} groups for the bench"
            )))
        }
    }

    /// `soak`: kills the server the hard way (SIGKILL) and starts it again on the same data;
    /// says how long until it answered `/healthz`, counted from the restart.
    fn kill_and_restart(&mut self) -> impl Future<Output = Result<Duration, BenchError>> {
        let name = self.name();
        async move {
            Err(BenchError(format!(
                "{name} cannot be killed and restarted by the bench"
            )))
        }
    }

    /// `soak`: bytes the system's data directory holds on disk, if the system knows it.
    fn data_bytes(&self) -> Option<u64> {
        None
    }

    /// `connections`: the `i`-th idle authenticated connection, opened from `from`.
    fn idle_connection(
        &self,
        i: usize,
        from: IpAddr,
    ) -> impl Future<Output = Result<Self::Idle, BenchError>> + Send + 'static {
        let _ = (i, from);
        let name = self.name();
        async move {
            Err(BenchError(format!(
                "the connections scenario is not implemented for {name}"
            )))
        }
    }

    /// The disk's fdatasync latency where the system keeps its data (p50, p99 in ms), measured
    /// before a fixed-rate run: the floor under a latency that waits for the disk.
    fn disk_floor(&self) -> Result<Option<(f64, f64)>, BenchError> {
        Ok(None)
    }

    /// `pairs`: the measured part of the run starts now (a system may read counters of its own).
    fn measuring(&mut self) -> impl Future<Output = ()> {
        async {}
    }

    /// `pairs`: the measured part is over; a system may add figures of its own to `out`.
    fn measured(&mut self, out: &mut Outcome) -> impl Future<Output = ()> {
        let _ = out;
        async {}
    }

    /// Cleans up after the run whatever its `result` (and passes the result on).
    fn close(
        self,
        result: Result<Outcome, BenchError>,
    ) -> impl Future<Output = Result<Outcome, BenchError>>;
}

/// A sender with a window of unconfirmed messages.
pub trait Publish: Send + 'static {
    /// Publishes one message once the window has room, stamped with the time it is sent or else
    /// the time it is handed to the client; returns the stamp, or `None` if the sender cannot go
    /// on ([`Publish::finish`] then says why).
    fn send(&mut self) -> impl Future<Output = Option<u64>> + Send;

    /// Takes the system's confirmations as they come while the scenario waits for something
    /// else (the next message's due time, the members of a fan-out): resolves only if the
    /// sender cannot go on. The default never resolves, for senders whose confirmations are
    /// taken by a task of their own.
    fn idle(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// Waits for the confirmations still due and says what was sent and confirmed.
    fn finish(self) -> impl Future<Output = Result<Sent, BenchError>> + Send;
}

/// What a sender's messages are: bodies of `bytes` bytes stamped on the run's `clock`.
#[derive(Clone, Copy)]
pub struct Bodies {
    pub clock: Clock,
    pub bytes: usize,
}

impl Bodies {
    pub fn new(clock: &Clock, bytes: usize) -> Self {
        Bodies {
            clock: *clock,
            bytes,
        }
    }

    /// The stamp of a message sent now (see [`super::report::Outcome`] on how a fixed-rate run
    /// shows falling behind), and its body.
    pub fn stamped(&self) -> (u64, String) {
        let stamp = self.clock.now_us();
        (stamp, self.clock.body_at(stamp, self.bytes))
    }
}

/// A receiver set up and ready to receive.
pub trait Subscribe {
    /// Receives in a task of its own until [`Receiving::next`] says stop.
    fn receive(self, until: Until) -> Task<Inbox>;
}

/// `set(item)` for every item, [`SETUP_CONCURRENCY`] at a time; fails with the first that fails.
pub async fn set_up<I, T, F>(
    items: impl IntoIterator<Item = I>,
    set: impl FnMut(I) -> F,
) -> Result<Vec<T>, BenchError>
where
    F: Future<Output = Result<T, BenchError>>,
{
    futures_util::stream::iter(items)
        .map(set)
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

/// What the senders sent and the system confirmed.
#[derive(Default)]
pub struct Sent {
    pub sent: u64,
    pub accepted: u64,
    pub accept: Latency,
}

impl Sent {
    pub fn add(&mut self, other: Sent) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.accept.merge(&other.accept);
    }
}

/// What one receiver received.
#[derive(Default)]
pub struct Inbox {
    pub got: u64,
    pub latency: Latency,
    /// When the last message arrived (µs on the run clock).
    pub last_us: u64,
    /// Errors the receiver carried on after (JetStream: failed pulls and acks).
    pub errors: u64,
    /// Why the receiver could not go on, which fails the run.
    error: Option<String>,
}

impl Inbox {
    /// The inbox of a receiver that could not go on, for the reason `error`.
    pub fn failed(error: String) -> Self {
        Inbox {
            error: Some(error),
            ..Inbox::default()
        }
    }

    /// All receivers' messages together; an error if a receiver could not go on.
    pub async fn join_all(receivers: Vec<Task<Inbox>>) -> Result<Inbox, BenchError> {
        let mut all = Inbox::default();
        for r in receivers {
            let inbox = r.join().await?;
            if let Some(e) = inbox.error {
                return Err(BenchError(e));
            }
            all.got += inbox.got;
            all.errors += inbox.errors;
            all.latency.merge(&inbox.latency);
            all.last_us = all.last_us.max(inbox.last_us);
        }
        Ok(all)
    }
}

/// How many receivers have the message a fan-out is waiting for, and when the last of them got
/// it: atomics every receiver updates on arrival (10,000 receivers each telling a channel of
/// each arrival would cost CPU the measured system shares).
#[derive(Default)]
pub struct Tally {
    /// Stamps from here on are the awaited message's: it is stamped after this was set, every
    /// earlier message before.
    floor: AtomicU64,
    count: AtomicU64,
    /// When the last receiver counted got it (µs on the run's clock).
    last_us: AtomicU64,
    all: Notify,
}

impl Tally {
    /// Starts waiting for the next message, to be stamped at `floor_us` or later.
    pub fn expect(&self, floor_us: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.last_us.store(0, Ordering::SeqCst);
        self.floor.store(floor_us, Ordering::SeqCst);
    }

    fn arrived(&self, stamp: u64, at_us: u64, members: u64) {
        if stamp < self.floor.load(Ordering::SeqCst) {
            return;
        }
        self.last_us.fetch_max(at_us, Ordering::SeqCst);
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 >= members {
            self.all.notify_one();
        }
    }

    /// Waits until `members` receivers have the awaited message (stamped `stamp`), or nothing
    /// new arrived for [`IDLE`]; returns the microseconds from its stamp until the last of
    /// them had it.
    pub async fn wait_for(&self, stamp: u64, members: u64) -> u64 {
        let mut seen = 0;
        loop {
            let all = self.all.notified();
            let have = self.count.load(Ordering::SeqCst);
            if have >= members {
                break;
            }
            if tokio::time::timeout(IDLE, all).await.is_err() && have == seen {
                break;
            }
            seen = have;
        }
        self.last_us.load(Ordering::SeqCst).max(stamp) - stamp
    }
}

/// When a receiver stops: once it has `want` messages, or `done` turned true (or was dropped)
/// and then nothing came for `linger`. Each arrival moves `bar` on, and is counted in `tally`
/// too (a fan-out's receivers, `members` of them).
pub struct Until {
    want: u64,
    done: watch::Receiver<bool>,
    linger: Duration,
    clock: Clock,
    bar: Progress,
    tally: Option<(Arc<Tally>, u64)>,
    /// Every arrival of every receiver, counted as it comes (a soak samples it).
    counter: Option<Arc<AtomicU64>>,
}

impl Until {
    pub fn new(
        want: u64,
        done: &watch::Receiver<bool>,
        linger: Duration,
        clock: Clock,
        bar: &Progress,
        tally: Option<(Arc<Tally>, u64)>,
    ) -> Self {
        Until {
            want,
            done: done.clone(),
            linger,
            clock,
            bar: bar.clone(),
            tally,
            counter: None,
        }
    }

    /// Also counts every arrival in `counter`.
    pub fn counting(mut self, counter: &Arc<AtomicU64>) -> Self {
        self.counter = Some(counter.clone());
        self
    }

    /// Starts receiving (the wait for `linger` counts from here at the earliest).
    pub fn start(self) -> Receiving {
        let done_at = (*self.done.borrow()).then(Instant::now);
        Receiving {
            done_at,
            last: Instant::now(),
            until: self,
            inbox: Inbox::default(),
        }
    }
}

/// A receiver's loop under way: what arrived so far, and when it is to stop.
pub struct Receiving {
    pub inbox: Inbox,
    until: Until,
    done_at: Option<Instant>,
    last: Instant,
}

impl Receiving {
    /// What `next` gives, or `None` once the receiver is to stop ([`Until`]).
    pub async fn next<T>(&mut self, next: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(next);
        while self.inbox.got < self.until.want {
            let give_up = self.done_at.map(|d| d.max(self.last) + self.until.linger);
            tokio::select! {
                got = &mut next => return Some(got),
                _ = self.until.done.changed(), if self.done_at.is_none() => {
                    self.done_at = Some(Instant::now());
                }
                _ = sleep_until(give_up.unwrap_or(self.last)), if give_up.is_some() => break,
            }
        }
        None
    }

    /// Waits until the senders are done (at once if they are, or if the scenario is gone).
    pub async fn senders_done(&mut self) {
        let _ = self.until.done.wait_for(|&d| d).await;
    }

    /// Counts a message with `body` that arrived just now, timing it against its stamp.
    pub fn arrived(&mut self, body: &[u8]) {
        let now = self.until.clock.now_us();
        if let Some(stamp) = Clock::stamp_of(body) {
            self.inbox.latency.record_micros(now.saturating_sub(stamp));
            if let Some((tally, members)) = &self.until.tally {
                tally.arrived(stamp, now, *members);
            }
        }
        if let Some(c) = &self.until.counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.inbox.got += 1;
        self.inbox.last_us = now;
        self.last = Instant::now();
        self.until.bar.inc(1);
    }

    /// Stops: the receiver cannot go on, for the reason `error`.
    pub fn fail(&mut self, error: String) {
        self.inbox.error = Some(error);
    }
}

/// A spawned task, aborted if dropped before it is joined, so that a run which fails part way
/// leaves nothing running.
pub struct Task<T>(Option<JoinHandle<T>>);

impl<T: Send + 'static> Task<T> {
    pub fn spawn(f: impl Future<Output = T> + Send + 'static) -> Self {
        Task(Some(tokio::spawn(f)))
    }

    pub async fn join(mut self) -> Result<T, BenchError> {
        match self.0.take() {
            Some(handle) => handle.await.map_err(fail("a benchmark task failed")),
            None => Err(BenchError("a benchmark task was joined twice".into())),
        }
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}
