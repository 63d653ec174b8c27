//! Scalar reference for every block format: the readable definition of each byte layout that the
//! SIMD kernels are tested against, and the quantizers used to write synthetic models.
//!
//! Each format has block-level functions over fixed-size byte arrays (so every index is checked
//! at compile time) and the row-level entry points [`dequantize_row`] / [`quantize_row`].
//! Weight quantizers follow llama.cpp's reference rounding for the legacy formats; the K-quant
//! quantizers are simple min/max fits (correct, not search-optimal). Activation quantizers follow
//! llama.cpp's x86 rounding (see [`legacy::quantize_q8_0_act`]).

pub mod kquants;
pub mod legacy;

use half::f16;
use shoal_gguf::GgmlType;

use crate::KernelError;

/// Elements per block of the legacy formats (Q8_0, Q4_0, Q4_1, Q8_1).
pub const QK: usize = 32;
/// Elements per super-block of the K formats.
pub const QK_K: usize = 256;
/// Bytes per Q8_1 block: `{f16 d; f16 s; i8 qs[32]}`. Q8_1 is an activation-only format that
/// has no GGUF type number, so it is not in [`GgmlType`].
pub const Q8_1_BYTES: usize = 36;

/// Reads a little-endian IEEE half.
#[inline]
pub(crate) fn f16_from(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// Rounds to the nearest IEEE half (ties to even), as little-endian bytes.
#[inline]
pub(crate) fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// Rounds an f32 to the nearest bfloat16, ties to even; NaNs stay NaN (quieted), as ggml does.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Widens a bfloat16 (given as bits) to f32; exact.
#[inline]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Bytes a row of `n` elements of `dtype` takes, or the reason it has no such size.
pub(crate) fn row_bytes(dtype: GgmlType, n: usize) -> Result<usize, KernelError> {
    if !n.is_multiple_of(dtype.block_size()) {
        return Err(KernelError::PartialBlock {
            dtype,
            len: n,
            block_size: dtype.block_size(),
        });
    }
    dtype
        .row_bytes(n)
        .ok_or(KernelError::Overflow { what: "row bytes" })
}

/// Dequantize a row of `dst.len()` elements stored as `dtype` in `src`.
///
/// `src` must hold exactly the bytes of that many elements. Every [`GgmlType`] is accepted,
/// including the activation-only Q8_K.
pub fn dequantize_row(dtype: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    let expected = row_bytes(dtype, dst.len())?;
    if src.len() != expected {
        return Err(KernelError::SizeMismatch {
            what: "dequantize_row source bytes",
            expected,
            actual: src.len(),
        });
    }
    match dtype {
        GgmlType::F32 => {
            for (d, b) in dst.iter_mut().zip(src.as_chunks::<4>().0) {
                *d = f32::from_le_bytes(*b);
            }
        }
        GgmlType::F16 => {
            for (d, b) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
                *d = f16_from(*b);
            }
        }
        GgmlType::BF16 => {
            for (d, b) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
                *d = bf16_bits_to_f32(u16::from_le_bytes(*b));
            }
        }
        GgmlType::Q8_0 => blocks(src, dst, legacy::dequantize_q8_0),
        GgmlType::Q4_0 => blocks(src, dst, legacy::dequantize_q4_0),
        GgmlType::Q4_1 => blocks(src, dst, legacy::dequantize_q4_1),
        GgmlType::Q4K => blocks(src, dst, kquants::dequantize_q4_k),
        GgmlType::Q5K => blocks(src, dst, kquants::dequantize_q5_k),
        GgmlType::Q6K => blocks(src, dst, kquants::dequantize_q6_k),
        GgmlType::Q8K => blocks(src, dst, kquants::dequantize_q8_k),
    }
    Ok(())
}

/// Applies a block dequantizer over a row whose sizes were already checked.
fn blocks<const B: usize, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: fn(&[u8; B], &mut [f32; N]),
) {
    for (b, d) in src
        .as_chunks::<B>()
        .0
        .iter()
        .zip(dst.as_chunks_mut::<N>().0)
    {
        f(b, d);
    }
}

/// Quantize a row of f32 into `dtype`, appending its bytes to `dst`.
///
/// Every weight type is supported, and Q8_K (with llama.cpp's reference rounding). The legacy
/// formats use llama.cpp's reference quantizers; K-quants use simple min/max fits.
pub fn quantize_row(dtype: GgmlType, src: &[f32], dst: &mut Vec<u8>) -> Result<(), KernelError> {
    let bytes = row_bytes(dtype, src.len())?;
    dst.reserve(bytes);
    match dtype {
        GgmlType::F32 => src.iter().for_each(|x| dst.extend(x.to_le_bytes())),
        GgmlType::F16 => src.iter().for_each(|&x| dst.extend(f16_bytes(x))),
        GgmlType::BF16 => src
            .iter()
            .for_each(|&x| dst.extend(f32_to_bf16_bits(x).to_le_bytes())),
        GgmlType::Q8_0 => quantize_blocks(src, dst, legacy::quantize_q8_0),
        GgmlType::Q4_0 => quantize_blocks(src, dst, legacy::quantize_q4_0),
        GgmlType::Q4_1 => quantize_blocks(src, dst, legacy::quantize_q4_1),
        GgmlType::Q4K => quantize_blocks(src, dst, kquants::quantize_q4_k),
        GgmlType::Q5K => quantize_blocks(src, dst, kquants::quantize_q5_k),
        GgmlType::Q6K => quantize_blocks(src, dst, kquants::quantize_q6_k),
        GgmlType::Q8K => quantize_blocks(src, dst, kquants::quantize_q8_k),
    }
    Ok(())
}

/// Applies a block quantizer over a row whose length was already checked.
fn quantize_blocks<const N: usize, const B: usize>(
    src: &[f32],
    dst: &mut Vec<u8>,
    f: fn(&[f32; N]) -> [u8; B],
) {
    for x in src.as_chunks::<N>().0 {
        dst.extend_from_slice(&f(x));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests;
