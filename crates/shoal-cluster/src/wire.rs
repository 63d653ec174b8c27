//! Conversions between the gateway's types and the `shoal.v1` wire messages.

use shoal_api::{BackendError, FinishReason, GenerateEvent, GenerateRequest, Prompt, Usage};
use shoal_proto::v1;
use shoal_types::ErrorClass;

/// The wire form of a gateway request.
pub(crate) fn generate_request(req: &GenerateRequest) -> v1::GenerateRequest {
    let prompt = match &req.prompt {
        Prompt::Text(t) => v1::generate_request::Prompt::Text(t.clone()),
        Prompt::Chat(messages) => v1::generate_request::Prompt::Chat(v1::ChatPrompt {
            messages: messages
                .iter()
                .map(|m| v1::ChatMessage {
                    role: m.role.as_str().to_owned(),
                    content: m.content.clone(),
                })
                .collect(),
        }),
    };
    let s = &req.sampling;
    v1::GenerateRequest {
        request_id: req.request_id.as_str().to_owned(),
        model_id: req.model.as_str().to_owned(),
        prompt: Some(prompt),
        max_tokens: req.max_tokens,
        sampling: Some(v1::SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            seed: s.seed,
        }),
        stop: req.stop.clone(),
        resume: Vec::new(),
        downstream: Vec::new(),
        codec: 0,
        checkpoint: None,
        restore: None,
    }
}

/// A node's gRPC status as a gateway error: class and reason from the headers when the peer
/// set them, else from the code. A cancelled call is the node's failure (its connection went
/// down under the call, or it cancelled its generations while stopping): the gateway's own
/// cancellation never reaches here, as it stops reading first. It is `Unavailable`, so
/// another replica takes the generation over.
pub(crate) fn status_error(s: &tonic::Status) -> BackendError {
    let (class, reason) = shoal_net::class_of(s);
    if class == ErrorClass::Cancelled {
        return node_cancelled(s.message());
    }
    let reason = reason.unwrap_or_else(|| default_reason(class).to_owned());
    BackendError::new(class, reason, s.message().to_owned())
}

/// A node cancelled a call or generation under the gateway: another replica takes over.
fn node_cancelled(message: &str) -> BackendError {
    BackendError::new(
        ErrorClass::Unavailable,
        "node_cancelled",
        message.to_owned(),
    )
}

/// An error event of a node's stream as a gateway error (a cancelled generation is the
/// node's failure, as in [`status_error`]).
pub(crate) fn event_error(e: &v1::Error) -> BackendError {
    let class = shoal_proto::class_from_wire(e.class);
    if class == ErrorClass::Cancelled {
        return node_cancelled(&e.message);
    }
    let reason = if e.reason.is_empty() {
        default_reason(class).to_owned()
    } else {
        e.reason.clone()
    };
    BackendError::new(class, reason, e.message.clone())
}

fn default_reason(class: ErrorClass) -> &'static str {
    class.as_str()
}

/// The gateway's final event for a `Finished` message.
pub(crate) fn finished(f: &v1::Finished, prompt_tokens: u32) -> GenerateEvent {
    let reason = match v1::FinishReason::try_from(f.reason) {
        Ok(v1::FinishReason::Length) => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    GenerateEvent::Finished {
        reason,
        usage: Usage {
            prompt_tokens: if f.prompt_tokens == 0 {
                prompt_tokens
            } else {
                f.prompt_tokens
            },
            completion_tokens: f.completion_tokens,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use shoal_api::{ChatMessage, Role, SamplingParams};
    use shoal_types::{ModelId, RequestId};

    #[test]
    fn a_chat_request_keeps_roles_absent_knobs_and_stops() {
        let req = GenerateRequest {
            request_id: RequestId::new("r1"),
            model: ModelId::new("m"),
            prompt: Prompt::Chat(vec![
                ChatMessage {
                    role: Role::System,
                    content: "be brief".into(),
                },
                ChatMessage {
                    role: Role::User,
                    content: "hi".into(),
                },
            ]),
            max_tokens: None,
            sampling: SamplingParams {
                temperature: Some(0.0),
                seed: Some(7),
                ..SamplingParams::default()
            },
            stop: vec!["\n".into()],
        };
        let w = generate_request(&req);
        assert_eq!(w.request_id, "r1");
        assert_eq!(w.max_tokens, None);
        let s = w.sampling.unwrap();
        assert_eq!(s.temperature, Some(0.0));
        assert_eq!(s.seed, Some(7));
        assert_eq!(s.top_p, None);
        match w.prompt.unwrap() {
            v1::generate_request::Prompt::Chat(c) => {
                assert_eq!(c.messages[0].role, "system");
                assert_eq!(c.messages[1].content, "hi");
            }
            other => panic!("not a chat prompt: {other:?}"),
        }
        assert_eq!(w.stop, vec!["\n".to_owned()]);
    }

    #[test]
    fn errors_keep_class_and_reason_from_the_peer() {
        let s = shoal_net::status(ErrorClass::CapacityExhausted, "engine_busy", "full");
        let e = status_error(&s);
        assert_eq!(e.class, ErrorClass::CapacityExhausted);
        assert_eq!(e.reason, "engine_busy");
        let bare = tonic::Status::unavailable("connection refused");
        let e = status_error(&bare);
        assert_eq!(e.class, ErrorClass::Unavailable);
        // A call cancelled under the gateway (a connection torn down) is the node's failure.
        let cut = tonic::Status::cancelled("operation was canceled");
        let e = status_error(&cut);
        assert_eq!(e.class, ErrorClass::Unavailable);
        assert_eq!(e.reason, "node_cancelled");
        let ev = event_error(&v1::Error {
            class: v1::ErrorClass::InvalidRequest as i32,
            reason: String::new(),
            message: "bad".into(),
        });
        assert_eq!(ev.class, ErrorClass::InvalidRequest);
        assert_eq!(ev.reason, "invalid_request");
    }

    #[test]
    fn finished_maps_reason_and_usage() {
        let f = v1::Finished {
            reason: v1::FinishReason::Length as i32,
            prompt_tokens: 0,
            completion_tokens: 5,
            tail: String::new(),
        };
        match finished(&f, 9) {
            GenerateEvent::Finished { reason, usage } => {
                assert_eq!(reason, FinishReason::Length);
                assert_eq!(usage.prompt_tokens, 9);
                assert_eq!(usage.completion_tokens, 5);
            }
            other => panic!("{other:?}"),
        }
    }
}
