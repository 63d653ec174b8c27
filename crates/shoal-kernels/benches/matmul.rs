//! Criterion benchmarks of the default model's matrix products at decode (n=1) and small-batch
//! (n=8) sizes, on one and two threads, reported as weight bytes per second.
//!
//! `cargo bench -p shoal-kernels --bench matmul`; `examples/kernel_speed.rs` prints the same
//! shapes as a table together with a whole decode step.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_kernels::{GgmlType, QuantizedActs, ThreadPool, WeightMatrix, matmul, quantize_row};

fn weights(dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut row = vec![0.0f32; cols];
    let mut bytes = Vec::new();
    for _ in 0..rows {
        for x in &mut row {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            *x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
        }
        if quantize_row(dtype, &row, &mut bytes).is_err() {
            break;
        }
    }
    bytes
}

fn bench(c: &mut Criterion) {
    let shapes = [
        ("q4_1 576x576", GgmlType::Q4_1, 576, 576),
        ("q4_1 1536x576", GgmlType::Q4_1, 1536, 576),
        ("q4_1 576x1536", GgmlType::Q4_1, 576, 1536),
        ("q8_0 49152x576", GgmlType::Q8_0, 49152, 576),
    ];
    for threads in [1, 2] {
        let Ok(pool) = ThreadPool::new(threads) else {
            continue;
        };
        for &(name, dtype, rows, cols) in &shapes {
            let data = weights(dtype, rows, cols);
            let Ok(w) = WeightMatrix::new(dtype, rows, cols, &data) else {
                continue;
            };
            let mut group = c.benchmark_group(format!("{name} t{threads}"));
            group.throughput(Throughput::Bytes(data.len() as u64));
            for n in [1, 8] {
                let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
                let mut acts = QuantizedActs::new();
                let mut out = vec![0.0; n * rows];
                if acts.quantize(&pool, dtype, &x, n, cols).is_err() {
                    continue;
                }
                group.bench_function(format!("n{n}"), |b| {
                    b.iter(|| matmul(&pool, &w, black_box(&acts), &mut out))
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
