//! A coordinator and several agents in one process on loopback, over mTLS, serving a tiny
//! random-weight model through the OpenAI gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use shoal_api::InferenceBackend;
use shoal_cluster::{ClusterBackendConfig, Coordinator, CoordinatorOptions};
use shoal_control::{CoordinatorConfig, NodeState, PlacementMode};
use shoal_net::faults::{FaultProxy, Faults};
use shoal_net::{ClusterCa, PeerIdentity, Role, TlsMode};
use shoal_node::{Agent, AgentConfig, AgentError, ModelFile, Peer, PeerTotals};
use shoal_pipeline::Preference;
use shoal_types::{ModelId, NodeId};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
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

/// The model a test cluster serves.
enum Weights {
    /// A random-weight model of this shape, written for the test.
    Synth(shoal_synth::SynthSpec),
    /// A model file as it is.
    File(PathBuf),
}

impl From<shoal_synth::SynthSpec> for Weights {
    fn from(spec: shoal_synth::SynthSpec) -> Self {
        Weights::Synth(spec)
    }
}

/// The default model, as `shoal model fetch` caches it.
fn default_model() -> PathBuf {
    let home = std::env::var_os("SHOAL_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/shoal"),
        PathBuf::from,
    );
    let path = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `shoal model fetch`",
        path.display()
    );
    path
}

/// The network links of an agent started behind fault proxies: cutting both cuts the agent
/// off from the cluster while it keeps running.
struct AgentLinks {
    /// In front of the agent's data-plane listener. The agent advertises this address, so
    /// the gateway and the stage before it reach the agent only through here.
    data: FaultProxy,
    /// In front of the coordinator, for this agent alone: it dials this address to join and
    /// heartbeat.
    control: FaultProxy,
}

/// Starts the agent `cfg` describes behind new [`AgentLinks`], its data-plane listener on a
/// free port.
async fn start_behind_proxies(
    mut cfg: AgentConfig,
    coordinator: SocketAddr,
    cancel: &CancellationToken,
) -> (Agent, AgentLinks) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let control = FaultProxy::start(any, coordinator, Faults::default())
        .await
        .unwrap();
    cfg.coordinator = control.local_addr().to_string();
    loop {
        cfg.data_listen =
            SocketAddr::from(([127, 0, 0, 1], shoal_net::faults::free_port().unwrap()));
        let data = FaultProxy::start(any, cfg.data_listen, Faults::default())
            .await
            .unwrap();
        cfg.advertise_addr = Some(data.local_addr().to_string());
        match Agent::start(cfg.clone(), cancel.clone()).await {
            Ok(agent) => return (agent, AgentLinks { data, control }),
            // Another test took the port between its pick and the bind: pick another.
            Err(AgentError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => panic!("starting an agent: {e}"),
        }
    }
}

struct TestCluster {
    _dir: tempfile::TempDir,
    ca: ClusterCa,
    model: ModelFile,
    coordinator: Coordinator,
    agents: std::sync::Mutex<Vec<Option<(Agent, CancellationToken)>>>,
    /// Memory each agent reports (so the planner must split the model), if limited.
    memory_budget: Option<u64>,
    /// Whether agents are started behind fault proxies.
    proxied: bool,
    /// Each proxied agent's links, by node name.
    links: HashMap<String, AgentLinks>,
    http: reqwest::Client,
}

impl TestCluster {
    async fn start(n_agents: usize) -> TestCluster {
        Self::start_with(shoal_synth::SynthSpec::tiny_llama(), n_agents).await
    }

    async fn start_with(spec: shoal_synth::SynthSpec, n_agents: usize) -> TestCluster {
        Self::start_opts(spec, n_agents, PlacementMode::Auto, Preference::default()).await
    }

    async fn start_opts(
        weights: impl Into<Weights>,
        n_agents: usize,
        placement: PlacementMode,
        codec: Preference,
    ) -> TestCluster {
        Self::start_full(weights, n_agents, placement, codec, false).await
    }

    /// Like [`TestCluster::start_opts`], with every agent behind its own [`AgentLinks`] when
    /// `proxied`.
    async fn start_full(
        weights: impl Into<Weights>,
        n_agents: usize,
        placement: PlacementMode,
        codec: Preference,
        proxied: bool,
    ) -> TestCluster {
        let weights = weights.into();
        // With a pipeline of k stages of a synthetic model asked for, each agent gets room
        // for its share of the layers and no more: no node can hold the model, nor fewer
        // stages serve it. (A real model's embedding makes the shares uneven; it is split
        // by the placement mode alone.)
        let limit = match (&placement, &weights) {
            (PlacementMode::Shard { max_stages }, Weights::Synth(_)) => Some(*max_stages),
            _ => None,
        };
        let backend = ClusterBackendConfig {
            pipeline_codec: codec,
            ..ClusterBackendConfig::default()
        };
        Self::start_limited(weights, n_agents, placement, limit, proxied, backend).await
    }

    /// With `room_for_stages = Some(k)`, every agent reports memory for `1/k` of the layers
    /// (plus the ends' weights and a KV reserve) and no more; `backend` is the gateway's.
    async fn start_limited(
        weights: Weights,
        n_agents: usize,
        placement: PlacementMode,
        room_for_stages: Option<u32>,
        proxied: bool,
        backend: ClusterBackendConfig,
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let path = match weights {
            Weights::Synth(spec) => {
                let path = dir.path().join("tiny.gguf");
                shoal_synth::write_model(&spec, &path).unwrap();
                path
            }
            Weights::File(path) => path,
        };
        let bytes = std::fs::read(&path).unwrap();
        let sha256 = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        let model = ModelFile {
            id: ModelId::new(MODEL),
            path: path.clone(),
            sha256: sha256.clone(),
            bytes: bytes.len() as u64,
        };
        let spec = shoal_cluster::model_spec(ModelId::new(MODEL), &path, sha256).unwrap();
        let memory_budget = match room_for_stages {
            Some(stages) => {
                let per_node = spec.n_layers.div_ceil(stages);
                let range = shoal_types::LayerRange::new(0, per_node).unwrap();
                Some(
                    spec.weight_bytes(range)
                        + spec.kv_reserve_bytes(range, 256)
                        + spec.layer_bytes * 9 / 10,
                )
            }
            None => None,
        };
        let config = CoordinatorConfig {
            lease_ms: 1500,
            heartbeat_interval_ms: 200,
            kv_reserve_tokens: 256,
            placement,
            models: vec![spec],
            ..CoordinatorConfig::default()
        }
        .validate()
        .unwrap();
        let ca = ClusterCa::generate("test-cluster").unwrap();
        let mut opts =
            CoordinatorOptions::on_loopback(config, tls(&ca, Role::Coordinator, "coordinator"));
        opts.backend = backend;
        let coordinator = within(
            "starting the coordinator",
            Coordinator::start(opts, CancellationToken::new()),
        )
        .await
        .unwrap();
        let mut cluster = TestCluster {
            _dir: dir,
            ca,
            model,
            coordinator,
            agents: std::sync::Mutex::default(),
            memory_budget,
            proxied,
            links: HashMap::new(),
            http: reqwest::Client::new(),
        };
        for i in 1..=n_agents {
            cluster.add_agent(&format!("agent-{i}")).await;
        }
        cluster.wait_ready(n_agents).await;
        cluster
    }

    async fn add_agent(&mut self, name: &str) {
        let model = self.model.clone();
        self.add_agent_with(name, model).await;
    }

    /// Starts an agent whose copy of the model is `model`.
    async fn add_agent_with(&mut self, name: &str, model: ModelFile) {
        let cfg = self.agent_config(name, model);
        let cancel = CancellationToken::new();
        let agent = if self.proxied {
            let (agent, links) = within(
                "starting an agent behind proxies",
                start_behind_proxies(cfg, self.coordinator.grpc_addr(), &cancel),
            )
            .await;
            self.links.insert(name.to_owned(), links);
            agent
        } else {
            within("starting an agent", Agent::start(cfg, cancel.clone()))
                .await
                .unwrap()
        };
        self.agents.lock().unwrap().push(Some((agent, cancel)));
    }

    fn agent_config(&self, name: &str, model: ModelFile) -> AgentConfig {
        AgentConfig {
            node_id: NodeId::new(name),
            coordinator: self.coordinator.grpc_addr().to_string(),
            tls: tls(&self.ca, Role::Agent, name),
            data_listen: "127.0.0.1:0".parse().unwrap(),
            advertise_addr: None,
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            models: vec![model],
            threads: 1,
            engine: shoal_engine::EngineConfig::default(),
            default_max_tokens: 16,
            memory_budget: self.memory_budget,
            // An eighth of so small a budget would keep only a short context or two.
            checkpoint_store: self.memory_budget.map(|_| 64 << 20),
            benchmark: true,
            model_keys: None,
        }
    }

