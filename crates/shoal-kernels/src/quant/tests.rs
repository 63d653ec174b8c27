use super::kquants::*;
use super::legacy::*;
use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Rows of varied shapes: symmetric, one-signed, constant, zero, and with an outlier.
fn sample_rows(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows = vec![
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect::<Vec<_>>(),
        (0..n).map(|_| rng.random_range(0.5f32..3.0)).collect(),
        (0..n).map(|_| rng.random_range(-3.0f32..-0.5)).collect(),
        vec![0.25; n],
        vec![-0.75; n],
        vec![0.0; n],
    ];
    let mut outlier: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    outlier[n / 3] = 7.0;
    rows.push(outlier);
    rows
}

fn round_trip(dtype: GgmlType, x: &[f32]) -> Vec<f32> {
    let mut bytes = Vec::new();
    quantize_row(dtype, x, &mut bytes).unwrap();
    assert_eq!(bytes.len(), dtype.row_bytes(x.len()).unwrap());
    let mut y = vec![f32::NAN; x.len()];
    dequantize_row(dtype, &bytes, &mut y).unwrap();
    y
}

/// Checks every block's round-trip error against `tol(block) * block amax`.
fn assert_round_trip(dtype: GgmlType, rel_tol: f32) {
    let bs = dtype.block_size().max(32);
    for x in sample_rows(bs * 3, dtype.id() as u64) {
        let y = round_trip(dtype, &x);
        for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for (a, b) in xb.iter().zip(yb) {
                assert!(
                    (a - b).abs() <= rel_tol * amax + 1e-7,
                    "{dtype}: {a} came back as {b} (block amax {amax})"
                );
            }
        }
    }
}

#[test]
fn float_types_round_trip() {
    assert_round_trip(GgmlType::F32, 0.0);
    assert_round_trip(GgmlType::F16, 1.0 / 1024.0);
    assert_round_trip(GgmlType::BF16, 1.0 / 128.0);
}

#[test]
fn legacy_types_round_trip_within_half_a_step() {
    // Steps: amax/127 for Q8_0, amax/8 (with the clipped top level) for Q4_0, range/15 for Q4_1.
    assert_round_trip(GgmlType::Q8_0, 0.5 / 127.0 + 0.002);
    assert_round_trip(GgmlType::Q4_0, 1.0 / 8.0 + 0.002);
    assert_round_trip(GgmlType::Q4_1, 1.0 / 15.0 + 0.002);
}

#[test]
fn k_types_round_trip() {
    assert_round_trip(GgmlType::Q4K, 0.1);
    assert_round_trip(GgmlType::Q5K, 0.05);
    assert_round_trip(GgmlType::Q6K, 0.025);
    assert_round_trip(GgmlType::Q8K, 0.005);
}

#[test]
fn q4_1_layout_low_nibble_first_half() {
    let mut b = [0u8; Q4_1_BYTES];
    b[..2].copy_from_slice(&f16_bytes(0.5));
    b[2..4].copy_from_slice(&f16_bytes(-1.0));
    for j in 0..16 {
        b[4 + j] = j as u8 | (((15 - j) as u8) << 4);
    }
    let mut out = [0.0; 32];
    dequantize_q4_1(&b, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.0);
        assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
    }
}

#[test]
fn q4_0_layout_offset_eight() {
    let mut b = [0u8; Q4_0_BYTES];
    b[..2].copy_from_slice(&f16_bytes(2.0));
    b[2] = 0x0F; // x[0] = 7*2, x[16] = -8*2
    b[17] = 0x80; // x[15] = -8*2, x[31] = 0
    let mut out = [0.0; 32];
    dequantize_q4_0(&b, &mut out);
    assert_eq!(
        (out[0], out[16], out[15], out[31]),
        (14.0, -16.0, -16.0, 0.0)
    );
    assert_eq!(out[1], -16.0);
}

#[test]
fn scale_min_packing_round_trips_all_six_bit_values() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..200 {
        let ls: [u8; 8] = std::array::from_fn(|_| rng.random_range(0..64));
        let lm: [u8; 8] = std::array::from_fn(|_| rng.random_range(0..64));
        let packed = pack_scale_min_k4(&ls, &lm);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &packed), (ls[j], lm[j]));
        }
    }
}

