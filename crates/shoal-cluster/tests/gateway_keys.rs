//! The coordinator's gateway with an API key file and an audit log: a key revoked while the
//! coordinator runs is refused on the next request, and the audit log the run leaves verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use shoal_api::audit::{self, AuditConfig, AuditEntry};
use shoal_api::keys::{self, Limits};
use shoal_cluster::{Coordinator, CoordinatorOptions};
use shoal_control::CoordinatorConfig;
use shoal_net::{ClusterCa, PeerIdentity, Role, TlsMode};
use shoal_node::{Agent, AgentConfig, ModelFile};
use shoal_types::{ModelId, NodeId};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "tiny";
const WAIT: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn tls(ca: &ClusterCa, role: Role, name: &str) -> TlsMode {
    let id = PeerIdentity::new(ca.cluster_id(), role, name).unwrap();
    let hosts = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let cert = ca.issue(&id, &hosts, Duration::from_secs(3600)).unwrap();
    TlsMode::Mtls(cert.into_material(ca.cert_pem()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_on_a_running_coordinator_and_auditing_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    shoal_synth::write_model(&shoal_synth::SynthSpec::tiny_llama(), &model_path).unwrap();
    let bytes = std::fs::read(&model_path).unwrap();
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let spec = shoal_cluster::model_spec(ModelId::new(MODEL), &model_path, sha256.clone()).unwrap();
    let config = CoordinatorConfig {
        lease_ms: 1500,
        heartbeat_interval_ms: 200,
        kv_reserve_tokens: 256,
        models: vec![spec],
        ..CoordinatorConfig::default()
    }
    .validate()
    .unwrap();

    let keys_file = dir.path().join("api-keys.json");
    let audit_log = dir.path().join("audit.jsonl");
    let key = keys::create_key(&keys_file, "tester", Limits::default()).unwrap();
    let ca = ClusterCa::generate("test-cluster").unwrap();
    let mut opts =
        CoordinatorOptions::on_loopback(config, tls(&ca, Role::Coordinator, "coordinator"));
    opts.api.api_keys_file = Some(keys_file.clone());
    opts.api.audit = Some(AuditConfig::new(&audit_log));
    let coordinator = within(
        "starting the coordinator",
        Coordinator::start(opts, CancellationToken::new()),
    )
    .await
    .unwrap();
    let agent_cancel = CancellationToken::new();
    let agent = within(
        "starting an agent",
        Agent::start(
            AgentConfig {
                node_id: NodeId::new("agent-1"),
                coordinator: coordinator.grpc_addr().to_string(),
                tls: tls(&ca, Role::Agent, "agent-1"),
                data_listen: "127.0.0.1:0".parse().unwrap(),
                advertise_addr: None,
                http_listen: None,
                models: vec![ModelFile {
                    id: ModelId::new(MODEL),
                    path: model_path.clone(),
                    sha256,
                    bytes: bytes.len() as u64,
                }],
                threads: 1,
                engine: shoal_engine::EngineConfig::default(),
                default_max_tokens: 8,
                memory_budget: None,
                checkpoint_store: None,
                benchmark: true,
                model_keys: None,
            },
            agent_cancel.clone(),
        ),
    )
    .await
    .unwrap();

    let http = reqwest::Client::new();
    let base = format!("http://{}", coordinator.http_addr());
    within("the gateway becoming ready", async {
        while http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
            != 200
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let chat = |key: Option<&str>| {
        let mut request = http.post(format!("{base}/v1/chat/completions")).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body)
        }
    };

    let (status, body) = within("a request without a key", chat(None)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, body) = within("a request with the key", chat(Some(key.key.expose()))).await;
    assert_eq!(status, 200, "{body}");
    let completion_tokens = body["usage"]["completion_tokens"].as_u64().unwrap();

    keys::revoke_key(&keys_file, &key.record.id).unwrap();
    let (status, body) = within(
        "a request with the revoked key",
        chat(Some(key.key.expose())),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");

    agent_cancel.cancel();
    drop(agent);
    within("the coordinator to shut down", coordinator.shutdown())
        .await
        .unwrap();

    let report = audit::verify_file(&audit_log).unwrap().unwrap();
    assert_eq!(report.entries, 3);
    let entries: Vec<AuditEntry> = std::fs::read_to_string(&audit_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcomes: Vec<&str> = entries.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(outcomes, ["unauthenticated", "ok", "unauthenticated"]);
    let served = &entries[1];
    assert_eq!(served.key_id.as_deref(), Some(key.record.id.as_str()));
    assert_eq!(served.model.as_deref(), Some(MODEL));
    assert_eq!(u64::from(served.completion_tokens), completion_tokens);
    assert!(served.prompt_sha256.is_some() && served.response_sha256.is_some());
    // The revoked key's refusal names no key: it did not authenticate.
    assert_eq!(entries[2].key_id, None);
}
