//! Placement: which node serves which part of which model.
//!
//! The planner ([`place`]) is a pure function: the same [`PlacementInput`] always yields the
//! same [`Placement`], it reads no clock and does no I/O, so it can be property-tested and
//! replayed from a log. Membership calls it whenever the set of usable nodes changes.
//!
//! A model is served by *replicas*. A replica is either one node holding the whole model
//! (`[0, n_layers)`) or a *pipeline*: contiguous layer ranges on several nodes, each node
//! running its range and passing hidden states to the next. The planner replicates whole
//! models where they fit and shards the ones that fit no single node (or all of them, when the
//! policy's [`PlacementMode`] says so), sizing each stage by the node's measured per-layer
//! speed and its free memory. Every option it weighed is kept with its predicted single-stream
//! decode speed ([`Alternative`]), and [`Placement::explain`] prints them.
//!
//! # Plan invariants
//!
//! - A node holds at most one assignment per model.
//! - Every assignment fits its node: the sum of [`ModelSpec::need_bytes`] (weights plus the
//!   policy's KV reserve) over a node's assignments is at most its `memory_bytes`.
//! - Partial-range assignments of one model that share a [`Assignment::pipeline`] id form one
//!   pipeline whose ranges, ordered by start, cover `[0, n_layers)` exactly once
//!   ([`Plan::chains`] returns them in that order). A whole-model assignment is a replica on its
//!   own whatever its id. The planner gives every replica of a model its own id and keeps the
//!   id of a replica it keeps, so ids are stable across plans.
//! - Only alive nodes get assignments, and a pinned model only pinned nodes.

mod explain;
mod planner;
mod search;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests_pipeline;

pub use planner::place;

use serde::{Deserialize, Serialize};
use shoal_types::{LayerRange, ModelId, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

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

/// A node's measured per-layer decode cost for one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerSpeed {
    /// Seconds one decode step of one layer takes (batch 1).
    pub layer_seconds: f64,
    /// Seconds the output head takes per token (paid by the stage holding the last layer).
    #[serde(default)]
    pub head_seconds: f64,
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
    /// Models the node has another version of (a file of that name with a different sha256):
    /// it would load the wrong weights, so it gets no replica or stage of them.
    #[serde(default)]
    pub other_versions: BTreeSet<ModelId>,
    /// Measured per-layer decode cost, per model. Preferred over `speeds` when both are known;
    /// a model missing here is costed as `1 / (speeds × n_layers)` per layer.
    #[serde(default)]
    pub layer_speeds: BTreeMap<ModelId, LayerSpeed>,
    /// One-way latency between this node and the rest of the cluster, in seconds. A hop from
    /// node `a` to node `b` is costed `a + b` (each node's own link to the network).
    #[serde(default)]
    pub link_latency_seconds: f64,
}

/// Largest per-layer, head or link time the planner believes, in seconds; anything larger (or
/// not finite) is treated as a bad measurement.
pub(crate) const MAX_BELIEVABLE_SECONDS: f64 = 3600.0;

impl NodeInput {
    /// A node with no measurements, no local models and no link latency.
    pub fn new(id: impl Into<NodeId>, memory_bytes: u64, health: NodeHealth) -> Self {
        Self {
            id: id.into(),
            memory_bytes,
            cores: 0,
            health,
            speeds: BTreeMap::new(),
            local_models: BTreeSet::new(),
            other_versions: BTreeSet::new(),
            layer_speeds: BTreeMap::new(),
            link_latency_seconds: 0.0,
        }
    }

    /// Measured tokens/s for `model`, with anything unusable (missing, NaN, negative) as 0.
    pub fn speed(&self, model: &ModelId) -> f64 {
        match self.speeds.get(model) {
            Some(s) if s.is_finite() && *s > 0.0 => *s,
            _ => 0.0,
        }
    }

