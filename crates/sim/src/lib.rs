//! A deterministic simulation of Ordo: the real server core (its two halves, the session
//! [`ordo_core::hub::Hub`] and the conversation [`ordo_core::owner::Owner`], run apart with a
//! delaying channel between them) and the real client state machines ([`ordo_client::ClientState`]) talking over a simulated network, with a
//! simulated disk on each side and simulated clocks, under faults. It checks the delivery
//! contract of docs/contract.md (G1-G7) while it runs and once everything has settled.
//!
//! One run ([`Sim`]) is fully determined by its seed: six devices of four users, two groups and
//! the direct conversations between them; the apps send and read at random; a fault profile,
//! also drawn from the seed, decides what goes wrong (frames lost, duplicated, delayed and
//! reordered, pushes left out for a full queue with a `notify` owed, connections cut, devices partitioned away with their reconnects failing, the
//! server and the clients killed and restarted from what they had made durable, clocks jumping
//! forward). Then the faults stop, everything must settle, and the end state is checked.
//!
//! The crate's modules, in the order a frame meets them:
//!
//! - [`rng`]: the seeded random generator;
//! - [`faults`]: the fault profiles, the fault events, and the sabotage switches;
//! - [`world`]: the simulated world, its event loop and its phases (work, heal, settle);
//! - [`network`]: connections, frames in flight, cuts and partitions;
//! - [`server`]: the server side: the core, its durable store, group commit, crashes;
//! - [`client`]: the client side: each device's state machine, its local store, its driver and
//!   its app;
//! - [`checks`]: what counts as a violation, and every check, continuous and at quiescence;
//! - [`runner`]: runs seeds, reports failures with their seed and trace, hunts for the bugs a
//!   sabotage plants.
//!
//! Beside it, [`leases`] explores a model of a cluster's partition ownership (leases, fencing
//! epochs, takeovers while a commit is under way, a paused process and its replacement): every
//! interleaving up to a depth, checking that no history ever forks.
//!
//! A failure names its seed; `ORDO_SIM_SEED=<n>` replays that seed alone and prints its whole
//! trace, and `ORDO_SIM_SEEDS=<n>` runs `n` seeds (from `ORDO_SIM_FIRST`, default 0).
//!
//! The sabotage runs ([`Sabotage`]) switch one safeguard off: two of the switches are in the
//! harness (the server answering before its fsync, the client driver transmitting before it
//! persists), two in the core and the client state behind their test-only `fault-injection`
//! feature (dedup, the reorder buffer), which only this crate enables.

/// Appends a line to the run's trace, if it keeps one (formatting costs nothing otherwise).
macro_rules! tr {
    ($s:expr, $($arg:tt)*) => {
        if $s.trace.is_some() {
            let line = format!("{:>8} {}", $s.now, format!($($arg)*));
            if let Some(t) = $s.trace.as_mut() {
                t.push(line);
            }
        }
    };
}

pub mod checks;
pub mod client;
pub mod faults;
pub mod leases;
pub mod network;
pub mod rng;
pub mod runner;
pub mod server;
pub mod world;

pub use checks::{Kind, Violation};
pub use faults::Sabotage;
pub use runner::{hunt, run_seed, seeds_from_env, simulate, Hunt, Outcome};
pub use world::{Options, Receipts, Sim, Stats};
