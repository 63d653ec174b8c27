//! An in-process coordinator that enrolls nodes, and agents of a tiny random-weight model,
//! for the cluster-identity tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test binary uses a subset

use shoal_cluster::{Coordinator, CoordinatorOptions, EnrollmentOptions};
use shoal_control::{CoordinatorConfig, NodeState};
use shoal_net::{
    ClusterCa, ConnectOptions, JoinToken, PeerIdentity, RenewableIdentity, Role, ShoalAdminClient,
    TlsMaterial, TlsMode,
};
use shoal_node::{Agent, AgentConfig, EnrollConfig, EnrollError, ModelFile, Renewal};
use shoal_proto::v1;
use shoal_types::{ModelId, NodeId};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const MODEL: &str = "tiny";
pub const WAIT: Duration = Duration::from_secs(60);

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("shoal_cluster=info,shoal_net=info,shoal_node=info,warn")
        .try_init();
}

pub fn hosts() -> Vec<String> {
    vec!["127.0.0.1".to_owned(), "localhost".to_owned()]
}

pub fn material(ca: &ClusterCa, role: Role, name: &str) -> TlsMaterial {
    let id = PeerIdentity::new(ca.cluster_id(), role, name).unwrap();
    ca.issue(&id, &hosts(), Duration::from_secs(3600))
        .unwrap()
        .into_material(ca.cert_pem())
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ca: Arc<ClusterCa>,
    pub model: ModelFile,
    pub coordinator: Coordinator,
    pub agents: Vec<(Agent, CancellationToken)>,
}

impl Fixture {
    /// A coordinator whose enrolled certificates live `cert_validity`.
    pub async fn start(cert_validity: Duration) -> Fixture {
        Self::start_with_api_key(cert_validity, None).await
    }

    /// Like [`Fixture::start`], with the gateway requiring `api_key` when given.
    pub async fn start_with_api_key(cert_validity: Duration, api_key: Option<&str>) -> Fixture {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("tiny.gguf");
        shoal_synth::write_model(&shoal_synth::SynthSpec::tiny_llama(), &path).unwrap();
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
        let config = CoordinatorConfig {
            lease_ms: 1500,
            heartbeat_interval_ms: 200,
            kv_reserve_tokens: 256,
            models: vec![spec],
            ..CoordinatorConfig::default()
        }
        .validate()
        .unwrap();
        let ca = Arc::new(ClusterCa::generate("enroll-test").unwrap());
        let mut opts = CoordinatorOptions::on_loopback(
            config,
            TlsMode::Mtls(material(&ca, Role::Coordinator, "coordinator")),
        );
        opts.api.api_key = api_key.map(str::to_owned);
        let enrollment = EnrollmentOptions {
            ca: ca.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_validity,
            token_ttl: Duration::from_secs(600),
        };
        let coordinator = within(
            "starting the coordinator",
            Coordinator::start_with_enrollment(opts, Some(enrollment), CancellationToken::new()),
        )
        .await
        .unwrap();
        Fixture {
            dir,
            ca,
            model,
            coordinator,
            agents: Vec::new(),
        }
    }

    pub async fn admin(&self) -> ShoalAdminClient {
        let mode = TlsMode::Mtls(material(&self.ca, Role::Client, "operator"));
        let ch = within(
            "connecting as an operator",
            shoal_net::connect(
                &self.coordinator.grpc_addr().to_string(),
                &mode,
                ConnectOptions::default(),
            ),
        )
        .await
        .unwrap();
        shoal_net::admin_client(ch, Duration::from_secs(10))
    }

    pub async fn token(&self, ttl: Duration) -> JoinToken {
        let r = within(
            "creating a join token",
            self.admin()
                .await
                .create_join_token(v1::CreateJoinTokenRequest {
                    ttl_ms: ttl.as_millis() as u64,
                    role: "agent".into(),
                }),
        )
        .await
        .unwrap()
        .into_inner();
        assert!(r.token.contains(&r.token_id));
        r.token.parse().unwrap()
    }