    /// Measured `(layer seconds, head seconds)` for `model` of `n_layers` layers: from
    /// `layer_speeds` when usable, else derived from the whole-model `speeds` (head folded into
    /// the layers), else `None`.
    pub fn layer_cost(&self, model: &ModelId, n_layers: u32) -> Option<(f64, f64)> {
        let believable = |s: f64| s.is_finite() && s > 0.0 && s <= MAX_BELIEVABLE_SECONDS;
        if let Some(ls) = self.layer_speeds.get(model)
            && believable(ls.layer_seconds)
        {
            let head = if ls.head_seconds.is_finite()
                && ls.head_seconds >= 0.0
                && ls.head_seconds <= MAX_BELIEVABLE_SECONDS
            {
                ls.head_seconds
            } else {
                0.0
            };
            return Some((ls.layer_seconds, head));
        }
        let tps = self.speed(model);
        if tps > 0.0 && n_layers > 0 {
            let per_layer = 1.0 / (tps * f64::from(n_layers));
            if believable(per_layer) {
                return Some((per_layer, 0.0));
            }
        }
        None
    }

    /// The link latency, with anything unusable (NaN, negative) as 0 and absurd values capped.
    pub fn link_latency(&self) -> f64 {
        let l = self.link_latency_seconds;
        if l.is_finite() && l > 0.0 {
            l.min(MAX_BELIEVABLE_SECONDS)
        } else {
            0.0
        }
    }
}

/// Whether models are replicated whole, split into pipelines, or whichever fits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementMode {
    /// Whole replicas where a node has room; a model no single node can hold (or whose room
    /// other models took) is split into a pipeline of up to [`AUTO_MAX_STAGES`] stages.
    #[default]
    Auto,
    /// Whole replicas only; a model no node can hold stays unplaced.
    Replicate,
    /// Pipelines of 2 to `max_stages` stages (values below 2 count as 2), even for models
    /// that would fit one node. When no pipeline fits (fewer than two usable nodes, say) the
    /// model falls back to a whole replica rather than go unserved.
    Shard {
        /// Most stages in one pipeline.
        max_stages: u32,
    },
}

/// Most stages the [`PlacementMode::Auto`] mode puts in one pipeline.
pub const AUTO_MAX_STAGES: u32 = 8;

impl PlacementMode {
    /// The stage counts a pipeline may have under this mode (`None` when pipelines are off).
    pub fn stage_limit(self) -> Option<u32> {
        match self {
            PlacementMode::Auto => Some(AUTO_MAX_STAGES),
            PlacementMode::Replicate => None,
            PlacementMode::Shard { max_stages } => Some(max_stages.max(2)),
        }
    }
}

/// How many copies of each model to place, how much room to leave for context, and whether to
/// split models into pipelines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementPolicy {
    /// Replicas per model (a pipeline counts as one); `None` places as many as fit.
    pub replicas: Option<usize>,
    /// Tokens of KV cache reserved beside each placed model (a stage reserves its share).
    pub kv_reserve_tokens: u32,
    /// Whole replicas, pipelines, or whichever fits.
    pub mode: PlacementMode,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            replicas: None,
            kv_reserve_tokens: 4096,
            mode: PlacementMode::Auto,
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
    /// Replica, reserve and mode policy.
    pub policy: PlacementPolicy,
    /// The plan in force, so that an unchanged situation keeps its assignments and epoch.
    pub previous: Option<Plan>,
}

/// One shard a node must serve. Ordered by node, model, layer range, then pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Assignment {
    /// The node.
    pub node: NodeId,
    /// The model.
    pub model: ModelId,
    /// The layers of the model it holds.
    pub layers: LayerRange,
    /// The replica this shard belongs to, unique among the model's replicas: the stages of one
    /// pipeline share it (see the module's plan invariants). Plans written before pipelines
    /// existed read as 0.
    #[serde(default)]
    pub pipeline: u32,
}

