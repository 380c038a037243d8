//! The write-ahead log: where a batch becomes durable.
//!
//! Making a batch durable in the B-tree file costs a commit that writes and syncs many pages
//! (message leaves, dedup leaves, conversation records, the allocator state, the header). The
//! log instead takes one sequential write of the encoded batch and one `fdatasync`, which is as
//! little as the disk allows. The B-tree is then updated without syncing, and made durable now
//! and then by a checkpoint, after which the log starts over.
//!
//! File layout: `wal.log`, preallocated and zero-filled once to [`CAPACITY`] bytes (so that a
//! sync flushes data only, never the file's size or extent map), holding records back to back
//! from offset 0:
//!
//! ```text
//! magic u32 | length u32 | seqno u64 | crc32 u32 (of seqno and payload) | payload (length bytes)
//! ```
//!
//! all little-endian, the payload a MessagePack-encoded [`Batch`]. Seqnos increase by one per
//! record. After a checkpoint the next record is written at offset 0 again, so the file holds
//! the current records followed by stale ones from earlier rounds; reading stops at the first
//! record that is torn (bad magic, length or checksum) or does not follow its predecessor's
//! seqno, which is exactly where the current records end.

use crate::StoreError;
use ordo_core::Batch;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of the log file. A checkpoint is due well before it fills ([`CHECKPOINT_BYTES`]).
pub const CAPACITY: u64 = 64 << 20;
/// Once this much of the log is used, the next commit checkpoints.
pub const CHECKPOINT_BYTES: u64 = 16 << 20;
const MAGIC: u32 = 0x4f52_4457; // "ORDW"
const HEADER: usize = 4 + 4 + 8 + 4;

pub struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// Seqno of the next record.
    next: u64,
    buf: Vec<u8>,
}

/// A record read back at start.
pub struct Record {
    pub seqno: u64,
    pub batch: Batch,
}

impl Wal {
    /// Opens (or creates) the log in `dir` and reads back its current records, oldest first.
    /// New records are appended after them.
    pub fn open(dir: &Path) -> Result<(Wal, Vec<Record>), StoreError> {
        let path = dir.join("wal.log");
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
        if len < CAPACITY {
            // Zero-fill for real (not a sparse file or unwritten extents): later syncs then
            // flush data blocks only.
            let zeros = vec![0u8; 1 << 20];
            let mut off = len;
            while off < CAPACITY {
                let n = (CAPACITY - off).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], off).map_err(io)?;
                off += n as u64;
            }
            file.sync_all().map_err(io)?;
            if let Some(parent) = path.parent() {
                // The new file's directory entry must survive a crash too.
                File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let mut wal = Wal {
            file,
            path,
            offset: 0,
            next: 0,
            buf: Vec::new(),
        };
        let records = wal.read_all()?;
        Ok((wal, records))
    }

    fn read_all(&mut self) -> Result<Vec<Record>, StoreError> {
        let mut records: Vec<Record> = Vec::new();
        let mut header = [0u8; HEADER];
        loop {
            if self.offset + HEADER as u64 > CAPACITY {
                break;
            }
            if self.file.read_exact_at(&mut header, self.offset).is_err() {
                break;
            }
            let magic = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default()) as u64;
            let seqno = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            let crc = u32::from_le_bytes(header[16..20].try_into().unwrap_or_default());
            let end = self.offset + HEADER as u64 + len;
            if magic != MAGIC || end > CAPACITY {
                break;
            }
            if records.last().is_some_and(|r| r.seqno + 1 != seqno) {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            if self
                .file
                .read_exact_at(&mut payload, self.offset + HEADER as u64)
                .is_err()
            {
                break;
            }
            let mut h = crc32fast::Hasher::new();
            h.update(&seqno.to_le_bytes());
            h.update(&payload);
            if h.finalize() != crc {
                break;
            }
            // A record whose checksum holds but does not decode was written by something else:
            // say so rather than silently dropping what may be accepted messages.
            let batch: Batch =
                rmp_serde::from_slice(&payload).map_err(|e| StoreError::Corrupt {
                    what: "write-ahead log record",
                    detail: format!("record {seqno} at offset {}: {e}", self.offset),
                })?;
            records.push(Record { seqno, batch });
            self.offset = end;
        }
        self.next = records.last().map_or(0, |r| r.seqno + 1);
        Ok(records)
    }

    /// Seqno the next record will get.
    pub fn next_seqno(&self) -> u64 {
        self.next
    }

    /// Bytes of the log in use.
    pub fn used(&self) -> u64 {
        self.offset
    }

    /// Whether a record of about `len` payload bytes still fits.
    pub fn fits(&self, len: usize) -> bool {
        self.offset + (HEADER + len) as u64 <= CAPACITY
    }

    /// Encodes `batch` for [`append`](Self::append).
    pub fn encode(&mut self, batch: &Batch) -> Result<usize, StoreError> {
        self.buf.clear();
        self.buf.resize(HEADER, 0);
        // Named fields: some are left out when empty, which a positional encoding cannot do.
        rmp_serde::encode::write_named(&mut self.buf, batch)?;
        Ok(self.buf.len() - HEADER)
    }

    /// Writes the batch last given to [`encode`](Self::encode) as the next record and syncs it
    /// to disk. Returns its seqno once it is durable.
    pub fn append(&mut self) -> Result<u64, StoreError> {
        let seqno = self.next;
        let len = self.buf.len() - HEADER;
        if !self.fits(len) {
            return Err(StoreError::Corrupt {
                what: "write-ahead log",
                detail: format!(
                    "a record of {len} bytes does not fit at offset {} of {CAPACITY}",
                    self.offset
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
            path: self.path.display().to_string(),
            source: e,
        };
        self.file.write_all_at(&self.buf, self.offset).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.offset += self.buf.len() as u64;
        self.next += 1;
        Ok(seqno)
    }

    /// Starts over at offset 0 once everything up to `next_seqno() - 1` is durable elsewhere.
    pub fn restart(&mut self) {
        self.offset = 0;
    }

    /// Sets the seqno of the next record (at start, to follow what the B-tree already holds).
    pub fn set_next_seqno(&mut self, next: u64) {
        self.next = next;
    }
}
