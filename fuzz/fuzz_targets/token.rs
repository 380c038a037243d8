//! Any text given as a token: verifying never panics, and only a token signed with the key is
//! accepted (the fuzzer cannot forge one: a token that verifies must be the one the key signs
//! for its claims).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ordo_server::auth::TokenKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = TokenKey::new(b"fuzzing-secret-of-thirty-two-bytes!");
    if let Ok(claims) = key.verify(text, 0) {
        let signed = key
            .sign(&claims)
            .expect("claims that verified can be signed");
        assert_eq!(key.verify(&signed, 0).ok(), Some(claims));
    }
});
