//! Turns a deserialised OpenAI request into a [`GenerateRequest`], checking every value once.
//!
//! Everything here is pure (no I/O, no state) so the rules are unit-tested directly. Each error
//! names the parameter at fault in `param`, as OpenAI does.

use serde_json::Value;
use shoal_types::{ModelId, RequestId};

use crate::backend::{ChatMessage, GenerateRequest, Prompt, Role, SamplingParams};
use crate::error::RequestError;
use crate::wire::{ChatCompletionRequest, CompletionRequest, StreamOptions, WireMessage, WireRole};

/// OpenAI accepts at most this many stop sequences.
pub(crate) const MAX_STOP_SEQUENCES: usize = 4;

/// A request ready for the backend, plus how to shape the response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Validated {
    pub generate: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
}

/// The parameters both endpoints share, borrowed out of either request type.
struct Common {
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    stop: Option<Value>,
    seed: Option<u64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
}

/// Validates a chat completion request.
pub(crate) fn chat(
    req: ChatCompletionRequest,
    request_id: RequestId,
) -> Result<Validated, RequestError> {
    if req.logprobs == Some(true) {
        return Err(RequestError::unsupported(
            "logprobs",
            "logprobs are not supported; omit the parameter or set it to false",
        ));
    }
    let max_tokens = match (req.max_tokens, req.max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(RequestError::invalid_value(
                "max_completion_tokens",
                "max_tokens and max_completion_tokens disagree; send only one of them",
            ));
        }
        (a, b) => b.or(a),
    };
    let param_name = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    check_max_tokens(param_name, max_tokens)?;
    if req.messages.is_empty() {
        return Err(RequestError::invalid_value(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let messages = req
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let common = Common {
        model: req.model,
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        n: req.n,
        stream: req.stream,
        stream_options: req.stream_options,
        stop: req.stop,
        seed: req.seed,
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
    };
    finish(common, Prompt::Chat(messages), request_id)
}

/// Validates a (legacy) text completion request.
pub(crate) fn completion(
    req: CompletionRequest,
    request_id: RequestId,
) -> Result<Validated, RequestError> {
    if req.logprobs.is_some() {
        return Err(RequestError::unsupported(
            "logprobs",
            "logprobs are not supported; omit the parameter or set it to null",
        ));
    }
    if req.echo == Some(true) {
        return Err(RequestError::unsupported("echo", "echo is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(RequestError::unsupported("best_of", "best_of must be 1"));
    }
    if req.suffix.is_some() {
        return Err(RequestError::unsupported(
            "suffix",
            "suffix is not supported",
        ));
    }
    check_max_tokens("max_tokens", req.max_tokens)?;
    let prompt = text_prompt(req.prompt)?;
    let common = Common {
        model: req.model,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        n: req.n,
        stream: req.stream,
        stream_options: req.stream_options,
        stop: req.stop,
        seed: req.seed,
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
    };
    finish(common, Prompt::Text(prompt), request_id)
}

fn finish(
    common: Common,
    prompt: Prompt,
    request_id: RequestId,
) -> Result<Validated, RequestError> {
    if common.model.is_empty() {
        return Err(RequestError::invalid_value(
            "model",
            "model must not be empty",
        ));
    }
    if common.n.is_some_and(|n| n != 1) {
        return Err(RequestError::invalid_value(
            "n",
            "only n=1 is supported; send separate requests for more choices",
        ));
    }
    let stream = common.stream.unwrap_or(false);
    let include_usage = match common.stream_options {
        Some(_) if !stream => {
            return Err(RequestError::invalid_value(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        Some(options) => options.include_usage.unwrap_or(false),
        None => false,
    };
    let sampling = SamplingParams {
        temperature: in_range("temperature", common.temperature, 0.0, 2.0)?,
        top_p: positive_up_to("top_p", common.top_p, 1.0)?,
        top_k: top_k(common.top_k)?,
        min_p: in_range("min_p", common.min_p, 0.0, 1.0)?,
        repetition_penalty: positive_up_to("repetition_penalty", common.repetition_penalty, 10.0)?,
        frequency_penalty: in_range("frequency_penalty", common.frequency_penalty, -2.0, 2.0)?,
        presence_penalty: in_range("presence_penalty", common.presence_penalty, -2.0, 2.0)?,
        seed: common.seed,
    };
    Ok(Validated {
        generate: GenerateRequest {
            request_id,
            model: ModelId::new(common.model),
            prompt,
            max_tokens: common.max_tokens,
            sampling,
            stop: stop_sequences(common.stop)?,
        },
        stream,
        include_usage,
    })
}

fn check_max_tokens(param: &'static str, value: Option<u32>) -> Result<(), RequestError> {
    if value == Some(0) {
        return Err(RequestError::invalid_value(
            param,
            format!("{param} must be at least 1"),
        ));
    }
    Ok(())
}

fn in_range(
    param: &'static str,
    value: Option<f32>,
    lo: f32,
    hi: f32,
) -> Result<Option<f32>, RequestError> {
    match value {
        Some(v) if !(v.is_finite() && (lo..=hi).contains(&v)) => Err(RequestError::invalid_value(
            param,
            format!("{param} must be between {lo} and {hi}"),
        )),
        other => Ok(other),
    }
}

fn positive_up_to(
    param: &'static str,
    value: Option<f32>,
    hi: f32,
) -> Result<Option<f32>, RequestError> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0 && v <= hi) => Err(RequestError::invalid_value(
            param,
            format!("{param} must be greater than 0 and at most {hi}"),
        )),
        other => Ok(other),
    }
}

/// vLLM's convention: `-1` (and 0) mean "no top-k filtering".
fn top_k(value: Option<i64>) -> Result<Option<u32>, RequestError> {
    match value {
        None | Some(-1) | Some(0) => Ok(None),
        Some(k) => u32::try_from(k).map(Some).map_err(|_| {
            RequestError::invalid_value(
                "top_k",
                "top_k must be -1 (disabled) or a positive integer",
            )
        }),
    }
}

fn stop_sequences(value: Option<Value>) -> Result<Vec<String>, RequestError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s),
                _ => Err(RequestError::invalid_value(
                    format!("stop[{i}]"),
                    "stop must be a string or an array of strings",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(RequestError::invalid_value(
                "stop",
                "stop must be a string or an array of strings",
            ));
        }
    };
    if list.len() > MAX_STOP_SEQUENCES {
        return Err(RequestError::invalid_value(
            "stop",
            format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed"),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(RequestError::invalid_value(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(list)
}

fn message(index: usize, msg: WireMessage) -> Result<ChatMessage, RequestError> {
    let role = match msg.role {
        // `developer` is OpenAI's newer name for `system`; templates only know the latter.
        WireRole::System | WireRole::Developer => Role::System,
        WireRole::User => Role::User,
        WireRole::Assistant => Role::Assistant,
    };
    let param = format!("messages[{index}].content");
    let content = match msg.content {
        Value::String(s) => s,
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                text.push_str(&text_part(part).map_err(|e| e.with_param(format!("{param}[{j}]")))?);
            }
            text
        }
        _ => {
            return Err(RequestError::invalid_value(
                param,
                "content must be a string or an array of text parts",
            ));
        }
    };
    Ok(ChatMessage { role, content })
}

/// One `{"type":"text","text":"..."}` content part; images and audio are refused by name.
fn text_part(part: Value) -> Result<String, RequestError> {
    let Value::Object(mut map) = part else {
        return Err(RequestError::invalid_value(
            "content",
            "each content part must be an object",
        ));
    };
    match map.get("type").and_then(Value::as_str) {
        Some("text") => {}
        Some(other) => {
            return Err(RequestError::unsupported(
                "content",
                format!("content parts of type '{other}' are not supported; only 'text' is"),
            ));
        }
        None => {
            return Err(RequestError::invalid_value(
                "content",
                "content part is missing 'type'",
            ));
        }
    }
    if let Some(extra) = map.keys().find(|k| *k != "type" && *k != "text") {
        return Err(RequestError::invalid_value(
            "content",
            format!("unknown field '{extra}' in a text content part"),
        ));
    }
    match map.remove("text") {
        Some(Value::String(text)) => Ok(text),
        _ => Err(RequestError::invalid_value(
            "content",
            "a text content part needs a string 'text'",
        )),
    }
}

/// `prompt` of `/v1/completions`: a string, or an array holding exactly one string. Token-id
/// prompts and batches would need `n` choices per request, which the gateway does not do.
fn text_prompt(value: Value) -> Result<String, RequestError> {
    match value {
        Value::String(s) => Ok(s),
        Value::Array(mut items) if items.len() == 1 && items[0].is_string() => match items.pop() {
            Some(Value::String(s)) => Ok(s),
            _ => Err(prompt_error()),
        },
        Value::Array(items) if items.len() > 1 => Err(RequestError::unsupported(
            "prompt",
            "batched prompts are not supported; send one prompt per request",
        )),
        _ => Err(prompt_error()),
    }
}

fn prompt_error() -> RequestError {
    RequestError::invalid_value("prompt", "prompt must be a string")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use serde_json::json;

    fn chat_json(extra: Value) -> Result<Validated, RequestError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if let (Value::Object(base), Value::Object(extra)) = (&mut body, extra) {
            base.extend(extra);
        }
        let req: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        chat(req, RequestId::new("r1"))
    }

    fn param_of(result: Result<Validated, RequestError>) -> String {
        result.unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn minimal_chat_maps_to_generate_request() {
        let v = chat_json(json!({})).unwrap();
        assert!(!v.stream);
        assert!(!v.include_usage);
        assert_eq!(v.generate.model.as_str(), "m");
        assert_eq!(v.generate.request_id.as_str(), "r1");
        assert_eq!(
            v.generate.prompt,
            Prompt::Chat(vec![ChatMessage {
                role: Role::User,
                content: "hi".into()
            }])
        );
        assert_eq!(v.generate.sampling, SamplingParams::default());
        assert!(v.generate.stop.is_empty());
    }

    #[test]
    fn sampling_parameters_pass_through() {
        let v = chat_json(json!({
            "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
            "repetition_penalty": 1.1, "frequency_penalty": -0.5, "presence_penalty": 1.5,
            "seed": 42, "max_completion_tokens": 12, "stop": ["\n", "END"],
            "stream": true, "stream_options": {"include_usage": true}, "n": 1, "user": "u",
            "logprobs": false
        }))
        .unwrap();
        let s = &v.generate.sampling;
        assert_eq!(s.temperature, Some(0.7));
        assert_eq!(s.top_p, Some(0.9));
        assert_eq!(s.top_k, Some(40));
        assert_eq!(s.min_p, Some(0.05));
        assert_eq!(s.repetition_penalty, Some(1.1));
        assert_eq!(s.frequency_penalty, Some(-0.5));
        assert_eq!(s.presence_penalty, Some(1.5));
        assert_eq!(s.seed, Some(42));
        assert_eq!(v.generate.max_tokens, Some(12));
        assert_eq!(v.generate.stop, vec!["\n".to_string(), "END".to_string()]);
        assert!(v.stream && v.include_usage);
    }

    #[test]
    fn out_of_range_values_name_their_parameter() {
        for (body, param) in [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_p": 1.01}), "top_p"),
            (json!({"n": 2}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_completion_tokens": 0}), "max_completion_tokens"),
            (
                json!({"max_tokens": 3, "max_completion_tokens": 4}),
                "max_completion_tokens",
            ),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": ""}), "stop"),
            (json!({"stop": 5}), "stop"),
            (json!({"stop": ["a", 5]}), "stop[1]"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"repetition_penalty": 0.0}), "repetition_penalty"),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"logprobs": true}), "logprobs"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"messages": []}), "messages"),
            (json!({"model": ""}), "model"),
            (
                json!({"messages": [{"role": "user", "content": 3}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "messages[0].content[0]",
            ),
        ] {
            assert_eq!(param_of(chat_json(body.clone())), param, "{body}");
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        for body in [
            json!({"temperature": 0.0}),
            json!({"temperature": 2.0}),
            json!({"top_p": 1.0}),
            json!({"top_k": -1}),
            json!({"stop": "x"}),
            json!({"stop": ["a", "b", "c", "d"]}),
            json!({"stop": null}),
            json!({"max_tokens": 5, "max_completion_tokens": 5}),
        ] {
            assert!(chat_json(body.clone()).is_ok(), "{body}");
        }
        assert_eq!(
            chat_json(json!({"top_k": -1}))
                .unwrap()
                .generate
                .sampling
                .top_k,
            None
        );
        assert_eq!(
            chat_json(json!({"max_tokens": 9}))
                .unwrap()
                .generate
                .max_tokens,
            Some(9)
        );
    }

    #[test]
    fn content_parts_and_roles() {
        let v = chat_json(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok", "name": "bot"}
        ]}))
        .unwrap();
        let Prompt::Chat(messages) = v.generate.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(messages[0].role, Role::System);
        assert_eq!(messages[1].content, "ab");
        assert_eq!(messages[2].role, Role::Assistant);
    }

    fn completion_json(extra: Value) -> Result<Validated, RequestError> {
        let mut body = json!({"model": "m", "prompt": "once upon"});
        if let (Value::Object(base), Value::Object(extra)) = (&mut body, extra) {
            base.extend(extra);
        }
        let req: CompletionRequest = serde_json::from_value(body).unwrap();
        completion(req, RequestId::new("r2"))
    }

    #[test]
    fn completion_prompts() {
        let v = completion_json(json!({})).unwrap();
        assert_eq!(v.generate.prompt, Prompt::Text("once upon".into()));
        let v = completion_json(json!({"prompt": ["one"]})).unwrap();
        assert_eq!(v.generate.prompt, Prompt::Text("one".into()));
        for (body, param) in [
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": [1, 2, 3]}), "prompt"),
            (json!({"prompt": 7}), "prompt"),
            (json!({"echo": true}), "echo"),
            (json!({"best_of": 2}), "best_of"),
            (json!({"suffix": "x"}), "suffix"),
            (json!({"logprobs": 2}), "logprobs"),
        ] {
            assert_eq!(param_of(completion_json(body.clone())), param, "{body}");
        }
        assert!(completion_json(json!({"echo": false, "best_of": 1, "logprobs": null})).is_ok());
    }
}
