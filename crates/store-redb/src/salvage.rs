//! `ordo store salvage`: gets a store whose log is damaged going again, keeping everything that
//! can be kept in order, and saying exactly what is lost.
//!
//! A store refuses to open when its log does not add up (see [`crate::wal`]): a record newer
//! than what the B-tree holds is missing while later ones are there, or a segment is missing,
//! zeroed, truncated or another store's. Salvage then:
//!
//! 1. replays the unbroken run of records that follows what the B-tree holds (every batch up to
//!    the first one missing), as a start would;
//! 2. drops the records stranded past the missing one (their batches cannot be applied without
//!    the one before: seqs would have holes), listing the messages they held;
//! 3. moves the epoch of every conversation: which conversations the unreadable records held
//!    messages of cannot be known, and their seqs will be numbered again, so every device must
//!    drop what it has of each conversation and sync it anew (docs/protocol.md, "Epochs");
//! 4. sets the damaged segments aside (`wal-N.log.damaged`, for inspection) and makes the log
//!    anew.
//!
//! Without `apply` it only reports what it would do. Each step is durable before the next, and
//! salvage run again after a crash half-way finishes the job. It refuses a store file that is
//! itself damaged or missing: there is nothing to salvage onto (restore it from a backup).

use crate::redb_store::{
    checkpoint, meta_get, move_epochs, replay, LOG_MADE, STORE_ID, WAL_APPLIED,
};
use crate::wal::{files::OsFiles, Salvageable, Wal, SEGMENT_NAMES};
use redb::Database;
use std::collections::BTreeMap;
use std::path::Path;

/// What salvage found and did: a line each.
pub struct Salvage {
    pub lines: Vec<String>,
    /// Whether the store was changed.
    pub changed: bool,
    /// Whether the store opens now.
    pub opens: bool,
}

/// Salvages the store in `dir` (with `apply`), or reports what salvage would do. An error says
/// why it cannot be salvaged.
pub fn salvage(dir: &Path, apply: bool) -> Result<Salvage, String> {
    let path = dir.join("ordo.redb");
    if !path.exists() {
        return Err(format!(
            "{} is missing: there is no store to salvage onto; restore it from a backup",
            path.display()
        ));
    }
    let db = Database::open(&path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => format!(
            "{} is open in another process (a running server?): stop it first",
            path.display()
        ),
        e => format!(
            "{} cannot be opened ({e}): salvage mends the log, not the store file; restore it from a backup",
            path.display()
        ),
    })?;
    let meta = |key| meta_get(&db, key).map_err(|e| e.to_string());
    let files = OsFiles {
        dir: dir.to_path_buf(),
    };
    let mut lines = Vec::new();
    let Some(store_id) = meta(STORE_ID)? else {
        return Err(format!(
            "{} has no store id (a store of an earlier build, or a store file put in place of this one's): `ordo store verify` tells which; salvage does not apply",
            path.display()
        ));
    };
    let applied = meta(WAL_APPLIED)?;
    let nothing = |mut lines: Vec<String>, why: &str| {
        lines.push(format!("nothing to salvage: {why}"));
        Ok(Salvage {
            lines,
            changed: false,
            opens: true,
        })
    };
    if meta(LOG_MADE)? != Some(1) {
        return nothing(lines, "the log was not made yet; the next start makes it");
    }
    if matches!(Wal::written_in_format_1(&files), Ok(true)) {
        return nothing(
            lines,
            "an earlier build wrote the log; the next start replays it and makes it anew",
        );
    }
    match Wal::open(&files, store_id, applied) {
        Ok(_) => return nothing(lines, "the log adds up and the store opens as it is"),
        Err(e) => lines.push(format!("the store does not open: {e}")),
    }
    let found = Wal::salvageable(&files, store_id, applied);
    describe(&found, applied, &mut lines);
    if !apply {
        lines.push(
            "nothing was changed: run again with --apply to do this, once the server is stopped and a copy of the data directory is kept".into(),
        );
        return Ok(Salvage {
            lines,
            changed: false,
            opens: false,
        });
    }
    fn failed(step: &'static str) -> impl Fn(ordo_store::StoreError) -> String {
        move |e| format!("{step} failed: {e}")
    }
    replay(&db, &found.run).map_err(failed("replaying the records before the damage"))?;
    checkpoint(&db).map_err(failed("making the replayed records durable"))?;
    let convs = move_epochs(&db).map_err(failed("moving the epochs"))?;
    lines.push(format!(
        "replayed {} records; moved the epoch of all {convs} conversations",
        found.run.len()
    ));
    for name in SEGMENT_NAMES {
        let from = dir.join(name);
        if !from.exists() {
            continue;
        }
        let mut to = dir.join(format!("{name}.damaged"));
        let mut n = 1;
        while to.exists() {
            n += 1;
            to = dir.join(format!("{name}.damaged.{n}"));
        }
        std::fs::rename(&from, &to)
            .map_err(|e| format!("setting {} aside failed: {e}", from.display()))?;
        lines.push(format!("set {} aside as {}", from.display(), to.display()));
    }
    Wal::create(&files, store_id).map_err(failed("making the log anew"))?;
    let applied = meta(WAL_APPLIED)?;
    Wal::open(&files, store_id, applied)
        .map_err(|e| format!("the log made anew does not open: {e}"))?;
    lines.push("made the log anew: the store opens".into());
    Ok(Salvage {
        lines,
        changed: true,
        opens: true,
    })
}

/// The report of what the log holds and what salvage keeps and loses.
fn describe(found: &Salvageable, applied: Option<u64>, lines: &mut Vec<String>) {
    lines.extend(found.problems.iter().cloned());
    let first = applied.map_or(0, |a| a + 1);
    lines.push(match (found.run.first(), found.run.last()) {
        (Some(a), Some(b)) => format!(
            "kept: records {}..={} follow what the store file holds (up to {}), unbroken; they are replayed",
            a.seqno,
            b.seqno,
            applied.map_or("none".into(), |a| a.to_string())
        ),
        _ => format!("kept: no record follows what the store file holds (the next would be {first})"),
    });
    if let Some(missing) = found.missing {
        let seqnos: Vec<u64> = found.stranded.iter().map(|r| r.seqno).collect();
        lines.push(format!(
            "lost: record {missing} is missing; the {} records found after it ({}) cannot be applied without it and are dropped",
            seqnos.len(),
            ranges(&seqnos)
        ));
    }
    // The messages of the dropped records, by conversation.
    let mut lost: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for r in &found.stranded {
        for m in &r.batch.messages {
            lost.entry(&m.conv).or_default().push(m.seq);
        }
    }
    for (conv, mut seqs) in lost {
        seqs.sort_unstable();
        lines.push(format!(
            "lost: conversation {conv:?}, messages {} (in the dropped records)",
            ranges(&seqs)
        ));
    }
    lines.push(
        "lost too: whatever the unreadable records held, in conversations no readable record names; so every conversation's epoch moves, and devices sync each anew".into(),
    );
}

/// `1..=3, 7, 9..=10` for `[1, 2, 3, 7, 9, 10]` (sorted).
fn ranges(v: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}..={}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_join_runs() {
        assert_eq!(super::ranges(&[1, 2, 3, 7, 9, 10]), "1..=3, 7, 9..=10");
        assert_eq!(super::ranges(&[]), "");
        assert_eq!(super::ranges(&[5]), "5");
    }
}