    /// Starts the agent of slot `index` again (after [`TestCluster::kill`]), under its name.
    async fn restart(&self, index: usize) {
        assert!(!self.proxied, "restarting a proxied agent is not supported");
        let name = format!("agent-{}", index + 1);
        let cfg = self.agent_config(&name, self.model.clone());
        let cancel = CancellationToken::new();
        let agent = within("restarting an agent", Agent::start(cfg, cancel.clone()))
            .await
            .unwrap();
        self.agents.lock().unwrap()[index] = Some((agent, cancel));
    }

    /// Waits until `n` nodes report the model ready and the gateway says ready.
    async fn wait_ready(&self, n: usize) {
        let mut views = self.coordinator.membership().subscribe_view();
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                let ready = {
                    let v = views.borrow_and_update();
                    v.nodes
                        .values()
                        .filter(|node| {
                            node.state == NodeState::Alive
                                && node.shards.iter().any(|s| {
                                    s.state == shoal_control::membership::ShardState::Ready
                                })
                        })
                        .count()
                };
                if ready >= n
                    && self.coordinator.backend().readiness() == shoal_api::Readiness::Ready
                {
                    return;
                }
                views.changed().await.unwrap();
            }
        })
        .await;
        if waited.is_err() {
            let v = self.coordinator.membership().view();
            panic!("timed out: the agents becoming ready; plan {:#?}", v.plan);
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.coordinator.http_addr())
    }

    async fn chat(&self, body: Value) -> (u16, Value) {
        let r = within(
            "a chat completion",
            self.http
                .post(self.url("/v1/chat/completions"))
                .json(&body)
                .send(),
        )
        .await
        .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// The coordinator's `/metrics` text.
    async fn metrics(&self) -> String {
        let r = within("the metrics", self.http.get(self.url("/metrics")).send()).await;
        r.unwrap().text().await.unwrap()
    }

    /// Stops an agent abruptly: no Leave, its lease must run out.
    fn kill(&self, index: usize) {
        let (agent, cancel) = self.agents.lock().unwrap()[index].take().unwrap();
        cancel.cancel();
        drop(agent);
    }

    async fn wait_state(&self, node: &str, state: NodeState) {
        let id = NodeId::new(node);
        self.wait_view(&format!("{node} becoming {state:?}"), |v| {
            v.nodes.get(&id).is_some_and(|n| n.state == state)
        })
        .await;
    }

    async fn wait_view(&self, what: &str, cond: impl Fn(&shoal_control::ClusterView) -> bool) {
        let mut views = self.coordinator.membership().subscribe_view();
        within(what, async {
            while !cond(&views.borrow_and_update()) {
                views.changed().await.unwrap();
            }
        })
        .await;
    }
}

