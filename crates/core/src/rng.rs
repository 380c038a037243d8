//! A tiny deterministic generator (SplitMix64) for values the core must invent, such as epochs.
//! Seeded by the caller, so that a simulation replays exactly.

#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A non-zero value below 2^53, so that it survives a round trip through a JavaScript number.
    pub fn next_epoch(&mut self) -> u64 {
        loop {
            let v = self.next_u64() & ((1u64 << 53) - 1);
            if v != 0 {
                return v;
            }
        }
    }
}
