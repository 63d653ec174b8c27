//! The HTTP side shared by `bench` and `chat`: one `reqwest` client, request bodies, model
//! discovery, reading a streamed or whole reply, and the failures a request can end in.
//!
//! Bytes on the wire are approximated from what the client sees, since `reqwest` does not
//! expose the socket: a request counts its HTTP/1.1 request line, every header it sends
//! (including the `host` and `content-length` headers the connection layer adds) and its body;
//! a reply counts its status line, its headers and the body bytes received after
//! transfer-encoding is removed. Chunked framing (a few bytes per chunk), TCP/IP overhead and
//! connection set-up are not counted.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use serde::Serialize;

use crate::sse::{ChunkInfo, SseParser, StreamItem, WireErrorBody, interpret, parse_object};

/// Default base URL: `shoal serve`'s default listener.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/v1";

/// Longest non-streamed reply (or error body) read into memory.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// An API key sent as `Authorization: Bearer <key>`; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
}

impl From<String> for ApiKey {
    fn from(key: String) -> Self {
        Self(key)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Which OpenAI endpoint requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /chat/completions` with `messages`.
    #[default]
    Chat,
    /// `POST /completions` with a `prompt` string.
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Completions => "/completions",
        }
    }

    /// `chat` or `completions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
        }
    }
}

/// Why a reply could not be understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadReply {
    /// A body or event is not the JSON expected.
    InvalidJson,
    /// A response object has neither `choices` nor `error`.
    MissingChoices,
    /// An event is not UTF-8.
    InvalidUtf8,
    /// An event or body is larger than this client accepts.
    TooLarge,
    /// The stream ended before `data: [DONE]`.
    Truncated,
    /// A successful status with a body that is neither JSON nor SSE as requested.
    WrongContentType,
}

impl BadReply {
    /// Stable name, used as the error code in reports (`bad_reply:<name>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::MissingChoices => "missing_choices",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::TooLarge => "too_large",
            Self::Truncated => "truncated",
            Self::WrongContentType => "wrong_content_type",
        }
    }
}

/// How one request failed. Every reply a server can send maps to one of these; none panics.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailure {
    /// The server answered with a non-success status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The OpenAI error `code` (or `type` when `code` is null), if the body had one.
        code: Option<String>,
        /// The OpenAI error `message`, or the start of a body that was not OpenAI's shape.
        message: String,
    },
    /// A stream (status 200) carried an error object instead of its next chunk.
    #[error("error in the stream: {message}")]
    InStream {
        /// The OpenAI error `code` (or `type`).
        code: Option<String>,
        /// The OpenAI error `message`.
        message: String,
    },
    /// No connection could be made.
    #[error("could not connect")]
    Connect {
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The request took longer than the per-request timeout.
    #[error("no complete reply within {0:?}")]
    Timeout(Duration),
    /// The connection failed after it was made (reset, closed mid-body).
    #[error("transport error")]
    Transport {
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The reply could not be understood.
    #[error("bad reply ({}): {detail}", reason.as_str())]
    BadReply {
        /// What was wrong.
        reason: BadReply,
        /// Details for a person.
        detail: String,
    },
}

impl RequestFailure {
    pub(crate) fn bad_reply(reason: BadReply, detail: impl Into<String>) -> Self {
        Self::BadReply {
            reason,
            detail: detail.into(),
        }
    }

    fn from_reqwest(source: reqwest::Error) -> Self {
        if source.is_connect() {
            Self::Connect { source }
        } else {
            Self::Transport { source }
        }
    }

    /// The HTTP status the failure came with: the reply's status, 200 for failures inside a
    /// successful reply, `None` when no reply arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::InStream { .. } | Self::BadReply { .. } => Some(200),
            Self::Connect { .. } | Self::Timeout(_) | Self::Transport { .. } => None,
        }
    }

    /// A short stable code to group failures by: the OpenAI error code, or one of
    /// `unknown`, `connect`, `timeout`, `transport`, `bad_reply:<reason>`.
    pub fn code(&self) -> String {
        match self {
            Self::Status { code, .. } | Self::InStream { code, .. } => {
                code.clone().unwrap_or_else(|| "unknown".to_owned())
            }
            Self::Connect { .. } => "connect".to_owned(),
            Self::Timeout(_) => "timeout".to_owned(),
            Self::Transport { .. } => "transport".to_owned(),
            Self::BadReply { reason, .. } => format!("bad_reply:{}", reason.as_str()),
        }
    }

    /// One line for a person: the server's message, or this failure and its causes.
    pub fn message(&self) -> String {
        match self {
            Self::Status { message, .. } | Self::InStream { message, .. } => message.clone(),
            _ => {
                let mut line = self.to_string();
                let mut source = std::error::Error::source(self);
                while let Some(err) = source {
                    line.push_str(": ");
                    line.push_str(&err.to_string());
                    source = err.source();
                }
                line
            }
        }
    }
}

