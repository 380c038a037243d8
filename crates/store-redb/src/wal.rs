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
//! map). Records go into the active segment back to back from offset 0:
//!
//! ```text
//! magic u32 | length u32 | seqno u64 | crc32 u32 (of seqno and payload) | payload (length bytes)
//! ```
//!
//! all little-endian, the payload a MessagePack-encoded [`Batch`]. Seqnos increase by one per
//! record across both segments. Once the active segment holds [`SWITCH_BYTES`], writing moves to
//! the other one, from offset 0, as soon as everything in that one is checkpointed; the segment
//! left behind is checkpointed in the background, so writers never wait for a checkpoint unless
//! a whole segment fills first. A segment therefore holds its current records followed by stale
//! ones from an earlier round; reading a segment stops at the first record that is torn (bad
//! magic, length or checksum) or does not follow its predecessor's seqno, which is exactly where
//! its current records end.

use crate::error::encoding;
use ordo_core::Batch;
use ordo_store::StoreError;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of each segment file.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// Once the active segment holds this much, writing moves to the other one.
pub const SWITCH_BYTES: u64 = 8 << 20;
const MAGIC: u32 = 0x4f52_4457; // "ORDW"
const HEADER: usize = 4 + 4 + 8 + 4;

/// One segment file.
struct Segment {
    file: File,
    path: PathBuf,
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
    buf: Vec<u8>,
}

/// A record read back at start.
pub struct Record {
    pub seqno: u64,
    pub batch: Batch,
}

