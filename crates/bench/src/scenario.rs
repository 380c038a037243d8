//! The scenarios, each written once over [`System`]: every system runs the same code, so a
//! scenario cannot drift between them. A system only sets up its part ([`System`]'s methods);
//! timing, pacing, counting and the run's [`Outcome`] are all here.

use crate::payload::Clock;
use crate::progress::Progress;
use crate::report::{note_behind, Latency, Outcome};
use crate::system::{Bodies, Inbox, Publish, Sent, Subscribe, System, Tally, Task, Until, IDLE};
use crate::{BenchError, CatchupArgs, ConnectionsArgs, FanoutArgs, PairsArgs, SoakArgs};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::time::sleep_until;

/// P sender/receiver pairs: the receivers are set up first, then sender i (for receiver i), one
/// after another; each sender sends `a.messages`, at most `a.window` unconfirmed, or at a fixed
/// total rate with `a.rate` (latency then counts from each message's actual send; how far
/// senders fell behind their schedule is reported as `behind_ms_*`).
pub async fn pairs<S: System>(
    sys: &mut S,
    a: &PairsArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError> {
    let name = sys.name();
    let disk = if a.rate.is_some() {
        sys.disk_floor()?
    } else {
        None
    };
    let (subs, pubs) = set_up_pairs(sys, a.pairs, a.window, a.body_bytes, clock).await?;
    let total = (a.pairs * a.messages) as u64;
    let bar = Progress::new(&format!("{name} pairs"), total);
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
    let groups = sys.cpu_groups();
    let cpu_before: Vec<_> = groups.iter().map(|(_, p)| p.sample()).collect();
    sys.measuring().await;
    let start_us = clock.now_us();
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
                        let at = clock.at(t);
                        if at > Instant::now() {
                            tokio::select! {
                                _ = sleep_until(at.into()) => {}
                                _ = p.idle() => {}
                            }
                        }
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
    let mut behind = Latency::default();
    for s in senders {
        let (s, b) = s.join().await??;
        sent.add(s);
        behind.merge(&b);
    }
    let _ = done.send(true);
    let got = Inbox::join_all(receivers).await?;
    bar.finish();
    let mut o = outcome(name, &sent, sent.sent, &got, start_us, &clock);
    sys.measured(&mut o).await;
    // The server's resident memory at the end of the run (one the bench started).
    if let Some(rss) = sys.server_pid().and_then(rss_bytes) {
        o.extra.insert("server_rss_mib".into(), mib(rss));
    }
    // What a delivered message cost in CPU, per group of processes.
    for ((group, procs), before) in groups.iter().zip(&cpu_before) {
        let used = crate::cpu::used_us(before, &procs.sample());
        if o.delivered > 0 {
            o.extra.insert(
                format!("{group}_cpu_us_per_msg"),
                used as f64 / o.delivered as f64,
            );
        }
    }
    if let Some((p50, p99)) = disk {
        o.extra.insert("disk_fdatasync_p50_ms".into(), p50);
        o.extra.insert("disk_fdatasync_p99_ms".into(), p99);
    }
    note_behind(&mut o, &behind);
    Ok(o)
}

/// One sender and `a.members` receivers of what it sends (the receivers, then the sender, set
/// up in turn: `setup_s`); each message is sent once every receiver has the one before (or
/// nothing new arrived for [`IDLE`]).
pub async fn fanout<S: System>(
    sys: &mut S,
    a: &FanoutArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError> {
    let name = sys.name();
    let setup = Instant::now();
    let subs = sys.group_receivers(a.members, a.body_bytes).await?;
    let mut publisher = sys.group_sender(Bodies::new(clock, a.body_bytes)).await?;
    let setup_s = setup.elapsed().as_secs_f64();
    let bar = Progress::new(&format!("{name} fanout"), (a.members * a.messages) as u64);
    let (done, done_rx) = watch::channel(false);
    let tally = Arc::new(Tally::default());
    let members = a.members as u64;
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|s| {
            let tally = Some((tally.clone(), members));
            let want = a.messages as u64;
            s.receive(Until::new(
                want,
                &done_rx,
                Duration::ZERO,
                *clock,
                &bar,
                tally,
            ))
        })
        .collect();
    let start_us = clock.now_us();
    let trace = std::env::var_os("ORDO_BENCH_TRACE").is_some();
    let mut spans = Vec::with_capacity(a.messages);
    for k in 0..a.messages {
        tally.expect(clock.now_us());
        let Some(stamp) = publisher.send().await else {
            break;
        };
        let all = tally.wait_for(stamp, members);
        tokio::pin!(all);
        let span = tokio::select! {
            span = &mut all => span,
            _ = publisher.idle() => all.await,
        };
        if trace {
            eprintln!("fanout message {k}: {} ms", span / 1000);
        }
        spans.push(span);
    }
    let sent = publisher.finish().await?;
    let _ = done.send(true);
    let got = Inbox::join_all(receivers).await?;
    bar.finish();
    let expected = sent.sent * a.members as u64;
    let mut o = outcome(name, &sent, expected, &got, start_us, clock);
    o.extra.insert("setup_s".into(), setup_s);
    fanout_extra(&mut o, spans);
    Ok(o)
}

/// One receiver set up, then offline; a sender sends `a.messages` to it; the time from its
/// reconnect until it has them all (or nothing new arrived for [`IDLE`]).
pub async fn catchup<S: System>(
    sys: &mut S,
    a: &CatchupArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError> {
    let name = sys.name();
    sys.offline_receiver(a.body_bytes).await?;
    let mut publisher = sys
        .catchup_sender(a.window, Bodies::new(clock, a.body_bytes))
        .await?;
    let filling = Progress::new(&format!("{name} catchup: filling"), a.messages as u64);
    for _ in 0..a.messages {
        if publisher.send().await.is_none() {
            break;
        }
        filling.inc(1);
    }
    let sent = publisher.finish().await?;
    filling.finish();
    let bar = Progress::new(&format!("{name} catchup"), sent.sent);
    let start_us = clock.now_us();
    let device = sys.reconnect_receiver(a.body_bytes).await?;
    let (_done, done_rx) = watch::channel(true);
    let until = Until::new(sent.sent, &done_rx, IDLE, *clock, &bar, None);
    let got = Inbox::join_all(vec![device.receive(until)]).await?;
    bar.finish();
    let mut o = outcome(name, &sent, sent.sent, &got, start_us, clock);
    o.extra.insert("catchup_ms".into(), o.seconds * 1000.0);
    Ok(o)
}

/// `a.connections` idle authenticated connections, `a.concurrency` opened at a time over the
/// source addresses 127.0.0.1 .. 127.0.0.`a.sources`: the server's resident memory before and
/// after, and the connect rate.
pub async fn connections<S: System>(
    sys: &mut S,
    a: &ConnectionsArgs,
) -> Result<Outcome, BenchError> {
    let name = sys.name();
    let pid = server_pid(sys, "connections")?;
    let rss = || rss_bytes(pid).ok_or_else(|| BenchError("cannot read the server's memory".into()));
    let sources: Vec<std::net::IpAddr> = (1..=a.sources.max(1))
        .map(|i| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss()?;
    let bar = Progress::new(&format!("{name} connections"), a.connections as u64);
    let start = Instant::now();
    let mut held = Vec::with_capacity(a.connections);
    let mut pending = VecDeque::new();
    for i in 0..a.connections {
        pending.push_back(Task::spawn(
            sys.idle_connection(i, sources[i % sources.len()]),
        ));
        if pending.len() >= a.concurrency.max(1) {
            if let Some(t) = pending.pop_front() {
                held.push(t.join().await??);
                bar.inc(1);
            }
        }
    }
    for t in pending {
        held.push(t.join().await??);
        bar.inc(1);
    }
    let took = start.elapsed().as_secs_f64();
    bar.finish();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss()?;
    let mut out = Outcome::new(name);
    let n = held.len() as f64;
    out.extra.insert("connections".into(), n);
    out.extra.insert("connects_per_sec".into(), n / took);
    out.extra
        .insert("server_rss_before_mib".into(), mib(before));
    out.extra.insert("server_rss_after_mib".into(), mib(after));
    out.extra.insert(
        "server_bytes_per_connection".into(),
        after.saturating_sub(before) as f64 / n.max(1.0),
    );
    out.finish(took, &Latency::default(), &Latency::default());
    drop(held);
    Ok(out)
}

/// The receivers of `pairs` pairs, then their senders, each with at most `window` messages
/// unconfirmed.
async fn set_up_pairs<S: System>(
    sys: &mut S,
    pairs: usize,
    window: usize,
    body_bytes: usize,
    clock: &Clock,
) -> Result<(Vec<S::Receiver>, Vec<S::Sender>), BenchError> {
    let subs = sys.pair_receivers(pairs, body_bytes).await?;
    let mut pubs = Vec::with_capacity(pairs);
    for i in 0..pairs {
        pubs.push(
            sys.pair_sender(i, window, Bodies::new(clock, body_bytes))
                .await?,
        );
    }
    Ok((subs, pubs))
}

/// The server process whose memory `scenario` reads: only a server the bench started has one.
fn server_pid<S: System>(sys: &S, scenario: &str) -> Result<u32, BenchError> {
    sys.server_pid().ok_or_else(|| {
        BenchError(format!(
            "the {scenario} scenario reads the server's memory, so it needs a server the bench starts itself (without --server)"
        ))
    })
}

/// Bytes in MiB.
fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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

/// A long run into one server: `a.pairs` pairs, each sender with at most `a.window` messages
/// unconfirmed, until `a.messages` are sent in all and at least `a.min_secs` have passed. Every
/// second it samples the server's resident memory and the deliveries so far; it reports the
/// peak and final memory, the deliveries per second of each `a.window_secs` window, the store's
/// size on disk, and then, after a SIGKILL, how long the restarted server takes to answer
/// `/healthz` and to accept a send, and its memory after the restart. With `a.groups`, that many
/// groups are created first, for the restart to load.
pub async fn soak<S: System>(
    sys: &mut S,
    a: &SoakArgs,
    clock: &Clock,
) -> Result<Outcome, BenchError> {
    let name = sys.name();
    let pid = server_pid(sys, "soak")?;
    if a.groups > 0 {
        sys.create_groups(a.groups).await?;
    }
    let (subs, pubs) = set_up_pairs(sys, a.pairs, a.window, a.body_bytes, clock).await?;
    let bar = Progress::new(&format!("{name} soak"), a.messages);
    let (done, done_rx) = watch::channel(false);
    let delivered = Arc::new(AtomicU64::new(0));
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|s| {
            s.receive(
                Until::new(u64::MAX, &done_rx, Duration::ZERO, *clock, &bar, None)
                    .counting(&delivered),
            )
        })
        .collect();
    let rss_before = rss_bytes(pid).unwrap_or(0);
    let started = Instant::now();
    let start_us = clock.now_us();
    let (stop, stop_rx) = watch::channel(false);
    let sampler = Task::spawn(sample(pid, delivered.clone(), stop_rx));
    let share = a.messages.div_ceil(a.pairs as u64);
    let min = Duration::from_secs(a.min_secs);
    let senders: Vec<_> = pubs
        .into_iter()
        .map(|mut p| {
            Task::spawn(async move {
                let mut k = 0u64;
                while k < share || started.elapsed() < min {
                    if p.send().await.is_none() {
                        break;
                    }
                    k += 1;
                }
                p.finish().await
            })
        })
        .collect();
    let mut sent = Sent::default();
    for s in senders {
        sent.add(s.join().await??);
    }
    // Everything sent is delivered (or nothing more came for a while): the receivers may stop.
    let mut last = (delivered.load(Ordering::Relaxed), Instant::now());
    while last.0 < sent.sent && last.1.elapsed() < IDLE {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let _ = done.send(true);
    let got = Inbox::join_all(receivers).await?;
    let _ = stop.send(true);
    let samples = sampler.join().await?;
    bar.finish();
    let mut o = outcome(name, &sent, sent.sent, &got, start_us, clock);
    let peak = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let fin = samples.last().map_or(0, |s| s.rss);
    o.extra.insert("rss_before_mib".into(), mib(rss_before));
    o.extra.insert("groups".into(), a.groups as f64);
    o.extra.insert("rss_peak_mib".into(), mib(peak));
    o.extra.insert("rss_final_mib".into(), mib(fin));
    if let Some(b) = sys.data_bytes() {
        o.extra.insert("data_mib".into(), mib(b));
    }
    let windows = windows(&samples, a.window_secs.max(1));
    for (i, w) in windows.iter().enumerate() {
        o.extra.insert(format!("window_{i:03}_msgs_per_sec"), *w);
    }
    if let (Some(lo), Some(hi)) = (
        windows.iter().copied().reduce(f64::min),
        windows.iter().copied().reduce(f64::max),
    ) {
        o.extra.insert("window_min_msgs_per_sec".into(), lo);
        o.extra.insert("window_max_msgs_per_sec".into(), hi);
    }
    // The restart: SIGKILL, then time to health and to the first accepted send.
    let healthy = sys.kill_and_restart().await?;
    let after = Instant::now();
    let rss_restarted = sys.server_pid().and_then(rss_bytes).unwrap_or(0);
    let mut probe = sys
        .pair_sender(a.pairs, 1, Bodies::new(clock, a.body_bytes))
        .await?;
    let (sent_at, probed) = match probe.send().await {
        Some(_) => (after.elapsed(), probe.finish().await?),
        None => (after.elapsed(), Sent::default()),
    };
    // From the restart to the `accepted` (not to the probe's goodbye).
    let accept = match (probed.accepted, probed.accept.summary()) {
        (1, Some(s)) => Duration::from_secs_f64(s.max / 1000.0),
        _ => {
            return Err(BenchError(
                "the restarted server did not accept a send".into(),
            ))
        }
    };
    let first_accept = healthy + sent_at + accept;
    o.extra
        .insert("restart_healthz_ms".into(), healthy.as_secs_f64() * 1000.0);
    o.extra.insert(
        "restart_first_accept_ms".into(),
        first_accept.as_secs_f64() * 1000.0,
    );
    o.extra
        .insert("rss_after_restart_mib".into(), mib(rss_restarted));
    Ok(o)
}

/// One reading of a soak: seconds since the start, the server's resident memory, deliveries.
struct Sample {
    secs: f64,
    rss: u64,
    delivered: u64,
}

/// Reads the server's memory and the delivery count every second until `stop`.
async fn sample(
    pid: u32,
    delivered: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Sample> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|&s| s) => break,
        }
        out.push(Sample {
            secs: start.elapsed().as_secs_f64(),
            rss: rss_bytes(pid).unwrap_or(0),
            delivered: delivered.load(Ordering::Relaxed),
        });
    }
    out
}

/// Deliveries per second in each whole `every`-second window of the samples (a last, partial
/// window is left out: it holds the run's drain).
fn windows(samples: &[Sample], every: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let (mut from_secs, mut from_count) = (0.0, 0);
    for s in samples {
        if s.secs - from_secs >= every as f64 - 0.5 {
            out.push((s.delivered - from_count) as f64 / (s.secs - from_secs));
            (from_secs, from_count) = (s.secs, s.delivered);
        }
    }
    out
}
