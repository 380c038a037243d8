//! Reading a segment back: its file header, the chain of its current records, and the search,
//! past where that chain stops, for valid records that a damaged one would otherwise hide.
//!
//! A segment file is a header block of [`HEADER_BYTES`] followed by records back to back:
//!
//! ```text
//! header:  "ORDOWAL\0" | version u32 (2) | segment u32 (0 or 1) | store id u64 | segment bytes u64 | crc32 u32 (of the fields before it)
//! record:  magic (FF "O2" FE) | length u32 | seqno u64 | check u32 | payload (length bytes)
//! ```
//!
//! all little-endian. `check` is a CRC-32 of the store id, length, seqno and payload: the store
//! id is a random number kept in the B-tree file and in both headers, never shown to clients, so
//! a record is only ever recognised in the log of the store that wrote it, and a record spelled
//! out inside a message body does not pass as one.

use std::ops::Range;

/// Bytes before the first record of a segment (the file header and padding to a page).
pub const HEADER_BYTES: u64 = 4096;
const FILE_MAGIC: &[u8; 8] = b"ORDOWAL\0";
const VERSION: u32 = 2;
/// The file header's fields: magic, version, segment, store id, segment bytes, crc.
const FILE_FIELDS: usize = 8 + 4 + 4 + 8 + 8 + 4;
/// A record's first bytes: `FF 'O' '2' FE`. Bytes 0xFF and 0xFE never occur in UTF-8, and every
/// field of a batch that a client chooses (bodies, ids, names) is UTF-8 text, so no client can
/// spell a record's start inside what it sends: the search for records past a chain's end meets
/// candidates only where records really began.
pub const RECORD_MAGIC: [u8; 4] = [0xFF, b'O', b'2', 0xFE];
pub const RECORD_HEADER: usize = 4 + 4 + 8 + 4;

/// The header block of segment `segment` of the store `store_id`.
pub(super) fn file_header(store_id: u64, segment: u32, segment_bytes: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_BYTES as usize);
    b.extend_from_slice(FILE_MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&segment.to_le_bytes());
    b.extend_from_slice(&store_id.to_le_bytes());
    b.extend_from_slice(&segment_bytes.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.resize(HEADER_BYTES as usize, 0);
    b
}

/// What a header block says, or why it is not one.
pub fn read_file_header(b: &[u8]) -> Result<(u32, u64, u64), String> {
    if b.len() < FILE_FIELDS {
        return Err("it is shorter than a header".into());
    }
    if &b[..8] != FILE_MAGIC {
        return Err(if b[..FILE_FIELDS].iter().all(|&x| x == 0) {
            "its header is zeroed".into()
        } else {
            "it does not start with a log header".into()
        });
    }
    let crc = u32::from_le_bytes(b[FILE_FIELDS - 4..FILE_FIELDS].try_into().expect("4 bytes"));
    if crc32fast::hash(&b[..FILE_FIELDS - 4]) != crc {
        return Err("its header is damaged (checksum mismatch)".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(format!(
            "it is in log format {version}, which this build does not know (it writes {VERSION}): run the build that wrote it"
        ));
    }
    Ok((u32_at(12), u64_at(16), u64_at(24)))
}

/// The check value of a record.
pub fn record_check(store_id: u64, len: u32, seqno: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&store_id.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(&seqno.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A valid record found in a segment.
pub struct Found {
    pub seqno: u64,
    pub offset: u64,
    pub payload: Range<usize>,
}

/// Why there is no valid record at an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRecord {
    /// Zeros: nothing was ever written there.
    Zeros,
    /// Something other than a record header.
    NotARecord,
    /// A record header whose length runs past the segment.
    BadLength,
    /// A record whose check value does not match its content.
    BadCheck,
    /// The segment ends.
    End,
}

impl NoRecord {
    pub fn describe(self) -> &'static str {
        match self {
            NoRecord::Zeros => "zeros: nothing written there",
            NoRecord::NotARecord => "bytes that are not a record",
            NoRecord::BadLength => "a record header whose length runs past the segment",
            NoRecord::BadCheck => "a record whose checksum does not match its content",
            NoRecord::End => "the end of the segment",
        }
    }
}

/// The valid record at `offset` of `seg`, if there is one.
pub(super) fn record_at(seg: &[u8], offset: u64, store_id: u64) -> Result<Found, NoRecord> {
    let o = usize::try_from(offset).map_err(|_| NoRecord::End)?;
    let Some(h) = seg.get(o..o + RECORD_HEADER) else {
        return Err(NoRecord::End);
    };
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if h[..4] != RECORD_MAGIC {
        return Err(if h.iter().all(|&b| b == 0) {
            NoRecord::Zeros
        } else {
            NoRecord::NotARecord
        });
    }
    let len = u32_at(4);
    let seqno = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let start = o + RECORD_HEADER;
    let Some(payload) = seg.get(start..start + len as usize) else {
        return Err(NoRecord::BadLength);
    };
    if record_check(store_id, len, seqno, payload) != u32_at(16) {
        return Err(NoRecord::BadCheck);
    }
    Ok(Found {
        seqno,
        offset,
        payload: start..start + len as usize,
    })
}

/// What a segment holds.
pub struct Scan {
    /// Its current records: from the first record on, each following its predecessor's seqno.
    pub chain: Vec<Found>,
    /// Where the chain stops, and what is there.
    pub end: u64,
    pub end_is: NoRecord,
    /// When the chain stops at a valid record that does not follow it: that record's seqno (a
    /// stale record of an earlier round, normally).
    pub end_seqno: Option<u64>,
    /// Valid records anywhere past where the chain stops (stale ones, normally).
    pub beyond: Vec<Found>,
}

/// Reads the records of one segment's bytes (the whole file, header included).
pub fn scan(seg: &[u8], store_id: u64) -> Scan {
    let mut chain: Vec<Found> = Vec::new();
    let mut offset = HEADER_BYTES;
    let (end_is, end_seqno) = loop {
        match record_at(seg, offset, store_id) {
            Ok(r) if chain.last().is_none_or(|p| p.seqno + 1 == r.seqno) => {
                offset = r.payload.end as u64;
                chain.push(r);
            }
            Ok(r) => break (NoRecord::NotARecord, Some(r.seqno)),
            Err(why) => break (why, None),
        }
    };
    let end = offset;
    // Every valid record past the chain's end: the magic number, then the whole check.
    let mut beyond = Vec::new();
    let from = (end as usize).min(seg.len());
    let mut skip_to = from;
    for at in memchr::memmem::find_iter(&seg[from..], &RECORD_MAGIC) {
        let at = from + at;
        if at < skip_to {
            continue;
        }
        if let Ok(r) = record_at(seg, at as u64, store_id) {
            skip_to = r.payload.end;
            beyond.push(r);
        }
    }
    Scan {
        chain,
        end,
        end_is,
        end_seqno,
        beyond,
    }
}
