//! Continuous batching over a [`ShardRuntime`] running a whole model, on one dedicated compute
//! thread.
//!
//! Each step batches one decode token of every active sequence with a chunk of at most one
//! prompt being prefilled, so new requests join between steps and a long prompt does not stall
//! the others. Channels are bounded: a full command queue refuses new work
//! ([`EngineError::Busy`]), and a sequence whose client reads slowly is simply not scheduled
//! until its event channel has room. A cancelled request or a dropped receiver frees the
//! sequence's KV cache at the next step.
//!
//! Must not do network I/O; async callers talk to it through channels only.

mod engine;

pub use engine::{
    BATCH_BUCKETS, BatchHistogram, BatchSnapshot, CheckpointCursor, CheckpointSink, Downstream,
    Engine, EngineConfig, EngineError, EngineEvent, EngineRequest, EngineStats, HeadSlice,
    HeadStep, Opened, RouteTag, TailEvent, TailSender, Usage,
};
