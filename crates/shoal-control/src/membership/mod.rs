//! Membership: who is in the cluster, whether they are alive, and what each must serve.
//!
//! One actor task owns the node table and the current plan; everything else talks to it
//! through a [`MembershipHandle`] over a bounded channel and gets answers over `oneshot`s. The
//! actor renews a lease on every heartbeat and declares a node [`NodeState::Dead`] when its lease
//! runs out (a `tokio::time` deadline, so tests drive it with paused time). Whenever the set of
//! usable nodes changes it re-runs the pure planner, persists the result, and publishes a fresh
//! [`ClusterView`] on a watch channel plus a [`MembershipEvent`] on a broadcast channel.

mod actor;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests;

use crate::placement::{Assignment, ModelSpec, Placement, PlacementPolicy, Plan};
use crate::store::{StateStore, StoreError};
use serde::{Deserialize, Serialize};
use shoal_types::{ErrorClass, LayerRange, ModelId, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Commands waiting for the actor; senders wait (back-pressure) when it is full.
const COMMAND_QUEUE: usize = 256;
/// Events a slow subscriber may fall behind by before it starts missing some.
const EVENT_BUFFER: usize = 256;

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Joined, first heartbeat not yet seen.
    Joining,
    /// Heartbeating and serving.
    Alive,
    /// Heartbeating, finishing its in-flight work, taking nothing new.
    Draining,
    /// Its lease ran out; it must join again.
    Dead,
    /// It left on purpose.
    Left,
}

impl NodeState {
    /// Whether the node holds a lease (it is expected to heartbeat).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            NodeState::Joining | NodeState::Alive | NodeState::Draining
        )
    }
}

/// One model's measured speed on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpeed {
    /// The model.
    pub model: ModelId,
    /// Seconds one decode step of one layer takes (batch 1).
    pub layer_decode_seconds: f64,
    /// Seconds the output head takes per token.
    pub head_seconds: f64,
    /// Whole-model decode tokens per second.
    pub decode_tokens_per_second: f64,
    /// Weight bytes per layer.
    pub layer_bytes: u64,
}

/// What a node can do, as it reported it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeCapability {
    /// CPU cores.
    pub cores: u32,
    /// Compute threads.
    pub threads: u32,
    /// Physical memory.
    pub memory_total_bytes: u64,
    /// Memory free for shards when measured.
    pub memory_available_bytes: u64,
    /// CPU features ("avx2", "neon"...).
    pub cpu_features: Vec<String>,
    /// Measured speeds per model.
    pub speeds: Vec<ModelSpeed>,
    /// Battery charge in percent, if any.
    pub battery_percent: Option<f32>,
    /// Hottest thermal zone in °C, if known.
    pub temperature_celsius: Option<f32>,
}

impl NodeCapability {
    /// Measured decode tokens/s for `model`, if reported and usable.
    pub fn tokens_per_second(&self, model: &ModelId) -> Option<f64> {
        self.speeds
            .iter()
            .find(|s| &s.model == model)
            .map(|s| s.decode_tokens_per_second)
            .filter(|t| t.is_finite() && *t > 0.0)
    }

    /// Whether the parts that describe the machine (not its momentary state) differ: only those
    /// are worth a durable write.
    pub(crate) fn differs_durably(&self, other: &Self) -> bool {
        self.cores != other.cores
            || self.threads != other.threads
            || self.memory_total_bytes != other.memory_total_bytes
            || self.cpu_features != other.cpu_features
            || self.speeds != other.speeds
    }
}

/// Live load of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Requests waiting.
    pub queue_depth: u32,
    /// Sequences generating.
    pub active_sequences: u32,
    /// KV-cache bytes in use.
    pub kv_bytes: u64,
    /// Recent throughput.
    pub tokens_per_second: f64,
    /// Tokens generated since start.
    pub tokens_generated_total: u64,
}

impl NodeLoad {
    /// Requests the node holds (queued or running).
    pub fn in_flight(&self) -> u64 {
        u64::from(self.queue_depth) + u64::from(self.active_sequences)
    }
}

/// State of one shard on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    /// Being loaded.
    Loading,
    /// Serving.
    Ready,
    /// Failed to load or crashed.
    Failed,
}

/// A shard a node reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReport {
    /// The model.
    pub model: ModelId,
    /// sha256 of the file the shard came from.
    pub sha256: String,
    /// Its layers.
    pub layers: LayerRange,
    /// The plan epoch the node loaded it for.
    pub plan_epoch: u64,
    /// Its state.
    pub state: ShardState,
    /// Why it failed, when it did.
    pub detail: String,
}

/// A model file on a node's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalModel {
    /// The model.
    pub model: ModelId,
    /// sha256 of the file.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
}

/// A validated join request.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinInfo {
    /// Protocol major version the node speaks.
    pub protocol_version: u32,
    /// The node.
    pub node: NodeId,
    /// Its data-plane address (host:port).
    pub data_addr: String,
    /// Its HTTP address, if any.
    pub http_addr: Option<String>,
    /// What it can do.
    pub capability: NodeCapability,
    /// Model files on its disk.
    pub local_models: Vec<LocalModel>,
}

