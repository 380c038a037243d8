//! What goes wrong: the fault profiles a seed picks from, the fault events that strike during
//! the work phase, and the sabotage switches that turn off one safeguard at a time.
//!
//! Faults of the frames themselves (loss, duplication, delay, reordering) are applied where a
//! frame is sent ([`crate::network`]); the events here strike every few hundred milliseconds:
//! a connection cut, a partition (one device, or every device, cut off from the server for
//! seconds: live connections stall or time out, reconnects fail until it ends), a server or a
//! client crash, a clock jump (the server's clock or one device's jumps forward by minutes).

use crate::world::Sim;
use ordo_client::Faults as ClientFaults;
use ordo_core::Faults as CoreFaults;

/// One profile's fault rates. All probabilities are per frame or per effect; the event
/// weights are relative, for the events that strike every `gap` ms.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// One-way latency of a frame, ms.
    pub latency: (u64, u64),
    /// Server to client: a frame is lost, delivered twice, or overtakes earlier ones.
    pub s2c_drop: f64,
    pub s2c_dup: f64,
    pub s2c_reorder: f64,
    /// Client to server: a frame is delivered twice (the copy later), or a frame other than
    /// `send` overtakes earlier ones. A single `send` is never lost or reordered on a live
    /// connection: WebSocket runs over TCP, and the protocol's sender order (G4) rests on it.
    /// Sends are lost only with their connection.
    pub c2s_dup: f64,
    pub c2s_reorder: f64,
    /// Weights of the fault events.
    pub cut: f64,
    pub server_crash: f64,
    pub client_crash: f64,
    pub partition: f64,
    pub clock_jump: f64,
    pub gap: (u64, u64),
    /// How long a partition lasts, ms.
    pub partition_ms: (u64, u64),
    /// A client crashes before carrying out an effect (the rest of its queue is lost).
    pub crash_mid_effects: f64,
    /// The server crashes between the two halves of a commit: after the batch is durable but
    /// before anyone is answered (or, sabotaged, after the answers but before the fsync).
    pub crash_in_commit: f64,
    /// A push (`msg`, `notify`, `receipt`) finds its connection's queue full (the half pushes
    /// may use): it is left out (for a `msg` the core is told) and the device is owed what
    /// replaces it ([`ordo_core::owed`]), sent at the next housekeeping (as the server's router
    /// does when there is room again).
    pub push_full: f64,
}

impl FaultPlan {
    pub fn pick(rng: &mut crate::rng::Rng) -> (&'static str, FaultPlan) {
        let base = FaultPlan {
            latency: (1, 40),
            gap: (200, 2_000),
            partition_ms: (1_000, 20_000),
            ..FaultPlan::default()
        };
        match rng.index(7) {
            0 => ("calm", base),
            1 => (
                "cuts",
                FaultPlan {
                    latency: (1, 250),
                    cut: 1.0,
                    ..base
                },
            ),
            2 => (
                "crashes",
                FaultPlan {
                    cut: 0.3,
                    server_crash: 0.3,
                    client_crash: 0.4,
                    gap: (300, 2_500),
                    crash_mid_effects: 0.01,
                    crash_in_commit: 0.05,
                    ..base
                },
            ),
            3 => (
                "lossy",
                FaultPlan {
                    latency: (1, 150),
                    s2c_drop: 0.05,
                    s2c_dup: 0.05,
                    s2c_reorder: 0.1,
                    c2s_dup: 0.05,
                    c2s_reorder: 0.1,
                    push_full: 0.05,
                    ..base
                },
            ),
            4 => (
                "partitions",
                FaultPlan {
                    latency: (1, 100),
                    cut: 0.2,
                    partition: 1.0,
                    client_crash: 0.1,
                    gap: (500, 3_000),
                    ..base
                },
            ),
            5 => (
                "clocks",
                FaultPlan {
                    latency: (1, 100),
                    cut: 0.3,
                    server_crash: 0.2,
                    client_crash: 0.3,
                    clock_jump: 1.0,
                    gap: (300, 2_000),
                    crash_mid_effects: 0.005,
                    crash_in_commit: 0.05,
                    ..base
                },
            ),
            _ => (
                "all",
                FaultPlan {
                    latency: (1, 200),
                    s2c_drop: 0.03,
                    s2c_dup: 0.03,
                    s2c_reorder: 0.05,
                    c2s_dup: 0.03,
                    c2s_reorder: 0.05,
                    cut: 0.4,
                    server_crash: 0.2,
                    client_crash: 0.4,
                    partition: 0.2,
                    clock_jump: 0.2,
                    gap: (300, 2_000),
                    partition_ms: (1_000, 12_000),
                    crash_mid_effects: 0.005,
                    crash_in_commit: 0.05,
                    push_full: 0.03,
                },
            ),
        }
    }
}

