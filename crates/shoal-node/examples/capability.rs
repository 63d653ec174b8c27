//! Prints what the agent would report about this machine, and how long measuring took.
//!
//! `cargo run --release -p shoal-node --example capability -- [--threads N] MODEL.gguf...`

use shoal_node::{CapabilityOptions, ModelFile, measure_capability};
use shoal_types::ModelId;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--threads" {
            match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => threads = n,
                None => {
                    eprintln!("--threads needs a number");
                    std::process::exit(2);
                }
            }
            continue;
        }
        let path = PathBuf::from(&a);
        let id = path
            .file_stem()
            .map_or_else(|| a.clone(), |s| s.to_string_lossy().into_owned());
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        models.push(ModelFile {
            id: ModelId::new(id),
            path,
            sha256: String::new(),
            bytes,
        });
    }
    let opts = CapabilityOptions {
        threads,
        memory_budget: None,
        benchmark: true,
    };
    for m in &models {
        let t = Instant::now();
        match shoal_model::Model::open(&m.path) {
            Ok(_) => println!("{}: opened in {} ms", m.id, t.elapsed().as_millis()),
            Err(e) => println!("{}: {e}", m.id),
        }
    }
    let started = Instant::now();
    let cap = measure_capability(&models, &opts);
    let took = started.elapsed();
    println!(
        "cores {}  threads {}  memory {:.2} GiB total, {:.2} GiB available",
        cap.cores,
        cap.threads,
        cap.memory_total_bytes as f64 / (1u64 << 30) as f64,
        cap.memory_available_bytes as f64 / (1u64 << 30) as f64
    );
    println!("cpu features: {}", cap.cpu_features.join(" "));
    match cap.battery_percent {
        Some(b) => println!("battery {b:.0}%"),
        None => println!("no battery"),
    }
    match cap.temperature_celsius {
        Some(t) => println!("hottest thermal zone {t:.1} °C"),
        None => println!("no thermal zone"),
    }
    for s in &cap.speeds {
        println!(
            "{}: {:.1} decode tokens/s, {:.3} ms per layer, {:.3} ms head, {:.1} MiB per layer",
            s.model_id,
            s.decode_tokens_per_second,
            s.layer_decode_seconds * 1e3,
            s.head_seconds * 1e3,
            s.layer_bytes as f64 / (1u64 << 20) as f64
        );
    }
    println!("measured in {} ms", took.as_millis());
}
