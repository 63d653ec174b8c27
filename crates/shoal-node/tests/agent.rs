//! Node agents against an in-process coordinator (shoal-control's membership and service)
//! over real mutual TLS on loopback: joining, heartbeats and shard loading, the data plane's
//! streams and refusals, drain, leave, failure detection and the agent's metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use futures::StreamExt;
use sha2::{Digest, Sha256};
use shoal_control::{
    ClusterView, CoordinatorService, MembershipConfig, MembershipHandle, ModelSpec, NodeState,
    membership,
};
use shoal_engine::EngineConfig;
use shoal_model::{GenerateOptions, Model, Prompt, SamplingParams, ShardOptions, ThreadPool};
use shoal_net::{
    AccessPolicy, AuthLayer, ClusterCa, ConnectOptions, PeerIdentity, Revocations, Role,
    ShoalNodeClient, TlsMaterial, TlsMode, class_of, connect, node_client, server_builder,
};
use shoal_node::{Agent, AgentConfig, ControlState, ModelFile};
use shoal_proto::v1::generate_event::Event;
use shoal_proto::v1::generate_request::Prompt as WirePrompt;
use shoal_proto::v1::node_client::NodeClient;
use shoal_proto::v1::{self, ShardState};
use shoal_proto::{ERROR_CLASS_HEADER, ERROR_REASON_HEADER, VERSION_HEADER};
use shoal_synth::SynthSpec;
use shoal_types::{ErrorClass, ModelId, NodeId, SeqId};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::server::TcpIncoming;

/// Bound on any single step (generous: the machine may be busy with other builds).
const STEP: Duration = Duration::from_secs(60);
const CLUSTER: &str = "agent-test";
const MODEL: &str = "tiny";
const LEASE: Duration = Duration::from_millis(1500);
const HEARTBEAT: Duration = Duration::from_millis(200);
const RPC_DEADLINE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("hung for {STEP:?}: {what}"),
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("shoal_node=debug,shoal_control=info,warn")
        .try_init();
}

fn material(ca: &ClusterCa, role: Role, node: &str) -> TlsMaterial {
    let id = PeerIdentity::new(CLUSTER, role, node).unwrap();
    let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    ca.issue(&id, &hosts, Duration::from_secs(3600))
        .unwrap()
        .into_material(ca.cert_pem())
}

/// A coordinator on `127.0.0.1`, the tiny model on disk, and the CA that signs everyone.
struct Cluster {
    ca: ClusterCa,
    model: Arc<Model>,
    file: ModelFile,
    membership: MembershipHandle,
    coordinator: SocketAddr,
    stop: CancellationToken,
    /// Stops the coordinator's server only (membership keeps running).
    server: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn cluster(spec: SynthSpec) -> Cluster {
    let mut c = prepare(spec).await;
    c.serve("127.0.0.1:0".parse().unwrap()).await;
    c
}

/// The model on disk, the CA and the membership actor; the coordinator is not served yet.
async fn prepare(spec: SynthSpec) -> Cluster {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("tiny.gguf");
    shoal_synth::write_model(&spec, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let model = Arc::new(Model::open(&path).unwrap());
    let cfg = model.config();
    let spec = ModelSpec {
        id: ModelId::new(MODEL),
        sha256: sha256.clone(),
        file_bytes: bytes.len() as u64,
        n_layers: cfg.n_layers,
        layer_bytes: shoal_node::capability::layer_bytes(&model),
        kv_bytes_per_token: (cfg.kv_bytes_per_token_layer() * cfg.n_layers as usize) as u64,
        context_length: cfg.context_length,
    };
    let stop = CancellationToken::new();
    let config = MembershipConfig {
        lease: LEASE,
        heartbeat_interval: HEARTBEAT,
        models: vec![spec],
        ..MembershipConfig::default()
    };
    let (membership, _task) = membership::start(
        config,
        Arc::new(shoal_control::MemoryStore::new()),
        stop.clone(),
    )
    .await
    .unwrap();
    Cluster {
        ca: ClusterCa::generate(CLUSTER).unwrap(),
        model,
        file: ModelFile {
            id: ModelId::new(MODEL),
            path,
            sha256,
            bytes: bytes.len() as u64,
        },
        membership,
        coordinator: "127.0.0.1:1".parse().unwrap(),
        server: stop.child_token(),
        stop,
        _dir: dir,
    }
}

impl Cluster {
    /// Serves the coordinator over mTLS on `addr`.
    async fn serve(&mut self, addr: SocketAddr) {
        let mode = TlsMode::Mtls(material(&self.ca, Role::Coordinator, "coordinator"));
        let listener = within("binding the coordinator", TcpListener::bind(addr))
            .await
            .unwrap();
        self.coordinator = listener.local_addr().unwrap();
        let router = server_builder(&mode)
            .unwrap()
            .layer(
                AuthLayer::new(&mode, AccessPolicy::shoal_default(), Revocations::new()).unwrap(),
            )
            .add_service(CoordinatorService::new(self.membership.clone()).into_server());
        self.server = self.stop.child_token();
        tokio::spawn(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listener),
            self.server.clone().cancelled_owned(),
        ));
    }

