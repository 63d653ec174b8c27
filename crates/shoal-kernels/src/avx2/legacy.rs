//! Tiled dot products of the 32-element formats: Q4_1 × Q8_1, Q8_0 × Q8_0, Q4_0 × Q8_0.
//!
//! A tile is `R` weight rows × `C` activation vectors: each weight block is loaded and unpacked
//! once per tile and each activation block once per tile, while the `R*C` accumulators stay in
//! registers. Every (row, activation) pair still runs exactly ggml's per-block arithmetic, so a
//! tile gives the same bits as `R*C` separate dot products. Independent accumulators also hide
//! the FMA latency that a single dot product's dependency chain would expose.

use std::arch::x86_64::*;
use std::array::from_fn;

use super::{Avx2, f16_at, f16x2_at, hsum_f32x8, nibbles_32};
use crate::acts::ActRow;
use crate::quant::QK;
use crate::quant::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

// Software prefetch distances, in blocks ahead in the same row. Weights stream from memory once
// per token, and on the machines measured (Zen 4 VMs) the hardware prefetchers alone left much
// of the bandwidth unused: prefetching cut the 30 MB Q8_0 output head from ~6 ms to ~2.5 ms on
// one thread. Both shorter and longer distances measured slower. The address may lie past the
// row (prefetches never fault), hence `wrapping_add`.
const Q8_0_PREFETCH: usize = 8;
const Q4_1_PREFETCH: usize = 24;
const Q4_0_PREFETCH: usize = 24;

/// Pointers to one activation vector's fields.
#[derive(Clone, Copy)]
struct Y {
    qs: *const i8,
    d: *const f32,
    s: *const f32,
}

fn check<const R: usize, const C: usize>(
    w: &[&[u8]; R],
    y: &[ActRow<'_>; C],
    nb: usize,
    block_bytes: usize,
    needs_s: bool,
) -> ([*const u8; R], [Y; C]) {
    for r in w {
        assert!(r.len() >= nb * block_bytes, "weight row too short");
    }
    for a in y {
        assert!(
            a.qs.len() >= nb * QK && a.d.len() >= nb,
            "activation too short"
        );
        assert!(!needs_s || a.s.len() >= nb, "activation sums missing");
    }
    (
        w.map(|r| r.as_ptr()),
        y.map(|a| Y {
            qs: a.qs.as_ptr(),
            d: a.d.as_ptr(),
            s: a.s.as_ptr(),
        }),
    )
}

/// Loads block `b` of every activation: quantized values and scale (and sum when `S`).
///
/// # Safety
/// Each activation must hold at least `b + 1` blocks (and sums when `S`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_acts<const C: usize, const S: bool>(
    y: &[Y; C],
    b: usize,
) -> ([__m256i; C], [f32; C], [f32; C]) {
    let mut q = [_mm256_setzero_si256(); C];
    let mut d = [0.0f32; C];
    let mut s = [0.0f32; C];
    for c in 0..C {
        // SAFETY: block b is in bounds by the caller's contract.
        unsafe {
            q[c] = _mm256_loadu_si256(y[c].qs.add(b * QK).cast());
            d[c] = *y[c].d.add(b);
            if S {
                s[c] = *y[c].s.add(b);
            }
        }
    }
    (q, d, s)
}

/// `out[r][c]` = Q4_1 row `w[r]` · Q8_1 activation `y[c]` over `nb` blocks.
pub(crate) fn q4_1_tile<const R: usize, const C: usize>(
    _t: Avx2,
    w: &[&[u8]; R],
    y: &[ActRow<'_>; C],
    nb: usize,
) -> [[f32; C]; R] {
    let (wp, yp) = check(w, y, nb, Q4_1_BYTES, true);
    // SAFETY: features proven by the token; every pointer covers nb blocks (checked above).
    unsafe { q4_1_impl(&wp, &yp, nb) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_impl<const R: usize, const C: usize>(
    w: &[*const u8; R],
    y: &[Y; C],
    nb: usize,
) -> [[f32; C]; R] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut summs = [[0.0f32; C]; R];
    for b in 0..nb {
        // SAFETY: b < nb, covered by the caller's bounds.
        let (yq, yd, ys) = unsafe { load_acts::<C, true>(y, b) };
        let ydv: [__m256; C] = from_fn(|c| _mm256_set1_ps(yd[c]));
        for r in 0..R {
            // SAFETY: block b of row r is in bounds.
            let (d0, m0, qx) = unsafe {
                let blk = w[r].add(b * Q4_1_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q4_1_PREFETCH * Q4_1_BYTES).cast());
                let (d0, m0) = f16x2_at(blk);
                (d0, m0, nibbles_32(blk.add(4)))
            };
            let d0v = _mm256_set1_ps(d0);
            for c in 0..C {
                // Nibbles are unsigned, so maddubs can take them directly as its u8 operand.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, yq[c]), ones);
                // Lane-wise d0*d1 is the same rounding as ggml's scalar product, broadcast.
                let scale = _mm256_mul_ps(d0v, ydv[c]);
                acc[r][c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r][c]);
                // ggml accumulates the min terms with a fused multiply-add, block by block.
                summs[r][c] = m0.mul_add(ys[c], summs[r][c]);
            }
        }
    }
    from_fn(|r| from_fn(|c| hsum_f32x8(acc[r][c]) + summs[r][c]))
}

