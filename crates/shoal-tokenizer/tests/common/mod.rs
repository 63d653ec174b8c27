//! Shared helpers of the integration tests: locating the reference model and turning its
//! tokenizer metadata into a `TokenizerSpec`, and reading the golden files.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_gguf::GgufFile;
use shoal_tokenizer::{TokenizerDefaults, TokenizerSpec};

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the reference model lives: `$SHOAL_MODEL_DIR` or `~/.cache/shoal/models`.
pub fn model_path() -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/shoal/models")
        });
    let path = dir.join(MODEL_FILE);
    assert!(
        path.exists(),
        "reference model {} not found: run `shoal model fetch` (or set SHOAL_MODEL_DIR)",
        path.display()
    );
    path
}

/// The tokenizer metadata of a GGUF file, the way `shoal-model` reads it.
pub fn spec_from_gguf(path: &Path) -> TokenizerSpec {
    let file = GgufFile::open(path).unwrap();
    let m = file.metadata();
    let strings = |key: &str| -> Vec<String> {
        m.get_str_array(key)
            .unwrap()
            .map(|a| a.iter().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let model = m.require_str("tokenizer.ggml.model").unwrap().to_owned();
    let pre = m.get_str("tokenizer.ggml.pre").unwrap().map(str::to_owned);
    // Missing keys take llama.cpp's defaults.
    let defaults = TokenizerDefaults::for_model(&model, pre.as_deref());
    let flag = |key: &str, default: bool| m.get_bool(key).unwrap().unwrap_or(default);
    TokenizerSpec {
        model,
        pre,
        tokens: strings("tokenizer.ggml.tokens"),
        scores: m
            .get_f32_array("tokenizer.ggml.scores")
            .unwrap()
            .map(<[f32]>::to_vec),
        token_types: m
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .map(<[i32]>::to_vec),
        merges: strings("tokenizer.ggml.merges"),
        bos: m
            .get_u32("tokenizer.ggml.bos_token_id")
            .unwrap()
            .or(defaults.bos),
        eos: m
            .get_u32("tokenizer.ggml.eos_token_id")
            .unwrap()
            .or(defaults.eos),
        eot: m.get_u32("tokenizer.ggml.eot_token_id").unwrap(),
        unk: m
            .get_u32("tokenizer.ggml.unknown_token_id")
            .unwrap()
            .or(defaults.unk),
        pad: m.get_u32("tokenizer.ggml.padding_token_id").unwrap(),
        add_bos: flag("tokenizer.ggml.add_bos_token", defaults.add_bos),
        add_eos: flag("tokenizer.ggml.add_eos_token", defaults.add_eos),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix", defaults.add_space_prefix),
        chat_template: m
            .get_str("tokenizer.chat_template")
            .unwrap()
            .map(str::to_owned),
    }
}

/// The SmolLM2 tokenizer metadata, with `tokenizer.ggml.pre` replaced by `pre` when given.
pub fn smollm_spec(pre: Option<&str>) -> TokenizerSpec {
    let mut spec = spec_from_gguf(&model_path());
    if let Some(pre) = pre {
        spec.pre = Some(pre.to_owned());
    }
    spec
}

/// One recorded tokenization.
#[derive(Deserialize, Debug)]
pub struct Case {
    pub text: String,
    pub add_special: bool,
    pub parse_special: bool,
    pub ids: Vec<u32>,
    pub decoded: String,
    pub decoded_skip_special: String,
}

/// A synthetic vocabulary committed with its golden file.
#[derive(Deserialize, Debug)]
pub struct SpmVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    pub bos: u32,
    pub eos: u32,
    pub unk: u32,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

impl SpmVocab {
    pub fn spec(&self) -> TokenizerSpec {
        TokenizerSpec {
            model: "llama".into(),
            pre: Some("default".into()),
            tokens: self.tokens.clone(),
            scores: Some(self.scores.clone()),
            token_types: Some(self.token_types.clone()),
            merges: Vec::new(),
            bos: Some(self.bos),
            eos: Some(self.eos),
            eot: None,
            unk: Some(self.unk),
            pad: None,
            add_bos: self.add_bos,
            add_eos: self.add_eos,
            add_space_prefix: self.add_space_prefix,
            chat_template: None,
        }
    }
}

/// A golden file written by scripts/reference/tokenizer_golden.py.
#[derive(Deserialize, Debug)]
pub struct Golden {
    pub source: String,
    pub pre: Option<String>,
    /// Tokens appended to the SmolLM2 vocabulary for this file (rewritten-pre copies only).
    #[serde(default)]
    pub extra_tokens: Vec<String>,
    /// Merge rules appended likewise.
    #[serde(default)]
    pub extra_merges: Vec<String>,
    pub vocab: Option<SpmVocab>,
    pub eog_ids: Vec<u32>,
    pub cases: Vec<Case>,
    /// `[id, hex of the piece bytes]`.
    pub pieces: Vec<(u32, String)>,
}

impl Golden {
    /// The tokenizer spec this byte-level BPE golden file was recorded with.
    pub fn bpe_spec(&self) -> TokenizerSpec {
        let mut spec = smollm_spec(self.pre.as_deref());
        spec.tokens.extend(self.extra_tokens.iter().cloned());
        if let Some(types) = &mut spec.token_types {
            types.extend(self.extra_tokens.iter().map(|_| 1));
        }
        spec.merges.extend(self.extra_merges.iter().cloned());
        spec
    }
}

pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

pub fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(data_path(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}
