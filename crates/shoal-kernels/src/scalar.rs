//! Portable dot products of one weight row with one prepared activation vector: the fallback on
//! CPUs without AVX2 and the reference the SIMD kernels are tested against.
//!
//! The quantized kinds sum integer products per block and scale once per block, which is exact
//! up to the float accumulation order (that order is the only difference from the SIMD code).

use shoal_gguf::GgmlType;

use crate::acts::ActRow;
use crate::quant::kquants::scale_min_k4;
use crate::quant::{QK, QK_K, bf16_bits_to_f32, f16_from};

/// Weight row `w` (exactly one row's bytes) · activation `y`.
pub(crate) fn dot(dtype: GgmlType, w: &[u8], y: &ActRow<'_>) -> f32 {
    match dtype {
        GgmlType::F32 => w
            .as_chunks::<4>()
            .0
            .iter()
            .zip(y.f)
            .map(|(b, x)| f32::from_le_bytes(*b) * x)
            .sum(),
        GgmlType::F16 => w
            .as_chunks::<2>()
            .0
            .iter()
            .zip(y.h)
            .map(|(b, x)| f16_from(*b) * x.to_f32())
            .sum(),
        GgmlType::BF16 => w
            .as_chunks::<2>()
            .0
            .iter()
            .zip(y.bf)
            .map(|(b, x)| bf16_bits_to_f32(u16::from_le_bytes(*b)) * bf16_bits_to_f32(*x))
            .sum(),
        GgmlType::Q8_0 => q8_0(w, y),
        GgmlType::Q4_0 => q4_0(w, y),
        GgmlType::Q4_1 => q4_1(w, y),
        GgmlType::Q4K => q4_k::<false>(w, y),
        GgmlType::Q5K => q4_k::<true>(w, y),
        GgmlType::Q6K => q6_k(w, y),
        // Rejected when the matrix is built; no activation format exists for it.
        GgmlType::Q8K => 0.0,
    }
}

/// Σ (lo(q[j]) - off)·y[j] + (hi(q[j]) - off)·y[j+16] over one 32-element block; written over
/// fixed-size arrays so the compiler vectorizes it on any target.
#[inline]
fn nibble_isum(qs: &[u8; 16], y: &[i8; QK], off: i32) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (i32::from(qs[j] & 15) - off) * i32::from(y[j]);
        s += (i32::from(qs[j] >> 4) - off) * i32::from(y[j + 16]);
    }
    s
}

fn q8_0(w: &[u8], y: &ActRow<'_>) -> f32 {
    let mut sum = 0.0f32;
    for ((b, qy), yd) in w
        .as_chunks::<34>()
        .0
        .iter()
        .zip(y.qs.as_chunks::<QK>().0)
        .zip(y.d)
    {
        let mut isum = 0i32;
        for j in 0..QK {
            isum += i32::from(b[2 + j] as i8) * i32::from(qy[j]);
        }
        sum += f16_from([b[0], b[1]]) * yd * isum as f32;
    }
    sum
}

fn q4_0(w: &[u8], y: &ActRow<'_>) -> f32 {
    let mut sum = 0.0f32;
    for ((b, qy), yd) in w
        .as_chunks::<18>()
        .0
        .iter()
        .zip(y.qs.as_chunks::<QK>().0)
        .zip(y.d)
    {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[2..]);
        sum += f16_from([b[0], b[1]]) * yd * nibble_isum(&qs, qy, 8) as f32;
    }
    sum
}

fn q4_1(w: &[u8], y: &ActRow<'_>) -> f32 {
    let mut sum = 0.0f32;
    let blocks = w.as_chunks::<20>().0.iter().zip(y.qs.as_chunks::<QK>().0);
    for ((b, qy), (yd, ys)) in blocks.zip(y.d.iter().zip(y.s)) {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[4..]);
        let isum = nibble_isum(&qs, qy, 0);
        // x = d*q + m, so Σ x·y = d·dy·Σ q·qy + m·(dy·Σ qy), the last factor being the sum s.
        sum += f16_from([b[0], b[1]]) * yd * isum as f32 + f16_from([b[2], b[3]]) * ys;
    }
    sum
}

/// Q4_K, or Q5_K when `FIVE` (same scales, an extra high bit per value).
fn q4_k<const FIVE: bool>(w: &[u8], y: &ActRow<'_>) -> f32 {
    let block = if FIVE { 176 } else { 144 };
    let mut sum = 0.0f32;
    let acts =
        y.qs.as_chunks::<QK_K>()
            .0
            .iter()
            .zip(y.d)
            .zip(y.bsums.as_chunks::<16>().0);
    for (b, ((qy, yd), bsums)) in w.chunks_exact(block).zip(acts) {
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let (qh, qs) = if FIVE {
            (&b[16..48], &b[48..176])
        } else {
            (&b[0..0], &b[16..144])
        };
        let mut isum = 0i32;
        let mut msum = 0i32;
        for c in 0..4 {
            let (s1, m1) = scale_min_k4(2 * c, &scales);
            let (s2, m2) = scale_min_k4(2 * c + 1, &scales);
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * c + l];
                let (mut ql, mut qh_) = (i32::from(q & 0xF), i32::from(q >> 4));
                if FIVE {
                    ql |= i32::from((qh[l] >> (2 * c)) & 1) << 4;
                    qh_ |= i32::from((qh[l] >> (2 * c + 1)) & 1) << 4;
                }
                lo += ql * i32::from(qy[64 * c + l]);
                hi += qh_ * i32::from(qy[64 * c + 32 + l]);
            }
            isum += i32::from(s1) * lo + i32::from(s2) * hi;
            let ysum = |j: usize| i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1]);
            msum += i32::from(m1) * ysum(2 * c) + i32::from(m2) * ysum(2 * c + 1);
        }
        let d = yd * f16_from([b[0], b[1]]);
        let dmin = yd * f16_from([b[2], b[3]]);
        sum += d * isum as f32 - dmin * msum as f32;
    }
    sum
}

fn q6_k(w: &[u8], y: &ActRow<'_>) -> f32 {
    let mut sum = 0.0f32;
    for (b, (qy, yd)) in w
        .as_chunks::<210>()
        .0
        .iter()
        .zip(y.qs.as_chunks::<QK_K>().0.iter().zip(y.d))
    {
        let mut isum = 0i32;
        for n in 0..2 {
            let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
            let yv = &qy[128 * n..];
            for l in 0..32 {
                let q = [
                    (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                    (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                    (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                    (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let s = i32::from(sc[l / 16 + 2 * k] as i8);
                    isum += s * (i32::from(qk) - 32) * i32::from(yv[32 * k + l]);
                }
            }
        }
        sum += yd * f16_from([b[208], b[209]]) * isum as f32;
    }
    sum
}
