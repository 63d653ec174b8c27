//! The coordinator's own metrics, exposed beside the gateway's on `GET /metrics`.
//!
//! Node ids label the heartbeat-age gauge: the one place an id is a label, bounded by the
//! cluster's size (nodes that leave or die are removed from the family when they are
//! forgotten, and their age stops being reported while they are not live).

use crate::admin::heartbeat_age;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_control::{ClusterView, NodeState};
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::time::Instant;

/// Seconds since each live node's last heartbeat (gauge, label `node`).
pub const HEARTBEAT_AGE_SECONDS: &str = "shoal_node_heartbeat_age_seconds";
/// Nodes by membership state (gauge, label `state`).
pub const NODES: &str = "shoal_cluster_nodes";
/// The epoch of the plan in force (gauge).
pub const PLAN_EPOCH: &str = "shoal_cluster_plan_epoch";
/// Shards the plan assigns that their node reports ready (gauge).
pub const SHARDS_READY: &str = "shoal_cluster_shards_ready";
/// Shards the plan assigns (gauge).
pub const SHARDS_ASSIGNED: &str = "shoal_cluster_shards_assigned";

/// Generations the gateway moved to another replica in their middle (counter, label `cause`:
/// see [`crate::FailoverCause`]); registered by [`crate::ClusterBackend::register_metrics`].
pub const FAILOVERS_TOTAL: &str = "shoal_failovers_total";

/// Failovers that resumed from a KV checkpoint instead of prefilling the whole context
/// (counter); registered by [`crate::ClusterBackend::register_metrics`].
pub const CHECKPOINT_RESTORES_TOTAL: &str = "shoal_checkpoint_restores_total";
/// KV positions those failovers imported instead of prefilling (counter).
pub const CHECKPOINT_RESTORED_POSITIONS_TOTAL: &str = "shoal_checkpoint_restored_positions_total";

/// The silence a client saw because its generation moved: from its last token (or the
/// request's start) to the first token after the move (histogram); registered by
/// [`crate::ClusterBackend::register_metrics`], as are the two below.
pub const FAILOVER_STALL_SECONDS: &str = "shoal_failover_stall_seconds";
/// From a lost node being noticed to the first token after the move (histogram).
pub const FAILOVER_RECOVERY_SECONDS: &str = "shoal_failover_recovery_seconds";
/// The part of that the new node spent prefilling the generation again (histogram).
pub const FAILOVER_REPREFILL_SECONDS: &str = "shoal_failover_reprefill_seconds";

/// Generations moved from a node's queue, before any compute, to a replica expected to serve
/// them in under half the time (counter); registered by
/// [`crate::ClusterBackend::register_metrics`].
pub const REQUESTS_REBALANCED_TOTAL: &str = "shoal_requests_rebalanced_total";

/// Every metric name the coordinator adds to the gateway's.
pub const ALL_NAMES: [&str; 12] = [
    HEARTBEAT_AGE_SECONDS,
    NODES,
    PLAN_EPOCH,
    SHARDS_READY,
    SHARDS_ASSIGNED,
    FAILOVERS_TOTAL,
    CHECKPOINT_RESTORES_TOTAL,
    CHECKPOINT_RESTORED_POSITIONS_TOTAL,
    FAILOVER_STALL_SECONDS,
    FAILOVER_RECOVERY_SECONDS,
    FAILOVER_REPREFILL_SECONDS,
    REQUESTS_REBALANCED_TOTAL,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are written as is
enum StateLabel {
    joining,
    alive,
    draining,
    dead,
    left,
}

impl StateLabel {
    const ALL: [StateLabel; 5] = [
        StateLabel::joining,
        StateLabel::alive,
        StateLabel::draining,
        StateLabel::dead,
        StateLabel::left,
    ];

    fn of(s: NodeState) -> Self {
        match s {
            NodeState::Joining => StateLabel::joining,
            NodeState::Alive => StateLabel::alive,
            NodeState::Draining => StateLabel::draining,
            NodeState::Dead => StateLabel::dead,
            NodeState::Left => StateLabel::left,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: StateLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

/// The coordinator's metric handles.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    heartbeat_age: Family<NodeLabels, Gauge<f64, AtomicU64>>,
    nodes: Family<StateLabels, Gauge>,
    plan_epoch: Gauge,
    shards_ready: Gauge,
    shards_assigned: Gauge,
    reported: Mutex<BTreeSet<String>>,
}

impl ClusterMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            HEARTBEAT_AGE_SECONDS,
            "Seconds since the node's last heartbeat (live nodes only)",
            self.heartbeat_age.clone(),
        );
        registry.register(NODES, "Nodes by membership state", self.nodes.clone());
        registry.register(
            PLAN_EPOCH,
            "Epoch of the plan in force",
            self.plan_epoch.clone(),
        );
        registry.register(
            SHARDS_READY,
            "Assigned shards their node reports ready",
            self.shards_ready.clone(),
        );
        registry.register(
            SHARDS_ASSIGNED,
            "Shards the plan assigns",
            self.shards_assigned.clone(),
        );
        for state in StateLabel::ALL {
            let _ = self.nodes.get_or_create(&StateLabels { state });
        }
    }

    /// Refreshes every gauge from `view`.
    pub fn update(&self, view: &ClusterView, lease: Duration) {
        let now = Instant::now();
        for state in StateLabel::ALL {
            let n = view
                .nodes
                .values()
                .filter(|v| StateLabel::of(v.state) == state)
                .count();
            self.nodes
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        self.plan_epoch.set(view.plan.epoch as i64);
        let assigned = view.plan.assignments.len();
        let ready = view
            .plan
            .assignments
            .iter()
            .filter(|a| {
                view.nodes
                    .get(&a.node)
                    .is_some_and(|n| n.is_ready(&a.model, a.layers))
            })
            .count();
        self.shards_assigned.set(assigned as i64);
        self.shards_ready.set(ready as i64);

        let mut reported = self
            .reported
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut now_reported = BTreeSet::new();
        for node in view.nodes.values().filter(|n| n.state.is_live()) {
            if let Some(age) = heartbeat_age(node, lease, now) {
                let labels = NodeLabels {
                    node: node.id.to_string(),
                };
                self.heartbeat_age
                    .get_or_create(&labels)
                    .set(age.as_secs_f64());
                now_reported.insert(labels.node);
            }
        }
        for gone in reported.difference(&now_reported) {
            self.heartbeat_age
                .remove(&NodeLabels { node: gone.clone() });
        }
        *reported = now_reported;
    }
}
