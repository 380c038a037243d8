//! The write-ahead log: where a batch becomes durable.
//!
//! Making a batch durable in the B-tree file costs a commit that writes and syncs many pages
//! (message leaves, dedup leaves, conversation records, the allocator state, the header). The
//! log instead takes one sequential write of the encoded batch and one `fdatasync`, which is as
//! little as the disk allows. The B-tree is updated without syncing, and made durable now and
//! then by a checkpoint, after which that part of the log is no longer needed.
//!
//! The log is two segment files, `wal-0.log` and `wal-1.log`, each preallocated and zero-filled
//! once to [`SEGMENT_BYTES`] (so that a sync flushes data only, never the file's size or extent
//! map), with a header naming the store they belong to; records go into the active segment back
//! to back after the header ([`scan`] has the layout). Seqnos increase by one per record across
//! both segments. Once the active segment holds [`SWITCH_BYTES`], writing moves to the other one,
//! from its start, as soon as everything in that one is checkpointed; the segment left behind is
//! checkpointed in the background, so writers never wait for a checkpoint unless a whole segment
//! fills first. A segment therefore holds its current records followed by stale ones from an
//! earlier round, all of them older than the B-tree's last checkpoint.
//!
//! **Recovery tells damage from a torn tail.** A crash can leave exactly one thing wrong: the
//! last record, whose write had not been synced (so it was never acknowledged), torn. Every
//! record newer than what the B-tree holds must therefore be found in one unbroken run of seqnos,
//! in the chains of current records of the two segments; past the end of each chain, the rest of
//! the segment is searched for valid records, and any newer than what the B-tree holds means a
//! damaged record cut the chain short. Either way the log is refused, naming the file, the
//! offset and what is there, rather than replayed short (which would lose acknowledged batches
//! and number new messages with seqs devices have already seen). A segment that is missing,
//! shorter than it was made, zeroed, or from another store is refused too.

pub mod files;
pub mod scan;
mod v1;

use crate::error::encoding;
use files::{LogFile, LogFiles};
use ordo_core::Batch;
use ordo_store::StoreError;
use scan::{HEADER_BYTES, RECORD_HEADER};

/// Size of each segment file.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// Once the active segment holds this much, writing moves to the other one.
pub const SWITCH_BYTES: u64 = 8 << 20;
/// The segment files, in a store's directory.
pub const SEGMENT_NAMES: [&str; 2] = ["wal-0.log", "wal-1.log"];
/// What a refusal of a damaged log asks the operator to do.
const ADVICE: &str = "keep a copy of the data directory before trying anything else; `ordo store verify --data <dir>` reports what is readable";

/// One segment file.
struct Segment {
    file: Box<dyn LogFile>,
    /// Its path, for messages.
    name: String,
    /// Where its next record goes.
    offset: u64,
    /// Seqno of its last record this round (`None`: nothing written since it was (re)started).
    last: Option<u64>,
}

pub struct Wal {
    segs: [Segment; 2],
    active: usize,
    /// Seqno of the next record.
    next: u64,
    /// The store's id: in both headers and in every record's check value.
    store_id: u64,
    buf: Vec<u8>,
}

/// A record read back at start.
pub struct Record {
    pub seqno: u64,
    pub batch: Batch,
}

/// What [`Wal::salvageable`] finds.
#[derive(Default)]
pub struct Salvageable {
    /// The unbroken run of records after what the B-tree holds: what can be replayed.
    pub run: Vec<Record>,
    /// The first seqno missing before a later record (`None` if no record follows a gap).
    pub missing: Option<u64>,
    /// Valid records past the missing one, in seqno order: lost with it.
    pub stranded: Vec<Record>,
    /// A line for each segment that cannot be read and each record that does not decode.
    pub problems: Vec<String>,
}

fn damaged(detail: String) -> StoreError {
    StoreError::Corrupt {
        what: "write-ahead log",
        detail: format!("{detail}; {ADVICE}"),
    }
}

