//! The OpenAI-compatible HTTP gateway of shoal.
//!
//! It owns the HTTP surface (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/healthz`, `/readyz`, `/metrics`): strict request parsing and validation, admission
//! (a semaphore that answers 429 instead of queueing), SSE streaming, OpenAI error rendering,
//! request ids, tracing spans and metrics; and client access control around it: API keys from
//! a key file ([`keys`]) with per-key rate limits and token quotas, HTTPS ([`tls`]), and a
//! hash-chained audit log ([`audit`]).
//!
//! It must not depend on model or cluster code: tokens come from an [`InferenceBackend`], which a
//! local engine or the cluster router implements.
//!
//! Invariants:
//! - every [`ErrorClass`](shoal_types::ErrorClass) maps to HTTP in exactly one function,
//!   [`http_status_and_type`]; operator detail of internal errors never reaches a client;
//! - every admitted request runs under its own child
//!   [`CancellationToken`](tokio_util::sync::CancellationToken), cancelled when the client
//!   disconnects;
//! - labels of metrics come from closed enums only;
//! - once keys are required, no `/v1` request reaches the backend without a valid, unrevoked
//!   key, and with an audit log no generation request is served without its audit entry.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn demo(backend: Arc<dyn shoal_api::InferenceBackend>) -> Result<(), shoal_api::ApiError> {
//! use tokio_util::sync::CancellationToken;
//! let config = shoal_api::ApiConfig::default();
//! let listener = tokio::net::TcpListener::bind(config.bind)
//!     .await
//!     .map_err(|source| shoal_api::ApiError::Serve { source })?;
//! let state = shoal_api::ApiState::try_new(config, backend, CancellationToken::new())?;
//! shoal_api::serve(listener, shoal_api::router(state), CancellationToken::new()).await
//! # }
//! ```

pub mod audit;
mod auth;
mod backend;
mod body;
mod config;
mod error;
mod generate;
pub mod keys;
pub mod metrics;
/// The metrics library the gateway registers with (for [`metrics::Metrics::with_extension`]).
pub use prometheus_client;
mod routes;
mod server;
mod state;
pub mod tls;
mod tracker;
mod validate;
mod wire;

pub use backend::{
    BackendError, BoxFuture, ChatMessage, FinishReason, GenerateEvent, GenerateRequest,
    InferenceBackend, ModelCard, Prompt, Readiness, ResumeStall, Role, SamplingParams, Usage,
};
pub use config::{ApiConfig, ConfigProblem};
pub use error::{ApiError, RequestError, http_status_and_type, reason};
pub use routes::{REQUEST_ID_HEADER, router};
pub use server::{serve, serve_gateway};
pub use state::ApiState;
