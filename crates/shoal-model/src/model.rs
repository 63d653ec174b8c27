//! A loaded model: the GGUF file (memory-mapped, or owned when it was decrypted into memory),
//! its validated shape, its tokenizer and chat template. Shards for any layer range are cut
//! from it without copying weights.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::exec::{CpuShard, ShardOptions};
use shoal_gguf::GgufFile;
use shoal_kernels::ThreadPool;
use shoal_tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerDefaults, TokenizerSpec};
use shoal_types::LayerRange;
use std::path::Path;
use std::sync::Arc;

/// A model ready to run.
#[derive(Debug)]
pub struct Model {
    file: Arc<GgufFile>,
    cfg: ModelConfig,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
}

/// What a prompt is made of.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized as is (special-token text is not interpreted).
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

impl Model {
    /// Opens and validates a GGUF model file (memory-mapped: nothing is copied).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Validates a model held in memory (e.g. decrypted, never written to disk); the same
    /// checks as [`Model::open`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, ModelError> {
        Self::from_file(GgufFile::from_bytes(bytes)?)
    }

    /// Validates a parsed model file, for example one decrypted into memory.
    pub fn from_file(file: GgufFile) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(&file)?;
        let spec = tokenizer_spec(&file)?;
        let template = spec
            .chat_template
            .as_deref()
            .map(ChatTemplate::new)
            .transpose()?;
        let tokenizer = Tokenizer::new(spec)?;
        if tokenizer.vocab_size() > cfg.vocab {
            return Err(ModelError::Metadata(format!(
                "tokenizer has {} tokens but the embedding only {} rows",
                tokenizer.vocab_size(),
                cfg.vocab
            )));
        }
        // Bind every layer once so a missing or misshapen tensor is reported at load, not on first use.
        crate::weights::ShardWeights::bind(&file, &cfg, LayerRange::full(cfg.n_layers)?)?;
        Ok(Self {
            file: Arc::new(file),
            cfg,
            tokenizer: Arc::new(tokenizer),
            template,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The parsed file.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// Size of the model file in bytes.
    pub fn file_bytes(&self) -> usize {
        self.file.bytes().len()
    }

    /// A runtime for `range` computing on `pool`.
    pub fn shard(
        &self,
        range: LayerRange,
        pool: Arc<ThreadPool>,
        opts: ShardOptions,
    ) -> Result<CpuShard, ModelError> {
        CpuShard::new(self.file.clone(), self.cfg.clone(), range, pool, opts)
    }

    /// A runtime for the whole model.
    pub fn whole(&self, pool: Arc<ThreadPool>, opts: ShardOptions) -> Result<CpuShard, ModelError> {
        self.shard(LayerRange::full(self.cfg.n_layers)?, pool, opts)
    }

    /// Renders a conversation with the model's chat template, ready for generation.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| ModelError::InvalidRequest("this model has no chat template".into()))?;
        let piece = |id: Option<u32>| -> String {
            id.and_then(|id| self.tokenizer.token_bytes(id).ok())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        Ok(template.render(
            messages,
            true,
            &piece(self.tokenizer.bos()),
            &piece(self.tokenizer.eos()),
        )?)
    }

    /// Tokenizes a prompt: chat prompts are rendered and their special tokens parsed; the
    /// model's BOS is added when its metadata asks for it.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, ModelError> {
        let tokens = match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true, false)?,
            Prompt::Chat(messages) => {
                let text = self.render_chat(messages)?;
                // The template writes BOS itself where the model wants it.
                self.tokenizer.encode(&text, false, true)?
            }
        };
        if tokens.is_empty() {
            return Err(ModelError::InvalidRequest("the prompt is empty".into()));
        }
        Ok(tokens)
    }
}

fn tokenizer_spec(file: &GgufFile) -> Result<TokenizerSpec, ModelError> {
    let md = file.metadata();
    let id = |key: &str| md.get_u32(key);
    let model = md.require_str("tokenizer.ggml.model")?.to_owned();
    let pre = md.get_str("tokenizer.ggml.pre")?.map(str::to_owned);
    // Keys a file leaves out take the values llama.cpp assumes for that kind of tokenizer.
    let d = TokenizerDefaults::for_model(&model, pre.as_deref());
    Ok(TokenizerSpec {
        tokens: md
            .require_str_array("tokenizer.ggml.tokens")?
            .iter()
            .map(str::to_owned)
            .collect(),
        scores: md
            .get_f32_array("tokenizer.ggml.scores")?
            .map(<[f32]>::to_vec),
        token_types: md
            .get_i32_array("tokenizer.ggml.token_type")?
            .map(<[i32]>::to_vec),
        merges: md
            .get_str_array("tokenizer.ggml.merges")?
            .map(|m| m.iter().map(str::to_owned).collect())
            .unwrap_or_default(),
        bos: id("tokenizer.ggml.bos_token_id")?.or(d.bos),
        eos: id("tokenizer.ggml.eos_token_id")?.or(d.eos),
        eot: id("tokenizer.ggml.eot_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?.or(d.unk),
        pad: id("tokenizer.ggml.padding_token_id")?,
        add_bos: md
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(d.add_bos),
        add_eos: md
            .get_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(d.add_eos),
        add_space_prefix: md
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(d.add_space_prefix),
        chat_template: md.get_str("tokenizer.chat_template")?.map(str::to_owned),
        model,
        pre,
    })
}
