//! The `shoal.v1.Coordinator` service as the coordinator process serves it: shoal-control's
//! service, plus two things only the transport knows about.
//!
//! - A node acts only as itself: the node id in `Join`, `Heartbeat` and `Leave` must be the one
//!   its certificate names, so a node cannot keep another alive, make it leave, or take its
//!   place (over plaintext there is no identity and nothing to compare).
//! - Heartbeat answers carry the complete revocation list, so agents refuse revoked peers on
//!   their own links too.

use shoal_control::CoordinatorService;
use shoal_net::{Revocations, peer_identity};
use shoal_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use shoal_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse,
};
use shoal_types::ErrorClass;
use tonic::{Request, Response, Status};

/// The control-plane service bound to caller identities.
#[derive(Debug, Clone)]
pub(crate) struct BoundCoordinator {
    inner: CoordinatorService,
    revocations: Revocations,
}

impl BoundCoordinator {
    pub(crate) fn new(inner: CoordinatorService, revocations: Revocations) -> Self {
        Self { inner, revocations }
    }

    pub(crate) fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
    }
}

/// Refuses a call whose message names another node than the caller's certificate.
fn check_caller<T>(req: &Request<T>, claimed: &str) -> Result<(), Status> {
    match peer_identity(req) {
        Some(id) if id.node_id != claimed => {
            tracing::warn!(peer = %id, claimed, "refused a call made for another node");
            Err(shoal_net::status(
                ErrorClass::PermissionDenied,
                "node_id_mismatch",
                format!(
                    "this certificate names node {}, not {claimed:?}",
                    id.node_id
                ),
            ))
        }
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl Coordinator for BoundCoordinator {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        check_caller(&request, &request.get_ref().node_id)?;
        self.inner.join(request).await
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        check_caller(&request, &request.get_ref().node_id)?;
        let mut response = self.inner.heartbeat(request).await?;
        let r = response.get_mut();
        r.revoked_nodes = self.revocations.revoked_nodes();
        r.revoked_serials = self.revocations.revoked_serials();
        Ok(response)
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        check_caller(&request, &request.get_ref().node_id)?;
        self.inner.leave(request).await
    }
}
