//! Every error path: status, headers and the OpenAI error JSON shape.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use serde_json::{Value, json};
use shoal_api::{ApiConfig, BackendError, FinishReason};
use shoal_types::ErrorClass;

use crate::support::*;

/// Posts `body` to the chat endpoint and checks status, `code` and `param` of the error.
async fn expect_chat_error(
    body: Value,
    status: StatusCode,
    code: &str,
    param: Option<&str>,
) -> Value {
    let backend = ScriptedBackend::new();
    let router = app(backend.clone());
    let (got, _, response) = call(&router, post_json("/v1/chat/completions", &body)).await;
    assert_eq!(got, status, "{body} -> {response}");
    let error = assert_error_shape(&response);
    assert_eq!(error["code"], code, "{body} -> {response}");
    assert_eq!(error["param"].as_str(), param, "{body} -> {response}");
    assert!(
        backend.requests().is_empty(),
        "an invalid request reached the backend"
    );
    response
}

#[tokio::test]
async fn unknown_field_is_rejected_by_name() {
    let response = expect_chat_error(
        chat_body(json!({"tools": []})),
        StatusCode::BAD_REQUEST,
        "unknown_parameter",
        Some("tools"),
    )
    .await;
    assert_eq!(response["error"]["type"], "invalid_request_error");
    assert!(
        response["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tools")
    );

    expect_chat_error(
        chat_body(json!({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]})),
        StatusCode::BAD_REQUEST,
        "unknown_parameter",
        Some("messages[0].tool_call_id"),
    )
    .await;
    expect_chat_error(
        chat_body(json!({"stream": true, "stream_options": {"include_usage": true, "extra": 1}})),
        StatusCode::BAD_REQUEST,
        "unknown_parameter",
        Some("stream_options.extra"),
    )
    .await;
}

#[tokio::test]
async fn malformed_json_names_the_position() {
    let router = app(ScriptedBackend::new());
    let req = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"model": "test-model", "messages": [}"#))
        .unwrap();
    let (status, _, body) = call(&router, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = assert_error_shape(&body);
    assert_eq!(error["code"], "invalid_json");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("line 1 column"), "{message}");
    assert!(message.contains("messages"), "{message}");
}

#[tokio::test]
async fn wrong_types_and_missing_fields() {
    expect_chat_error(
        chat_body(json!({"temperature": "hot"})),
        StatusCode::BAD_REQUEST,
        "invalid_type",
        Some("temperature"),
    )
    .await;
    expect_chat_error(
        chat_body(json!({"messages": [{"role": "tool", "content": "x"}]})),
        StatusCode::BAD_REQUEST,
        "invalid_type",
        Some("messages[0].role"),
    )
    .await;
    let response = expect_chat_error(
        json!({"messages": []}),
        StatusCode::BAD_REQUEST,
        "invalid_type",
        None,
    )
    .await;
    assert!(
        response["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model")
    );
}

#[tokio::test]
async fn content_type_must_be_json() {
    let router = app(ScriptedBackend::new());
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut builder = Request::post("/v1/chat/completions");
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        let req = builder
            .body(Body::from(chat_body(json!({})).to_string()))
            .unwrap();
        let (status, _, body) = call(&router, req).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(assert_error_shape(&body)["code"], "unsupported_media_type");
    }
}

#[tokio::test]
async fn declared_oversize_body_is_refused_before_reading() {
    let router = app(ScriptedBackend::new());
    let polled = Arc::new(AtomicUsize::new(0));
    let counter = polled.clone();
    // A 100 MB body announced by Content-Length, produced lazily in 64 KiB chunks.
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let stream = futures::stream::iter(0..1600).map(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(chunk.clone())
    });
    let req = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, 1600 * 64 * 1024)
        .body(Body::from_stream(stream))
        .unwrap();
    let (status, _, body) = call(&router, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(assert_error_shape(&body)["code"], "body_too_large");
    assert_eq!(
        polled.load(Ordering::SeqCst),
        0,
        "the body was read despite its declared size"
    );
}

#[tokio::test]
async fn undeclared_oversize_body_is_cut_off_at_the_limit() {
    let config = ApiConfig {
        body_limit_bytes: 256 * 1024,
        ..ApiConfig::default()
    };
    let (router, _, _) = app_with(ScriptedBackend::new(), config);
    let polled = Arc::new(AtomicUsize::new(0));
    let counter = polled.clone();
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    // 100 MB without Content-Length (chunked): must stop shortly after the 256 KiB limit.
    let stream = futures::stream::iter(0..1600).map(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(chunk.clone())
    });
    let req = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    let (status, _, body) = call(&router, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(assert_error_shape(&body)["code"], "body_too_large");
    let read = polled.load(Ordering::SeqCst);
    assert!(
        read <= 5,
        "read {read} chunks of 64 KiB for a 256 KiB limit"
    );
}

use futures::StreamExt as _;

