//! Property tests: arbitrary inputs never break the quantizers, and every implementation of the
//! activation formats and products agrees with the scalar reference.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use proptest::prelude::*;
use shoal_kernels::{
    GgmlType, Isa, QuantizedActs, ThreadPool, WeightMatrix, dequantize_row, matmul_with,
    quantize_row,
};

/// Finite values over many magnitudes, with exact zeros mixed in.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -1.0f32..1.0,
        2 => -1000.0f32..1000.0,
        1 => -1e-6f32..1e-6,
        1 => Just(0.0f32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn weight_round_trips_stay_within_the_block_range(x in prop::collection::vec(value(), 256)) {
        for dtype in GgmlType::WEIGHT_TYPES {
            let mut bytes = Vec::new();
            quantize_row(dtype, &x, &mut bytes).unwrap();
            prop_assert_eq!(bytes.len(), dtype.row_bytes(256).unwrap());
            let mut y = vec![0.0; 256];
            dequantize_row(dtype, &bytes, &mut y).unwrap();
            let bs = dtype.block_size().max(32);
            for (xb, yb) in x.chunks(bs).zip(y.chunks(bs)) {
                let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for (a, b) in xb.iter().zip(yb) {
                    // Loose: a value may not move by more than the block's magnitude.
                    prop_assert!((a - b).abs() <= amax * 1.01 + 1e-30, "{} {} {}", dtype, a, b);
                }
            }
        }
    }

    #[test]
    fn every_implementation_quantizes_and_multiplies_alike(
        x in prop::collection::vec(value(), 512),
        w in prop::collection::vec(-1.0f32..1.0, 512 * 3),
    ) {
        let pool = ThreadPool::new(2).unwrap();
        for dtype in GgmlType::WEIGHT_TYPES {
            let mut bytes = Vec::new();
            for r in w.chunks_exact(512) {
                quantize_row(dtype, r, &mut bytes).unwrap();
            }
            let m = WeightMatrix::new(dtype, 3, 512, &bytes).unwrap();
            let mut results = Vec::new();
            for isa in Isa::available() {
                let mut acts = QuantizedActs::new();
                acts.quantize_with(&pool, dtype, &x, 1, 512, isa).unwrap();
                let mut out = vec![0.0; 3];
                matmul_with(&pool, &m, &acts, &mut out, isa).unwrap();
                results.push((acts.to_ggml_bytes(0).unwrap(), out));
            }
            let (ref_bytes, ref_out) = &results[0];
            let mag: f32 = x.iter().map(|v| v.abs()).sum::<f32>() * 2.0;
            for (bytes, out) in &results[1..] {
                prop_assert!(bytes == ref_bytes, "{}: activation bytes differ", dtype);
                for (a, b) in out.iter().zip(ref_out) {
                    prop_assert!((a - b).abs() <= mag * 1e-5, "{}: {} vs {}", dtype, a, b);
                }
            }
        }
    }
}
