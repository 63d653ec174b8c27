//! Prints the speed of `matmul` on the default model's shapes, as GB/s of weight data streamed.
//!
//! Run with `cargo run --release -p shoal-kernels --example kernel_speed [-- OPTIONS]`:
//! `--quick` (shorter runs), `--scalar` (the portable kernels instead of SIMD), `--only TEXT` (shapes whose name contains TEXT; `decode` for the
//! decode step alone), `--median` (report the median call instead of the fastest one; on a
//! machine shared with other work the fastest is the better estimate of the kernels' speed).
//!
//! Three views:
//! - hot: one matrix multiplied over and over (it stays in cache: the kernels' compute ceiling);
//! - cold: many copies of the matrix cycled so the weights come from memory, as in decoding;
//! - decode step: every matrix product of one SmolLM2-135M token (30 layers + output head),
//!   activation quantization included, giving an upper bound on tokens/s from matmuls alone.
//!   llama.cpp decodes this model at about 150 tokens/s on 2 threads of this machine.

use std::time::{Duration, Instant};

use shoal_kernels::{GgmlType, Isa, QuantizedActs, ThreadPool, WeightMatrix, matmul_with};

/// A tiny deterministic generator, so the example needs no extra dependencies.
struct Lcg(u64);

impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn random_matrix(dtype: GgmlType, rows: usize, cols: usize, rng: &mut Lcg) -> Vec<u8> {
    // Quantize one random row block and repeat it with variations: quantizing 28M weights
    // from scratch would dominate the example's run time and does not change the speed.
    let mut row = Vec::new();
    let mut block = Vec::new();
    for _ in 0..16 {
        let x: Vec<f32> = (0..cols).map(|_| rng.next_f32() * 0.1).collect();
        shoal_kernels::quantize_row(dtype, &x, &mut block).unwrap_or_default();
    }
    let rb = block.len() / 16;
    for r in 0..rows {
        row.extend_from_slice(&block[(r % 16) * rb..(r % 16 + 1) * rb]);
    }
    row
}

/// Nanoseconds this thread has spent on a CPU (Linux), to see through a busy machine.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Runs `f` repeatedly for about `budget`; returns the fastest (or with `median`, the median)
/// wall time per call and the calling thread's mean CPU time per call (equal to wall time on
/// an idle machine with one thread; with more threads it includes the wait for the others).
fn time(budget: Duration, median: bool, mut f: impl FnMut()) -> (Duration, Duration) {
    f();
    let mut samples = Vec::new();
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    while start.elapsed() < budget || samples.len() < 5 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    let cpu = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) => Duration::from_nanos((b - a) / samples.len() as u64),
        _ => Duration::ZERO,
    };
    samples.sort();
    (
        if median {
            samples[samples.len() / 2]
        } else {
            samples[0]
        },
        cpu,
    )
}

struct Shape {
    name: &'static str,
    dtype: GgmlType,
    rows: usize,
    cols: usize,
}

