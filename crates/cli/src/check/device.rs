//! The check's devices and the task that drives each: a Rust SDK [`Client`] in this process, or
//! a TypeScript SDK client in a Node process of its own ([`TsDevice`]), both sending at a steady
//! rate, handing every event to the ledger, and crashed and reopened on their stores on command.

use super::ledger::Ledger;
use super::ts_device::{self, TsDevice};
use ordo_client::{Client, ClientOptions, Event, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Longest a TypeScript device may fail to start, in a row, before the check counts it failed.
const TS_START_WAIT: Duration = Duration::from_secs(60);

/// One simulated device.
#[derive(Clone)]
pub struct Device {
    pub user: String,
    pub device: String,
    /// Conversations it sends into: (target, conversation id).
    pub targets: Vec<(Target, String)>,
}

/// What the check tells a device task.
pub enum Ctrl {
    Crash,
    StopSending,
}

/// How a device's client is opened, the first time and after every crash.
pub enum Opener {
    Rust(ClientOptions),
    Ts(ts_device::Spec),
}

/// What the devices count together.
#[derive(Default)]
pub struct Counts {
    /// Crashes the check caused, of either kind of device...
    pub client_kills: AtomicU64,
    /// ...of them, of TypeScript devices.
    pub ts_kills: AtomicU64,
    /// TypeScript device processes that exited, or stopped answering, by themselves.
    pub ts_exits: AtomicU64,
}

/// An open client of either SDK.
enum Dev {
    Rust(Client),
    Ts(Box<TsDevice>),
}

impl Dev {
    /// Opens the client; only a TypeScript device that cannot be started gives up (after
    /// [`TS_START_WAIT`]), saying why.
    async fn open(opener: &Opener) -> Result<Dev, String> {
        match opener {
            Opener::Rust(opts) => loop {
                // After a crash the old driver may still hold the store for a moment.
                match Client::open(opts.clone()).await {
                    Ok(c) => return Ok(Dev::Rust(c)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            },
            Opener::Ts(spec) => {
                let since = Instant::now();
                loop {
                    match TsDevice::open(spec).await {
                        Ok(d) => return Ok(Dev::Ts(Box::new(d))),
                        Err(e) if since.elapsed() >= TS_START_WAIT => {
                            return Err(format!(
                                "{e} (failing for {} s; is the SDK built?)",
                                TS_START_WAIT.as_secs()
                            ))
                        }
                        Err(e) => {
                            eprintln!("ordo check: {e}; starting it again");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }
    }

    async fn next_event(&mut self) -> Option<Event> {
        match self {
            Dev::Rust(c) => c.next_event().await,
            Dev::Ts(d) => d.next_event().await,
        }
    }

    async fn send(&mut self, target: Target, body: String) -> Result<String, String> {
        match self {
            Dev::Rust(c) => c.send(target, body).await.map_err(|e| e.to_string()),
            Dev::Ts(d) => d.send(target, body).await,
        }
    }

    async fn outbox_empty(&mut self) -> bool {
        match self {
            Dev::Rust(c) => c.pending().is_ok_and(|p| p.is_empty()),
            Dev::Ts(d) => d.pending().await.is_ok_and(|n| n == 0),
        }
    }

    /// Crashes it (the check's doing, or after it stopped by itself): the Rust driver stops
    /// mid-flight; the TypeScript process is SIGKILLed. What a TypeScript process printed and
    /// was not taken yet goes to the ledger, and the message it may repeat is noted.
    async fn crash(self, index: usize, ledger: &Mutex<Ledger>) -> Option<String> {
        match self {
            Dev::Rust(c) => {
                c.crash();
                None
            }
            Dev::Ts(d) => {
                let ended = (*d).kill().await;
                if let Ok(mut l) = ledger.lock() {
                    for ev in ended.events {
                        l.event(index, ev);
                    }
                    if let Some(m) = &ended.may_repeat {
                        l.may_repeat(index, m);
                    }
                }
                Some(ended.how)
            }
        }
    }
}

/// [`Dev::open`], a failure to start told to the ledger.
async fn open(index: usize, opener: &Opener, ledger: &Mutex<Ledger>) -> Option<Dev> {
    match Dev::open(opener).await {
        Ok(dev) => Some(dev),
        Err(e) => {
            eprintln!("ordo check: {e}");
            if let Ok(mut l) = ledger.lock() {
                l.device_failure(index, e);
            }
            None
        }
    }
}

/// Drives device `index` until its control channel closes: sends at `rate` per second until
/// told to stop, then reports whether its outbox is empty; crashes and reopens it on command,
/// and reopens it when it stops by itself.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    index: usize,
    d: Device,
    opener: Opener,
    ledger: Arc<Mutex<Ledger>>,
    mut ctrl: mpsc::UnboundedReceiver<Ctrl>,
    rate: f64,
    seed: u64,
    counts: Arc<Counts>,
) {
    let name = format!("{}/{}", d.user, d.device);
    let mut rng = StdRng::seed_from_u64(seed);
    let Some(mut dev) = open(index, &opener, &ledger).await else {
        return;
    };
    let mut sending = true;
    let mut n = 0u64;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outbox_check = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            ev = dev.next_event() => match ev {
                Some(ev) => {
                    if let Ok(mut l) = ledger.lock() {
                        l.event(index, ev);
                    }
                }
                None => {
                    // It stopped by itself (the Rust driver's store failed, the TypeScript
                    // process exited or hung): start over on the same store.
                    if let Some(how) = dev.crash(index, &ledger).await {
                        counts.ts_exits.fetch_add(1, Ordering::Relaxed);
                        eprintln!("ordo check: {name} ended unbidden ({how}); starting it again");
                        if let Ok(mut l) = ledger.lock() {
                            l.unbidden_exit(index, &how);
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let Some(d) = open(index, &opener, &ledger).await else { return };
                    dev = d;
                }
            },
            _ = tick.tick(), if sending => {
                let (target, conv) = d.targets[rng.random_range(0..d.targets.len())].clone();
                n += 1;
                let body = format!("{name}#{n}");
                if let Ok(cmid) = dev.send(target, body).await {
                    if let Ok(mut l) = ledger.lock() {
                        l.sent(index, &conv, cmid);
                    }
                }
            }
            _ = outbox_check.tick(), if !sending => {
                let empty = dev.outbox_empty().await;
                if let Ok(mut l) = ledger.lock() {
                    l.outbox_empty(index, empty);
                }
            }
            c = ctrl.recv() => match c {
                Some(Ctrl::Crash) => {
                    if dev.crash(index, &ledger).await.is_some() {
                        counts.ts_kills.fetch_add(1, Ordering::Relaxed);
                    }
                    counts.client_kills.fetch_add(1, Ordering::Relaxed);
                    let down = Duration::from_millis(rng.random_range(50..800));
                    tokio::time::sleep(down).await;
                    let Some(d) = open(index, &opener, &ledger).await else { return };
                    dev = d;
                }
                Some(Ctrl::StopSending) => sending = false,
                None => return,
            },
        }
    }
}
