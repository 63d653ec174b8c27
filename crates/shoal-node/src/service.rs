//! The data plane: the `shoal.v1.Node` gRPC service.
//!
//! `Generate` turns the wire request into a [`NodeRequest`] (the same path the HTTP API takes
//! through [`LocalBackend::prepare`]), queues it on the engine of the model's shard and streams
//! `Started`, `Token`s, then `Finished` or `Error`. Refusals before the stream starts are gRPC
//! statuses with the class and reason headers. A client that drops the stream, or whose
//! `grpc-timeout` passes, ends the generation and frees its KV cache.
//!
//! An absent sampling field takes the node's default (temperature 1, a seed derived from the
//! request id); an absent or zero `max_tokens` the node's default completion length.

use crate::checkpoint::{self, Pusher, StoreError};
use crate::core::NodeCore;
use crate::local::{LocalBackend, NodePrompt, NodeRequest, engine_error};
use crate::stage::LinkSettings;
use futures::Stream;
use shoal_api::metrics::Outcome;
use shoal_api::{BackendError, SamplingParams as ApiSampling};
use shoal_engine::EngineEvent;
use shoal_model::{ChatMessage, FinishReason};
use shoal_proto::v1::node_server::Node;
use shoal_proto::v1::{self, generate_event::Event, generate_request::Prompt};
use shoal_types::{ErrorClass, ModelId, RequestId};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Events buffered between a generation and its gRPC stream.
const STREAM_BUFFER: usize = 16;
/// Longest request id kept (longer ones are refused).
const MAX_REQUEST_ID: usize = 256;

/// The stream `Generate` answers with.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateEvent, Status>> + Send>>;

/// The stream `FetchCheckpoint` answers with.
pub type CheckpointStream = Pin<Box<dyn Stream<Item = Result<v1::KvChunk, Status>> + Send>>;

/// A checkpoint refused by the store, as a status.
fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::Full { .. } => Status::resource_exhausted(e.to_string()),
    }
}

/// The `Node` service of one agent.
#[derive(Debug)]
pub(crate) struct NodeService {
    core: Arc<NodeCore>,
    /// How this node dials its peers (checkpoint pushes and fetches).
    links: LinkSettings,
    /// Numbers requests that come without an id.
    unnamed: AtomicU64,
}

impl NodeService {
    pub fn new(core: Arc<NodeCore>, links: LinkSettings) -> Self {
        Self {
            core,
            links,
            unnamed: AtomicU64::new(0),
        }
    }

    async fn start(
        &self,
        msg: v1::GenerateRequest,
        received: Instant,
        deadline: Option<Duration>,
    ) -> Result<GenerateStream, BackendError> {
        self.core.check_accepting()?;
        let req = node_request(msg, || {
            let n = self.unnamed.fetch_add(1, Ordering::Relaxed);
            format!("{}-grpc-{n}", self.core.node_id)
        })?;
        let backend = if req.downstream.is_empty() {
            self.core.shards.backend_for(req.model.as_str())?
        } else {
            self.core.shards.head_for(req.model.as_str())?
        };
        let mut ereq = backend.prepare(&req)?;
        let mut pusher = None;
        // The checkpoints of a whole model, or of a pipeline head's layers.
        let head = !req.downstream.is_empty();
        if let Some((model_sha256, layers)) = self.core.shards.first_shard(req.model.as_str(), head)
        {
            if let Some(source) = &req.restore {
                let id = req.request_id.as_str();
                ereq.restore = checkpoint::restore(
                    &self.core,
                    &self.links,
                    source,
                    id,
                    Some(layers),
                    &model_sha256,
                )
                .await;
            }
            if let Some(plan) = req.checkpoint.clone() {
                let (sink, task, done) = Pusher {
                    request_id: req.request_id.clone(),
                    model: req.model.clone(),
                    model_sha256,
                    every: plan.every,
                    // A node is no holder of its own generations.
                    peer: plan.peer.filter(|p| p.node != self.core.node_id),
                    links: self.links.clone(),
                    counters: self.core.checkpoint_counters.clone(),
                    retargets: self.core.checkpoint_targets.clone(),
                }
                .start();
                ereq.checkpoint = Some(sink);
                pusher = Some((task, done));
            }
        }
        let prompt_ids = ereq.prompt.clone();
        let cancel = self.core.requests.child_token();
        let events = backend.submit(ereq, cancel.clone())?;
        let checkpoint_done = pusher.map(|(task, done)| {
            backend.spawn_tracked(task);
            done
        });
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let forward = Forward {
            backend: backend.clone(),
            core: self.core.clone(),
            prompt_ids,
            received,
            deadline: deadline.map(|d| tokio::time::Instant::now() + d),
            checkpoint_done,
        };
        let span = tracing::debug_span!("node.generate.stream", request_id = %req.request_id);
        backend.spawn_tracked(
            async move {
                let _cancel_on_exit = cancel.clone().drop_guard();
                forward.run(events, tx, cancel).await;
            }
            .instrument(span),
        );
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|ev| (ev, rx))
        })))
    }
}

