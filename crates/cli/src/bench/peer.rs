//! Helpers shared by the peer systems' modules ([`super::mqtt`], [`super::jetstream`]).
//!
//! The scenarios themselves run here ([`pairs`], [`fanout`], [`catchup`]), the same for every
//! peer system: a system module says how to set up its receivers ([`Subscribe`]) and senders
//! ([`Publish`]) and cleans up after the run; what they sent, had confirmed and received becomes
//! the run's [`Outcome`] here. Also shared: the runs' time limits ([`IDLE`]), set-up of many
//! connections at once ([`set_up`]), stamped message bodies ([`Bodies`]), the receive loop's
//! bookkeeping ([`Receiving`]) and tasks that are aborted when a run fails part way ([`Task`]).

use super::payload::Clock;
use super::progress::Progress;
use super::report::{Latency, Outcome};
use super::{fail, progress, BenchError, CatchupArgs, FanoutArgs, PairsArgs};
use futures_util::{StreamExt, TryStreamExt};
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

/// How long any wait goes on with nothing new arriving before the run gives up on the rest.
pub const IDLE: Duration = Duration::from_secs(10);
/// Connections (with their subscriptions or consumers) set up at once.
pub const SETUP_CONCURRENCY: usize = 64;

/// A sender with a window of unconfirmed messages.
pub trait Publish: Send + 'static {
    /// Publishes one message once the window has room, stamped with the time it is sent or else the time it is handed to the client; returns the stamp, or `None` if the
    /// sender cannot go on ([`Publish::finish`] then says why).
    fn send(&mut self) -> impl Future<Output = Option<u64>> + Send;

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

/// P sender/receiver pairs: `receivers` are set up first, then sender i (for receiver i) is
/// `start(i)`, one after another; each sender sends `a.messages`, at most `a.window`
/// unconfirmed or at a fixed rate.
pub async fn pairs<S, P, F>(
    system: &str,
    receivers: impl Future<Output = Result<Vec<S>, BenchError>>,
    mut start: impl FnMut(usize) -> F,
    a: &PairsArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError>
where
    S: Subscribe,
    P: Publish,
    F: Future<Output = Result<P, BenchError>>,
{
    let subs = receivers.await?;
    let mut pubs = Vec::with_capacity(a.pairs);
    for i in 0..a.pairs {
        pubs.push(start(i).await?);
    }
    let total = (a.pairs * a.messages) as u64;
    let bar = progress(&format!("{system} pairs"), total);
    let (done, done_rx) = watch::channel(false);
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|s| {
            s.receive(Until::new(
                a.messages as u64,
                &done_rx,
                IDLE,
                *clock,
                &bar,
                None,
            ))
        })
        .collect();
    let start_us = clock.now_us();
    let mut behind = Latency::default();
    let per_sender = a.rate.map(|r| r / a.pairs as f64);
    let messages = a.messages;
    let clock = *clock;
    let senders: Vec<_> = pubs
        .into_iter()
        .map(|mut p| {
            Task::spawn(async move {
                let mut behind = Latency::default();
                for k in 0..messages {
                    let due = per_sender.map(|r| start_us + (k as f64 * 1e6 / r) as u64);
                    if let Some(t) = due {
                        sleep_until(clock.at(t).into()).await;
                    }
                    let Some(stamp) = p.send().await else {
                        break;
                    };
                    if let Some(t) = due {
                        behind.record_micros(stamp.saturating_sub(t));
                    }
                }
                Ok::<_, BenchError>((p.finish().await?, behind))
            })
        })
        .collect();
    let mut sent = Sent::default();
    for s in senders {
        let (s, b) = s.join().await??;
        sent.add(s);
        behind.merge(&b);
    }
    let _ = done.send(true);
    let got = Inbox::join_all(receivers).await?;
    bar.finish();
    let mut o = outcome(system, &sent, sent.sent, &got, start_us, &clock);
    super::report::note_behind(&mut o, &behind);
    Ok(o)
}

/// One sender and `a.members` receivers of what it sends (`receivers`, then `publisher`, set up
/// in turn: `setup_s`); each message is sent once every receiver has the one before (or nothing
/// new arrived for [`IDLE`]).
pub async fn fanout<S: Subscribe, P: Publish>(
    system: &str,
    receivers: impl Future<Output = Result<Vec<S>, BenchError>>,
    publisher: impl Future<Output = Result<P, BenchError>>,
    a: &FanoutArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError> {
    let setup = Instant::now();
    let subs = receivers.await?;
    let mut publisher = publisher.await?;
    let setup_s = setup.elapsed().as_secs_f64();
    let bar = progress(&format!("{system} fanout"), (a.members * a.messages) as u64);
    let (done, done_rx) = watch::channel(false);
    let (arrived, mut arrivals) = mpsc::unbounded_channel();
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|s| {
            let to = Some(arrived.clone());
            let want = a.messages as u64;
            s.receive(Until::new(want, &done_rx, Duration::ZERO, *clock, &bar, to))
        })
        .collect();
    drop(arrived);
    let start_us = clock.now_us();
    let mut spans = Vec::with_capacity(a.messages);
    for _ in 0..a.messages {
        let Some(stamp) = publisher.send().await else {
            break;
        };
        spans.push(wait_for_all(&mut arrivals, stamp, a.members).await);
    }
    let sent = publisher.finish().await?;
    let _ = done.send(true);
    let got = Inbox::join_all(receivers).await?;
    bar.finish();
    let expected = sent.sent * a.members as u64;
    let mut o = outcome(system, &sent, expected, &got, start_us, clock);
    o.extra.insert("setup_s".into(), setup_s);
    fanout_extra(&mut o, spans);
    Ok(o)
}

