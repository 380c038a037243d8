//! Any bytes a client sends as a JSON text frame: decoding never panics, and a frame that
//! decodes encodes and decodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ordo_protocol::{decode_client, encode, Encoded, Encoding};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_client(data, Encoding::Json) {
        let again = match encode(&frame, Encoding::Json) {
            Encoded::Text(t) => t.into_bytes(),
            Encoded::Binary(b) => b,
        };
        assert_eq!(decode_client(&again, Encoding::Json).ok(), Some(frame));
    }
});
