//! The end-to-end suite again, with every server it starts on PostgreSQL (a schema of its own in
//! the database `ORDO_TEST_POSTGRES` names, by default the local server's `test` database):
//! the same modules as `e2e`, so both stores are held to the same tests. See `e2e/common.rs`.

#[path = "e2e/main.rs"]
mod e2e;
