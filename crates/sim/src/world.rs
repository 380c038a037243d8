//! The simulated world: who is in it (the server, six devices, the connections between them),
//! the event loop that always runs the earliest due thing next, and the phases of a run: work
//! under faults, heal, settle, check.
//!
//! Time is one global millisecond counter. Each party reads it through its own clock: the
//! server's may have jumped forward (see [`crate::faults`]), and a device's starts from zero at
//! every process start (as the SDK's driver, which counts from its start) and may jump forward.

use crate::checks::{fail, Kind, Violation};
use crate::client::Dev;
use crate::faults::{FaultPlan, Sabotage};
use crate::network::Conn;
use crate::rng::Rng;
use crate::server::{Server, ServerStore};
use ordo_client::{ClientConfig, ClientSnapshot, MemoryStore, RetryPolicy};
use ordo_core::hub::Hub;
use ordo_core::owner::{Out, Owner};
use ordo_core::{Action, AdminOp, CoreConfig, Retention, SessionId, Snapshot};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Simulated time during which the apps send and faults strike.
pub(crate) const WORK_MS: u64 = 12_000;
/// Sends over the whole run, shared by all devices.
const SEND_BUDGET: u32 = 60;
/// After faults stop, everything must settle within this long.
const SETTLE_MS: u64 = 1_200_000;
const MAX_STEPS: u64 = 400_000;
/// A guard: should `next_deadline` ever lie in the past (it once did; see the client state test
/// `next_deadline_is_after_the_tick_that_could_not_send`), tick again this much later instead of
/// spinning.
const STALE_TICK_MS: u64 = 10;

pub(crate) const DEVICES: [(&str, &str); 6] = [
    ("alice", "phone"),
    ("alice", "laptop"),
    ("bob", "phone"),
    ("carol", "phone"),
    ("carol", "tablet"),
    ("dave", "pc"),
];
pub(crate) const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
pub(crate) const GROUPS: [(&str, &[&str]); 2] = [
    ("team", &["alice", "bob", "carol"]),
    ("ops", &["bob", "carol", "dave"]),
];

/// How much of G7 to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipts {
    /// Delivery only.
    Off,
    /// At the end, after every app read everything: every device's positions reached the
    /// server and every sender shows its messages as Read.
    Final,
    /// Also, at every moment: no Delivered or Read status before every other member got
    /// there by the server's durable positions.
    Strict,
}

/// What one run checks, and which safeguard (if any) it switches off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub receipts: Receipts,
    pub sabotage: Sabotage,
    /// Also check the implementation rules that are invisible to an app (a position sent
    /// before the messages it covers were stored, a message handed on before it was stored, a
    /// push of a message that is not durable). Off, only what the contract promises is
    /// checked: that is how the sabotage runs show a bug's consequences, not just its cause.
    pub rule_checks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            receipts: Receipts::Off,
            sabotage: Sabotage::None,
            rule_checks: true,
        }
    }
}

/// What happened in a run (summed over many runs by the runner).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub sends: u64,
    pub failed: u64,
    pub handed: u64,
    pub cuts: u64,
    pub partitions: u64,
    pub partition_timeouts: u64,
    pub connect_failures: u64,
    pub server_crashes: u64,
    pub client_crashes: u64,
    pub clock_jumps: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Pushes left out for a full queue (a notify owed instead).
    pub pushes_left_out: u64,
    pub idle_ticks: u64,
    pub rejected_retryable: u64,
    /// Dedup keys the core looked up in the store.
    pub lookups: u64,
    /// Conversations (and users' lists of them) loaded from the store.
    pub loads: u64,
    pub steps: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.sends += o.sends;
        self.failed += o.failed;
        self.handed += o.handed;
        self.cuts += o.cuts;
        self.partitions += o.partitions;
        self.partition_timeouts += o.partition_timeouts;
        self.connect_failures += o.connect_failures;
        self.server_crashes += o.server_crashes;
        self.client_crashes += o.client_crashes;
        self.clock_jumps += o.clock_jumps;
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.pushes_left_out += o.pushes_left_out;
        self.idle_ticks += o.idle_ticks;
        self.rejected_retryable += o.rejected_retryable;
        self.lookups += o.lookups;
        self.loads += o.loads;
        self.steps += o.steps;
    }
}

