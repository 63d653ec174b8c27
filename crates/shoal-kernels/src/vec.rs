//! Small f32/f16 vector helpers for attention (scores against an f16 KV cache, weighted sums of
//! values) and conversions, SIMD where the CPU has it.
//!
//! All functions work over the common length of their arguments, so mismatched lengths cannot
//! read out of bounds; callers that care pass equal lengths.

use half::f16;

use crate::Isa;

/// Σ `a[i]·b[i]`.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::avx2::Avx2::get() {
        return crate::avx2::dot_f32(t, a, b);
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Σ `a[i]·b[i]` of two f16 vectors, accumulated in f32.
pub fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::avx2::Avx2::get() {
        return crate::avx2::dot_f16(t, a, b);
    }
    a.iter().zip(b).map(|(x, y)| x.to_f32() * y.to_f32()).sum()
}

/// `y[i] += a * x[i]`.
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::avx2::Avx2::get() {
        return crate::avx2::axpy_f16(t, y, a, x);
    }
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv.to_f32();
    }
}

/// Rounds each f32 to the nearest f16 (ties to even).
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    f32_to_f16_with(Isa::detected(), src, dst);
}

/// [`f32_to_f16`] with a chosen implementation (both give identical results).
pub(crate) fn f32_to_f16_with(isa: Isa, src: &[f32], dst: &mut [f16]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2
        && let Some(t) = crate::avx2::Avx2::get()
    {
        return crate::avx2::f32_to_f16(t, src, dst);
    }
    let _ = isa;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s);
    }
}

/// Widens each f16 to f32 (exact).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::avx2::Avx2::get() {
        return crate::avx2::f16_to_f32(t, src, dst);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// Exact in f64, to judge both implementations.
    fn dot64(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    #[test]
    fn dots_match_exact_sums_for_all_lengths() {
        for n in (0..70).chain([576, 1000]) {
            let a = random(n, n as u64);
            let b = random(n, 1000 + n as u64);
            let bound = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum::<f32>() * 1e-6 + 1e-6;
            assert!((f64::from(dot_f32(&a, &b)) - dot64(&a, &b)).abs() <= f64::from(bound));
            let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let bh: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
            let aw: Vec<f32> = ah.iter().map(|v| v.to_f32()).collect();
            let bw: Vec<f32> = bh.iter().map(|v| v.to_f32()).collect();
            assert!((f64::from(dot_f16(&ah, &bh)) - dot64(&aw, &bw)).abs() <= f64::from(bound));
        }
    }

    #[test]
    fn axpy_and_conversions() {
        for n in [0, 1, 7, 8, 9, 64, 67] {
            let x = random(n, 5);
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let mut y = random(n, 6);
            let y0 = y.clone();
            axpy_f16(&mut y, 0.5, &xh);
            for i in 0..n {
                assert!((y[i] - (y0[i] + 0.5 * xh[i].to_f32())).abs() <= 1e-6);
            }
            let mut h = vec![f16::ZERO; n];
            f32_to_f16(&x, &mut h);
            assert_eq!(h, xh);
            let mut back = vec![0.0; n];
            f16_to_f32(&h, &mut back);
            assert!(back.iter().zip(&xh).all(|(a, b)| *a == b.to_f32()));
        }
    }

    #[test]
    fn f16_rounding_is_identical_across_implementations() {
        // Values straddling f16 rounding boundaries, subnormals and overflow.
        let mut x = random(1000, 9);
        x.extend([65504.0, 65520.0, 1e6, -1e6, 6e-8, -3e-5, 0.0, -0.0]);
        for isa in Isa::available() {
            let mut h = vec![f16::ZERO; x.len()];
            f32_to_f16_with(isa, &x, &mut h);
            for (a, b) in h.iter().zip(&x) {
                assert_eq!(a.to_bits(), f16::from_f32(*b).to_bits(), "{isa:?} {b}");
            }
        }
    }
}
