//! Writes a synthetic model and its spec, and reports the time taken.
//!
//! Usage: `cargo run --release -p shoal-synth --example synth -- <preset|spec.json> <out.gguf>`
//! Writes `<out.gguf>` and `<out.gguf>.spec.json` (the spec, enough to regenerate the file).

use std::path::PathBuf;
use std::time::Instant;

use shoal_synth::{SynthSpec, write_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(which), Some(out)) = (args.next(), args.next()) else {
        return Err(format!(
            "usage: synth <preset|spec.json> <out.gguf>; presets: {}",
            SynthSpec::PRESETS.join(", ")
        )
        .into());
    };
    let spec = match SynthSpec::preset(&which) {
        Some(spec) => spec,
        None => serde_json::from_slice(&std::fs::read(&which)?)?,
    };
    let out = PathBuf::from(out);
    let t = Instant::now();
    write_model(&spec, &out)?;
    let secs = t.elapsed().as_secs_f64();
    let mut spec_path = out.clone().into_os_string();
    spec_path.push(".spec.json");
    std::fs::write(&spec_path, serde_json::to_string_pretty(&spec)? + "\n")?;
    let size = std::fs::metadata(&out)?.len();
    println!(
        "{}: {} ({:.1} MB) in {secs:.2} s",
        spec.name,
        out.display(),
        size as f64 / 1e6
    );
    Ok(())
}