/// A successful join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAccepted {
    /// The cluster's id.
    pub cluster_id: String,
    /// Lease after each heartbeat.
    pub lease: Duration,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
}

/// A validated heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatInfo {
    /// The node.
    pub node: NodeId,
    /// Increases by one per heartbeat.
    pub sequence: u64,
    /// Its load.
    pub load: NodeLoad,
    /// Its capability, when it sent one.
    pub capability: Option<NodeCapability>,
    /// Its shards.
    pub shards: Vec<ShardReport>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatReply {
    /// The coordinator does not know the node (never joined, dead, or left): join again.
    Rejoin,
    /// Lease renewed (unless the heartbeat was stale); the complete set of shards to serve.
    Serve {
        /// Lease from now.
        lease: Duration,
        /// Plan epoch.
        plan_epoch: u64,
        /// What the node must serve.
        assignments: Vec<Assignment>,
        /// Whether the node must stop taking new requests.
        drain: bool,
    },
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node joined (or joined again).
    Joined(NodeId),
    /// A joined node sent its first heartbeat.
    Alive(NodeId),
    /// A node started draining.
    Draining(NodeId),
    /// A draining node finished its in-flight work.
    Drained(NodeId),
    /// A draining node was put back in service.
    Undrained(NodeId),
    /// A node's lease ran out.
    Dead(NodeId),
    /// A node left.
    Left(NodeId),
    /// The plan changed.
    PlanChanged {
        /// The new epoch.
        epoch: u64,
    },
}

/// One node as the cluster sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// The node.
    pub id: NodeId,
    /// Its state.
    pub state: NodeState,
    /// Data-plane address.
    pub data_addr: String,
    /// HTTP address, if any.
    pub http_addr: Option<String>,
    /// Last reported capability.
    pub capability: NodeCapability,
    /// Memory the planner gives it (what it had free when it joined).
    pub memory_budget_bytes: u64,
    /// Model files on its disk.
    pub local_models: Vec<LocalModel>,
    /// Last reported load.
    pub load: NodeLoad,
    /// Last reported shards.
    pub shards: Vec<ShardReport>,
    /// Highest heartbeat sequence seen since it joined.
    pub last_sequence: Option<u64>,
    /// When its lease runs out (meaningful while live).
    pub lease_deadline: tokio::time::Instant,
    /// While draining: the assignments it keeps until its in-flight work ends.
    pub kept_while_draining: Vec<Assignment>,
}

impl NodeView {
    /// Whether the node reports `layers` of `model` ready.
    pub fn is_ready(&self, model: &ModelId, layers: LayerRange) -> bool {
        self.shards
            .iter()
            .any(|s| &s.model == model && s.layers == layers && s.state == ShardState::Ready)
    }
}

/// A consistent snapshot of the cluster, published after every change.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    /// The cluster's id.
    pub cluster_id: String,
    /// Increases with every published change.
    pub version: u64,
    /// The plan in force.
    pub plan: Plan,
    /// The latest planning and its reasons ([`Placement::explain`]); its plan equals `plan`
    /// once the coordinator has planned at least once.
    pub placement: Arc<Placement>,
    /// Every known node.
    pub nodes: BTreeMap<NodeId, NodeView>,
    /// The model catalogue.
    pub models: BTreeMap<ModelId, ModelSpec>,
}

/// Membership settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Lease after each heartbeat.
    pub lease: Duration,
    /// Heartbeat interval nodes are told to use.
    pub heartbeat_interval: Duration,
    /// The model catalogue.
    pub models: Vec<ModelSpec>,
    /// Static pins.
    pub pins: BTreeMap<ModelId, BTreeSet<NodeId>>,
    /// Placement policy.
    pub policy: PlacementPolicy,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_millis(crate::config::DEFAULT_LEASE_MS),
            heartbeat_interval: Duration::from_millis(crate::config::DEFAULT_HEARTBEAT_INTERVAL_MS),
            models: Vec::new(),
            pins: BTreeMap::new(),
            policy: PlacementPolicy::default(),
        }
    }
}

/// Why a membership operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The node speaks another protocol major version.
    #[error("node speaks protocol version {theirs}, the coordinator speaks {ours}")]
    VersionMismatch {
        /// The coordinator's version.
        ours: u32,
        /// The node's version.
        theirs: u32,
    },
    /// The node id is not acceptable.
    #[error("node id {node:?} {problem}")]
    InvalidNodeId {
        /// The id.
        node: NodeId,
        /// What is wrong with it.
        problem: crate::NodeIdProblem,
    },
    /// Another live node already uses this id from another address.
    #[error("node id {node} is in use by a live node at another address")]
    DuplicateNode {
        /// The id.
        node: NodeId,
        /// Address of the live holder.
        live_addr: String,
    },
    /// The node is not known or not live.
    #[error("node {node} is not a live member")]
    NotLive {
        /// The node.
        node: NodeId,
    },
    /// The durable state could not be read or written.
    #[error("membership state could not be persisted")]
    Store(#[from] StoreError),
    /// The membership actor has stopped.
    #[error("membership is shutting down")]
    ShuttingDown,
}