impl Segment {
    fn open(path: PathBuf) -> Result<Segment, StoreError> {
        let io = |e: std::io::Error| StoreError::Io {
            path: path.display().to_string(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < SEGMENT_BYTES {
            // Zero-fill for real (not a sparse file or unwritten extents): later syncs then
            // flush data blocks only.
            let zeros = vec![0u8; 1 << 20];
            let mut off = len;
            while off < SEGMENT_BYTES {
                let n = (SEGMENT_BYTES - off).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], off).map_err(io)?;
                off += n as u64;
            }
            file.sync_all().map_err(io)?;
            if let Some(parent) = path.parent() {
                // The new file's directory entry must survive a crash too.
                File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        Ok(Segment {
            file,
            path,
            offset: 0,
            last: None,
        })
    }

    /// The segment's current records, oldest first.
    fn read_all(&self) -> Result<Vec<Record>, StoreError> {
        let mut records: Vec<Record> = Vec::new();
        let mut header = [0u8; HEADER];
        let mut offset = 0u64;
        loop {
            if offset + HEADER as u64 > SEGMENT_BYTES
                || self.file.read_exact_at(&mut header, offset).is_err()
            {
                break;
            }
            let word = |r: std::ops::Range<usize>| {
                let mut b = [0u8; 8];
                b[..r.len()].copy_from_slice(&header[r]);
                u64::from_le_bytes(b)
            };
            let (magic, len, seqno, crc) = (word(0..4), word(4..8), word(8..16), word(16..20));
            let end = offset + HEADER as u64 + len;
            if magic != u64::from(MAGIC) || end > SEGMENT_BYTES {
                break;
            }
            if records.last().is_some_and(|r| r.seqno + 1 != seqno) {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            if self
                .file
                .read_exact_at(&mut payload, offset + HEADER as u64)
                .is_err()
            {
                break;
            }
            let mut h = crc32fast::Hasher::new();
            h.update(&seqno.to_le_bytes());
            h.update(&payload);
            if u64::from(h.finalize()) != crc {
                break;
            }
            // A record whose checksum holds but does not decode was written by something else:
            // say so rather than silently dropping what may be accepted messages.
            let batch: Batch =
                rmp_serde::from_slice(&payload).map_err(|e| StoreError::Corrupt {
                    what: "write-ahead log record",
                    detail: format!(
                        "{} record {seqno} at offset {offset}: {e}",
                        self.path.display()
                    ),
                })?;
            records.push(Record { seqno, batch });
            offset = end;
        }
        Ok(records)
    }
}

impl Wal {
    /// Opens (or creates) the log in `dir` and reads back the records of both segments, in
    /// seqno order (possibly with a gap between the two segments' records: the caller keeps
    /// only the run that follows what the B-tree holds). Call [`reset`](Self::reset) once they
    /// are durable elsewhere, before appending.
    pub fn open(dir: &Path) -> Result<(Wal, Vec<Record>), StoreError> {
        let segs = [
            Segment::open(dir.join("wal-0.log"))?,
            Segment::open(dir.join("wal-1.log"))?,
        ];
        let mut records = segs[0].read_all()?;
        records.extend(segs[1].read_all()?);
        records.sort_by_key(|r| r.seqno);
        records.dedup_by_key(|r| r.seqno);
        let next = records.last().map_or(0, |r| r.seqno + 1);
        Ok((
            Wal {
                segs,
                active: 0,
                next,
                buf: Vec::new(),
            },
            records,
        ))
    }

    /// Starts both segments over, the next record numbered `next`: everything logged so far is
    /// durable elsewhere.
    pub fn reset(&mut self, next: u64) {
        for s in &mut self.segs {
            s.offset = 0;
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
        self.segs[self.active].offset
    }

    /// Whether a record of `len` payload bytes fits in the active segment.
    pub fn fits(&self, len: usize) -> bool {
        self.segs[self.active].offset + (HEADER + len) as u64 <= SEGMENT_BYTES
    }

    /// Whether a record of `len` payload bytes fits in a segment at all.
    pub fn fits_empty(len: usize) -> bool {
        (HEADER + len) as u64 <= SEGMENT_BYTES
    }

    /// Seqno of the last record in the other segment; it may be written over once the B-tree
    /// is durable up to there.
    pub fn other_last(&self) -> Option<u64> {
        self.segs[1 - self.active].last
    }

    /// Moves writing to the other segment, from offset 0. Returns the last seqno of the segment
    /// left, which must be checkpointed before that segment is used again.
    pub fn switch(&mut self) -> Option<u64> {
        let left = self.segs[self.active].last;
        self.active = 1 - self.active;
        let s = &mut self.segs[self.active];
        s.offset = 0;
        s.last = None;
        left
    }

    /// Encodes `batch` for [`append`](Self::append); returns its size.
    pub fn encode(&mut self, batch: &Batch) -> Result<usize, StoreError> {
        self.buf.clear();
        self.buf.resize(HEADER, 0);
        // Named fields: some are left out when empty, which a positional encoding cannot do.
        rmp_serde::encode::write_named(&mut self.buf, batch).map_err(encoding)?;
        Ok(self.buf.len() - HEADER)
    }

    /// Writes the batch last given to [`encode`](Self::encode) as the next record of the
    /// active segment and syncs it to disk. Returns its seqno once it is durable.
    pub fn append(&mut self) -> Result<u64, StoreError> {
        let seqno = self.next;
        let len = self.buf.len() - HEADER;
        let seg = &mut self.segs[self.active];
        if seg.offset + self.buf.len() as u64 > SEGMENT_BYTES {
            return Err(StoreError::Corrupt {
                what: "write-ahead log",
                detail: format!(
                    "a record of {len} bytes does not fit at offset {} of {}",
                    seg.offset,
                    seg.path.display()
                ),
            });
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&seqno.to_le_bytes());
        h.update(&self.buf[HEADER..]);
        let crc = h.finalize();
        self.buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        self.buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        self.buf[8..16].copy_from_slice(&seqno.to_le_bytes());
        self.buf[16..20].copy_from_slice(&crc.to_le_bytes());
        let io = |e: std::io::Error| StoreError::Io {
            path: seg.path.display().to_string(),
            source: e,
        };
        seg.file.write_all_at(&self.buf, seg.offset).map_err(io)?;
        seg.file.sync_data().map_err(io)?;
        seg.offset += self.buf.len() as u64;
        seg.last = Some(seqno);
        self.next += 1;
        Ok(seqno)
    }
}
