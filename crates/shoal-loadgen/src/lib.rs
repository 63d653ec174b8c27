//! Clients of shoal's OpenAI-compatible gateway: the `shoal bench` load generator, the
//! `shoal chat` interactive client, and `shoal chaos-report`, which compares a recorded run
//! under faults with a fault-free recording of the same requests.
//!
//! The crate owns the client side of the HTTP API: request bodies, SSE parsing, model
//! discovery, per-request measurements (time to first token, inter-token gaps, end-to-end
//! latency, output tokens, bytes on the wire), nearest-rank percentiles and the bench report.
//! It speaks only HTTP to a base URL (plain `http://`; this build has no TLS) and must not
//! depend on the gateway, the engine or the model: anything that serves the OpenAI API can be
//! measured.
//!
//! Invariants:
//! - a server reply never panics the client: every status, body, stream and framing problem
//!   becomes a [`RequestFailure`], which a load run counts by HTTP status and error code;
//! - a load run stops by itself (request count or duration) and on its
//!   [`CancellationToken`](tokio_util::sync::CancellationToken); requests in flight at that
//!   point are cancelled (connection dropped) and reported as cancelled, never as ok or failed;
//! - memory per request is bounded (events and bodies have size limits), and failures are
//!   tallied, not stored one by one;
//! - API keys never appear in `Debug` output.
//!
//! Measurement definitions:
//! - **TTFT**: from just before the request is handed to the client to the arrival of the
//!   first SSE chunk whose content is non-empty (the role-only first chunk does not count);
//! - **inter-token latency**: the gaps between consecutive content chunks (shoal's gateway
//!   sends one chunk per token; chunks arriving in the same read have a gap of zero);
//! - **end-to-end**: to the end of the body (after `data: [DONE]` for streams);
//! - **output tokens**: `usage.completion_tokens` (streams request
//!   `stream_options.include_usage`); without a usage object, the number of content chunks;
//! - **bytes on the wire**: an HTTP/1.1 reconstruction — request line, headers as sent
//!   (including `host` and `content-length`), body; status line, headers, body bytes after
//!   de-chunking. Chunk framing and TCP/TLS overhead are not counted.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_loadgen::LoadError> {
//! use shoal_loadgen::{LoadConfig, StopAfter, run_load};
//! use tokio_util::sync::CancellationToken;
//! let cfg = LoadConfig {
//!     url: "http://127.0.0.1:8080/v1".into(),
//!     concurrency: 4,
//!     stop: StopAfter::Requests(32),
//!     ..LoadConfig::default()
//! };
//! let report = run_load(cfg, CancellationToken::new()).await?;
//! print!("{}", report.render_text());
//! # Ok(()) }
//! ```

mod bench;
mod chaos;
mod chat;
mod client;
mod prompts;
mod record;
mod report;
mod sse;
mod stats;

pub use bench::{BenchArgs, ConfigProblem, LoadConfig, LoadError, StopAfter, run_bench, run_load};
pub use chaos::{
    AuditPath, ChaosReport, ChaosReportArgs, ChaosReportError, FailedRequest, FaultEvent,
    FaultKind, KillOutcome, SlowOutcome, longest_silence_ms, run_chaos_report,
};
pub use chat::{ChatArgs, run_chat};
pub use client::{ApiKey, BadReply, DEFAULT_URL, Endpoint, ModelsError, RequestFailure};
pub use prompts::{
    ChatMessage, Prompt, PromptsError, builtin_prompts, load_prompts, parse_prompts,
};
pub use record::{RecordOutcome, RecordingError, RequestRecord, read_recording, write_recording};
pub use report::{ErrorGroup, LoadReport, RequestSample};
pub use stats::{LatencySummary, nearest_rank};
