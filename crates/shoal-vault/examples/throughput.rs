//! In-memory throughput of the manifest hash and of encryption and decryption (no disk), best
//! of several runs.
//!
//! Usage: `cargo run --release -p shoal-vault --example throughput -- [file | size-in-MB] [runs]`
//! (default: 100 MB of patterned bytes, 5 runs).

use std::time::Instant;

use shoal_vault::{Algorithm, EncryptOptions, Key, StaticKeyProvider, decrypt, encrypt};

fn best(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "100".into());
    let runs: usize = args.next().map_or(Ok(5), |r| r.parse())?;
    let data = match what.parse::<usize>() {
        Ok(mb) => (0..mb << 20).map(|i| (i * 131 + i / 977) as u8).collect(),
        Err(_) => std::fs::read(&what)?,
    };
    let mb = data.len() as f64 / 1e6;
    let report = |name: &str, secs: f64| {
        println!("{name:<34} {:>8.1} ms  {:>6.0} MB/s", secs * 1e3, mb / secs);
    };
    println!("{mb:.1} MB, best of {runs}");
    report(
        "sha256",
        best(runs, || {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, &data));
        }),
    );
    let key = Key::generate()?;
    let keys = StaticKeyProvider::new(key.clone());
    for alg in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
        let opts = EncryptOptions {
            algorithm: alg,
            ..EncryptOptions::default()
        };
        let mut sealed = Vec::with_capacity(data.len() + (data.len() >> 10) + 256);
        let enc = best(runs, || {
            sealed.clear();
            let r = encrypt(&data[..], data.len() as u64, &mut sealed, &key, &opts);
            std::hint::black_box(r.is_ok());
        });
        report(&format!("encrypt {}", alg.name()), enc);
        let dec = best(runs, || {
            let plain = decrypt(&sealed[..], Some(sealed.len() as u64), Some(&keys));
            std::hint::black_box(plain.map(|p| p.len()).unwrap_or(0));
        });
        report(&format!("decrypt {} (into a new buffer)", alg.name()), dec);
    }
    Ok(())
}
