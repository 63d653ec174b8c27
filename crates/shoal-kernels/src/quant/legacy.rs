//! The 32-element formats: Q8_0, Q4_0, Q4_1 (weights) and Q8_1 (activations for Q4_1).
//!
//! Layouts (little-endian): Q8_0 `{f16 d; i8 qs[32]}`, Q4_0 `{f16 d; u8 qs[16]}`,
//! Q4_1 `{f16 d; f16 m; u8 qs[16]}`, Q8_1 `{f16 d; f16 s; i8 qs[32]}` with `s = d * Σ qs`.
//! In the 4-bit formats byte `j` holds element `j` in its low nibble and element `j + 16` in its
//! high nibble.

use super::{Q8_1_BYTES, QK, f16_bytes, f16_from};

/// Bytes per Q8_0 block.
pub const Q8_0_BYTES: usize = 34;
/// Bytes per Q4_0 block.
pub const Q4_0_BYTES: usize = 18;
/// Bytes per Q4_1 block.
pub const Q4_1_BYTES: usize = 20;

/// Expands a Q8_0 block.
pub fn dequantize_q8_0(b: &[u8; Q8_0_BYTES], out: &mut [f32; QK]) {
    let d = f16_from([b[0], b[1]]);
    for (o, &q) in out.iter_mut().zip(&b[2..]) {
        *o = f32::from(q as i8) * d;
    }
}

/// Expands a Q4_0 block.
pub fn dequantize_q4_0(b: &[u8; Q4_0_BYTES], out: &mut [f32; QK]) {
    let d = f16_from([b[0], b[1]]);
    for (j, &q) in b[2..].iter().enumerate() {
        out[j] = (i32::from(q & 15) - 8) as f32 * d;
        out[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

/// Expands a Q4_1 block.
pub fn dequantize_q4_1(b: &[u8; Q4_1_BYTES], out: &mut [f32; QK]) {
    let d = f16_from([b[0], b[1]]);
    let m = f16_from([b[2], b[3]]);
    for (j, &q) in b[4..].iter().enumerate() {
        out[j] = f32::from(q & 15) * d + m;
        out[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// Expands a Q8_1 block (the sum field is not needed to recover values).
pub fn dequantize_q8_1(b: &[u8; Q8_1_BYTES], out: &mut [f32; QK]) {
    let d = f16_from([b[0], b[1]]);
    for (o, &q) in out.iter_mut().zip(&b[4..]) {
        *o = f32::from(q as i8) * d;
    }
}

/// Weight quantizer for Q8_0 (llama.cpp reference): `d = amax / 127`, `q = round(x / d)` with
/// halves away from zero.
pub fn quantize_q8_0(x: &[f32; QK]) -> [u8; Q8_0_BYTES] {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut b = [0u8; Q8_0_BYTES];
    b[..2].copy_from_slice(&f16_bytes(d));
    for (o, &v) in b[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
    b
}

/// Weight quantizer for Q4_0 (llama.cpp reference): the element of largest magnitude maps to -8.
pub fn quantize_q4_0(x: &[f32; QK]) -> [u8; Q4_0_BYTES] {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut b = [0u8; Q4_0_BYTES];
    b[..2].copy_from_slice(&f16_bytes(d));
    for j in 0..16 {
        // Truncation after +8.5 is llama.cpp's rounding; the value is in [0.5, 16.5].
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = lo | (hi << 4);
    }
    b
}

/// Weight quantizer for Q4_1 (llama.cpp reference): `d = (max - min) / 15`, `m = min`.
pub fn quantize_q4_1(x: &[f32; QK]) -> [u8; Q4_1_BYTES] {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut b = [0u8; Q4_1_BYTES];
    b[..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(min));
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let hi = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = lo | (hi << 4);
    }
    b
}

/// The scale and quantized values of one activation block, rounded as llama.cpp's x86 code does:
/// `d = amax / 127`, `q = round_half_even(x * (127 / amax))`.
///
/// This differs from the weight quantizer [`quantize_q8_0`] in two roundings (multiplying by
/// `127 / amax` instead of `1 / d`, and ties to even), which matters for bit-exact agreement.
pub fn quantize_act_block(x: &[f32; QK]) -> (f32, [i8; QK]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut q = [0i8; QK];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * id).round_ties_even() as i8;
    }
    (d, q)
}

/// Activation quantizer for Q8_0 (used against Q8_0 and Q4_0 weights).
pub fn quantize_q8_0_act(x: &[f32; QK]) -> [u8; Q8_0_BYTES] {
    let (d, q) = quantize_act_block(x);
    let mut b = [0u8; Q8_0_BYTES];
    b[..2].copy_from_slice(&f16_bytes(d));
    for (o, v) in b[2..].iter_mut().zip(q) {
        *o = v as u8;
    }
    b
}

/// Activation quantizer for Q8_1 (used against Q4_1 weights). `s` is `d * Σ q` rounded to f16,
/// with the unrounded `d`.
pub fn quantize_q8_1(x: &[f32; QK]) -> [u8; Q8_1_BYTES] {
    let (d, q) = quantize_act_block(x);
    let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
    let mut b = [0u8; Q8_1_BYTES];
    b[..2].copy_from_slice(&f16_bytes(d));
    b[2..4].copy_from_slice(&f16_bytes(d * sum as f32));
    for (o, v) in b[4..].iter_mut().zip(q) {
        *o = v as u8;
    }
    b
}
