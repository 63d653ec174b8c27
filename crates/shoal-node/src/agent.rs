//! The agent: what runs on each machine of a cluster.
//!
//! [`Agent::start`] measures the machine, serves the data plane (`shoal.v1.Node` over mTLS)
//! and, when asked, an HTTP endpoint (metrics, health, the OpenAI API for the models loaded
//! here), and starts the control loop that joins the coordinator and heartbeats. Shards arrive
//! in heartbeat answers and are loaded in the background.
//!
//! Cancellation tree: the caller's token → the agent's token (also cancelled when the
//! [`Agent`] is dropped, without a `Leave`) → {the control loop, the servers' "stop accepting"
//! signal, the parent of every generation}. [`Agent::shutdown`] walks the three phases in
//! order: leave and stop accepting, drain with a deadline, cancel the rest.

use crate::capability::{HostProbe, benchmark_model, error_chain, host_capability};
use crate::config::{AgentConfig, AgentError};
use crate::control::{COORDINATOR_DEADLINE, Control, ControlState, RenewingLink};
use crate::core::NodeCore;
use crate::enroll::Renewal;
use crate::http::NodeBackend;
use crate::metrics::NodeMetrics;
use crate::service::NodeService;
use crate::shards::{BackendSettings, ShardTable};
use crate::stage::{LinkSettings, StageService};
use shoal_api::metrics::Metrics;
use shoal_api::{ApiConfig, ApiState};
use shoal_net::{
    AccessPolicy, AuthLayer, ConnectOptions, Revocations, Role, ShoalCoordinatorClient,
    coordinator_client, with_deadline,
};
use shoal_proto::v1::node_server::NodeServer;
use shoal_proto::v1::stage_server::StageServer;
use shoal_proto::v1::{Capability, LeaveRequest, Load, ShardStatus};
use shoal_types::NodeId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::server::TcpIncoming;

/// Deadline of the `Leave` call at shutdown.
const LEAVE_DEADLINE: Duration = Duration::from_secs(2);
/// How long shutdown waits for tasks after cancelling them before giving up on them.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

type ServerTask<E> = JoinHandle<Result<(), E>>;

/// A running node agent.
pub struct Agent {
    core: Arc<NodeCore>,
    data_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    coordinator: watch::Receiver<ShoalCoordinatorClient>,
    control: watch::Receiver<ControlState>,
    control_stop: CancellationToken,
    control_task: JoinHandle<()>,
    stop_accepting: CancellationToken,
    grpc: ServerTask<tonic::transport::Error>,
    http: Option<ServerTask<shoal_api::ApiError>>,
    revocations: Revocations,
    cancel: CancellationToken,
    _cancel_on_drop: DropGuard,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node_id", &self.core.node_id)
            .field("data_addr", &self.data_addr)
            .field("http_addr", &self.http_addr)
            .field("control", &*self.control.borrow())
            .finish_non_exhaustive()
    }
}

/// The machine's figures and, when asked, each model's measured speed. Blocking.
fn initial_capability(
    shards: &ShardTable,
    threads: usize,
    budget: Option<u64>,
    bench: bool,
) -> Capability {
    let mut cap = host_capability(&HostProbe::default(), threads, budget);
    if !bench {
        return cap;
    }
    for file in shards.files() {
        let started = Instant::now();
        let speed = shards
            .open(file)
            .map_err(|e| error_chain(&e))
            .and_then(|m| benchmark_model(&m, &file.id, threads).map_err(|e| error_chain(&e)));
        match speed {
            Ok(s) => {
                tracing::info!(
                    model = %file.id,
                    tokens_per_second = s.decode_tokens_per_second,
                    layer_ms = s.layer_decode_seconds * 1e3,
                    head_ms = s.head_seconds * 1e3,
                    took_ms = started.elapsed().as_millis() as u64,
                    "model benchmarked"
                );
                cap.speeds.push(s);
            }
            Err(e) => tracing::warn!(model = %file.id, error = %e, "model benchmark failed"),
        }
    }
    cap
}