/// The sampling and streaming fields every generation request carries.
#[derive(Debug, Clone)]
pub(crate) struct BodyParams {
    pub model: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub seed: Option<u64>,
    pub stream: bool,
}

/// A JSON body for `endpoint`. Only fields OpenAI defines are sent: shoal's gateway rejects
/// unknown ones. Streams ask for the usage chunk, the only place token counts appear.
pub(crate) fn request_body(
    params: &BodyParams,
    endpoint: Endpoint,
    prompt: &crate::prompts::Prompt,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": params.model,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "stream": params.stream,
    });
    match endpoint {
        Endpoint::Chat => body["messages"] = serde_json::json!(prompt.to_messages()),
        Endpoint::Completions => body["prompt"] = serde_json::json!(prompt.to_text()),
    }
    if let Some(seed) = params.seed {
        body["seed"] = seed.into();
    }
    if params.stream {
        body["stream_options"] = serde_json::json!({ "include_usage": true });
    }
    body
}

/// A failure of model discovery (`GET /models`).
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// The request failed.
    #[error("listing models at {url} failed")]
    Request {
        /// The URL asked.
        url: String,
        /// Why.
        #[source]
        source: RequestFailure,
    },
    /// The server lists no model.
    #[error("the server at {url} lists no models")]
    Empty {
        /// The URL asked.
        url: String,
    },
}

/// The shared HTTP client of one run.
#[derive(Debug, Clone)]
pub(crate) struct HttpClient {
    client: reqwest::Client,
    base: String,
    api_key: Option<ApiKey>,
}

/// Everything a finished whole (non-streamed) reply says.
#[derive(Debug)]
pub(crate) struct Whole {
    pub info: ChunkInfo,
    pub bytes_received: u64,
}

impl HttpClient {
    /// A client for `base` (e.g. `http://127.0.0.1:8080/v1`) keeping up to `connections` idle
    /// connections to it.
    pub(crate) fn new(
        base: &str,
        api_key: Option<ApiKey>,
        connections: usize,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // Load goes only to the URL given, never through a proxy from the environment.
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(connections.max(1))
            .build()?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            api_key,
        })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn headers(&self, accept: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(accept));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("shoal-loadgen/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(key) = &self.api_key
            && let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", key.0))
        {
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        headers
    }

    /// The id of the first model `GET /models` lists.
    pub(crate) async fn first_model(&self) -> Result<String, ModelsError> {
        let url = format!("{}/models", self.base);
        let wrap = |source| ModelsError::Request {
            url: url.clone(),
            source,
        };
        let resp = self
            .client
            .get(&url)
            .headers(self.headers("application/json"))
            .send()
            .await
            .map_err(|e| wrap(RequestFailure::from_reqwest(e)))?;
        let (status, body) = read_body(resp).await.map_err(wrap)?;
        if !(200..300).contains(&status) {
            return Err(wrap(status_failure(status, &body)));
        }
        #[derive(serde::Deserialize)]
        struct List {
            data: Vec<Card>,
        }
        #[derive(serde::Deserialize)]
        struct Card {
            id: String,
        }
        let list: List = serde_json::from_slice(&body).map_err(|e| {
            wrap(RequestFailure::bad_reply(
                BadReply::InvalidJson,
                e.to_string(),
            ))
        })?;
        list.data
            .into_iter()
            .next()
            .map(|card| card.id)
            .ok_or(ModelsError::Empty { url })
    }

    /// Builds a generation request with a pre-serialised JSON body, and its size on the wire.
    pub(crate) fn prepare(
        &self,
        endpoint: Endpoint,
        body: bytes::Bytes,
        stream: bool,
        request_id: Option<&str>,
    ) -> Result<(reqwest::Request, u64), RequestFailure> {
        let accept = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let mut builder = self
            .client
            .post(format!("{}{}", self.base, endpoint.path()))
            .headers(self.headers(accept))
            .header(CONTENT_TYPE, "application/json");
        if let Some(id) = request_id {
            builder = builder.header("x-request-id", id);
        }
        let request = builder
            .body(body)
            .build()
            .map_err(RequestFailure::from_reqwest)?;
        let bytes = request_wire_bytes(&request);
        Ok((request, bytes))
    }

    /// Sends a request; a non-success status is read and returned as a failure.
    pub(crate) async fn send(&self, request: reqwest::Request) -> Result<Reply, RequestFailure> {
        let resp = self
            .client
            .execute(request)
            .await
            .map_err(RequestFailure::from_reqwest)?;
        let status = resp.status().as_u16();
        let header_bytes = response_head_bytes(&resp);
        if !resp.status().is_success() {
            let (_, body) = read_body(resp).await?;
            return Err(status_failure(status, &body));
        }
        Ok(Reply {
            resp,
            bytes_received: header_bytes,
            parser: SseParser::default(),
            queue: VecDeque::new(),
            done: false,
        })
    }
}

