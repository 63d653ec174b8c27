//! Matrix products: every implementation against an f64 reference built from the dequantized
//! operands, SIMD against scalar, batched against one-at-a-time, over odd shapes and thread
//! counts.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_kernels::{
    ActFormat, GgmlType, Isa, KernelError, QuantizedActs, ThreadPool, WeightMatrix, dequantize_row,
    matmul, matmul_with, quantize_row,
};

fn random(n: usize, rng: &mut StdRng, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn weights(dtype: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> (Vec<u8>, Vec<f32>) {
    let src = random(rows * cols, rng, 0.1);
    let mut bytes = Vec::new();
    for r in src.chunks_exact(cols) {
        quantize_row(dtype, r, &mut bytes).unwrap();
    }
    let mut deq = vec![0.0; rows * cols];
    let rb = dtype.row_bytes(cols).unwrap();
    for (r, d) in deq.chunks_exact_mut(cols).enumerate() {
        dequantize_row(dtype, &bytes[r * rb..(r + 1) * rb], d).unwrap();
    }
    (bytes, deq)
}

/// The activations exactly as the kernels see them, widened to f32.
fn dequantized_acts(acts: &QuantizedActs, dtype: GgmlType) -> Vec<Vec<f32>> {
    let cols = acts.cols();
    (0..acts.n())
        .map(|i| {
            let bytes = acts.to_ggml_bytes(i).unwrap();
            let mut out = vec![0.0; cols];
            match acts.format().unwrap() {
                ActFormat::Q8_0 => dequantize_row(GgmlType::Q8_0, &bytes, &mut out).unwrap(),
                ActFormat::Q8K => dequantize_row(GgmlType::Q8K, &bytes, &mut out).unwrap(),
                ActFormat::Q8_1 => {
                    for (b, o) in bytes.chunks_exact(36).zip(out.chunks_exact_mut(32)) {
                        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                        for (x, &q) in o.iter_mut().zip(&b[4..]) {
                            *x = d * f32::from(q as i8);
                        }
                    }
                }
                ActFormat::F16 | ActFormat::BF16 | ActFormat::F32 => {
                    dequantize_row(dtype, &bytes, &mut out).unwrap()
                }
            }
            out
        })
        .collect()
}

/// Q4_1 × Q8_1 uses each activation block's sum as stored (rounded to f16) rather than the sum
/// of its values; this is the difference that makes, so the reference can include it.
fn q4_1_sum_rounding(
    w: &[u8],
    acts: &QuantizedActs,
    r: usize,
    i: usize,
    cols: usize,
    x: &[f32],
) -> f64 {
    let f16 = |b: &[u8]| f64::from(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
    let row = &w[r * cols / 32 * 20..];
    let a = acts.to_ggml_bytes(i).unwrap();
    (0..cols / 32)
        .map(|b| {
            let m = f16(&row[20 * b + 2..]);
            let s = f16(&a[36 * b + 2..]);
            let exact: f64 = x[32 * b..32 * b + 32].iter().map(|v| f64::from(*v)).sum();
            m * (s - exact)
        })
        .sum()
}

const ALL: [GgmlType; 9] = GgmlType::WEIGHT_TYPES;

#[test]
fn every_type_and_implementation_matches_the_f64_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    let pools: Vec<ThreadPool> = (1..=3).map(|n| ThreadPool::new(n).unwrap()).collect();
    for dtype in ALL {
        let bs = dtype.block_size().max(32);
        let shapes = [(1, bs), (3, bs * 2), (17, bs), (37, bs * 3), (69, bs * 2)];
        for (si, &(rows, cols)) in shapes.iter().enumerate() {
            let (bytes, deq) = weights(dtype, rows, cols, &mut rng);
            let w = WeightMatrix::new(dtype, rows, cols, &bytes).unwrap();
            for n in 1..=9 {
                let x = random(n * cols, &mut rng, 2.0);
                let pool = &pools[(si + n) % pools.len()];
                let mut acts = QuantizedActs::new();
                acts.quantize(pool, dtype, &x, n, cols).unwrap();
                let xs = dequantized_acts(&acts, dtype);
                let mut results = Vec::new();
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; n * rows];
                    matmul_with(pool, &w, &acts, &mut out, isa).unwrap();
                    results.push((isa, out));
                }
                for i in 0..n {
                    for r in 0..rows {
                        let wr = &deq[r * cols..(r + 1) * cols];
                        let mut exact: f64 = wr
                            .iter()
                            .zip(&xs[i])
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        if dtype == GgmlType::Q4_1 {
                            exact += q4_1_sum_rounding(&bytes, &acts, r, i, cols, &xs[i]);
                        }
                        let mag: f64 = wr
                            .iter()
                            .zip(&xs[i])
                            .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
                            .sum();
                        for (isa, out) in &results {
                            let got = f64::from(out[i * rows + r]);
                            assert!(
                                (got - exact).abs() <= mag * 1e-5 + 1e-6,
                                "{dtype} {isa:?} rows={rows} cols={cols} n={n} i={i} r={r}: \
                                 {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn batched_products_equal_single_products_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(12);
    let pool = ThreadPool::new(2).unwrap();
    for dtype in ALL {
        let cols = dtype.block_size().max(32) * 2;
        let rows = 23;
        let (bytes, _) = weights(dtype, rows, cols, &mut rng);
        let w = WeightMatrix::new(dtype, rows, cols, &bytes).unwrap();
        let n = 7;
        let x = random(n * cols, &mut rng, 1.0);
        for isa in Isa::available() {
            let mut acts = QuantizedActs::new();
            acts.quantize(&pool, dtype, &x, n, cols).unwrap();
            let mut batched = vec![0.0; n * rows];
            matmul_with(&pool, &w, &acts, &mut batched, isa).unwrap();
            for i in 0..n {
                acts.quantize(&pool, dtype, &x[i * cols..(i + 1) * cols], 1, cols)
                    .unwrap();
                let mut single = vec![0.0; rows];
                matmul_with(&pool, &w, &acts, &mut single, isa).unwrap();
                let got = &batched[i * rows..(i + 1) * rows];
                assert!(
                    got.iter()
                        .zip(&single)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype} {isa:?} activation {i}"
                );
            }
        }
    }
}

#[test]
fn activation_quantization_is_identical_across_implementations_and_threads() {
    let mut rng = StdRng::seed_from_u64(13);
    let pools = [ThreadPool::new(1).unwrap(), ThreadPool::new(3).unwrap()];
    for dtype in ALL {
        let cols = 512;
        let n = 9;
        let mut x = random(n * cols, &mut rng, 3.0);
        x[5] = 0.0;
        x[cols..cols + 32].fill(0.0); // an all-zero block
        let mut reference: Option<Vec<Vec<u8>>> = None;
        for pool in &pools {
            for isa in Isa::available() {
                let mut acts = QuantizedActs::new();
                acts.quantize_with(pool, dtype, &x, n, cols, isa).unwrap();
                let got: Vec<Vec<u8>> = (0..n).map(|i| acts.to_ggml_bytes(i).unwrap()).collect();
                match &reference {
                    None => reference = Some(got),
                    Some(r) => assert!(*r == got, "{dtype} {isa:?}"),
                }
            }
        }
    }
}

#[test]
fn large_matrix_split_over_threads_matches_one_thread() {
    let mut rng = StdRng::seed_from_u64(14);
    let (rows, cols) = (1000, 576);
    for dtype in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let (bytes, _) = weights(dtype, rows, cols, &mut rng);
        let w = WeightMatrix::new(dtype, rows, cols, &bytes).unwrap();
        let x = random(3 * cols, &mut rng, 1.0);
        let mut outs = Vec::new();
        for nt in [1, 2, 4] {
            let pool = ThreadPool::new(nt).unwrap();
            let mut acts = QuantizedActs::new();
            acts.quantize(&pool, dtype, &x, 3, cols).unwrap();
            let mut out = vec![0.0; 3 * rows];
            matmul(&pool, &w, &acts, &mut out).unwrap();
            outs.push(out);
        }
        assert!(outs.windows(2).all(|p| p[0] == p[1]), "{dtype}");
    }
}

#[test]
fn mismatches_are_errors() {
    let pool = ThreadPool::new(1).unwrap();
    let bytes = vec![0u8; 2 * 20];
    assert!(matches!(
        WeightMatrix::new(GgmlType::Q4_1, 2, 32, &bytes[..39]),
        Err(KernelError::SizeMismatch { .. })
    ));
    assert!(matches!(
        WeightMatrix::new(GgmlType::Q8K, 1, 256, &[0; 292]),
        Err(KernelError::Unsupported { .. })
    ));
    let w = WeightMatrix::new(GgmlType::Q4_1, 2, 32, &bytes).unwrap();
    assert_eq!(w.row_data(1).len(), 20);
    assert!(w.row_data(2).is_empty());
    assert!(w.row_data(usize::MAX).is_empty());
    let mut acts = QuantizedActs::new();
    let mut out = vec![0.0; 2];
    assert!(matches!(
        matmul(&pool, &w, &acts, &mut out),
        Err(KernelError::ActsFormat { acts: None, .. })
    ));
    acts.quantize(&pool, GgmlType::Q8_0, &[0.5; 32], 1, 32)
        .unwrap();
    assert!(matches!(
        matmul(&pool, &w, &acts, &mut out),
        Err(KernelError::ActsFormat { .. })
    ));
    acts.quantize(&pool, GgmlType::Q4_1, &[0.5; 64], 1, 64)
        .unwrap();
    assert!(matches!(
        matmul(&pool, &w, &acts, &mut out),
        Err(KernelError::SizeMismatch { .. })
    ));
    acts.quantize(&pool, GgmlType::Q4_1, &[0.5; 32], 1, 32)
        .unwrap();
    assert!(matches!(
        matmul(&pool, &w, &acts, &mut out[..1]),
        Err(KernelError::SizeMismatch { .. })
    ));
    assert!(matmul(&pool, &w, &acts, &mut out).is_ok());
    assert!(matches!(
        acts.quantize(&pool, GgmlType::Q4_1, &[0.5; 33], 1, 33),
        Err(KernelError::PartialBlock { .. })
    ));
    assert!(matches!(
        acts.quantize(&pool, GgmlType::Q4_1, &[0.5; 32], 2, 32),
        Err(KernelError::SizeMismatch { .. })
    ));
}
