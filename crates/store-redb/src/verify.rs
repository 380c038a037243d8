//! `ordo store verify`: what a data directory holds and whether the store would open. It changes
//! nothing but what redb's own crash repair does to a B-tree file left by a crash (as any start
//! would); the log is only read.

use crate::redb_store::{LOG_MADE, META, STORE_ID, WAL_APPLIED};
use crate::wal::{files::OsFiles, Wal};
use redb::{Database, DatabaseError, ReadOnlyDatabase, ReadableDatabase};
use std::path::Path;

/// The report: a line per finding, and whether the store would open as it is.
pub struct Verification {
    pub lines: Vec<String>,
    pub opens: bool,
}

/// Looks at the store in `dir`.
pub fn verify(dir: &Path) -> Verification {
    let files = OsFiles {
        dir: dir.to_path_buf(),
    };
    let mut lines = Vec::new();
    let path = dir.join("ordo.redb");
    type Meta = (Option<u64>, Option<u64>, Option<u64>);
    let read = |db: &dyn ReadableDatabase| -> Result<Meta, String> {
        let tx = db.begin_read().map_err(|e| e.to_string())?;
        let meta = tx.open_table(META).map_err(|e| e.to_string())?;
        let get = |k: &str| {
            meta.get(k)
                .map(|v| v.map(|g| g.value()))
                .map_err(|e| e.to_string())
        };
        Ok((get(STORE_ID)?, get(WAL_APPLIED)?, get(LOG_MADE)?))
    };
    let meta = match ReadOnlyDatabase::open(&path) {
        Ok(db) => read(&db),
        Err(DatabaseError::RepairAborted) => {
            // Left by a crash: redb repairs it as it opens it for writing, as every start does.
            lines.push(format!(
                "{}: was left by a crash; redb repaired it (as the next start would have)",
                path.display()
            ));
            Database::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|db| read(&db))
        }
        Err(e) => Err(e.to_string()),
    };
    let (store_id, applied, log_made) = match meta {
        Ok(m) => m,
        Err(e) => {
            lines.push(format!("{}: cannot be read: {e}", path.display()));
            return Verification {
                lines,
                opens: false,
            };
        }
    };
    let Some(store_id) = store_id else {
        return match Wal::header_store_id(&files) {
            Ok(None) => {
                lines.push(format!(
                    "{}: no store id (a store of an earlier build: its log is read and made anew on the next start)",
                    path.display()
                ));
                Verification { lines, opens: true }
            }
            Ok(Some(id)) => {
                lines.push(format!(
                    "{}: no store id, but the log beside it belongs to store {id:016x}: the store file was replaced; the store does not open",
                    path.display()
                ));
                Verification {
                    lines,
                    opens: false,
                }
            }
            Err(e) => {
                lines.push(format!("the log cannot be read: {e}"));
                Verification {
                    lines,
                    opens: false,
                }
            }
        };
    };
    lines.push(format!(
        "{}: store {store_id:016x}; log records applied up to {}",
        path.display(),
        applied.map_or("none".to_string(), |a| a.to_string())
    ));
    if log_made != Some(1) {
        lines.push(
            "the log was not made yet (a crash while making it): the next start makes it".into(),
        );
        return Verification { lines, opens: true };
    }
    if matches!(Wal::written_in_format_1(&files), Ok(true)) {
        lines.push("an earlier build wrote the log (in its format): the next start replays it and makes it anew".into());
        return Verification { lines, opens: true };
    }
    lines.extend(Wal::describe(&files, store_id));
    let opens = match Wal::open(&files, store_id, applied) {
        Ok((_, records)) => {
            lines.push(format!(
                "the log adds up: {} records to replay on the next start",
                records.len()
            ));
            true
        }
        Err(e) => {
            lines.push(format!("the store does not open: {e}"));
            false
        }
    };
    Verification { lines, opens }
}