/// A successful reply being read.
#[derive(Debug)]
pub(crate) struct Reply {
    resp: reqwest::Response,
    bytes_received: u64,
    parser: SseParser,
    /// Events parsed from the last read, with the instant that read completed.
    queue: VecDeque<(Instant, Result<String, crate::sse::SseError>)>,
    done: bool,
}

impl Reply {
    /// Bytes received so far (status line, headers, body).
    pub(crate) fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// The next chunk of a streamed reply and the instant its bytes arrived; `None` after
    /// `data: [DONE]` (the rest of the body is then read and counted). A stream that ends
    /// without `[DONE]` fails as truncated; an error object fails with its code.
    pub(crate) async fn next_chunk(
        &mut self,
    ) -> Result<Option<(Instant, ChunkInfo)>, RequestFailure> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some((at, event)) = self.queue.pop_front() {
                let data = event.map_err(|e| {
                    let reason = match e {
                        crate::sse::SseError::InvalidUtf8 => BadReply::InvalidUtf8,
                        crate::sse::SseError::TooLarge => BadReply::TooLarge,
                    };
                    RequestFailure::bad_reply(reason, e.to_string())
                })?;
                match interpret(&data)? {
                    StreamItem::Chunk(info) => return Ok(Some((at, info))),
                    StreamItem::Done => {
                        self.done = true;
                        self.drain().await?;
                        return Ok(None);
                    }
                }
            }
            let chunk = self
                .resp
                .chunk()
                .await
                .map_err(RequestFailure::from_reqwest)?;
            let at = Instant::now();
            let Some(bytes) = chunk else {
                let detail = if self.parser.has_partial_event() {
                    "the stream ended inside an event"
                } else {
                    "the stream ended without data: [DONE]"
                };
                return Err(RequestFailure::bad_reply(BadReply::Truncated, detail));
            };
            self.bytes_received += bytes.len() as u64;
            let mut events = Vec::new();
            self.parser.feed(&bytes, &mut events);
            self.queue.extend(events.into_iter().map(|e| (at, e)));
        }
    }

    /// Reads what follows `[DONE]` (normally nothing) so the bytes are counted and the
    /// connection can be reused.
    async fn drain(&mut self) -> Result<(), RequestFailure> {
        while let Some(bytes) = self
            .resp
            .chunk()
            .await
            .map_err(RequestFailure::from_reqwest)?
        {
            self.bytes_received += bytes.len() as u64;
        }
        Ok(())
    }

    /// Reads a whole non-streamed reply.
    pub(crate) async fn whole(self) -> Result<Whole, RequestFailure> {
        let head = self.bytes_received;
        let (_, body) = read_body(self.resp).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|e| RequestFailure::bad_reply(BadReply::InvalidUtf8, e.to_string()))?;
        let info = parse_object(text)?;
        Ok(Whole {
            info,
            bytes_received: head + body.len() as u64,
        })
    }
}

/// Reads a body up to [`MAX_BODY_BYTES`].
async fn read_body(mut resp: reqwest::Response) -> Result<(u16, Vec<u8>), RequestFailure> {
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(bytes) = resp.chunk().await.map_err(RequestFailure::from_reqwest)? {
        if body.len() + bytes.len() > MAX_BODY_BYTES {
            return Err(RequestFailure::bad_reply(
                BadReply::TooLarge,
                format!("body longer than {MAX_BODY_BYTES} bytes"),
            ));
        }
        body.extend_from_slice(&bytes);
    }
    Ok((status, body))
}

