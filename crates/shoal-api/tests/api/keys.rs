//! API keys from the key file: 401 for missing, wrong and revoked keys (revocation and creation
//! take effect on a running gateway), 429 for a key's rate limit and quota, open health routes.

use std::path::Path;

use axum::http::StatusCode;
use serde_json::{Value, json};
use shoal_api::keys::{self, Limits, NewKey};
use shoal_api::{ApiConfig, FinishReason};

use crate::support::*;

fn keyed_config(path: &Path) -> ApiConfig {
    ApiConfig {
        api_keys_file: Some(path.to_owned()),
        ..ApiConfig::default()
    }
}

fn create(path: &Path, name: &str, limits: Limits) -> NewKey {
    keys::create_key(path, name, limits).unwrap()
}

async fn chat_over_tcp(server: &TestServer, key: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&chat_body(json!({})));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = within("a chat completion", request.send()).await.unwrap();
    let status = response.status().as_u16();
    let body = within("its body", response.json()).await.unwrap();
    (status, body)
}

#[tokio::test]
async fn keys_gate_v1_and_revocation_and_creation_apply_to_a_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys.json");
    let alice = create(&path, "alice", Limits::default());
    let bob = create(&path, "bob", Limits::default());
    let backend = ScriptedBackend::new();
    let (server, state) = TestServer::start_gateway(backend, keyed_config(&path)).await;

    let (status, body) = chat_over_tcp(&server, None).await;
    assert_eq!(status, 401, "{body}");
    let error = assert_error_shape(&body);
    assert_eq!(error["code"], "invalid_api_key");
    assert_eq!(error["type"], "authentication_error");

    let mut wrong = alice.key.expose().to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    let (status, body) = chat_over_tcp(&server, Some(&wrong)).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = chat_over_tcp(&server, Some("sk-not-a-shoal-key")).await;
    assert_eq!(status, 401);

    let (status, body) = chat_over_tcp(&server, Some(alice.key.expose())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello world");

    // `shoal key revoke` while the gateway runs: refused on the very next request.
    keys::revoke_key(&path, &alice.record.id).unwrap();
    let (status, body) = chat_over_tcp(&server, Some(alice.key.expose())).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(assert_error_shape(&body)["code"], "invalid_api_key");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{body}"
    );
    let (status, _) = chat_over_tcp(&server, Some(bob.key.expose())).await;
    assert_eq!(status, 200);

    // `shoal key create` while the gateway runs: accepted on the very next request.
    let carol = create(&path, "carol", Limits::default());
    let (status, body) = chat_over_tcp(&server, Some(carol.key.expose())).await;
    assert_eq!(status, 200, "{body}");

    // Listing models needs a key too; health and metrics stay open.
    let client = reqwest::Client::new();
    let models = client.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    let models = client
        .get(server.url("/v1/models"))
        .bearer_auth(bob.key.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    for open in ["/healthz", "/readyz", "/metrics"] {
        let response = client.get(server.url(open)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{open}");
    }

    let text = state.metrics().encode().unwrap();
    for (reason, count) in [
        ("missing_key", 2),
        ("wrong_secret", 1),
        ("malformed_key", 1),
        ("revoked_key", 1),
    ] {
        let series = format!("shoal_auth_failures_total{{reason=\"{reason}\"}} {count}\n");
        assert!(text.contains(&series), "{series}: {text}");
    }
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys.json");
    let limits = Limits {
        rate_per_second: Some(0.2),
        burst: Some(2),
        quota_tokens: None,
    };
    let key = create(&path, "slow", limits);
    let other = create(&path, "other", Limits::default());
    let (router, state, _cancel) = app_with(ScriptedBackend::new(), keyed_config(&path));
    let request = |key: &str| {
        with_key(
            post_json("/v1/chat/completions", &chat_body(json!({}))),
            key,
        )
    };

    for _ in 0..2 {
        let (status, _, body) = call(&router, request(key.key.expose())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, headers, body) = call(&router, request(key.key.expose())).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let error = assert_error_shape(&body);
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["type"], "rate_limit_error");
    // One request's worth of tokens refills in 1 / 0.2 = 5 s.
    assert_eq!(headers["retry-after"], "5");

    // Another key has its own bucket.
    let (status, _, _) = call(&router, request(other.key.expose())).await;
    assert_eq!(status, StatusCode::OK);

    tokio::time::advance(std::time::Duration::from_secs(5)).await;
    let (status, _, body) = call(&router, request(key.key.expose())).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let text = state.metrics().encode().unwrap();
    assert!(
        text.contains("shoal_limit_refusals_total{reason=\"rate_limit_exceeded\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn spent_quota_answers_429_insufficient_quota_and_usage_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys.json");
    let limits = Limits {
        quota_tokens: Some(20),
        ..Limits::default()
    };
    let key = create(&path, "metered", limits);
    let backend = ScriptedBackend::new();
    // PROMPT_TOKENS (7) + 3 completion tokens per request.
    for _ in 0..3 {
        backend.push(Script::tokens(&["a", "b", "c"], FinishReason::Stop));
    }
    let (router, state, _cancel) = app_with(backend, keyed_config(&path));
    let request = || {
        with_key(
            post_json("/v1/completions", &completion_body(json!({}))),
            key.key.expose(),
        )
    };
    // 10 tokens, then 20: the second request is admitted below the quota and crosses it.
    for _ in 0..2 {
        let (status, _, body) = call(&router, request()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, headers, body) = call(&router, request()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let error = assert_error_shape(&body);
    assert_eq!(error["code"], "insufficient_quota");
    assert_eq!(error["type"], "insufficient_quota");
    assert!(
        !headers.contains_key("retry-after"),
        "a spent quota is not worth retrying"
    );

    state.close().await;
    let usage = keys::read_usage(&path).unwrap();
    assert_eq!(usage[&key.record.id], 20);
    let text = state.metrics().encode().unwrap();
    assert!(
        text.contains("shoal_limit_refusals_total{reason=\"insufficient_quota\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn require_api_key_refuses_everyone_until_a_key_exists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys.json");
    let config = ApiConfig {
        require_api_key: true,
        ..keyed_config(&path)
    };
    let (router, _state, _cancel) = app_with(ScriptedBackend::new(), config);
    let chat = || post_json("/v1/chat/completions", &chat_body(json!({})));
    let (status, _, _) = call(&router, chat()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&router, with_key(chat(), "sk-anything")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let key = create(&path, "first", Limits::default());
    let (status, _, body) = call(&router, with_key(chat(), key.key.expose())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn an_empty_key_file_leaves_the_gateway_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys.json");
    let (router, _state, _cancel) = app_with(ScriptedBackend::new(), keyed_config(&path));
    let chat = || post_json("/v1/chat/completions", &chat_body(json!({})));
    let (status, _, _) = call(&router, chat()).await;
    assert_eq!(status, StatusCode::OK);
    // Clients that always send some key still get through.
    let (status, _, _) = call(&router, with_key(chat(), "sk-whatever")).await;
    assert_eq!(status, StatusCode::OK);
}
