//! Reading the log format of earlier builds (format 1: no file header, records from offset 0,
//! a checksum of seqno and payload only), once, when a store written by them is first opened:
//! its records are replayed into the B-tree, which is then made durable, and the log is written
//! anew in the current format.
//!
//! Format 1 cannot tell damage from a torn tail or stale records from current ones; what it
//! reads is what those builds would have replayed: each segment up to its first record that is
//! torn or does not follow its predecessor.

use super::files::LogFile;
use super::Record;
use ordo_core::Batch;
use ordo_store::StoreError;

const MAGIC: u32 = 0x4f52_4457; // "ORDW"
const HEADER: usize = 4 + 4 + 8 + 4;

/// Whether a segment starting with these bytes starts with a format-1 record.
pub(super) fn starts_a_record(head: [u8; 4]) -> bool {
    u32::from_le_bytes(head) == MAGIC
}

/// The records of one format-1 segment of `len` bytes, oldest first.
pub(super) fn read(file: &dyn LogFile, len: u64, name: &str) -> Result<Vec<Record>, StoreError> {
    let mut records: Vec<Record> = Vec::new();
    let mut header = [0u8; HEADER];
    let mut offset = 0u64;
    while offset + HEADER as u64 <= len && file.read_exact_at(&mut header, offset).is_ok() {
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&header[r]);
            u64::from_le_bytes(b)
        };
        let (magic, plen, seqno, crc) = (word(0..4), word(4..8), word(8..16), word(16..20));
        let end = offset + HEADER as u64 + plen;
        if magic != u64::from(MAGIC) || end > len {
            break;
        }
        if records.last().is_some_and(|r| r.seqno + 1 != seqno) {
            break;
        }
        let mut payload = vec![0u8; plen as usize];
        if file
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
        let batch: Batch = rmp_serde::from_slice(&payload).map_err(|e| StoreError::Corrupt {
            what: "write-ahead log record (format 1)",
            detail: format!("{name} record {seqno} at offset {offset}: {e}"),
        })?;
        records.push(Record { seqno, batch });
        offset = end;
    }
    Ok(records)
}
