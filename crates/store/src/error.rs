//! Errors of the storage layer.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the data store at {path}: {source}; check that the directory is writable and not used by another ordo process")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error(
        "cannot read or write {path}: {source}; check the disk and the directory's permissions"
    )]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store stopped applying logged batches ({0}); restart the server: it replays the log"
    )]
    Applier(String),
    #[error("storage engine error: {0}")]
    Engine(#[from] redb::Error),
    #[error("stored record is corrupt ({what}): {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("cannot encode a record: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

impl StoreError {
    pub(crate) fn engine<E: Into<redb::Error>>(e: E) -> Self {
        StoreError::Engine(e.into())
    }
}