/// The failure for a non-success status: OpenAI's error object if the body is one, else the
/// start of the body as the message.
fn status_failure(status: u16, body: &[u8]) -> RequestFailure {
    if let Ok(parsed) = serde_json::from_slice::<WireErrorBody>(body) {
        return RequestFailure::Status {
            status,
            code: parsed.error.code(),
            message: parsed.error.message(),
        };
    }
    let text = String::from_utf8_lossy(body);
    let mut message: String = text.trim().chars().take(200).collect();
    if message.is_empty() {
        message = "(empty body)".to_owned();
    }
    RequestFailure::Status {
        status,
        code: None,
        message,
    }
}

fn header_line_bytes(name: &str, value: &[u8]) -> u64 {
    // "name: value\r\n"
    (name.len() + 2 + value.len() + 2) as u64
}

/// A request's HTTP/1.1 size; see the module docs for what is counted.
pub(crate) fn request_wire_bytes(request: &reqwest::Request) -> u64 {
    let url = request.url();
    let target_len = url.path().len() + url.query().map_or(0, |q| q.len() + 1);
    // "POST /v1/chat/completions HTTP/1.1\r\n"
    let mut total = (request.method().as_str().len() + 1 + target_len + 1 + 8 + 2) as u64;
    for (name, value) in request.headers() {
        total += header_line_bytes(name.as_str(), value.as_bytes());
    }
    let body = request
        .body()
        .and_then(|b| b.as_bytes())
        .map_or(0, <[u8]>::len);
    if !request.headers().contains_key(reqwest::header::HOST) {
        let host = url.host_str().unwrap_or("");
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        total += header_line_bytes("host", authority.as_bytes());
    }
    if !request
        .headers()
        .contains_key(reqwest::header::CONTENT_LENGTH)
    {
        total += header_line_bytes("content-length", body.to_string().as_bytes());
    }
    total + 2 + body as u64
}

/// A reply's status line and headers on the wire.
fn response_head_bytes(resp: &reqwest::Response) -> u64 {
    let status = resp.status();
    let reason = status.canonical_reason().unwrap_or("");
    // "HTTP/1.1 200 OK\r\n"
    let mut total = (8 + 1 + 3 + 1 + reason.len() + 2) as u64;
    for (name, value) in resp.headers() {
        total += header_line_bytes(name.as_str(), value.as_bytes());
    }
    total + 2
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn request_size_counts_line_headers_and_body() {
        let client = HttpClient::new("http://127.0.0.1:8080/v1/", None, 1).unwrap();
        assert_eq!(client.base(), "http://127.0.0.1:8080/v1");
        let body = bytes::Bytes::from_static(b"{\"a\":1}");
        let (request, size) = client.prepare(Endpoint::Chat, body, true, None).unwrap();
        let expected = "POST /v1/chat/completions HTTP/1.1\r\n".len()
            + "accept: text/event-stream\r\n".len()
            + format!(
                "user-agent: shoal-loadgen/{}\r\n",
                env!("CARGO_PKG_VERSION")
            )
            .len()
            + "content-type: application/json\r\n".len()
            + "host: 127.0.0.1:8080\r\n".len()
            + "content-length: 7\r\n".len()
            + 2
            + 7;
        assert_eq!(size, expected as u64);
        assert_eq!(request.url().path(), "/v1/chat/completions");
    }

    #[test]
    fn api_key_is_sent_as_bearer_and_never_debug_printed() {
        let key = ApiKey::new("sk-secret");
        assert!(!format!("{key:?}").contains("sk-secret"));
        let client = HttpClient::new("http://localhost:1/v1", Some(key), 1).unwrap();
        let (request, _) = client
            .prepare(Endpoint::Completions, bytes::Bytes::new(), false, None)
            .unwrap();
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer sk-secret");
        assert_eq!(request.url().path(), "/v1/completions");
    }

    #[test]
    fn status_failures_read_openai_errors_or_plain_bodies() {
        let f = status_failure(
            429,
            br#"{"error":{"message":"busy","type":"rate_limit_error","code":"too_many_requests"}}"#,
        );
        assert_eq!(f.status(), Some(429));
        assert_eq!(f.code(), "too_many_requests");
        assert_eq!(f.message(), "busy");
        let f = status_failure(502, b"<html>bad gateway</html>");
        assert_eq!(f.code(), "unknown");
        assert_eq!(f.message(), "<html>bad gateway</html>");
        assert_eq!(status_failure(500, b"").message(), "(empty body)");
    }
}
