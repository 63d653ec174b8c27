//! Runs one admitted generation and shapes the backend's events into an OpenAI response: a
//! single JSON object, or an SSE stream of chunks ending in `data: [DONE]`.
//!
//! The [`RequestTracker`] travels with the work: into the handler future for a collected
//! response, into the response body for a stream. Whichever is dropped early (the client went
//! away) drops the tracker, which cancels the backend's token.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use shoal_types::ErrorClass;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::backend::{FinishReason, GenerateEvent, Usage};
use crate::error::{RequestError, reason};
use crate::metrics::Outcome;
use crate::state::ApiState;
use crate::tracker::RequestTracker;
use crate::wire::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChunkChoice, Delta, TextChoice,
    TextCompletion, WireUsage,
};

/// Which OpenAI object family to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// `chat.completion` / `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Text,
}

/// Everything needed to shape responses, fixed when the request is admitted.
#[derive(Debug, Clone)]
pub(crate) struct ResponseMeta {
    pub flavor: Flavor,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

/// An accepted generation: its event receiver and the first event already read from it (read
/// before answering so that a refusal can still be an HTTP error rather than a stream event).
#[derive(Debug)]
pub(crate) struct Running {
    pub meta: ResponseMeta,
    pub stream: bool,
    pub events: mpsc::Receiver<GenerateEvent>,
    pub first: GenerateEvent,
}

fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        // Unreachable in responses (a cancelled generation becomes an error), kept total.
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

/// The error for a generation that ended `Cancelled` while its client was still connected: the
/// server cancelled it (shutdown) or the backend gave up on it.
fn cancelled_error(state: &ApiState) -> RequestError {
    if state.is_shutting_down() {
        RequestError::new(
            ErrorClass::Unavailable,
            reason::SHUTTING_DOWN,
            "The server is shutting down; retry the request.",
        )
    } else {
        RequestError::new(
            ErrorClass::Cancelled,
            reason::GENERATION_CANCELLED,
            "The generation was cancelled.",
        )
    }
}

fn truncated_error() -> RequestError {
    RequestError::new(
        ErrorClass::Internal,
        reason::BACKEND_STREAM_TRUNCATED,
        "backend event stream closed without a terminal event",
    )
}

/// Waits for the whole generation and answers with one JSON object.
pub(crate) async fn collect(
    state: &ApiState,
    running: Running,
    mut tracker: RequestTracker,
) -> Response {
    let Running {
        meta,
        mut events,
        first,
        ..
    } = running;
    let mut text = String::new();
    let mut next = Some(first);
    loop {
        let event = match next.take() {
            Some(event) => Some(event),
            None => events.recv().await,
        };
        if let Some(event) = &event {
            tracker.on_event(event);
        }
        let error = match event {
            Some(
                GenerateEvent::Started { .. }
                | GenerateEvent::Path { .. }
                | GenerateEvent::Resumed(_),
            ) => continue,
            Some(GenerateEvent::Token { text: piece, .. }) => {
                text.push_str(&piece);
                continue;
            }
            Some(GenerateEvent::Finished {
                reason: reason @ (FinishReason::Stop | FinishReason::Length),
                usage,
            }) => {
                tracker.finish(Outcome::Ok);
                return complete_body(&meta, &text, finish_reason_str(reason), usage);
            }
            Some(GenerateEvent::Finished {
                reason: FinishReason::Cancelled,
                ..
            }) => cancelled_error(state),
            Some(GenerateEvent::Failed(err)) => RequestError::from(err),
            None => truncated_error(),
        };
        tracker.fail(&error);
        return state.render(error);
    }
}

fn complete_body(meta: &ResponseMeta, text: &str, finish: &'static str, usage: Usage) -> Response {
    match meta.flavor {
        Flavor::Chat => Json(ChatCompletion {
            id: &meta.id,
            object: "chat.completion",
            created: meta.created,
            model: &meta.model,
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                },
                finish_reason: finish,
                logprobs: None,
            }],
            usage: usage.into(),
        })
        .into_response(),
        Flavor::Text => Json(TextCompletion {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: vec![TextChoice {
                index: 0,
                text,
                finish_reason: Some(finish),
                logprobs: None,
            }],
            usage: Some(usage.into()),
        })
        .into_response(),
    }
}

