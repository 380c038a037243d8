//! End-to-end tests: the real `ordo` binary, real WebSockets, real kills; one test binary
//! (one link of the whole stack) with a module per concern.
//!
//! Each test starts its own server on a free port and a temporary data directory (see
//! [`common`], over the test kit). They check the contract (docs/contract.md) from the outside:
//! order (G3, G4), idempotence (G2), durability across SIGKILL and SIGTERM (G1, G6), catch-up
//! after a long offline period (G5, G6), receipts (G7), authorization (G8), bad input (G9) and the limits on connections ([`limits`]);
//! the SDK and the `ordo` commands against a real server ([`sdk`]) and when it cannot be had
//! ([`client_tools`]); configuration, age retention
//! and slow readers ([`operations`]); and a short chaos run of `ordo check` ([`check`]).

mod common;

mod authorization;
mod backend;
mod bad_input;
mod catchup;
mod check;
mod client_tools;
mod dedup;
mod encodings;
mod jwt;
mod limits;
mod operations;
mod order;
mod postgres;
mod receipts;
mod reload;
mod retention;
mod sdk;
mod sigkill;
mod sigterm;
mod tls;
mod webhook;
