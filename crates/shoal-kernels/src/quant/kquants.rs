//! The 256-element "K" formats: Q4_K, Q5_K, Q6_K (weights) and Q8_K (their activations).
//!
//! Layouts (little-endian):
//! - Q4_K `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`: eight 32-element sub-blocks with 6-bit
//!   scales and mins packed into `scales`; `x = d*sc*q - dmin*m`.
//! - Q5_K `{f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`: as Q4_K plus a fifth bit.
//! - Q6_K `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`: sixteen 16-element sub-blocks,
//!   `x = d*sc*(q - 32)`.
//! - Q8_K `{f32 d; i8 qs[256]; i16 bsums[16]}` where `bsums[j]` sums `qs[16j..16j+16]`.
//!
//! In Q4_K/Q5_K, 64-element chunk `c` keeps elements `64c..64c+32` in the low nibbles of
//! `qs[32c..32c+32]` (sub-block `2c`) and the next 32 in the high nibbles (sub-block `2c+1`).

use half::f16;

use super::{QK_K, f16_bytes, f16_from};

/// Bytes per Q4_K block.
pub const Q4_K_BYTES: usize = 144;
/// Bytes per Q5_K block.
pub const Q5_K_BYTES: usize = 176;
/// Bytes per Q6_K block.
pub const Q6_K_BYTES: usize = 210;
/// Bytes per Q8_K block.
pub const Q8_K_BYTES: usize = 292;

/// Unpacks the 6-bit (scale, min) pair of sub-block `j` (0..8) from the 12 packed bytes.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Packs eight 6-bit (scale, min) pairs; the inverse of [`scale_min_k4`].
pub fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = ls[j] & 63;
        q[j + 4] = lm[j] & 63;
    }
    for j in 4..8 {
        q[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
        q[j - 4] |= ((ls[j] >> 4) & 3) << 6;
        q[j] |= ((lm[j] >> 4) & 3) << 6;
    }
    q
}

fn scales_of(b: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

/// Expands a Q4_K block.
pub fn dequantize_q4_k(b: &[u8; Q4_K_BYTES], out: &mut [f32; QK_K]) {
    let d = f16_from([b[0], b[1]]);
    let dmin = f16_from([b[2], b[3]]);
    let scales = scales_of(b);
    let qs = &b[16..];
    for c in 0..4 {
        let (s1, m1) = scale_min_k4(2 * c, &scales);
        let (s2, m2) = scale_min_k4(2 * c + 1, &scales);
        let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
        for l in 0..32 {
            let q = qs[32 * c + l];
            out[64 * c + l] = d1 * f32::from(q & 0xF) - m1;
            out[64 * c + 32 + l] = d2 * f32::from(q >> 4) - m2;
        }
    }
}

/// Expands a Q5_K block.
pub fn dequantize_q5_k(b: &[u8; Q5_K_BYTES], out: &mut [f32; QK_K]) {
    let d = f16_from([b[0], b[1]]);
    let dmin = f16_from([b[2], b[3]]);
    let scales = scales_of(b);
    let qh = &b[16..48];
    let qs = &b[48..];
    for c in 0..4 {
        let (s1, m1) = scale_min_k4(2 * c, &scales);
        let (s2, m2) = scale_min_k4(2 * c + 1, &scales);
        let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
        for l in 0..32 {
            let q = qs[32 * c + l];
            let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            out[64 * c + l] = d1 * f32::from((q & 0xF) | h1) - m1;
            out[64 * c + 32 + l] = d2 * f32::from((q >> 4) | h2) - m2;
        }
    }
}

/// Expands a Q6_K block.
pub fn dequantize_q6_k(b: &[u8; Q6_K_BYTES], out: &mut [f32; QK_K]) {
    let d = f16_from([b[208], b[209]]);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut out[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| d * f32::from(sc[is + 2 * k] as i8);
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(1) * q2 as f32;
            y[l + 64] = s(2) * q3 as f32;
            y[l + 96] = s(3) * q4 as f32;
        }
    }
}

/// Expands a Q8_K block.
pub fn dequantize_q8_k(b: &[u8; Q8_K_BYTES], out: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in out.iter_mut().zip(&b[4..260]) {
        *o = d * f32::from(q as i8);
    }
}

/// Rounds through f16 so later arithmetic uses the scale the block will actually store.
fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Fits 32-element sub-blocks with `levels + 1` unsigned levels, a 6-bit scale and a 6-bit
/// min each. Returns (d, dmin, scales, quantized values 0..=levels).
fn fit_scale_min(x: &[f32; QK_K], levels: f32) -> (f32, f32, [u8; 12], [u8; QK_K]) {
    let mut min_j = [0.0f32; 8];
    let mut max_j = [0.0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        // The format subtracts a non-negative min, so the fitted range always includes 0.
        let lo = sub.iter().fold(0.0f32, |a, &v| a.min(v));
        let hi = sub.iter().fold(lo, |a, &v| a.max(v));
        min_j[j] = -lo;
        max_j[j] = hi;
    }
    let max_min = min_j.iter().fold(0.0f32, |a, &v| a.max(v));
    let max_scale = (0..8).fold(0.0f32, |a, j| a.max((max_j[j] + min_j[j]) / levels));
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        if dmin > 0.0 {
            lm[j] = (min_j[j] / dmin).round().clamp(0.0, 63.0) as u8;
        }
        // Size the scale for the range left after the (rounded) min, rounding up so the top
        // value is not clipped.
        let needed = (max_j[j] + dmin * f32::from(lm[j])) / levels;
        if d > 0.0 {
            ls[j] = (needed / d).ceil().clamp(0.0, 63.0) as u8;
        }
    }
    let mut q = [0u8; QK_K];
    for j in 0..8 {
        let s = d * f32::from(ls[j]);
        let m = dmin * f32::from(lm[j]);
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for l in 0..32 {
            q[32 * j + l] = ((x[32 * j + l] + m) * inv).round().clamp(0.0, levels) as u8;
        }
    }
    (d, dmin, pack_scale_min_k4(&ls, &lm), q)
}

