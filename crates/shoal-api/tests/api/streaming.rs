//! SSE streaming: chunk sequences, usage, mid-stream failures and cancellation on disconnect.

use axum::http::{StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shoal_api::{BackendError, FinishReason};
use shoal_types::ErrorClass;
use tower::ServiceExt;

use crate::support::*;

fn parse_chunks(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect()
}

#[tokio::test]
async fn chat_stream_chunk_sequence() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&["Hel", "lo", "!"], FinishReason::Stop));
    let router = app(backend);
    let (status, headers, text) = call_text(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks = parse_chunks(&events[..events.len() - 1]);
    // role chunk, three content chunks, finish chunk; no usage chunk unless asked for.
    assert_eq!(chunks.len(), 5, "{text}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["model"], MODEL);
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
    let content: Vec<&str> = chunks[1..4]
        .iter()
        .map(|c| {
            assert!(c["choices"][0]["finish_reason"].is_null());
            assert!(c["choices"][0]["delta"].get("role").is_none());
            c["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(content, ["Hel", "lo", "!"]);
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn include_usage_adds_a_final_usage_chunk() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&["a", "b"], FinishReason::Length));
    let router = app(backend);
    let body = chat_body(
        json!({"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 2}),
    );
    let (status, _, text) = call_text(&router, post_json("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_chunks(&events[..events.len() - 1]);
    assert_eq!(chunks.len(), 5, "{text}");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    let usage_chunk = &chunks[4];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": PROMPT_TOKENS + 2})
    );
}

#[tokio::test]
async fn text_completion_stream() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&[" x", " y"], FinishReason::Stop));
    let router = app(backend);
    let body = completion_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (status, _, text) = call_text(&router, post_json("/v1/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_chunks(&events[..events.len() - 1]);
    // Two text chunks, the finish chunk, the usage chunk (no role chunk for completions).
    assert_eq!(chunks.len(), 4, "{text}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
    }
    assert_eq!(chunks[0]["choices"][0]["text"], " x");
    assert_eq!(chunks[1]["choices"][0]["text"], " y");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn mid_stream_failure_becomes_an_error_event_and_ends_the_stream() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("one"),
        Step::Fail(BackendError::new(
            ErrorClass::Unavailable,
            "node_lost",
            "A node serving this request became unreachable.",
        )),
        Step::Token("never sent"),
    ]));
    let (router, state, _) = app_with(backend, shoal_api::ApiConfig::default());
    let (status, _, text) = call_text(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    assert!(!text.contains("never sent"));
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = assert_error_shape(&last);
    assert_eq!(error["code"], "node_lost");
    assert_eq!(error["type"], "service_unavailable_error");
    assert_eq!(events.len(), 3, "role chunk, one token, error: {text}");
    let metrics = state.metrics().encode().unwrap();
    assert!(
        metrics.contains("shoal_request_outcomes_total{class=\"unavailable\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_backend() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("first"),
        Step::WaitForCancel,
    ]));
    let (router, state, _) = app_with(backend.clone(), shoal_api::ApiConfig::default());
    let response = within(
        "the streaming response headers",
        router.oneshot(post_json(
            "/v1/chat/completions",
            &chat_body(json!({"stream": true})),
        )),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let frame = within("the first SSE frame", body.frame())
        .await
        .expect("a frame")
        .unwrap();
    let first = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let started = backend.wait_started().await;
    assert!(
        !state
            .metrics()
            .encode()
            .unwrap()
            .contains("class=\"cancelled\"} 1")
    );

    drop(body); // the client went away
    let cancelled = backend.wait_cancelled().await;
    assert_eq!(started, cancelled);
    let metrics = state.metrics().encode().unwrap();
    assert!(
        metrics.contains("shoal_request_outcomes_total{class=\"cancelled\"} 1"),
        "{metrics}"
    );
    assert_eq!(state.metrics().in_flight(), 0);
}

#[tokio::test]
async fn dropping_a_pending_non_streamed_request_cancels_the_backend() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![Step::Started, Step::WaitForCancel]));
    let router = app(backend.clone());
    let task =
        tokio::spawn(router.oneshot(post_json("/v1/chat/completions", &chat_body(json!({})))));
    backend.wait_started().await;
    task.abort(); // hyper drops the handler future the same way when the connection closes
    backend.wait_cancelled().await;
}

#[tokio::test]
async fn shutdown_cancellation_ends_open_streams_with_an_error_event() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("t"),
        Step::WaitForCancel,
    ]));
    let (router, _, gateway_cancel) = app_with(backend.clone(), shoal_api::ApiConfig::default());
    let response = within(
        "the streaming response headers",
        router.oneshot(post_json(
            "/v1/chat/completions",
            &chat_body(json!({"stream": true})),
        )),
    )
    .await
    .unwrap();
    backend.wait_started().await;
    gateway_cancel.cancel();
    backend.wait_cancelled().await;
    let bytes = within(
        "the cancelled stream to end",
        response.into_body().collect(),
    )
    .await
    .unwrap()
    .to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let events = sse_data(&text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(assert_error_shape(&last)["code"], "shutting_down", "{text}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
}
