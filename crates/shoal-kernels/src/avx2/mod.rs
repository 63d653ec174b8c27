//! AVX2 + FMA + F16C kernels for x86-64.
//!
//! Everything here is reached through an [`Avx2`] token, which exists only after runtime
//! detection found the three features; the safe wrappers check slice lengths once and then run
//! `#[target_feature]` code over raw pointers in their inner loops.
//!
//! The quantized dot products keep llama.cpp's per-block arithmetic: integer products summed
//! into eight lanes of four bytes each, converted to f32 and accumulated with one FMA per block
//! against the product of the two block scales, then summed horizontally in the same order.
//! That makes the results bit-identical to ggml's on the same inputs (checked by the golden
//! tests), which is what lets greedy decoding match it token for token.
#![allow(unsafe_code)]

mod attn;
mod float;
mod kquants;
mod legacy;

use std::arch::x86_64::*;

pub(crate) use attn::attend;
pub(crate) use float::{
    axpy_f16, dot_bf16_bytes, dot_f16, dot_f16_bytes, dot_f32, dot_f32_bytes, f16_to_f32,
    f32_to_f16,
};
pub(crate) use kquants::{q4_k_dot, q5_k_dot, q6_k_dot};
pub(crate) use legacy::{q4_0_tile, q4_1_tile, q8_0_tile};

use crate::Isa;
use crate::quant::QK;

/// Proof that this CPU has AVX2, FMA and F16C.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2 {
    _private: (),
}

impl Avx2 {
    /// The token, if the CPU supports the features.
    #[inline]
    pub(crate) fn get() -> Option<Avx2> {
        (Isa::detected() == Isa::Avx2).then_some(Avx2 { _private: () })
    }
}

/// Sums the eight lanes in the order ggml's `hsum_float_8` does (halves, then pairs, then the
/// last two), which the bit-exact agreement depends on.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_f32x8(v: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Widens the f16 at `p` (unaligned).
///
/// # Safety
/// `p` must be valid for reading two bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: two readable bytes by the caller's contract.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Widens the two consecutive f16 at `p` (unaligned), e.g. a block's `d` and `m`.
///
/// # Safety
/// `p` must be valid for reading four bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16x2_at(p: *const u8) -> (f32, f32) {
    // SAFETY: four readable bytes by the caller's contract.
    let bits = unsafe { p.cast::<i32>().read_unaligned() };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// Expands 16 bytes of packed nibbles to 32 bytes: low nibbles first, then high nibbles.
///
/// # Safety
/// `p` must be valid for reading 16 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes by the caller's contract.
    let q = unsafe { _mm_loadu_si128(p.cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Quantizes one vector to Q8_0 (or Q8_1 when `s` is given) into split fields, producing exactly
/// the values of [`crate::quant::legacy::quantize_act_block`] (same operations, same rounding).
pub(crate) fn quantize_q8(
    _t: Avx2,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: Option<&mut [f32]>,
) {
    let nb = x.len() / QK;
    assert!(qs.len() >= nb * QK && d.len() >= nb && s.as_ref().is_none_or(|s| s.len() >= nb));
    // SAFETY: features proven by the token; lengths checked above.
    unsafe { quantize_q8_impl(x.as_ptr(), qs.as_mut_ptr(), d, s, nb) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_impl(
    x: *const f32,
    qs: *mut i8,
    d: &mut [f32],
    mut s: Option<&mut [f32]>,
    nb: usize,
) {
    let sign = _mm256_set1_ps(-0.0);
    for b in 0..nb {
        // SAFETY: the caller checked x holds nb*32 floats and qs nb*32 bytes.
        let (xb, qb) = unsafe { (x.add(b * QK), qs.add(b * QK)) };
        let v: [__m256; 4] = std::array::from_fn(|k| {
            // SAFETY: within block b of x.
            unsafe { _mm256_loadu_ps(xb.add(8 * k)) }
        });
        let mut amax = _mm256_andnot_ps(sign, v[0]);
        for vk in &v[1..] {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *vk));
        }
        let mut m4 = _mm_max_ps(
            _mm256_extractf128_ps::<1>(amax),
            _mm256_castps256_ps128(amax),
        );
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let db = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mul = _mm256_set1_ps(id);
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v[k], mul),
            );
            _mm256_cvtps_epi32(r)
        });
        d[b] = f16_round(db);
        if let Some(s) = s.as_deref_mut() {
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let mut h = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            h = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
            h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01>(h));
            s[b] = f16_round(db * _mm_cvtsi128_si32(h) as f32);
        }
        // Saturating packs interleave 128-bit halves; the permute restores element order.
        let p16a = _mm256_packs_epi32(i[0], i[1]);
        let p16b = _mm256_packs_epi32(i[2], i[3]);
        let p8 = _mm256_packs_epi16(p16a, p16b);
        let ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 writable bytes of block b.
        unsafe { _mm256_storeu_si256(qb.cast(), ordered) };
    }
}

/// Rounds to f16 and back with the F16C instruction (ties to even, like `half`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16_round(x: f32) -> f32 {
    let h = _mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(x));
    _mm_cvtss_f32(_mm_cvtph_ps(h))
}
