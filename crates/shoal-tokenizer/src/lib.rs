//! Tokenizers and chat templates built from a model's own metadata.
//!
//! This crate owns turning text into token ids and back, for the two tokenizer families GGUF
//! models use: byte-level BPE (`tokenizer.ggml.model = "gpt2"`, with the pre-tokenizer named by
//! `tokenizer.ggml.pre`) and SentencePiece-style (`"llama"`). It also renders the Jinja chat
//! template a model ships. It does not read files: [`TokenizerSpec`] is filled by whoever reads
//! the model (`shoal-model`), which keeps this crate free of the file format.
//!
//! Invariants:
//! - Encoding follows llama.cpp token for token (greedy generations are compared against it), so
//!   where llama.cpp and other tokenizer implementations differ, llama.cpp wins.
//! - Nothing reachable from model metadata, input text, token ids or templates panics: every
//!   failure is a [`TokenizerError`].
//! - A [`Tokenizer`] is immutable once built and can be shared across threads.

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