/// The next thing to happen.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Item {
    ServerRestart,
    /// The batch in flight reaches the disk (fsync done).
    Commit,
    Housekeeping,
    /// The store answers the oldest dedup lookup.
    Lookup,
    /// The store lists the next page of its dedup keys for a restarted core's filter.
    Scan,
    /// A page read for a `sync` is served.
    Page,
    /// The owner handles the next request the hub sent it.
    ToOwner,
    /// The hub handles the next event the owner sent it.
    ToHub,
    ToServer(SessionId),
    ToClient(SessionId),
    ClientDetect(SessionId),
    ServerDetect(SessionId),
    Restart(usize),
    Connect(usize),
    Tick(usize),
    App(usize),
    Fault,
}

pub struct Sim {
    pub(crate) seed: u64,
    pub(crate) rng: Rng,
    pub(crate) now: u64,
    pub(crate) ccfg: ClientConfig,
    pub profile: &'static str,
    pub(crate) plan: FaultPlan,
    pub(crate) faults_on: bool,
    pub(crate) workload_on: bool,
    pub(crate) opts: Options,
    pub(crate) server: Server,
    pub(crate) devs: Vec<Dev>,
    pub(crate) conns: BTreeMap<SessionId, Conn>,
    pub(crate) next_sid: SessionId,
    pub(crate) wire_no: u64,
    pub(crate) fault_at: u64,
    pub(crate) sends_left: u32,
    pub trace: Option<Vec<String>>,
    pub stats: Stats,
}

impl Sim {
    pub fn new(seed: u64, opts: Options, trace: bool) -> Sim {
        // Each receipts mode explores its own worlds; a sabotage runs the same worlds as the
        // intact build, so that what it breaks is its doing.
        let salt = match opts.receipts {
            Receipts::Off => 0,
            Receipts::Final => 1 << 40,
            Receipts::Strict => 2 << 40,
        };
        let mut rng = Rng::new(seed.wrapping_add(salt));
        let (profile, plan) = FaultPlan::pick(&mut rng);
        let ccfg = ClientConfig {
            retry: RetryPolicy::default(),
            ack_delay_ms: rng.range((0, 300)),
            ack_every: rng.range((1, 8)),
            reorder_capacity: rng.range((1, 12)) as usize,
            sync_limit: rng.range((1, 6)) as u32,
        };
        let rate = rng.chance(0.3);
        let cfg = CoreConfig {
            push_window: rng.range((1, 8)),
            // Groups over receipt_max_members get no receipts.
            receipt_max_members: if opts.receipts == Receipts::Off && rng.chance(0.2) {
                2
            } else {
                1_000
            },
            rate_per_sec: if rate { 20.0 } else { 0.0 },
            rate_burst: 4.0,
            // Tiny dedup caches, so that eviction, lookups and their races happen on every seed.
            dedup_cache_entries: rng.range((0, 6)) as usize,
            dedup_filter_bytes: [8, 64, 1024][rng.range((0, 2)) as usize],
            // A handful of conversations held, so that loads, evictions and their races happen
            // on every seed too.
            conv_cache_entries: rng.range((0, 4)) as usize,
            // Sometimes room for only a few sends waiting for the store, so that sends are
            // refused as busy and held back (their order kept across the seam).
            max_parked_bytes: if rng.chance(0.3) {
                rng.range((300, 1_500)) as usize
            } else {
                CoreConfig::default().max_parked_bytes
            },
            retention_pass_ms: 2_000,
            ..CoreConfig::default()
        };
        let mut core = Owner::new(cfg.clone(), seed, Snapshot::default());
        core.set_faults(opts.sabotage.core_faults());
        // A new store holds no dedup key: the filter is complete from the start.
        core.dedup_filter_complete();
        let mut store = ServerStore::default();
        for (i, (id, members)) in GROUPS.iter().enumerate() {
            let asked = core
                .admin(
                    i as u64,
                    AdminOp::CreateGroup {
                        id: id.to_string(),
                        members: members.iter().map(|m| m.to_string()).collect(),
                        retention: Retention::default(),
                        name: None,
                        metadata: Default::default(),
                    },
                    0,
                )
                .expect("a valid group");
            // The owner asks whether the group exists: the new store holds nothing.
            for a in asked {
                if let Out::Io(Action::Load { conv }) = a {
                    let _ = core.loaded(&conv, None, 0);
                }
            }
        }
        while let Some(b) = core.take_batch() {
            let outcome = store.apply(&b).expect("setup commits");
            core.commit_done(b.id, outcome);
        }
        let devs = DEVICES
            .iter()
            .enumerate()
            .map(|(i, (user, device))| {
                let mut st = ordo_client::ClientState::new(
                    ccfg.clone(),
                    device,
                    seed.wrapping_mul(31).wrapping_add(i as u64),
                    ClientSnapshot::default(),
                );
                st.set_faults(opts.sabotage.client_faults());
                Dev {
                    user,
                    device,
                    st: Some(st),
                    db: MemoryStore::default(),
                    conn: None,
                    connect_at: Some(rng.range((0, 300))),
                    attempt: 0,
                    restart_at: None,
                    boot_at: 0,
                    skew: 0,
                    last_tick: 0,
                    cut_off_until: 0,
                    boots: 0,
                    app_at: rng.range((0, 1_000)),
                    intents: HashMap::new(),
                    sends: Vec::new(),
                    seen: BTreeMap::new(),
                    status: HashMap::new(),
                    refused: HashSet::new(),
                    counter: 0,
                }
            })
            .collect();
        let fault_at = rng.range(plan.gap);
        let housekeeping_at = rng.range((500, 3_000));
        Sim {
            seed,
            rng,
            now: 0,
            ccfg,
            profile,
            plan,
            faults_on: true,
            workload_on: true,
            opts,
            server: Server {
                hub: Hub::new(cfg.clone()),
                cfg,
                owner: core,
                to_owner: VecDeque::new(),
                to_hub: VecDeque::new(),
                store,
                up: true,
                restart_at: None,
                incarnation: 0,
                in_flight: None,
                clock_offset: 0,
                housekeeping_at,
                lookups: Vec::new(),
                scan: None,
                pages: Vec::new(),
                owed: BTreeMap::new(),
            },
            devs,
            conns: BTreeMap::new(),
            next_sid: 1,
            wire_no: 0,
            fault_at,
            sends_left: SEND_BUDGET,
            trace: trace.then(Vec::new),
            stats: Stats::default(),
        }
    }

