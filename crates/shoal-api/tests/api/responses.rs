//! Non-streamed responses, models, health and request ids.

use axum::http::{StatusCode, header};
use serde_json::json;
use shoal_api::{ChatMessage, FinishReason, Prompt, Role, SamplingParams};

use crate::support::*;

#[tokio::test]
async fn chat_completion_has_openai_shape() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(
        &["Hello", ",", " world"],
        FinishReason::Stop,
    ));
    let router = app(backend.clone());
    let (status, headers, body) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;

    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let request_id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(body["id"], format!("chatcmpl-{request_id}"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(choices[0]["message"]["content"], "Hello, world");
    assert_eq!(choices[0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3, "total_tokens": PROMPT_TOKENS + 3})
    );
}

#[tokio::test]
async fn length_finish_reason_is_reported() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&["a", "b"], FinishReason::Length));
    let router = app(backend.clone());
    let (status, _, body) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({"max_tokens": 2}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(backend.requests()[0].max_tokens, Some(2));
}

#[tokio::test]
async fn parameters_reach_the_backend() {
    let backend = ScriptedBackend::new();
    let router = app(backend.clone());
    let body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
        ],
        "max_completion_tokens": 16, "temperature": 0.5, "top_p": 0.8, "seed": 7,
        "stop": "\n\n", "top_k": 20, "min_p": 0.1, "repetition_penalty": 1.2,
        "frequency_penalty": 0.3, "presence_penalty": -0.4, "n": 1, "user": "someone",
        "logprobs": false
    });
    let (status, headers, _) = call(&router, post_json("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(
        req.request_id.as_str(),
        headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(req.model.as_str(), MODEL);
    assert_eq!(
        req.prompt,
        Prompt::Chat(vec![
            ChatMessage {
                role: Role::System,
                content: "Be terse.".into()
            },
            ChatMessage {
                role: Role::User,
                content: "Hi".into()
            },
        ])
    );
    assert_eq!(req.max_tokens, Some(16));
    assert_eq!(req.stop, vec!["\n\n".to_string()]);
    assert_eq!(
        req.sampling,
        SamplingParams {
            temperature: Some(0.5),
            top_p: Some(0.8),
            top_k: Some(20),
            min_p: Some(0.1),
            repetition_penalty: Some(1.2),
            frequency_penalty: Some(0.3),
            presence_penalty: Some(-0.4),
            seed: Some(7),
        }
    );
}

#[tokio::test]
async fn text_completion_has_openai_shape() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&[" there", " was"], FinishReason::Length));
    let router = app(backend.clone());
    let (status, _, body) = call(
        &router,
        post_json(
            "/v1/completions",
            &completion_body(json!({"max_tokens": 2, "stop": ["x", "y"]})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["choices"][0]["text"], " there was");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 2);
    assert_eq!(body["usage"]["total_tokens"], PROMPT_TOKENS + 2);
    let req = &backend.requests()[0];
    assert_eq!(req.prompt, Prompt::Text("Once upon a time".into()));
    assert_eq!(req.stop, vec!["x".to_string(), "y".to_string()]);
}

#[tokio::test]
async fn models_are_listed_and_looked_up() {
    let router = app(ScriptedBackend::new());
    let (status, _, body) = call(&router, get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        data[0],
        json!({"id": MODEL, "object": "model", "created": 1_700_000_000u64, "owned_by": "shoal", "context_length": 2048})
    );

    let (status, _, body) = call(&router, get("/v1/models/test-model")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], MODEL);

    let (status, _, body) = call(&router, get("/v1/models/org/with-slash")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["owned_by"], "org");

    let (status, _, body) = call(&router, get("/v1/models/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error = assert_error_shape(&body);
    assert_eq!(error["code"], "model_not_found");
}

#[tokio::test]
async fn health_and_readiness() {
    let backend = ScriptedBackend::new();
    let router = app(backend.clone());
    let (status, _, body) = call(&router, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");

    let (status, _, body) = call(&router, get("/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");

    backend.set_ready(false);
    let (status, _, body) = call(&router, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({"status": "not_ready", "reason": "loading_model"})
    );
    // Liveness does not depend on the backend.
    let (status, _, _) = call(&router, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn request_ids_are_honoured_or_generated() {
    let backend = ScriptedBackend::new();
    let router = app(backend.clone());

    let mut req = post_json("/v1/chat/completions", &chat_body(json!({})));
    req.headers_mut()
        .insert("x-request-id", "client-id-42".parse().unwrap());
    let (_, headers, body) = call(&router, req).await;
    assert_eq!(headers["x-request-id"], "client-id-42");
    assert_eq!(body["id"], "chatcmpl-client-id-42");
    assert_eq!(backend.requests()[0].request_id.as_str(), "client-id-42");

    // An id with characters that could forge log lines is replaced, not echoed.
    let mut req = get("/healthz");
    req.headers_mut()
        .insert("x-request-id", "bad id\tx".parse().unwrap());
    let (_, headers, _) = call(&router, req).await;
    let generated = headers["x-request-id"].to_str().unwrap();
    assert_ne!(generated, "bad id\tx");
    assert_eq!(generated.len(), 32);

    let (_, first, _) = call(&router, get("/healthz")).await;
    let (_, second, _) = call(&router, get("/healthz")).await;
    assert_ne!(first["x-request-id"], second["x-request-id"]);
}

#[tokio::test]
async fn api_key_is_enforced_when_configured() {
    let config = shoal_api::ApiConfig {
        api_key: Some("sk-test".into()),
        ..shoal_api::ApiConfig::default()
    };
    let (router, _, _) = app_with(ScriptedBackend::new(), config);

    let (status, _, body) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let error = assert_error_shape(&body);
    assert_eq!(error["type"], "authentication_error");
    assert_eq!(error["code"], "invalid_api_key");

    let mut req = get("/v1/models");
    req.headers_mut()
        .insert(header::AUTHORIZATION, "Bearer sk-wrong".parse().unwrap());
    let (status, _, _) = call(&router, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let mut req = post_json("/v1/chat/completions", &chat_body(json!({})));
    req.headers_mut()
        .insert(header::AUTHORIZATION, "Bearer sk-test".parse().unwrap());
    let (status, _, _) = call(&router, req).await;
    assert_eq!(status, StatusCode::OK);

    // Probes stay open for orchestrators.
    let (status, _, _) = call(&router, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
}