/// `out[r][c]` = Q8_0 row `w[r]` · Q8_0 activation `y[c]` over `nb` blocks.
pub(crate) fn q8_0_tile<const R: usize, const C: usize>(
    _t: Avx2,
    w: &[&[u8]; R],
    y: &[ActRow<'_>; C],
    nb: usize,
) -> [[f32; C]; R] {
    let (wp, yp) = check(w, y, nb, Q8_0_BYTES, false);
    // SAFETY: features proven by the token; every pointer covers nb blocks (checked above).
    unsafe { q8_0_impl(&wp, &yp, nb) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_impl<const R: usize, const C: usize>(
    w: &[*const u8; R],
    y: &[Y; C],
    nb: usize,
) -> [[f32; C]; R] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..nb {
        // SAFETY: b < nb, covered by the caller's bounds.
        let (yq, yd, _) = unsafe { load_acts::<C, false>(y, b) };
        let ydv: [__m256; C] = from_fn(|c| _mm256_set1_ps(yd[c]));
        for r in 0..R {
            // SAFETY: block b of row r is in bounds.
            let (d0, qx) = unsafe {
                let blk = w[r].add(b * Q8_0_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q8_0_PREFETCH * Q8_0_BYTES).cast());
                (f16_at(blk), _mm256_loadu_si256(blk.add(2).cast()))
            };
            // maddubs needs one unsigned operand: move x's sign onto y.
            let d0v = _mm256_set1_ps(d0);
            let ax = _mm256_sign_epi8(qx, qx);
            for c in 0..C {
                let sy = _mm256_sign_epi8(yq[c], qx);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                let scale = _mm256_mul_ps(d0v, ydv[c]);
                acc[r][c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r][c]);
            }
        }
    }
    from_fn(|r| from_fn(|c| hsum_f32x8(acc[r][c])))
}

/// `out[r][c]` = Q4_0 row `w[r]` · Q8_0 activation `y[c]` over `nb` blocks.
pub(crate) fn q4_0_tile<const R: usize, const C: usize>(
    _t: Avx2,
    w: &[&[u8]; R],
    y: &[ActRow<'_>; C],
    nb: usize,
) -> [[f32; C]; R] {
    let (wp, yp) = check(w, y, nb, Q4_0_BYTES, false);
    // SAFETY: features proven by the token; every pointer covers nb blocks (checked above).
    unsafe { q4_0_impl(&wp, &yp, nb) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_impl<const R: usize, const C: usize>(
    w: &[*const u8; R],
    y: &[Y; C],
    nb: usize,
) -> [[f32; C]; R] {
    let ones = _mm256_set1_epi16(1);
    let eight = _mm256_set1_epi8(8);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..nb {
        // SAFETY: b < nb, covered by the caller's bounds.
        let (yq, yd, _) = unsafe { load_acts::<C, false>(y, b) };
        let ydv: [__m256; C] = from_fn(|c| _mm256_set1_ps(yd[c]));
        for r in 0..R {
            // SAFETY: block b of row r is in bounds.
            let (d0, qx) = unsafe {
                let blk = w[r].add(b * Q4_0_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(Q4_0_PREFETCH * Q4_0_BYTES).cast());
                (f16_at(blk), _mm256_sub_epi8(nibbles_32(blk.add(2)), eight))
            };
            let d0v = _mm256_set1_ps(d0);
            let ax = _mm256_sign_epi8(qx, qx);
            for c in 0..C {
                let sy = _mm256_sign_epi8(yq[c], qx);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                let scale = _mm256_mul_ps(d0v, ydv[c]);
                acc[r][c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r][c]);
            }
        }
    }
    from_fn(|r| from_fn(|c| hsum_f32x8(acc[r][c])))
}
