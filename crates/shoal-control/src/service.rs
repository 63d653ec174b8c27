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
                        // Revocations are the transport's business (shoal-cluster adds them).
                        ..Default::default()
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::membership::{self, MembershipConfig};
    use crate::placement::{ModelSpec, PlacementPolicy};
    use crate::store::MemoryStore;
    use shoal_proto::v1;
    use shoal_types::ModelId;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    const GB: u64 = 1 << 30;
    const SHA: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    async fn service() -> (CoordinatorService, MembershipHandle, CancellationToken) {
        let config = MembershipConfig {
            models: vec![ModelSpec {
                id: ModelId::new("smollm2"),
                sha256: SHA.into(),
                file_bytes: GB,
                n_layers: 30,
                layer_bytes: GB / 40,
                kv_bytes_per_token: 1024,
                context_length: 2048,
            }],
            policy: PlacementPolicy {
                replicas: None,
                kv_reserve_tokens: 1024,
                ..Default::default()
            },
            ..Default::default()
        };
        let cancel = CancellationToken::new();
        let (handle, _task) =
            membership::start(config, Arc::new(MemoryStore::new()), cancel.clone())
                .await
                .unwrap();
        (CoordinatorService::new(handle.clone()), handle, cancel)
    }

    fn join_req(id: &str, addr: &str) -> v1::JoinRequest {
        v1::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            node_id: id.into(),
            data_addr: addr.into(),
            capability: Some(v1::Capability {
                cores: 4,
                memory_available_bytes: 4 * GB,
                ..Default::default()
            }),
            models: vec![],
            http_addr: String::new(),
        }
    }

    fn hb_req(id: &str, sequence: u64) -> v1::HeartbeatRequest {
        v1::HeartbeatRequest {
            node_id: id.into(),
            sequence,
            ..Default::default()
        }
    }

    fn headers(s: &Status) -> (String, String) {
        let get = |h| {
            s.metadata()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        (get(ERROR_CLASS_HEADER), get(ERROR_REASON_HEADER))
    }

    #[tokio::test(start_paused = true)]
    async fn join_heartbeat_and_leave_through_the_service() {
        let (svc, handle, cancel) = service().await;
        let joined = svc
            .join(Request::new(join_req("pi-1", "10.0.0.1:7070")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(joined.lease_ms, 2000);
        assert_eq!(joined.heartbeat_interval_ms, 500);
        assert_eq!(joined.cluster_id, handle.view().cluster_id);

        let hb = svc
            .heartbeat(Request::new(hb_req("pi-1", 1)))
            .await
            .unwrap()
            .into_inner();
        assert!(!hb.rejoin && !hb.drain);
        assert_eq!(hb.lease_ms, 2000);
        assert_eq!(
            hb.assignments,
            [v1::ShardAssignment {
                model_id: "smollm2".into(),
                model_sha256: SHA.into(),
                layers: Some(v1::LayerRange { start: 0, end: 30 }),
                plan_epoch: handle.view().plan.epoch,
            }]
        );

        handle.drain(NodeId::new("pi-1")).await.unwrap();
        let hb = svc
            .heartbeat(Request::new(hb_req("pi-1", 2)))
            .await
            .unwrap()
            .into_inner();
        assert!(hb.drain);
        assert!(
            hb.assignments.is_empty(),
            "idle while draining: nothing kept"
        );

        svc.leave(Request::new(v1::LeaveRequest {
            node_id: "pi-1".into(),
            reason: "shutdown".into(),
        }))
        .await
        .unwrap();
        let hb = svc
            .heartbeat(Request::new(hb_req("pi-1", 3)))
            .await
            .unwrap()
            .into_inner();
        assert!(hb.rejoin);
        assert!(hb.assignments.is_empty());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_whose_lease_ran_out_is_told_to_rejoin() {
        let (svc, _handle, cancel) = service().await;
        svc.join(Request::new(join_req("pi-1", "10.0.0.1:7070")))
            .await
            .unwrap();
        svc.heartbeat(Request::new(hb_req("pi-1", 1)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3100)).await;
        let hb = svc
            .heartbeat(Request::new(hb_req("pi-1", 2)))
            .await
            .unwrap()
            .into_inner();
        assert!(hb.rejoin);
        // Joining again restores service.
        svc.join(Request::new(join_req("pi-1", "10.0.0.1:7070")))
            .await
            .unwrap();
        let hb = svc
            .heartbeat(Request::new(hb_req("pi-1", 1)))
            .await
            .unwrap()
            .into_inner();
        assert!(!hb.rejoin);
        assert_eq!(hb.assignments.len(), 1);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn another_protocol_version_is_a_failed_precondition() {
        let (svc, _handle, cancel) = service().await;
        let req = v1::JoinRequest {
            protocol_version: PROTOCOL_VERSION + 1,
            ..join_req("pi-1", "a:1")
        };
        let err = svc.join(Request::new(req)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(
            headers(&err),
            ("invalid_request".into(), "protocol_version_mismatch".into())
        );

        // The header is checked on every call, before the message is looked at.
        let mut req = Request::new(hb_req("pi-1", 1));
        req.metadata_mut()
            .insert(VERSION_HEADER, MetadataValue::from_static("7"));
        assert_eq!(
            svc.heartbeat(req).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        let mut req = Request::new(hb_req("pi-1", 1));
        req.metadata_mut()
            .insert(VERSION_HEADER, MetadataValue::from_static("one"));
        assert_eq!(
            svc.heartbeat(req).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        let mut req = Request::new(join_req("pi-1", "a:1"));
        req.metadata_mut()
            .insert(VERSION_HEADER, MetadataValue::from_static("1"));
        assert!(svc.join(req).await.is_ok());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn bad_messages_and_duplicate_ids_are_refused_with_their_class() {
        let (svc, _handle, cancel) = service().await;
        let err = svc
            .join(Request::new(join_req("no spaces", "a:1")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            headers(&err),
            ("invalid_request".into(), "invalid_node_id".into())
        );

        let err = svc
            .heartbeat(Request::new(hb_req("", 1)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        let err = svc
            .leave(Request::new(v1::LeaveRequest {
                node_id: "../etc".into(),
                reason: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        svc.join(Request::new(join_req("pi-1", "10.0.0.1:7070")))
            .await
            .unwrap();
        let err = svc
            .join(Request::new(join_req("pi-1", "10.0.0.9:7070")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists);
        assert_eq!(
            headers(&err),
            ("invalid_request".into(), "duplicate_node_id".into())
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_membership_is_unavailable() {
        let (svc, _handle, cancel) = service().await;
        // Whether the actor has exited yet or not, a cancelled actor answers nothing.
        cancel.cancel();
        let err = svc
            .join(Request::new(join_req("pi-1", "a:1")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(
            headers(&err),
            ("unavailable".into(), "shutting_down".into())
        );
    }
}
