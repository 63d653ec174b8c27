//! The `shoal.v1.Admin` service: the cluster as operators see it (`shoal status`), drain,
//! join tokens (`shoal token create`) and revocation (`shoal node revoke`).

use crate::enroll::Trust;
use shoal_control::membership::{NodeCapability, NodeLoad, ShardState};
use shoal_control::{ClusterView, MembershipHandle, NodeView};
use shoal_proto::v1::admin_server::{Admin, AdminServer};
use shoal_proto::v1::{
    self, ClusterStatusRequest, ClusterStatusResponse, CreateJoinTokenRequest,
    CreateJoinTokenResponse, DrainRequest, DrainResponse, RevokeNodeRequest, RevokeNodeResponse,
};
use shoal_types::{ErrorClass, NodeId};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

/// Operator access to the coordinator.
#[derive(Debug, Clone)]
pub struct AdminService {
    membership: MembershipHandle,
    lease: Duration,
    trust: Option<Arc<Trust>>,
}

impl AdminService {
    /// A service over `membership`, whose nodes hold leases of `lease`.
    pub fn new(membership: MembershipHandle, lease: Duration) -> Self {
        Self {
            membership,
            lease,
            trust: None,
        }
    }

    /// Join tokens and revocation act on `trust` (without it they are refused).
    pub fn with_trust(mut self, trust: Arc<Trust>) -> Self {
        self.trust = Some(trust);
        self
    }

    fn trust(&self) -> Result<&Trust, Status> {
        self.trust.as_deref().ok_or_else(|| {
            shoal_net::status(
                ErrorClass::InvalidRequest,
                "enrollment_disabled",
                "this coordinator keeps no trust state",
            )
        })
    }

    /// Wrapped for a tonic server.
    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }
}

/// How long ago a node last renewed its lease, derived from when the lease runs out.
pub(crate) fn heartbeat_age(node: &NodeView, lease: Duration, now: Instant) -> Option<Duration> {
    node.last_sequence?;
    let remaining = node.lease_deadline.saturating_duration_since(now);
    Some(lease.saturating_sub(remaining))
}

pub(crate) fn capability(c: &NodeCapability) -> v1::Capability {
    v1::Capability {
        cores: c.cores,
        memory_total_bytes: c.memory_total_bytes,
        memory_available_bytes: c.memory_available_bytes,
        cpu_features: c.cpu_features.clone(),
        speeds: c
            .speeds
            .iter()
            .map(|s| v1::ModelSpeed {
                model_id: s.model.to_string(),
                layer_decode_seconds: s.layer_decode_seconds,
                head_seconds: s.head_seconds,
                decode_tokens_per_second: s.decode_tokens_per_second,
                layer_bytes: s.layer_bytes,
            })
            .collect(),
        battery_percent: c.battery_percent,
        temperature_celsius: c.temperature_celsius,
        threads: c.threads,
    }
}

fn load(l: &NodeLoad) -> v1::Load {
    v1::Load {
        queue_depth: l.queue_depth,
        active_sequences: l.active_sequences,
        kv_bytes: l.kv_bytes,
        tokens_per_second: l.tokens_per_second,
        tokens_generated_total: l.tokens_generated_total,
    }
}

fn range(r: shoal_types::LayerRange) -> v1::LayerRange {
    v1::LayerRange {
        start: r.start(),
        end: r.end(),
    }
}

