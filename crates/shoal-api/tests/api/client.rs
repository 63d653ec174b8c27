//! Through a real HTTP client and TCP connection on 127.0.0.1: what hyper does on the wire
//! (disconnect detection, graceful shutdown, large bodies) is only visible here.

use futures::StreamExt;
use serde_json::{Value, json};
use shoal_api::{ApiConfig, FinishReason};

use crate::support::*;

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

#[tokio::test]
async fn non_streamed_chat_over_tcp() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&["Hi", " there"], FinishReason::Stop));
    let server = TestServer::start(backend, ApiConfig::default()).await;
    let response = within(
        "the chat completion over TCP",
        client()
            .post(server.url("/v1/chat/completions"))
            .json(&chat_body(json!({})))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = within("the response body", response.json()).await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hi there");
    assert_eq!(body["usage"]["total_tokens"], PROMPT_TOKENS + 2);
}

#[tokio::test]
async fn streamed_chat_over_tcp_ends_with_done() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&["a", "b", "c"], FinishReason::Stop));
    let server = TestServer::start(backend, ApiConfig::default()).await;
    let response = within(
        "the stream's headers",
        client()
            .post(server.url("/v1/chat/completions"))
            .json(&chat_body(
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = within("the whole stream", response.text()).await.unwrap();
    let events = sse_data(&text);
    assert_eq!(
        events.len(),
        7,
        "role, 3 tokens, finish, usage, [DONE]: {text}"
    );
    assert_eq!(events[6], "[DONE]");
    let usage: Value = serde_json::from_str(&events[5]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_backend() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("first"),
        Step::WaitForCancel,
    ]));
    let server = TestServer::start(backend.clone(), ApiConfig::default()).await;
    let response = within(
        "the stream's headers",
        client()
            .post(server.url("/v1/chat/completions"))
            .json(&chat_body(json!({"stream": true})))
            .send(),
    )
    .await
    .unwrap();
    let mut stream = response.bytes_stream();
    let first = within("the first chunk over TCP", stream.next())
        .await
        .expect("a chunk")
        .unwrap();
    assert!(first.starts_with(b"data: "));
    let started = backend.wait_started().await;
    drop(stream); // closes the connection
    let cancelled = backend.wait_cancelled().await;
    assert_eq!(started, cancelled);
}

#[tokio::test]
async fn client_disconnect_while_waiting_cancels_the_backend() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![Step::Started, Step::WaitForCancel]));
    let server = TestServer::start(backend.clone(), ApiConfig::default()).await;
    let request = client()
        .post(server.url("/v1/chat/completions"))
        .json(&chat_body(json!({})))
        .send();
    let task = tokio::spawn(request);
    backend.wait_started().await;
    task.abort(); // the client gives up and closes the connection before any byte of response
    backend.wait_cancelled().await;
}

#[tokio::test]
async fn oversize_body_over_tcp_is_413() {
    let server = TestServer::start(ScriptedBackend::new(), ApiConfig::default()).await;
    let mut body = chat_body(json!({}));
    body["messages"][0]["content"] = json!("x".repeat(2 * 1024 * 1024));
    let response = within(
        "the 413 response",
        client()
            .post(server.url("/v1/chat/completions"))
            .json(&body)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = within("the error body", response.json()).await.unwrap();
    assert_eq!(assert_error_shape(&body)["code"], "body_too_large");
}

#[tokio::test]
async fn graceful_shutdown_drains_then_cancel_ends_the_rest() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("x"),
        Step::WaitForCancel,
    ]));
    let mut server = TestServer::start(backend.clone(), ApiConfig::default()).await;
    let response = within(
        "the stream's headers",
        client()
            .post(server.url("/v1/chat/completions"))
            .json(&chat_body(json!({"stream": true})))
            .send(),
    )
    .await
    .unwrap();
    backend.wait_started().await;

    // Phase 1: stop accepting; the open stream keeps the server draining.
    server.shutdown.cancel();
    let handle = server.handle.take().unwrap();
    tokio::task::yield_now().await;
    assert!(
        !handle.is_finished(),
        "serve returned while a stream was still open"
    );

    // Phase 3: cancel the rest; the stream ends with an error event and serve returns.
    server.state_cancel.cancel();
    backend.wait_cancelled().await;
    let text = within("the cancelled stream to end", response.text())
        .await
        .unwrap();
    assert!(text.contains("shutting_down"), "{text}");
    within("serve to return after the drain", handle)
        .await
        .unwrap()
        .unwrap();
}

/// Runs the official `openai` Python client (scripts/reference/openai_client_check.py) against
/// the gateway. Ignored by default because it needs python3 with `openai` installed:
/// `cargo test -p shoal-api -- --ignored openai_python_client`.
#[tokio::test]
#[ignore = "needs python3 with the openai package"]
async fn openai_python_client_accepts_the_gateway() {
    let server = TestServer::start(ScriptedBackend::new(), ApiConfig::default()).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/reference/openai_client_check.py");
    let output = within(
        "the openai client check script",
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg(server.url("/v1"))
            .output(),
    )
    .await
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
