//! The node agent: what runs on each machine of a shoal cluster.
//!
//! An [`Agent`] measures its machine ([`measure_capability`]), joins the coordinator and keeps
//! its lease with heartbeats that report load, capability and shard states, loads and unloads
//! the shards each heartbeat answer assigns, and serves them: over gRPC on the data plane
//! (`shoal.v1.Node`, mutual TLS) and, when configured, over its own OpenAI-compatible HTTP
//! endpoint with `/metrics`, `/healthz` and `/readyz`.
//!
//! Owns the bridge between clients' requests (prompts, sampling parameters) and the engine
//! (token ids, sampler settings): tokenizing, context checks, error classification, in one
//! code path ([`LocalBackend::prepare`]) for both front doors. Must not hold cluster-wide
//! state: what to serve comes from the coordinator, whole.
//!
//! An enrolled node ([`enroll`], [`Agent::start_renewing`]) holds a certificate it got with
//! a join token for a key it generated, and renews it while running.
//!
//! Invariants: a generation whose client goes away (dropped stream, passed deadline) is
//! cancelled and its KV cache freed; a shard leaves the table before it is unloaded, and is
//! dropped only after its in-flight generations end; bad input from a client or a peer is an
//! error value with a class and a reason, never a panic.

mod agent;
pub mod capability;
mod checkpoint;
mod config;
mod control;
mod core;
mod enroll;
mod http;
pub mod link_metrics;
mod local;
pub mod metrics;
mod service;
mod shards;
mod stage;

pub use agent::Agent;
pub use capability::{CapabilityOptions, measure_capability};
pub use checkpoint::{CheckpointCounters, CheckpointPlan, CheckpointSource};
pub use config::{AgentConfig, AgentError, ConfigProblem, ModelFile};
pub use control::ControlState;
pub use enroll::{EnrollConfig, EnrollError, Renewal, enroll, renewal_due};
pub use link_metrics::{LatencySnapshot, LinkMetrics, LinkTotals, Peer, PeerTotals};
pub use local::{
    LocalBackend, LocalBackendConfig, MAX_STOP_STRINGS, NodePrompt, NodeRequest, engine_error,
};
pub use metrics::NodeMetrics;
pub use service::GenerateStream;
pub use shards::LoadError;

/// Sleeps until `at`, or forever when there is none (a deadline that may be unset, in a
/// `select!`).
pub(crate) async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
