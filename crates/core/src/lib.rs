//! Ordo's delivery rules as a sans-IO state machine.
//!
//! The [`Core`] owns every rule of the contract that does not need I/O: who may read and write a
//! conversation, which seq a message gets, whether a send is a duplicate, which device cursor and
//! which receipt moved, what to push to whom and when to fall back to `notify`, what retention
//! removes. It never reads a clock, touches a disk or a socket: the caller passes the time in,
//! persists the [`Batch`]es it hands out, reports back when a batch is durable, and carries out
//! the [`Action`]s it gets. The server drives it with tokio and redb; a simulation can drive it
//! with a fake network and disk. Both hand it each decoded client frame through one entry point,
//! [`Core::on_frame`] (see [`frame`]), so that they run the same rules.
//!
//! Durability rule: nothing a batch contains becomes visible to any client (no `accepted`, no
//! `msg`, no `receipt`, no admin answer) until the caller reports that batch committed.
//!
//! Every send looks names up in several maps, so they hash with foldhash (seeded at random per
//! process, as hashbrown does by default) rather than the standard SipHash, which cost several
//! per cent of the server's CPU per message.

pub mod config;
pub mod conv;
pub mod dedup;
pub mod engine;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod frame;
pub mod held_back;
pub mod hub;
pub mod line;
pub mod loading;
pub mod memory_store;
pub mod model;
pub mod owed;
pub mod owner;
pub mod partition;
pub mod posting;
pub mod rate;
pub mod rng;
pub mod seam;
pub mod session;

pub use config::CoreConfig;
pub use engine::{
    per_session, Action, AdminOp, AdminReply, Core, CoreStats, SendRequest, SessionId, SyncPlan,
    Ticket,
};
pub use error::CoreError;
#[cfg(feature = "fault-injection")]
pub use fault::Faults;
pub use frame::{may_read, Handled};
pub use memory_store::{MemoryStore, SeqStoredTwice};
pub use model::*;
pub use posting::{AdminPost, Posted};
