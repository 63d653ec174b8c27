//! Models at rest: a manifest beside the file is checked before load (a flipped byte or a
//! truncated file is refused with the file and both values), an encrypted file decrypts into
//! memory and generates exactly what the plain file does, and every damage to it is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_model::{
    GenerateOptions, ManifestCheck, Model, ModelError, OpenOptions, Prompt, SamplingParams,
    ShardOptions, ThreadPool, open_model, open_model_with,
};
use shoal_synth::SynthSpec;
use shoal_types::SeqId;
use shoal_vault::{
    EncryptOptions, Key, Manifest, ManifestError, StaticKeyProvider, VaultError, encrypt_file,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tiny(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    shoal_synth::write_model(&SynthSpec::tiny_llama(), &path).unwrap();
    path
}

fn greedy(model: &Model) -> Vec<u32> {
    let mut rt = model
        .whole(
            Arc::new(ThreadPool::new(1).unwrap()),
            ShardOptions::default(),
        )
        .unwrap();
    let prompt = model
        .encode(&Prompt::Text("the quick brown fox".into()))
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 24,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    shoal_model::generate(&mut rt, model.tokenizer(), SeqId(1), &prompt, &opts, |_| {
        true
    })
    .unwrap()
    .tokens
}

fn vault_err(e: ModelError) -> VaultError {
    match e {
        ModelError::Vault(v) => v,
        other => panic!("expected a vault error, got {other}"),
    }
}

fn copy_with(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(src).unwrap();
    edit(&mut bytes);
    std::fs::write(dst, bytes).unwrap();
}

#[test]
fn a_sidecar_manifest_is_checked_and_damage_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path());
    let reference = greedy(&open_model(&path, None).unwrap());

    let manifest_path = Manifest::sidecar_path(&path);
    Manifest::describe(&[&path], Some("tiny".into()), Some("1".into()))
        .unwrap()
        .write(&manifest_path)
        .unwrap();
    let (model, report) = open_model_with(&path, &OpenOptions::default()).unwrap();
    assert!(!report.encrypted);
    assert_eq!(report.manifest.as_deref(), Some(manifest_path.as_path()));
    assert!(model.file().is_mapped(), "a plain file stays memory-mapped");
    assert_eq!(greedy(&model), reference);

    // One flipped byte in the middle of the weights.
    let original = std::fs::read(&path).unwrap();
    copy_with(&path, &path, |b| {
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
    });
    let err = vault_err(open_model(&path, None).unwrap_err());
    let VaultError::Manifest(ManifestError::HashMismatch {
        file,
        expected,
        actual,
    }) = &err
    else {
        panic!("{err}")
    };
    assert_eq!(file, &path);
    assert_ne!(expected, actual);
    let text = err.to_string();
    assert!(
        text.contains("tiny.gguf") && text.contains(expected) && text.contains(actual),
        "{text}"
    );

    // Truncated by a few bytes.
    std::fs::write(&path, &original[..original.len() - 5]).unwrap();
    let err = vault_err(open_model(&path, None).unwrap_err());
    assert!(
        matches!(
            &err,
            VaultError::Manifest(ManifestError::SizeMismatch { expected, actual, .. })
                if *expected == original.len() as u64 && *actual == original.len() as u64 - 5
        ),
        "{err}"
    );

    // Skipping the check opens what is there (and the GGUF reader catches the truncation).
    let opts = OpenOptions {
        manifest: ManifestCheck::Skip,
        ..OpenOptions::default()
    };
    assert!(matches!(
        open_model_with(&path, &opts).unwrap_err(),
        ModelError::File(_)
    ));

    // A manifest that does not list the file, and an unreadable one, are errors too.
    std::fs::write(&path, &original).unwrap();
    let other = dir.path().join("other.gguf");
    std::fs::write(&other, b"x").unwrap();
    let wrong = dir.path().join("wrong.json");
    Manifest::describe(&[&other], None, None)
        .unwrap()
        .write(&wrong)
        .unwrap();
    let opts = OpenOptions {
        manifest: ManifestCheck::File(&wrong),
        ..OpenOptions::default()
    };
    assert!(matches!(
        vault_err(open_model_with(&path, &opts).unwrap_err()),
        VaultError::Manifest(ManifestError::NotListed { .. })
    ));
    std::fs::write(&manifest_path, b"{not json").unwrap();
    assert!(matches!(
        vault_err(open_model(&path, None).unwrap_err()),
        VaultError::Manifest(ManifestError::Parse { .. })
    ));
}

