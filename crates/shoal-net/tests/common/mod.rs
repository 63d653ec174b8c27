//! Shared fixtures for the transport tests: a cluster PKI, test doubles of the `Node` and
//! `Coordinator` services that record who called them, and servers on `127.0.0.1:0`.

#![allow(dead_code)] // each test binary uses a different subset

use shoal_net::{
    AccessPolicy, AuthLayer, ClusterCa, PeerIdentity, Revocations, Role, TlsMaterial, TlsMode,
    peer_identity, server_builder,
};
use shoal_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use shoal_proto::v1::node_server::{Node, NodeServer};
use shoal_proto::v1::{
    GenerateEvent, GenerateRequest, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse,
    LeaveRequest, LeaveResponse, StatusRequest, StatusResponse,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Bound on any single step of a test.
pub const STEP: Duration = Duration::from_secs(15);
/// The cluster every fixture belongs to.
pub const CLUSTER: &str = "test-cluster";

/// Awaits `fut`, failing the test with `what` if it hangs.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("hung for {STEP:?}: {what}"),
    }
}

/// Logs to the test output (once per process).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("shoal_net=debug,warn")
        .try_init();
}

/// Material for `role`/`node` signed by `ca`, with server names for local tests.
pub fn material(ca: &ClusterCa, role: Role, node: &str) -> TlsMaterial {
    let id = PeerIdentity::new(ca.cluster_id(), role, node).unwrap();
    let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    ca.issue(&id, &hosts, Duration::from_secs(3600))
        .unwrap()
        .into_material(ca.cert_pem())
}

/// What the test doubles saw.
#[derive(Clone, Default)]
pub struct Calls {
    count: Arc<AtomicUsize>,
    callers: Arc<Mutex<Vec<Option<PeerIdentity>>>>,
    /// When set, `Status` never answers (to exercise deadlines).
    pub hang: Arc<AtomicBool>,
}

impl Calls {
    fn record<T>(&self, req: &Request<T>) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.callers
            .lock()
            .unwrap()
            .push(peer_identity(req).cloned());
    }

    /// How many calls reached a handler.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The identity the authorization layer attached to the last call.
    pub fn last_caller(&self) -> Option<PeerIdentity> {
        self.callers.lock().unwrap().last().cloned().flatten()
    }
}

/// A `Node` service that answers `Status` with its name.
#[derive(Clone, Default)]
pub struct TestNode {
    pub calls: Calls,
}

#[tonic::async_trait]
impl Node for TestNode {
    type GenerateStream = futures::stream::Empty<Result<GenerateEvent, Status>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.calls.record(&request);
        Err(Status::unimplemented("the test node does not generate"))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.calls.record(&request);
        if self.calls.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(Response::new(StatusResponse {
            node_id: "test-node".to_owned(),
            models: vec!["tiny".to_owned()],
            ..Default::default()
        }))
    }

    async fn push_checkpoint(
        &self,
        request: Request<tonic::Streaming<shoal_proto::v1::KvChunk>>,
    ) -> Result<Response<shoal_proto::v1::PushCheckpointReply>, Status> {
        self.calls.record(&request);
        Err(Status::unimplemented("the test node keeps no checkpoints"))
    }

    type FetchCheckpointStream = futures::stream::Empty<Result<shoal_proto::v1::KvChunk, Status>>;

    async fn fetch_checkpoint(
        &self,
        request: Request<shoal_proto::v1::FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        self.calls.record(&request);
        Err(Status::unimplemented("the test node keeps no checkpoints"))
    }

    async fn drop_checkpoint(
        &self,
        request: Request<shoal_proto::v1::DropCheckpointRequest>,
    ) -> Result<Response<shoal_proto::v1::DropCheckpointReply>, Status> {
        self.calls.record(&request);
        Err(Status::unimplemented("the test node keeps no checkpoints"))
    }

    async fn retarget_checkpoint(
        &self,
        request: Request<shoal_proto::v1::RetargetCheckpointRequest>,
    ) -> Result<Response<shoal_proto::v1::RetargetCheckpointReply>, Status> {
        self.calls.record(&request);
        Err(Status::unimplemented("the test node keeps no checkpoints"))
    }
}

/// A `Coordinator` service that accepts everyone it is asked about.
#[derive(Clone, Default)]
pub struct TestCoordinator {
    pub calls: Calls,
}

#[tonic::async_trait]
impl Coordinator for TestCoordinator {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.calls.record(&request);
        Ok(Response::new(JoinResponse {
            cluster_id: CLUSTER.to_owned(),
            lease_ms: 3000,
            heartbeat_interval_ms: 1000,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.calls.record(&request);
        Ok(Response::new(HeartbeatResponse::default()))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        self.calls.record(&request);
        Ok(Response::new(LeaveResponse {}))
    }
}

/// A server running on `127.0.0.1:0` until dropped.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Running {
    /// A server at `addr` that stops when `shutdown` fires (on drop).
    pub fn new(addr: SocketAddr, shutdown: oneshot::Sender<()>) -> Self {
        Running {
            addr,
            shutdown: Some(shutdown),
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Which service a test server hosts.
pub enum Service {
    Node(TestNode),
    Coordinator(TestCoordinator),
}

/// Starts a server for `service` in `mode` behind the authorization layer.
pub async fn spawn_server(
    mode: &TlsMode,
    policy: AccessPolicy,
    revocations: Revocations,
    service: Service,
) -> Running {
    let listener = within("binding 127.0.0.1:0", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = TcpIncoming::from(listener);
    let layer = AuthLayer::new(mode, policy, revocations).unwrap();
    let mut server = server_builder(mode).unwrap().layer(layer);
    let router = match service {
        Service::Node(n) => server.add_service(NodeServer::new(n)),
        Service::Coordinator(c) => server.add_service(CoordinatorServer::new(c)),
    };
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let stop = async {
            let _ = rx.await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = ?e, "test server failed");
        }
    });
    Running {
        addr,
        shutdown: Some(tx),
    }
}
