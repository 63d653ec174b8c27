//! Prints how long opening (mapping + parsing) a GGUF file takes.
//! Usage: `cargo run --release -p shoal-gguf --example open_time -- <file.gguf>`

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: open_time <file.gguf>")?;
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let t = Instant::now();
        let f = shoal_gguf::GgufFile::open(&path)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        best = best.min(ms);
        std::hint::black_box(&f);
    }
    let f = shoal_gguf::GgufFile::open(&path)?;
    println!(
        "{path}: {} tensors, {} metadata entries, open best of 20: {best:.2} ms",
        f.tensors().len(),
        f.metadata().len()
    );
    Ok(())
}