impl MembershipError {
    /// The error's class on the wire.
    pub fn class(&self) -> ErrorClass {
        match self {
            MembershipError::VersionMismatch { .. }
            | MembershipError::InvalidNodeId { .. }
            | MembershipError::DuplicateNode { .. } => ErrorClass::InvalidRequest,
            MembershipError::NotLive { .. } => ErrorClass::NotFound,
            MembershipError::Store(_) => ErrorClass::Internal,
            MembershipError::ShuttingDown => ErrorClass::Unavailable,
        }
    }

    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            MembershipError::VersionMismatch { .. } => "protocol_version_mismatch",
            MembershipError::InvalidNodeId { .. } => "invalid_node_id",
            MembershipError::DuplicateNode { .. } => "duplicate_node_id",
            MembershipError::NotLive { .. } => "node_not_live",
            MembershipError::Store(_) => "state_store_failed",
            MembershipError::ShuttingDown => "shutting_down",
        }
    }
}

pub(crate) enum Command {
    Join(
        Box<JoinInfo>,
        oneshot::Sender<Result<JoinAccepted, MembershipError>>,
    ),
    Heartbeat(Box<HeartbeatInfo>, oneshot::Sender<HeartbeatReply>),
    Leave(NodeId, oneshot::Sender<Result<(), MembershipError>>),
    Drain(NodeId, oneshot::Sender<Result<(), MembershipError>>),
    Undrain(NodeId, oneshot::Sender<Result<(), MembershipError>>),
    DeclareDead(NodeId, oneshot::Sender<Result<(), MembershipError>>),
}

/// Talks to the membership actor. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MembershipHandle {
    tx: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<ClusterView>>,
    events: broadcast::Sender<MembershipEvent>,
}

impl MembershipHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MembershipError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| MembershipError::ShuttingDown)?;
        rx.await.map_err(|_| MembershipError::ShuttingDown)
    }

    /// Admits a node (or re-admits one that restarted or was declared dead).
    pub async fn join(&self, info: JoinInfo) -> Result<JoinAccepted, MembershipError> {
        self.call(|r| Command::Join(Box::new(info), r)).await?
    }

    /// Records a heartbeat and says what the node must serve.
    pub async fn heartbeat(&self, info: HeartbeatInfo) -> Result<HeartbeatReply, MembershipError> {
        self.call(|r| Command::Heartbeat(Box::new(info), r)).await
    }

    /// Removes a node that leaves on purpose; unknown nodes are ignored (leaving is idempotent).
    pub async fn leave(&self, node: NodeId) -> Result<(), MembershipError> {
        self.call(|r| Command::Leave(node, r)).await?
    }

    /// Stops routing new work to a node; it keeps its shards until its in-flight work ends.
    pub async fn drain(&self, node: NodeId) -> Result<(), MembershipError> {
        self.call(|r| Command::Drain(node, r)).await?
    }

    /// Puts a draining node back in service.
    pub async fn undrain(&self, node: NodeId) -> Result<(), MembershipError> {
        self.call(|r| Command::Undrain(node, r)).await?
    }

    /// Declares a live node dead now, without waiting for its lease (its credentials were
    /// revoked): its work moves elsewhere. Unknown or already dead nodes are left as they are.
    pub async fn declare_dead(&self, node: NodeId) -> Result<(), MembershipError> {
        self.call(|r| Command::DeclareDead(node, r)).await?
    }

    /// The latest snapshot.
    pub fn view(&self) -> Arc<ClusterView> {
        Arc::clone(&self.view.borrow())
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe_view(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.clone()
    }

    /// A receiver of membership events from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<MembershipEvent> {
        self.events.subscribe()
    }
}

/// Starts the membership actor: restores the cluster id, nodes and plan from `store` (live
/// nodes get a fresh lease, so a restarted coordinator does not declare its cluster dead), then
/// serves until `cancel` fires or every handle is dropped.
pub async fn start(
    config: MembershipConfig,
    store: Arc<dyn StateStore>,
    cancel: CancellationToken,
) -> Result<(MembershipHandle, JoinHandle<()>), MembershipError> {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    // Replaced by the restored state before anyone can look.
    let empty = ClusterView {
        cluster_id: String::new(),
        version: 0,
        plan: Plan::default(),
        placement: Arc::new(Placement {
            plan: Plan::default(),
            outcomes: Vec::new(),
        }),
        nodes: BTreeMap::new(),
        models: BTreeMap::new(),
    };
    let (view_tx, view) = watch::channel(Arc::new(empty));
    let actor = actor::Actor::restore(config, store, events.clone(), view_tx).await?;
    let task = tokio::spawn(actor.run(rx, cancel));
    Ok((MembershipHandle { tx, view, events }, task))
}
