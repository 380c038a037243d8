//! redb's and MessagePack's errors as the backend-neutral [`StoreError`]. Helper functions
//! rather than `From` impls: the orphan rule leaves those to `ordo-store`, which knows no engine.

use ordo_store::StoreError;

/// An error of the redb B-tree.
pub(crate) fn engine<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Engine {
        context: "redb".into(),
        source: Box::new(e.into()),
    }
}

/// A record that could not be encoded (it is not written).
pub(crate) fn encoding(e: rmp_serde::encode::Error) -> StoreError {
    StoreError::Engine {
        context: "encoding a record as MessagePack".into(),
        source: Box::new(e),
    }
}

/// The applier thread stopped (`why`): the B-tree no longer follows the log, and nothing more
/// is acknowledged until a restart replays the log.
pub(crate) fn applier_stopped(why: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the store stopped applying logged batches ({why}); restart the server: it replays the log"
    ))
}
