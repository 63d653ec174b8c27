//! Attention against one head of an f16 KV cache (see `crate::attn`).
//!
//! A score is computed with the arithmetic of the f16 dot product (four accumulators of eight
//! lanes, then ggml's horizontal sum), and a weighted sum with that of `axpy_f16`: widening
//! f16 to f32 is exact, so a query gets the same bits whether its keys are read in place or
//! from a block widened once for many queries.

use std::arch::x86_64::*;

use half::f16;

use super::float::{
    dot_f16_f32_impl, dot_f32_impl, f16_to_f32_impl, ld1_f16, ld1_f32, ld8_f16, ld8_f32,
};
use super::{Avx2, hsum_f32x8};
use crate::attn::{AttnScratch, KvHead};

/// From this many queries on, keys and values are widened to f32 once per block of positions
/// and shared by the queries, instead of each query widening them again.
const WIDEN_MIN_QUERIES: usize = 4;
/// Positions per widened block: 64 KiB of f32 at a head dimension of 64, so a block stays in
/// L2 while every query goes over it.
const BLOCK: usize = 256;

/// See `crate::attn::attend`; `scratch.queries` holds the queries rounded to f16, and the
/// sizes were checked.
pub(crate) fn attend(
    _t: Avx2,
    head: KvHead<'_>,
    lens: &[usize],
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let dim = head.dim;
    let max_len = lens.iter().copied().max().unwrap_or(0);
    let AttnScratch {
        queries,
        scores,
        block,
    } = scratch;
    if scores.len() < lens.len() * max_len {
        scores.resize(lens.len() * max_len, 0.0);
    }
    let widen = lens.len() >= WIDEN_MIN_QUERIES;
    if widen && block.len() < BLOCK * dim {
        block.resize(BLOCK * dim, 0.0);
    }
    let keys = head.keys.as_ptr().cast::<u16>();
    let values = head.values.as_ptr().cast::<u16>();
    // SAFETY (every call below): the features are proven by the token. The caller checked that
    // the cache holds (max_len - 1) * stride + dim elements from this head on, and that
    // `queries` and `out` hold lens.len() * dim; a score row is max_len long and a block BLOCK
    // positions of dim; every loop stays within those and within each query's own length.
    unsafe {
        if widen {
            for b0 in (0..max_len).step_by(BLOCK) {
                let n = BLOCK.min(max_len - b0);
                widen_rows(
                    keys.add(b0 * head.stride),
                    head.stride,
                    n,
                    dim,
                    block.as_mut_ptr(),
                );
                for (i, &len) in lens.iter().enumerate() {
                    if len > b0 {
                        scores_f32(
                            queries.as_ptr().add(i * dim),
                            block.as_ptr(),
                            dim,
                            len.min(b0 + n) - b0,
                            dim,
                            scale,
                            scores.as_mut_ptr().add(i * max_len + b0),
                        );
                    }
                }
            }
        } else {
            for (i, &len) in lens.iter().enumerate() {
                scores_f16(
                    queries.as_ptr().add(i * dim),
                    keys,
                    head.stride,
                    len,
                    dim,
                    scale,
                    scores.as_mut_ptr().add(i * max_len),
                );
            }
        }
        for (i, &len) in lens.iter().enumerate() {
            softmax_f16_weights(scores.as_mut_ptr().add(i * max_len), len);
        }
        out.fill(0.0);
        if widen {
            for b0 in (0..max_len).step_by(BLOCK) {
                let n = BLOCK.min(max_len - b0);
                widen_rows(
                    values.add(b0 * head.stride),
                    head.stride,
                    n,
                    dim,
                    block.as_mut_ptr(),
                );
                for (i, &len) in lens.iter().enumerate() {
                    if len > b0 {
                        weigh_f32(
                            out.as_mut_ptr().add(i * dim),
                            scores.as_ptr().add(i * max_len + b0),
                            block.as_ptr(),
                            dim,
                            len.min(b0 + n) - b0,
                            dim,
                        );
                    }
                }
            }
        } else {
            for (i, &len) in lens.iter().enumerate() {
                weigh_f16(
                    out.as_mut_ptr().add(i * dim),
                    scores.as_ptr().add(i * max_len),
                    values,
                    head.stride,
                    len,
                    dim,
                );
            }
        }
    }
}

/// Widens `n` rows of `dim` f16 elements, `stride` apart from `src` on, into `dst`, packed.
///
/// # Safety
/// AVX2/FMA/F16C present; `src` readable for `(n - 1) * stride + dim`, `dst` writable for
/// `n * dim`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_rows(src: *const u16, stride: usize, n: usize, dim: usize, dst: *mut f32) {
    for j in 0..n {
        // SAFETY: within the bounds of the contract.
        unsafe { f16_to_f32_impl(src.add(j * stride), dst.add(j * dim), dim) };
    }
}

/// Defines `out[p] = (q · key p) * scale` for `n` keys `stride` apart, with the dot product's
/// arithmetic; at a head dimension of 64 the query stays in registers.
macro_rules! scores_kernel {
    ($name:ident, $t:ty, $ld8:ident, $dot:ident) => {
        /// # Safety
        /// AVX2/FMA/F16C present; `q` readable for `dim`, keys for `(n - 1) * stride + dim`,
        /// `out` writable for `n`.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(
            q: *const f32,
            k: *const $t,
            stride: usize,
            n: usize,
            dim: usize,
            scale: f32,
            out: *mut f32,
        ) {
            // SAFETY (all accesses): within the bounds of the contract.
            unsafe {
                if dim != 64 {
                    for p in 0..n {
                        *out.add(p) = $dot(k.add(p * stride), q, dim) * scale;
                    }
                    return;
                }
                let qv: [__m256; 8] = std::array::from_fn(|j| ld8_f32(q, 8 * j));
                for p in 0..n {
                    let kp = k.add(p * stride);
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for (j, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps($ld8(kp, 8 * j), qv[j], *acc);
                    }
                    for (j, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps($ld8(kp, 32 + 8 * j), qv[4 + j], *acc);
                    }
                    let v =
                        _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
                    *out.add(p) = hsum_f32x8(v) * scale;
                }
            }
        }
    };
}