    pub async fn enroll(&self, name: &str, token: &JoinToken) -> Result<TlsMaterial, EnrollError> {
        within(
            "enrolling",
            shoal_node::enroll(&EnrollConfig {
                enroll_addr: self.coordinator.enroll_addr().unwrap().to_string(),
                token: token.clone(),
                node_id: NodeId::new(name),
                hosts: hosts(),
                connect_timeout: Duration::from_secs(10),
            }),
        )
        .await
    }

    pub fn agent_config(&self, name: &str, tls: TlsMode) -> AgentConfig {
        AgentConfig {
            node_id: NodeId::new(name),
            coordinator: self.coordinator.grpc_addr().to_string(),
            tls,
            data_listen: "127.0.0.1:0".parse().unwrap(),
            advertise_addr: None,
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            models: vec![self.model.clone()],
            threads: 1,
            engine: shoal_engine::EngineConfig::default(),
            default_max_tokens: 16,
            memory_budget: None,
            checkpoint_store: None,
            benchmark: false,
            model_keys: None,
        }
    }

    /// Starts an agent with material issued straight from the CA (as `shoal up` does).
    pub async fn issued_agent(&mut self, name: &str) -> usize {
        let tls = TlsMode::Mtls(material(&self.ca, Role::Agent, name));
        let cancel = CancellationToken::new();
        let agent = within(
            "starting an agent",
            Agent::start(self.agent_config(name, tls), cancel.clone()),
        )
        .await
        .unwrap();
        self.agents.push((agent, cancel));
        self.agents.len() - 1
    }

    /// Starts an enrolled agent that renews `material` (saved in `save_to`).
    pub async fn renewing_agent(
        &mut self,
        name: &str,
        material: TlsMaterial,
        save_to: Option<PathBuf>,
    ) -> (usize, RenewableIdentity) {
        let identity = RenewableIdentity::new(material).unwrap();
        let renewal = Renewal {
            identity: identity.clone(),
            save_to,
            hosts: hosts(),
        };
        let cfg = self.agent_config(name, identity.mode());
        let cancel = CancellationToken::new();
        let agent = within(
            "starting an enrolled agent",
            Agent::start_renewing(cfg, renewal, cancel.clone()),
        )
        .await
        .unwrap();
        self.agents.push((agent, cancel));
        (self.agents.len() - 1, identity)
    }

    pub async fn wait_view(&self, what: &str, cond: impl Fn(&shoal_control::ClusterView) -> bool) {
        let mut views = self.coordinator.membership().subscribe_view();
        within(what, async {
            loop {
                if cond(&views.borrow_and_update()) {
                    return;
                }
                views.changed().await.unwrap();
            }
        })
        .await;
    }

    pub async fn wait_state(&self, node: &str, state: NodeState) {
        let id = NodeId::new(node);
        self.wait_view(&format!("{node} becoming {state:?}"), |v| {
            v.nodes.get(&id).is_some_and(|n| n.state == state)
        })
        .await;
    }

    pub async fn wait_ready(&self, node: &str) {
        let id = NodeId::new(node);
        self.wait_view(&format!("{node} serving the model"), |v| {
            v.nodes.get(&id).is_some_and(|n| {
                n.state == NodeState::Alive
                    && n.shards
                        .iter()
                        .any(|s| s.state == shoal_control::membership::ShardState::Ready)
            })
        })
        .await;
    }

    pub async fn chat(&self) -> u16 {
        self.chat_at(self.coordinator.http_addr(), None).await
    }

    /// A short greedy chat completion at `addr` (a gateway or an agent's HTTP endpoint),
    /// with `key` as bearer token when given; the HTTP status.
    pub async fn chat_at(&self, addr: std::net::SocketAddr, key: Option<&str>) -> u16 {
        let body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "temperature": 0,
        });
        let mut req = reqwest::Client::new()
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        within("a chat completion", req.send())
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}
