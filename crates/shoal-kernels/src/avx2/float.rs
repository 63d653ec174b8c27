//! f32 / f16 / bf16 vector kernels: dot products (attention and float weight matrices), axpy,
//! and conversions. Weight rows arrive as raw little-endian bytes of any alignment.

use std::arch::x86_64::*;

use half::f16;

use super::{Avx2, hsum_f32x8};
use crate::quant::bf16_bits_to_f32;

// Loaders: eight elements at index `i` widened to f32, and one element for the tails.
// SAFETY (all): callers keep `i + 8` (or `i + 1`) within the buffer behind `p`.

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn ld8_f32(p: *const f32, i: usize) -> __m256 {
    // SAFETY: see the note above.
    unsafe { _mm256_loadu_ps(p.add(i)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn ld8_f16(p: *const u16, i: usize) -> __m256 {
    // SAFETY: see the note above.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.add(i).cast())) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn ld8_bf16(p: *const u16, i: usize) -> __m256 {
    // SAFETY: see the note above.
    let h = unsafe { _mm_loadu_si128(p.add(i).cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

#[inline]
pub(super) unsafe fn ld1_f32(p: *const f32, i: usize) -> f32 {
    // SAFETY: see the note above.
    unsafe { p.add(i).read_unaligned() }
}

#[inline]
pub(super) unsafe fn ld1_f16(p: *const u16, i: usize) -> f32 {
    // SAFETY: see the note above.
    f16::from_bits(unsafe { p.add(i).read_unaligned() }).to_f32()
}

#[inline]
unsafe fn ld1_bf16(p: *const u16, i: usize) -> f32 {
    // SAFETY: see the note above.
    bf16_bits_to_f32(unsafe { p.add(i).read_unaligned() })
}

/// Defines a dot product over `n` elements of two sources; four accumulators of eight lanes
/// keep the FMA units busy.
macro_rules! dot_kernel {
    ($name:ident, $ta:ty, $tb:ty, $ld8a:ident, $ld8b:ident, $ld1a:ident, $ld1b:ident) => {
        /// # Safety
        /// AVX2/FMA/F16C present; `a` and `b` readable for `n` elements.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $name(a: *const $ta, b: *const $tb, n: usize) -> f32 {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY (loads below): every index read is below n.
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let (x, y) = unsafe { ($ld8a(a, i + 8 * k), $ld8b(b, i + 8 * k)) };
                    *acc = _mm256_fmadd_ps(x, y, *acc);
                }
                i += 32;
            }
            while i + 8 <= n {
                let (x, y) = unsafe { ($ld8a(a, i), $ld8b(b, i)) };
                acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
                i += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
            let mut sum = hsum_f32x8(v);
            while i < n {
                sum += unsafe { $ld1a(a, i) * $ld1b(b, i) };
                i += 1;
            }
            sum
        }
    };
}

dot_kernel!(dot_f32_impl, f32, f32, ld8_f32, ld8_f32, ld1_f32, ld1_f32);
dot_kernel!(dot_f16_impl, u16, u16, ld8_f16, ld8_f16, ld1_f16, ld1_f16);
// Attention: f16 keys read in place against a query held in f32.
dot_kernel!(
    dot_f16_f32_impl,
    u16,
    f32,
    ld8_f16,
    ld8_f32,
    ld1_f16,
    ld1_f32
);
dot_kernel!(
    dot_bf16_impl,
    u16,
    u16,
    ld8_bf16,
    ld8_bf16,
    ld1_bf16,
    ld1_bf16
);

/// Σ a·b over the common length.
pub(crate) fn dot_f32(_t: Avx2, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    // SAFETY: features proven by the token; both slices hold at least n elements.
    unsafe { dot_f32_impl(a.as_ptr(), b.as_ptr(), n) }
}

/// Σ a·b over the common length, f32 accumulation.
pub(crate) fn dot_f16(_t: Avx2, a: &[f16], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    // SAFETY: as above; `f16` is a transparent u16.
    unsafe { dot_f16_impl(a.as_ptr().cast(), b.as_ptr().cast(), n) }
}

/// A row of little-endian f32 bytes · `x`.
pub(crate) fn dot_f32_bytes(_t: Avx2, w: &[u8], x: &[f32]) -> f32 {
    let n = (w.len() / 4).min(x.len());
    // SAFETY: as above; loads are unaligned.
    unsafe { dot_f32_impl(w.as_ptr().cast(), x.as_ptr(), n) }
}

/// A row of little-endian f16 bytes · `x`.
pub(crate) fn dot_f16_bytes(_t: Avx2, w: &[u8], x: &[f16]) -> f32 {
    let n = (w.len() / 2).min(x.len());
    // SAFETY: as above; loads are unaligned.
    unsafe { dot_f16_impl(w.as_ptr().cast(), x.as_ptr().cast(), n) }
}

/// A row of little-endian bf16 bytes · `x` (bf16 bits).
pub(crate) fn dot_bf16_bytes(_t: Avx2, w: &[u8], x: &[u16]) -> f32 {
    let n = (w.len() / 2).min(x.len());
    // SAFETY: as above; loads are unaligned.
    unsafe { dot_bf16_impl(w.as_ptr().cast(), x.as_ptr(), n) }
}

/// `y += a * x` over the common length.
pub(crate) fn axpy_f16(_t: Avx2, y: &mut [f32], a: f32, x: &[f16]) {
    let n = y.len().min(x.len());
    // SAFETY: features proven by the token; both slices hold at least n elements.
    unsafe { axpy_f16_impl(y.as_mut_ptr(), a, x.as_ptr().cast(), n) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_impl(y: *mut f32, a: f32, x: *const u16, n: usize) {
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    // SAFETY (all accesses): indices stay below n.
    while i + 8 <= n {
        unsafe {
            let v = _mm256_fmadd_ps(av, ld8_f16(x, i), _mm256_loadu_ps(y.add(i)));
            _mm256_storeu_ps(y.add(i), v);
        }
        i += 8;
    }
    while i < n {
        unsafe { *y.add(i) = a.mul_add(ld1_f16(x, i), *y.add(i)) };
        i += 1;
    }
}

/// Rounds f32 to f16 (ties to even) over the common length.
pub(crate) fn f32_to_f16(_t: Avx2, src: &[f32], dst: &mut [f16]) {
    let n = src.len().min(dst.len());
    // SAFETY: features proven by the token; both slices hold at least n elements.
    unsafe { f32_to_f16_impl(src.as_ptr(), dst.as_mut_ptr().cast(), n) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_to_f16_impl(src: *const f32, dst: *mut u16, n: usize) {
    let mut i = 0;
    // SAFETY (all accesses): indices stay below n.
    while i + 8 <= n {
        unsafe {
            let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(src.add(i)));
            _mm_storeu_si128(dst.add(i).cast(), h);
        }
        i += 8;
    }
    while i < n {
        unsafe { *dst.add(i) = f16::from_f32(*src.add(i)).to_bits() };
        i += 1;
    }
}

/// Widens f16 to f32 over the common length.
pub(crate) fn f16_to_f32(_t: Avx2, src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    // SAFETY: features proven by the token; both slices hold at least n elements.
    unsafe { f16_to_f32_impl(src.as_ptr().cast(), dst.as_mut_ptr(), n) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_to_f32_impl(src: *const u16, dst: *mut f32, n: usize) {
    let mut i = 0;
    // SAFETY (all accesses): indices stay below n.
    while i + 8 <= n {
        unsafe { _mm256_storeu_ps(dst.add(i), ld8_f16(src, i)) };
        i += 8;
    }
    while i < n {
        unsafe { *dst.add(i) = ld1_f16(src, i) };
        i += 1;
    }
}