/// Quantizes 256 values to Q4_K with a simple per-sub-block min/max fit.
pub fn quantize_q4_k(x: &[f32; QK_K]) -> [u8; Q4_K_BYTES] {
    let (d, dmin, scales, q) = fit_scale_min(x, 15.0);
    let mut b = [0u8; Q4_K_BYTES];
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(dmin));
    b[4..16].copy_from_slice(&scales);
    for c in 0..4 {
        for l in 0..32 {
            b[16 + 32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
        }
    }
    b
}

/// Quantizes 256 values to Q5_K with a simple per-sub-block min/max fit.
pub fn quantize_q5_k(x: &[f32; QK_K]) -> [u8; Q5_K_BYTES] {
    let (d, dmin, scales, q) = fit_scale_min(x, 31.0);
    let mut b = [0u8; Q5_K_BYTES];
    b[0..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(dmin));
    b[4..16].copy_from_slice(&scales);
    for c in 0..4 {
        for l in 0..32 {
            let (q1, q2) = (q[64 * c + l], q[64 * c + 32 + l]);
            b[48 + 32 * c + l] = (q1 & 0xF) | ((q2 & 0xF) << 4);
            b[16 + l] |= ((q1 >> 4) << (2 * c)) | ((q2 >> 4) << (2 * c + 1));
        }
    }
    b
}

/// Quantizes 256 values to Q6_K: symmetric 16-element sub-blocks with 8-bit scales.
pub fn quantize_q6_k(x: &[f32; QK_K]) -> [u8; Q6_K_BYTES] {
    let mut scale_j = [0.0f32; 16];
    for (j, sub) in x.chunks_exact(16).enumerate() {
        scale_j[j] = sub.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 31.0;
    }
    let d = f16_round(scale_j.iter().fold(0.0f32, |a, &v| a.max(v)) / 127.0);
    let mut sc = [0u8; 16];
    let mut q = [0u8; QK_K];
    for j in 0..16 {
        if d > 0.0 {
            sc[j] = (scale_j[j] / d).ceil().clamp(0.0, 127.0) as u8;
        }
        let s = d * f32::from(sc[j]);
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for l in 0..16 {
            q[16 * j + l] = ((x[16 * j + l] * inv).round().clamp(-32.0, 31.0) as i32 + 32) as u8;
        }
    }
    let mut b = [0u8; Q6_K_BYTES];
    for n in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q[128 * n + 32 * k + l];
            b[64 * n + l] = (v(0) & 0xF) | ((v(2) & 0xF) << 4);
            b[64 * n + l + 32] = (v(1) & 0xF) | ((v(3) & 0xF) << 4);
            b[128 + 32 * n + l] =
                (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
        }
    }
    b[192..208].copy_from_slice(&sc);
    b[208..210].copy_from_slice(&f16_bytes(d));
    b
}

/// Quantizes 256 activations to Q8_K with llama.cpp's rounding: the element of largest
/// magnitude maps to -127 (sign included), values round half to even, clipped at 127.
/// Returns (d, qs, bsums).
pub fn quantize_q8_k_parts(x: &[f32; QK_K]) -> (f32, [i8; QK_K], [i16; 16]) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut q = [0i8; QK_K];
    let mut bsums = [0i16; 16];
    if amax == 0.0 {
        return (0.0, q, bsums);
    }
    let iscale = -127.0 / max;
    for (o, &v) in q.iter_mut().zip(x) {
        *o = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    for (s, sub) in bsums.iter_mut().zip(q.chunks_exact(16)) {
        *s = sub.iter().map(|&v| i16::from(v)).sum();
    }
    (1.0 / iscale, q, bsums)
}

/// Quantizes 256 activations to a Q8_K block (see [`quantize_q8_k_parts`]).
pub fn quantize_q8_k(x: &[f32; QK_K]) -> [u8; Q8_K_BYTES] {
    let (d, q, bsums) = quantize_q8_k_parts(x);
    let mut b = [0u8; Q8_K_BYTES];
    b[0..4].copy_from_slice(&d.to_le_bytes());
    for (o, &v) in b[4..260].iter_mut().zip(&q) {
        *o = v as u8;
    }
    for (o, s) in b[260..].as_chunks_mut::<2>().0.iter_mut().zip(bsums) {
        *o = s.to_le_bytes();
    }
    b
}