/// The whole cluster as the Admin service reports it.
pub fn cluster_status(view: &ClusterView, lease: Duration) -> ClusterStatusResponse {
    let now = Instant::now();
    let nodes = view
        .nodes
        .values()
        .map(|n| v1::NodeStatus {
            node_id: n.id.to_string(),
            state: format!("{:?}", n.state).to_lowercase(),
            data_addr: n.data_addr.clone(),
            http_addr: n.http_addr.clone().unwrap_or_default(),
            capability: Some(capability(&n.capability)),
            load: Some(load(&n.load)),
            shards: n
                .shards
                .iter()
                .map(|s| v1::ShardStatus {
                    assignment: Some(v1::ShardAssignment {
                        model_id: s.model.to_string(),
                        model_sha256: s.sha256.clone(),
                        layers: Some(range(s.layers)),
                        plan_epoch: s.plan_epoch,
                    }),
                    state: match s.state {
                        ShardState::Loading => v1::ShardState::Loading,
                        ShardState::Ready => v1::ShardState::Ready,
                        ShardState::Failed => v1::ShardState::Failed,
                    } as i32,
                    detail: s.detail.clone(),
                })
                .collect(),
            lease_remaining_ms: if n.state.is_live() {
                n.lease_deadline.saturating_duration_since(now).as_millis() as u64
            } else {
                0
            },
            heartbeat_age_ms: heartbeat_age(n, lease, now).map(|d| d.as_millis() as u64),
        })
        .collect();
    let models = view
        .models
        .values()
        .map(|m| v1::ModelStatus {
            model_id: m.id.to_string(),
            sha256: m.sha256.clone(),
            n_layers: m.n_layers,
            file_bytes: m.file_bytes,
            context_length: m.context_length,
            shards: view
                .plan
                .for_model(&m.id)
                .map(|a| v1::PlacedShard {
                    node_id: a.node.to_string(),
                    layers: Some(range(a.layers)),
                    ready: view
                        .nodes
                        .get(&a.node)
                        .is_some_and(|n| n.is_ready(&m.id, a.layers)),
                })
                .collect(),
        })
        .collect();
    ClusterStatusResponse {
        cluster_id: view.cluster_id.clone(),
        plan_epoch: view.plan.epoch,
        nodes,
        models,
        placement: view.placement.explain(),
    }
}

fn node_id(raw: &str) -> Result<NodeId, Status> {
    shoal_control::check_node_id(raw).map_err(|why| {
        shoal_net::status(
            ErrorClass::InvalidRequest,
            "invalid_node_id",
            format!("invalid node id {raw:?}: {why}"),
        )
    })?;
    Ok(NodeId::new(raw))
}

fn membership_status(e: &shoal_control::MembershipError) -> Status {
    shoal_net::status(e.class(), e.reason(), e.to_string())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let view = self.membership.view();
        Ok(Response::new(cluster_status(&view, self.lease)))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        let node = node_id(&req.into_inner().node_id)?;
        tracing::info!(%node, "drain requested by an operator");
        self.membership
            .drain(node)
            .await
            .map_err(|e| membership_status(&e))?;
        Ok(Response::new(DrainResponse {}))
    }

    async fn undrain(&self, req: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        let node = node_id(&req.into_inner().node_id)?;
        tracing::info!(%node, "undrain requested by an operator");
        self.membership
            .undrain(node)
            .await
            .map_err(|e| membership_status(&e))?;
        Ok(Response::new(DrainResponse {}))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let msg = req.into_inner();
        let ttl = (msg.ttl_ms > 0).then(|| Duration::from_millis(msg.ttl_ms));
        let (token, expires) = self.trust()?.create_token(ttl, &msg.role).await?;
        Ok(Response::new(CreateJoinTokenResponse {
            token_id: token.id.clone(),
            token: token.to_string(),
            expires_at_unix_ms: shoal_control::trust::unix_ms(expires),
        }))
    }

    async fn revoke_node(
        &self,
        req: Request<RevokeNodeRequest>,
    ) -> Result<Response<RevokeNodeResponse>, Status> {
        let node = req.into_inner().node_id;
        tracing::warn!(%node, "revocation requested by an operator");
        let (newly_revoked, revoked_serials) = self.trust()?.revoke_node(&node).await?;
        Ok(Response::new(RevokeNodeResponse {
            newly_revoked,
            revoked_serials,
        }))
    }
}
