//! `shoal model keygen / encrypt / decrypt / manifest / verify` as operators run them, and
//! `shoal generate` on an encrypted model (key file or `SHOAL_MODEL_KEY`) printing exactly what
//! the plain model prints; a tampered file is refused with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_synth::SynthSpec;
use std::path::Path;
use std::process::{Command, Output};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

fn shoal(home: &Path, args: &[&str]) -> Output {
    Command::new(SHOAL)
        .args(args)
        .env("SHOAL_HOME", home)
        .env_remove("SHOAL_MODEL_KEY")
        .env_remove("SHOAL_MODEL_KEY_FILE")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn err(out: Output) -> String {
    assert!(!out.status.success(), "unexpectedly succeeded");
    String::from_utf8(out.stderr).unwrap()
}

fn generate_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "the quick brown fox",
        "--max-tokens",
        "16",
        "--threads",
        "1",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn encrypted_models_generate_what_plain_ones_do_and_tampering_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let model = home.join("tiny.gguf");
    shoal_synth::write_model(&SynthSpec::tiny_llama(), &model).unwrap();
    let model_s = model.to_str().unwrap();
    let key = home.join("model.key");
    let key_s = key.to_str().unwrap();
    let enc = home.join("tiny.gguf.enc");
    let enc_s = enc.to_str().unwrap();

    let plain_text = ok(shoal(home, &generate_args(model_s, &[])));
    assert!(!plain_text.trim().is_empty());

    ok(shoal(home, &["model", "keygen", "--out", key_s]));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(err(shoal(home, &["model", "keygen", "--out", key_s])).contains("model.key"));

    let printed = ok(shoal(
        home,
        &[
            "model",
            "encrypt",
            model_s,
            "--key-file",
            key_s,
            "--chunk-size",
            "16384",
            "--manifest",
        ],
    ));
    assert_eq!(printed.trim(), enc_s);
    assert!(home.join("tiny.gguf.enc.manifest.json").exists());
    assert!(
        err(shoal(
            home,
            &["model", "encrypt", model_s, "--key-file", key_s]
        ))
        .contains("exists")
    );
    assert!(
        err(shoal(
            home,
            &[
                "model",
                "encrypt",
                enc_s,
                "--key-file",
                key_s,
                "--out",
                "/tmp/x"
            ]
        ))
        .contains("already encrypted")
    );

    // The key file, or the key itself in the environment.
    let with_file = ok(shoal(
        home,
        &generate_args(enc_s, &["--model-key-file", key_s]),
    ));
    assert_eq!(with_file, plain_text);
    let hex_key = hex::encode(std::fs::read(&key).unwrap());
    let with_env = Command::new(SHOAL)
        .args(generate_args(enc_s, &[]))
        .env("SHOAL_HOME", home)
        .env("SHOAL_MODEL_KEY", &hex_key)
        .output()
        .unwrap();
    assert_eq!(ok(with_env), plain_text);

    // No key: a clear error that says how to give one.
    let e = err(shoal(home, &generate_args(enc_s, &[])));
    assert!(
        e.contains("encrypted") && e.contains("--model-key-file") && e.contains("SHOAL_MODEL_KEY"),
        "{e}"
    );
    // The wrong key.
    let other = home.join("other.key");
    ok(shoal(
        home,
        &["model", "keygen", "--out", other.to_str().unwrap()],
    ));
    let e = err(shoal(
        home,
        &generate_args(enc_s, &["--model-key-file", other.to_str().unwrap()]),
    ));
    assert!(e.contains("wrong key"), "{e}");

    // Info says what it opened.
    let info = ok(shoal(
        home,
        &["model", "info", enc_s, "--model-key-file", key_s],
    ));
    assert!(
        info.contains("aes-256-gcm") && info.contains("manifest"),
        "{info}"
    );

    // The operator's decrypt gives back the original bytes.
    let back = home.join("back.gguf");
    ok(shoal(
        home,
        &[
            "model",
            "decrypt",
            enc_s,
            "--out",
            back.to_str().unwrap(),
            "--model-key-file",
            key_s,
        ],
    ));
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&model).unwrap()
    );

    // A manifest for the plain file; verify passes, then a flipped byte is named.
    let manifest = ok(shoal(
        home,
        &["model", "manifest", model_s, "--model-id", "tiny"],
    ));
    assert!(manifest.trim().ends_with("tiny.gguf.manifest.json"));
    assert!(ok(shoal(home, &["model", "verify", model_s])).starts_with("ok"));
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&model, &bytes).unwrap();
    let e = err(shoal(home, &["model", "verify", manifest.trim()]));
    assert!(e.contains("tiny.gguf") && e.contains("sha256"), "{e}");
    let e = err(shoal(home, &generate_args(model_s, &[])));
    assert!(e.contains("tiny.gguf") && e.contains("manifest"), "{e}");

    // A flipped byte in the encrypted file: its manifest and its tags both refuse it.
    let mut bytes = std::fs::read(&enc).unwrap();
    let at = bytes.len() - 40;
    bytes[at] ^= 1;
    std::fs::write(&enc, &bytes).unwrap();
    let e = err(shoal(
        home,
        &generate_args(enc_s, &["--model-key-file", key_s]),
    ));
    assert!(
        e.contains("failed authentication") || e.contains("sha256"),
        "{e}"
    );
    std::fs::remove_file(home.join("tiny.gguf.enc.manifest.json")).unwrap();
    let e = err(shoal(
        home,
        &generate_args(enc_s, &["--model-key-file", key_s]),
    ));
    assert!(e.contains("failed authentication"), "{e}");
}
