//! Library side of the `ordo` command: a minimal protocol client ([`wire`]) used by
//! `ordo bench` and by the end-to-end tests against a real server.

pub mod wire;
