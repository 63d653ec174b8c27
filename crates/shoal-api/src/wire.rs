//! OpenAI's JSON shapes, as plain serde types.
//!
//! Requests are deserialised strictly (`deny_unknown_fields`): the OpenAI API itself rejects
//! parameters it does not know, and silently ignoring e.g. `tools` would return a plausible but
//! wrong answer. Fields whose JSON type varies (`stop`, `prompt`, message `content`) arrive as
//! [`serde_json::Value`] and are checked in `validate`, which gives clearer messages than an
//! untagged enum's "did not match any variant".

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<WireMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<serde_json::Value>,
    pub seed: Option<u64>,
    /// Accepted for compatibility; end-user ids are deliberately neither used nor logged.
    #[allow(dead_code)]
    pub user: Option<String>,
    pub logprobs: Option<bool>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    // Extensions under vLLM's names, which many clients already send.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompletionRequest {
    pub model: String,
    pub prompt: serde_json::Value,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<serde_json::Value>,
    pub seed: Option<u64>,
    /// Accepted for compatibility; end-user ids are deliberately neither used nor logged.
    #[allow(dead_code)]
    pub user: Option<String>,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// One entry of `messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireMessage {
    pub role: WireRole,
    pub content: serde_json::Value,
    /// Accepted because OpenAI documents it for every role; chat templates have no slot for it.
    #[allow(dead_code)]
    pub name: Option<String>,
}

/// A message's `role`. `tool` and `function` are absent on purpose: tools are not supported,
/// so such messages fail deserialisation with a message naming the accepted roles.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WireRole {
    System,
    Developer,
    User,
    Assistant,
}

/// `usage` of responses and the final stream chunk.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct WireUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl From<crate::backend::Usage> for WireUsage {
    fn from(usage: crate::backend::Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens(),
        }
    }
}

/// A non-streamed `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoice<'a>; 1],
    pub usage: WireUsage,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub finish_reason: &'static str,
    pub logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
pub(crate) struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// A non-streamed `text_completion`, and (with `finish_reason` possibly null and `usage`
/// optional) each chunk of a streamed one: OpenAI uses the same object for both.
#[derive(Debug, Serialize)]
pub(crate) struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<WireUsage>,
}

#[derive(Debug, Serialize)]
pub(crate) struct TextChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
}

/// One `chat.completion.chunk`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<WireUsage>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

/// One model object; `context_length` is an extension clients use to size prompts.
#[derive(Debug, Serialize)]
pub(crate) struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    pub context_length: u32,
}

impl From<crate::backend::ModelCard> for ModelObject {
    fn from(card: crate::backend::ModelCard) -> Self {
        Self {
            id: card.id.as_str().to_owned(),
            object: "model",
            created: card.created,
            owned_by: card.owned_by,
            context_length: card.context_length,
        }
    }
}
