//! Test harness: a scripted backend (a test double for the HTTP layer, not an inference engine),
//! request builders, an SSE parser, and a real server on 127.0.0.1:0.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use shoal_api::{
    ApiConfig, ApiState, BackendError, BoxFuture, FinishReason, GenerateEvent, GenerateRequest,
    InferenceBackend, ModelCard, Readiness, ResumeStall, Usage,
};
use shoal_types::{ModelId, RequestId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Upper bound on any single wait in these tests; only reached when something hangs.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it does not finish within [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

pub const MODEL: &str = "test-model";
pub const PROMPT_TOKENS: u32 = 7;

/// One step of a scripted generation.
#[derive(Debug, Clone)]
pub enum Step {
    Started,
    Token(&'static str),
    Finish(FinishReason),
    Fail(BackendError),
    /// Block until the request's cancellation token fires, then report it and stop.
    WaitForCancel,
    /// Drop the sender without a terminal event (a broken backend).
    Close,
    /// Report the nodes serving the generation.
    Path(&'static [&'static str]),
    /// Report the nodes of every path so far, after this many moves to another node.
    MovedPath(&'static [&'static str], u32),
    /// Report what a failover cost before the next token.
    Resumed(ResumeStall),
}

/// What one `generate` call does.
#[derive(Debug, Clone)]
pub enum Script {
    Steps(Vec<Step>),
    /// Refuse in `generate` itself.
    Refuse(BackendError),
}

impl Script {
    /// Started, the given tokens, then a finish.
    pub fn tokens(tokens: &[&'static str], finish: FinishReason) -> Self {
        let mut steps = vec![Step::Started];
        steps.extend(tokens.iter().map(|t| Step::Token(t)));
        steps.push(Step::Finish(finish));
        Script::Steps(steps)
    }
}

/// Test double for the HTTP layer: plays scripted event sequences and reports what it saw.
pub struct ScriptedBackend {
    scripts: Mutex<VecDeque<Script>>,
    requests: Mutex<Vec<GenerateRequest>>,
    ready: AtomicBool,
    started_tx: mpsc::Sender<RequestId>,
    started_rx: tokio::sync::Mutex<mpsc::Receiver<RequestId>>,
    cancelled_tx: mpsc::Sender<RequestId>,
    cancelled_rx: tokio::sync::Mutex<mpsc::Receiver<RequestId>>,
}

impl ScriptedBackend {
    pub fn new() -> Arc<Self> {
        let (started_tx, started_rx) = mpsc::channel(64);
        let (cancelled_tx, cancelled_rx) = mpsc::channel(64);
        Arc::new(Self {
            scripts: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            ready: AtomicBool::new(true),
            started_tx,
            started_rx: tokio::sync::Mutex::new(started_rx),
            cancelled_tx,
            cancelled_rx: tokio::sync::Mutex::new(cancelled_rx),
        })
    }

    /// Queues the script for the next `generate` call.
    pub fn push(&self, script: Script) {
        self.scripts.lock().unwrap().push_back(script);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Every request `generate` received, in order.
    pub fn requests(&self) -> Vec<GenerateRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until a generation reaches a `WaitForCancel` step.
    pub async fn wait_started(&self) -> RequestId {
        let mut rx = self.started_rx.lock().await;
        within("the backend to start a blocking generation", rx.recv())
            .await
            .expect("backend alive")
    }

    /// Waits until a generation observes its cancellation token fire.
    pub async fn wait_cancelled(&self) -> RequestId {
        let mut rx = self.cancelled_rx.lock().await;
        within(
            "the backend to observe the request's cancellation token",
            rx.recv(),
        )
        .await
        .expect("backend alive")
    }
}

impl InferenceBackend for ScriptedBackend {
    fn models(&self) -> Vec<ModelCard> {
        vec![
            ModelCard {
                id: ModelId::new(MODEL),
                owned_by: "shoal".into(),
                created: 1_700_000_000,
                context_length: 2048,
            },
            ModelCard {
                id: ModelId::new("org/with-slash"),
                owned_by: "org".into(),
                created: 1_700_000_001,
                context_length: 8192,
            },
        ]
    }

    fn readiness(&self) -> Readiness {
        if self.ready.load(Ordering::SeqCst) {
            Readiness::Ready
        } else {
            Readiness::NotReady {
                reason: "loading_model".into(),
            }
        }
    }

    fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<mpsc::Receiver<GenerateEvent>, BackendError>> {
        Box::pin(async move {
            let script = self
                .scripts
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| Script::tokens(&["Hello", " world"], FinishReason::Stop));
            let request_id = req.request_id.clone();
            self.requests.lock().unwrap().push(req);
            let steps = match script {
                Script::Refuse(err) => return Err(err),
                Script::Steps(steps) => steps,
            };
            let (tx, rx) = mpsc::channel(4);
            let started_tx = self.started_tx.clone();
            let cancelled_tx = self.cancelled_tx.clone();
            tokio::spawn(play(
                steps,
                tx,
                cancel,
                request_id,
                started_tx,
                cancelled_tx,
            ));
            Ok(rx)
        })
    }
}

async fn play(
    steps: Vec<Step>,
    tx: mpsc::Sender<GenerateEvent>,
    cancel: CancellationToken,
    request_id: RequestId,
    started_tx: mpsc::Sender<RequestId>,
    cancelled_tx: mpsc::Sender<RequestId>,
) {
    let mut emitted = 0u32;
    for (i, step) in steps.into_iter().enumerate() {
        let event = match step {
            Step::Started => GenerateEvent::Started {
                prompt_tokens: PROMPT_TOKENS,
            },
            Step::Token(text) => {
                emitted += 1;
                GenerateEvent::Token {
                    text: text.to_string(),
                    token_id: i as u32,
                }
            }
            Step::Finish(reason) => GenerateEvent::Finished {
                reason,
                usage: Usage {
                    prompt_tokens: PROMPT_TOKENS,
                    completion_tokens: emitted,
                },
            },
            Step::Fail(err) => GenerateEvent::Failed(err),
            Step::Path(nodes) => GenerateEvent::Path {
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
                failovers: 0,
            },
            Step::MovedPath(nodes, failovers) => GenerateEvent::Path {
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
                failovers,
            },
            Step::Resumed(stall) => GenerateEvent::Resumed(stall),
            Step::WaitForCancel => {
                let _ = started_tx.send(request_id.clone()).await;
                cancel.cancelled().await;
                let _ = cancelled_tx.send(request_id.clone()).await;
                // Tell a still-listening gateway, as a real backend would.
                let _ = tx
                    .send(GenerateEvent::Finished {
                        reason: FinishReason::Cancelled,
                        usage: Usage {
                            prompt_tokens: PROMPT_TOKENS,
                            completion_tokens: emitted,
                        },
                    })
                    .await;
                return;
            }
            Step::Close => return,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// A router over `backend` with `config`; the returned token is the state's parent token.
pub fn app_with(
    backend: Arc<ScriptedBackend>,
    config: ApiConfig,
) -> (Router, ApiState, CancellationToken) {
    let cancel = CancellationToken::new();
    let state = ApiState::try_new(config, backend, cancel.clone()).expect("valid config");
    (shoal_api::router(state.clone()), state, cancel)
}

pub fn app(backend: Arc<ScriptedBackend>) -> Router {
    app_with(backend, ApiConfig::default()).0
}

pub fn post_json(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

pub fn chat_body(extra: Value) -> Value {
    let mut body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello"}],
    });
    if let (Value::Object(base), Value::Object(extra)) = (&mut body, extra) {
        base.extend(extra);
    }
    body
}

pub fn completion_body(extra: Value) -> Value {
    let mut body = serde_json::json!({"model": MODEL, "prompt": "Once upon a time"});
    if let (Value::Object(base), Value::Object(extra)) = (&mut body, extra) {
        base.extend(extra);
    }
    body
}

/// Sends `req` through the router and returns status, headers and the whole body as text.
pub async fn call_text(router: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let response = within("the router to answer", router.clone().oneshot(req))
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = within("the response body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

/// Like [`call_text`] but parses the body as JSON.
pub async fn call(router: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let (status, headers, text) = call_text(router, req).await;
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"));
    (status, headers, json)
}

/// Asserts the OpenAI error shape and returns the `error` object.
pub fn assert_error_shape(body: &Value) -> &serde_json::Map<String, Value> {
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object in {body}"));
    let keys: Vec<&str> = {
        let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    };
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error["code"].is_string(), "{body}");
    assert!(
        error["param"].is_string() || error["param"].is_null(),
        "{body}"
    );
    error
}

/// The `data:` payloads of an SSE body, in order. Panics on anything that is not a data event
/// or a keep-alive comment.
pub fn sse_data(text: &str) -> Vec<String> {
    assert!(
        text.ends_with("\n\n") || text.is_empty(),
        "unterminated SSE body: {text:?}"
    );
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .filter(|event| !event.starts_with(':'))
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_string()
        })
        .collect()
}

/// A real server on 127.0.0.1:0, shut down on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub state_cancel: CancellationToken,
    pub handle: Option<tokio::task::JoinHandle<Result<(), shoal_api::ApiError>>>,
}

impl TestServer {
    pub async fn start(backend: Arc<ScriptedBackend>, config: ApiConfig) -> Self {
        let (router, _state, state_cancel) = app_with(backend, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(shoal_api::serve(listener, router, shutdown.clone()));
        Self {
            addr,
            shutdown,
            state_cancel,
            handle: Some(handle),
        }
    }

    /// A server run by [`shoal_api::serve_gateway`] (HTTPS if configured, audit log closed on
    /// [`TestServer::stop`]); also returns its state.
    pub async fn start_gateway(
        backend: Arc<ScriptedBackend>,
        config: ApiConfig,
    ) -> (Self, ApiState) {
        let (_router, state, state_cancel) = app_with(backend, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(shoal_api::serve_gateway(
            listener,
            state.clone(),
            shutdown.clone(),
        ));
        let server = Self {
            addr,
            shutdown,
            state_cancel,
            handle: Some(handle),
        };
        (server, state)
    }

    /// Stops accepting, waits for the server (and, for a gateway, its state's close) to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            within("the server to stop", handle).await.unwrap().unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A request with `Authorization: Bearer <key>`.
pub fn with_key(mut req: Request<Body>, key: &str) -> Request<Body> {
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    req
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.state_cancel.cancel();
    }
}
