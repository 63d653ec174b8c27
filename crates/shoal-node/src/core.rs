//! What the agent's parts share: the shard table, the drain flag, the last measured capability,
//! the metrics and the parent token of every generation.

use crate::checkpoint::{CheckpointCounters, CheckpointStore, Retargets};
use crate::metrics::NodeMetrics;
use crate::shards::ShardTable;
use shoal_api::BackendError;
use shoal_proto::v1::{Capability, Load};
use shoal_types::{ErrorClass, NodeId};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use tokio_util::sync::CancellationToken;

/// How long a stored checkpoint outlives its last push or use.
const CHECKPOINT_TTL: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug)]
pub(crate) struct NodeCore {
    pub node_id: NodeId,
    pub shards: Arc<ShardTable>,
    pub metrics: Arc<NodeMetrics>,
    /// Set while the coordinator (or shutdown) asks the node to take no new work.
    draining: AtomicBool,
    capability: RwLock<Capability>,
    /// Recent tokens per second, as `f64` bits (written by the heartbeat loop).
    tokens_per_second: AtomicU64,
    /// Cancelling it ends every generation on this node (the last phase of shutdown).
    pub requests: CancellationToken,
    /// Checkpoints of other nodes' generations kept here.
    pub checkpoints: CheckpointStore,
    /// Checkpoint traffic of this node, both ways.
    pub checkpoint_counters: Arc<CheckpointCounters>,
    /// This node's generations that checkpoint, by request id.
    pub checkpoint_targets: Arc<Retargets>,
}

impl NodeCore {
    pub fn new(
        node_id: NodeId,
        shards: Arc<ShardTable>,
        metrics: Arc<NodeMetrics>,
        capability: Capability,
        requests: CancellationToken,
        checkpoint_budget: usize,
    ) -> Self {
        Self {
            node_id,
            shards,
            checkpoint_counters: metrics.checkpoints().clone(),
            metrics,
            draining: AtomicBool::new(false),
            capability: RwLock::new(capability),
            tokens_per_second: AtomicU64::new(0f64.to_bits()),
            requests,
            checkpoints: CheckpointStore::new(checkpoint_budget, CHECKPOINT_TTL),
            checkpoint_targets: Arc::default(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self, on: bool) {
        let was = self.draining.swap(on, Ordering::AcqRel);
        if was != on {
            tracing::info!(draining = on, "drain state changed");
        }
    }

    /// Refuses new generations while draining.
    pub fn check_accepting(&self) -> Result<(), BackendError> {
        if self.is_draining() {
            Err(BackendError::new(
                ErrorClass::Unavailable,
                "draining",
                "this node is draining and takes no new requests",
            ))
        } else {
            Ok(())
        }
    }

    pub fn capability(&self) -> Capability {
        self.capability
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the host figures, keeping the measured model speeds.
    pub fn refresh_host(&self, mut host: Capability) {
        let mut cap = self
            .capability
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        host.speeds = std::mem::take(&mut cap.speeds);
        *cap = host;
    }

    pub fn set_tokens_per_second(&self, v: f64) {
        self.tokens_per_second.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The node's load from its engines' counters.
    pub fn load(&self) -> Load {
        let t = self.shards.engine_totals();
        Load {
            queue_depth: u32::try_from(t.queue_depth).unwrap_or(u32::MAX),
            active_sequences: u32::try_from(t.active_sequences).unwrap_or(u32::MAX),
            kv_bytes: t.kv_bytes,
            tokens_per_second: f64::from_bits(self.tokens_per_second.load(Ordering::Relaxed)),
            tokens_generated_total: t.tokens_generated,
        }
    }
}
