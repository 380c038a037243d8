//! Behaviour tests of the client state machine ([`ClientState`]), through its public API only.
//!
//! Frames are fed by hand and the effects checked precisely: what is stored, sent and told to
//! the app, and in which order. Every effect is carried out on the client crate's reference
//! store ([`MemoryStore`]), which refuses writes that break its rules, and checked against the
//! ordering rules that hold for every effect (`support::carry_out`). The deterministic
//! simulation of clients against the real server core is the `ordo-sim` crate (`crates/sim`).
//!
//! The modules:
//!
//! - `support`: the harness (a client under test with its store) and the frame builders;
//! - `sending`: the outbox, client message ids, resends on the retry policy, rejections and
//!   `accepted`;
//! - `receiving`: the reorder buffer, holes and the syncs that fill them, notify and paging,
//!   duplicates, stored before handed;
//! - `acks`: cumulative acknowledgements, batched by delay or by count;
//! - `history`: retention gaps and epoch resets;
//! - `receipts`: receipts and overviews moving our messages' statuses, and reads;
//! - `restart`: a client rebuilt from its store after a crash.
//!
//! [`ClientState`]: ordo_client::ClientState
//! [`MemoryStore`]: ordo_client::MemoryStore

mod acks;
mod history;
mod receipts;
mod receiving;
mod restart;
mod sending;
mod support;
