//! The default model (SmolLM2-135M-Instruct Q4_1) opens and has the expected shape.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::PathBuf;

use shoal_gguf::{GgmlType, GgufFile};

fn model_path() -> PathBuf {
    const NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    if let Some(dir) = std::env::var_os("SHOAL_MODEL_DIR") {
        let p = PathBuf::from(dir).join(NAME);
        if p.exists() {
            return p;
        }
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let p = home.join(".cache/shoal/models").join(NAME);
    assert!(
        p.exists(),
        "default model not found at {} (or $SHOAL_MODEL_DIR): run `shoal model fetch` first",
        p.display()
    );
    p
}

#[test]
fn default_model_opens_with_expected_shape() {
    let f = GgufFile::open(model_path()).unwrap();
    assert!(f.is_mapped());
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.tensors().len(), 272);
    let m = f.metadata();
    assert_eq!(m.require_u32("llama.block_count").unwrap(), 30);
    assert_eq!(m.require_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(m.require_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(m.require_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(m.require_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(m.require_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(m.require_str("tokenizer.ggml.pre").unwrap(), "smollm");

    let tokens = m.require_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens.get(0), Some("<|endoftext|>"));
    assert_eq!(tokens.iter().count(), 49152);
    let types = m.require_i32_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!(types.len(), 49152);

    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.info.dtype, GgmlType::Q8_0);
    assert_eq!(embd.info.dims, vec![576, 49152]);
    assert_eq!(embd.data.len(), 576 / 32 * 34 * 49152);
    let q = f.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.dtype, GgmlType::Q4_1);
    assert_eq!(q.dims, vec![576, 576]);
    let down = f.tensor_info("blk.29.ffn_down.weight").unwrap();
    assert_eq!(down.dims, vec![1536, 576]);
    assert_eq!(f.tensor_info("output.weight"), None);
    let norm = f.tensor("output_norm.weight").unwrap();
    assert_eq!(norm.info.dtype, GgmlType::F32);
    assert_eq!(norm.data.len(), 576 * 4);
    // All tensors are inside the file, in order, after the header.
    for t in f.tensors() {
        assert!(t.offset >= f.data_offset());
        assert_eq!(t.offset % f.alignment(), 0);
        assert!(t.offset + t.n_bytes <= f.bytes().len());
    }
}

#[test]
fn default_model_parses_identically_from_memory() {
    let path = model_path();
    let mapped = GgufFile::open(&path).unwrap();
    let owned = GgufFile::from_bytes(std::fs::read(&path).unwrap()).unwrap();
    assert!(!owned.is_mapped());
    assert_eq!(mapped.metadata(), owned.metadata());
    assert_eq!(mapped.tensors(), owned.tensors());
}
