//! Load runs against a scripted server that answers badly on purpose: errors are counted by
//! status and code, nothing panics, deadlines and cancellation end runs with in-flight
//! requests reported as cancelled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use shoal_loadgen::{
    ChatArgs, LoadConfig, LoadError, LoadReport, ModelsError, StopAfter, run_chat, run_load,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// How the scripted server answers the n-th generation request.
#[derive(Clone, Copy)]
enum Script {
    /// Cycles through six behaviours, one per request in arrival order.
    Cycle,
    /// Sends one content chunk, then nothing until the client goes away.
    Hang,
}

#[derive(Clone)]
struct ServerState {
    script: Script,
    seen: Arc<AtomicUsize>,
    arrived: Arc<Notify>,
}

fn sse(events: &[&str]) -> Response {
    let body: String = events.iter().map(|e| format!("{e}\n\n")).collect();
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

const ROLE: &str = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
const PIECE: &str =
    r#"data: {"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}"#;

async fn completions(axum::extract::State(s): axum::extract::State<ServerState>) -> Response {
    let n = s.seen.fetch_add(1, Ordering::SeqCst);
    s.arrived.notify_one();
    match s.script {
        Script::Hang => {
            let first = futures::stream::once(async {
                Ok::<_, std::convert::Infallible>(format!("{ROLE}\n\n{PIECE}\n\n"))
            });
            let body = Body::from_stream(futures::StreamExt::chain(
                first,
                futures::stream::pending(),
            ));
            ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
        }
        Script::Cycle => match n % 6 {
            0 => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":"too_many_requests"}}"#,
            )
                .into_response(),
            1 => (StatusCode::INTERNAL_SERVER_ERROR, "internal oops").into_response(),
            2 => sse(&[
                ROLE,
                PIECE,
                r#"data: {"error":{"message":"engine failed","type":"server_error","param":null,"code":"engine_failed"}}"#,
            ]),
            3 => sse(&[
                ROLE,
                ": keep-alive",
                PIECE,
                PIECE,
                r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#,
                r#"data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#,
                "data: [DONE]",
            ]),
            4 => sse(&[ROLE, PIECE]),
            _ => sse(&[ROLE, "data: {not json"]),
        },
    }
}

async fn models() -> impl IntoResponse {
    axum::Json(
        serde_json::json!({"object": "list", "data": [{"id": "scripted", "object": "model"}]}),
    )
}

struct Scripted {
    url: String,
    state: ServerState,
    stop: CancellationToken,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(script: Script) -> Scripted {
    let state = ServerState {
        script,
        seen: Arc::new(AtomicUsize::new(0)),
        arrived: Arc::new(Notify::new()),
    };
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(completions))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { until.cancelled().await })
            .await
    });
    Scripted { url, state, stop }
}

