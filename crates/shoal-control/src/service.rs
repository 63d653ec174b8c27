//! The `shoal.v1.Coordinator` gRPC service: checks each call's protocol version and message,
//! hands it to membership, and renders the answer or the error (gRPC code plus the
//! `shoal-error-class` and `shoal-error-reason` headers). Serving it over mTLS is shoal-net's job.

use crate::membership::{HeartbeatReply, MembershipError, MembershipHandle};
use crate::wire::{self, WireError};
use shoal_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use shoal_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse,
};
use shoal_proto::{ERROR_CLASS_HEADER, ERROR_REASON_HEADER, PROTOCOL_VERSION, VERSION_HEADER};
use shoal_types::{ErrorClass, NodeId};
use std::time::Duration;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

/// The coordinator's control-plane service.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    membership: MembershipHandle,
}

impl CoordinatorService {
    /// A service answering from `membership`.
    pub fn new(membership: MembershipHandle) -> Self {
        Self { membership }
    }

    /// Wrapped for a tonic server.
    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
    }
}

/// An error status with the class and reason headers; `message` must be safe for the peer.
fn status(code: Code, class: ErrorClass, reason: &'static str, message: String) -> Status {
    let mut md = MetadataMap::new();
    md.insert(
        ERROR_CLASS_HEADER,
        MetadataValue::from_static(class.as_str()),
    );
    md.insert(ERROR_REASON_HEADER, MetadataValue::from_static(reason));
    Status::with_metadata(code, message, md)
}

fn wire_status(e: WireError) -> Status {
    status(
        Code::InvalidArgument,
        ErrorClass::InvalidRequest,
        e.reason(),
        e.to_string(),
    )
}

fn membership_status(e: MembershipError) -> Status {
    let class = e.class();
    let code = match &e {
        // The protocol's documented answer to a peer of another major version.
        MembershipError::VersionMismatch { .. } => Code::FailedPrecondition,
        MembershipError::DuplicateNode { .. } => Code::AlreadyExists,
        _ => shoal_proto::code_for_class(class),
    };
    let message = match &e {
        MembershipError::Store(source) => {
            // Operator detail stays in the log.
            tracing::error!(error = %source, "membership store failure");
            "the coordinator could not record the change".to_owned()
        }
        other => other.to_string(),
    };
    status(code, class, e.reason(), message)
}

/// Refuses a call whose version header names another major version. A call without the
/// header is accepted: the join message carries the version too, and in-process callers
/// (tests, an embedded coordinator) have no metadata to set.
fn check_version<T>(req: &Request<T>) -> Result<(), Status> {
    let Some(v) = req.metadata().get(VERSION_HEADER) else {
        return Ok(());
    };
    match v.to_str().ok().and_then(|s| s.trim().parse::<u32>().ok()) {
        Some(PROTOCOL_VERSION) => Ok(()),
        theirs => Err(membership_status_version(theirs)),
    }
}

fn membership_status_version(theirs: Option<u32>) -> Status {
    match theirs {
        Some(theirs) => membership_status(MembershipError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        }),
        None => status(
            Code::FailedPrecondition,
            ErrorClass::InvalidRequest,
            "protocol_version_mismatch",
            format!("unreadable {VERSION_HEADER} header"),
        ),
    }
}

fn millis(d: Duration) -> u32 {
    // Validated configs keep durations within u32 milliseconds; saturate rather than wrap.
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        check_version(&request)?;
        let msg = request.into_inner();
        let span = tracing::info_span!("coordinator.join", node = %msg.node_id);
        async move {
            let info = wire::join(msg).map_err(wire_status)?;
            let accepted = self
                .membership
                .join(info)
                .await
                .map_err(membership_status)?;
            Ok(Response::new(JoinResponse {
                cluster_id: accepted.cluster_id,
                lease_ms: millis(accepted.lease),
                heartbeat_interval_ms: millis(accepted.heartbeat_interval),
            }))
        }
        .instrument(span)
        .await
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        check_version(&request)?;
        let msg = request.into_inner();
        let span = tracing::debug_span!("coordinator.heartbeat", node = %msg.node_id, sequence = msg.sequence);
        async move {
            let info = wire::heartbeat(msg).map_err(wire_status)?;
            let reply = self
                .membership
                .heartbeat(info)
                .await
                .map_err(membership_status)?;
            let response = match reply {
                HeartbeatReply::Rejoin => HeartbeatResponse {
                    rejoin: true,
                    ..Default::default()
                },
                HeartbeatReply::Serve {
                    lease,
                    plan_epoch,
                    assignments,
                    drain,
                } => {
                    let catalogue = &self.membership.view().models;
                    HeartbeatResponse {
                        lease_ms: millis(lease),
                        assignments: assignments
                            .iter()
                            .map(|a| wire::assignment(a, plan_epoch, catalogue))
                            .collect(),
                        drain,
                        rejoin: false,
                    }
                }
            };
            Ok(Response::new(response))
        }
        .instrument(span)
        .await
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        check_version(&request)?;
        let msg = request.into_inner();
        let span = tracing::info_span!("coordinator.leave", node = %msg.node_id);
        async move {
            crate::check_node_id(&msg.node_id)
                .map_err(|problem| wire_status(WireError::NodeId { id: msg.node_id.chars().take(80).collect(), problem }))?;
            tracing::info!(reason = %msg.reason.chars().take(200).collect::<String>(), "node leaving");
            self.membership.leave(NodeId::new(msg.node_id)).await.map_err(membership_status)?;
            Ok(Response::new(LeaveResponse {}))
        }
        .instrument(span)
        .await
    }
}