/// The error status for a refusal before the stream starts.
fn refusal(e: &BackendError) -> Status {
    shoal_net::status(e.class, &e.reason, e.message.clone())
}

fn invalid(reason: &'static str, message: impl Into<String>) -> BackendError {
    BackendError::new(ErrorClass::InvalidRequest, reason, message)
}

/// Checks a wire request and converts it; `unnamed` names a request that has no id.
pub(crate) fn node_request(
    msg: v1::GenerateRequest,
    unnamed: impl FnOnce() -> String,
) -> Result<NodeRequest, BackendError> {
    if msg.request_id.len() > MAX_REQUEST_ID {
        return Err(invalid(
            "invalid_request_id",
            format!("request_id must be at most {MAX_REQUEST_ID} bytes"),
        ));
    }
    let request_id = if msg.request_id.is_empty() {
        unnamed()
    } else {
        msg.request_id
    };
    if msg.model_id.is_empty() {
        return Err(invalid("missing_model", "model_id is required"));
    }
    let prompt = match msg.prompt {
        None => return Err(invalid("missing_prompt", "a prompt is required")),
        Some(Prompt::Text(t)) => NodePrompt::Text(t),
        Some(Prompt::Tokens(t)) => NodePrompt::Tokens(t.ids),
        Some(Prompt::Chat(c)) => NodePrompt::Chat(
            c.messages
                .into_iter()
                .map(|m| {
                    let role = match m.role.as_str() {
                        "system" | "developer" => "system",
                        "user" => "user",
                        "assistant" => "assistant",
                        other => {
                            return Err(invalid(
                                "invalid_role",
                                format!(
                                    "unknown chat role {:?}",
                                    other.chars().take(32).collect::<String>()
                                ),
                            ));
                        }
                    };
                    Ok(ChatMessage {
                        role: role.into(),
                        content: m.content,
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let sampling = msg
        .sampling
        .map_or_else(ApiSampling::default, |s| ApiSampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            seed: s.seed,
        });
    Ok(NodeRequest {
        request_id: RequestId::new(request_id),
        model: ModelId::new(msg.model_id),
        prompt,
        // 0 asks for nothing: it means the default, like an absent value.
        max_tokens: msg.max_tokens.filter(|&m| m > 0),
        sampling,
        stop: msg.stop,
        resume: msg.resume,
        downstream: msg
            .downstream
            .into_iter()
            .map(shoal_pipeline::StageHop::try_from)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("invalid_route", format!("bad pipeline stage: {e}")))?,
        codec: shoal_pipeline::preference_from_wire(msg.codec),
        checkpoint: crate::CheckpointPlan::from_wire(msg.checkpoint),
        restore: checkpoint::source_from_wire(msg.restore),
    })
}

/// The `grpc-timeout` a caller set (`<digits><unit>`, at most 8 digits), if any.
pub(crate) fn grpc_timeout(md: &MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn event(e: Event) -> v1::GenerateEvent {
    v1::GenerateEvent { event: Some(e) }
}

fn error_event(class: ErrorClass, reason: &str, message: impl Into<String>) -> v1::GenerateEvent {
    event(Event::Error(v1::Error {
        class: shoal_proto::class_to_wire(class) as i32,
        reason: reason.to_owned(),
        message: message.into(),
    }))
}

/// Moves one generation's engine events to its gRPC stream.
struct Forward {
    /// Held so the shard is not dropped under a running generation.
    backend: Arc<LocalBackend>,
    core: Arc<NodeCore>,
    prompt_ids: Vec<u32>,
    received: Instant,
    deadline: Option<tokio::time::Instant>,
    /// Tells the checkpoint pusher how the generation ended.
    checkpoint_done: Option<oneshot::Sender<bool>>,
}

impl Forward {
    async fn run(
        self,
        mut events: mpsc::Receiver<EngineEvent>,
        tx: mpsc::Sender<Result<v1::GenerateEvent, Status>>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let metrics = &self.core.metrics;
        let mut last_token: Option<Instant> = None;
        let deadline = crate::sleep_until_some(self.deadline);
        tokio::pin!(deadline);
        let mut prompt_ids = Some(self.prompt_ids);
        let outcome = loop {
            let ev = tokio::select! {
                // The client went away: dropping `events` frees the sequence.
                () = tx.closed() => break Outcome::Error(ErrorClass::Cancelled),
                () = &mut deadline => {
                    cancel.cancel();
                    let _ = tx.try_send(Ok(error_event(
                        ErrorClass::DeadlineExceeded,
                        "deadline_exceeded",
                        "the call's deadline passed before the generation finished",
                    )));
                    break Outcome::Error(ErrorClass::DeadlineExceeded);
                }
                ev = events.recv() => ev,
            };
            let (out, end) = match ev {
                None => {
                    // The engine dropped the sequence without a final event: it was cancelled
                    // (node shutting down) or the engine stopped.
                    let out = error_event(
                        ErrorClass::Unavailable,
                        "shutting_down",
                        "the node is shutting down",
                    );
                    (out, Some(Outcome::Error(ErrorClass::Unavailable)))
                }
                Some(EngineEvent::Started { restored, .. }) => (
                    event(Event::Started(v1::Started {
                        prompt_ids: prompt_ids.take().unwrap_or_default(),
                        node_id: self.core.node_id.as_str().to_owned(),
                        restored_positions: restored,
                    })),
                    None,
                ),
                Some(EngineEvent::Progress { positions }) => {
                    (event(Event::Progress(v1::Progress { positions })), None)
                }
                Some(EngineEvent::Token { id, text }) => {
                    let now = Instant::now();
                    match last_token {
                        None => metrics.ttft(now - self.received),
                        Some(t) => metrics.inter_token(now - t),
                    }
                    last_token = Some(now);
                    (event(Event::Token(v1::Token { id, text })), None)
                }
                Some(EngineEvent::Finished {
                    reason,
                    usage,
                    tail,
                }) => {
                    let wire = match reason {
                        FinishReason::Stop => v1::FinishReason::Stop,
                        FinishReason::Length => v1::FinishReason::Length,
                        FinishReason::Cancelled => {
                            let _ = tx
                                .send(Ok(error_event(
                                    ErrorClass::Cancelled,
                                    "cancelled",
                                    "the generation was cancelled",
                                )))
                                .await;
                            break Outcome::Error(ErrorClass::Cancelled);
                        }
                    };
                    let out = event(Event::Finished(v1::Finished {
                        reason: wire as i32,
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        tail,
                    }));
                    (out, Some(Outcome::Ok))
                }
                Some(EngineEvent::Failed(e)) => {
                    let e = engine_error(&e);
                    let out = error_event(e.class, &e.reason, e.message);
                    (out, Some(Outcome::Error(e.class)))
                }
            };
            if tx.send(Ok(out)).await.is_err() {
                break Outcome::Error(ErrorClass::Cancelled);
            }
            if let Some(o) = end {
                break o;
            }
        };
        metrics.generation(outcome);
        if let Some(done) = self.checkpoint_done {
            let _ = done.send(outcome == Outcome::Ok);
        }
        drop(events);
        drop(self.backend);
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let received = Instant::now();
        let deadline = grpc_timeout(request.metadata());
        let msg = request.into_inner();
        let span = tracing::info_span!(
            "node.generate",
            node = %self.core.node_id,
            request_id = %msg.request_id,
            model = %msg.model_id,
        );
        async {
            match self.start(msg, received, deadline).await {
                Ok(stream) => Ok(Response::new(stream)),
                Err(e) => {
                    tracing::debug!(class = %e.class, reason = %e.reason, "generate refused");
                    self.core.metrics.generation(Outcome::Error(e.class));
                    Err(refusal(&e))
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn push_checkpoint(
        &self,
        request: Request<Streaming<v1::KvChunk>>,
    ) -> Result<Response<v1::PushCheckpointReply>, Status> {
        let mut chunks = request.into_inner();
        let mut stored = 0;
        while let Some(chunk) = chunks.message().await? {
            // Only checkpoints of a model version this node has a file of are kept.
            if !self
                .core
                .shards
                .files()
                .iter()
                .any(|f| f.sha256.eq_ignore_ascii_case(&chunk.model_sha256))
            {
                return Err(Status::failed_precondition(format!(
                    "this node has no file of model {} with sha256 {:?}",
                    chunk.model_id, chunk.model_sha256
                )));
            }
            let snap = checkpoint::from_chunk(&chunk).map_err(store_status)?;
            let positions = snap.len() as u64;
            stored = self
                .core
                .checkpoints
                .append(&chunk.request_id, &chunk.model_sha256, snap)
                .map_err(store_status)?;
            self.core
                .checkpoint_counters
                .stored_tokens
                .fetch_add(positions, Ordering::Relaxed);
        }
        Ok(Response::new(v1::PushCheckpointReply {
            stored: u32::try_from(stored).unwrap_or(u32::MAX),
        }))
    }

    type FetchCheckpointStream = CheckpointStream;

    async fn fetch_checkpoint(
        &self,
        request: Request<v1::FetchCheckpointRequest>,
    ) -> Result<Response<CheckpointStream>, Status> {
        let req = request.into_inner();
        let layers = checkpoint::range_from_wire(req.layers)?;
        let Some(snap) = self
            .core
            .checkpoints
            .get(&req.request_id, layers, &req.model_sha256)
        else {
            return Err(Status::not_found(format!(
                "no checkpoint of {:?} for that model version",
                req.request_id
            )));
        };
        // Chunks are made as the stream is read, so the checkpoint is not copied twice.
        let step = checkpoint::chunk_positions(&snap);
        // Only checkpoints of a model version this node has a file of are stored: the chunks
        // name the model as that file does.
        let model = self
            .core
            .shards
            .files()
            .iter()
            .find(|f| f.sha256.eq_ignore_ascii_case(&req.model_sha256))
            .map_or_else(|| ModelId::new(String::new()), |f| f.id.clone());
        let chunks = (0..snap.len()).step_by(step).map(move |from| {
            Ok(checkpoint::chunk_at(
                &req.request_id,
                &model,
                &req.model_sha256,
                &snap,
                from,
                step,
            ))
        });
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn drop_checkpoint(
        &self,
        request: Request<v1::DropCheckpointRequest>,
    ) -> Result<Response<v1::DropCheckpointReply>, Status> {
        let req = request.into_inner();
        self.core
            .checkpoints
            .remove(&req.request_id, checkpoint::range_from_wire(req.layers)?);
        Ok(Response::new(v1::DropCheckpointReply {}))
    }

    async fn retarget_checkpoint(
        &self,
        request: Request<v1::RetargetCheckpointRequest>,
    ) -> Result<Response<v1::RetargetCheckpointReply>, Status> {
        let req = request.into_inner();
        let Some(holder) = req
            .plan
            .and_then(|p| crate::CheckpointSource::from_parts(p.peer_node, p.peer_addr))
        else {
            return Err(Status::invalid_argument("the plan names no holder"));
        };
        if holder.node == self.core.node_id {
            return Err(Status::invalid_argument(
                "a node is no holder of its own generations' checkpoints",
            ));
        }
        if !self
            .core
            .checkpoint_targets
            .retarget(&req.request_id, holder)
        {
            return Err(Status::not_found(format!(
                "no generation {:?} checkpoints from this node",
                req.request_id
            )));
        }
        Ok(Response::new(v1::RetargetCheckpointReply {}))
    }

    async fn status(
        &self,
        _request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let models = self
            .core
            .shards
            .ready()
            .iter()
            .map(|b| b.model_id().as_str().to_owned())
            .collect();
        Ok(Response::new(v1::StatusResponse {
            node_id: self.core.node_id.as_str().to_owned(),
            models,
            load: Some(self.core.load()),
            capability: Some(self.core.capability()),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn req() -> v1::GenerateRequest {
        v1::GenerateRequest {
            request_id: "r1".into(),
            model_id: "tiny".into(),
            prompt: Some(Prompt::Text("hi".into())),
            ..Default::default()
        }
    }

    fn unnamed() -> String {
        "anon".into()
    }

    #[test]
    fn wire_requests_convert_with_defaults() {
        let r = node_request(req(), unnamed).unwrap();
        assert_eq!(r.request_id.as_str(), "r1");
        assert_eq!(r.max_tokens, None);
        assert_eq!(r.sampling, ApiSampling::default());
        assert_eq!(r.prompt, NodePrompt::Text("hi".into()));
        let zero = node_request(
            v1::GenerateRequest {
                max_tokens: Some(0),
                ..req()
            },
            unnamed,
        )
        .unwrap();
        assert_eq!(zero.max_tokens, None);

        let r = node_request(
            v1::GenerateRequest {
                request_id: String::new(),
                max_tokens: Some(7),
                sampling: Some(v1::SamplingParams {
                    temperature: Some(0.0),
                    seed: Some(0),
                    ..Default::default()
                }),
                prompt: Some(Prompt::Chat(v1::ChatPrompt {
                    messages: vec![v1::ChatMessage {
                        role: "developer".into(),
                        content: "be brief".into(),
                    }],
                })),
                ..req()
            },
            unnamed,
        )
        .unwrap();
        assert_eq!(r.request_id.as_str(), "anon");
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert_eq!(r.sampling.top_p, None);
        assert_eq!(r.sampling.repetition_penalty, None);
        assert_eq!(r.sampling.seed, Some(0));
        let NodePrompt::Chat(m) = r.prompt else {
            panic!("not a chat")
        };
        assert_eq!(m[0].role, "system");
    }

    #[test]
    fn bad_wire_requests_are_invalid_with_a_reason() {
        let cases = [
            (
                v1::GenerateRequest {
                    prompt: None,
                    ..req()
                },
                "missing_prompt",
            ),
            (
                v1::GenerateRequest {
                    model_id: String::new(),
                    ..req()
                },
                "missing_model",
            ),
            (
                v1::GenerateRequest {
                    request_id: "x".repeat(300),
                    ..req()
                },
                "invalid_request_id",
            ),
            (
                v1::GenerateRequest {
                    prompt: Some(Prompt::Chat(v1::ChatPrompt {
                        messages: vec![v1::ChatMessage {
                            role: "root".into(),
                            content: String::new(),
                        }],
                    })),
                    ..req()
                },
                "invalid_role",
            ),
        ];
        for (msg, reason) in cases {
            let e = node_request(msg, unnamed).unwrap_err();
            assert_eq!(e.class, ErrorClass::InvalidRequest);
            assert_eq!(e.reason, reason);
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut md = MetadataMap::new();
        assert_eq!(grpc_timeout(&md), None);
        for (v, d) in [
            ("1500000u", Duration::from_millis(1500)),
            ("2S", Duration::from_secs(2)),
            ("250m", Duration::from_millis(250)),
            ("1H", Duration::from_secs(3600)),
            ("10n", Duration::from_nanos(10)),
        ] {
            md.insert("grpc-timeout", MetadataValue::from_static(v));
            assert_eq!(grpc_timeout(&md), Some(d), "{v}");
        }
        for bad in ["", "S", "12x", "123456789S", "-1S"] {
            md.insert("grpc-timeout", MetadataValue::try_from(bad).unwrap());
            assert_eq!(grpc_timeout(&md), None, "{bad}");
        }
    }
}
