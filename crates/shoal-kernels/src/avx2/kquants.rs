//! Dot products of the K formats with Q8_K activations, one (row, activation) pair at a time.
//!
//! Integer partial sums land in eight i32 lanes of four consecutive bytes each, then one FMA per
//! super-block adds `d * lanes` to a float accumulator, as ggml does. The sub-block minimums of
//! Q4_K/Q5_K are applied through the activation's 16-element sums (`bsums`) instead of per
//! element.

use std::arch::x86_64::*;

use super::{Avx2, f16_at, hsum_f32x8};
use crate::acts::ActRow;
use crate::quant::QK_K;
use crate::quant::kquants::{Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, scale_min_k4};

/// Super-blocks ahead to prefetch (see the note on prefetching in `legacy.rs`).
const K_PREFETCH: usize = 2;

/// Prefetches every cache line of a block; the address may lie past the row (prefetches never
/// fault).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn prefetch_block(p: *const u8, bytes: usize) {
    let mut off = 0;
    while off < bytes {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
        off += 64;
    }
}

fn check(w: &[u8], y: &ActRow<'_>, nb: usize, block_bytes: usize, needs_bsums: bool) {
    assert!(w.len() >= nb * block_bytes, "weight row too short");
    assert!(
        y.qs.len() >= nb * QK_K && y.d.len() >= nb,
        "activation too short"
    );
    assert!(!needs_bsums || y.bsums.len() >= nb * 16, "bsums missing");
}

/// Q4_K row · Q8_K activation over `nb` super-blocks.
pub(crate) fn q4_k_dot(_t: Avx2, w: &[u8], y: &ActRow<'_>, nb: usize) -> f32 {
    check(w, y, nb, Q4_K_BYTES, true);
    // SAFETY: features proven by the token; all pointers cover nb super-blocks (checked above).
    unsafe { q4_k_impl::<false>(w.as_ptr(), y, nb) }
}

/// Q5_K row · Q8_K activation over `nb` super-blocks.
pub(crate) fn q5_k_dot(_t: Avx2, w: &[u8], y: &ActRow<'_>, nb: usize) -> f32 {
    check(w, y, nb, Q5_K_BYTES, true);
    // SAFETY: features proven by the token; all pointers cover nb super-blocks (checked above).
    unsafe { q4_k_impl::<true>(w.as_ptr(), y, nb) }
}

/// Unpacks the eight 6-bit scales and mins of a Q4_K/Q5_K block as
/// `[sc0..sc7, m0..m7]` in 16-bit lanes.
///
/// # Safety
/// `p` must point at the 12 packed scale bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scales_mins(p: *const u8) -> ([u8; 8], __m256i) {
    let mut packed = [0u8; 12];
    // SAFETY: 12 readable bytes by the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(p, packed.as_mut_ptr(), 12) };
    let mut both = [0u8; 16];
    for j in 0..8 {
        (both[j], both[8 + j]) = scale_min_k4(j, &packed);
    }
    let mut sc = [0u8; 8];
    sc.copy_from_slice(&both[..8]);
    // SAFETY: `both` is 16 readable bytes.
    let v = unsafe { _mm_loadu_si128(both.as_ptr().cast()) };
    (sc, _mm256_cvtepu8_epi16(v))
}

