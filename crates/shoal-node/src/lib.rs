//! The node agent: what runs on each machine. Today it serves one whole model on this machine
//! through the batching engine ([`LocalBackend`]); joining a coordinator, heartbeats, and shard
//! assignments build on it.
//!
//! Owns the bridge between clients' requests (prompts, OpenAI sampling parameters) and the
//! engine (token ids, sampler settings): tokenizing, context checks, error classification.

mod local;

pub use local::{LocalBackend, LocalBackendConfig};
