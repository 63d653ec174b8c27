//! Placement: which node serves which part of which model.
//!
//! The planner ([`place`]) is a pure function: the same [`PlacementInput`] always yields the
//! same [`Placement`], it reads no clock and does no I/O, so it can be property-tested and
//! replayed from a log. Membership calls it whenever the set of usable nodes changes.
//!
//! v1 places whole models (`[0, n_layers)`) as replicas. The types already carry a
//! [`LayerRange`] per assignment and [`ModelSpec::weight_bytes`] prices partial ranges, so a
//! pipeline-sharding planner can extend this one without changing the plan's shape.

mod planner;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests;

pub use planner::place;

use serde::{Deserialize, Serialize};
use shoal_types::{LayerRange, ModelId, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

/// What the planner needs to know about a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name clients use.
    pub id: ModelId,
    /// sha256 of the model file (lower-case hex), so every node loads the same bytes.
    pub sha256: String,
    /// Size of the whole file: every weight, including embeddings and the output head.
    pub file_bytes: u64,
    /// Transformer layers in the model.
    pub n_layers: u32,
    /// Weight bytes of one transformer layer.
    pub layer_bytes: u64,
    /// KV-cache bytes one token of context costs across all layers.
    pub kv_bytes_per_token: u64,
    /// Longest sequence (prompt plus completion) the model accepts, in tokens.
    #[serde(default)]
    pub context_length: u32,
}

impl ModelSpec {
    /// The whole model `[0, n_layers)`, or `None` for a spec without layers.
    pub fn full_range(&self) -> Option<LayerRange> {
        LayerRange::full(self.n_layers).ok()
    }

    /// Weight bytes a node must hold to serve `range`.
    ///
    /// The whole model costs the file size. A partial range costs its layers plus, when it is
    /// the first or the last range, every non-layer byte (embeddings, final norm, head):
    /// tied embeddings are needed at both ends, so charging each end the full remainder never
    /// under-counts.
    pub fn weight_bytes(&self, range: LayerRange) -> u64 {
        if range.start() == 0 && range.end() >= self.n_layers {
            return self.file_bytes;
        }
        let layers = self.layer_bytes.saturating_mul(u64::from(range.len()));
        let rest = self
            .file_bytes
            .saturating_sub(self.layer_bytes.saturating_mul(u64::from(self.n_layers)));
        if range.is_first() || range.is_last(self.n_layers) {
            layers.saturating_add(rest)
        } else {
            layers
        }
    }

    /// KV-cache bytes reserved for `tokens` tokens of context on `range`.
    pub fn kv_reserve_bytes(&self, range: LayerRange, tokens: u32) -> u64 {
        let whole = self.kv_bytes_per_token.saturating_mul(u64::from(tokens));
        if self.n_layers == 0 || range.len() >= self.n_layers {
            return whole;
        }
        // Proportional to the layers held, rounded up so a reserve is never too small.
        let num = u128::from(whole) * u128::from(range.len());
        let den = u128::from(self.n_layers);
        u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX)
    }

    /// Memory a node needs to serve `range` with a KV reserve of `kv_tokens` tokens.
    pub fn need_bytes(&self, range: LayerRange, kv_tokens: u32) -> u64 {
        self.weight_bytes(range)
            .saturating_add(self.kv_reserve_bytes(range, kv_tokens))
    }
}

/// Whether a node can take work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeHealth {
    /// Reachable and accepting work.
    Alive,
    /// Finishing its in-flight work; gets nothing new.
    Draining,
    /// Lease expired or left; gets nothing.
    Dead,
}

/// What the planner needs to know about a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInput {
    /// The node.
    pub id: NodeId,
    /// Bytes of memory the node can give to shards (weights plus KV reserves).
    pub memory_bytes: u64,
    /// CPU cores.
    pub cores: u32,
    /// Whether it can take work.
    pub health: NodeHealth,
    /// Measured whole-model decode tokens per second, per model.
    pub speeds: BTreeMap<ModelId, f64>,
    /// Models whose file (with the right sha256) is already on the node's disk.
    pub local_models: BTreeSet<ModelId>,
}

impl NodeInput {
    /// A node with no measurements and no local models.
    pub fn new(id: impl Into<NodeId>, memory_bytes: u64, health: NodeHealth) -> Self {
        Self {
            id: id.into(),
            memory_bytes,
            cores: 0,
            health,
            speeds: BTreeMap::new(),
            local_models: BTreeSet::new(),
        }
    }

    /// Measured tokens/s for `model`, with anything unusable (missing, NaN, negative) as 0.
    pub fn speed(&self, model: &ModelId) -> f64 {
        match self.speeds.get(model) {
            Some(s) if s.is_finite() && *s > 0.0 => *s,
            _ => 0.0,
        }
    }
}

/// How many copies of each model to place, and how much room to leave for context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementPolicy {
    /// Replicas per model; `None` places a replica on every eligible node with room.
    pub replicas: Option<usize>,
    /// Tokens of KV cache reserved beside each placed model.
    pub kv_reserve_tokens: u32,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            replicas: None,
            kv_reserve_tokens: 4096,
        }
    }
}