impl Ord for Assignment {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // LayerRange has no order of its own; (start, end) is the natural one here.
        let key = |a: &Self| (a.layers.start(), a.layers.end());
        self.node
            .cmp(&other.node)
            .then_with(|| self.model.cmp(&other.model))
            .then_with(|| key(self).cmp(&key(other)))
            .then_with(|| self.pipeline.cmp(&other.pipeline))
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

/// One replica of a model as a plan lays it out: its stages in layer order. A whole-model
/// replica is a chain of one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain<'a> {
    /// The replica's id ([`Assignment::pipeline`]).
    pub id: u32,
    /// The stages, ordered by their first layer.
    pub stages: Vec<&'a Assignment>,
}

impl Chain<'_> {
    /// Whether the stages cover `[0, n_layers)` exactly once, in order: what a request needs
    /// to run through the chain. A plan from the planner only holds complete chains, but a
    /// plan read from elsewhere may not.
    pub fn is_complete(&self, n_layers: u32) -> bool {
        let mut next = 0;
        for s in &self.stages {
            if s.layers.start() != next {
                return false;
            }
            next = s.layers.end();
        }
        next == n_layers && !self.stages.is_empty()
    }

    /// The node holding the first layer.
    pub fn head(&self) -> Option<&NodeId> {
        self.stages.first().map(|a| &a.node)
    }
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

    /// The replicas of one model, ordered by id then first node, each with its stages in
    /// layer order. Stages group by pipeline id, except that a range starting at layer 0 that
    /// nothing of its id continues is a replica of its own (so plans written before pipeline
    /// ids existed, where every whole replica reads as id 0, still list each replica). Check
    /// [`Chain::is_complete`] before sending a request through a chain.
    pub fn chains<'a>(&'a self, model: &ModelId) -> Vec<Chain<'a>> {
        let mut chains: Vec<Chain<'a>> = Vec::new();
        let mut groups: BTreeMap<u32, Vec<&'a Assignment>> = BTreeMap::new();
        for a in self.assignments.iter().filter(|a| &a.model == model) {
            if a.layers.start() == 0 && is_whole_in(self, a) {
                chains.push(Chain {
                    id: a.pipeline,
                    stages: vec![a],
                });
            } else {
                groups.entry(a.pipeline).or_default().push(a);
            }
        }
        for (id, mut stages) in groups {
            stages.sort_by(|x, y| {
                (x.layers.start(), x.layers.end())
                    .cmp(&(y.layers.start(), y.layers.end()))
                    .then_with(|| x.node.cmp(&y.node))
            });
            chains.push(Chain { id, stages });
        }
        chains.sort_by(|x, y| x.id.cmp(&y.id).then_with(|| x.head().cmp(&y.head())));
        chains
    }
}

/// Whether a range starting at 0 stands alone rather than opening a pipeline: it does unless
/// another assignment of the same model and pipeline id continues it.
fn is_whole_in(plan: &Plan, a: &Assignment) -> bool {
    !plan.assignments.iter().any(|b| {
        b.model == a.model && b.pipeline == a.pipeline && b.layers.start() == a.layers.end()
    })
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
    /// The node's file of the model is another version (its sha256 differs).
    OtherVersion,
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
    /// The model is served by pipelines and this node is in none: a stage on it would make a
    /// pipeline slower than one without it, and what is left cannot hold another pipeline.
    NotInPipeline,
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Dead => f.write_str("dead"),
            Exclusion::Draining => f.write_str("draining"),
            Exclusion::NotPinned => f.write_str("not pinned"),
            Exclusion::OtherVersion => f.write_str("has another version of the model"),
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
            Exclusion::ReplicaLimit { replicas } => {
                write!(f, "replica limit reached ({replicas})")
            }
            Exclusion::NotInPipeline => f.write_str(
                "in no pipeline (a stage here would slow one down, and no further pipeline fits)",
            ),
        }
    }
}

/// One stage of a replica the planner weighed: a node and the layers it would hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageChoice {
    /// The node.
    pub node: NodeId,
    /// The layers.
    pub layers: LayerRange,
}

