//! Test-only switches that turn off one of the client state's safeguards, so that the
//! deterministic simulation (`crates/sim`) can show that it catches the bug each one guards
//! against.
//!
//! Compiled only with the `fault-injection` feature, which nothing but `ordo-sim` enables. Every
//! switch is off by default, and off is exactly the normal behaviour: an app never sets them.

/// Safeguards to switch off; see [`ClientState::set_faults`](crate::ClientState::set_faults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Hand a message that arrives behind a hole to the app at once instead of holding it in
    /// the reorder buffer until the hole is filled (breaks G5).
    pub no_reorder: bool,
}
