//! Behaviour tests of the core's delivery rules (contract G1-G9, docs/contract.md), through the
//! public API only. The core's in-memory [`MemoryStore`] plays the durable store: it applies
//! committed batches the way any backend must, and rebuilds a [`Snapshot`] for restarts.
//!
//! The modules:
//!
//! - `support`: the harness (a core with its store and a clock), shared starting points, and
//!   views of the core's actions;
//! - `sequencing`: G1 / G3, seqs and group commit: nothing visible before it is durable;
//! - `sender_fifo`: G4, a session's sends numbered in send order, also under the rate limit;
//! - `dedup`: G2, idempotent send: resends answered with the original answer, the dedup window;
//! - `direct`: direct conversations, created by a send to a user;
//! - `authorization`: G8, non-members and unknown conversations;
//! - `limits`: G9, bad input and limits: body size, ids and arguments, the rate limit;
//! - `loading`: conversations loaded on demand and evicted, invisible to clients;
//! - `fanout`: `msg` pushes, `notify`, the push window, large groups, sync plans;
//! - `cursors_receipts`: delivered and read cursors, and G7 receipts;
//! - `retention`: count and age retention, and `first_seq`;
//! - `recovery`: restart from the store and storage failure (G2, G3, G6 across crashes);
//! - `admin`: admin requests and membership changes;
//! - `partitions`: what a cluster's node asks of the core when a partition moves;
//! - `property`: random interleavings of sends, resends, commits, acks, syncs and crashes,
//!   checked against a model of every rule.
//!
//! [`MemoryStore`]: ordo_core::MemoryStore
//! [`Snapshot`]: ordo_core::Snapshot

mod admin;
mod authorization;
mod backend_races;
mod cursors_receipts;
mod dedup;
mod direct;
mod fanout;
mod limits;
mod loading;
mod partitions;
mod property;
mod recovery;
mod retention;
mod sender_fifo;
mod sequencing;
mod support;