    fn agent_config(&self, name: &str) -> AgentConfig {
        AgentConfig {
            node_id: NodeId::new(name),
            coordinator: self.coordinator.to_string(),
            tls: TlsMode::Mtls(material(&self.ca, Role::Agent, name)),
            data_listen: "127.0.0.1:0".parse().unwrap(),
            advertise_addr: None,
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            models: vec![self.file.clone()],
            threads: 1,
            engine: EngineConfig::default(),
            default_max_tokens: 16,
            memory_budget: None,
            checkpoint_store: None,
            benchmark: true,
            model_keys: None,
        }
    }

    async fn agent(&self, name: &str) -> (Agent, CancellationToken) {
        let cancel = CancellationToken::new();
        let agent = within(
            "starting an agent",
            Agent::start(self.agent_config(name), cancel.clone()),
        )
        .await
        .unwrap();
        (agent, cancel)
    }

    /// Waits until the cluster view satisfies `cond`.
    async fn wait_view(&self, what: &str, cond: impl Fn(&ClusterView) -> bool) -> Arc<ClusterView> {
        let mut rx = self.membership.subscribe_view();
        within(what, async {
            loop {
                let v = rx.borrow_and_update().clone();
                if cond(&v) {
                    return v;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
    }

    async fn wait_ready(&self, names: &[&str]) -> Arc<ClusterView> {
        let model = ModelId::new(MODEL);
        self.wait_view("agents alive with the model ready", |v| {
            names.iter().all(|n| {
                v.nodes.get(&NodeId::new(*n)).is_some_and(|node| {
                    node.state == NodeState::Alive
                        && node.shards.iter().any(|s| {
                            s.model == model
                                && s.state == shoal_control::membership::ShardState::Ready
                        })
                })
            })
        })
        .await
    }

    async fn wait_state(&self, name: &str, state: NodeState) {
        let id = NodeId::new(name);
        self.wait_view(&format!("{name} becoming {state:?}"), |v| {
            v.nodes.get(&id).is_some_and(|n| n.state == state)
        })
        .await;
    }

    /// A `Node` client with a coordinator's certificate (the role that routes requests).
    async fn client(&self, agent: &Agent) -> ShoalNodeClient {
        let mode = TlsMode::Mtls(material(&self.ca, Role::Coordinator, "router"));
        let channel = within(
            "connecting to the agent",
            connect(
                &agent.data_addr().to_string(),
                &mode,
                ConnectOptions::default(),
            ),
        )
        .await
        .unwrap();
        node_client(channel, RPC_DEADLINE)
    }
}

fn text_request(prompt: &str, max_tokens: u32) -> v1::GenerateRequest {
    v1::GenerateRequest {
        request_id: "req-1".into(),
        model_id: MODEL.into(),
        prompt: Some(WirePrompt::Text(prompt.into())),
        max_tokens: Some(max_tokens),
        sampling: Some(v1::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Everything one generation streamed.
#[derive(Debug, Default)]
struct Streamed {
    started: Option<v1::Started>,
    /// The positions each `Progress` event announced.
    progress: Vec<u32>,
    tokens: Vec<u32>,
    text: String,
    finished: Option<v1::Finished>,
    error: Option<v1::Error>,
}

async fn generate_all(client: &mut ShoalNodeClient, req: v1::GenerateRequest) -> Streamed {
    let mut stream = within("Generate", client.generate(req))
        .await
        .unwrap()
        .into_inner();
    let mut out = Streamed::default();
    while let Some(ev) = within("the next event", stream.next()).await {
        match ev.unwrap().event.unwrap() {
            Event::Started(s) => {
                assert!(
                    out.started.is_none() && out.tokens.is_empty(),
                    "Started comes first"
                );
                out.started = Some(s);
            }
            Event::Progress(p) => {
                assert!(
                    out.started.is_some() && out.tokens.is_empty(),
                    "Progress comes between Started and the first token"
                );
                out.progress.push(p.positions);
            }
            Event::Token(t) => {
                out.tokens.push(t.id);
                out.text.push_str(&t.text);
            }
            Event::Finished(f) => {
                out.text.push_str(&f.tail);
                out.finished = Some(f);
            }
            Event::Error(e) => out.error = Some(e),
        }
    }
    out
}

/// What the model generates greedily on its own.
fn direct(model: &Model, prompt: &str, max_tokens: u32) -> shoal_model::Generation {
    let ids = model.encode(&Prompt::Text(prompt.into())).unwrap();
    let mut rt = model
        .whole(
            Arc::new(ThreadPool::new(1).unwrap()),
            ShardOptions::default(),
        )
        .unwrap();
    let opts = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    shoal_model::generate(&mut rt, model.tokenizer(), SeqId(1), &ids, &opts, |_| true).unwrap()
}

fn headers(s: &tonic::Status) -> (String, String) {
    let get = |h| {
        s.metadata()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (get(ERROR_CLASS_HEADER), get(ERROR_REASON_HEADER))
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_join_serve_the_model_and_leave() {
    let c = cluster(SynthSpec::tiny_llama()).await;
    let (a, _ca) = c.agent("pi-1").await;
    let (b, _cb) = c.agent("pi-2").await;
    let view = c.wait_ready(&["pi-1", "pi-2"]).await;
    assert!(
        matches!(a.control_state(), ControlState::Joined { cluster_id } if cluster_id == view.cluster_id)
    );
    for agent in [&a, &b] {
        let node = &view.nodes[agent.node_id()];
        assert_eq!(node.data_addr, agent.data_addr().to_string());
        assert_eq!(
            node.http_addr.as_deref(),
            Some(agent.http_addr().unwrap().to_string().as_str())
        );
        // The start-up benchmark measured the model.
        let speed = node
            .capability
            .speeds
            .iter()
            .find(|s| s.model.as_str() == MODEL)
            .expect("a measured speed");
        assert!(speed.decode_tokens_per_second > 0.0, "{speed:?}");
        assert!(speed.layer_bytes > 0);
        assert_eq!(node.capability.threads, 1);
        assert!(node.capability.cores >= 1);
        let shards = agent.shards();
        assert_eq!(shards.len(), 1);
        assert_eq!(shards[0].state, ShardState::Ready as i32);
    }

    // The data plane streams exactly what the model generates on its own.
    let prompt = "The quick brown fox";
    let expected = direct(&c.model, prompt, 12);
    let mut client = c.client(&a).await;
    let got = generate_all(&mut client, text_request(prompt, 12)).await;
    let started = got.started.expect("a Started event");
    assert_eq!(
        started.prompt_ids,
        c.model.encode(&Prompt::Text(prompt.into())).unwrap()
    );
    assert_eq!(started.node_id, "pi-1");
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(got.tokens, expected.tokens);
    assert_eq!(got.text, expected.text);
    let finished = got.finished.expect("a Finished event");
    assert_eq!(finished.completion_tokens as usize, expected.tokens.len());
    assert_eq!(finished.prompt_tokens as usize, started.prompt_ids.len());
    // The prompt's prefill was announced (one chunk, here) before it ran.
    assert_eq!(got.progress, vec![started.prompt_ids.len() as u32]);

    // The same through token ids, and through the node's own OpenAI API.
    let by_ids = generate_all(
        &mut client,
        v1::GenerateRequest {
            prompt: Some(WirePrompt::Tokens(v1::TokenPrompt {
                ids: started.prompt_ids.clone(),
            })),
            ..text_request("", 12)
        },
    )
    .await;
    assert_eq!(by_ids.tokens, expected.tokens);
    let http = reqwest::Client::new();
    let base = format!("http://{}", a.http_addr().unwrap());
    let ready = within("GET /readyz", http.get(format!("{base}/readyz")).send())
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let completion: serde_json::Value = within(
        "POST /v1/completions",
        http.post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({
                "model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0
            }))
            .send(),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(completion["choices"][0]["text"], expected.text.as_str());

    // Status answers from the engines' counters (the engine publishes them after the step
    // that sent the last event, so the count of active sequences may lag a moment).
    let status = within("Status showing no active sequence", async {
        loop {
            let s = client
                .status(v1::StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if s.load.as_ref().is_some_and(|l| l.active_sequences == 0) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(status.node_id, "pi-1");
    assert_eq!(status.models, [MODEL]);
    let load = status.load.unwrap();
    assert_eq!(load.active_sequences, 0);
    assert!(load.tokens_generated_total >= 3 * expected.tokens.len() as u64);

    // /metrics carries the node's metrics beside the gateway's, in a parseable exposition.
    let metrics = within("GET /metrics", http.get(format!("{base}/metrics")).send())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in shoal_node::metrics::ALL_NAMES {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect(line);
        assert!(series.starts_with("shoal_"), "{line}");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
    }
    assert!(
        metrics.contains("shoal_node_generations_total{outcome=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shoal_node_batch_size_bucket{le=\"1.0\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shoal_node_ttft_seconds_count 2"),
        "{metrics}"
    );

    // Leaving on purpose is immediate; the other agent keeps serving.
    within("shutting pi-2 down", b.shutdown(Duration::from_secs(5)))
        .await
        .unwrap();
    c.wait_state("pi-2", NodeState::Left).await;
    let again = generate_all(&mut client, text_request(prompt, 4)).await;
    assert!(again.finished.is_some(), "{again:?}");
    within("shutting pi-1 down", a.shutdown(Duration::from_secs(5)))
        .await
        .unwrap();
    c.wait_state("pi-1", NodeState::Left).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_stopped_without_leaving_is_declared_dead() {
    let c = cluster(SynthSpec::tiny_llama()).await;
    let (a, cancel) = c.agent("pi-1").await;
    c.wait_ready(&["pi-1"]).await;
    // A crash: no Leave, heartbeats just stop.
    cancel.cancel();
    drop(a);
    c.wait_state("pi-1", NodeState::Dead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_joins_once_the_coordinator_comes_up() {
    let mut c = prepare(SynthSpec::tiny_llama()).await;
    // A port nobody listens on yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    c.coordinator = addr;
    let mut cfg = c.agent_config("pi-1");
    cfg.benchmark = false;
    let agent = within(
        "starting an agent",
        Agent::start(cfg, CancellationToken::new()),
    )
    .await
    .unwrap();
    // It keeps trying (and serves nothing meanwhile).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.control_state(), ControlState::Joining);
    assert!(agent.shards().is_empty());
    c.serve(addr).await;
    c.wait_ready(&["pi-1"]).await;
    assert!(matches!(agent.control_state(), ControlState::Joined { .. }));
    within("shutting down", agent.shutdown(Duration::from_secs(5)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_keeps_serving_without_its_coordinator_and_rejoins() {
    let mut c = cluster(SynthSpec::tiny_llama()).await;
    let (a, _cancel) = c.agent("pi-1").await;
    c.wait_ready(&["pi-1"]).await;
    let addr = c.coordinator;
    c.server.cancel();
    // The coordinator's side: the lease runs out.
    c.wait_state("pi-1", NodeState::Dead).await;
    // The agent's side: heartbeats fail, and what is loaded is still served.
    wait_until("heartbeats failing", || {
        a.metrics().heartbeat_failures() > 0
    })
    .await;
    let mut client = c.client(&a).await;
    let got = generate_all(&mut client, text_request("hi", 4)).await;
    assert!(got.finished.is_some(), "{got:?}");
    // The coordinator returns and tells the agent to join again; it does, keeping its shard.
    c.serve(addr).await;
    c.wait_ready(&["pi-1"]).await;
    assert!(matches!(a.control_state(), ControlState::Joined { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_agent_stops_trying_and_says_why() {
    let c = cluster(SynthSpec::tiny_llama()).await;
    let mut cfg = c.agent_config("pi-1");
    cfg.node_id = NodeId::new("-not-a-host-name");
    cfg.benchmark = false;
    let agent = within(
        "starting an agent",
        Agent::start(cfg, CancellationToken::new()),
    )
    .await
    .unwrap();
    let mut control = agent.watch_control();
    let state = within("the join being refused", async {
        loop {
            let s = control.borrow_and_update().clone();
            if matches!(s, ControlState::Refused { .. }) {
                return s;
            }
            control.changed().await.unwrap();
        }
    })
    .await;
    assert_eq!(
        state,
        ControlState::Refused {
            class: ErrorClass::InvalidRequest,
            reason: Some("invalid_node_id".into()),
            message: state_message(&state),
        }
    );
    assert!(
        state_message(&state).contains("-not-a-host-name"),
        "{state:?}"
    );
    assert!(c.membership.view().nodes.is_empty());
    within("shutting down", agent.shutdown(Duration::from_secs(5)))
        .await
        .unwrap();
}

fn state_message(s: &ControlState) -> String {
    match s {
        ControlState::Refused { message, .. } => message.clone(),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_agent_refuses_new_generations_and_unloads() {
    let c = cluster(SynthSpec::tiny_llama()).await;
    let (a, _cancel) = c.agent("pi-1").await;
    c.wait_ready(&["pi-1"]).await;
    let mut client = c.client(&a).await;
    c.membership.drain(NodeId::new("pi-1")).await.unwrap();
    wait_until("the agent hearing it must drain", || a.is_draining()).await;
    let err = within(
        "Generate while draining",
        client.generate(text_request("hi", 4)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(headers(&err), ("unavailable".into(), "draining".into()));
    // Nothing in flight: the coordinator takes the shard away and the agent unloads it.
    c.wait_state("pi-1", NodeState::Draining).await;
    wait_until("the shard being unloaded", || a.shards().is_empty()).await;

    c.membership.undrain(NodeId::new("pi-1")).await.unwrap();
    wait_until("the agent hearing it may serve again", || !a.is_draining()).await;
    c.wait_ready(&["pi-1"]).await;
    let got = generate_all(&mut client, text_request("hi", 4)).await;
    assert!(got.finished.is_some(), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_calls_are_refused_with_their_class() {
    let c = cluster(SynthSpec::tiny_llama()).await;
    let (a, _cancel) = c.agent("pi-1").await;
    c.wait_ready(&["pi-1"]).await;
    let mut client = c.client(&a).await;

    let err = within(
        "Generate for an unknown model",
        client.generate(v1::GenerateRequest {
            model_id: "no-such-model".into(),
            ..text_request("hi", 4)
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        headers(&err),
        ("not_found".into(), "model_not_found".into())
    );
    assert_eq!(class_of(&err).0, ErrorClass::NotFound);

    let vocab = c.model.tokenizer().vocab_size() as u32;
    let err = within(
        "Generate with an out-of-vocabulary token",
        client.generate(v1::GenerateRequest {
            prompt: Some(WirePrompt::Tokens(v1::TokenPrompt {
                ids: vec![1, vocab + 7],
            })),
            ..text_request("", 4)
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        headers(&err),
        ("invalid_request".into(), "token_out_of_range".into())
    );

    let err = within(
        "Generate resuming more tokens than max_tokens",
        client.generate(v1::GenerateRequest {
            resume: vec![5, 6, 7, 8, 9],
            ..text_request("hi", 4)
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(
        headers(&err),
        ("invalid_request".into(), "invalid_resume".into())
    );
    let err = within(
        "Generate resuming a token outside the vocabulary",
        client.generate(v1::GenerateRequest {
            resume: vec![5, vocab + 1],
            ..text_request("hi", 4)
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(
        headers(&err),
        ("invalid_request".into(), "token_out_of_range".into())
    );

    let context = c.model.config().context_length;
    let err = within(
        "Generate beyond the context window",
        client.generate(text_request("hi", context + 1)),
    )
    .await
    .unwrap_err();
    assert_eq!(
        headers(&err),
        ("invalid_request".into(), "context_length_exceeded".into())
    );

    // A caller speaking another protocol version is refused before any handler runs.
    let mode = TlsMode::Mtls(material(&c.ca, Role::Coordinator, "router-v2"));
    let channel = within(
        "connecting",
        connect(&a.data_addr().to_string(), &mode, ConnectOptions::default()),
    )
    .await
    .unwrap();
    let mut v2 = NodeClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert(VERSION_HEADER, "2".parse().unwrap());
        Ok(req)
    });
    let err = within(
        "Generate from protocol v2",
        v2.generate(text_request("hi", 4)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(headers(&err).1, "protocol_version_mismatch", "{err:?}");
    // A client certificate (operator tooling) may not call the data plane.
    let mode = TlsMode::Mtls(material(&c.ca, Role::Client, "laptop"));
    let channel = within(
        "connecting as a client",
        connect(&a.data_addr().to_string(), &mode, ConnectOptions::default()),
    )
    .await
    .unwrap();
    let err = within(
        "Generate as an operator",
        node_client(channel, RPC_DEADLINE).generate(text_request("hi", 4)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let refused = a.metrics().generations(shoal_api::metrics::Outcome::Error(
        ErrorClass::InvalidRequest,
    ));
    assert_eq!(refused, 4);
}

/// Checkpoint calls from a peer are checked like any input (an unknown model version, a
/// malformed or discontinuous chunk, another role), and a generation resumed with a
/// checkpoint held here imports it and answers what it answers without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_from_peers_are_checked_and_a_resume_imports_one() {
    use shoal_model::{SeqStep, ShardInput, ShardRuntime};
    let c = cluster(SynthSpec::tiny_llama()).await;
    let (a, _cancel) = c.agent("pi-1").await;
    c.wait_ready(&["pi-1"]).await;
    let mut peer = {
        let mode = TlsMode::Mtls(material(&c.ca, Role::Agent, "pi-2"));
        let addr = a.data_addr().to_string();
        let channel = within(
            "connecting as a peer",
            connect(&addr, &mode, ConnectOptions::default()),
        )
        .await
        .unwrap();
        node_client(channel, RPC_DEADLINE)
    };

    // Real entries: the prompt run through the whole model here.
    let prompt = c
        .model
        .encode(&Prompt::Text("the tide comes in".into()))
        .unwrap();
    let mut rt = c
        .model
        .whole(
            Arc::new(ThreadPool::new(1).unwrap()),
            ShardOptions::default(),
        )
        .unwrap();
    let step = SeqStep {
        seq: SeqId(1),
        pos: 0,
        n_tokens: prompt.len() as u32,
        logits: true,
    };
    rt.forward(&[step], ShardInput::Tokens(&prompt)).unwrap();
    let snap = rt.export_kv(SeqId(1), 0, &prompt).unwrap();
    let chunk = |request_id: &str, sha: &str, s: &shoal_model::KvSnapshot| v1::KvChunk {
        request_id: request_id.into(),
        model_id: MODEL.into(),
        model_sha256: sha.into(),
        layers: Some(v1::LayerRange {
            start: s.layers.start(),
            end: s.layers.end(),
        }),
        kv_dim: s.kv_dim as u32,
        start: s.start,
        tokens: s.tokens.clone(),
        kv: s.kv_bytes(),
    };
    let push = |chunks: Vec<v1::KvChunk>| {
        let mut peer = peer.clone();
        async move { peer.push_checkpoint(futures::stream::iter(chunks)).await }
    };
    let sha = c.file.sha256.clone();

    let err = within(
        "a push for an unknown model version",
        push(vec![chunk("r1", &"ab".repeat(32), &snap)]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut short = chunk("r1", &sha, &snap);
    short.kv.truncate(10);
    let err = within("a push of a malformed chunk", push(vec![short]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = within(
        "a push that continues nothing",
        push(vec![chunk("r1", &sha, &snap.slice(2, 3))]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let fetch = v1::FetchCheckpointRequest {
        request_id: "r1".into(),
        model_sha256: sha.clone(),
        layers: None,
    };
    let err = within(
        "fetching nothing",
        peer.clone().fetch_checkpoint(fetch.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The coordinator's certificate may route generations, not move checkpoints.
    let err = within(
        "a push with the coordinator's certificate",
        c.client(&a)
            .await
            .push_checkpoint(futures::stream::iter(vec![chunk("r1", &sha, &snap)])),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Two pieces make one checkpoint, fetched back whole.
    let n = snap.len();
    let reply = within(
        "a push in two pieces",
        push(vec![
            chunk("r1", &sha, &snap.slice(0, 2)),
            chunk("r1", &sha, &snap.slice(2, n)),
        ]),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(reply.stored as usize, n);
    let mut fetched = within("fetching", peer.clone().fetch_checkpoint(fetch.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(c) = within("a chunk", fetched.message()).await.unwrap() {
        // Each chunk names the model as the holder's file of that version does.
        assert_eq!(c.model_id, MODEL);
        tokens.extend(c.tokens);
    }
    assert_eq!(tokens, prompt);
    // Checkpoints are kept by layer range: one of other layers is not this one, and a range
    // that is no range is refused.
    let layers = |start, end| v1::FetchCheckpointRequest {
        layers: Some(v1::LayerRange { start, end }),
        ..fetch.clone()
    };
    for (start, end, code) in [(0, 1, Code::NotFound), (2, 1, Code::InvalidArgument)] {
        let err = within(
            "fetching other layers",
            peer.clone().fetch_checkpoint(layers(start, end)),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }

    // A generation resumed here with this node as the holder imports the checkpoint.
    let plain = generate_all(
        &mut c.client(&a).await,
        text_request("the tide comes in", 6),
    )
    .await;
    let restored = generate_all(
        &mut c.client(&a).await,
        v1::GenerateRequest {
            request_id: "r1".into(),
            restore: Some(v1::CheckpointSource {
                node: "pi-1".into(),
                addr: a.data_addr().to_string(),
            }),
            ..text_request("the tide comes in", 6)
        },
    )
    .await;
    assert!(
        plain.error.is_none() && restored.error.is_none(),
        "{restored:?}"
    );
    assert_eq!(restored.tokens, plain.tokens);
    let counters = a.metrics().checkpoints();
    assert_eq!(
        counters.restores.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let metrics = reqwest::get(format!("http://{}/metrics", a.http_addr().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Every prompt position but the last, whose logits give the first token.
    let line = format!("shoal_node_kv_restored_tokens_total {}", n - 1);
    assert!(metrics.contains(&line), "{line} not in {metrics}");
    // Taken out of the store by the resume; a drop of nothing is fine.
    let err = within(
        "fetching a used checkpoint",
        peer.clone().fetch_checkpoint(fetch),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    within(
        "dropping",
        peer.drop_checkpoint(v1::DropCheckpointRequest {
            request_id: "r1".into(),
            layers: None,
        }),
    )
    .await
    .unwrap();
}

/// A model with a long context, so a generation outlasts every buffer between the engine and
/// a client that stops reading (the engine then pauses it).
fn long_context() -> SynthSpec {
    SynthSpec {
        context_length: 16384,
        ..SynthSpec::tiny_llama()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_frees_its_sequence() {
    let c = cluster(long_context()).await;
    let (a, _cancel) = c.agent("pi-1").await;
    c.wait_ready(&["pi-1"]).await;
    let mut client = c.client(&a).await;
    let idle = |a: &Agent| {
        let l = a.load();
        l.active_sequences == 0 && l.queue_depth == 0 && l.kv_bytes == 0
    };
    let cancelled = shoal_api::metrics::Outcome::Error(ErrorClass::Cancelled);
    let expired = shoal_api::metrics::Outcome::Error(ErrorClass::DeadlineExceeded);

    // A client that reads a little and drops its stream.
    let mut stream = within(
        "Generate",
        client.generate(text_request("Once upon", 16000)),
    )
    .await
    .unwrap()
    .into_inner();
    for _ in 0..4 {
        within("an event", stream.next()).await.unwrap().unwrap();
    }
    assert_eq!(
        a.load().active_sequences,
        1,
        "the generation must still be running (paused on the unread stream) when dropped"
    );
    drop(stream);
    wait_until("the dropped generation freeing its sequence", || idle(&a)).await;
    wait_until("the cancelled outcome being counted", || {
        a.metrics().generations(cancelled) == 1
    })
    .await;

    // A client whose deadline passes, still holding the stream it does not read.
    let req =
        shoal_net::with_deadline(text_request("Once upon", 16000), Duration::from_millis(800));
    let mut held = within("Generate with a deadline", client.generate(req))
        .await
        .unwrap()
        .into_inner();
    within("the first event", held.next())
        .await
        .unwrap()
        .unwrap();
    wait_until("the expired generation freeing its sequence", || {
        a.metrics().generations(expired) == 1 && idle(&a)
    })
    .await;
    drop(held);
    assert_eq!(a.metrics().generations(cancelled), 1);
}