/// One safeguard switched off, to show that the simulation catches the bug it guards against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// Everything as built.
    None,
    /// The core treats every send as new: no dedup lookup (core switch, G2).
    Dedup,
    /// The simulated server releases the core's answers for a batch (`accepted`, pushes,
    /// receipts) before the batch is durable; a crash in between loses what was accepted (G1).
    FsyncBeforeAccept,
    /// The simulated client driver carries out `Transmit` effects before the `Persist`
    /// effects queued before them: acks (and sends) go out before what they stand for is on
    /// disk, and a crash in between leaves the server believing a device has what it has not.
    StoreBeforeAck,
    /// The client hands a message that arrives behind a hole to the app at once, instead of
    /// holding it until the hole is filled (client switch, G5).
    ReorderBuffer,
}

impl Sabotage {
    pub const ALL: [Sabotage; 4] = [
        Sabotage::Dedup,
        Sabotage::FsyncBeforeAccept,
        Sabotage::StoreBeforeAck,
        Sabotage::ReorderBuffer,
    ];

    pub(crate) fn core_faults(self) -> CoreFaults {
        CoreFaults {
            no_dedup: self == Sabotage::Dedup,
        }
    }

    pub(crate) fn client_faults(self) -> ClientFaults {
        ClientFaults {
            no_reorder: self == Sabotage::ReorderBuffer,
        }
    }
}

impl Sim {
    /// A fault event: one of the weighted kinds, at random.
    pub(crate) fn fault(&mut self) {
        self.fault_at = self.now + self.rng.range(self.plan.gap);
        let f = &self.plan;
        let weights = [
            f.cut,
            f.server_crash,
            f.client_crash,
            f.partition,
            f.clock_jump,
        ];
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return;
        }
        let mut w = self.rng.unit() * total;
        let mut pick = weights.len() - 1;
        for (i, x) in weights.iter().enumerate() {
            if w < *x {
                pick = i;
                break;
            }
            w -= x;
        }
        match pick {
            0 => {
                let alive: Vec<_> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.alive)
                    .map(|(s, _)| *s)
                    .collect();
                if !alive.is_empty() {
                    let sid = alive[self.rng.index(alive.len())];
                    self.cut(sid);
                }
            }
            1 => {
                if self.server.up {
                    self.server_crash();
                }
            }
            2 => {
                let running: Vec<usize> = (0..self.devs.len())
                    .filter(|d| self.devs[*d].st.is_some())
                    .collect();
                if !running.is_empty() {
                    let d = running[self.rng.index(running.len())];
                    self.client_crash(d);
                }
            }
            3 => {
                let ms = self.rng.range(self.plan.partition_ms);
                // Mostly one device; sometimes the server's own link, which cuts off everyone.
                let devs: Vec<usize> = if self.rng.chance(0.2) {
                    (0..self.devs.len()).collect()
                } else {
                    vec![self.rng.index(self.devs.len())]
                };
                self.partition(&devs, ms);
            }
            _ => self.clock_jump(),
        }
    }

    /// The server's clock, or one device's, jumps forward by seconds to minutes (an NTP step,
    /// a VM resumed, a laptop waking up). The core and the client state take time as an
    /// argument; from now on they get the jumped time.
    fn clock_jump(&mut self) {
        let by = self.rng.range((5_000, 600_000));
        self.stats.clock_jumps += 1;
        let running: Vec<usize> = (0..self.devs.len())
            .filter(|d| self.devs[*d].st.is_some())
            .collect();
        if running.is_empty() || self.rng.chance(0.35) {
            self.server.clock_offset += by as i64;
            tr!(self, "CLOCK JUMP: the server's clock +{by} ms");
        } else {
            let d = running[self.rng.index(running.len())];
            self.devs[d].skew += by;
            tr!(self, "CLOCK JUMP: {}'s clock +{by} ms", self.name(d));
        }
    }
}
