//! Model hyper-parameters read from GGUF metadata, validated once at load.

use crate::ModelError;
use shoal_gguf::GgufFile;

/// Supported transformer families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM, TinyLlama, Llama 3.x: RMSNorm, SwiGLU, rotary embedding on adjacent pairs.
    Llama,
    /// Qwen2: like Llama, with biases on Q, K and V and rotary embedding on split halves.
    Qwen2,
}

impl Arch {
    /// The `general.architecture` value and metadata key prefix.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How rotary position embedding pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)` (GGUF llama weights are permuted for this).
    Adjacent,
    /// Pairs `(i, i + d/2)`.
    Halves,
}

/// The shape of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Transformer blocks.
    pub n_layers: u32,
    /// Residual stream width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Feed-forward inner width.
    pub ffn: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Context window the model was trained for.
    pub context_length: u32,
    /// Rotary base frequency.
    pub rope_base: f32,
    /// Dimensions rotated per head.
    pub rope_dims: usize,
    /// Pairing of rotated dimensions.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
}

impl ModelConfig {
    /// Reads and checks the hyper-parameters in `file`'s metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let md = file.metadata();
        let arch_name = md.require_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(ModelError::UnknownArchitecture(other.to_owned())),
        };
        let p = arch.name();
        let key = |k: &str| format!("{p}.{k}");
        let n_layers = md.require_u32(&key("block_count"))?;
        let hidden = md.require_u32(&key("embedding_length"))? as usize;
        let ffn = md.require_u32(&key("feed_forward_length"))? as usize;
        let n_heads = md.require_u32(&key("attention.head_count"))? as usize;
        let n_kv_heads = md
            .get_u32(&key("attention.head_count_kv"))?
            .map_or(n_heads, |v| v as usize);
        let context_length = md.require_u32(&key("context_length"))?;
        let rope_base = md.get_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let norm_eps = md.require_f32(&key("attention.layer_norm_rms_epsilon"))?;

        let bad = |msg: String| Err(ModelError::Metadata(msg));
        if n_layers == 0 || hidden == 0 || ffn == 0 || n_heads == 0 || n_kv_heads == 0 {
            return bad(format!(
                "zero dimension: layers {n_layers}, hidden {hidden}, ffn {ffn}, heads {n_heads}, kv heads {n_kv_heads}"
            ));
        }
        if n_layers > 1024 || hidden > 65_536 || ffn > 262_144 || n_heads > 1024 {
            return bad(format!(
                "implausible dimensions: layers {n_layers}, hidden {hidden}, ffn {ffn}, heads {n_heads}"
            ));
        }
        if !hidden.is_multiple_of(n_heads) {
            return bad(format!(
                "embedding_length {hidden} is not a multiple of head_count {n_heads}"
            ));
        }
        if !n_heads.is_multiple_of(n_kv_heads) {
            return bad(format!(
                "head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}"
            ));
        }
        let head_dim = hidden / n_heads;
        if !head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {head_dim} is odd"));
        }
        let rope_dims = md
            .get_u32(&key("rope.dimension_count"))?
            .map_or(head_dim, |v| v as usize);
        if rope_dims == 0 || rope_dims > head_dim || rope_dims % 2 != 0 {
            return bad(format!(
                "rope.dimension_count {rope_dims} does not fit head dimension {head_dim}"
            ));
        }
        if context_length == 0 {
            return bad("context_length is 0".into());
        }
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return bad(format!(
                "rope.freq_base {rope_base} is not a positive number"
            ));
        }
        if !(norm_eps.is_finite() && norm_eps > 0.0 && norm_eps < 1.0) {
            return bad(format!("layer_norm_rms_epsilon {norm_eps} is out of range"));
        }
        let embed =
            file.tensor_info("token_embd.weight")
                .ok_or_else(|| ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                })?;
        if embed.dims.len() != 2 || embed.dims[0] != hidden as u64 {
            return Err(ModelError::TensorShape {
                name: "token_embd.weight".into(),
                found: embed.dims.clone(),
                expected: vec![hidden as u64, embed.dims.get(1).copied().unwrap_or(0)],
            });
        }
        let vocab = embed.dims[1] as usize;
        if let Some(v) = md.get_u32(&key("vocab_size"))?
            && v as usize != vocab
        {
            return bad(format!(
                "vocab_size {v} disagrees with token_embd rows {vocab}"
            ));
        }
        Ok(Self {
            arch,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn,
            vocab,
            context_length,
            rope_base,
            rope_dims,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Adjacent,
                Arch::Qwen2 => RopeStyle::Halves,
            },
            norm_eps,
        })
    }

    /// Width of the key (and value) projection: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes of KV cache one token takes in one layer (f16 keys and values).
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        2 * self.kv_dim() * 2
    }
}