fn greedy(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_serve_the_same_greedy_answer_and_share_the_load() {
    let cluster = TestCluster::start(3).await;
    let models: Value = cluster
        .http
        .get(cluster.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);

    // Six concurrent identical greedy requests: the router spreads them (in-flight counts),
    // and every replica answers the same.
    let mut handles = Vec::new();
    for _ in 0..6 {
        let http = cluster.http.clone();
        let url = cluster.url("/v1/chat/completions");
        handles.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&greedy("hello there", 12))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }));
    }
    let mut answers = Vec::new();
    for h in handles {
        answers.push(within("concurrent requests", h).await.unwrap());
    }
    let first = answers[0]["choices"][0]["message"]["content"].clone();
    for a in &answers {
        assert_eq!(a["choices"][0]["message"]["content"], first);
        assert!(a["usage"]["completion_tokens"].as_u64().unwrap() <= 12);
        assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    }

    // Heartbeats carry each node's generated-token count: more than one node did work.
    let mut views = cluster.coordinator.membership().subscribe_view();
    within("loads reported by heartbeats", async {
        loop {
            let busy = views
                .borrow_and_update()
                .nodes
                .values()
                .filter(|n| n.load.tokens_generated_total > 0)
                .count();
            if busy >= 2 {
                return;
            }
            views.changed().await.unwrap();
        }
    })
    .await;

    // Streaming through the gateway carries the same text and a usage chunk.
    let mut body = greedy("hello there", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = cluster
        .http
        .post(cluster.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut streamed = String::new();
    let mut usage = None;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(c);
        }
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
    }
    assert_eq!(json!(streamed), first);
    assert!(usage.unwrap()["completion_tokens"].as_u64().unwrap() > 0);

    // The coordinator's metrics show a heartbeat age for each node.
    let metrics = cluster.metrics().await;
    for i in 1..=3 {
        assert!(
            metrics.contains(&format!(
                "{}{{node=\"agent-{i}\"}}",
                shoal_cluster::metrics::HEARTBEAT_AGE_SECONDS
            )),
            "no heartbeat age for agent-{i} in:\n{metrics}"
        );
    }
    assert!(metrics.contains("shoal_cluster_nodes{state=\"alive\"} 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_idle_costs_no_request() {
    let cluster = TestCluster::start(2).await;
    cluster.kill(0);
    // Before the lease runs out the view still shows agent-1 alive: requests routed there
    // fail to start and go to agent-2.
    for _ in 0..4 {
        let (status, body) = cluster.chat(greedy("still there?", 6)).await;
        assert_eq!(status, 200, "{body}");
    }
    cluster.wait_state("agent-1", NodeState::Dead).await;
    let (status, body) = cluster.chat(greedy("and now?", 6)).await;
    assert_eq!(status, 200, "{body}");

    // With every agent gone the gateway answers 503, not a hang.
    cluster.kill(1);
    cluster.wait_state("agent-2", NodeState::Dead).await;
    let (status, body) = cluster.chat(greedy("anyone?", 6)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_ready_replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_cluster_keeps_serving() {
    let cluster = TestCluster::start(1).await;
    let (status, body) = cluster
        .chat(json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");

    let (status, body) = cluster.chat(greedy("x", 1_000_000)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");

    let mut unknown = greedy("x", 4);
    unknown["frobnicate"] = json!(true);
    let (status, body) = cluster.chat(unknown).await;
    assert_eq!(status, 400, "{body}");

    let r = cluster
        .http
        .post(cluster.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let big = vec![b' '; 100 << 20];
    let r = cluster
        .http
        .post(cluster.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await;
    // The gateway refuses the body as soon as it passes the limit; the client may see the
    // 413 or a connection closed mid-upload.
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }

    let (status, body) = cluster.chat(greedy("still fine", 4)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_the_sequence_on_the_node() {
    let cluster = TestCluster::start(1).await;
    let mut body = greedy("tell me a long story", 200);
    body["stream"] = json!(true);
    let mut r = cluster
        .http
        .post(cluster.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    within("the first chunk", r.chunk()).await.unwrap();
    drop(r);
    let node = NodeId::new("agent-1");
    let router = cluster.coordinator.backend().router();
    within("the gateway ending the request", async {
        while router.in_flight(&node) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Only a heartbeat sent after the request ended proves the node freed it.
    let after = cluster.coordinator.membership().view().nodes[&node].last_sequence;
    let mut views = cluster.coordinator.membership().subscribe_view();
    within(
        "the node reporting no active sequence and no KV cache",
        async {
            loop {
                let idle = {
                    let v = views.borrow_and_update();
                    let n = &v.nodes[&node];
                    n.last_sequence > after && n.load.active_sequences == 0 && n.load.kv_bytes == 0
                };
                if idle {
                    return;
                }
                views.changed().await.unwrap();
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_gets_no_new_work() {
    let cluster = TestCluster::start(2).await;
    cluster
        .coordinator
        .membership()
        .drain(NodeId::new("agent-1"))
        .await
        .unwrap();
    cluster.wait_state("agent-1", NodeState::Draining).await;
    let before = cluster.coordinator.membership().view().nodes[&NodeId::new("agent-1")]
        .load
        .tokens_generated_total;
    for _ in 0..3 {
        let (status, body) = cluster.chat(greedy("drain test", 4)).await;
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = cluster.coordinator.membership().view().nodes[&NodeId::new("agent-1")]
        .load
        .tokens_generated_total;
    assert_eq!(before, after, "a draining node generated tokens");
}

/// A model slow enough (a few milliseconds a token) that a generation of a few hundred tokens
/// is still running when a test kills its node.
fn slow_model() -> shoal_synth::SynthSpec {
    shoal_synth::SynthSpec {
        n_layers: 8,
        hidden: 512,
        n_heads: 8,
        n_kv_heads: 4,
        ffn: 1536,
        context_length: 2048,
        ..shoal_synth::SynthSpec::tiny_llama()
    }
}

/// What a client saw of a streamed completion.
#[derive(Debug, PartialEq)]
struct Seen {
    /// Content deltas in order.
    deltas: Vec<String>,
    finish_reason: Value,
    usage: Value,
    /// An error event, if the stream ended with one.
    error: Option<Value>,
}

/// Streams a completion, calling `at(n)` after the n-th content delta (to inject faults).
async fn stream_chat(cluster: &TestCluster, mut body: Value, mut at: impl FnMut(usize)) -> Seen {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut r = within(
        "a streamed completion",
        cluster
            .http
            .post(cluster.url("/v1/chat/completions"))
            .json(&body)
            .send(),
    )
    .await
    .unwrap();
    if r.status() != 200 {
        let status = r.status();
        panic!("status {status}: {}", r.text().await.unwrap());
    }
    let mut seen = Seen {
        deltas: Vec::new(),
        finish_reason: Value::Null,
        usage: Value::Null,
        error: None,
    };
    let mut buf = String::new();
    loop {
        let Some(chunk) = within("the next chunk", r.chunk()).await.unwrap() else {
            break;
        };
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
            if !v["error"].is_null() {
                seen.error = Some(v["error"].clone());
                continue;
            }
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                seen.deltas.push(c.to_owned());
                at(seen.deltas.len());
            }
            if !v["choices"][0]["finish_reason"].is_null() {
                seen.finish_reason = v["choices"][0]["finish_reason"].clone();
            }
            if !v["usage"].is_null() {
                seen.usage = v["usage"].clone();
            }
        }
    }
    seen
}

impl TestCluster {
    /// The index of the one agent with a request in flight.
    fn busy_agent(&self) -> usize {
        let router = self.coordinator.backend().router();
        let n = self.agents.lock().unwrap().len();
        let busy: Vec<usize> = (0..n)
            .filter(|&i| router.in_flight(&NodeId::new(format!("agent-{}", i + 1))) > 0)
            .collect();
        assert_eq!(busy.len(), 1, "expected one busy agent, got {busy:?}");
        busy[0]
    }

    /// Kills the one agent with a request in flight; returns its index.
    fn kill_busy_agent(&self) -> usize {
        let busy = self.busy_agent();
        self.kill(busy);
        busy
    }

    /// One of the checkpoint counters of the running agent `name`.
    fn checkpoint_counter(
        &self,
        name: &str,
        which: fn(&shoal_node::CheckpointCounters) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        self.with_agent(name, |a| {
            which(a.metrics().checkpoints()).load(std::sync::atomic::Ordering::Relaxed)
        })
    }
}

/// Waits until `cond` holds (the test fails after [`WAIT`]).
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let since = Instant::now();
    while !cond() {
        assert!(since.elapsed() < WAIT, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Blocks the calling thread until `cond` holds (the test fails after [`WAIT`]).
fn block_until(what: &str, cond: impl Fn() -> bool) {
    let since = Instant::now();
    while !cond() {
        assert!(since.elapsed() < WAIT, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A task that restarts the agent whose index it is sent once the membership declares it dead,
/// and sets the flag once every agent is ready again.
fn restart_when_killed(
    cluster: Arc<TestCluster>,
) -> (
    std::sync::mpsc::Sender<usize>,
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<usize>();
    let back = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = {
        let back = back.clone();
        tokio::spawn(async move {
            let index = tokio::task::spawn_blocking(move || killed_rx.recv().unwrap())
                .await
                .unwrap();
            cluster
                .wait_state(&format!("agent-{}", index + 1), NodeState::Dead)
                .await;
            cluster.restart(index).await;
            let n = cluster.agents.lock().unwrap().len();
            cluster.wait_ready(n).await;
            back.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    (killed_tx, back, task)
}

/// Slower than [`slow_model`] (about as much compute a token as SmolLM2-135M), so a
/// generation outlasts a lease and a long prefill takes seconds.
fn slower_model() -> shoal_synth::SynthSpec {
    shoal_synth::SynthSpec {
        hidden: 1024,
        n_heads: 16,
        n_kv_heads: 8,
        ffn: 3072,
        ..slow_model()
    }
}

/// `agents` agents serving [`slower_model`], with `backend` for the gateway.
async fn slower_cluster(agents: usize, backend: ClusterBackendConfig) -> TestCluster {
    let weights = Weights::Synth(slower_model());
    TestCluster::start_limited(weights, agents, PlacementMode::Auto, None, false, backend).await
}

/// A seeded answer of up to `max_tokens` to a prompt of `sentences` sentences, what a
/// fault-free run of it streams, and its prompt tokens.
async fn long_context(
    cluster: &TestCluster,
    seed: u64,
    max_tokens: u32,
    sentences: usize,
) -> (Value, Seen, u64) {
    let mut body = long_answer(json!({"temperature": 0.9, "seed": seed}));
    body["max_tokens"] = json!(max_tokens);
    body["messages"][0]["content"] =
        json!("tell me everything about the sea and its shores. ".repeat(sentences));
    let reference = stream_chat(cluster, body.clone(), |_| {}).await;
    assert!(reference.error.is_none(), "{reference:?}");
    let prompt_tokens = reference.usage["prompt_tokens"].as_u64().unwrap();
    (body, reference, prompt_tokens)
}

fn long_answer(sampling: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell me everything about the sea"}],
        "max_tokens": 300,
    });
    for (k, v) in sampling.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_is_resumed_with_no_token_lost_or_repeated() {
    for sampling in [
        json!({"temperature": 0}),
        json!({"temperature": 0.9, "top_p": 0.95, "seed": 7}),
    ] {
        let cluster = TestCluster::start_with(slow_model(), 2).await;
        let body = long_answer(sampling);
        let reference = stream_chat(&cluster, body.clone(), |_| {}).await;
        assert!(reference.error.is_none(), "{reference:?}");
        assert!(
            reference.deltas.len() >= 40,
            "the reference run is too short to interrupt: {reference:?}"
        );
        let seen = stream_chat(&cluster, body, |n| {
            if n == 20 {
                cluster.kill_busy_agent();
            }
        })
        .await;
        assert_eq!(seen, reference);
        assert_eq!(cluster.coordinator.backend().failovers(), 1);
        // The gateway's /metrics counts the move, under the cause that noticed it.
        assert_eq!(failovers_on_metrics(&cluster).await, 1);
        // And what it cost the client: one silence, of which the survivor's prefill of the
        // prompt and the 20 tokens already sent is a part, within the time from the loss.
        let [stall, recovery, reprefill] = failover_stalls(&cluster).await;
        assert!(
            0.0 < reprefill && reprefill <= recovery && recovery <= stall,
            "stall {stall} s, recovery {recovery} s, re-prefill {reprefill} s"
        );
    }
}

/// The one failover's silence, recovery and re-prefill (seconds) on the coordinator's
/// `/metrics` (each histogram must hold exactly one observation).
async fn failover_stalls(cluster: &TestCluster) -> [f64; 3] {
    use shoal_cluster::metrics::{
        FAILOVER_RECOVERY_SECONDS, FAILOVER_REPREFILL_SECONDS, FAILOVER_STALL_SECONDS,
    };
    let metrics = cluster.metrics().await;
    let value = |name: String| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
            .parse()
            .unwrap()
    };
    [
        FAILOVER_STALL_SECONDS,
        FAILOVER_RECOVERY_SECONDS,
        FAILOVER_REPREFILL_SECONDS,
    ]
    .map(|name| {
        assert_eq!(value(format!("{name}_count")), 1.0, "{name}");
        value(format!("{name}_sum"))
    })
}

/// A generation checkpointed to the other replica as it runs resumes there from the checkpoint
/// when its node is killed: the client sees exactly the fault-free answer, and the survivor
/// imports the checkpointed positions (at least the whole prompt) instead of prefilling them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_resumes_from_its_checkpoint_on_the_other() {
    let cluster = TestCluster::start_limited(
        Weights::Synth(slow_model()),
        2,
        PlacementMode::Auto,
        None,
        false,
        ClusterBackendConfig {
            checkpoint_every: 16,
            ..ClusterBackendConfig::default()
        },
    )
    .await;
    let mut body = long_answer(json!({"temperature": 0.9, "seed": 11}));
    body["messages"][0]["content"] =
        json!("tell me everything about the sea and its shores. ".repeat(30));
    let reference = stream_chat(&cluster, body.clone(), |_| {}).await;
    assert!(reference.error.is_none(), "{reference:?}");
    let prompt_tokens = reference.usage["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > 200 && reference.deltas.len() >= 60,
        "{reference:?}"
    );
    let names = ["agent-1", "agent-2"];
    let mut pushed = 0;
    for name in names {
        pushed += cluster
            .agent_counter(name, "shoal_node_checkpoint_pushed_tokens_total")
            .await;
    }
    // The whole fault-free run was checkpointed, but for its last few positions.
    assert!(
        pushed + 16 >= prompt_tokens + reference.usage["completion_tokens"].as_u64().unwrap() - 1
    );

    let killed = std::sync::Mutex::new(None);
    let seen = stream_chat(&cluster, body, |n| {
        if n == 40 {
            *killed.lock().unwrap() = Some(cluster.kill_busy_agent());
        }
    })
    .await;
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
    let killed = killed.lock().unwrap().expect("an agent was killed");
    let survivor = names[1 - killed];
    assert_eq!(
        cluster
            .agent_counter(survivor, "shoal_node_checkpoint_restores_total")
            .await,
        1
    );
    assert_eq!(
        cluster
            .agent_counter(survivor, "shoal_node_checkpoint_restore_misses_total")
            .await,
        0
    );
    let restored = cluster
        .agent_counter(survivor, "shoal_node_kv_restored_tokens_total")
        .await;
    assert!(
        restored >= prompt_tokens,
        "{restored} positions restored of a {prompt_tokens}-token prompt"
    );
    // The gateway counts the restore too, from the survivor's Started event.
    assert_eq!(cluster.coordinator.backend().restores(), (1, restored));
}

/// A generation whose checkpoint holder dies is given another holder by the gateway, and its
/// node checkpoints there from position 0; when that node dies next, the generation resumes on
/// the new holder from the checkpoint. The move came after tokens, so it costs the request
/// nothing even with no move that loses work allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_whose_checkpoint_holder_dies_gets_another_and_resumes_from_it() {
    let backend = ClusterBackendConfig {
        checkpoint_every: 16,
        max_failovers: 0,
        ..ClusterBackendConfig::default()
    };
    let cluster = slower_cluster(3, backend).await;
    let (body, reference, prompt_tokens) = long_context(&cluster, 3, 600, 30).await;
    assert!(
        prompt_tokens > 200 && reference.deltas.len() >= 300,
        "{reference:?}"
    );
    let names = ["agent-1", "agent-2", "agent-3"];
    let stored = |i: usize| cluster.checkpoint_counter(names[i], |c| &c.stored_tokens);
    let before: Vec<u64> = (0..3).map(stored).collect();

    let roles = std::sync::Mutex::new(None);
    let seen = stream_chat(&cluster, body, |n| {
        if n != 10 {
            return;
        }
        let origin = cluster.busy_agent();
        let holder = (0..3)
            .find(|&i| i != origin && stored(i) > before[i])
            .expect("a checkpoint holder");
        let third = 3 - origin - holder;
        cluster.kill(holder);
        // Once the holder is declared dead, the gateway names the third agent, and the whole
        // cache so far (at least the prompt) goes there.
        block_until("a new checkpoint holder", || {
            cluster.checkpoint_counter(names[origin], |c| &c.retargets) == 1
                && stored(third) >= before[third] + prompt_tokens
        });
        cluster.kill(origin);
        *roles.lock().unwrap() = Some((origin, holder, third));
    })
    .await;
    assert_eq!(seen, reference);
    assert!(roles.lock().unwrap().is_some(), "the faults were injected");
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
    let (_, _, third) = roles.lock().unwrap().unwrap();
    let restores = cluster.checkpoint_counter(names[third], |c| &c.restores);
    assert_eq!(restores, 1);
    let restored = cluster
        .agent_counter(names[third], "shoal_node_kv_restored_tokens_total")
        .await;
    assert!(restored >= prompt_tokens, "{restored} of {prompt_tokens}");
    assert_eq!(cluster.coordinator.backend().restores(), (1, restored));
}

/// A checkpoint holder that restarts comes back with an empty store: the gateway names it
/// again (at its new address) once it is ready, the generation's node checkpoints there from
/// position 0, and when that node dies the generation resumes from the refilled checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_checkpoint_holder_is_named_again_and_refilled() {
    let backend = ClusterBackendConfig {
        checkpoint_every: 16,
        ..ClusterBackendConfig::default()
    };
    let cluster = Arc::new(slower_cluster(2, backend).await);
    // Long enough to outlast a restart and a refill (about 15 s here, the refill done by 7).
    let (body, reference, prompt_tokens) = long_context(&cluster, 8, 500, 30).await;
    assert!(reference.deltas.len() >= 400, "{reference:?}");
    let names = ["agent-1", "agent-2"];
    let (killed_tx, _, restarter) = restart_when_killed(cluster.clone());
    let holder_index = std::sync::Mutex::new(None);
    let seen = stream_chat(&cluster, body, |n| {
        if n != 10 {
            return;
        }
        let origin = cluster.busy_agent();
        let holder = 1 - origin;
        cluster.kill(holder);
        killed_tx.send(holder).unwrap();
        // The restarted holder gets the whole cache so far, then the origin dies.
        block_until("the restarted holder refilled", || {
            cluster.agents.lock().unwrap()[holder].is_some()
                && cluster.checkpoint_counter(names[holder], |c| &c.stored_tokens) >= prompt_tokens
        });
        cluster.kill(origin);
        *holder_index.lock().unwrap() = Some(holder);
    })
    .await;
    restarter.await.unwrap();
    assert_eq!(seen, reference);
    let holder = holder_index
        .lock()
        .unwrap()
        .expect("the faults were injected");
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
    assert_eq!(
        cluster.checkpoint_counter(names[holder], |c| &c.restores),
        1
    );
    let restored = cluster.coordinator.backend().restores().1;
    assert!(restored >= prompt_tokens, "{restored} of {prompt_tokens}");
}

/// A node lost in the middle of a long prefill, before any token, costs the request only what
/// its last checkpoint did not keep: the generation resumes on the holder from the checkpoint,
/// and the move does not count as one that lost work (none is allowed here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_during_a_long_prefill_resumes_from_its_checkpoint_at_no_cost() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let backend = ClusterBackendConfig {
        checkpoint_every: 32,
        max_failovers: 0,
        ..ClusterBackendConfig::default()
    };
    let cluster = Arc::new(slower_cluster(2, backend).await);
    let (body, reference, prompt_tokens) = long_context(&cluster, 4, 24, 40).await;
    assert!(prompt_tokens >= 700, "{prompt_tokens} prompt tokens");
    let names = ["agent-1", "agent-2"];
    let pushed = |i: usize| cluster.checkpoint_counter(names[i], |c| &c.pushed_tokens);
    let before: Vec<u64> = (0..2).map(pushed).collect();

    let deltas = Arc::new(AtomicUsize::new(0));
    let run = {
        let (cluster, deltas) = (cluster.clone(), deltas.clone());
        tokio::spawn(async move {
            stream_chat(&cluster, body, |n| deltas.store(n, Ordering::SeqCst)).await
        })
    };
    // Killed once two prefill chunks are checkpointed, long before its first token.
    let origin = within("the prefill checkpointing", async {
        loop {
            if let Some(i) = (0..2).find(|&i| pushed(i) >= before[i] + 256) {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    // The first delta names the role; none holds a token yet.
    assert!(
        deltas.load(Ordering::SeqCst) <= 1,
        "the prefill ended before the kill"
    );
    cluster.kill(origin);
    let seen = within("the resumed generation", run).await.unwrap();
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
    let holder = names[1 - origin];
    let restored = cluster
        .agent_counter(holder, "shoal_node_kv_restored_tokens_total")
        .await;
    assert!(restored >= 256, "{restored} positions restored");
    assert_eq!(cluster.coordinator.backend().restores(), (1, restored));
}

/// The sum of `shoal_failovers_total` over its causes on the coordinator's `/metrics`.
async fn failovers_on_metrics(cluster: &TestCluster) -> u64 {
    failovers_by_cause(cluster).await.values().sum()
}

/// `shoal_failovers_total` on the coordinator's `/metrics`, by cause.
async fn failovers_by_cause(cluster: &TestCluster) -> HashMap<String, u64> {
    let metrics = cluster.metrics().await;
    let prefix = format!("{}{{cause=\"", shoal_cluster::metrics::FAILOVERS_TOTAL);
    let counts: HashMap<String, u64> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|l| {
            let (cause, count) = l.split_once("\"} ").unwrap();
            (cause.to_owned(), count.parse().unwrap())
        })
        .collect();
    assert_eq!(counts.len(), 4, "one series per cause in:\n{metrics}");
    counts
}

/// Generations still waiting in a node's queue move to a replica that becomes ready (here a
/// node coming back; a node joining is the same) once it is expected to serve them in under
/// half the time: the queue is shared out, every answer is the one a quiet cluster gives, and
/// none of it counts as a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_generations_move_to_a_replica_that_becomes_ready() {
    let cluster = slower_cluster(2, ClusterBackendConfig::default()).await;
    let (mut bodies, mut references) = (Vec::new(), Vec::new());
    for seed in 0..3 {
        let (body, reference, prompt_tokens) = long_context(&cluster, 20 + seed, 16, 40).await;
        assert!(prompt_tokens >= 700, "{prompt_tokens} prompt tokens");
        bodies.push(body);
        references.push(reference);
    }
    cluster.kill(1);
    cluster.wait_state("agent-2", NodeState::Dead).await;
    // Each prompt takes seconds to prefill on one thread: two of the three wait in agent-1's
    // queue while agent-2 comes back.
    let requests = futures::future::join_all(
        bodies
            .iter()
            .map(|b| stream_chat(&cluster, b.clone(), |_| {})),
    );
    let comeback = async {
        let router = cluster.coordinator.backend().router();
        wait_until("three requests on agent-1", || {
            router.in_flight(&NodeId::new("agent-1")) == 3
        })
        .await;
        cluster.restart(1).await;
        cluster.wait_ready(2).await;
    };
    let (seen, ()) = futures::future::join(requests, within("agent-2 back", comeback)).await;
    assert_eq!(seen, references);
    let backend = cluster.coordinator.backend();
    assert!(backend.rebalanced() >= 1, "no queued generation moved");
    assert_eq!(backend.failovers(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_under_load_fails_no_request() {
    let cluster = TestCluster::start_with(slow_model(), 2).await;
    let bodies: Vec<Value> = (0..4)
        .map(|i| long_answer(json!({"temperature": 0.9, "seed": i})))
        .collect();
    let mut reference = Vec::new();
    for b in &bodies {
        reference.push(stream_chat(&cluster, b.clone(), |_| {}).await);
    }
    let node = NodeId::new("agent-1");
    let drain = std::sync::Mutex::new(None);
    let (cluster, node, drain) = (&cluster, &node, &drain);
    let seen = futures::future::join_all(bodies.iter().enumerate().map(|(i, b)| {
        stream_chat(cluster, b.clone(), move |n| {
            if i == 0 && n == 10 {
                let busy = cluster.coordinator.backend().router().in_flight(node);
                let membership = cluster.coordinator.membership().clone();
                let node = node.clone();
                let task = tokio::spawn(async move { membership.drain(node).await });
                *drain.lock().unwrap() = Some((busy, task));
            }
        })
    }))
    .await;
    let (busy, task) = drain.lock().unwrap().take().expect("the drain was started");
    task.await.unwrap().unwrap();
    assert!(busy > 0, "agent-1 had no request in flight when drained");
    // Its requests finished where they were: nothing failed, moved or changed.
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 0);
    cluster
        .wait_view("agent-1 drained", |v| {
            let n = &v.nodes[node];
            n.state == NodeState::Draining && n.kept_while_draining.is_empty()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failures_during_one_request_are_both_survived() {
    let cluster = TestCluster::start_with(slow_model(), 3).await;
    let body = long_answer(json!({"temperature": 0}));
    let reference = stream_chat(&cluster, body.clone(), |_| {}).await;
    assert!(reference.deltas.len() >= 60, "{reference:?}");
    let seen = stream_chat(&cluster, body, |n| {
        if n == 15 || n == 45 {
            cluster.kill_busy_agent();
        }
    })
    .await;
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 2);
}

/// A generation lost on a node may go back to it once it has restarted: with two replicas,
/// the first is killed mid-stream (the generation moves to the second) and restarted, then the
/// second is killed; the generation finishes on the first, exactly as without faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_goes_back_to_a_node_it_was_lost_on_once_it_restarts() {
    use std::sync::atomic::Ordering;
    let backend = ClusterBackendConfig {
        lost_node_exclusion: Duration::from_millis(300),
        ..ClusterBackendConfig::default()
    };
    // The generation outlasts a restart.
    let cluster = Arc::new(slower_cluster(2, backend).await);
    let mut body = long_answer(json!({"temperature": 0.9, "seed": 5}));
    body["max_tokens"] = json!(400);
    let reference = stream_chat(&cluster, body.clone(), |_| {}).await;
    assert!(reference.deltas.len() >= 100, "{reference:?}");
    let (killed_tx, back, restarter) = restart_when_killed(cluster.clone());
    let seen = stream_chat(&cluster, body, |n| {
        if n == 10 {
            killed_tx.send(cluster.kill_busy_agent()).unwrap();
            // This client stops reading (the generation goes on, on the other replica) until
            // the killed node is back, then that replica is killed too.
            let waited = Instant::now();
            while !back.load(Ordering::SeqCst) {
                assert!(
                    waited.elapsed() < WAIT,
                    "the killed agent did not come back"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            cluster.kill_busy_agent();
        }
    })
    .await;
    restarter.await.unwrap();
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_gone_the_client_gets_a_clear_error() {
    let cluster = TestCluster::start_with(slow_model(), 1).await;
    // Streamed: the tokens before the failure, then an error event naming the loss.
    let seen = stream_chat(&cluster, long_answer(json!({"temperature": 0})), |n| {
        if n == 10 {
            cluster.kill_busy_agent();
        }
    })
    .await;
    assert!(seen.deltas.len() >= 10, "{seen:?}");
    let error = seen.error.expect("an error event");
    assert_eq!(error["code"], "node_lost", "{error}");
    assert!(seen.finish_reason.is_null());

    // Not streamed, with no agent left: 503 with Retry-After.
    cluster.wait_state("agent-1", NodeState::Dead).await;
    let r = within(
        "a request with no replica",
        cluster
            .http
            .post(cluster.url("/v1/chat/completions"))
            .json(&long_answer(json!({"temperature": 0})))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_ready_replica", "{body}");
}

impl TestCluster {
    /// The stages of the model's first replica in the plan, as node names.
    fn first_chain(&self) -> Vec<String> {
        let view = self.coordinator.membership().view();
        let chains = view.plan.chains(&ModelId::new(MODEL));
        chains
            .first()
            .map(|c| c.stages.iter().map(|a| a.node.to_string()).collect())
            .unwrap_or_default()
    }
}

fn prompts() -> Vec<Value> {
    [
        "hello there",
        "tell me everything about the sea",
        "1 2 3 4",
        "why?",
    ]
    .iter()
    .map(|p| {
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": p}],
            "max_tokens": 24,
            "temperature": 0,
        })
    })
    .chain(std::iter::once(json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "a seeded one"}],
        "max_tokens": 24,
        "temperature": 0.8,
        "seed": 11,
    })))
    .collect()
}

async fn answers(cluster: &TestCluster) -> Vec<Seen> {
    let mut out = Vec::new();
    for p in prompts() {
        out.push(stream_chat(cluster, p, |_| {}).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_of_2_3_and_5_stages_answer_exactly_like_one_node() {
    for (spec, stages) in [
        (shoal_synth::SynthSpec::tiny_llama(), 2),
        (slow_model(), 3),
        (
            shoal_synth::SynthSpec {
                n_layers: 10,
                ..slow_model()
            },
            5,
        ),
    ] {
        let whole =
            TestCluster::start_opts(spec.clone(), 1, PlacementMode::Replicate, Preference::Exact)
                .await;
        let reference = answers(&whole).await;
        drop(whole);
        let split = TestCluster::start_opts(
            spec,
            stages,
            PlacementMode::Shard {
                max_stages: stages as u32,
            },
            Preference::Exact,
        )
        .await;
        assert_eq!(
            split.first_chain().len(),
            stages,
            "{:?}",
            split.first_chain()
        );
        let got = answers(&split).await;
        for (g, r) in got.iter().zip(&reference) {
            assert!(r.error.is_none() && g.error.is_none(), "{g:?} / {r:?}");
            assert!(!r.deltas.is_empty());
        }
        assert_eq!(got, reference, "{stages} stages");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_model_in_pipelines_answers_exactly_like_one_node() {
    let whole = TestCluster::start_opts(
        Weights::File(default_model()),
        1,
        PlacementMode::Replicate,
        Preference::Exact,
    )
    .await;
    let reference = answers(&whole).await;
    drop(whole);
    for r in &reference {
        assert!(r.error.is_none() && r.deltas.len() > 4, "{r:?}");
    }
    // The planner picks how many of the allowed stages pay (it measured every agent); the
    // model-level tests split the default model 2, 3 and 5 ways at fixed cuts.
    for max_stages in [2, 3, 5] {
        let split = TestCluster::start_opts(
            Weights::File(default_model()),
            max_stages,
            PlacementMode::Shard {
                max_stages: max_stages as u32,
            },
            Preference::Exact,
        )
        .await;
        let chain = split.first_chain();
        assert!((2..=max_stages).contains(&chain.len()), "{chain:?}");
        assert_eq!(answers(&split).await, reference, "{chain:?}");
    }
}

impl TestCluster {
    /// Kills stage `stage` of the pipeline that has a request in flight.
    fn kill_busy_stage(&self, stage: usize) -> String {
        let name = self.busy_stage(stage);
        let index: usize = name.trim_start_matches("agent-").parse().unwrap();
        self.kill(index - 1);
        name
    }

    /// The node running stage `stage` of the pipeline that has a request in flight.
    fn busy_stage(&self, stage: usize) -> String {
        self.pipelines().0[stage].clone()
    }

    /// The nodes of the pipeline that has a request in flight and of the one that has none,
    /// in stage order.
    fn pipelines(&self) -> (Vec<String>, Vec<String>) {
        let router = self.coordinator.backend().router();
        let view = self.coordinator.membership().view();
        let chains = view.plan.chains(&ModelId::new(MODEL));
        let (busy, idle): (Vec<Vec<String>>, Vec<Vec<String>>) = chains
            .iter()
            .map(|c| {
                c.stages
                    .iter()
                    .map(|a| a.node.to_string())
                    .collect::<Vec<_>>()
            })
            .partition(|c| {
                c.iter()
                    .all(|n| router.in_flight(&NodeId::new(n.as_str())) > 0)
            });
        assert_eq!(busy.len(), 1, "expected one busy pipeline: {busy:?}");
        assert_eq!(idle.len(), 1, "expected one idle pipeline: {idle:?}");
        (busy[0].clone(), idle[0].clone())
    }

    /// Cuts links of the proxied agent `name`; it keeps running.
    fn cut(&self, name: &str, cut: Cut) {
        let links = &self.links[name];
        links.data.cut();
        if cut == Cut::Partition {
            links.control.cut();
        }
    }

    /// Reconnects an agent cut off by [`TestCluster::cut`].
    fn heal(&self, name: &str) {
        let links = &self.links[name];
        links.data.heal();
        links.control.heal();
    }
}

/// Which links of an agent a test cuts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// All of them, data plane and heartbeats, as a network partition does.
    Partition,
    /// The data plane alone: the coordinator still hears the agent's heartbeats.
    DataPlane,
}

/// Two pipelines of three stages of the slow model (agents behind fault proxies when
/// `proxied`), the body of a long greedy answer, and that answer streamed without a fault.
async fn two_pipelines_of_three(proxied: bool) -> (TestCluster, Value, Seen) {
    let cluster = TestCluster::start_full(
        slow_model(),
        6,
        PlacementMode::Shard { max_stages: 3 },
        // Exact hidden states: the two pipelines may split the layers differently, and the
        // resumed answer must still be the same.
        Preference::Exact,
        proxied,
    )
    .await;
    let view = cluster.coordinator.membership().view();
    let chains = view.plan.chains(&ModelId::new(MODEL));
    assert_eq!(chains.len(), 2, "{chains:?}");
    assert!(chains.iter().all(|c| c.stages.len() == 3), "{chains:?}");
    drop(view);
    let body = long_answer(json!({"temperature": 0}));
    let reference = stream_chat(&cluster, body.clone(), |_| {}).await;
    assert!(reference.deltas.len() >= 40, "{reference:?}");
    (cluster, body, reference)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middle_pipeline_stage_killed_mid_stream_costs_no_token() {
    // Two pipelines of three stages each; the middle stage of the busy one dies.
    let (cluster, body, reference) = two_pipelines_of_three(false).await;
    let mut killed = None;
    let seen = stream_chat(&cluster, body, |n| {
        if n == 20 {
            killed = Some(cluster.kill_busy_stage(1));
        }
    })
    .await;
    assert!(killed.is_some());
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
}

/// Six agents with room for three of nine layers of `spec` each: two pipelines of three
/// stages that split the layers alike, checkpointing every 16 positions.
async fn two_checkpointed_pipelines(spec: shoal_synth::SynthSpec) -> TestCluster {
    let backend = ClusterBackendConfig {
        pipeline_codec: Preference::Exact,
        checkpoint_every: 16,
        ..ClusterBackendConfig::default()
    };
    let placement = PlacementMode::Shard { max_stages: 3 };
    // Nine layers: room for three on each agent splits both pipelines 3/3/3.
    let weights = Weights::Synth(shoal_synth::SynthSpec {
        n_layers: 9,
        ..spec
    });
    let cluster = TestCluster::start_limited(weights, 6, placement, Some(3), false, backend).await;
    let view = cluster.coordinator.membership().view();
    let chains = view.plan.chains(&ModelId::new(MODEL));
    let ranges = |i: usize| {
        chains[i]
            .stages
            .iter()
            .map(|a| a.layers)
            .collect::<Vec<_>>()
    };
    assert_eq!(chains.len(), 2, "{chains:?}");
    assert_eq!(ranges(0).len(), 3, "{chains:?}");
    assert_eq!(
        ranges(0),
        ranges(1),
        "both pipelines split the layers alike"
    );
    drop(view);
    cluster
}

/// With checkpoints on, every stage of a pipeline checkpoints its own layers to the stage of
/// the same layers on the other pipeline. When the busy pipeline's middle stage dies, each
/// stage of the other pipeline imports its checkpoint from its own store and the head prefills
/// none of the context again: the client sees exactly the fault-free answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_resumes_from_its_stages_checkpoints_when_a_middle_stage_dies() {
    let cluster = two_checkpointed_pipelines(slow_model()).await;
    let (body, reference, prompt_tokens) = long_context(&cluster, 5, 80, 12).await;
    assert!(
        prompt_tokens > 200 && reference.deltas.len() >= 60,
        "{reference:?}"
    );
    let names: Vec<String> = (1..=6).map(|i| format!("agent-{i}")).collect();
    let stored: u64 = names
        .iter()
        .map(|n| cluster.checkpoint_counter(n, |c| &c.stored_tokens))
        .sum();
    // Three stages checkpointed the whole fault-free run, but for their last few positions.
    let each: Vec<(u64, u64)> = names
        .iter()
        .map(|n| {
            (
                cluster.checkpoint_counter(n, |c| &c.pushed_tokens),
                cluster.checkpoint_counter(n, |c| &c.push_failures),
            )
        })
        .collect();
    assert!(
        stored + 3 * 16 >= 3 * prompt_tokens,
        "{stored} stored, pushed by agent {each:?}, prompt {prompt_tokens}"
    );

    let mut killed = None;
    let seen = stream_chat(&cluster, body, |n| {
        if n == 30 {
            killed = Some(cluster.kill_busy_stage(1));
        }
    })
    .await;
    assert!(killed.is_some());
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
    // The head and both later stages restored.
    assert_three_stages_restored(&cluster, &killed.unwrap(), prompt_tokens);
}

/// Every stage of a 3-stage route resumed from a checkpoint (counted on the six agents but
/// `killed`, with no miss), and the gateway counts one restore covering at least the prompt.
fn assert_three_stages_restored(cluster: &TestCluster, killed: &str, prompt_tokens: u64) {
    let live: Vec<String> = (1..=6)
        .map(|i| format!("agent-{i}"))
        .filter(|n| n != killed)
        .collect();
    let sum = |which: fn(&shoal_node::CheckpointCounters) -> &std::sync::atomic::AtomicU64| {
        live.iter()
            .map(|n| cluster.checkpoint_counter(n, which))
            .sum::<u64>()
    };
    assert_eq!((sum(|c| &c.restores), sum(|c| &c.restore_misses)), (3, 0));
    let (gateway_restores, restored) = cluster.coordinator.backend().restores();
    assert_eq!(gateway_restores, 1);
    assert!(
        restored >= prompt_tokens,
        "{restored} positions restored of a {prompt_tokens}-token prompt"
    );
}

/// A pipeline stage whose checkpoint holder dies is given another holder while the generation
/// runs, and checkpoints its layers there from position 0. When the stage itself dies next
/// (after the first holder came back, empty, and the other pipeline is whole again), the
/// generation resumes on the other pipeline: its middle stage imports those layers from the
/// new holder, the other stages from their own stores, and the client sees exactly the
/// fault-free answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_stage_whose_checkpoint_holder_dies_gets_another_and_resumes_from_it() {
    // The slower model, so the generation outlasts a lease, a new holder's refill and a
    // restart while the client reads on.
    let cluster = Arc::new(two_checkpointed_pipelines(slower_model()).await);
    let (body, reference, prompt_tokens) = long_context(&cluster, 6, 600, 12).await;
    assert!(
        prompt_tokens > 200 && reference.deltas.len() >= 400,
        "{reference:?}"
    );
    let names: Vec<String> = (1..=6).map(|i| format!("agent-{i}")).collect();
    let (killed_tx, back, restarter) = restart_when_killed(cluster.clone());
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let faults = tokio::spawn({
        let cluster = cluster.clone();
        let names = names.clone();
        async move {
            started.await.unwrap();
            let index = |name: &str| names.iter().position(|n| n == name).unwrap();
            let stored = |name: &str| cluster.checkpoint_counter(name, |c| &c.stored_tokens);
            let (busy, other) = cluster.pipelines();
            // The other pipeline's middle stage runs the same layers: it holds the busy
            // middle stage's checkpoints.
            let (middle, holder) = (busy[1].clone(), other[1].clone());
            let others: Vec<&String> = names
                .iter()
                .filter(|n| **n != middle && **n != holder)
                .collect();
            let before: u64 = others.iter().map(|n| stored(n)).sum();
            cluster.kill(index(&holder));
            killed_tx.send(index(&holder)).unwrap();
            // Once the holder is declared dead, the gateway names another, and the middle
            // stage's cache so far (at least the prompt) goes there.
            wait_until("a new holder for the middle stage", || {
                cluster.checkpoint_counter(&middle, |c| &c.retargets) == 1
                    && others.iter().map(|n| stored(n)).sum::<u64>() >= before + prompt_tokens
            })
            .await;
            wait_until("the old holder back and ready", || {
                back.load(std::sync::atomic::Ordering::SeqCst)
            })
            .await;
            cluster.kill(index(&middle));
            middle
        }
    });
    let mut started_tx = Some(started_tx);
    let seen = stream_chat(&cluster, body, |n| {
        if n == 10
            && let Some(tx) = started_tx.take()
        {
            tx.send(()).unwrap();
        }
    })
    .await;
    within("the restarter", restarter).await.unwrap();
    let middle = within("the faults", faults).await.unwrap();
    assert_eq!(seen, reference);
    assert_eq!(
        cluster.coordinator.backend().failovers(),
        1,
        "the generation ended before its middle stage was killed"
    );
    // Every stage of the new route restored, the middle one from the holder named late.
    assert_three_stages_restored(&cluster, &middle, prompt_tokens);
}

/// On two pipelines of three stages, every agent behind its own proxies, streams a long
/// greedy answer and cuts the busy pipeline's middle stage after 20 tokens, leaving its
/// connections open and silent (no reset). Checks that the client got exactly the fault-free
/// answer, moved once to the other pipeline; returns the cluster, the request, that answer,
/// the cut stage and when it was cut.
///
/// The stage's own link to the next stage goes through that stage's proxy, which stays up;
/// with nothing coming in from the head, nothing goes out on it either.
async fn cut_a_middle_stage_mid_stream(cut: Cut) -> (TestCluster, Value, Seen, String, Instant) {
    let (cluster, body, reference) = two_pipelines_of_three(true).await;
    let mut cut_stage = None;
    let mut arrivals = Vec::new();
    let seen = stream_chat(&cluster, body.clone(), |n| {
        if n == 20 {
            let name = cluster.busy_stage(1);
            cluster.cut(&name, cut);
            cut_stage = Some((name, Instant::now()));
        } else if n > 20 {
            arrivals.push(Instant::now());
        }
    })
    .await;
    let (name, cut_at) = cut_stage.expect("the stage was cut");
    // No token lost or repeated, and the same answer as without the fault.
    assert_eq!(seen, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
    assert_eq!(failovers_on_metrics(&cluster).await, 1);
    // The stream's longest silence after the cut is the failover.
    let (mut prev, mut longest) = (cut_at, (Duration::ZERO, 0, Duration::ZERO));
    for (i, &at) in arrivals.iter().enumerate() {
        if at - prev > longest.0 {
            longest = (at - prev, 21 + i, at - cut_at);
        }
        prev = at;
    }
    println!(
        "{cut:?}: {name} cut after token 20; the stream's longest silence ({:?}) ended with token {}, {:?} after the cut; failovers by cause {:?}",
        longest.0,
        longest.1,
        longest.2,
        failovers_by_cause(&cluster).await
    );
    (cluster, body, reference, name, cut_at)
}

/// Heals the cut stage `name` and waits until it is alive and all six agents serve again, then
/// checks the cluster answers `body` with `reference`, with no further failover.
async fn heal_and_answer_as_before(
    cluster: &TestCluster,
    name: &str,
    body: Value,
    reference: &Seen,
) {
    let healed_at = Instant::now();
    cluster.heal(name);
    cluster.wait_state(name, NodeState::Alive).await;
    println!("{name} alive {:?} after the heal", healed_at.elapsed());
    cluster.wait_ready(6).await;
    println!("six agents ready {:?} after the heal", healed_at.elapsed());
    let again = stream_chat(cluster, body, |_| {}).await;
    assert_eq!(&again, reference);
    assert_eq!(cluster.coordinator.backend().failovers(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_partitioned_away_mid_stream_costs_no_token() {
    // A partition cuts a node off from everything, so both its links are cut: the data plane
    // (the head's link to it stops moving) and its heartbeats (the coordinator stops hearing
    // from it and declares it dead when its lease runs out, as it would for a node on the far
    // side of a partition). The gateway notices whichever comes first: the stage declared
    // dead or the pipeline's silence.
    let (cluster, body, reference, name, cut_at) =
        cut_a_middle_stage_mid_stream(Cut::Partition).await;
    // Noticed by the lease or the silence, not by a connection breaking (an open, silent one
    // breaks only when HTTP/2 keepalive gives up, tens of seconds later).
    let causes = failovers_by_cause(&cluster).await;
    assert_eq!(causes["declared_dead"] + causes["stalled"], 1, "{causes:?}");
    // The cut node is still running, but the cluster counts it dead (from the moment its
    // lease ran out).
    cluster.wait_state(&name, NodeState::Dead).await;
    let lease_end = cluster.coordinator.membership().view().nodes[&NodeId::new(&name)]
        .lease_deadline
        .into_std();
    println!(
        "{name} declared dead {:?} after the cut",
        lease_end.saturating_duration_since(cut_at)
    );

    // Healed, it is told to rejoin and is a member again; both pipelines serve as before.
    heal_and_answer_as_before(&cluster, &name, body, &reference).await;
}

/// Requests sent over an open connection to a node just cut off wait for its first event;
/// when the membership declares the node dead they go to the other replica, not after the
/// start timeout (set here far beyond the test's bound) or when HTTP/2 keepalive gives up on
/// the connection (40 s), or whenever the link heals (never, here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_node_declared_dead_start_on_another() {
    let backend = ClusterBackendConfig {
        start_timeout: Duration::from_secs(600),
        // Each generation names the other agent as its checkpoint holder.
        checkpoint_every: 4,
        ..ClusterBackendConfig::default()
    };
    let cluster = TestCluster::start_limited(
        Weights::Synth(slow_model()),
        2,
        PlacementMode::Auto,
        None,
        true,
        backend,
    )
    .await;
    let body = greedy("where do the tides come from", 12);
    let router = cluster.coordinator.backend().router();
    let (agent_1, agent_2) = (NodeId::new("agent-1"), NodeId::new("agent-2"));
    // Concurrent requests open the gateway's connections to both agents.
    let both_busy = async {
        while router.in_flight(&agent_1) == 0 || router.in_flight(&agent_2) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let requests = futures::future::join_all((0..6).map(|_| cluster.chat(body.clone())));
    let (answers, ()) =
        futures::future::join(requests, within("both agents busy", both_busy)).await;
    let reference = answers[0].1["choices"][0]["message"]["content"].clone();
    assert!(answers.iter().all(|(status, a)| *status == 200
        && a["choices"][0]["message"]["content"] == reference));

    cluster.cut("agent-1", Cut::Partition);
    let requests = futures::future::join_all((0..6).map(|_| cluster.chat(body.clone())));
    let on_cut = async {
        while router.in_flight(&agent_1) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    // Some land on agent-1 before it is declared dead (1.5 s lease); without watching the
    // membership they would wait for the connection's keepalive to fail, past this bound.
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join(requests, within("a request on agent-1", on_cut)),
    )
    .await
    .expect("requests on the cut node were moved when it was declared dead")
    .0;
    for (status, answer) in answers {
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"][0]["message"]["content"], reference);
    }
    // Nothing of the moved requests was computed, so nothing was checkpointed: their new
    // legs were sent to no holder to restore from.
    for name in ["agent-1", "agent-2"] {
        let restores = (
            cluster.checkpoint_counter(name, |c| &c.restores),
            cluster.checkpoint_counter(name, |c| &c.restore_misses),
        );
        assert_eq!(restores, (0, 0), "{name}");
    }
    cluster.wait_state("agent-1", NodeState::Dead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_data_links_go_silent_is_caught_by_the_stall_timeout() {
    // Only the data plane is cut: the coordinator still hears the stage and counts it alive,
    // and no connection is reset, so the pipeline's silence is all the gateway can notice.
    let (cluster, body, reference, name, _) = cut_a_middle_stage_mid_stream(Cut::DataPlane).await;
    let causes = failovers_by_cause(&cluster).await;
    assert_eq!(causes["stalled"], 1, "{causes:?}");
    let state = cluster.coordinator.membership().view().nodes[&NodeId::new(&name)].state;
    assert_eq!(state, NodeState::Alive);
    heal_and_answer_as_before(&cluster, &name, body, &reference).await;
}

impl TestCluster {
    /// `f` of the running agent named `name`.
    fn with_agent<T>(&self, name: &str, f: impl FnOnce(&Agent) -> T) -> T {
        let agents = self.agents.lock().unwrap();
        let (agent, _) = agents
            .iter()
            .flatten()
            .find(|(a, _)| a.node_id().as_str() == name)
            .unwrap_or_else(|| panic!("no running agent {name}"));
        f(agent)
    }

    /// What the agent named `name` exchanged with its `peer` stage so far.
    fn link_totals(&self, name: &str, peer: Peer) -> PeerTotals {
        self.with_agent(name, |a| a.metrics().links().with(peer))
    }

    fn hop_latency(&self, name: &str) -> shoal_node::LatencySnapshot {
        self.with_agent(name, |a| a.metrics().links().hop_latency())
    }

    fn agent_http(&self, name: &str) -> std::net::SocketAddr {
        self.with_agent(name, |a| a.http_addr().unwrap())
    }

    /// A counter without labels on the agent's `/metrics`.
    async fn agent_counter(&self, name: &str, metric: &str) -> u64 {
        let url = format!("http://{}/metrics", self.agent_http(name));
        let text = within("scraping an agent's metrics", self.http.get(url).send())
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let prefix = format!("{metric} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{metric} not in {text}"))
            .trim()
            .parse()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_stage_pipeline_counts_its_link_traffic_on_both_ends() {
    let cluster = TestCluster::start_opts(
        shoal_synth::SynthSpec::tiny_llama(),
        2,
        PlacementMode::Shard { max_stages: 2 },
        Preference::default(),
    )
    .await;
    let chain = cluster.first_chain();
    assert_eq!(chain.len(), 2, "{chain:?}");
    let (head, tail) = (&chain[0], &chain[1]);
    // Nothing crossed the link yet: the head opens it with the first sequence.
    assert_eq!(cluster.link_totals(head, Peer::Next), PeerTotals::default());

    let (status, body) = cluster.chat(greedy("count the waves", 12)).await;
    assert_eq!(status, 200, "{body}");
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion >= 2, "{body}");

    // The sequence's release follows the answer; wait until both ends saw the same frames.
    let (sent, received) = within("the two ends of the link agreeing", async {
        loop {
            let sent = cluster.link_totals(head, Peer::Next);
            let received = cluster.link_totals(tail, Peer::Previous);
            if sent.sent == received.received && sent.received == received.sent {
                // link open, sequence open, a step per token, then the release
                let released = sent.sent.frames > 1 + 1 + completion;
                if released {
                    return (sent, received);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Down: link open, sequence open, one step per sampled token (the prompt in one step,
    // then each token but the last fed back), the release.
    assert_eq!(sent.sent.frames, 1 + 1 + completion + 1, "{sent:?}");
    assert_eq!(sent.sent.steps, completion);
    assert_eq!(sent.sent.rows, prompt + completion - 1);
    // Up: the accept and one result per step.
    assert_eq!(sent.received.frames, 1 + completion);
    assert_eq!(sent.received.steps, 0);
    // Hidden rows at f16 dominate: at least two bytes per value per row.
    let hidden = shoal_synth::SynthSpec::tiny_llama().hidden as u64;
    assert!(sent.sent.bytes >= sent.sent.rows * 2 * hidden, "{sent:?}");
    // The head has no previous stage and the tail no next one.
    assert_eq!(
        cluster.link_totals(head, Peer::Previous),
        PeerTotals::default()
    );
    assert_eq!(cluster.link_totals(tail, Peer::Next), PeerTotals::default());
    // Every step was stamped and timed by the stage that received it.
    let hop = cluster.hop_latency(tail);
    assert_eq!(hop.count(), received.received.steps);
    assert!(hop.quantile(0.5).is_some());
    assert_eq!(cluster.hop_latency(head).count(), 0);

    // The same figures on the receiving agent's /metrics.
    let text = within(
        "scraping the tail's metrics",
        cluster
            .http
            .get(format!("http://{}/metrics", cluster.agent_http(tail)))
            .send(),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let steps = format!(
        "shoal_node_stage_link_steps_total{{peer=\"previous\",direction=\"received\"}} {completion}"
    );
    assert!(text.contains(&steps), "{steps} not in {text}");
    let count = format!("shoal_node_stage_hop_latency_seconds_count {completion}");
    assert!(text.contains(&count), "{count} not in {text}");
}

/// A random-weight model of Llama 3.2 1B's shape (about 830 MB at 4 bits) on three agents that
/// each have room for a third of it: in automatic placement the planner finds no node that can
/// hold it and splits it, and the pipeline answers what the whole model answers in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1b_model_too_large_for_any_node_is_served_by_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama-1b.gguf");
    shoal_synth::write_model(&shoal_synth::SynthSpec::llama_1b(), &path).unwrap();
    let prompt = "the quick brown fox";
    let max_tokens = 6;
    let reference = {
        let model = shoal_model::Model::open(&path).unwrap();
        let tokens = model
            .encode(&shoal_model::Prompt::Text(prompt.into()))
            .unwrap();
        let pool = std::sync::Arc::new(shoal_model::ThreadPool::new(1).unwrap());
        let mut rt = model
            .whole(pool, shoal_model::ShardOptions::default())
            .unwrap();
        let opts = shoal_model::GenerateOptions {
            max_tokens,
            sampling: shoal_model::SamplingParams::greedy(),
            ..shoal_model::GenerateOptions::default()
        };
        shoal_model::generate(
            &mut rt,
            model.tokenizer(),
            shoal_types::SeqId(1),
            &tokens,
            &opts,
            |_| true,
        )
        .unwrap()
    };
    let file_bytes = std::fs::metadata(&path).unwrap().len();

    let cluster = TestCluster::start_limited(
        Weights::File(path),
        3,
        PlacementMode::Auto,
        Some(3),
        false,
        ClusterBackendConfig {
            pipeline_codec: Preference::Exact,
            ..ClusterBackendConfig::default()
        },
    )
    .await;
    let budget = cluster.memory_budget.unwrap();
    // The ends carry the embeddings and the output head, so a third of the layers plus those
    // is well over a third of the file, but short of all of it.
    assert!(
        budget < file_bytes,
        "each node has room for {budget} of {file_bytes} bytes"
    );
    let chain = cluster.first_chain();
    assert_eq!(chain.len(), 3, "{chain:?}");
    let r = within(
        "a completion from the 1B pipeline",
        cluster
            .http
            .post(cluster.url("/v1/completions"))
            .json(&json!({
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
            }))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["text"].as_str().unwrap(),
        reference.text,
        "{body}"
    );
    assert_eq!(
        body["usage"]["completion_tokens"].as_u64().unwrap(),
        reference.tokens.len() as u64
    );
}

/// A node that comes back with another version of the model (a file of the same name whose
/// sha256 differs from the one the cluster serves) is alive but gets no share of the model,
/// and the plan says why: every request keeps going to the node that runs the expected
/// version, so answers do not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_version_of_the_model_gets_no_share_of_it() {
    let mut cluster = TestCluster::start(1).await;
    let (status, before) = cluster.chat(greedy("hello there", 8)).await;
    assert_eq!(status, 200, "{before}");

    let other = cluster._dir.path().join("other-version.gguf");
    let spec = shoal_synth::SynthSpec {
        seed: 4242,
        ..shoal_synth::SynthSpec::tiny_llama()
    };
    shoal_synth::write_model(&spec, &other).unwrap();
    let bytes = std::fs::read(&other).unwrap();
    let stale = ModelFile {
        id: ModelId::new(MODEL),
        path: other,
        sha256: {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        },
        bytes: bytes.len() as u64,
    };
    assert_ne!(stale.sha256, cluster.model.sha256);
    cluster.add_agent_with("agent-2", stale).await;
    cluster.wait_state("agent-2", NodeState::Alive).await;
    // The plan is made after agent-2 joined, and leaves it out.
    let view = cluster.coordinator.membership().view();
    let on: Vec<String> = view
        .plan
        .for_model(&ModelId::new(MODEL))
        .map(|a| a.node.to_string())
        .collect();
    assert_eq!(on, ["agent-1"], "{:#?}", view.plan);
    let explained = view.placement.explain();
    assert!(
        explained.contains("agent-2: has another version of the model"),
        "{explained}"
    );
    for _ in 0..4 {
        let (status, again) = cluster.chat(greedy("hello there", 8)).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(
            again["choices"][0]["message"]["content"],
            before["choices"][0]["message"]["content"]
        );
    }
}
