//! A backend that serves one model on this machine through the continuous-batching engine.
//!
//! Both front doors of a node share one path here: the OpenAI gateway's requests
//! ([`GenerateRequest`]) and the data plane's gRPC requests become a [`NodeRequest`], which
//! [`LocalBackend::prepare`] checks and tokenizes into an engine request (context window,
//! sampling defaults and validation, error classes) and [`LocalBackend::submit`] queues.

use futures::future::BoxFuture;
use shoal_api::{
    BackendError, ChatMessage as ApiMessage, FinishReason as ApiFinish, GenerateEvent,
    GenerateRequest, InferenceBackend, ModelCard, Prompt as ApiPrompt, Readiness,
    SamplingParams as ApiSampling, Usage,
};
use shoal_engine::{Engine, EngineConfig, EngineError, EngineEvent, EngineRequest, RouteTag};
use shoal_model::{
    ChatMessage, FinishReason, GenerateOptions, Model, Prompt, SamplingParams, ShardOptions,
    ThreadPool,
};
use shoal_types::{ErrorClass, ModelId, RequestId};
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most stop strings one request may carry.
pub const MAX_STOP_STRINGS: usize = 16;

/// What a node is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePrompt {
    /// Plain text, tokenized without interpreting special-token text.
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids, checked against the vocabulary.
    Tokens(Vec<u32>),
}

/// A generation request as a node accepts it, whichever front door it came through.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRequest {
    /// For logs and tracing; also seeds sampling when the request gives no seed.
    pub request_id: RequestId,
    /// The model to run.
    pub model: ModelId,
    /// What to continue.
    pub prompt: NodePrompt,
    /// Most tokens to generate; `None` for the node's default (bounded by the context).
    pub max_tokens: Option<u32>,
    /// Sampling knobs; `None` fields take the defaults.
    pub sampling: ApiSampling,
    /// Stop strings (not emitted).
    pub stop: Vec<String>,
    /// Tokens already generated and delivered by a node that failed: the generation resumes
    /// after them (see [`EngineRequest::resume`]).
    pub resume: Vec<u32>,
    /// On a pipeline head: the stages after this node, in order (empty for a whole model).
    pub downstream: Vec<shoal_pipeline::StageHop>,
    /// How the pipeline's links choose their activation codec.
    pub codec: shoal_pipeline::Preference,
    /// (Whole model.) Checkpoint the generation's KV cache to a peer as it grows.
    pub checkpoint: Option<crate::CheckpointPlan>,
    /// (A resumed generation.) Where a checkpoint of it may be stored.
    pub restore: Option<crate::CheckpointSource>,
}

