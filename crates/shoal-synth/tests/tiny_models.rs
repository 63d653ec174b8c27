//! The tiny presets write complete models that shoal-gguf reads back with every tensor and
//! key llama.cpp needs, and writing is deterministic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;

use sha2::{Digest, Sha256};
use shoal_gguf::{GgmlType, GgufFile};
use shoal_synth::{Arch, SynthError, SynthSpec, VocabSpec, write_model};

fn write(spec: &SynthSpec, dir: &Path) -> GgufFile {
    let path = dir.join(format!("{}.gguf", spec.name));
    write_model(spec, &path).unwrap();
    GgufFile::open(&path).unwrap()
}

fn check_model(spec: &SynthSpec, f: &GgufFile) {
    let arch = spec.arch.name();
    let m = f.metadata();
    assert_eq!(f.architecture().unwrap(), arch);
    assert_eq!(m.require_str("general.name").unwrap(), spec.name);
    let key = |k: &str| format!("{arch}.{k}");
    assert_eq!(m.require_usize(&key("block_count")).unwrap(), spec.n_layers);
    assert_eq!(
        m.require_usize(&key("embedding_length")).unwrap(),
        spec.hidden
    );
    assert_eq!(
        m.require_usize(&key("feed_forward_length")).unwrap(),
        spec.ffn
    );
    assert_eq!(
        m.require_usize(&key("attention.head_count")).unwrap(),
        spec.n_heads
    );
    assert_eq!(
        m.require_usize(&key("attention.head_count_kv")).unwrap(),
        spec.n_kv_heads
    );
    assert_eq!(
        m.require_usize(&key("context_length")).unwrap(),
        spec.context_length
    );
    assert_eq!(
        m.require_f32(&key("rope.freq_base")).unwrap(),
        spec.rope_base
    );
    assert_eq!(
        m.require_f32(&key("attention.layer_norm_rms_epsilon"))
            .unwrap(),
        spec.rms_norm_eps
    );

    assert_eq!(m.require_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(
        m.require_str("tokenizer.ggml.pre").unwrap(),
        spec.arch.tokenizer_pre()
    );
    let tokens = m.require_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), spec.vocab.size());
    assert_eq!(
        tokens.to_vec()[..3],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    let types = m.require_i32_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!(&types[..4], &[3, 3, 3, 1]);
    assert!(m.require_str_array("tokenizer.ggml.merges").unwrap().len() >= 200);
    assert_eq!(m.require_u32("tokenizer.ggml.bos_token_id").unwrap(), 0);
    assert_eq!(m.require_u32("tokenizer.ggml.eos_token_id").unwrap(), 0);
    assert!(!m.require_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert!(
        m.require_str("tokenizer.chat_template")
            .unwrap()
            .contains("<|im_start|>")
    );

    let h = spec.hidden as u64;
    let hd = spec.head_dim() as u64;
    let (q, kv, ffn, vocab) = (
        spec.n_heads as u64 * hd,
        spec.n_kv_heads as u64 * hd,
        spec.ffn as u64,
        spec.vocab.size() as u64,
    );
    let expect = |name: &str, dtype: GgmlType, dims: &[u64]| {
        let t = f.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.info.dtype, dtype, "{name}");
        assert_eq!(t.info.dims, dims, "{name}");
    };
    expect("token_embd.weight", spec.embed_dtype, &[h, vocab]);
    expect("output_norm.weight", GgmlType::F32, &[h]);
    let mut expected_count = 2;
    if spec.tied_output {
        assert!(f.tensor_info("output.weight").is_none());
    } else {
        expect("output.weight", spec.embed_dtype, &[h, vocab]);
        expected_count += 1;
    }
    let w = spec.weight_dtype;
    for i in 0..spec.n_layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        expect(&n("attn_norm.weight"), GgmlType::F32, &[h]);
        expect(&n("attn_q.weight"), w, &[h, q]);
        expect(&n("attn_k.weight"), w, &[h, kv]);
        expect(&n("attn_v.weight"), w, &[h, kv]);
        expect(&n("attn_output.weight"), w, &[q, h]);
        expect(&n("ffn_norm.weight"), GgmlType::F32, &[h]);
        expect(&n("ffn_gate.weight"), w, &[h, ffn]);
        expect(&n("ffn_up.weight"), w, &[h, ffn]);
        expect(&n("ffn_down.weight"), w, &[ffn, h]);
        expected_count += 9;
        if spec.arch == Arch::Qwen2 {
            expect(&n("attn_q.bias"), GgmlType::F32, &[q]);
            expect(&n("attn_k.bias"), GgmlType::F32, &[kv]);
            expect(&n("attn_v.bias"), GgmlType::F32, &[kv]);
            expected_count += 3;
        } else {
            assert!(f.tensor_info(&n("attn_q.bias")).is_none());
        }
    }
    assert_eq!(f.tensors().len(), expected_count);

    // Norm weights are near 1, matrices are not all zero.
    let norm = f.tensor("output_norm.weight").unwrap();
    for c in norm.data.chunks_exact(4) {
        let x = f32::from_le_bytes(c.try_into().unwrap());
        assert!((0.85..=1.15).contains(&x), "norm weight {x}");
    }
    assert!(
        f.tensor("blk.0.ffn_up.weight")
            .unwrap()
            .data
            .iter()
            .any(|&b| b != 0)
    );
}

