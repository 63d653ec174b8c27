//! The plain description a tokenizer is built from. It mirrors the `tokenizer.*` GGUF metadata
//! keys but knows nothing about GGUF: `shoal-model` fills it from a file, tests fill it from JSON.

/// Everything needed to build a [`crate::Tokenizer`], as found in a model's metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece-style).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer of a byte-level BPE vocabulary (`"smollm"`,
    /// `"llama-bpe"`, `"qwen2"`, `"gpt-2"`, `"default"`, ...). `None` means `"default"`, as in
    /// llama.cpp. Ignored for SentencePiece vocabularies.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the text of every token, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: merge priority of SentencePiece pieces (higher merges first).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: GGUF token types (see [`TokenType::from_gguf`]); `None`
    /// makes every token normal.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: byte-level BPE merge rules `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn).
    pub eot: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: prepend BOS when encoding with `add_special`.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`: append EOS when encoding with `add_special`.
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix`: SentencePiece only, prefix text with a space.
    pub add_space_prefix: bool,
    /// `tokenizer.chat_template`: the Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
}

/// What llama.cpp assumes for tokenizer metadata a model file leaves out. Whoever fills a
/// [`TokenizerSpec`] from a file should fall back to these for missing keys, or tokenization
/// will differ from llama.cpp's (a SentencePiece file without `add_bos_token`, for instance,
/// still gets a BOS there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizerDefaults {
    /// For a missing `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// For a missing `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// For a missing `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// For a missing `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// For a missing `tokenizer.ggml.add_eos_token`.
    pub add_eos: bool,
    /// For a missing `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: bool,
}

impl TokenizerDefaults {
    /// The defaults for a `tokenizer.ggml.model` / `tokenizer.ggml.pre` pair. Byte-level BPE
    /// defaults BOS and EOS to token 11 (a llama.cpp legacy) and adds BOS only for Llama 3 style
    /// pre-tokenizers; SentencePiece defaults to ids 1/2/0 with BOS and a space prefix.
    pub fn for_model(model: &str, pre: Option<&str>) -> Self {
        match model {
            "llama" => Self {
                bos: Some(1),
                eos: Some(2),
                unk: Some(0),
                add_bos: true,
                add_eos: false,
                add_space_prefix: true,
            },
            "gpt2" => Self {
                bos: Some(11),
                eos: Some(11),
                unk: None,
                add_bos: crate::pretokenize::adds_bos_by_default(pre.unwrap_or("default")),
                add_eos: false,
                add_space_prefix: false,
            },
            _ => Self {
                bos: None,
                eos: None,
                unk: None,
                add_bos: false,
                add_eos: false,
                add_space_prefix: false,
            },
        }
    }
}

/// What a token is, from `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Type 0 or any value GGUF does not define: rendered as nothing, never special.
    Undefined,
    /// Type 1: ordinary text.
    Normal,
    /// Type 2: the unknown token; special (hidden when decoding with `skip_special`).
    Unknown,
    /// Type 3: control tokens such as BOS, EOS and chat markers; special.
    Control,
    /// Type 4: user-defined tokens, always matched verbatim in text and rendered verbatim.
    UserDefined,
    /// Type 5: unused slots, rendered as nothing.
    Unused,
    /// Type 6: SentencePiece byte tokens `<0xXX>`.
    Byte,
}

impl TokenType {
    /// Maps a GGUF token type number; unknown numbers become [`TokenType::Undefined`], which is
    /// how llama.cpp treats them.
    pub fn from_gguf(value: i32) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// True for tokens only rendered when special tokens are wanted (control and unknown).
    pub fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }

    /// True for tokens matched verbatim in input text before pre-tokenization.
    pub(crate) fn is_matched_verbatim(self) -> bool {
        matches!(self, Self::Control | Self::Unknown | Self::UserDefined)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_llama_cpp() {
        // Observed with llama.cpp on vocabulary-only files stripped of these keys.
        let spm = TokenizerDefaults::for_model("llama", None);
        assert_eq!((spm.bos, spm.eos, spm.unk), (Some(1), Some(2), Some(0)));
        assert!(spm.add_bos && spm.add_space_prefix && !spm.add_eos);
        for (pre, add_bos) in [
            ("smollm", false),
            ("llama-bpe", true),
            ("qwen2", false),
            ("gpt-2", false),
        ] {
            let bpe = TokenizerDefaults::for_model("gpt2", Some(pre));
            assert_eq!(
                (bpe.bos, bpe.eos, bpe.add_bos),
                (Some(11), Some(11), add_bos),
                "{pre}"
            );
        }
        assert!(!TokenizerDefaults::for_model("gpt2", None).add_bos);
    }
}