/// Defines `out += Σ w[p] · value p` for `n` values `stride` apart, with `axpy_f16`'s
/// arithmetic; at a head dimension of 64 the sums stay in registers.
macro_rules! weigh_kernel {
    ($name:ident, $t:ty, $ld8:ident, $ld1:ident) => {
        /// # Safety
        /// AVX2/FMA/F16C present; `out` readable and writable for `dim`, `w` readable for
        /// `n`, values for `(n - 1) * stride + dim`.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(
            out: *mut f32,
            w: *const f32,
            v: *const $t,
            stride: usize,
            n: usize,
            dim: usize,
        ) {
            // SAFETY (all accesses): within the bounds of the contract.
            unsafe {
                if dim == 64 {
                    let mut acc: [__m256; 8] = std::array::from_fn(|j| ld8_f32(out, 8 * j));
                    for p in 0..n {
                        let wv = _mm256_set1_ps(*w.add(p));
                        let vp = v.add(p * stride);
                        for (j, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(wv, $ld8(vp, 8 * j), *acc);
                        }
                    }
                    for (j, acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(out.add(8 * j), *acc);
                    }
                    return;
                }
                for p in 0..n {
                    let a = *w.add(p);
                    let wv = _mm256_set1_ps(a);
                    let vp = v.add(p * stride);
                    let mut i = 0;
                    while i + 8 <= dim {
                        let y = _mm256_fmadd_ps(wv, $ld8(vp, i), _mm256_loadu_ps(out.add(i)));
                        _mm256_storeu_ps(out.add(i), y);
                        i += 8;
                    }
                    while i < dim {
                        *out.add(i) = a.mul_add($ld1(vp, i), *out.add(i));
                        i += 1;
                    }
                }
            }
        }
    };
}

scores_kernel!(scores_f16, u16, ld8_f16, dot_f16_f32_impl);
scores_kernel!(scores_f32, f32, ld8_f32, dot_f32_impl);
weigh_kernel!(weigh_f16, u16, ld8_f16, ld1_f16);
weigh_kernel!(weigh_f32, f32, ld8_f32, ld1_f32);

/// Turns `n` scores into softmax weights rounded to f16 (kept as f32), in place; the sum of
/// the exponentials is taken in f64.
///
/// # Safety
/// AVX2/FMA/F16C present; `s` readable and writable for `n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_f16_weights(s: *mut f32, n: usize) {
    if n == 0 {
        return;
    }
    let whole = n - n % 8;
    // SAFETY (all accesses): indices stay below n; the tail goes through a local copy.
    unsafe {
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < whole {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(s.add(i)));
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for j in whole..n {
            max = max.max(*s.add(j));
        }
        let m = _mm256_set1_ps(max);
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        i = 0;
        while i < whole {
            let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s.add(i)), m));
            _mm256_storeu_ps(s.add(i), e);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
            i += 8;
        }
        let mut sums = [0.0f64; 4];
        _mm256_storeu_pd(sums.as_mut_ptr(), _mm256_add_pd(lo, hi));
        let mut sum = (sums[0] + sums[2]) + (sums[1] + sums[3]);
        let mut tail = [0.0f32; 8];
        for (j, t) in (whole..n).zip(tail.iter_mut()) {
            *t = *s.add(j) - max;
        }
        _mm256_storeu_ps(tail.as_mut_ptr(), exp_ps(_mm256_loadu_ps(tail.as_ptr())));
        for (j, &t) in (whole..n).zip(tail.iter()) {
            *s.add(j) = t;
            sum += f64::from(t);
        }
        let inv = (1.0 / sum) as f32;
        let iv = _mm256_set1_ps(inv);
        i = 0;
        while i < whole {
            let w = _mm256_mul_ps(_mm256_loadu_ps(s.add(i)), iv);
            let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(w);
            _mm256_storeu_ps(s.add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in whole..n {
            *s.add(j) = f16::from_f32(*s.add(j) * inv).to_f32();
        }
    }
}

/// e^x per lane, to within two units in the last place for x in [-87.3, 88.3] (clamped
/// there): x = n·ln 2 + r with |r| ≤ ln 2 / 2, a degree-7 polynomial for e^r, and 2^n put
/// into the exponent.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn exp_ps(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // ln 2 in two parts, the first exact in few bits so n·part is exact.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_two_ulp_of_libm() {
        let Some(_t) = Avx2::get() else {
            return;
        };
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 1.37e-3);
            let mut got = [0.0f32; 8];
            // SAFETY: the token proves the features; both arrays hold eight lanes.
            unsafe {
                _mm256_storeu_ps(got.as_mut_ptr(), exp_ps(_mm256_loadu_ps(xs.as_ptr())));
            }
            for (g, x) in got.iter().zip(xs) {
                let want = f64::from(x).exp() as f32;
                worst = worst.max(g.to_bits().abs_diff(want.to_bits()));
            }
            x += 0.0113;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }
}