#[test]
fn an_encrypted_model_generates_what_the_plain_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path());
    let plain = open_model(&path, None).unwrap();
    let reference = greedy(&plain);

    let enc = dir.path().join("tiny.gguf.enc");
    let key = Key::generate().unwrap();
    encrypt_file(
        &path,
        &enc,
        &key,
        &EncryptOptions {
            chunk_size: 16 << 10, // several chunks even for a tiny model
            ..EncryptOptions::default()
        },
    )
    .unwrap();
    let keys = StaticKeyProvider::new(key);

    let (model, report) = open_model_with(
        &enc,
        &OpenOptions {
            keys: Some(&keys),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(report.encrypted && report.manifest.is_none());
    assert!(!model.file().is_mapped(), "decrypted into memory");
    assert_eq!(model.file().bytes(), plain.file().bytes());
    assert_eq!(greedy(&model), reference);

    // With a manifest of the encrypted file beside it.
    Manifest::describe(&[&enc], None, None)
        .unwrap()
        .write(Manifest::sidecar_path(&enc))
        .unwrap();
    let model = open_model(&enc, Some(&keys)).unwrap();
    assert_eq!(greedy(&model), reference);

    // Model::from_bytes takes the same path.
    let owned = Model::from_bytes(std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(greedy(&owned), reference);
}

#[test]
fn damaged_encrypted_models_and_wrong_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path());
    let enc = dir.path().join("tiny.enc");
    let key = Key::generate().unwrap();
    let opts = EncryptOptions {
        chunk_size: 16 << 10,
        ..EncryptOptions::default()
    };
    encrypt_file(&path, &enc, &key, &opts).unwrap();
    let keys = StaticKeyProvider::new(key);
    let bad = dir.path().join("bad.enc");
    let open_bad = || vault_err(open_model(&bad, Some(&keys)).unwrap_err());

    assert!(matches!(
        vault_err(open_model(&enc, None).unwrap_err()),
        VaultError::KeyRequired { .. }
    ));
    let other = StaticKeyProvider::new(Key::generate().unwrap());
    assert!(matches!(
        vault_err(open_model(&enc, Some(&other)).unwrap_err()),
        VaultError::WrongKey { .. }
    ));

    copy_with(&enc, &bad, |b| {
        let at = b.len() - 100;
        b[at] ^= 1;
    });
    assert!(matches!(open_bad(), VaultError::ChunkRejected { .. }));

    copy_with(&enc, &bad, |b| b.truncate(b.len() - 1));
    assert!(matches!(open_bad(), VaultError::Truncated { .. }));

    copy_with(&enc, &bad, |b| b.extend_from_slice(&[0; 16]));
    assert!(matches!(open_bad(), VaultError::TrailingData { .. }));

    let header = 100 + "default".len();
    let span = (16 << 10) + 16;
    copy_with(&enc, &bad, |b| {
        let first = b[header..header + span].to_vec();
        b.copy_within(header + span..header + 2 * span, header);
        b[header + span..header + 2 * span].copy_from_slice(&first);
    });
    assert!(matches!(
        open_bad(),
        VaultError::ChunkRejected { index: 0, .. }
    ));

    // A plain model given a key opens as before.
    assert!(open_model(&path, Some(&keys)).is_ok());
}
