//! The one error type of this crate. Everything a model file or a caller can get wrong is a
//! variant here with the offending values as fields, so callers can classify without parsing
//! messages.

/// Everything that can go wrong building a tokenizer, encoding, decoding or rendering a chat
/// template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// `tokenizer.ggml.model` names a tokenizer family this crate does not implement.
    #[error("unknown tokenizer model type {model:?} (supported: \"gpt2\", \"llama\")")]
    UnknownModel {
        /// The value found in the metadata.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error("unknown pre-tokenizer type {pre:?} for a byte-level BPE vocabulary")]
    UnknownPreTokenizer {
        /// The value found in the metadata.
        pre: String,
    },
    /// The vocabulary has no tokens at all.
    #[error("the vocabulary is empty")]
    EmptyVocabulary,
    /// The vocabulary is too large for 32-bit token ids.
    #[error("the vocabulary has {size} tokens, more than 32-bit token ids can address")]
    VocabularyTooLarge {
        /// Number of tokens in the vocabulary.
        size: usize,
    },
    /// A per-token array (scores, token types) does not have one entry per token.
    #[error("{field} has {actual} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        /// Which array is wrong.
        field: &'static str,
        /// Number of tokens in the vocabulary.
        expected: usize,
        /// Number of entries in the array.
        actual: usize,
    },
    /// A byte-level BPE vocabulary came without merge rules.
    #[error("the byte-level BPE vocabulary has no merge rules")]
    MissingMerges,
    /// A merge rule is not two pieces separated by a space.
    #[error("merge rule {index} ({line:?}) is not two space-separated pieces")]
    BadMerge {
        /// Position of the rule in `tokenizer.ggml.merges`.
        index: usize,
        /// The rule as found.
        line: String,
    },
    /// A special token id (bos, eos, ...) points outside the vocabulary.
    #[error("{role} token id {id} is out of range (the vocabulary has {vocab_size} tokens)")]
    SpecialTokenOutOfRange {
        /// Which special token ("bos", "eos", "eot", "unk", "pad").
        role: &'static str,
        /// The id found in the metadata.
        id: u32,
        /// Number of tokens in the vocabulary.
        vocab_size: usize,
    },
    /// A flag asks for a special token the vocabulary does not define.
    #[error("add_{role} is set but the vocabulary defines no {role} token")]
    MissingSpecialToken {
        /// Which special token ("bos" or "eos").
        role: &'static str,
    },
    /// A token id passed to decoding is not in the vocabulary.
    #[error("token id {id} is out of range (the vocabulary has {vocab_size} tokens)")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Number of tokens in the vocabulary.
        vocab_size: usize,
    },
    /// A pre-tokenizer pattern failed to compile (a bug in this crate, reported rather than
    /// panicking).
    #[error("pre-tokenizer pattern {pattern:?} does not compile")]
    PatternCompile {
        /// The pattern.
        pattern: &'static str,
        /// What the regex engine said.
        #[source]
        source: Box<fancy_regex::Error>,
    },
    /// The pre-tokenizer regex engine gave up on the input (backtracking limit).
    #[error("pre-tokenizer pattern {pattern:?} failed on the input")]
    PreTokenize {
        /// The pattern.
        pattern: &'static str,
        /// What the regex engine said.
        #[source]
        source: Box<fancy_regex::Error>,
    },
    /// SentencePiece byte fallback found neither a `<0xXX>` token, a single-byte token nor an
    /// unknown token for a byte of the input.
    #[error("no token for byte {byte:#04x}: no <0x{byte:02X}> token and no unknown token")]
    NoTokenForByte {
        /// The byte that could not be represented.
        byte: u8,
    },
    /// The chat template does not parse.
    #[error("chat template syntax error{}: {message}", line_suffix(*line))]
    TemplateSyntax {
        /// What the template engine said.
        message: String,
        /// 1-based line in the template, when known.
        line: Option<usize>,
        /// The template engine's error.
        #[source]
        source: minijinja::Error,
    },
    /// Rendering the chat template failed (undefined function, type error, fuel exhausted...).
    #[error("chat template render error{}: {message}", line_suffix(*line))]
    TemplateRender {
        /// What the template engine said.
        message: String,
        /// 1-based line in the template, when known.
        line: Option<usize>,
        /// The template engine's error.
        #[source]
        source: minijinja::Error,
    },
    /// The chat template called `raise_exception(message)`, i.e. it rejects the conversation.
    #[error("chat template rejected the conversation: {message}")]
    TemplateException {
        /// The message the template passed to `raise_exception`.
        message: String,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}