impl From<GenerateRequest> for NodeRequest {
    fn from(r: GenerateRequest) -> Self {
        let prompt = match r.prompt {
            ApiPrompt::Text(t) => NodePrompt::Text(t),
            ApiPrompt::Chat(messages) => {
                NodePrompt::Chat(messages.iter().map(chat_message).collect())
            }
        };
        Self {
            request_id: r.request_id,
            model: r.model,
            prompt,
            max_tokens: r.max_tokens,
            sampling: r.sampling,
            stop: r.stop,
            resume: Vec::new(),
            downstream: Vec::new(),
            codec: shoal_pipeline::Preference::default(),
            checkpoint: None,
            restore: None,
        }
    }
}

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
        Ok(Self::with_engine(model, cfg, engine))
    }

    /// Starts the head of a pipeline: the engine runs `range` (the first layers) and sends its
    /// hidden states to the later stages each request names.
    pub(crate) fn start_head(
        model: Arc<Model>,
        cfg: LocalBackendConfig,
        range: shoal_types::LayerRange,
        sha256: String,
        links: crate::stage::LinkSettings,
    ) -> Result<Self, BackendError> {
        let internal = |e: String| BackendError::new(ErrorClass::Internal, "engine_start", e);
        let pool =
            Arc::new(ThreadPool::new(cfg.threads.max(1)).map_err(|e| internal(e.to_string()))?);
        let rt = model
            .shard(range, pool, ShardOptions::default())
            .map_err(|e| internal(e.to_string()))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| internal(format!("no async runtime for the pipeline links: {e}")))?;
        let (model_id, context) = (cfg.model_id.clone(), model.config().context_length);
        let engine = Engine::start_head(
            Box::new(rt),
            model.tokenizer().clone(),
            cfg.engine.clone(),
            |tail| {
                Box::new(crate::stage::HeadDownstream::start(
                    &runtime, tail, model_id, sha256, links, context,
                ))
            },
        )
        .map_err(|e| internal(e.to_string()))?;
        Ok(Self::with_engine(model, cfg, engine))
    }

    fn with_engine(model: Arc<Model>, cfg: LocalBackendConfig, engine: Engine) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            cfg,
            model,
            engine,
            created,
            tasks: TaskTracker::new(),
        }
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

    /// The name clients use for the model.
    pub fn model_id(&self) -> &ModelId {
        &self.cfg.model_id
    }

    /// The model served.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Generations whose events are still being forwarded to a client.
    pub fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// Runs `fut` as one of this backend's tracked tasks (what [`LocalBackend::drain`] waits
    /// for): the event-forwarding loop of one generation.
    pub fn spawn_tracked<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Checks and tokenizes a request into what the engine runs: the model must be this one,
    /// the prompt must tokenize (or its ids be in the vocabulary) and leave room in the
    /// context window, sampling parameters must be valid.
    pub fn prepare(&self, req: &NodeRequest) -> Result<EngineRequest, BackendError> {
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
        let tokens = match &req.prompt {
            NodePrompt::Text(t) => self.encode(&Prompt::Text(t.clone()))?,
            NodePrompt::Chat(messages) => self.encode(&Prompt::Chat(messages.clone()))?,
            NodePrompt::Tokens(ids) => {
                if ids.is_empty() {
                    return Err(invalid("invalid_prompt", "the prompt is empty".into()));
                }
                let vocab = self.model.tokenizer().vocab_size();
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(invalid(
                        "token_out_of_range",
                        format!("prompt token {bad} is outside the vocabulary of {vocab} tokens"),
                    ));
                }
                ids.clone()
            }
        };
        let context = self.model.config().context_length;
        let room = context.saturating_sub(u32::try_from(tokens.len()).unwrap_or(u32::MAX));
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
            Some(0) => {
                return Err(invalid(
                    "invalid_max_tokens",
                    "max_tokens must be at least 1".into(),
                ));
            }
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
            None => self.cfg.default_max_tokens.clamp(1, room),
        };
        if req.stop.len() > MAX_STOP_STRINGS {
            return Err(invalid(
                "invalid_stop",
                format!("at most {MAX_STOP_STRINGS} stop strings are allowed"),
            ));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(invalid(
                "invalid_stop",
                "stop strings must not be empty".into(),
            ));
        }
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
        let vocab = self.model.tokenizer().vocab_size();
        if let Some(bad) = req.resume.iter().find(|&&id| id as usize >= vocab) {
            return Err(invalid(
                "token_out_of_range",
                format!("resumed token {bad} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        if req.resume.len() > max_tokens as usize {
            return Err(invalid(
                "invalid_resume",
                format!(
                    "{} tokens to resume exceed max_tokens ({max_tokens})",
                    req.resume.len()
                ),
            ));
        }
        Ok(EngineRequest {
            id: req.request_id.clone(),
            prompt: tokens,
            options: GenerateOptions {
                max_tokens,
                sampling,
                stop: req.stop.clone(),
                ..GenerateOptions::default()
            },
            resume: req.resume.clone(),
            route: (!req.downstream.is_empty()).then(|| {
                RouteTag(Arc::new(crate::stage::Route {
                    hops: Arc::new(req.downstream.clone()),
                    preference: req.codec,
                }))
            }),
            restore: None,
            checkpoint: None,
        })
    }

    fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, BackendError> {
        self.model.encode(prompt).map_err(|e| {
            BackendError::new(ErrorClass::InvalidRequest, "invalid_prompt", e.to_string())
        })
    }

    /// Queues a prepared request on the engine. Its events arrive on the receiver; cancelling
    /// `cancel` or dropping the receiver ends it and frees its KV cache.
    pub fn submit(
        &self,
        req: EngineRequest,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<EngineEvent>, BackendError> {
        self.engine
            .submit(req, cancel)
            .map_err(|e| engine_error(&e))
    }
}

fn chat_message(m: &ApiMessage) -> ChatMessage {
    ChatMessage {
        role: m.role.as_str().into(),
        content: m.content.clone(),
    }
}

/// A seed for requests that give none, varying per request (FNV-1a of its id).
fn seed_from(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Classifies an engine error for a client.
pub fn engine_error(e: &EngineError) -> BackendError {
    let reason = match e {
        EngineError::Busy { .. } => "engine_busy",
        EngineError::ShutDown => "shutting_down",
        EngineError::Invalid(_) => "invalid_request",
        EngineError::Model(_) => "model_error",
        EngineError::Unavailable(_) => "stage_lost",
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
            let ereq = self.prepare(&NodeRequest::from(req))?;
            let mut events = self.submit(ereq, cancel)?;
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
                        Some(EngineEvent::Started { prompt_tokens, .. }) => {
                            GenerateEvent::Started { prompt_tokens }
                        }
                        Some(EngineEvent::Progress { .. }) => continue,
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
