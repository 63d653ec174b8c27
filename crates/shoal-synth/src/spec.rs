//! What a synthetic model looks like: architecture, shapes, tensor types, vocabulary and seed,
//! with presets from tiny (milliseconds to write, for hermetic tests) to real-model shapes (for
//! size and speed tests). A spec plus its seed determines the file byte for byte, which is why
//! specs serialize: golden files record the spec they were made from.

use serde::{Deserialize, Serialize};
use shoal_gguf::GgmlType;

use crate::SynthError;

/// Model architecture, as named in `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama: no attention biases.
    Llama,
    /// Qwen2: Llama plus biases on the Q, K and V projections.
    Qwen2,
}

impl Arch {
    /// The `general.architecture` string and metadata key prefix.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// `tokenizer.ggml.pre` used with this architecture's byte-level vocabulary.
    pub fn tokenizer_pre(self) -> &'static str {
        match self {
            Arch::Llama => "smollm",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Whether Q, K and V projections carry biases.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }
}

/// The tokenizer written into the model's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VocabSpec {
    /// GPT-2-style byte-level BPE: three special tokens (`<|endoftext|>`, `<|im_start|>`,
    /// `<|im_end|>`), the 256 byte tokens, up to `merges` merged tokens learned from a fixed
    /// English sample, then `<|extra_N|>` fillers up to `size` tokens in total.
    Bytes {
        /// Merged tokens to learn (fewer if the sample runs out of pairs).
        merges: usize,
        /// Total vocabulary size; must match the embedding shape.
        size: usize,
    },
}

impl VocabSpec {
    /// Total number of tokens.
    pub fn size(&self) -> usize {
        match *self {
            VocabSpec::Bytes { size, .. } => size,
        }
    }
}

/// Serializes a [`GgmlType`] by its llama.cpp name (`q4_0`, `f32`, ...).
mod dtype_name {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};
    use shoal_gguf::GgmlType;

    pub fn serialize<S: Serializer>(t: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GgmlType, D::Error> {
        let name = String::deserialize(d)?;
        GgmlType::WEIGHT_TYPES
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| D::Error::custom(format!("unknown weight type `{name}`")))
    }
}

/// The full description of a synthetic model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthSpec {
    /// Architecture.
    pub arch: Arch,
    /// `general.name`.
    pub name: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Embedding width.
    pub hidden: usize,
    /// Query heads; `hidden / n_heads` is the head dimension.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Feed-forward inner width.
    pub ffn: usize,
    /// Tokenizer and vocabulary size.
    pub vocab: VocabSpec,
    /// `{arch}.context_length`.
    pub context_length: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Type of the per-layer matrices.
    #[serde(with = "dtype_name")]
    pub weight_dtype: GgmlType,
    /// Type of `token_embd.weight` (and of `output.weight` when not tied).
    #[serde(with = "dtype_name")]
    pub embed_dtype: GgmlType,
    /// Whether the output head reuses the token embeddings (no `output.weight`).
    pub tied_output: bool,
    /// Seed of every random weight.
    pub seed: u64,
}

/// Merged tokens in the tiny presets' vocabulary.
const TINY_MERGES: usize = 250;
/// Merged tokens in the big presets' vocabulary (the rest is filler).
const BIG_MERGES: usize = 400;

impl SynthSpec {
    /// A 4-layer Llama, hidden 64, 4 heads (2 KV), FFN 128, 512 tokens, Q4_1 layers with a
    /// Q8_0 tied embedding (the default model's type mix).
    pub fn tiny_llama() -> Self {
        Self {
            arch: Arch::Llama,
            name: "synth-tiny-llama".into(),
            n_layers: 4,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            ffn: 128,
            vocab: VocabSpec::Bytes {
                merges: TINY_MERGES,
                size: 512,
            },
            context_length: 256,
            rope_base: 10000.0,
            rms_norm_eps: 1e-5,
            weight_dtype: GgmlType::Q4_1,
            embed_dtype: GgmlType::Q8_0,
            tied_output: true,
            seed: 0x5107_11A3,
        }
    }

    /// A 3-layer Qwen2 with QKV biases, hidden 64, 4 heads (1 KV), FFN 192, 512 tokens,
    /// Q8_0 layers, F16 embedding and a separate F16 output head.
    pub fn tiny_qwen2() -> Self {
        Self {
            arch: Arch::Qwen2,
            name: "synth-tiny-qwen2".into(),
            n_layers: 3,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 1,
            ffn: 192,
            vocab: VocabSpec::Bytes {
                merges: TINY_MERGES,
                size: 512,
            },
            context_length: 256,
            rope_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            weight_dtype: GgmlType::Q8_0,
            embed_dtype: GgmlType::F16,
            tied_output: false,
            seed: 0x0_2E42,
        }
    }

