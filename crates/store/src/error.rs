//! Errors of the storage layer, in terms that do not depend on a backend: what went wrong and
//! what to do about it. A backend converts its engine's errors into these (with helper
//! functions of its own: the orphan rule lets only this crate implement `From` for them).
//!
//! The server stops on any error from `commit` (fail-stop; see the crate's docs), so a backend
//! reports an error rather than guessing; the variant tells the operator, and later a cluster's
//! node, what it means.

/// Any error a storage engine or its client library reports, kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be opened (or connected to) at all.
    #[error("cannot open the data store at {path}: {source}; check the directory or address, its permissions, and, for a directory, that no other ordo process uses it")]
    Open {
        /// Where the store is: a file or directory, or (for a database server) its address.
        path: String,
        #[source]
        source: BoxError,
    },
    /// A file of the store could not be read or written.
    #[error(
        "cannot read or write {path}: {source}; check the disk and the directory's permissions"
    )]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Stored data is damaged: it is refused, never guessed at. `what` names the kind of record,
    /// `detail` where it is and what is wrong with it.
    #[error("stored record is corrupt ({what}): {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// The store cannot serve now (its engine stopped, its connection is gone); the message says
    /// why and what brings it back. Trying again, or restarting, may work.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The store's server cannot be reached now (the connection broke, or cannot be opened).
    /// Nothing of what was asked took effect, or, for a commit whose answer was lost, whether it
    /// did is not known yet: given the same batch again, the backend reads that back first and
    /// applies the batch exactly once. Asking again, once the store is back, may work; the
    /// server retries commits and reads, and refuses new sends meanwhile. The message says
    /// what failed (and may name the store's address: it is for the operator, not clients).
    #[error("the store cannot be reached: {0}; the server retries until it is back")]
    Unreachable(String),
    /// The storage engine (or its client library) reported an error that none of the other
    /// variants describes; `context` says which engine or what it was doing.
    #[error("storage engine error ({context}): {source}")]
    Engine {
        context: String,
        #[source]
        source: BoxError,
    },
    /// This writer no longer owns what it writes to: another took over its lease, and its
    /// commit was refused so that two writers never commit for the same conversations. Reserved
    /// for the backends of a cluster (the PostgreSQL backend's lease fencing); no backend
    /// reports it yet. The writer must stop writing there.
    #[error("this server no longer owns {lease} ({detail}); another server took it over, so nothing was written")]
    Fenced { lease: String, detail: String },
    /// A batch stores a seq its conversation already holds, and was refused whole: two writers
    /// raced for the seq, or one reused it. The PostgreSQL backend is to report it from its
    /// unique key on (conversation, seq); the in-memory reference backend ([`crate::MemStore`])
    /// reports it for any such batch.
    #[error("seq {seq} of conversation {conv} is already stored; the batch was refused whole (two writers raced for it, or one reused it)")]
    Conflict { conv: String, seq: u64 },
}