    pub(crate) fn name(&self, d: usize) -> String {
        format!("{}/{}", self.devs[d].user, self.devs[d].device)
    }

    /// The whole run: work with faults, heal, settle, check; with receipts, read everything,
    /// settle and check the positions and statuses too.
    pub fn run(&mut self) -> Result<(), Violation> {
        tr!(
            self,
            "profile {} sabotage {:?} client {:?}",
            self.profile,
            self.opts.sabotage,
            self.ccfg
        );
        self.run_until(WORK_MS)?;
        self.heal();
        self.settle()?;
        self.check_final()?;
        if self.opts.receipts != Receipts::Off {
            self.check_positions(false)?;
            self.read_everything()?;
            self.settle()?;
            self.check_positions(true)?;
        }
        Ok(())
    }

    fn run_until(&mut self, end: u64) -> Result<(), Violation> {
        while let Some((t, item)) = self.next_item() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            self.stats.steps += 1;
            if self.stats.steps > MAX_STEPS {
                return fail(Kind::Stuck, format!("still busy after {MAX_STEPS} steps"));
            }
            self.step(item)?;
        }
        Ok(())
    }

    /// Faults off, the apps stop, partitions end, the server and every client are up again.
    /// With lossy frames, every connection is also cut: a lost `synced` or `convs` is not
    /// something a client over TCP must survive without reconnecting.
    fn heal(&mut self) {
        tr!(self, "--- heal ---");
        self.faults_on = false;
        self.workload_on = false;
        if !self.server.up {
            self.server.restart_at = Some(self.now);
        }
        for d in 0..self.devs.len() {
            self.devs[d].cut_off_until = 0;
            if self.devs[d].st.is_none() {
                self.devs[d].restart_at = Some(self.now);
            }
        }
        if self.plan.s2c_drop > 0.0 {
            let now = self.now;
            for c in self.conns.values_mut().filter(|c| c.alive) {
                c.close();
                c.client_detect = Some(now + 1);
                c.server_detect = Some(now + 1);
            }
        }
    }

    fn settle(&mut self) -> Result<(), Violation> {
        let limit = self.now + SETTLE_MS;
        self.run_until(limit)?;
        if let Some((t, item)) = self.next_item() {
            let outboxes: Vec<String> = (0..self.devs.len())
                .map(|d| format!("{}: {}", self.name(d), self.devs[d].db.outbox.len()))
                .collect();
            return fail(
                Kind::Stuck,
                format!(
                    "not quiescent {} s after the faults stopped: next {item:?} at {t}; outboxes {outboxes:?}",
                    SETTLE_MS / 1000
                ),
            );
        }
        Ok(())
    }

    pub(crate) fn next_item(&self) -> Option<(u64, Item)> {
        let mut best: Option<(u64, Item)> = None;
        let mut offer = |t: u64, it: Item| {
            if best.as_ref().is_none_or(|(b, _)| t < *b) {
                best = Some((t, it));
            }
        };
        if let Some(t) = self.server.restart_at {
            offer(t, Item::ServerRestart);
        }
        if let Some(f) = &self.server.in_flight {
            offer(f.at, Item::Commit);
        }
        if self.faults_on && self.server.up {
            offer(self.server.housekeeping_at, Item::Housekeeping);
        }
        if let Some(l) = self.server.lookups.first() {
            offer(l.at, Item::Lookup);
        }
        if let Some(scan) = &self.server.scan {
            offer(scan.at, Item::Scan);
        }
        if let Some(p) = self.server.pages.iter().min_by_key(|p| p.at) {
            offer(p.at, Item::Page);
        }
        if let Some((at, _)) = self.server.to_owner.front() {
            offer(*at, Item::ToOwner);
        }
        if let Some((at, _)) = self.server.to_hub.front() {
            offer(*at, Item::ToHub);
        }
        for (sid, c) in &self.conns {
            let held = self.devs[c.dev].cut_off_until;
            if (c.alive || c.drain_c2s) && !c.reading {
                if let Some(i) = c.next_c2s(held) {
                    offer(c.c2s[i].0.max(held), Item::ToServer(*sid));
                }
            }
            if c.alive {
                if let Some(i) = c.next_s2c(held) {
                    offer(c.s2c[i].0.max(held), Item::ToClient(*sid));
                }
            }
            if let Some(t) = c.client_detect {
                offer(t, Item::ClientDetect(*sid));
            }
            if let Some(t) = c.server_detect {
                offer(t, Item::ServerDetect(*sid));
            }
        }
        for (d, dev) in self.devs.iter().enumerate() {
            if let Some(t) = dev.restart_at {
                offer(t, Item::Restart(d));
            }
            let Some(st) = &dev.st else { continue };
            if let Some(t) = dev.connect_at {
                offer(t, Item::Connect(d));
            }
            if let Some(t) = st.next_deadline() {
                // The deadline is on the device's clock.
                let t = if t <= dev.last_tick {
                    dev.last_tick + STALE_TICK_MS
                } else {
                    t
                };
                offer(dev.to_sim_time(t), Item::Tick(d));
            }
            if self.workload_on {
                offer(dev.app_at, Item::App(d));
            }
        }
        if self.faults_on {
            offer(self.fault_at, Item::Fault);
        }
        best
    }

    fn step(&mut self, item: Item) -> Result<(), Violation> {
        match item {
            Item::ServerRestart => {
                self.server_restart();
                Ok(())
            }
            Item::Commit => self.commit(),
            Item::Housekeeping => self.housekeeping(),
            Item::Lookup => self.answer_lookup(),
            Item::Scan => {
                self.scan_step();
                Ok(())
            }
            Item::Page => self.serve_page(),
            Item::ToOwner => self.owner_receive(),
            Item::ToHub => self.hub_receive(),
            Item::ToServer(sid) => self.deliver_to_server(sid),
            Item::ToClient(sid) => self.deliver_to_client(sid),
            Item::ClientDetect(sid) => self.client_detect(sid),
            Item::ServerDetect(sid) => {
                self.server_detect(sid);
                Ok(())
            }
            Item::Restart(d) => self.client_restart(d),
            Item::Connect(d) => self.connect(d),
            Item::Tick(d) => self.client_tick(d),
            Item::App(d) => self.app(d),
            Item::Fault => {
                self.fault();
                Ok(())
            }
        }
    }
}
