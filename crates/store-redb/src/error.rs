//! redb's and MessagePack's errors as the backend-neutral [`StoreError`]. Helper functions
//! rather than `From` impls: the orphan rule leaves those to `ordo-store`, which knows no engine.

use ordo_store::StoreError;

/// The store file, named in errors (inside the data directory the server logs at start).
pub(crate) const FILE: &str = "ordo.redb";

/// An error of the redb B-tree: damage redb found in the file is `Corrupt` and a failed read or
/// write is `Io`, both naming the file; anything else is an engine error.
pub(crate) fn engine<E: Into<redb::Error>>(e: E) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(detail) => StoreError::Corrupt {
            what: "the store file ordo.redb (a B-tree page)",
            detail,
        },
        redb::Error::Io(source) => StoreError::Io {
            path: FILE.into(),
            source,
        },
        other => StoreError::Engine {
            context: "redb".into(),
            source: Box::new(other),
        },
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