/// One receiver set up (`offline`, which leaves it offline), then `publisher`, which sends
/// `a.messages` to it; the time from its reconnect (`reconnect`) until it has them all (or
/// nothing new arrived for [`IDLE`]). The steps run in that order, each awaited in turn.
pub async fn catchup<S: Subscribe, P: Publish>(
    system: &str,
    offline: impl Future<Output = Result<(), BenchError>>,
    publisher: impl Future<Output = Result<P, BenchError>>,
    reconnect: impl Future<Output = Result<S, BenchError>>,
    a: &CatchupArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError> {
    offline.await?;
    let mut publisher = publisher.await?;
    for _ in 0..a.messages {
        if publisher.send().await.is_none() {
            break;
        }
    }
    let sent = publisher.finish().await?;
    let bar = progress(&format!("{system} catchup"), sent.sent);
    let start_us = clock.now_us();
    let device = reconnect.await?;
    let (_done, done_rx) = watch::channel(true);
    let until = Until::new(sent.sent, &done_rx, IDLE, *clock, &bar, None);
    let got = Inbox::join_all(vec![device.receive(until)]).await?;
    bar.finish();
    let mut o = outcome(system, &sent, sent.sent, &got, start_us, clock);
    o.extra.insert("catchup_ms".into(), o.seconds * 1000.0);
    Ok(o)
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

/// Waits until `members` receivers have the message stamped `stamp` (or nothing arrived for
/// [`IDLE`]); returns the microseconds from its send until the last of them had it.
async fn wait_for_all(
    arrivals: &mut mpsc::UnboundedReceiver<(u64, u64)>,
    stamp: u64,
    members: usize,
) -> u64 {
    let (mut have, mut last) = (0, stamp);
    while have < members {
        match timeout(IDLE, arrivals.recv()).await {
            Ok(Some((s, at))) if s == stamp => {
                have += 1;
                last = last.max(at);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    last - stamp
}

/// `fanout_ms_p50` and `fanout_ms_max`: per message, the time until the last member had it.
fn fanout_extra(o: &mut Outcome, mut spans_us: Vec<u64>) {
    spans_us.sort_unstable();
    if let (Some(mid), Some(max)) = (spans_us.get(spans_us.len() / 2), spans_us.last()) {
        o.extra.insert("fanout_ms_p50".into(), *mid as f64 / 1000.0);
        o.extra.insert("fanout_ms_max".into(), *max as f64 / 1000.0);
    }
}

/// The run's outcome: `seconds` from `start_us` to the last delivery, `lost` the deliveries
/// `expected` that did not arrive (and `receive_errors` if receivers carried on after any).
fn outcome(
    system: &str,
    sent: &Sent,
    expected: u64,
    got: &Inbox,
    start_us: u64,
    clock: &Clock,
) -> Outcome {
    let mut o = Outcome::new(system);
    o.sent = sent.sent;
    o.accepted = sent.accepted;
    o.delivered = got.got;
    o.extra
        .insert("lost".into(), expected.saturating_sub(got.got) as f64);
    if got.errors > 0 {
        o.extra.insert("receive_errors".into(), got.errors as f64);
    }
    let end_us = if got.got > 0 {
        got.last_us
    } else {
        clock.now_us()
    };
    o.finish(
        end_us.saturating_sub(start_us) as f64 / 1e6,
        &sent.accept,
        &got.latency,
    );
    o
}

/// What the senders sent and the system confirmed.
#[derive(Default)]
pub struct Sent {
    pub sent: u64,
    pub accepted: u64,
    pub accept: Latency,
}

impl Sent {
    fn add(&mut self, other: Sent) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.accept.merge(&other.accept);
    }
}

/// What one receiver received.
#[derive(Default)]
pub struct Inbox {
    got: u64,
    latency: Latency,
    /// When the last message arrived (µs on the run clock).
    last_us: u64,
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
    async fn join_all(receivers: Vec<Task<Inbox>>) -> Result<Inbox, BenchError> {
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

/// When a receiver stops: once it has `want` messages, or `done` turned true (or was dropped)
/// and then nothing came for `linger`. Each arrival moves `bar` on, and its (stamp, time) goes
/// to `arrivals` too.
pub struct Until {
    want: u64,
    done: watch::Receiver<bool>,
    linger: Duration,
    clock: Clock,
    bar: Progress,
    arrivals: Option<mpsc::UnboundedSender<(u64, u64)>>,
}

impl Until {
    fn new(
        want: u64,
        done: &watch::Receiver<bool>,
        linger: Duration,
        clock: Clock,
        bar: &Progress,
        arrivals: Option<mpsc::UnboundedSender<(u64, u64)>>,
    ) -> Self {
        Until {
            want,
            done: done.clone(),
            linger,
            clock,
            bar: bar.clone(),
            arrivals,
        }
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

    /// Counts a message with `body` that arrived just now, timing it against its stamp.
    pub fn arrived(&mut self, body: &[u8]) {
        let now = self.until.clock.now_us();
        if let Some(stamp) = Clock::stamp_of(body) {
            self.inbox.latency.record_micros(now.saturating_sub(stamp));
            if let Some(to) = &self.until.arrivals {
                let _ = to.send((stamp, now));
            }
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
