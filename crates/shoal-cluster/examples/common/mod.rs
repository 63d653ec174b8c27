//! What the cluster benchmarks share: certificates from a throwaway CA, the model file's
//! identity, a streamed chat completion read chunk by chunk, a median.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use shoal_control::ModelSpec;
use shoal_net::{ClusterCa, PeerIdentity, Role, TlsMode};
use shoal_node::ModelFile;
use shoal_types::ModelId;
use std::path::Path;
use std::time::{Duration, Instant};

/// The model every benchmark downloads with `shoal model fetch`.
pub const DEFAULT_MODEL: &str = "/root/.cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// mTLS material for `name` in `role`, issued by `ca` for loopback.
pub fn tls(ca: &ClusterCa, role: Role, name: &str) -> TlsMode {
    let id = PeerIdentity::new(ca.cluster_id(), role, name).unwrap();
    let hosts = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let cert = ca.issue(&id, &hosts, Duration::from_secs(3600)).unwrap();
    TlsMode::Mtls(cert.into_material(ca.cert_pem()))
}

/// The file at `path` served as `id`: what agents load and the spec the coordinator plans.
pub fn model_file(id: &str, path: &Path) -> (ModelFile, ModelSpec) {
    let bytes = std::fs::read(path).expect("reading the model (run `shoal model fetch`)");
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let file = ModelFile {
        id: ModelId::new(id),
        path: path.to_path_buf(),
        sha256: sha256.clone(),
        bytes: bytes.len() as u64,
    };
    drop(bytes);
    let spec = shoal_cluster::model_spec(ModelId::new(id), path, sha256).unwrap();
    (file, spec)
}

/// One streamed completion as the client saw it.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// When the request was sent.
    pub start: Instant,
    /// When each content delta with text arrived.
    pub arrivals: Vec<Instant>,
    /// The content, concatenated.
    pub text: String,
    /// Usage: prompt and completion tokens.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Streamed {
    /// First content delta (or the start when there was none).
    pub fn first(&self) -> Instant {
        self.arrivals.first().copied().unwrap_or(self.start)
    }

    /// Last content delta (or the start when there was none).
    pub fn last(&self) -> Instant {
        self.arrivals.last().copied().unwrap_or(self.start)
    }

    /// Decode tokens/s: tokens after the first over the time between first and last.
    pub fn decode_rate(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / (self.last() - self.first()).as_secs_f64()
    }

    /// The longest gap between two content deltas from delta `i` on (from delta `i - 1` to
    /// `i`, and every later pair).
    pub fn longest_gap_from(&self, i: usize) -> Duration {
        self.arrivals
            .get(i.saturating_sub(1)..)
            .unwrap_or_default()
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

/// Streams the chat completion `body` from the gateway at `http_addr`; `at(n)` is called
/// after the n-th content delta with text (to inject faults). Panics on an error event.
pub async fn stream_chat(
    http: &reqwest::Client,
    http_addr: std::net::SocketAddr,
    mut body: Value,
    mut at: impl FnMut(usize),
) -> Streamed {
    body["stream"] = Value::Bool(true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let url = format!("http://{http_addr}/v1/chat/completions");
    let start = Instant::now();
    let mut r = http.post(url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let mut out = Streamed {
        start,
        arrivals: Vec::new(),
        text: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let mut buf = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            assert!(v["error"].is_null(), "{v}");
            // The first chunk announces the role with empty content, before any token.
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str()
                && !c.is_empty()
            {
                out.arrivals.push(Instant::now());
                out.text.push_str(c);
                at(out.arrivals.len());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                out.completion_tokens = n;
                out.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            }
        }
    }
    out
}

/// A coordinator on loopback serving `spec` with a new CA (returned, to issue the agents'
/// certificates), a heartbeat every 500 ms and a lease of `lease_ms`; `backend` adjusts the
/// gateway's settings.
pub async fn start_coordinator(
    spec: &ModelSpec,
    placement: shoal_control::PlacementMode,
    kv_reserve_tokens: u32,
    lease_ms: u64,
    backend: impl FnOnce(&mut shoal_cluster::ClusterBackendConfig),
) -> (shoal_cluster::Coordinator, ClusterCa) {
    let config = shoal_control::CoordinatorConfig {
        lease_ms,
        heartbeat_interval_ms: 500,
        kv_reserve_tokens,
        placement,
        models: vec![spec.clone()],
        ..shoal_control::CoordinatorConfig::default()
    }
    .validate()
    .unwrap();
    let ca = ClusterCa::generate("bench-cluster").unwrap();
    let mut opts = shoal_cluster::CoordinatorOptions::on_loopback(
        config,
        tls(&ca, Role::Coordinator, "coordinator"),
    );
    backend(&mut opts.backend);
    let coordinator =
        shoal_cluster::Coordinator::start(opts, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
    (coordinator, ca)
}

/// Waits (up to 5 minutes) until `n` nodes are alive with a shard ready and the gateway is
/// ready; returns the view that saw it.
pub async fn wait_serving(
    coordinator: &shoal_cluster::Coordinator,
    n: usize,
) -> std::sync::Arc<shoal_control::ClusterView> {
    use shoal_api::InferenceBackend;
    let mut views = coordinator.membership().subscribe_view();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        {
            let v = views.borrow_and_update();
            let ready = v
                .nodes
                .values()
                .filter(|node| {
                    node.state == shoal_control::NodeState::Alive
                        && node
                            .shards
                            .iter()
                            .any(|s| s.state == shoal_control::membership::ShardState::Ready)
                })
                .count();
            if ready >= n && coordinator.backend().readiness() == shoal_api::Readiness::Ready {
                return v.clone();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the cluster did not become ready");
        let _ = tokio::time::timeout(left, views.changed()).await;
    }
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}