/// Q4_K (or Q5_K when `FIVE`) · Q8_K.
///
/// # Safety
/// AVX2/FMA/F16C present; `w` and every field of `y` cover `nb` super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_impl<const FIVE: bool>(w: *const u8, y: &ActRow<'_>, nb: usize) -> f32 {
    let block_bytes = if FIVE { Q5_K_BYTES } else { Q4_K_BYTES };
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    let mut summs = 0.0f32;
    for b in 0..nb {
        // SAFETY: super-block b is within the bounds the caller guarantees.
        unsafe {
            let blk = w.add(b * block_bytes);
            prefetch_block(blk.wrapping_add(K_PREFETCH * block_bytes), block_bytes);
            let q8 = y.qs.as_ptr().add(b * QK_K);
            let yd = *y.d.as_ptr().add(b);
            let d = yd * f16_at(blk);
            let dmin = -yd * f16_at(blk.add(2));
            let (sc, mins_scales) = scales_mins(blk.add(4));
            // Sums of the activation over each 32-element sub-block, from the 16-element sums.
            let bs = _mm256_loadu_si256(y.bsums.as_ptr().add(16 * b).cast());
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            let prod = _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_scales), q8s);
            if FIVE {
                let mut h = _mm_add_epi32(prod, _mm_unpackhi_epi64(prod, prod));
                h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01>(h));
                summs = dmin.mul_add(_mm_cvtsi128_si32(h) as f32, summs);
            } else {
                acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
            }
            let (qh, qs) = if FIVE {
                (_mm256_loadu_si256(blk.add(16).cast()), blk.add(48))
            } else {
                (_mm256_setzero_si256(), blk.add(16))
            };
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let bits = _mm256_loadu_si256(qs.add(32 * j).cast());
                let mut lo = _mm256_and_si256(bits, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                if FIVE {
                    // Bit 2j of qh[l] is the fifth bit of element 64j+l, bit 2j+1 of 64j+32+l.
                    let sl = _mm_cvtsi32_si128(2 * j as i32);
                    let sh = _mm_cvtsi32_si128(2 * j as i32 + 1);
                    let hl = _mm256_and_si256(_mm256_srl_epi16(qh, sl), one);
                    let hh = _mm256_and_si256(_mm256_srl_epi16(qh, sh), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hl));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(hh));
                }
                let y_lo = _mm256_loadu_si256(q8.add(64 * j).cast());
                let y_hi = _mm256_loadu_si256(q8.add(64 * j + 32).cast());
                let s_lo = _mm256_set1_epi16(i16::from(sc[2 * j]));
                let s_hi = _mm256_set1_epi16(i16::from(sc[2 * j + 1]));
                let p_lo = _mm256_madd_epi16(s_lo, _mm256_maddubs_epi16(lo, y_lo));
                let p_hi = _mm256_madd_epi16(s_hi, _mm256_maddubs_epi16(hi, y_hi));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    let mut m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    if FIVE {
        hsum_f32x8(acc) + summs
    } else {
        hsum_f32x8(acc) + _mm_cvtss_f32(m)
    }
}

/// Q6_K row · Q8_K activation over `nb` super-blocks.
pub(crate) fn q6_k_dot(_t: Avx2, w: &[u8], y: &ActRow<'_>, nb: usize) -> f32 {
    check(w, y, nb, Q6_K_BYTES, true);
    // SAFETY: features proven by the token; all pointers cover nb super-blocks (checked above).
    unsafe { q6_k_impl(w.as_ptr(), y, nb) }
}

/// # Safety
/// AVX2/FMA/F16C present; `w` and `y` cover `nb` super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_impl(w: *const u8, y: &ActRow<'_>, nb: usize) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        // SAFETY: super-block b is within the bounds the caller guarantees.
        unsafe {
            let blk = w.add(b * Q6_K_BYTES);
            prefetch_block(blk.wrapping_add(K_PREFETCH * Q6_K_BYTES), Q6_K_BYTES);
            let q8 = y.qs.as_ptr().add(b * QK_K);
            let d = *y.d.as_ptr().add(b) * f16_at(blk.add(208));
            let sc = blk.add(192).cast::<i8>();
            // The -32 offset of every value, applied once per sub-block through the
            // activation's 16-element sums: lane m gets 32 * (sc[2m]*bsum[2m] + sc[2m+1]*bsum[2m+1]).
            // ggml distributes it over the lanes this way; the lane split decides the rounding.
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.cast()));
            let bsums = _mm256_loadu_si256(y.bsums.as_ptr().add(16 * b).cast());
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, scales16));
            let mut sumi = _mm256_setzero_si256();
            for n in 0..2 {
                let ql1 = _mm256_loadu_si256(blk.add(64 * n).cast());
                let ql2 = _mm256_loadu_si256(blk.add(64 * n + 32).cast());
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * n).cast());
                let h = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m2));
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), h(qh)),
                    _mm256_or_si256(_mm256_and_si256(ql2, m4), h(_mm256_srli_epi16::<2>(qh))),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        h(_mm256_srli_epi16::<4>(qh)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql2), m4),
                        h(_mm256_srli_epi16::<6>(qh)),
                    ),
                ];
                for (k, qk) in q.iter().enumerate() {
                    let yk = _mm256_loadu_si256(q8.add(128 * n + 32 * k).cast());
                    // Unsigned 6-bit values times y; the offset is subtracted above.
                    let p = _mm256_maddubs_epi16(*qk, yk);
                    let s_lo = i16::from(*sc.add(8 * n + 2 * k));
                    let s_hi = i16::from(*sc.add(8 * n + 2 * k + 1));
                    let scale = _mm256_set_m128i(_mm_set1_epi16(s_hi), _mm_set1_epi16(s_lo));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, p));
                }
            }
            sumi = _mm256_sub_epi32(sumi, offset);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc)
}
