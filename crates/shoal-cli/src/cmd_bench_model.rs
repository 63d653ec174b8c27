//! `shoal model bench`: the inference core's speed beside llama.cpp's, measured in the same run
//! on the same file, prompts and thread counts, printed with the ratio shoal / llama.cpp.
//!
//! Each figure comes from a fresh child process (so peak RSS is that engine's alone): shoal's
//! child is this binary with `--child`, llama.cpp's is `scripts/bench/llamacpp_bench.py`.

use crate::catalog;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use shoal_model::{
    Model, SeqStep, ShardInput, ShardOptions, ShardOutput, ShardRuntime, ThreadPool, argmax,
};
use shoal_types::SeqId;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `shoal model bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model name or path.
    #[arg(long, default_value = catalog::DEFAULT_MODEL)]
    model: String,
    /// Thread counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Runs per figure; the best is kept.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip llama.cpp (shoal's figures only).
    #[arg(long)]
    no_reference: bool,
    /// The reference script.
    #[arg(long, default_value = "scripts/bench/llamacpp_bench.py")]
    reference: PathBuf,
    /// Internal: measure shoal in this process and print JSON.
    #[arg(long, hide = true)]
    child: bool,
}

/// One engine's figures at one thread count (the reference script prints the same fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figures {
    engine: String,
    threads: usize,
    load_ms: f64,
    prefill_128_tps: f64,
    prefill_512_tps: f64,
    /// 2,048 tokens in 128-token steps on a fresh sequence: a long context, where attention
    /// over the growing cache weighs as much as the weights.
    prefill_2k_tps: f64,
    decode_b1_tps: f64,
    decode_b8_tps: f64,
    peak_rss_mib: f64,
    model_bytes: u64,
}

/// `n` prompt tokens starting at global index `first`: token `i` is `100 + (i * 7919) % 30000`,
/// as in the reference script, so both engines see the same prompts.
fn prompt(n: usize, first: usize) -> Vec<u32> {
    (first..first + n)
        .map(|i| (100 + (i * 7919) % 30000) as u32)
        .collect()
}

/// The long-context prefill: prompt tokens, and tokens per step (the engine's default).
const LONG_PROMPT: usize = 2048;
const LONG_CHUNK: usize = 128;

fn best_of(repeats: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut best = 0.0f64;
    for _ in 0..repeats.max(1) {
        best = best.max(f()?);
    }
    Ok(best)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn measure(path: &std::path::Path, threads: usize, repeats: usize) -> Result<Figures> {
    // Warm the page cache, then time a load the way a restart finds the file.
    drop(Model::open(path)?);
    let mut load_ms = f64::MAX;
    let mut model = None;
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        let m = Model::open(path)?;
        load_ms = load_ms.min(t0.elapsed().as_secs_f64() * 1e3);
        model = Some(m);
    }
    let model = model.context("no model loaded")?;
    let pool = Arc::new(ThreadPool::new(threads)?);
    let mut rt = model.whole(pool, ShardOptions::default())?;

    let mut seq_counter = 0u64;
    let mut next_seq = || {
        seq_counter += 1;
        SeqId(seq_counter)
    };
    // `n` prompt tokens on a fresh sequence, `chunk` a step (the logits of the last only).
    let mut prefill = |rt: &mut dyn ShardRuntime, n: usize, chunk: usize| -> Result<f64> {
        let seq = next_seq();
        let p = prompt(n, 0);
        let t0 = Instant::now();
        for (i, part) in p.chunks(chunk).enumerate() {
            let pos = i * chunk;
            rt.forward(
                &[SeqStep {
                    seq,
                    pos: pos as u32,
                    n_tokens: part.len() as u32,
                    logits: pos + part.len() == n,
                }],
                ShardInput::Tokens(part),
            )?;
        }
        let tps = n as f64 / t0.elapsed().as_secs_f64();
        rt.release(seq);
        Ok(tps)
    };
    // One untimed pass touches every weight page.
    prefill(&mut rt, 16, 16)?;
    let prefill_128_tps = best_of(repeats, || prefill(&mut rt, 128, 128))?;
    let prefill_512_tps = best_of(repeats, || prefill(&mut rt, 512, 512))?;
    let prefill_2k_tps = best_of(repeats, || prefill(&mut rt, LONG_PROMPT, LONG_CHUNK))?;

    let mut decode = |rt: &mut dyn ShardRuntime, n_seqs: usize, steps: usize| -> Result<f64> {
        let seqs: Vec<SeqId> = (0..n_seqs).map(|_| next_seq()).collect();
        let mut last = Vec::with_capacity(n_seqs);
        for (i, &seq) in seqs.iter().enumerate() {
            let p = prompt(16, i * 16);
            match rt.forward(
                &[SeqStep {
                    seq,
                    pos: 0,
                    n_tokens: 16,
                    logits: true,
                }],
                ShardInput::Tokens(&p),
            )? {
                ShardOutput::Logits(l) => last.push(argmax(l)),
                ShardOutput::Hidden(_) => bail!("whole model returned hidden states"),
            }
        }
        let vocab = rt.config().vocab;
        let mut batch: Vec<SeqStep> = Vec::with_capacity(n_seqs);
        let t0 = Instant::now();
        for step in 0..steps {
            batch.clear();
            batch.extend(seqs.iter().map(|&seq| SeqStep {
                seq,
                pos: (16 + step) as u32,
                n_tokens: 1,
                logits: true,
            }));
            match rt.forward(&batch, ShardInput::Tokens(&last))? {
                ShardOutput::Logits(l) => {
                    for (i, row) in l.chunks_exact(vocab).enumerate() {
                        last[i] = argmax(row);
                    }
                }
                ShardOutput::Hidden(_) => bail!("whole model returned hidden states"),
            }
        }
        let tps = (n_seqs * steps) as f64 / t0.elapsed().as_secs_f64();
        for seq in seqs {
            rt.release(seq);
        }
        Ok(tps)
    };
    let decode_b1_tps = best_of(repeats, || decode(&mut rt, 1, 128))?;
    let decode_b8_tps = best_of(repeats, || decode(&mut rt, 8, 64))?;
    Ok(Figures {
        engine: "shoal".into(),
        threads,
        load_ms,
        prefill_128_tps,
        prefill_512_tps,
        prefill_2k_tps,
        decode_b1_tps,
        decode_b8_tps,
        peak_rss_mib: peak_rss_mib(),
        model_bytes: model.file_bytes() as u64,
    })
}

fn run_child(cmd: &mut Command) -> Result<Figures> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON in the output")?;
    serde_json::from_str(line).with_context(|| format!("parsing {line}"))
}

/// Runs `shoal model bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let path = catalog::resolve(&args.model, true)?;
    if args.child {
        let threads = args.threads.first().copied().unwrap_or(1);
        let f = measure(&path, threads, args.repeats)?;
        println!("{}", serde_json::to_string(&f)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    println!(
        "model {} ({:.1} MiB)",
        path.display(),
        std::fs::metadata(&path)?.len() as f64 / (1 << 20) as f64
    );
    println!(
        "{:<8} {:>7} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "engine",
        "threads",
        "load ms",
        "prefill128",
        "prefill512",
        "prefill2k",
        "decode b1",
        "decode b8",
        "peak MiB"
    );
    for &threads in &args.threads {
        let shoal = run_child(
            Command::new(&exe)
                .args(["model", "bench", "--child", "--model"])
                .arg(&path)
                .args([
                    "--threads",
                    &threads.to_string(),
                    "--repeats",
                    &args.repeats.to_string(),
                ]),
        )?;
        print_row(&shoal);
        if args.no_reference {
            continue;
        }
        let reference = run_child(
            Command::new("python3")
                .arg(&args.reference)
                .arg("--model")
                .arg(&path)
                .args([
                    "--threads",
                    &threads.to_string(),
                    "--repeats",
                    &args.repeats.to_string(),
                ]),
        )?;
        print_row(&reference);
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        println!(
            "{:<8} {:>7} {:>9.2} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>10.2}",
            "ratio",
            threads,
            r(shoal.load_ms, reference.load_ms),
            r(shoal.prefill_128_tps, reference.prefill_128_tps),
            r(shoal.prefill_512_tps, reference.prefill_512_tps),
            r(shoal.prefill_2k_tps, reference.prefill_2k_tps),
            r(shoal.decode_b1_tps, reference.decode_b1_tps),
            r(shoal.decode_b8_tps, reference.decode_b8_tps),
            r(shoal.peak_rss_mib, reference.peak_rss_mib),
        );
    }
    println!(
        "(prefill and decode in tokens/s; ratio = shoal / llama.cpp; higher is better except load ms and peak MiB)"
    );
    Ok(())
}

fn print_row(f: &Figures) {
    println!(
        "{:<8} {:>7} {:>9.1} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>10.1}",
        f.engine,
        f.threads,
        f.load_ms,
        f.prefill_128_tps,
        f.prefill_512_tps,
        f.prefill_2k_tps,
        f.decode_b1_tps,
        f.decode_b8_tps,
        f.peak_rss_mib
    );
}