#[test]
fn tiny_llama_writes_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::tiny_llama();
    check_model(&spec, &write(&spec, dir.path()));
}

#[test]
fn tiny_qwen2_writes_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::tiny_qwen2();
    let f = write(&spec, dir.path());
    check_model(&spec, &f);
    // Biases are small.
    let bias = f.tensor("blk.0.attn_k.bias").unwrap();
    for c in bias.data.chunks_exact(4) {
        assert!(f32::from_le_bytes(c.try_into().unwrap()).abs() < 0.05);
    }
}

#[test]
fn writing_is_deterministic_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::tiny_qwen2();
    let a = dir.path().join("a.gguf");
    let b = dir.path().join("b.gguf");
    let c = dir.path().join("c.gguf");
    write_model(&spec, &a).unwrap();
    write_model(&spec, &b).unwrap();
    write_model(
        &SynthSpec {
            seed: spec.seed + 1,
            ..spec.clone()
        },
        &c,
    )
    .unwrap();
    let (a, b, c) = (
        std::fs::read(a).unwrap(),
        std::fs::read(b).unwrap(),
        std::fs::read(c).unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
    assert!(!dir.path().join("a.gguf.partial").exists());
}

#[test]
fn spec_round_trips_through_json() {
    for name in SynthSpec::PRESETS {
        let spec = SynthSpec::preset(name).unwrap();
        spec.validate().unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        let back: SynthSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
    }
}

#[test]
fn invalid_specs_are_refused_without_leaving_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let cases: [(&str, SynthSpec); 5] = [
        (
            "n_heads",
            SynthSpec {
                n_heads: 3,
                ..SynthSpec::tiny_llama()
            },
        ),
        (
            "n_kv_heads",
            SynthSpec {
                n_kv_heads: 3,
                ..SynthSpec::tiny_llama()
            },
        ),
        (
            "weight_dtype",
            SynthSpec {
                weight_dtype: GgmlType::Q4K,
                ..SynthSpec::tiny_llama()
            },
        ),
        (
            "weight_dtype",
            SynthSpec {
                weight_dtype: GgmlType::Q8K,
                ..SynthSpec::tiny_llama()
            },
        ),
        (
            "vocab",
            SynthSpec {
                vocab: VocabSpec::Bytes {
                    merges: 10,
                    size: 100,
                },
                ..SynthSpec::tiny_llama()
            },
        ),
    ];
    for (field, spec) in cases {
        match write_model(&spec, &path) {
            Err(SynthError::InvalidSpec { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: unexpected {other:?}"),
        }
        assert!(!path.exists());
    }
}

/// Golden files record a spec and the SHA-256 of the model it produced when llama.cpp's logits
/// were taken; regenerating must give the identical file, or the logits no longer apply.
#[test]
fn golden_models_regenerate_identically() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
    let dir = tempfile::tempdir().unwrap();
    for preset in ["tiny_llama", "tiny_qwen2"] {
        let file = golden.join(format!("{preset}_logits.json"));
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (make it with scripts/reference/make_synth_golden.py)",
                file.display()
            )
        });
        let g: serde_json::Value = serde_json::from_str(&text).unwrap();
        let spec: SynthSpec = serde_json::from_value(g["spec"].clone()).unwrap();
        assert_eq!(
            spec,
            SynthSpec::preset(preset).unwrap(),
            "{preset} preset changed"
        );
        let path = dir.path().join(format!("{preset}.gguf"));
        write_model(&spec, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes.len() as u64,
            g["model_bytes"].as_u64().unwrap(),
            "{preset}"
        );
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            g["model_sha256"].as_str().unwrap(),
            "{preset}: regenerated model differs from the one the golden logits came from"
        );
        let f = GgufFile::open(&path).unwrap();
        let vocab = spec.vocab.size();
        let logits = g["logits"].as_array().unwrap();
        assert_eq!(logits.len(), g["prompt_tokens"].as_array().unwrap().len());
        assert!(
            logits
                .iter()
                .all(|row| row.as_array().unwrap().len() == vocab)
        );
        assert_eq!(
            f.metadata()
                .require_str_array("tokenizer.ggml.tokens")
                .unwrap()
                .len(),
            vocab
        );
    }
}

/// The 1B preset streams to disk with real Llama 3.2 1B shapes (about 830 MB, seconds to write
/// in release builds).
#[test]
#[ignore = "writes an 830 MB file; run with `cargo test --release -p shoal-synth -- --ignored`"]
fn llama_1b_streams_with_real_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::llama_1b();
    let f = write(&spec, dir.path());
    check_model(&spec, &f);
    assert_eq!(f.tensors().len(), 2 + 16 * 9);
    assert_eq!(
        f.tensor_info("blk.15.ffn_down.weight").unwrap().dims,
        [8192, 2048]
    );
}