#[tokio::test]
async fn parameter_ranges_are_validated() {
    for (extra, param) in [
        (json!({"n": 2}), "n"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"temperature": 2.01}), "temperature"),
        (json!({"temperature": -1}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"logprobs": true}), "logprobs"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
    ] {
        let response = crate::support::within("router", async {
            let router = app(ScriptedBackend::new());
            call(
                &router,
                post_json("/v1/chat/completions", &chat_body(extra.clone())),
            )
            .await
        })
        .await;
        assert_eq!(response.0, StatusCode::BAD_REQUEST, "{extra}");
        let error = assert_error_shape(&response.2);
        assert_eq!(error["param"], param, "{extra}");
        assert_eq!(error["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let backend = ScriptedBackend::new();
        let router = app(backend.clone());
        let body = if path.contains("chat") {
            chat_body(json!({"model": "gpt-9"}))
        } else {
            completion_body(json!({"model": "gpt-9"}))
        };
        let (status, _, body) = call(&router, post_json(path, &body)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        let error = assert_error_shape(&body);
        assert_eq!(error["code"], "model_not_found");
        assert_eq!(error["param"], "model");
        assert!(error["message"].as_str().unwrap().contains("gpt-9"));
        assert!(backend.requests().is_empty());
    }
}

#[tokio::test]
async fn unknown_route_and_wrong_method() {
    let router = app(ScriptedBackend::new());
    let (status, _, body) = call(&router, get("/v1/embeddings")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(assert_error_shape(&body)["code"], "unknown_url");

    let (status, _, body) = call(&router, get("/v1/chat/completions")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(assert_error_shape(&body)["code"], "method_not_allowed");
}

/// Backend refusals keep their class: status, type, code, and Retry-After where retryable.
#[tokio::test]
async fn backend_refusals_map_by_class() {
    for (class, status, kind, retry) in [
        (
            ErrorClass::Unavailable,
            503,
            "service_unavailable_error",
            true,
        ),
        (ErrorClass::CapacityExhausted, 429, "rate_limit_error", true),
        (
            ErrorClass::InvalidRequest,
            400,
            "invalid_request_error",
            false,
        ),
        (ErrorClass::NotFound, 404, "not_found_error", false),
        (ErrorClass::DeadlineExceeded, 504, "timeout_error", false),
        (ErrorClass::PermissionDenied, 403, "permission_error", false),
    ] {
        let backend = ScriptedBackend::new();
        backend.push(Script::Refuse(BackendError::new(
            class,
            "some_reason",
            "client-safe text",
        )));
        let router = app(backend.clone());
        let (got, headers, body) = call(
            &router,
            post_json("/v1/chat/completions", &chat_body(json!({}))),
        )
        .await;
        assert_eq!(got.as_u16(), status, "{class}");
        let error = assert_error_shape(&body);
        assert_eq!(error["type"], kind, "{class}");
        assert_eq!(error["code"], "some_reason");
        assert_eq!(error["message"], "client-safe text");
        assert_eq!(headers.contains_key(header::RETRY_AFTER), retry, "{class}");
        if retry {
            assert_eq!(headers[header::RETRY_AFTER], "1");
        }
    }
}

#[tokio::test]
async fn failure_before_any_token_is_an_http_error() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![Step::Fail(BackendError::new(
        ErrorClass::InvalidRequest,
        "prompt_too_long",
        "The prompt has 5000 tokens; the model's context is 2048.",
    ))]));
    let router = app(backend);
    let (status, _, body) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(assert_error_shape(&body)["code"], "prompt_too_long");
}

#[tokio::test]
async fn internal_errors_hide_operator_detail() {
    let secret = "mmap of /srv/models/x.gguf failed: errno 12 at 0xdeadbeef";
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("partial"),
        Step::Fail(BackendError::new(
            ErrorClass::Internal,
            "kernel_fault",
            secret,
        )),
    ]));
    backend.push(Script::Refuse(BackendError::new(
        ErrorClass::Internal,
        "oom",
        secret,
    )));
    let router = app(backend);
    for _ in 0..2 {
        let (status, _, text) = call_text(
            &router,
            post_json("/v1/chat/completions", &chat_body(json!({}))),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            !text.contains("deadbeef") && !text.contains("/srv"),
            "{text}"
        );
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(assert_error_shape(&body)["type"], "server_error");
    }
}

#[tokio::test]
async fn truncated_backend_stream_is_internal() {
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("x"),
        Step::Close,
    ]));
    let router = app(backend);
    let (status, _, body) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        assert_error_shape(&body)["code"],
        "backend_stream_truncated"
    );
}

#[tokio::test]
async fn admission_limit_gives_429_with_retry_after() {
    let backend = ScriptedBackend::new();
    let config = ApiConfig {
        max_in_flight: 1,
        retry_after: std::time::Duration::from_secs(3),
        ..ApiConfig::default()
    };
    let (router, state, _) = app_with(backend.clone(), config);
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Token("a"),
        Step::WaitForCancel,
    ]));
    // The first request streams and holds the only permit while its body is alive.
    let first = within(
        "the first (admitted) request to answer",
        tower::ServiceExt::oneshot(
            router.clone(),
            post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
        ),
    )
    .await
    .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    backend.wait_started().await;
    assert_eq!(state.metrics().in_flight(), 1);

    let (status, headers, body) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "3");
    let error = assert_error_shape(&body);
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["code"], "too_many_requests");

    // Dropping the stream frees the permit; the next request is admitted.
    drop(first);
    backend.wait_cancelled().await;
    assert_eq!(state.metrics().in_flight(), 0);
    backend.push(Script::tokens(&["ok"], FinishReason::Stop));
    let (status, _, _) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}