async fn load(cfg: LoadConfig, cancel: CancellationToken) -> Result<LoadReport, LoadError> {
    tokio::time::timeout(WAIT, run_load(cfg, cancel))
        .await
        .expect("the load run hung")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replies_are_counted_by_status_and_code() {
    let server = start(Script::Cycle).await;
    let report = load(
        LoadConfig {
            url: server.url.clone(),
            concurrency: 2,
            stop: StopAfter::Requests(12),
            ..LoadConfig::default()
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.model, "scripted");
    assert_eq!(report.requests_ok, 2, "{}", report.render_text());
    assert_eq!(report.requests_failed, 10);
    let mut groups: Vec<(Option<u16>, &str, u64)> = report
        .errors
        .iter()
        .map(|e| (e.status, e.code.as_str(), e.count))
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        vec![
            (Some(200), "bad_reply:invalid_json", 2),
            (Some(200), "bad_reply:truncated", 2),
            (Some(200), "engine_failed", 2),
            (Some(429), "too_many_requests", 2),
            (Some(500), "unknown", 2),
        ]
    );
    let busy = report
        .errors
        .iter()
        .find(|e| e.status == Some(429))
        .unwrap();
    assert_eq!(busy.message, "busy");
    let oops = report
        .errors
        .iter()
        .find(|e| e.status == Some(500))
        .unwrap();
    assert_eq!(oops.message, "internal oops");
    for s in &report.samples {
        assert_eq!(s.output_tokens, 2, "from the usage chunk");
        assert_eq!(s.prompt_tokens, Some(4));
        assert_eq!(s.itl_ms.len(), 1, "two content chunks, one gap");
        assert!(s.ttft_ms.unwrap() <= s.e2e_ms);
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
    }
    let text = report.render_text();
    assert!(
        text.contains("2 x HTTP 429 too_many_requests: busy"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_cancels_requests_in_flight() {
    let server = start(Script::Hang).await;
    let report = load(
        LoadConfig {
            url: server.url.clone(),
            model: Some("scripted".into()),
            concurrency: 2,
            stop: StopAfter::Duration(Duration::from_millis(300)),
            ..LoadConfig::default()
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            report.requests_ok,
            report.requests_failed,
            report.requests_cancelled
        ),
        (0, 0, 2),
        "{}",
        report.render_text()
    );
    assert!(!report.interrupted);
    assert_eq!(server.state.seen.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_token_ends_a_run_early() {
    let server = start(Script::Hang).await;
    let cancel = CancellationToken::new();
    let run = tokio::spawn(run_load(
        LoadConfig {
            url: server.url.clone(),
            model: Some("scripted".into()),
            concurrency: 1,
            stop: StopAfter::Requests(10),
            ..LoadConfig::default()
        },
        cancel.clone(),
    ));
    tokio::time::timeout(WAIT, server.state.arrived.notified())
        .await
        .expect("no request reached the server");
    cancel.cancel();
    let report = tokio::time::timeout(WAIT, run)
        .await
        .expect("the cancelled run hung")
        .unwrap()
        .unwrap();
    assert!(report.interrupted);
    assert_eq!(report.requests_cancelled, 1);
    assert_eq!(report.requests_ok + report.requests_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_an_error_not_a_crash() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/v1");
    let cfg = LoadConfig {
        url: url.clone(),
        concurrency: 1,
        stop: StopAfter::Requests(3),
        ..LoadConfig::default()
    };
    match load(cfg.clone(), CancellationToken::new()).await {
        Err(LoadError::Model(ModelsError::Request { url: asked, .. })) => {
            assert_eq!(asked, format!("{url}/models"));
        }
        other => panic!("expected a discovery error, got {other:?}"),
    }
    let report = load(
        LoadConfig {
            model: Some("m".into()),
            ..cfg
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.requests_failed, 3);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(
        (report.errors[0].status, report.errors[0].code.as_str()),
        (None, "connect")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prints_server_errors_and_goes_on() {
    let server = start(Script::Cycle).await;
    let args = ChatArgs {
        url: server.url.clone(),
        model: None,
        api_key: None,
        system: None,
        max_tokens: 4,
        temperature: 0.0,
        seed: Some(1),
    };
    // Turns 0-3 of the cycle: 429, 500, error mid-stream, a good answer.
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, run_chat(args, &b"a\nb\nc\nd\n"[..], &mut out))
        .await
        .expect("the chat session hung")
        .unwrap();
    let transcript = String::from_utf8(out).unwrap();
    let errors: Vec<&str> = transcript
        .lines()
        .filter_map(|l| l.split_once("error: ").map(|(_, m)| m))
        .collect();
    assert_eq!(
        errors,
        vec!["busy", "internal oops", "engine failed"],
        "{transcript}"
    );
    assert!(
        transcript.contains("toktok\n[4 prompt + 2 answer tokens"),
        "{transcript}"
    );
    assert!(
        transcript.ends_with("> \n"),
        "EOF ends the session: {transcript}"
    );
}

#[derive(Debug, clap::Parser)]
struct BenchCli {
    #[command(flatten)]
    bench: shoal_loadgen::BenchArgs,
}

fn bench_args(url: &str, extra: &[&str]) -> shoal_loadgen::BenchArgs {
    use clap::Parser as _;
    let head = ["bench", "--url", url];
    BenchCli::try_parse_from(head.iter().chain(extra).copied())
        .unwrap()
        .bench
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_bench_fails_only_when_every_request_failed() {
    let server = start(Script::Cycle).await;
    // The first request of the cycle is refused with 429.
    let args = bench_args(&server.url, &["--requests", "1", "--concurrency", "1"]);
    let err = tokio::time::timeout(WAIT, shoal_loadgen::run_bench(args))
        .await
        .expect("bench hung")
        .unwrap_err();
    assert!(err.to_string().contains("every request failed"), "{err}");
    // The next six include the one good answer.
    let args = bench_args(
        &server.url,
        &["--requests", "6", "--concurrency", "1", "--json"],
    );
    tokio::time::timeout(WAIT, shoal_loadgen::run_bench(args))
        .await
        .expect("bench hung")
        .unwrap();
    assert_eq!(server.state.seen.load(Ordering::SeqCst), 7);
    // A bad flag value is reported before any request.
    let args = bench_args(&server.url, &["--concurrency", "0"]);
    let err = shoal_loadgen::run_bench(args).await.unwrap_err();
    assert!(err.to_string().contains("concurrency"), "{err}");
    assert_eq!(server.state.seen.load(Ordering::SeqCst), 7);
}