/// Answers with an SSE stream; the tracker and receiver move into the response body.
pub(crate) fn stream(state: &ApiState, running: Running, tracker: RequestTracker) -> Response {
    let mut pending = VecDeque::new();
    if running.meta.flavor == Flavor::Chat {
        // OpenAI's first chunk announces the role with an empty content delta.
        pending.push_back(chunk_event(&running.meta, Some(""), None, true));
    }
    let state_machine = ChunkStream {
        state: state.clone(),
        meta: running.meta,
        events: running.events,
        first: Some(running.first),
        tracker,
        pending,
        done: false,
        span: tracing::Span::current(),
    };
    let body = futures::stream::unfold(state_machine, |mut s| {
        let span = s.span.clone();
        async move {
            loop {
                if let Some(event) = s.pending.pop_front() {
                    return Some((Ok::<_, Infallible>(event), s));
                }
                if s.done {
                    return None;
                }
                let next = match s.first.take() {
                    Some(event) => Some(event),
                    None => s.events.recv().await,
                };
                s.handle(next);
            }
        }
        .instrument(span)
    });
    sse_response(body, state)
}

fn sse_response(
    body: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    state: &ApiState,
) -> Response {
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(state.config().sse_keep_alive))
        .into_response()
}

/// The streaming state; dropping it (client gone) drops the tracker and cancels generation.
struct ChunkStream {
    state: ApiState,
    meta: ResponseMeta,
    events: mpsc::Receiver<GenerateEvent>,
    first: Option<GenerateEvent>,
    tracker: RequestTracker,
    pending: VecDeque<Event>,
    done: bool,
    span: tracing::Span,
}

impl ChunkStream {
    fn handle(&mut self, event: Option<GenerateEvent>) {
        if let Some(event) = &event {
            self.tracker.on_event(event);
        }
        let error = match event {
            Some(
                GenerateEvent::Started { .. }
                | GenerateEvent::Path { .. }
                | GenerateEvent::Resumed(_),
            ) => return,
            Some(GenerateEvent::Token { text, .. }) => {
                if !text.is_empty() {
                    let chunk = chunk_event(&self.meta, Some(&text), None, false);
                    self.pending.push_back(chunk);
                }
                return;
            }
            Some(GenerateEvent::Finished {
                reason: reason @ (FinishReason::Stop | FinishReason::Length),
                usage,
            }) => {
                let finish = finish_reason_str(reason);
                self.pending
                    .push_back(chunk_event(&self.meta, None, Some(finish), false));
                if self.meta.include_usage {
                    self.pending.push_back(usage_event(&self.meta, usage));
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                self.tracker.finish(Outcome::Ok);
                self.done = true;
                return;
            }
            Some(GenerateEvent::Finished {
                reason: FinishReason::Cancelled,
                ..
            }) => cancelled_error(&self.state),
            Some(GenerateEvent::Failed(err)) => RequestError::from(err),
            None => truncated_error(),
        };
        // Headers are long gone, so the error travels as a data event in OpenAI's error shape;
        // the stream then ends without [DONE] so clients can tell it did not complete.
        tracing::warn!(class = %error.class, reason = %error.reason, "generation failed mid-stream");
        self.tracker.fail(&error);
        self.pending
            .push_back(Event::default().data(error.body().to_string()));
        self.done = true;
    }
}

fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(err) => {
            // Our own plain structs always serialise; this is a bug if it ever happens.
            tracing::error!(error = %err, "serialising a stream chunk failed");
            let error = RequestError::new(ErrorClass::Internal, "serialization_failed", "");
            Event::default().data(error.body().to_string())
        }
    }
}

fn chunk_event(
    meta: &ResponseMeta,
    content: Option<&str>,
    finish: Option<&'static str>,
    with_role: bool,
) -> Event {
    match meta.flavor {
        Flavor::Chat => json_event(&ChatChunk {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: with_role.then_some("assistant"),
                    content,
                },
                finish_reason: finish,
                logprobs: None,
            }],
            usage: None,
        }),
        Flavor::Text => json_event(&TextCompletion {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: vec![TextChoice {
                index: 0,
                text: content.unwrap_or(""),
                finish_reason: finish,
                logprobs: None,
            }],
            usage: None,
        }),
    }
}

/// The `stream_options.include_usage` chunk: empty `choices`, filled `usage`.
fn usage_event(meta: &ResponseMeta, usage: Usage) -> Event {
    let usage = Some(WireUsage::from(usage));
    match meta.flavor {
        Flavor::Chat => json_event(&ChatChunk {
            id: &meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: &meta.model,
            choices: Vec::new(),
            usage,
        }),
        Flavor::Text => json_event(&TextCompletion {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: Vec::new(),
            usage,
        }),
    }
}
