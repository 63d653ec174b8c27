//! Tokenizers and chat templates built from a model's own metadata.
//!
//! This crate owns turning text into token ids and back, for the two tokenizer families GGUF
//! models use: byte-level BPE (`tokenizer.ggml.model = "gpt2"`, with the pre-tokenizer named by
//! `tokenizer.ggml.pre`) and SentencePiece-style (`"llama"`). It also renders the Jinja chat
//! template a model ships. It does not read files: [`TokenizerSpec`] is filled by whoever reads
//! the model (`shoal-model`), which keeps this crate free of the file format; keys a file leaves
//! out take [`TokenizerDefaults`].
//!
//! Invariants:
//! - Encoding follows llama.cpp token for token (greedy generations are compared against it), so
//!   where llama.cpp and other tokenizer implementations differ, llama.cpp wins: special tokens
//!   are carved out longest first, user-defined tokens are matched even without
//!   `parse_special`, bytes a byte-level vocabulary has no token for are dropped, characters new
//!   in Unicode 16 are classified as llama.cpp's Unicode 15 tables do.
//! - Decoding concatenates token pieces, as llama.cpp's server streams them (no clean-up of
//!   spaces before punctuation), and only replaces invalid UTF-8 at the very end.
//! - Nothing reachable from model metadata, input text, token ids or templates panics: every
//!   failure is a [`TokenizerError`].
//! - A [`Tokenizer`] is immutable once built and can be shared across threads.
//!
//! ```
//! use shoal_tokenizer::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer, TokenizerSpec};
//!
//! // A byte-level BPE vocabulary: letters, the space character `Ġ`, two merges, one marker.
//! let mut tokens: Vec<String> = ('a'..='z').map(String::from).collect();
//! tokens.extend(["Ġ", "hi", "Ġhi", "<|end|>"].map(String::from));
//! let tokenizer = Tokenizer::new(TokenizerSpec {
//!     model: "gpt2".into(),
//!     pre: Some("gpt-2".into()),
//!     tokens,
//!     merges: vec!["h i".into(), "Ġ hi".into()],
//!     ..TokenizerSpec::default()
//! })?;
//! let ids = tokenizer.encode("hi hi<|end|>", false, true)?;
//! assert_eq!(ids, [27, 28, 29]);
//! assert!(tokenizer.is_end_of_generation(29));
//!
//! let mut stream = StreamDecoder::new(&tokenizer, true);
//! let text: String = ids.iter().map(|&id| stream.push(id)).collect::<Result<_, _>>()?;
//! assert_eq!(text + &stream.finish(), "hi hi");
//!
//! let template = ChatTemplate::new(
//!     "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}\n{% endfor %}",
//! )?;
//! let prompt = template.render(&[ChatMessage::new("user", " Hi ")], true, "", "")?;
//! assert_eq!(prompt, "<user>Hi\n");
//! # Ok::<(), shoal_tokenizer::TokenizerError>(())
//! ```

mod bpe;
mod bytes;
mod chat;
mod error;
mod hash;
mod pretokenize;
mod pyjson;
mod spec;
mod special;
mod spm;
mod stream;
mod tokenizer;
mod vocab;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::TokenizerError;
pub use spec::{TokenType, TokenizerDefaults, TokenizerSpec};
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;
