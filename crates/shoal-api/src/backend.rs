//! The seam between the HTTP gateway and whatever produces tokens.
//!
//! The gateway must not know about models, kernels or the cluster. It hands a validated,
//! transport-neutral [`GenerateRequest`] to an [`InferenceBackend`] and consumes a bounded stream
//! of [`GenerateEvent`]s. A local engine on one node and the cluster's router implement the same
//! trait, so the HTTP layer is tested once against a scripted double and reused unchanged.
//!
//! The trait is object safe (`Arc<dyn InferenceBackend>` is what the router state holds), which
//! is why `generate` returns a boxed future rather than being an `async fn`.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use shoal_types::{ErrorClass, ModelId, RequestId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A boxed, sendable future borrowing from `'a`; the return type of [`InferenceBackend::generate`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that serves tokens: a local engine or the cluster's router.
///
/// # Event contract
///
/// A successful [`generate`](InferenceBackend::generate) returns a receiver on which the backend
/// sends, in order: one [`GenerateEvent::Started`], zero or more [`GenerateEvent::Token`]s, and
/// exactly one terminal event ([`GenerateEvent::Finished`] or [`GenerateEvent::Failed`]); then it
/// drops its sender. The channel must be bounded so a slow client applies back-pressure.
/// Before the terminal event it may also send [`GenerateEvent::Path`], any number of times
/// (the last one counts), and [`GenerateEvent::Resumed`] before the first token after each
/// failover; the gateway only records them in the audit log.
///
/// # Cancellation
///
/// The gateway cancels `cancel` when the client goes away (connection closed, response body
/// dropped) or the server is shutting down, and it may also simply drop the receiver. Either must
/// stop the generation and free its resources (KV cache, queue slot) everywhere it runs.
/// A backend that notices cancellation while the receiver is still alive should send
/// `Finished { reason: FinishReason::Cancelled, .. }`, but it may also just drop the sender.
pub trait InferenceBackend: Send + Sync + 'static {
    /// The models this backend can serve right now. Called on every request that names a model,
    /// so it should be cheap (a snapshot, not a network round trip).
    fn models(&self) -> Vec<ModelCard>;

    /// Whether the backend can take requests (`GET /readyz`). Process liveness is separate.
    fn readiness(&self) -> Readiness;

    /// Starts a generation. The returned future resolves once the request is accepted (queued or
    /// running); failures to accept are returned as [`BackendError`]s and rendered as HTTP errors.
    /// Failures after acceptance arrive as [`GenerateEvent::Failed`].
    fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<mpsc::Receiver<GenerateEvent>, BackendError>>;
}

/// A model as `GET /v1/models` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    /// The name clients put in `"model"`.
    pub id: ModelId,
    /// Who publishes the model (OpenAI's `owned_by`).
    pub owned_by: String,
    /// When the model became available, in seconds since the Unix epoch.
    pub created: u64,
    /// Maximum number of tokens (prompt plus completion) in one sequence.
    pub context_length: u32,
}

/// The backend's answer to "can you take requests?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Requests can be served.
    Ready,
    /// Requests cannot be served yet (loading weights, no healthy nodes).
    NotReady {
        /// A stable, operator-facing reason such as `loading_model`; never a secret.
        reason: Cow<'static, str>,
    },
}

/// One validated generation request, independent of which HTTP endpoint it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The request's id, carried through every hop for tracing.
    pub request_id: RequestId,
    /// The model to run; the gateway has checked it appears in [`InferenceBackend::models`].
    pub model: ModelId,
    /// What to continue: raw text, or chat messages the backend renders with its template.
    pub prompt: Prompt,
    /// Upper bound on generated tokens; `None` means "until the context is full".
    pub max_tokens: Option<u32>,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Generation stops (with [`FinishReason::Stop`]) before any of these strings would be
    /// emitted; the matched text is not sent. At most four, none empty.
    pub stop: Vec<String>,
}

/// Sampling knobs, as OpenAI (and vLLM for the non-OpenAI ones) name them. `None` means "the
/// backend's default"; the gateway has already range-checked every `Some`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature in `[0, 2]`; 0 means greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in `(0, 1]`.
    pub top_p: Option<f32>,
    /// Keep only the `k` most likely tokens; at least 1.
    pub top_k: Option<u32>,
    /// Drop tokens whose probability is below `min_p` times the top token's, in `[0, 1]`.
    pub min_p: Option<f32>,
    /// Multiplicative penalty on already-seen tokens (1 = off), greater than 0.
    pub repetition_penalty: Option<f32>,
    /// Additive penalty proportional to a token's count so far, in `[-2, 2]`.
    pub frequency_penalty: Option<f32>,
    /// Additive penalty on any token seen so far, in `[-2, 2]`.
    pub presence_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
}

