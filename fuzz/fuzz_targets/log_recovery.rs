//! Any bytes as a log segment, and segments of well-formed records damaged in one place:
//! reading the header and searching the records never panics; every record found lies inside
//! the segment; the chain of current records is exactly the written records before the first
//! one damaged or out of sequence.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ordo_store_redb::wal::scan::{self, HEADER_BYTES, RECORD_HEADER, RECORD_MAGIC};

const STORE: u64 = 0x5eed;

fuzz_target!(|data: &[u8]| {
    let _ = scan::read_file_header(data);
    // Raw bytes after an empty header.
    let mut raw = vec![0u8; HEADER_BYTES as usize];
    raw.extend_from_slice(data);
    check(&raw, STORE);

    // Records built from the input: [count, skip-at, flip-at (2 bytes), payload bytes...].
    if data.len() < 4 {
        return;
    }
    let (count, skip_at) = (usize::from(data[0] % 16), usize::from(data[1] % 32));
    let flip_at = usize::from(u16::from_le_bytes([data[2], data[3]]));
    let payloads = &data[4..];
    let mut seg = vec![0u8; HEADER_BYTES as usize];
    let mut written = Vec::new();
    let mut seqno = 100u64;
    for i in 0..count {
        let len = payloads.len().min(i * 7 % 40);
        let payload = &payloads[..len];
        // Out of sequence at `skip_at`: a stale record's place.
        if i == skip_at {
            seqno -= 50;
        }
        let check = scan::record_check(STORE, len as u32, seqno, payload);
        written.push((seg.len(), seqno));
        seg.extend_from_slice(&RECORD_MAGIC);
        seg.extend_from_slice(&(len as u32).to_le_bytes());
        seg.extend_from_slice(&seqno.to_le_bytes());
        seg.extend_from_slice(&check.to_le_bytes());
        seg.extend_from_slice(payload);
        seqno += 1;
    }
    let flipped = HEADER_BYTES as usize + flip_at;
    if flipped < seg.len() {
        seg[flipped] ^= 0x01;
    }
    let found = check(&seg, STORE);
    // The chain: the written records up to the first damaged (holding the flipped byte) or out
    // of sequence one.
    let mut want = Vec::new();
    for (k, &(offset, s)) in written.iter().enumerate() {
        let end = written.get(k + 1).map_or(seg.len(), |w| w.0);
        let damaged = (offset..end).contains(&flipped);
        if damaged || want.last().is_some_and(|&(_, p): &(usize, u64)| p + 1 != s) {
            break;
        }
        want.push((offset, s));
    }
    let got: Vec<(usize, u64)> = found
        .chain
        .iter()
        .map(|r| (r.offset as usize, r.seqno))
        .collect();
    assert_eq!(got, want);
});

/// Scans `seg` and checks what holds for any bytes.
fn check(seg: &[u8], store_id: u64) -> scan::Scan {
    let found = scan::scan(seg, store_id);
    for r in found.chain.iter().chain(&found.beyond) {
        assert!(r.payload.end <= seg.len());
        assert_eq!(r.offset as usize + RECORD_HEADER, r.payload.start);
    }
    for pair in found.chain.windows(2) {
        assert_eq!(pair[0].payload.end, pair[1].offset as usize);
        assert_eq!(pair[0].seqno + 1, pair[1].seqno);
    }
    for pair in found.beyond.windows(2) {
        assert!(pair[0].payload.end <= pair[1].offset as usize);
    }
    found
}