/// Predicted single-stream decode speed of one replica.
///
/// Per token: `compute = Σ stage layers × layer seconds + head seconds of the last stage`, and
/// `hops = 2 × Σ over adjacent stages (a, b) of (latency a + latency b)`: hidden states go down
/// each link and the sampled token comes back up it to the first stage, which embeds it for
/// the next step (the `shoal.v1.Stage` stream carries both directions). Hidden states are a
/// few kilobytes per token, so bandwidth is left out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// `1 / (compute + hops)`: finite and positive.
    pub tokens_per_second: f64,
    /// Seconds of computation per token.
    pub compute_seconds: f64,
    /// Seconds of network hops per token.
    pub hop_seconds: f64,
    /// Whether every node involved had a speed measurement; unmeasured nodes are assumed as
    /// slow as the slowest measured one (or a nominal 10 ms per layer when none is measured).
    pub measured: bool,
}

/// What became of an alternative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// In the plan as replica `pipeline`.
    Chosen {
        /// Its [`Assignment::pipeline`] id.
        pipeline: u32,
    },
    /// An alternative at least as fast was taken instead (on a tie, the one with fewer
    /// stages).
    NotFaster,
    /// The model fits whole on a node, and whole replicas are preferred: a pipeline adds hops
    /// and ties up several nodes for one stream.
    WholeReplicaFits,
    /// The policy's mode rules this shape out.
    ExcludedByPolicy,
    /// The model already has as many replicas as the policy asks for.
    ReplicaLimit,
    /// Its nodes' memory went to other models (or other replicas of this one) first.
    MemoryTaken,
    /// One of its nodes already serves the model in another replica.
    NodeBusy,
    /// The plan in force already has a replica that still works; it is kept (no churn) even
    /// though this one is predicted faster.
    KeepsCurrent,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Chosen { pipeline } => write!(f, "chosen (replica {pipeline})"),
            Verdict::NotFaster => f.write_str("not chosen: no faster than the chosen one"),
            Verdict::WholeReplicaFits => {
                f.write_str("not chosen: the model fits whole on a node (no hops)")
            }
            Verdict::ExcludedByPolicy => f.write_str("not chosen: the placement mode rules it out"),
            Verdict::ReplicaLimit => f.write_str("not chosen: replica limit reached"),
            Verdict::MemoryTaken => f.write_str("not chosen: memory taken by other placements"),
            Verdict::NodeBusy => {
                f.write_str("not chosen: a node of it serves the model in another replica")
            }
            Verdict::KeepsCurrent => {
                f.write_str("not chosen: the replica already in place is kept (no churn)")
            }
        }
    }
}

/// A replica the planner considered for a model, its predicted speed and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alternative {
    /// The stages in layer order; one stage is a whole-model replica.
    pub stages: Vec<StageChoice>,
    /// Predicted single-stream decode speed.
    pub prediction: Prediction,
    /// Chosen, or why not.
    pub verdict: Verdict,
}

impl Alternative {
    /// Whether this is a pipeline (more than one stage).
    pub fn is_pipeline(&self) -> bool {
        self.stages.len() > 1
    }
}

/// What happened to one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOutcome {
    /// The model.
    pub model: ModelId,
    /// Bytes one whole replica needs with its KV reserve.
    pub need_bytes: u64,
    /// Nodes that serve it (whole or a stage), in node order.
    pub placed_on: Vec<NodeId>,
    /// Every other known node and why it does not serve the model.
    pub excluded: Vec<(NodeId, Exclusion)>,
    /// Pinned nodes that are not known to the cluster at all.
    pub unknown_pins: Vec<NodeId>,
    /// The spec cannot be placed at all (it has no layers).
    pub invalid: bool,
    /// What the planner weighed for the model's first replica (whole on each node with room;
    /// the fastest pipeline of each stage count), then every replica it chose after that, each
    /// with its prediction and verdict. Chosen replicas come first, by id.
    #[serde(default)]
    pub alternatives: Vec<Alternative>,
}

impl ModelOutcome {
    /// The replicas in the plan, with their predictions.
    pub fn chosen(&self) -> impl Iterator<Item = &Alternative> {
        self.alternatives
            .iter()
            .filter(|a| matches!(a.verdict, Verdict::Chosen { .. }))
    }
}

/// A plan and the reasons behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}
