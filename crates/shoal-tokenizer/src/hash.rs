//! A small, fast, non-cryptographic hash for the tokenizer's internal tables. The keys are token
//! texts and token-id pairs taken from the model file, so flooding resistance (what std's
//! SipHash buys) is not needed, and SipHash would dominate tokenizer construction time.

use std::hash::{BuildHasherDefault, Hasher};

const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Multiply-rotate hasher over 64-bit words.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastHasher {
    state: u64,
}

impl FastHasher {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.state = (self.state.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // Fold the well-mixed high bits down: table indexes use the low bits.
        self.state ^ (self.state >> 29)
    }
}

/// `BuildHasher` for std maps keyed by ids.
pub(crate) type FastBuild = BuildHasherDefault<FastHasher>;

/// Hash of a byte string (length-aware, so "a" and "a\0" differ).
#[inline]
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = FastHasher::default();
    h.write(bytes);
    h.mix(bytes.len() as u64);
    h.finish()
}