    /// Llama 3.2 1B shapes: 16 layers, hidden 2048, 32 heads (8 KV), FFN 8192, 128256 tokens,
    /// Q4_0 layers, Q8_0 tied embedding.
    pub fn llama_1b() -> Self {
        Self {
            arch: Arch::Llama,
            name: "synth-llama-1b".into(),
            n_layers: 16,
            hidden: 2048,
            n_heads: 32,
            n_kv_heads: 8,
            ffn: 8192,
            vocab: VocabSpec::Bytes {
                merges: BIG_MERGES,
                size: 128_256,
            },
            context_length: 8192,
            rope_base: 500_000.0,
            rms_norm_eps: 1e-5,
            weight_dtype: GgmlType::Q4_0,
            embed_dtype: GgmlType::Q8_0,
            tied_output: true,
            seed: 1,
        }
    }

    /// Llama 3.2 3B shapes: 28 layers, hidden 3072, 24 heads (8 KV), FFN 8192, 128256 tokens,
    /// Q4_0 layers, Q8_0 tied embedding.
    pub fn llama_3b() -> Self {
        Self {
            name: "synth-llama-3b".into(),
            n_layers: 28,
            hidden: 3072,
            n_heads: 24,
            n_kv_heads: 8,
            seed: 3,
            ..Self::llama_1b()
        }
    }

    /// Qwen2 0.5B shapes: 24 layers, hidden 896, 14 heads (2 KV), FFN 4864, 151936 tokens,
    /// QKV biases, Q4_0 layers (896 is not a multiple of the K-quant block), Q8_0 tied
    /// embedding.
    pub fn qwen2_0_5b() -> Self {
        Self {
            arch: Arch::Qwen2,
            name: "synth-qwen2-0.5b".into(),
            n_layers: 24,
            hidden: 896,
            n_heads: 14,
            n_kv_heads: 2,
            ffn: 4864,
            vocab: VocabSpec::Bytes {
                merges: BIG_MERGES,
                size: 151_936,
            },
            context_length: 32768,
            rope_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            weight_dtype: GgmlType::Q4_0,
            embed_dtype: GgmlType::Q8_0,
            tied_output: true,
            seed: 5,
        }
    }

    /// The preset called `name` (`tiny_llama`, `tiny_qwen2`, `llama_1b`, `llama_3b`,
    /// `qwen2_0_5b`).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "tiny_llama" => Self::tiny_llama(),
            "tiny_qwen2" => Self::tiny_qwen2(),
            "llama_1b" => Self::llama_1b(),
            "llama_3b" => Self::llama_3b(),
            "qwen2_0_5b" => Self::qwen2_0_5b(),
            _ => return None,
        })
    }

    /// Names accepted by [`SynthSpec::preset`].
    pub const PRESETS: [&'static str; 5] = [
        "tiny_llama",
        "tiny_qwen2",
        "llama_1b",
        "llama_3b",
        "qwen2_0_5b",
    ];

    /// Elements per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden.checked_div(self.n_heads).unwrap_or(0)
    }

    /// Checks the shapes are consistent and every matrix row is a whole number of blocks.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad =
            |field: &'static str, reason: String| Err(SynthError::InvalidSpec { field, reason });
        for (field, v) in [
            ("n_layers", self.n_layers),
            ("hidden", self.hidden),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("ffn", self.ffn),
            ("context_length", self.context_length),
        ] {
            if v == 0 {
                return bad(field, "must be positive".into());
            }
            if u32::try_from(v).is_err() {
                return bad(field, format!("{v} does not fit in u32"));
            }
        }
        if !self.hidden.is_multiple_of(self.n_heads) {
            return bad(
                "n_heads",
                format!(
                    "hidden {} is not divisible by {} heads",
                    self.hidden, self.n_heads
                ),
            );
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                "n_kv_heads",
                format!(
                    "{} heads are not divisible by {} KV heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(
                "n_heads",
                format!(
                    "head dimension {} is odd (RoPE needs pairs)",
                    self.head_dim()
                ),
            );
        }
        for (field, t) in [
            ("weight_dtype", self.weight_dtype),
            ("embed_dtype", self.embed_dtype),
        ] {
            if !GgmlType::WEIGHT_TYPES.contains(&t) {
                return bad(field, format!("{t} is not a weight type"));
            }
        }
        for (what, dtype, row) in [
            ("hidden", self.weight_dtype, self.hidden),
            ("ffn", self.weight_dtype, self.ffn),
            ("hidden", self.embed_dtype, self.hidden),
        ] {
            if !row.is_multiple_of(dtype.block_size()) {
                return bad(
                    if dtype == self.weight_dtype {
                        "weight_dtype"
                    } else {
                        "embed_dtype"
                    },
                    format!(
                        "{what} {row} is not a multiple of the {dtype} block size {}",
                        dtype.block_size()
                    ),
                );
            }
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(
                "rope_base",
                format!("{} is not a positive number", self.rope_base),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(
                "rms_norm_eps",
                format!("{} is not a positive number", self.rms_norm_eps),
            );
        }
        match self.vocab {
            VocabSpec::Bytes { size, .. } => {
                let min = crate::vocab::N_SPECIAL + 256;
                if size < min {
                    return bad(
                        "vocab",
                        format!("size {size} is below the {min} special and byte tokens"),
                    );
                }
                if u32::try_from(size).is_err() {
                    return bad("vocab", format!("size {size} does not fit in u32"));
                }
            }
        }
        Ok(())
    }
}