/// Bytes of other nodes' checkpoints a node keeps at most: `configured`, else 512 MiB, or an
/// eighth of a smaller memory budget.
fn checkpoint_budget(configured: Option<u64>, memory_budget: Option<u64>) -> usize {
    const DEFAULT: u64 = 512 << 20;
    let bytes =
        configured.unwrap_or_else(|| memory_budget.map_or(DEFAULT, |m| (m / 8).min(DEFAULT)));
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// `host:port` for the HTTP endpoint: the advertised data-plane host with the bound HTTP port.
fn http_advertise(advertise: Option<&str>, bound: SocketAddr) -> String {
    match advertise.and_then(|a| a.rsplit_once(':')) {
        Some((host, _)) => format!("{host}:{}", bound.port()),
        None => bound.to_string(),
    }
}

impl Agent {
    /// Starts the agent: measures the machine (and benchmarks its models when configured),
    /// binds the data-plane and HTTP listeners, and starts joining the coordinator in the
    /// background (see [`Agent::control_state`]). Cancelling `cancel` stops everything
    /// without leaving the cluster.
    pub async fn start(cfg: AgentConfig, cancel: CancellationToken) -> Result<Agent, AgentError> {
        Self::start_with(cfg, None, cancel).await
    }

    /// Like [`Agent::start`], for an enrolled node: the data plane presents `renewal`'s
    /// current certificate (`cfg.tls` is ignored for it), and the control loop renews it
    /// before it expires; new connections use the new certificate, without a restart.
    pub async fn start_renewing(
        cfg: AgentConfig,
        renewal: Renewal,
        cancel: CancellationToken,
    ) -> Result<Agent, AgentError> {
        Self::start_with(cfg, Some(renewal), cancel).await
    }

    async fn start_with(
        mut cfg: AgentConfig,
        renewal: Option<Renewal>,
        cancel: CancellationToken,
    ) -> Result<Agent, AgentError> {
        if let Some(r) = &renewal {
            cfg.tls = r.identity.mode();
        }
        cfg.validate()?;
        let cancel = cancel.child_token();
        let cancel_on_drop = cancel.clone().drop_guard();
        let metrics = Arc::new(NodeMetrics::new());
        let links = LinkSettings {
            node_id: cfg.node_id.clone(),
            tls: cfg.tls.clone(),
            renewing: renewal.as_ref().map(|r| r.identity.clone()),
            metrics: metrics.links().clone(),
        };
        let shards = Arc::new(ShardTable::new(
            cfg.models.clone(),
            BackendSettings {
                threads: cfg.threads,
                engine: cfg.engine.clone(),
                default_max_tokens: cfg.default_max_tokens,
                links: links.clone(),
                model_keys: cfg.model_keys.clone(),
            },
        ));
        let capability = {
            let shards = shards.clone();
            let (threads, budget, bench) = (cfg.threads, cfg.memory_budget, cfg.benchmark);
            tokio::task::spawn_blocking(move || initial_capability(&shards, threads, budget, bench))
                .await
                .map_err(|source| AgentError::Task {
                    what: "capability",
                    source,
                })?
        };
        let core = Arc::new(NodeCore::new(
            cfg.node_id.clone(),
            shards,
            metrics.clone(),
            capability,
            cancel.child_token(),
            checkpoint_budget(cfg.checkpoint_store, cfg.memory_budget),
        ));
        let stop_accepting = cancel.child_token();

        // The data plane.
        let listener =
            TcpListener::bind(cfg.data_listen)
                .await
                .map_err(|source| AgentError::Bind {
                    what: "the data-plane gRPC listener",
                    addr: cfg.data_listen,
                    source,
                })?;
        let data_addr = listener.local_addr().map_err(|source| AgentError::Bind {
            what: "the data-plane gRPC listener",
            addr: cfg.data_listen,
            source,
        })?;
        let revocations = Revocations::new();
        let auth = AuthLayer::new(&cfg.tls, AccessPolicy::shoal_default(), revocations.clone())?;
        let service = NodeServer::new(NodeService::new(core.clone(), links.clone()));
        let stage = StageServer::new(StageService::new(core.clone(), links));
        let stop = stop_accepting.clone().cancelled_owned();
        let grpc = match &renewal {
            // tonic's TLS keeps the certificate it started with; a renewing node does the
            // handshake itself with the current one.
            Some(r) => {
                let incoming = shoal_net::tls_incoming(listener, &r.identity)?;
                let router = shoal_net::server_builder_for_incoming()
                    .layer(auth)
                    .add_service(service)
                    .add_service(stage);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
            }
            None => {
                let router = shoal_net::server_builder(&cfg.tls)?
                    .layer(auth)
                    .add_service(service)
                    .add_service(stage);
                tokio::spawn(router.serve_with_incoming_shutdown(
                    // Small frames (one token each) must not wait for delayed ACKs.
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stop,
                ))
            }
        };
        tracing::info!(node = %cfg.node_id, addr = %data_addr, "data plane listening");

        // HTTP: metrics, health and the OpenAI API.
        let (http, http_addr) = match cfg.http_listen {
            None => (None, None),
            Some(addr) => {
                let bind_err = |source| AgentError::Bind {
                    what: "the HTTP listener",
                    addr,
                    source,
                };
                let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
                let bound = listener.local_addr().map_err(bind_err)?;
                let (node_metrics, shards) = (core.metrics.clone(), core.shards.clone());
                let metrics = Arc::new(Metrics::with_extension(|registry| {
                    node_metrics.register(registry, shards);
                }));
                let api = ApiConfig {
                    bind: bound,
                    ..ApiConfig::default()
                };
                let state = ApiState::try_new_with_metrics(
                    api,
                    Arc::new(NodeBackend::new(core.clone())),
                    core.requests.clone(),
                    metrics,
                )?;
                let task = tokio::spawn(shoal_api::serve(
                    listener,
                    shoal_api::router(state),
                    stop_accepting.clone(),
                ));
                (Some(task), Some(bound))
            }
        };

        // The control plane.
        let channel = shoal_net::connect_lazy(
            &cfg.coordinator,
            &cfg.tls,
            ConnectOptions {
                expect_role: Some(Role::Coordinator),
                ..ConnectOptions::default()
            },
        )?;
        let coordinator = coordinator_client(channel.clone(), COORDINATOR_DEADLINE);
        let (clients, coordinator_rx) = watch::channel(coordinator.clone());
        let advertise = cfg
            .advertise_addr
            .clone()
            .unwrap_or_else(|| data_addr.to_string());
        if cfg.advertise_addr.is_none() && data_addr.ip().is_unspecified() {
            tracing::warn!(%data_addr, "advertising an unspecified address; set advertise_addr so peers can reach this node");
        }
        let (state_tx, control) = watch::channel(ControlState::Joining);
        let control_stop = cancel.child_token();
        let control_task = tokio::spawn(
            Control {
                core: core.clone(),
                client: coordinator.clone(),
                http_addr: http_addr
                    .map(|a| http_advertise(cfg.advertise_addr.as_deref(), a))
                    .unwrap_or_default(),
                data_addr: advertise,
                threads: cfg.threads,
                memory_budget: cfg.memory_budget,
                state: state_tx,
                revocations: revocations.clone(),
                published: Default::default(),
                renewal: renewal.map(|renewal| RenewingLink {
                    renewal,
                    coordinator: cfg.coordinator.clone(),
                    channel,
                    clients,
                    retry_at: None,
                    failing: false,
                }),
            }
            .run(control_stop.clone()),
        );

        Ok(Agent {
            core,
            data_addr,
            http_addr,
            coordinator: coordinator_rx,
            control,
            control_stop,
            control_task,
            stop_accepting,
            grpc,
            http,
            revocations,
            cancel,
            _cancel_on_drop: cancel_on_drop,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.core.node_id
    }

    /// Where the data plane listens.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// Where the HTTP endpoint listens, if it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Where the agent stands with its coordinator now.
    pub fn control_state(&self) -> ControlState {
        self.control.borrow().clone()
    }

    /// A receiver that sees every change of [`Agent::control_state`].
    pub fn watch_control(&self) -> watch::Receiver<ControlState> {
        self.control.clone()
    }

    /// The revocation set the data plane's authorization consults (shared: revoking here
    /// takes effect on the next call).
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Whether the node refuses new generations.
    pub fn is_draining(&self) -> bool {
        self.core.is_draining()
    }

    /// The node's load, as the next heartbeat reports it.
    pub fn load(&self) -> Load {
        self.core.load()
    }

    /// The node's capability, as the next heartbeat reports it.
    pub fn capability(&self) -> Capability {
        self.core.capability()
    }

    /// The state of every assigned shard.
    pub fn shards(&self) -> Vec<ShardStatus> {
        self.core.shards.statuses()
    }

    /// The agent's own metrics.
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.core.metrics
    }

    /// Stops the agent in three phases: refuses new generations, leaves the cluster and stops
    /// accepting connections; waits up to `grace` for in-flight generations to finish; then
    /// cancels the rest and unloads every shard.
    pub async fn shutdown(self, grace: Duration) -> Result<(), AgentError> {
        let Agent {
            core,
            coordinator,
            control_stop,
            control_task,
            stop_accepting,
            grpc,
            http,
            cancel,
            _cancel_on_drop,
            ..
        } = self;
        tracing::info!(node = %core.node_id, ?grace, "shutting down");
        core.set_draining(true);
        // No heartbeat may follow the Leave (it would be told to rejoin).
        control_stop.cancel();
        let control = tokio::time::timeout(CANCEL_WAIT, control_task).await;
        // The latest link: a renewal may have replaced the first one.
        let mut coordinator = coordinator.borrow().clone();
        let leave = LeaveRequest {
            node_id: core.node_id.as_str().to_owned(),
            reason: "shutdown".into(),
        };
        match coordinator
            .leave(with_deadline(leave, LEAVE_DEADLINE))
            .await
        {
            Ok(_) => tracing::info!("left the cluster"),
            Err(s) => {
                tracing::warn!(code = ?s.code(), message = s.message(), "leaving the cluster failed; the coordinator will notice the lease run out")
            }
        }
        stop_accepting.cancel();

        let aborts: Vec<_> = std::iter::once(grpc.abort_handle())
            .chain(http.as_ref().map(JoinHandle::abort_handle))
            .collect();
        let mut servers = Box::pin(async move {
            let g = grpc.await;
            let h = match http {
                Some(h) => Some(h.await),
                None => None,
            };
            (g, h)
        });
        let finished = match tokio::time::timeout(grace, &mut servers).await {
            Ok(r) => Some(r),
            Err(_) => {
                tracing::warn!("drain deadline passed; cancelling the remaining generations");
                core.requests.cancel();
                tokio::time::timeout(CANCEL_WAIT, &mut servers).await.ok()
            }
        };
        cancel.cancel();
        if finished.is_none() {
            tracing::error!("servers did not stop after cancellation; aborting them");
            for a in aborts {
                a.abort();
            }
        }
        if tokio::time::timeout(CANCEL_WAIT, core.shards.shutdown())
            .await
            .is_err()
        {
            tracing::error!("shards did not unload in time");
        }
        if let Err(source) = control {
            tracing::error!(error = %source, "the control loop did not stop in time");
        } else if let Ok(Err(source)) = control {
            return Err(AgentError::Task {
                what: "control",
                source,
            });
        }
        match finished {
            Some((Err(source), _)) => Err(AgentError::Task {
                what: "gRPC server",
                source,
            }),
            Some((Ok(Err(e)), _)) => Err(AgentError::Grpc(e)),
            Some((_, Some(Err(source)))) => Err(AgentError::Task {
                what: "HTTP server",
                source,
            }),
            Some((_, Some(Ok(Err(e))))) => Err(AgentError::Http(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_address_takes_the_advertised_host() {
        let bound: SocketAddr = "0.0.0.0:8081".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(
            http_advertise(Some("pi-1.lan:7070"), bound),
            "pi-1.lan:8081"
        );
        assert_eq!(http_advertise(None, bound), "0.0.0.0:8081");
    }
}