const SHAPES: [Shape; 6] = [
    Shape {
        name: "attn 576x576",
        dtype: GgmlType::Q4_1,
        rows: 576,
        cols: 576,
    },
    Shape {
        name: "ffn up 1536x576",
        dtype: GgmlType::Q4_1,
        rows: 1536,
        cols: 576,
    },
    Shape {
        name: "ffn down 576x1536",
        dtype: GgmlType::Q4_1,
        rows: 576,
        cols: 1536,
    },
    Shape {
        name: "head 49152x576",
        dtype: GgmlType::Q8_0,
        rows: 49152,
        cols: 576,
    },
    // Not in the default model: the K formats of a typical 1B Q4_K_M model.
    Shape {
        name: "q4_k 2048x2048",
        dtype: GgmlType::Q4K,
        rows: 2048,
        cols: 2048,
    },
    Shape {
        name: "q6_k 2048x2048",
        dtype: GgmlType::Q6K,
        rows: 2048,
        cols: 2048,
    },
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let median = args.iter().any(|a| a == "--median");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    let budget = Duration::from_millis(if quick { 100 } else { 400 });
    let isa = if args.iter().any(|a| a == "--scalar") {
        Isa::Scalar
    } else {
        Isa::detected()
    };
    println!(
        "kernels: {isa:?}; GB/s = weight bytes streamed per second; times are the {} call",
        if median { "median" } else { "fastest" }
    );
    let mut rng = Lcg(42);
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let pools: Vec<ThreadPool> = pools.into_iter().filter_map(Result::ok).collect();

    println!(
        "\n{:<20} {:>2} {:>3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "shape", "n", "thr", "hot us", "GB/s", "cpu GB/s", "cold us", "GB/s", "cpu GB/s"
    );
    for s in SHAPES.iter().filter(|s| s.name.contains(&only)) {
        let one = random_matrix(s.dtype, s.rows, s.cols, &mut rng);
        let bytes = one.len();
        // Enough distinct copies to overflow the last-level cache.
        let copies = (if quick { 64 << 20 } else { 160 << 20 }) / bytes + 1;
        let many: Vec<u8> = one.iter().copied().cycle().take(bytes * copies).collect();
        let mats: Vec<WeightMatrix<'_>> = many
            .chunks_exact(bytes)
            .filter_map(|d| WeightMatrix::new(s.dtype, s.rows, s.cols, d).ok())
            .collect();
        for n in [1, 8] {
            let x: Vec<f32> = (0..n * s.cols).map(|_| rng.next_f32()).collect();
            for pool in &pools {
                let mut acts = QuantizedActs::new();
                let mut out = vec![0.0; n * s.rows];
                let _ = acts.quantize(pool, s.dtype, &x, n, s.cols);
                let (hot, hot_cpu) = time(budget, median, || {
                    let _ = matmul_with(pool, &mats[0], &acts, &mut out, isa);
                });
                let mut k = 0;
                let (cold, cold_cpu) = time(budget, median, || {
                    k = (k + 1) % mats.len();
                    let _ = matmul_with(pool, &mats[k], &acts, &mut out, isa);
                });
                let gbs = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
                println!(
                    "{:<20} {:>2} {:>3} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                    s.name,
                    n,
                    pool.n_threads(),
                    hot.as_secs_f64() * 1e6,
                    gbs(hot),
                    gbs(hot_cpu),
                    cold.as_secs_f64() * 1e6,
                    gbs(cold),
                    gbs(cold_cpu),
                );
            }
        }
    }

    if only.is_empty() || "decode".contains(&only) {
        decode_step(&pools, &mut rng, budget, median, isa);
    }
}

/// All matrix products of one token of SmolLM2-135M (Q4_1 layers, Q8_0 head).
fn decode_step(pools: &[ThreadPool], rng: &mut Lcg, budget: Duration, median: bool, isa: Isa) {
    const LAYERS: usize = 30;
    // (rows, cols) of q, k, v, o, gate, up, down.
    const LAYER: [(usize, usize); 7] = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let layer_data: Vec<Vec<Vec<u8>>> = (0..LAYERS)
        .map(|_| {
            LAYER
                .iter()
                .map(|&(r, c)| random_matrix(GgmlType::Q4_1, r, c, rng))
                .collect()
        })
        .collect();
    let head = random_matrix(GgmlType::Q8_0, 49152, 576, rng);
    let total: usize = layer_data.iter().flatten().map(Vec::len).sum::<usize>() + head.len();
    let x576: Vec<f32> = (0..576).map(|_| rng.next_f32()).collect();
    let x1536: Vec<f32> = (0..1536).map(|_| rng.next_f32()).collect();
    println!(
        "\ndecode step: 30 layers x 7 Q4_1 products + 49152x576 Q8_0 head = {:.1} MB of weights",
        total as f64 / 1e6
    );
    for pool in pools {
        let mut acts = QuantizedActs::new();
        let mut out = vec![0.0; 49152];
        let (t, cpu) = time(budget * 3, median, || {
            for layer in &layer_data {
                for (m, &(r, c)) in layer.iter().zip(&LAYER) {
                    let x = if c == 576 { &x576 } else { &x1536 };
                    let _ = acts.quantize(pool, GgmlType::Q4_1, x, 1, c);
                    if let Ok(w) = WeightMatrix::new(GgmlType::Q4_1, r, c, m) {
                        let _ = matmul_with(pool, &w, &acts, &mut out[..r], isa);
                    }
                }
            }
            let _ = acts.quantize(pool, GgmlType::Q8_0, &x576, 1, 576);
            if let Ok(w) = WeightMatrix::new(GgmlType::Q8_0, 49152, 576, &head) {
                let _ = matmul_with(pool, &w, &acts, &mut out, isa);
            }
        });
        println!(
            "  {} thread(s): {:.2} ms/token of matmuls = {:.0} tokens/s ceiling, {:.1} GB/s \
             (calling thread on CPU {:.2} ms); llama.cpp: ~150 tokens/s end to end on 2 threads",
            pool.n_threads(),
            t.as_secs_f64() * 1e3,
            1.0 / t.as_secs_f64(),
            total as f64 / t.as_secs_f64() / 1e9,
            cpu.as_secs_f64() * 1e3,
        );
    }
}
