//! The coordinator process: membership and the control plane over mTLS gRPC, the Admin
//! service, and the OpenAI gateway routing requests to agents, with one `/metrics`.

use crate::admin::AdminService;
use crate::backend::{ClusterBackend, ClusterBackendConfig};
use crate::enroll::{EnrollmentOptions, EnrollmentService, Trust};
use crate::metrics::ClusterMetrics;
use shoal_api::{ApiConfig, ApiState};
use shoal_control::{CoordinatorService, MembershipHandle, ValidatedCoordinatorConfig};
use shoal_net::{AccessPolicy, AuthLayer, Revocations, TlsMode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

/// How often the coordinator's gauges are refreshed when nothing else changes.
const METRICS_REFRESH: Duration = Duration::from_millis(500);

/// Why the coordinator could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state store could not be opened.
    #[error("opening the state store: {0}")]
    Store(#[from] shoal_control::StoreError),
    /// Membership could not start.
    #[error("starting membership: {0}")]
    Membership(#[from] shoal_control::MembershipError),
    /// The transport could not be set up.
    #[error("transport: {0}")]
    Net(#[from] shoal_net::NetError),
    /// The gateway could not be set up.
    #[error("gateway: {0}")]
    Api(#[from] shoal_api::ApiError),
    /// Options that cannot work together.
    #[error("invalid coordinator options: {problem}")]
    InvalidOptions {
        /// What is wrong.
        problem: &'static str,
    },
    /// A server task failed.
    #[error("{what} failed: {detail}")]
    Task {
        /// Which server.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

/// What a coordinator needs to start.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Leases, models, pins, policy and store.
    pub config: ValidatedCoordinatorConfig,
    /// How links are secured.
    pub tls: TlsMode,
    /// Where agents and operators reach the gRPC services (port 0 picks one).
    pub grpc_listen: SocketAddr,
    /// The gateway's settings; `api.bind` is where clients reach the HTTP API.
    pub api: ApiConfig,
    /// How the gateway reaches agents.
    pub backend: ClusterBackendConfig,
}

impl CoordinatorOptions {
    /// A coordinator on loopback: gRPC and the API each on a free 127.0.0.1 port, the gateway
    /// and backend with their defaults (tests, benchmarks and embedding).
    pub fn on_loopback(config: ValidatedCoordinatorConfig, tls: TlsMode) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            config,
            tls,
            grpc_listen: any,
            api: ApiConfig {
                bind: any,
                ..ApiConfig::default()
            },
            backend: ClusterBackendConfig::default(),
        }
    }
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    enroll_addr: Option<SocketAddr>,
    trust: Arc<Trust>,
    membership: MembershipHandle,
    backend: Arc<ClusterBackend>,
    revocations: Revocations,
    cancel: CancellationToken,
    tasks: TaskTracker,
    grpc: JoinHandle<Result<(), String>>,
    http: JoinHandle<Result<(), String>>,
    actor: JoinHandle<()>,
}

impl Coordinator {
    /// Opens the store, starts membership, binds both listeners and serves until
    /// [`Coordinator::shutdown`] or `cancel`.
    pub async fn start(
        opts: CoordinatorOptions,
        cancel: CancellationToken,
    ) -> Result<Coordinator, ClusterError> {
        Self::start_with_enrollment(opts, None, cancel).await
    }

    /// Like [`Coordinator::start`]; with `enrollment`, the coordinator also signs node
    /// certificates: join tokens, the enrollment listener, renewal (see [`crate::enroll`]).
    pub async fn start_with_enrollment(
        opts: CoordinatorOptions,
        enrollment: Option<EnrollmentOptions>,
        cancel: CancellationToken,
    ) -> Result<Coordinator, ClusterError> {
        let cancel = cancel.child_token();
        let store = opts.config.open_store().await?;
        let lease = opts.config.lease;
        let (membership, actor) = shoal_control::membership::start(
            opts.config.membership(),
            store.clone(),
            cancel.clone(),
        )
        .await?;

        let grpc_listener = TcpListener::bind(opts.grpc_listen)
            .await
            .map_err(|source| ClusterError::Bind {
                addr: opts.grpc_listen,
                source,
            })?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| ClusterError::Bind {
                addr: opts.grpc_listen,
                source,
            })?;
        let revocations = Revocations::new();
        let trust = Arc::new(
            Trust::load(
                shoal_control::TrustStore::new(store),
                revocations.clone(),
                membership.clone(),
                enrollment,
            )
            .await?,
        );
        let layer = AuthLayer::new(
            &opts.tls,
            AccessPolicy::shoal_default(),
            revocations.clone(),
        )?;
        let control = crate::control::BoundCoordinator::new(
            CoordinatorService::new(membership.clone()),
            revocations.clone(),
        );
        let router = shoal_net::server_builder(&opts.tls)?
            .layer(layer)
            .add_service(control.into_server())
            .add_service(
                AdminService::new(membership.clone(), lease)
                    .with_trust(trust.clone())
                    .into_server(),
            )
            .add_service(EnrollmentService::new(trust.clone()).into_server());
        let stop = cancel.clone();
        let grpc = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                    stop.cancelled(),
                )
                .await
                .map_err(|e| e.to_string())
        });

        let (enroll, enroll_addr) =
            crate::enroll::serve_enrollment(&opts.tls, &trust, cancel.clone()).await?;

        let backend = Arc::new(ClusterBackend::new(
            membership.subscribe_view(),
            opts.tls.clone(),
            opts.backend.clone(),
        ));
        let cluster_metrics = Arc::new(ClusterMetrics::default());
        let metrics = Arc::new(shoal_api::metrics::Metrics::with_extension(|registry| {
            cluster_metrics.register(registry);
            backend.register_metrics(registry);
        }));
        let state = ApiState::try_new_with_metrics(
            opts.api.clone(),
            backend.clone(),
            cancel.clone(),
            metrics,
        )?;
        let http_listener =
            TcpListener::bind(opts.api.bind)
                .await
                .map_err(|source| ClusterError::Bind {
                    addr: opts.api.bind,
                    source,
                })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ClusterError::Bind {
                addr: opts.api.bind,
                source,
            })?;
        let http = tokio::spawn({
            let stop = cancel.clone();
            async move {
                // HTTPS when configured; writes the audit log's last entries before returning.
                shoal_api::serve_gateway(http_listener, state, stop)
                    .await
                    .map_err(|e| e.to_string())
            }
        });

        let tasks = TaskTracker::new();
        tasks.spawn(refresh_metrics(
            membership.clone(),
            cluster_metrics,
            lease,
            cancel.clone(),
        ));
        tracing::info!(%grpc_addr, %http_addr, cluster = %membership.view().cluster_id, "coordinator serving");
        if let Some(task) = enroll {
            tasks.spawn(task);
        }
        Ok(Coordinator {
            grpc_addr,
            http_addr,
            enroll_addr,
            trust,
            membership,
            backend,
            revocations,
            cancel,
            tasks,
            grpc,
            http,
            actor,
        })
    }

    /// Where agents and operators reach the gRPC services.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where clients reach the OpenAI-compatible API.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where new nodes enroll, when this coordinator signs certificates.
    pub fn enroll_addr(&self) -> Option<SocketAddr> {
        self.enroll_addr
    }

    /// Join tokens, enrollment and revocation (what the Admin service acts on).
    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// The membership handle (views, drain).
    pub fn membership(&self) -> &MembershipHandle {
        &self.membership
    }

    /// The gateway's backend.
    pub fn backend(&self) -> &Arc<ClusterBackend> {
        &self.backend
    }

    /// Run-time revocations of the gRPC listener (`shoal node revoke`).
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Waits until a server stops on its own (an error) or `cancel` fires.
    pub async fn wait(&mut self) -> Result<(), ClusterError> {
        tokio::select! {
            r = &mut self.grpc => task_result("the gRPC server", r),
            r = &mut self.http => task_result("the HTTP gateway", r),
            () = self.cancel.cancelled() => Ok(()),
        }
    }

    /// Stops accepting, lets in-flight generations end (the gateway drains them), then stops
    /// membership.
    pub async fn shutdown(self) -> Result<(), ClusterError> {
        self.cancel.cancel();
        let http = task_result("the HTTP gateway", self.http.await);
        self.backend.drain().await;
        let grpc = task_result("the gRPC server", self.grpc.await);
        self.tasks.close();
        self.tasks.wait().await;
        let _ = self.actor.await;
        http.and(grpc)
    }
}

fn task_result(
    what: &'static str,
    r: Result<Result<(), String>, tokio::task::JoinError>,
) -> Result<(), ClusterError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(detail)) => Err(ClusterError::Task { what, detail }),
        Err(e) => Err(ClusterError::Task {
            what,
            detail: e.to_string(),
        }),
    }
}

async fn refresh_metrics(
    membership: MembershipHandle,
    metrics: Arc<ClusterMetrics>,
    lease: Duration,
    cancel: CancellationToken,
) {
    let mut views = membership.subscribe_view();
    let mut tick = tokio::time::interval(METRICS_REFRESH);
    loop {
        metrics.update(&views.borrow_and_update(), lease);
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = views.changed() => if changed.is_err() { return },
        }
    }
}
