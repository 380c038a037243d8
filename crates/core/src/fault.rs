//! Test-only switches that turn off one of the core's safeguards, so that the deterministic
//! simulation (`crates/sim`) can show that it catches the bug each one guards against.
//!
//! Compiled only with the `fault-injection` feature, which nothing but `ordo-sim` enables. Every
//! switch is off by default, and off is exactly the normal behaviour: a server never sets them.

/// Safeguards to switch off; see [`Core::set_faults`](crate::Core::set_faults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Treat every `send` as new: no dedup lookup, so a resend is stored again under a new seq
    /// (breaks G2).
    pub no_dedup: bool,
}
