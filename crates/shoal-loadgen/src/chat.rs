//! `shoal chat`: a line-oriented chat client.
//!
//! Each input line is a user message; the answer streams to the output as its chunks arrive
//! (flushed per chunk) and joins the history sent with the next turn. A turn that fails
//! prints one `error: <message>` line and leaves the history as it was before the turn, so
//! the session goes on. `/reset` clears the history (the system prompt stays), `/exit` or end
//! of input ends the session.

use std::time::Instant;

use anyhow::Context as _;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::bench::is_http_url;
use crate::client::{
    ApiKey, BodyParams, DEFAULT_URL, Endpoint, HttpClient, RequestFailure, request_body,
};
use crate::prompts::{ChatMessage, Prompt};
use crate::sse::Usage;

/// Arguments of `shoal chat`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// Base URL of the OpenAI-compatible API (including `/v1`).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Model to talk to (default: the first one `GET /models` lists).
    #[arg(long)]
    pub model: Option<String>,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    pub api_key: Option<ApiKey>,
    /// System prompt placed before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Sampling seed sent with every turn.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// A completed turn.
struct Answer {
    text: String,
    usage: Option<Usage>,
}

/// Runs a chat session reading user lines from `input` and writing to `output` until
/// `/exit` or end of input. Fails only on I/O errors of `input`/`output`, a bad URL, or when no
/// model is given and none can be listed; request failures are printed and the session goes on.
pub async fn run_chat(
    args: ChatArgs,
    input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_http_url(&args.url),
        "--url {:?} must be an http:// URL",
        args.url
    );
    let client =
        HttpClient::new(&args.url, args.api_key.clone(), 1).context("building the HTTP client")?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => client.first_model().await?,
    };
    let params = BodyParams {
        model: model.clone(),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        stream: true,
    };
    let banner = format!(
        "shoal chat: {model} at {}\ntype a message; /reset clears the conversation, /exit quits\n",
        client.base()
    );
    output.write_all(banner.as_bytes()).await?;
    let system: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let mut history: Vec<ChatMessage> = Vec::new();
    let mut lines = input.lines();
    loop {
        output.write_all(b"> ").await?;
        output.flush().await?;
        let Some(line) = lines.next_line().await.context("reading input")? else {
            output.write_all(b"\n").await?;
            break;
        };
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" => break,
            "/reset" => {
                history.clear();
                output.write_all(b"(conversation cleared)\n").await?;
                continue;
            }
            _ if text.starts_with('/') => {
                output
                    .write_all(b"unknown command; /reset clears the conversation, /exit quits\n")
                    .await?;
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", text));
        let messages: Vec<ChatMessage> = system.iter().chain(&history).cloned().collect();
        let started = Instant::now();
        match turn(&client, &params, messages, &mut output).await? {
            Ok(answer) => {
                let secs = started.elapsed().as_secs_f64();
                let stats = match answer.usage {
                    Some(u) => format!(
                        "[{} prompt + {} answer tokens, {secs:.2} s]\n",
                        u.prompt_tokens, u.completion_tokens
                    ),
                    None => format!("[{secs:.2} s]\n"),
                };
                output.write_all(stats.as_bytes()).await?;
                history.push(ChatMessage::new("assistant", answer.text));
            }
            Err(failure) => {
                history.pop();
                let line = format!("error: {}\n", failure.message());
                output.write_all(line.as_bytes()).await?;
            }
        }
        output.flush().await?;
    }
    output.flush().await?;
    Ok(())
}

/// One streamed turn: writes the answer as it arrives. The outer error is an output failure,
/// the inner one a failed request (after which the output ends on a fresh line).
async fn turn(
    client: &HttpClient,
    params: &BodyParams,
    messages: Vec<ChatMessage>,
    output: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<Result<Answer, RequestFailure>> {
    let body = request_body(params, Endpoint::Chat, &Prompt::Messages(messages));
    let mut text = String::new();
    let result = async {
        let (request, _) = client.prepare(Endpoint::Chat, body.to_string().into(), true, None)?;
        let mut reply = client.send(request).await?;
        let mut usage = None;
        loop {
            match reply.next_chunk().await {
                Ok(Some((_, chunk))) => {
                    if !chunk.content.is_empty() {
                        output
                            .write_all(chunk.content.as_bytes())
                            .await
                            .map_err(TurnError::Output)?;
                        output.flush().await.map_err(TurnError::Output)?;
                        text.push_str(&chunk.content);
                    }
                    if chunk.usage.is_some() {
                        usage = chunk.usage;
                    }
                }
                Ok(None) => return Ok(usage),
                Err(failure) => return Err(TurnError::Request(failure)),
            }
        }
    }
    .await;
    // A partial answer is left on screen; the next line starts fresh either way.
    if !text.is_empty() {
        output.write_all(b"\n").await?;
    }
    match result {
        Ok(usage) => Ok(Ok(Answer { text, usage })),
        Err(TurnError::Request(failure)) => Ok(Err(failure)),
        Err(TurnError::Output(err)) => Err(err),
    }
}

enum TurnError {
    Request(RequestFailure),
    Output(std::io::Error),
}

impl From<RequestFailure> for TurnError {
    fn from(failure: RequestFailure) -> Self {
        Self::Request(failure)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        chat: ChatArgs,
    }

    #[test]
    fn defaults() {
        let args = Cli::try_parse_from(["chat"]).unwrap().chat;
        assert_eq!(args.url, DEFAULT_URL);
        assert_eq!(args.max_tokens, 256);
        assert!((args.temperature - 0.7).abs() < 1e-6);
        assert!(args.model.is_none() && args.system.is_none() && args.seed.is_none());
    }

    #[tokio::test]
    async fn bad_url_is_refused_before_any_io() {
        let args = Cli::try_parse_from(["chat", "--url", "ftp://x/v1"])
            .unwrap()
            .chat;
        let mut out = Vec::new();
        let err = run_chat(args, &b""[..], &mut out).await.unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
        assert!(out.is_empty());
    }
}
