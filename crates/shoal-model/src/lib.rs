//! The model worker: runs GGUF language models (Llama and Qwen2 families) on the CPU, one layer
//! range at a time, with a KV cache per sequence.
//!
//! Owns: model shape validation ([`ModelConfig`]), tensor binding, the layer-range executor
//! ([`CpuShard`] behind the [`ShardRuntime`] trait), sampling, stop strings and a single-sequence
//! generation loop, and opening a model at rest ([`open_model`]: decrypted into memory when
//! encrypted, checked against its manifest). Must not do I/O beyond opening a model file, nor
//! depend on an async runtime or a transport: callers run it on dedicated compute threads.
//!
//! Invariants: a range `[a, b)` followed by `[b, c)` computes exactly what `[a, c)` computes (the
//! same code runs both); a malformed model or a bad batch is an error value, never a panic.

mod config;
mod error;
mod exec;
mod generate;
mod kv;
mod model;
mod open;
mod sampling;
mod stop;
mod weights;

pub use config::{Arch, ModelConfig, RopeStyle};
pub use error::ModelError;
pub use exec::{CpuShard, SeqStep, ShardInput, ShardOptions, ShardOutput, ShardRuntime};
pub use generate::{FinishReason, GenerateOptions, Generation, generate};
pub use kv::KvSnapshot;
pub use model::{Model, Prompt};
pub use open::{ManifestCheck, OpenOptions, OpenReport, open_model, open_model_with};
pub use sampling::{Sampler, SamplingParams, argmax};
pub use shoal_kernels::ThreadPool;
pub use shoal_tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
pub use shoal_vault::KeyProvider;
pub use stop::{StopMatcher, StopScan};