/// Everything the planner looks at.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementInput {
    /// The models the cluster serves.
    pub models: Vec<ModelSpec>,
    /// Every known node, whatever its health.
    pub nodes: Vec<NodeInput>,
    /// Static pins: a pinned model is placed only on these nodes.
    pub pins: BTreeMap<ModelId, BTreeSet<NodeId>>,
    /// Replica and reserve policy.
    pub policy: PlacementPolicy,
    /// The plan in force, so that an unchanged situation keeps its assignments and epoch.
    pub previous: Option<Plan>,
}

/// One shard a node must serve. Ordered by node, model, then layer range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Assignment {
    /// The node.
    pub node: NodeId,
    /// The model.
    pub model: ModelId,
    /// The layers of the model it holds.
    pub layers: LayerRange,
}

impl Ord for Assignment {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // LayerRange has no order of its own; (start, end) is the natural one here.
        let key = |a: &Self| (a.layers.start(), a.layers.end());
        self.node
            .cmp(&other.node)
            .then_with(|| self.model.cmp(&other.model))
            .then_with(|| key(self).cmp(&key(other)))
    }
}

impl PartialOrd for Assignment {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Who serves what. Assignments are sorted by node, model and range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Increases whenever the assignments change.
    pub epoch: u64,
    /// Every shard of every node.
    pub assignments: Vec<Assignment>,
}

impl Plan {
    /// The assignments of one node.
    pub fn for_node<'a>(&'a self, node: &'a NodeId) -> impl Iterator<Item = &'a Assignment> + 'a {
        self.assignments.iter().filter(move |a| &a.node == node)
    }

    /// The assignments of one model.
    pub fn for_model<'a>(
        &'a self,
        model: &'a ModelId,
    ) -> impl Iterator<Item = &'a Assignment> + 'a {
        self.assignments.iter().filter(move |a| &a.model == model)
    }
}

/// Why a node did not get a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Exclusion {
    /// The node is dead or gone.
    Dead,
    /// The node is draining.
    Draining,
    /// The model is pinned to other nodes.
    NotPinned,
    /// The model does not fit the node even when the node holds nothing else.
    NotEnoughMemory {
        /// Bytes the model needs with its KV reserve.
        need: u64,
        /// Bytes the node can give.
        capacity: u64,
    },
    /// The model would fit, but other models took the room first.
    MemoryTaken {
        /// Bytes the model needs with its KV reserve.
        need: u64,
        /// Bytes left on the node.
        free: u64,
    },
    /// The model already has as many replicas as the policy asks for.
    ReplicaLimit {
        /// The policy's replica count.
        replicas: usize,
    },
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Dead => f.write_str("dead"),
            Exclusion::Draining => f.write_str("draining"),
            Exclusion::NotPinned => f.write_str("not pinned"),
            Exclusion::NotEnoughMemory { need, capacity } => {
                write!(
                    f,
                    "not enough memory (needs {need} B, node has {capacity} B)"
                )
            }
            Exclusion::MemoryTaken { need, free } => {
                write!(
                    f,
                    "memory taken by other models (needs {need} B, {free} B left)"
                )
            }
            Exclusion::ReplicaLimit { replicas } => write!(f, "already {replicas} replicas"),
        }
    }
}

/// What happened to one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOutcome {
    /// The model.
    pub model: ModelId,
    /// Bytes one whole replica needs with its KV reserve.
    pub need_bytes: u64,
    /// Nodes that serve it, in node order.
    pub placed_on: Vec<NodeId>,
    /// Every other known node and why it does not serve the model.
    pub excluded: Vec<(NodeId, Exclusion)>,
    /// Pinned nodes that are not known to the cluster at all.
    pub unknown_pins: Vec<NodeId>,
    /// The spec cannot be placed at all (it has no layers).
    pub invalid: bool,
}

/// A plan and the reasons behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The plan.
    pub plan: Plan,
    /// One entry per model, in the order of the input's models.
    pub outcomes: Vec<ModelOutcome>,
}

impl Placement {
    /// Models that got no replica at all.
    pub fn unplaced(&self) -> impl Iterator<Item = &ModelOutcome> {
        self.outcomes.iter().filter(|o| o.placed_on.is_empty())
    }

    /// A human-readable account of the plan: where each model went, and for every other node
    /// why it was left out.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(out, "plan epoch {}", self.plan.epoch);
        for o in &self.outcomes {
            if o.invalid {
                let _ = writeln!(out, "model {}: not placed: the spec has no layers", o.model);
                continue;
            }
            if o.placed_on.is_empty() {
                let _ = writeln!(
                    out,
                    "model {} (needs {} B): NOT PLACED",
                    o.model, o.need_bytes
                );
            } else {
                let nodes: Vec<&str> = o.placed_on.iter().map(NodeId::as_str).collect();
                let _ = writeln!(
                    out,
                    "model {} (needs {} B): on {}",
                    o.model,
                    o.need_bytes,
                    nodes.join(", ")
                );
            }
            for (node, why) in &o.excluded {
                let _ = writeln!(out, "  {node}: {why}");
            }
            for node in &o.unknown_pins {
                let _ = writeln!(out, "  {node}: pinned but not a known node");
            }
            if o.placed_on.is_empty() && o.excluded.is_empty() {
                let _ = writeln!(out, "  no nodes in the cluster");
            }
        }
        out
    }
}
