//! The audit log of a real gateway: one entry per generation request (served, refused, failed),
//! with the key, the nodes on the path, digests and token counts, chained so that
//! `shoal_api::audit::verify` accepts it, and continued across a restart.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest as _, Sha256};
use shoal_api::audit::{self, AuditConfig, AuditEntry, AuditResume};
use shoal_api::keys::{self, Limits};
use shoal_api::{ApiConfig, BackendError, FinishReason, ResumeStall};
use shoal_types::ErrorClass;

use crate::support::*;

fn audited(keys_file: &Path, log: &Path, include_text: bool) -> ApiConfig {
    ApiConfig {
        api_keys_file: Some(keys_file.to_owned()),
        audit: Some(AuditConfig {
            include_text,
            ..AuditConfig::new(log)
        }),
        ..ApiConfig::default()
    }
}

fn entries(log: &Path) -> Vec<AuditEntry> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn a_gateway_run_leaves_a_verifiable_chain_that_continues_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("api-keys.json");
    let log = dir.path().join("audit.jsonl");
    let key = keys::create_key(&keys_file, "alice", Limits::default()).unwrap();
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![
        Step::Path(&["agent-1", "agent-2"]),
        Step::Started,
        Step::Token("Hi"),
        Step::Token(" there"),
        Step::Finish(FinishReason::Stop),
    ]));
    backend.push(Script::Steps(vec![
        Step::Started,
        Step::Path(&["agent-3"]),
        Step::Token("par"),
        Step::MovedPath(&["agent-3", "agent-4"], 1),
        Step::Resumed(ResumeStall {
            moves: 1,
            stall: Duration::from_millis(1_250),
            recovery: Duration::from_millis(1_200),
            reprefill: Duration::from_millis(300),
        }),
        Step::Token("is"),
        Step::Fail(BackendError::new(
            ErrorClass::Unavailable,
            "node_lost",
            "the node went away",
        )),
    ]));
    let (server, _state) =
        TestServer::start_gateway(backend.clone(), audited(&keys_file, &log, false)).await;
    let client = reqwest::Client::new();
    let chat = |key: Option<&str>, extra| {
        let mut request = client
            .post(server.url("/v1/chat/completions"))
            .json(&chat_body(extra));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };

    let ok = within("a served request", chat(Some(key.key.expose()), json!({})))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let request_id = ok.headers()["x-request-id"].to_str().unwrap().to_owned();
    let refused = within("a refused request", chat(None, json!({})))
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let streamed = within(
        "a stream that fails",
        chat(Some(key.key.expose()), json!({"stream": true})),
    )
    .await
    .unwrap();
    assert_eq!(streamed.status(), 200);
    let text = within("the failed stream", streamed.text()).await.unwrap();
    assert!(text.contains("node_lost"), "{text}");
    server.stop().await;

    let report = audit::verify_file(&log).unwrap().unwrap();
    assert_eq!(report.entries, 3);
    let got = entries(&log);

    let served = &got[0];
    assert_eq!(served.seq, 1);
    assert_eq!(served.request_id, request_id);
    assert_eq!(served.key_id.as_deref(), Some(key.record.id.as_str()));
    assert_eq!(served.model.as_deref(), Some(MODEL));
    assert_eq!(served.nodes, ["agent-1", "agent-2"]);
    assert_eq!(served.failovers, 0);
    // An entry with no move says nothing of moves (older entries hash the same).
    let first_line = std::fs::read_to_string(&log).unwrap();
    let first_line = first_line.lines().next().unwrap();
    assert!(!first_line.contains("failovers") && !first_line.contains("resumes"));
    assert_eq!(served.outcome, "ok");
    assert_eq!(served.reason, None);
    assert_eq!(
        served.prompt_sha256.as_deref(),
        Some(sha256(r#"[{"content":"Say hello","role":"user"}]"#).as_str())
    );
    assert_eq!(
        served.response_sha256.as_deref(),
        Some(sha256("Hi there").as_str())
    );
    assert_eq!(
        (served.prompt_tokens, served.completion_tokens),
        (PROMPT_TOKENS, 2)
    );
    assert!(served.prompt.is_none() && served.response.is_none());
    assert!(served.time.ends_with('Z'), "{}", served.time);

    let refused = &got[1];
    assert_eq!(refused.key_id, None);
    assert_eq!(refused.model, None);
    assert_eq!(refused.outcome, "unauthenticated");
    assert_eq!(refused.reason.as_deref(), Some("invalid_api_key"));
    assert_eq!(refused.prompt_sha256, None);
    assert_eq!(refused.response_sha256, None);
    assert_eq!(refused.prev, served.hash.clone().unwrap());

    let failed = &got[2];
    assert_eq!(failed.nodes, ["agent-3", "agent-4"]);
    assert_eq!(failed.failovers, 1);
    assert_eq!(
        failed.resumes,
        [AuditResume {
            moves: 1,
            stall_ms: 1_250,
            recovery_ms: 1_200,
            reprefill_ms: 300,
        }]
    );
    assert_eq!(failed.outcome, "unavailable");
    assert_eq!(failed.reason.as_deref(), Some("node_lost"));
    assert_eq!(
        failed.response_sha256.as_deref(),
        Some(sha256("paris").as_str())
    );
    assert_eq!(failed.completion_tokens, 2);

    // A restarted gateway continues the chain.
    let (server, _state) =
        TestServer::start_gateway(backend, audited(&keys_file, &log, true)).await;
    let response = within(
        "a request after the restart",
        reqwest::Client::new()
            .post(server.url("/v1/completions"))
            .bearer_auth(key.key.expose())
            .json(&completion_body(json!({})))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    server.stop().await;
    let report = audit::verify_file(&log).unwrap().unwrap();
    assert_eq!(report.entries, 4);
    let got = entries(&log);
    assert_eq!(got[3].seq, 4);
    assert_eq!(got[3].prev, got[2].hash.clone().unwrap());
    // With include_text the texts are there too.
    assert_eq!(got[3].prompt.as_deref(), Some("Once upon a time"));
    assert_eq!(got[3].response.as_deref(), Some("Hello world"));

    // Any edit to the file is caught.
    let text = std::fs::read_to_string(&log).unwrap();
    let edited = text.replacen("\"completion_tokens\":2", "\"completion_tokens\":0", 1);
    assert_ne!(edited, text);
    std::fs::write(&log, edited).unwrap();
    let failure = audit::verify_file(&log).unwrap().unwrap_err();
    assert_eq!(failure.line, 1);
}

#[tokio::test]
async fn a_client_that_goes_away_is_recorded_as_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let backend = ScriptedBackend::new();
    backend.push(Script::Steps(vec![Step::Started, Step::WaitForCancel]));
    let config = ApiConfig {
        audit: Some(AuditConfig::new(&log)),
        ..ApiConfig::default()
    };
    let (server, state) = TestServer::start_gateway(backend.clone(), config).await;
    let request = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&chat_body(json!({})))
        .send();
    let task = tokio::spawn(request);
    backend.wait_started().await;
    task.abort();
    backend.wait_cancelled().await;
    server.stop().await;
    assert!(!state.flush_audit().await, "the log is closed after stop");
    let got = entries(&log);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].outcome, "cancelled");
    assert_eq!(got[0].reason.as_deref(), Some("client_disconnected"));
    assert_eq!(got[0].key_id, None);
}