fn io_error(name: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: name.to_string(),
        source,
    }
}

/// A segment file, opened, with its path.
type Named = (Box<dyn LogFile>, String);

/// The segment files that exist.
fn existing(files: &dyn LogFiles) -> Result<Vec<Named>, StoreError> {
    let mut out = Vec::new();
    for n in SEGMENT_NAMES {
        let name = files.show(n);
        let io = io_error(&name);
        if files.exists(n).map_err(&io)? {
            let file = files.open(n, false).map_err(&io)?;
            drop(io);
            out.push((file, name));
        }
    }
    Ok(out)
}

/// A segment as read at start: the file, its bytes, and what they hold.
struct Opened {
    file: Box<dyn LogFile>,
    name: String,
    bytes: Vec<u8>,
    scan: scan::Scan,
}

/// Opens segment `i` of store `store_id` and reads it whole.
fn open_segment(files: &dyn LogFiles, i: usize, store_id: u64) -> Result<Opened, StoreError> {
    let name = files.show(SEGMENT_NAMES[i]);
    let io = io_error(&name);
    if !files.exists(SEGMENT_NAMES[i]).map_err(&io)? {
        return Err(damaged(format!(
            "the log segment {name} is missing, though the store file says the log was made: it was deleted or moved, and the batches it held since the last checkpoint with it. Put it back from where it went"
        )));
    }
    let file = files.open(SEGMENT_NAMES[i], false).map_err(&io)?;
    let len = file.size().map_err(&io)?;
    if len != SEGMENT_BYTES {
        return Err(damaged(format!(
            "{name} is {len} bytes where a log segment is made {SEGMENT_BYTES}: it was truncated or replaced (a crash cannot shorten it)"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0).map_err(&io)?;
    let (segment, id, seg_bytes) = scan::read_file_header(&bytes)
        .map_err(|why| damaged(format!("{name} is not this store's log segment: {why}")))?;
    if id != store_id {
        return Err(damaged(format!(
            "{name} belongs to another store (store id {id:016x}; the store file ordo.redb is {store_id:016x}): the log and the store file come from two different data directories"
        )));
    }
    if segment as usize != i || seg_bytes != SEGMENT_BYTES {
        return Err(damaged(format!(
            "{name} holds the header of segment {segment} ({seg_bytes} bytes): the segment files were renamed or copied over each other"
        )));
    }
    let scan = scan::scan(&bytes, store_id);
    drop(io);
    Ok(Opened {
        file,
        name,
        bytes,
        scan,
    })
}

/// Where and why segment `o`'s chain of current records stops, for messages.
fn chain_end(o: &Opened) -> String {
    let what = match o.scan.end_seqno {
        Some(s) => format!("record {s}, which does not follow"),
        None => o.scan.end_is.describe().to_string(),
    };
    format!("{} at offset {} ({what})", o.name, o.scan.end)
}

impl Wal {
    /// Whether either segment file exists.
    pub fn exists(files: &dyn LogFiles) -> Result<bool, StoreError> {
        for n in SEGMENT_NAMES {
            if files.exists(n).map_err(io_error(&files.show(n)))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Makes both segments anew for the store `store_id`: its header, then zeros to
    /// [`SEGMENT_BYTES`] (written for real, not a sparse file: later syncs then flush data blocks
    /// only), synced, with their directory entries. Whatever the files held is gone.
    pub fn create(files: &dyn LogFiles, store_id: u64) -> Result<(), StoreError> {
        for (i, n) in SEGMENT_NAMES.iter().enumerate() {
            let name = files.show(n);
            let io = io_error(&name);
            let file = files.open(n, true).map_err(&io)?;
            let header = scan::file_header(store_id, i as u32, SEGMENT_BYTES);
            file.write_all_at(&header, 0).map_err(&io)?;
            let zeros = vec![0u8; 1 << 20];
            let mut off = header.len() as u64;
            while off < SEGMENT_BYTES {
                let n = (SEGMENT_BYTES - off).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], off).map_err(&io)?;
                off += n as u64;
            }
            file.sync_data().map_err(&io)?;
        }
        files
            .sync_dir()
            .map_err(io_error(&files.show(SEGMENT_NAMES[0])))
    }

    /// The store id in the header of either segment, if either starts with a header of this
    /// format (whatever else is wrong with it): whether a log of this format is there.
    pub fn header_store_id(files: &dyn LogFiles) -> Result<Option<u64>, StoreError> {
        for (file, _) in existing(files)? {
            let mut header = vec![0u8; HEADER_BYTES as usize];
            if file.read_exact_at(&mut header, 0).is_ok() {
                if let Ok((_, id, _)) = scan::read_file_header(&header) {
                    return Ok(Some(id));
                }
            }
        }
        Ok(None)
    }

    /// Whether either segment starts with a record of format 1: an earlier build wrote it (over
    /// this format's header, after a downgrade).
    pub fn written_in_format_1(files: &dyn LogFiles) -> Result<bool, StoreError> {
        for (file, _) in existing(files)? {
            let mut head = [0u8; 4];
            if file.read_exact_at(&mut head, 0).is_ok() && v1::starts_a_record(head) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads a log in the format of earlier builds (format 1: no header), for the upgrade: the records of
    /// both segments in seqno order, possibly with a gap between the two segments' records (the
    /// caller keeps only the run that follows what the B-tree holds, as those builds did).
    pub fn read_format_1(files: &dyn LogFiles) -> Result<Vec<Record>, StoreError> {
        let mut records = Vec::new();
        for (file, name) in existing(files)? {
            let len = file.size().map_err(io_error(&name))?;
            records.extend(v1::read(&*file, len, &name)?);
        }
        records.sort_by_key(|r| r.seqno);
        records.dedup_by_key(|r| r.seqno);
        Ok(records)
    }

    /// Opens the log of the store `store_id`, whose B-tree holds every record up to `applied`,
    /// and reads back the records after it, in seqno order. Refuses (`Corrupt`, naming the file
    /// and offset) a log that is missing, damaged or not this store's, and one where any record
    /// after `applied` is missing while a later one is there. Call [`reset`](Self::reset) once
    /// the records returned are durable elsewhere, before appending.
    pub fn open(
        files: &dyn LogFiles,
        store_id: u64,
        applied: Option<u64>,
    ) -> Result<(Wal, Vec<Record>), StoreError> {
        let opened = [
            open_segment(files, 0, store_id)?,
            open_segment(files, 1, store_id)?,
        ];
        let first = applied.map_or(0, |a| a + 1);
        // Every record after `applied`, from the chains: one unbroken run from `first`.
        let mut live: Vec<(usize, &scan::Found)> = opened
            .iter()
            .enumerate()
            .flat_map(|(i, o)| o.scan.chain.iter().map(move |f| (i, f)))
            .filter(|(_, f)| f.seqno >= first)
            .collect();
        live.sort_by_key(|(_, f)| f.seqno);
        for (k, (i, f)) in live.iter().enumerate() {
            let want = first + k as u64;
            if f.seqno == want {
                continue;
            }
            // Where the records before the missing one stop.
            let before = opened.iter().find(|o| {
                o.scan
                    .chain
                    .last()
                    .is_some_and(|l| want > 0 && l.seqno == want - 1)
            });
            let stop = match (before, want) {
                (Some(o), _) => format!("the records before it end in {}", chain_end(o)),
                (None, 0) => "the store file holds no record yet".to_string(),
                (None, _) => format!("the store file holds the records up to {}", want - 1),
            };
            return Err(damaged(format!(
                "log record {want} is missing although record {} is in {} at offset {}: {stop}. A damaged record cut the log short; replaying only what precedes it would lose acknowledged batches",
                f.seqno, opened[*i].name, f.offset
            )));
        }
        // Past where each chain stops: nothing newer than `applied` may be there.
        for o in &opened {
            if let Some(f) = o.scan.beyond.iter().find(|f| f.seqno >= first) {
                return Err(damaged(format!(
                    "{} is damaged: its current records stop at offset {} ({}), but record {} lies beyond, at offset {}. Replaying only what precedes the damage would lose acknowledged batches",
                    o.name,
                    o.scan.end,
                    o.scan.end_is.describe(),
                    f.seqno,
                    f.offset
                )));
            }
        }
        let mut records = Vec::with_capacity(live.len());
        for (i, f) in &live {
            let o = &opened[*i];
            // A record whose check holds but does not decode was written by something else:
            // say so rather than silently dropping what may be accepted messages.
            let batch: Batch = rmp_serde::from_slice(&o.bytes[f.payload.clone()]).map_err(|e| {
                damaged(format!(
                    "{} record {} at offset {} passes its checksum but does not decode: {e}",
                    o.name, f.seqno, f.offset
                ))
            })?;
            records.push(Record {
                seqno: f.seqno,
                batch,
            });
        }
        let next = records.last().map_or(first, |r| r.seqno + 1);
        let [a, b] = opened;
        let seg = |o: Opened| Segment {
            file: o.file,
            name: o.name,
            offset: HEADER_BYTES,
            last: None,
        };
        Ok((
            Wal {
                segs: [seg(a), seg(b)],
                active: 0,
                next,
                store_id,
                buf: Vec::new(),
            },
            records,
        ))
    }

    /// What can be read of a log that [`open`](Self::open) refuses, for `ordo store salvage`:
    /// every valid record newer than `applied` in either segment (current or beyond a chain's
    /// end), split into the unbroken run that follows `applied` (what can be replayed) and the
    /// records stranded past the first missing seqno (lost with it), with a line for each
    /// segment that cannot be read and each record that does not decode.
    pub fn salvageable(files: &dyn LogFiles, store_id: u64, applied: Option<u64>) -> Salvageable {
        let first = applied.map_or(0, |a| a + 1);
        let mut out = Salvageable::default();
        let mut found: Vec<Record> = Vec::new();
        for i in 0..2 {
            let o = match open_segment(files, i, store_id) {
                Ok(o) => o,
                Err(e) => {
                    out.problems.push(format!("cannot be read: {e}"));
                    continue;
                }
            };
            for f in o.scan.chain.iter().chain(&o.scan.beyond) {
                if f.seqno < first {
                    continue;
                }
                match rmp_serde::from_slice::<Batch>(&o.bytes[f.payload.clone()]) {
                    Ok(batch) => found.push(Record {
                        seqno: f.seqno,
                        batch,
                    }),
                    Err(e) => out.problems.push(format!(
                        "{} record {} at offset {} passes its checksum but does not decode ({e}): it counts as missing",
                        o.name, f.seqno, f.offset
                    )),
                }
            }
        }
        found.sort_by_key(|r| r.seqno);
        found.dedup_by_key(|r| r.seqno);
        let mut next = first;
        for r in found {
            if r.seqno == next && out.stranded.is_empty() {
                next += 1;
                out.run.push(r);
            } else {
                out.missing.get_or_insert(next);
                out.stranded.push(r);
            }
        }
        out
    }

    /// What each segment holds, a line each, for `ordo store verify`: its header, its current
    /// records, where and why they stop, and the valid records beyond.
    pub fn describe(files: &dyn LogFiles, store_id: u64) -> Vec<String> {
        (0..2)
            .map(|i| match open_segment(files, i, store_id) {
                Err(e) => format!("{}: {e}", SEGMENT_NAMES[i]),
                Ok(o) => {
                    let seqnos = |f: &[scan::Found]| match (f.first(), f.last()) {
                        (Some(a), Some(b)) => format!("{} records, seqnos {}..={}", f.len(), a.seqno, b.seqno),
                        _ => "no records".to_string(),
                    };
                    format!(
                        "{}: header of this store; current records: {}; they stop at {}; valid records beyond: {}",
                        o.name,
                        seqnos(&o.scan.chain),
                        chain_end(&o),
                        seqnos(&o.scan.beyond)
                    )
                }
            })
            .collect()
    }

    /// Starts both segments over, the next record numbered `next`: everything logged so far is
    /// durable elsewhere.
    pub fn reset(&mut self, next: u64) {
        for s in &mut self.segs {
            s.offset = HEADER_BYTES;
            s.last = None;
        }
        self.active = 0;
        self.next = self.next.max(next);
    }

    /// Seqno the next record will get.
    pub fn next_seqno(&self) -> u64 {
        self.next
    }

    /// Bytes of the active segment in use.
    pub fn active_used(&self) -> u64 {
        self.segs[self.active].offset - HEADER_BYTES
    }

    /// Whether a record of `len` payload bytes fits in the active segment.
    pub fn fits(&self, len: usize) -> bool {
        self.segs[self.active].offset + (RECORD_HEADER + len) as u64 <= SEGMENT_BYTES
    }

    /// Whether a record of `len` payload bytes fits in a segment at all.
    pub fn fits_empty(len: usize) -> bool {
        HEADER_BYTES + (RECORD_HEADER + len) as u64 <= SEGMENT_BYTES
    }

    /// Seqno of the last record in the other segment; it may be written over once the B-tree
    /// is durable up to there.
    pub fn other_last(&self) -> Option<u64> {
        self.segs[1 - self.active].last
    }

    /// Moves writing to the other segment, from its start. Returns the last seqno of the segment
    /// left, which must be checkpointed before that segment is used again.
    pub fn switch(&mut self) -> Option<u64> {
        let left = self.segs[self.active].last;
        self.active = 1 - self.active;
        let s = &mut self.segs[self.active];
        s.offset = HEADER_BYTES;
        s.last = None;
        left
    }

    /// Encodes `batch` for [`append`](Self::append); returns its size.
    pub fn encode(&mut self, batch: &Batch) -> Result<usize, StoreError> {
        self.buf.clear();
        self.buf.resize(RECORD_HEADER, 0);
        // Named fields: some are left out when empty, which a positional encoding cannot do.
        rmp_serde::encode::write_named(&mut self.buf, batch).map_err(encoding)?;
        Ok(self.buf.len() - RECORD_HEADER)
    }

    /// Writes the batch last given to [`encode`](Self::encode) as the next record of the
    /// active segment and syncs it to disk. Returns its seqno once it is durable.
    pub fn append(&mut self) -> Result<u64, StoreError> {
        let seqno = self.next;
        let len = self.buf.len() - RECORD_HEADER;
        let seg = &mut self.segs[self.active];
        let Ok(len32) = u32::try_from(len) else {
            return Err(StoreError::Corrupt {
                what: "write-ahead log",
                detail: format!("a record of {len} bytes is larger than a record can be"),
            });
        };
        if seg.offset + self.buf.len() as u64 > SEGMENT_BYTES {
            return Err(StoreError::Corrupt {
                what: "write-ahead log",
                detail: format!(
                    "a record of {len} bytes does not fit at offset {} of {}",
                    seg.offset, seg.name
                ),
            });
        }
        let check = scan::record_check(self.store_id, len32, seqno, &self.buf[RECORD_HEADER..]);
        self.buf[0..4].copy_from_slice(&scan::RECORD_MAGIC);
        self.buf[4..8].copy_from_slice(&len32.to_le_bytes());
        self.buf[8..16].copy_from_slice(&seqno.to_le_bytes());
        self.buf[16..20].copy_from_slice(&check.to_le_bytes());
        let io = io_error(&seg.name);
        seg.file.write_all_at(&self.buf, seg.offset).map_err(&io)?;
        seg.file.sync_data().map_err(&io)?;
        seg.offset += self.buf.len() as u64;
        seg.last = Some(seqno);
        self.next += 1;
        Ok(seqno)
    }
}
