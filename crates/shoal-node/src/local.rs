//! A backend that serves one model on this machine through the continuous-batching engine.

use futures::future::BoxFuture;
use shoal_api::{
    BackendError, ChatMessage as ApiMessage, FinishReason as ApiFinish, GenerateEvent,
    GenerateRequest, InferenceBackend, ModelCard, Prompt as ApiPrompt, Readiness, Role, Usage,
};
use shoal_engine::{Engine, EngineConfig, EngineError, EngineEvent, EngineRequest};
use shoal_model::{
    ChatMessage, FinishReason, GenerateOptions, Model, Prompt, SamplingParams, ShardOptions,
    ThreadPool,
};
use shoal_types::{ErrorClass, ModelId};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings of a [`LocalBackend`].
#[derive(Debug, Clone)]
pub struct LocalBackendConfig {
    /// The name clients use for the model.
    pub model_id: ModelId,
    /// Compute threads.
    pub threads: usize,
    /// Engine limits.
    pub engine: EngineConfig,
    /// Completion length when the client gives none.
    pub default_max_tokens: u32,
}

/// Serves one model from this machine.
#[derive(Debug)]
pub struct LocalBackend {
    cfg: LocalBackendConfig,
    model: Arc<Model>,
    engine: Engine,
    created: u64,
    tasks: TaskTracker,
}

impl LocalBackend {
    /// Starts the engine on `model`.
    pub fn start(model: Arc<Model>, cfg: LocalBackendConfig) -> Result<Self, BackendError> {
        let internal = |e: String| BackendError::new(ErrorClass::Internal, "engine_start", e);
        let pool =
            Arc::new(ThreadPool::new(cfg.threads.max(1)).map_err(|e| internal(e.to_string()))?);
        let rt = model
            .whole(pool, ShardOptions::default())
            .map_err(|e| internal(e.to_string()))?;
        let engine = Engine::start(Box::new(rt), model.tokenizer().clone(), cfg.engine.clone())
            .map_err(|e| internal(e.to_string()))?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Self {
            cfg,
            model,
            engine,
            created,
            tasks: TaskTracker::new(),
        })
    }

    /// The engine, for its live counters.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Waits for every event-forwarding task to end (after their clients are gone).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn prepare(&self, req: &GenerateRequest) -> Result<EngineRequest, BackendError> {
        if req.model != self.cfg.model_id {
            return Err(BackendError::new(
                ErrorClass::NotFound,
                "model_not_found",
                format!("the model `{}` does not exist", req.model),
            ));
        }
        let invalid = |reason: &'static str, msg: String| {
            BackendError::new(ErrorClass::InvalidRequest, reason, msg)
        };
        let prompt = match &req.prompt {
            ApiPrompt::Text(t) => Prompt::Text(t.clone()),
            ApiPrompt::Chat(messages) => Prompt::Chat(messages.iter().map(chat_message).collect()),
        };
        let tokens = self
            .model
            .encode(&prompt)
            .map_err(|e| invalid("invalid_prompt", e.to_string()))?;
        let context = self.model.config().context_length;
        let room = context.saturating_sub(tokens.len() as u32);
        if room == 0 {
            return Err(invalid(
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens; this model's context window is {context}",
                    tokens.len()
                ),
            ));
        }
        let max_tokens = match req.max_tokens {
            Some(m) if m > room => {
                return Err(invalid(
                    "context_length_exceeded",
                    format!(
                        "the prompt ({} tokens) plus max_tokens ({m}) exceed the context window of {context}",
                        tokens.len()
                    ),
                ));
            }
            Some(m) => m,
            None => self.cfg.default_max_tokens.min(room),
        };
        let s = &req.sampling;
        let defaults = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: s.temperature.unwrap_or(defaults.temperature),
            top_k: s.top_k.unwrap_or(defaults.top_k),
            top_p: s.top_p.unwrap_or(defaults.top_p),
            min_p: s.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: s.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            frequency_penalty: s.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: s.presence_penalty.unwrap_or(defaults.presence_penalty),
            seed: s.seed.unwrap_or_else(|| seed_from(req.request_id.as_str())),
            ..defaults
        };
        sampling
            .validate()
            .map_err(|e| invalid("invalid_sampling", e.to_string()))?;
        Ok(EngineRequest {
            id: req.request_id.clone(),
            prompt: tokens,
            options: GenerateOptions {
                max_tokens,
                sampling,
                stop: req.stop.clone(),
                ..GenerateOptions::default()
            },
        })
    }
}

fn chat_message(m: &ApiMessage) -> ChatMessage {
    let role = match m.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    ChatMessage {
        role: role.into(),
        content: m.content.clone(),
    }
}

/// A seed for requests that give none, varying per request (FNV-1a of its id).
fn seed_from(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn engine_error(e: &EngineError) -> BackendError {
    let reason = match e {
        EngineError::Busy { .. } => "engine_busy",
        EngineError::ShutDown => "shutting_down",
        EngineError::Invalid(_) => "invalid_request",
        EngineError::Model(_) => "model_error",
    };
    BackendError::new(e.class(), reason, e.to_string())
}

impl InferenceBackend for LocalBackend {
    fn models(&self) -> Vec<ModelCard> {
        vec![ModelCard {
            id: self.cfg.model_id.clone(),
            owned_by: "shoal".into(),
            created: self.created,
            context_length: self.model.config().context_length,
        }]
    }

    fn readiness(&self) -> Readiness {
        Readiness::Ready
    }

    fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<mpsc::Receiver<GenerateEvent>, BackendError>> {
        Box::pin(async move {
            let ereq = self.prepare(&req)?;
            let mut events = self
                .engine
                .submit(ereq, cancel.clone())
                .map_err(|e| engine_error(&e))?;
            let (tx, rx) = mpsc::channel(64);
            self.tasks.spawn(async move {
                let mut last_id = 0;
                loop {
                    let ev = tokio::select! {
                        // The client is gone: dropping `events` makes the engine free the sequence.
                        () = tx.closed() => break,
                        ev = events.recv() => ev,
                    };
                    let out = match ev {
                        None => break,
                        Some(EngineEvent::Started { prompt_tokens }) => {
                            GenerateEvent::Started { prompt_tokens }
                        }
                        Some(EngineEvent::Token { id, text }) => {
                            last_id = id;
                            GenerateEvent::Token { text, token_id: id }
                        }
                        Some(EngineEvent::Finished {
                            reason,
                            usage,
                            tail,
                        }) => {
                            // Text held back until the end is attributed to the last token.
                            if !tail.is_empty()
                                && tx
                                    .send(GenerateEvent::Token {
                                        text: tail,
                                        token_id: last_id,
                                    })
                                    .await
                                    .is_err()
                            {
                                break;
                            }
                            let reason = match reason {
                                FinishReason::Stop => ApiFinish::Stop,
                                FinishReason::Length => ApiFinish::Length,
                                FinishReason::Cancelled => ApiFinish::Cancelled,
                            };
                            let usage = Usage {
                                prompt_tokens: usage.prompt_tokens,
                                completion_tokens: usage.completion_tokens,
                            };
                            let _ = tx.send(GenerateEvent::Finished { reason, usage }).await;
                            break;
                        }
                        Some(EngineEvent::Failed(e)) => {
                            let _ = tx.send(GenerateEvent::Failed(engine_error(&e))).await;
                            break;
                        }
                    };
                    if tx.send(out).await.is_err() {
                        break;
                    }
                }
            });
            Ok(rx)
        })
    }
}