#[test]
fn q4_k_layout_chunks_and_nibbles() {
    let mut ls = [1u8; 8];
    ls[3] = 2; // sub-block 3 = chunk 1, high nibbles: elements 96..128
    let lm = [0u8; 8];
    let mut b = [0u8; Q4_K_BYTES];
    b[0..2].copy_from_slice(&f16_bytes(1.0));
    b[4..16].copy_from_slice(&pack_scale_min_k4(&ls, &lm));
    b[16 + 32 + 5] = 0x93; // chunk 1, l=5: low 3 (elt 69), high 9 (elt 101, scale 2)
    let mut out = [0.0; 256];
    dequantize_q4_k(&b, &mut out);
    assert_eq!(out[69], 3.0);
    assert_eq!(out[101], 18.0);
    assert_eq!(out.iter().filter(|v| **v != 0.0).count(), 2);
}

#[test]
fn q6_k_layout_bits() {
    let mut b = [0u8; Q6_K_BYTES];
    b[208..210].copy_from_slice(&f16_bytes(1.0));
    b[192..208].fill(1);
    // Half 1, l = 3: ql[64+3] low nibble → elt 128+3; qh bits 0-1 are its high bits.
    b[64 + 3] = 0x05;
    b[128 + 32 + 3] = 0b10;
    let mut out = [0.0; 256];
    dequantize_q6_k(&b, &mut out);
    // q = 5 | (2 << 4) = 37 → 37 - 32 = 5.
    assert_eq!(out[131], 5.0);
    // Every other element has q = 0 → -32.
    assert_eq!(out.iter().filter(|v| **v == -32.0).count(), 255);
}

#[test]
fn q8_k_bsums_match_values() {
    for x in sample_rows(256, 3) {
        let arr: [f32; 256] = x.try_into().unwrap();
        let b = quantize_q8_k(&arr);
        for j in 0..16 {
            let s: i32 = b[4 + 16 * j..4 + 16 * j + 16]
                .iter()
                .map(|&v| i32::from(v as i8))
                .sum();
            let stored = i16::from_le_bytes([b[260 + 2 * j], b[261 + 2 * j]]);
            assert_eq!(s, i32::from(stored));
        }
    }
}

#[test]
fn activation_quantizers_use_ties_to_even() {
    // amax = 127 makes the multiplier exactly 1, so x * id lands on the halves themselves.
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 0.5;
    let (d, q) = quantize_act_block(&x);
    assert_eq!(d, 1.0);
    assert_eq!(&q[..4], &[127, 2, -4, 0]);
    let b = quantize_q8_1(&x);
    assert_eq!(f16_from([b[2], b[3]]), 125.0);
    // The weight quantizer rounds the same halves away from zero.
    let w = quantize_q8_0(&x);
    assert_eq!(&w[2..6], &[127, 3, (-4i8) as u8, 1]);
}

#[test]
fn bf16_rounding_matches_ggml() {
    assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
    // Exactly halfway between two bf16 values: ties go to the even mantissa.
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
}

#[test]
fn size_errors_are_values() {
    let mut out = vec![0.0; 32];
    assert!(matches!(
        dequantize_row(GgmlType::Q4_1, &[0; 19], &mut out),
        Err(KernelError::SizeMismatch {
            expected: 20,
            actual: 19,
            ..
        })
    ));
    let mut out = vec![0.0; 33];
    assert!(matches!(
        dequantize_row(GgmlType::Q8_0, &[0; 34], &mut out),
        Err(KernelError::PartialBlock { .. })
    ));
    let mut bytes = Vec::new();
    assert!(matches!(
        quantize_row(GgmlType::Q4K, &[0.0; 576], &mut bytes),
        Err(KernelError::PartialBlock {
            block_size: 256,
            ..
        })
    ));
    assert!(bytes.is_empty());
}

#[test]
fn quantize_row_appends() {
    let mut bytes = vec![1, 2, 3];
    quantize_row(GgmlType::Q8_0, &[1.0; 64], &mut bytes).unwrap();
    assert_eq!(bytes.len(), 3 + 68);
    assert_eq!(&bytes[..3], &[1, 2, 3]);
}