/// The input of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// A raw prompt (`/v1/completions`), continued as is.
    Text(String),
    /// A conversation (`/v1/chat/completions`), rendered by the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// What was said (text parts already joined).
    pub content: String,
}

/// The speaker of a [`ChatMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions for the assistant (OpenAI's `system` and its newer name `developer`).
    System,
    /// The human.
    User,
    /// The model, earlier in the conversation.
    Assistant,
}

impl Role {
    /// The role's name as chat templates and the wire protocol write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// What a backend reports while generating.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// The prompt was accepted and tokenised.
    Started {
        /// Number of prompt tokens after templating.
        prompt_tokens: u32,
    },
    /// One generated token. `text` is valid UTF-8 on its own: a backend holds back the bytes of
    /// a character split across tokens and may therefore send an empty `text`.
    Token {
        /// The text this token adds to the completion.
        text: String,
        /// The token's id in the model's vocabulary.
        token_id: u32,
    },
    /// The generation ended normally or was cancelled.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Token counts for billing and the response's `usage`.
        usage: Usage,
    },
    /// The generation failed after it had been accepted.
    Failed(BackendError),
    /// Which nodes serve this generation, in pipeline order (optional; a later `Path` replaces
    /// an earlier one, for instance after a retry on another replica). Recorded in the audit
    /// log, otherwise ignored.
    Path {
        /// Node names, first stage first (after a failover, those of every path served so
        /// far, in order).
        nodes: Vec<String>,
        /// How many times the generation has moved to another node so far.
        failovers: u32,
    },
    /// The generation moved to another node (one or more times in a row) and the next token
    /// follows: what the client waited for because of it. Recorded in the audit log,
    /// otherwise ignored.
    Resumed(ResumeStall),
}

/// How long a client's stream stood still because its generation moved to another node, and
/// what part of that the new node spent computing the context again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeStall {
    /// Moves before the token came (a node that took the generation over may be lost too).
    pub moves: u32,
    /// From the last token the client had (or the request's start, when it had none) to the
    /// first token after the move: the silence the client saw.
    pub stall: Duration,
    /// From the loss being noticed to that token.
    pub recovery: Duration,
    /// From the start of the new node's prefill of the generation (prompt and tokens already
    /// sent, less what a checkpoint restored) to that token: the re-prefill. The rest of
    /// `recovery` is reconnecting and waiting for the node's compute.
    pub reprefill: Duration,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The cancellation token fired.
    Cancelled,
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the (templated) prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

impl Usage {
    /// Prompt plus completion tokens, saturating rather than wrapping.
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// A classified failure of a backend, ready to be rendered to a client.
///
/// `class` picks the HTTP status; `reason` is a stable machine-readable code (rendered as the
/// OpenAI error's `code`, e.g. `prompt_too_long`); `message` must be safe to show to clients.
/// For [`ErrorClass::Internal`] the gateway replaces the message with a generic one anyway and
/// only logs the backend's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} ({reason}): {message}")]
pub struct BackendError {
    /// What kind of failure this is.
    pub class: ErrorClass,
    /// Stable reason code, `snake_case`.
    pub reason: Cow<'static, str>,
    /// Human-readable description, safe for clients.
    pub message: String,
}

impl BackendError {
    /// Builds an error from its three parts.
    pub fn new(
        class: ErrorClass,
        reason: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            class,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn total_tokens_saturates() {
        let usage = Usage {
            prompt_tokens: u32::MAX,
            completion_tokens: 5,
        };
        assert_eq!(usage.total_tokens(), u32::MAX);
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        };
        assert_eq!(usage.total_tokens(), 7);
    }

    #[test]
    fn backend_error_display_names_class_and_reason() {
        let err = BackendError::new(ErrorClass::Unavailable, "no_healthy_nodes", "try later");
        assert_eq!(err.to_string(), "unavailable (no_healthy_nodes): try later");
    }

    // The router state stores `Arc<dyn InferenceBackend>`; this fails to compile if the trait
    // stops being object safe.
    #[allow(dead_code)]
    fn assert_object_safe(_: &dyn InferenceBackend) {}
}
