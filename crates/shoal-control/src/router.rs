//! Routing: which replica serves the next request for a model.
//!
//! A replica is a whole-model node or a pipeline: a chain of stages on several nodes, each
//! holding a contiguous layer range ([`Plan::chains`](crate::placement::Plan::chains)). The
//! router considers only complete, ready replicas: every stage's node alive, reporting its
//! range ready, and the ranges covering the model exactly once. Among those it picks the one
//! with the least expected latency:
//!
//! `Σ over stages of (queued + active + in flight from this router + 1) × stage seconds`
//!
//! where a stage's seconds per token are its layers times the node's measured per-layer decode
//! time (plus the head on the last stage), or for a whole-model replica `1 / decode tokens per
//! second`. For a whole replica this is the familiar `work / speed`. The sum, not the slowest
//! stage, is the right figure for one request: each of its tokens passes through every stage
//! in turn, so it waits for each stage's share of work; the bottleneck stage bounds a
//! pipeline's throughput, which the per-node work counts already reflect. Link latency is not
//! known here and is left out (the planner weighs it when it builds pipelines).
//!
//! The `+ 1` is the request itself: without it every idle node would score zero and speed would
//! stop mattering exactly when the cluster is quiet. Heartbeats report queue and active counts
//! only every interval, so the router also counts the requests it sent and that have not
//! finished ([`RouteGuard`]) on every node of the chosen replica; that is what spreads a burst
//! of concurrent requests before the next heartbeat shows it. Ties go to the faster replica,
//! then to measured over assumed speeds, then to the lower first-stage node id and replica id,
//! so the choice is deterministic.

use crate::membership::{ClusterView, NodeState, NodeView};
use crate::placement::Chain;
use shoal_types::{ErrorClass, LayerRange, ModelId, NodeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// Why no replica was picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The cluster does not serve this model.
    #[error("model {model} is not served by this cluster")]
    UnknownModel {
        /// The model asked for.
        model: ModelId,
    },
    /// The model is known, but no replica is ready on a node that takes work.
    #[error("no replica of model {model} is ready ({assigned} assigned)")]
    NoReadyReplica {
        /// The model asked for.
        model: ModelId,
        /// Replicas the plan assigns, ready or not.
        assigned: usize,
    },
}

impl RouteError {
    /// The error's class on the wire.
    pub fn class(&self) -> ErrorClass {
        match self {
            RouteError::UnknownModel { .. } => ErrorClass::NotFound,
            RouteError::NoReadyReplica { .. } => ErrorClass::Unavailable,
        }
    }

    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::UnknownModel { .. } => "model_not_found",
            RouteError::NoReadyReplica { .. } => "no_ready_replica",
        }
    }
}

type InFlight = Arc<Mutex<HashMap<NodeId, u64>>>;

fn lock(m: &Mutex<HashMap<NodeId, u64>>) -> MutexGuard<'_, HashMap<NodeId, u64>> {
    // Counters stay meaningful after a panic elsewhere: each update is a single map operation.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Picks replicas from the latest [`ClusterView`]. Clones share in-flight counts.
#[derive(Debug, Clone)]
pub struct Router {
    view: watch::Receiver<Arc<ClusterView>>,
    in_flight: InFlight,
}

/// One stage of a chosen replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStage {
    /// The node running the stage.
    pub node: NodeId,
    /// Its data-plane address.
    pub data_addr: String,
    /// The layers it runs.
    pub layers: LayerRange,
}

/// The replica chosen for one request. Holding it counts the request as in flight on every
/// node of the replica; drop it when the request ends (finished, failed or cancelled).
#[derive(Debug)]
pub struct RouteGuard {
    /// The node to send the request to: the first stage (the whole model for a replica of
    /// one stage).
    pub node: NodeId,
    /// The first stage's data-plane address.
    pub data_addr: String,
    /// The layers the first stage serves.
    pub layers: LayerRange,
    /// Every stage in layer order; the first equals `node`/`data_addr`/`layers`, and a
    /// whole-model replica has exactly that one.
    pub stages: Vec<RouteStage>,
    /// The replica's id in the plan ([`Assignment::pipeline`](crate::placement::Assignment)).
    pub pipeline: u32,
    /// The plan epoch the choice was made under.
    pub plan_epoch: u64,
    in_flight: InFlight,
}

impl RouteGuard {
    /// Whether the replica is a pipeline of more than one stage.
    pub fn is_pipeline(&self) -> bool {
        self.stages.len() > 1
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.in_flight);
        for stage in &self.stages {
            if let Some(n) = map.get_mut(&stage.node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&stage.node);
                }
            }
        }
    }
}

/// One ready stage of a candidate replica.
struct StageCandidate<'a> {
    node: &'a NodeView,
    layers: LayerRange,
    work: u64,
    seconds: Option<f64>,
}

struct Candidate<'a> {
    id: u32,
    stages: Vec<StageCandidate<'a>>,
}

/// Seconds per token `layers` of `model` take on `node`, from its measurements: the whole
/// model as `1 / tokens per second`, a partial range as layers times the per-layer time (plus
/// the head on the last stage), or its share of the whole when only tokens/s is known.
fn stage_seconds(
    node: &NodeView,
    model: &ModelId,
    layers: LayerRange,
    n_layers: u32,
) -> Option<f64> {
    let usable = |s: f64| s.is_finite() && s > 0.0;
    let speed = node.capability.speeds.iter().find(|s| &s.model == model)?;
    let tps = speed.decode_tokens_per_second;
    let whole = layers.start() == 0 && layers.end() >= n_layers;
    if whole && usable(tps) {
        return Some(1.0 / tps);
    }
    let len = f64::from(layers.len());
    if usable(speed.layer_decode_seconds) {
        let head = if layers.end() >= n_layers
            && speed.head_seconds.is_finite()
            && speed.head_seconds > 0.0
        {
            speed.head_seconds
        } else {
            0.0
        };
        return Some(len * speed.layer_decode_seconds + head);
    }
    if usable(tps) && n_layers > 0 {
        return Some(len / (f64::from(n_layers) * tps));
    }
    None
}

impl Router {
    /// A router following the views published by membership.
    pub fn new(view: watch::Receiver<Arc<ClusterView>>) -> Self {
        Self {
            view,
            in_flight: Arc::default(),
        }
    }

    /// Requests this router has sent to `node` (as any stage) that have not ended.
    pub fn in_flight(&self, node: &NodeId) -> u64 {
        lock(&self.in_flight).get(node).copied().unwrap_or(0)
    }

    /// Chooses the replica for one request to `model`.
    pub fn pick(&self, model: &ModelId) -> Result<RouteGuard, RouteError> {
        self.pick_excluding(model, &[])
    }

    /// Like [`Router::pick`], never choosing a replica with a node in `exclude` (nodes a
    /// request already failed on, which the membership view may still show alive until their
    /// lease runs out).
    pub fn pick_excluding(
        &self,
        model: &ModelId,
        exclude: &[NodeId],
    ) -> Result<RouteGuard, RouteError> {
        self.pick_preferring(model, exclude, None)
    }

    /// Like [`Router::pick_excluding`], choosing the whole-model replica on `prefer` (a node
    /// that holds the request's checkpoint resumes it without a transfer) unless another is
    /// expected to serve it in less than half the time: a checkpoint's transfer is worth
    /// avoiding, but not at the price of queueing behind several other generations.
    pub fn pick_preferring(
        &self,
        model: &ModelId,
        exclude: &[NodeId],
        prefer: Option<&NodeId>,
    ) -> Result<RouteGuard, RouteError> {
        let view = Arc::clone(&self.view.borrow());
        let Some(spec) = view.models.get(model) else {
            return Err(RouteError::UnknownModel {
                model: model.clone(),
            });
        };
        let mut in_flight = lock(&self.in_flight);
        let chains = view.plan.chains(model);
        let assigned = chains.len();
        let candidates: Vec<Candidate<'_>> = chains
            .iter()
            .filter_map(|c| candidate(&view, c, spec.n_layers, exclude, &in_flight))
            .collect();
        let latency = Latency::of(&candidates, spec.n_layers);
        let expected = |c: &Candidate<'_>| latency.expected(c);
        let per_token = |c: &Candidate<'_>| latency.per_token(c);
        let measured = |c: &Candidate<'_>| c.stages.iter().all(|s| s.seconds.is_some());
        let preferred = |c: &Candidate<'_>| c.stages.len() == 1 && head(c) == prefer;
        let score = |c: &Candidate<'_>| {
            if preferred(c) {
                expected(c) / 2.0
            } else {
                expected(c)
            }
        };
        let best = candidates.iter().min_by(|a, b| {
            score(a)
                .total_cmp(&score(b))
                .then_with(|| preferred(b).cmp(&preferred(a)))
                .then_with(|| per_token(a).total_cmp(&per_token(b)))
                .then_with(|| measured(b).cmp(&measured(a)))
                .then_with(|| head(a).cmp(&head(b)))
                .then_with(|| a.id.cmp(&b.id))
        });
        let Some(best) = best else {
            return Err(RouteError::NoReadyReplica {
                model: model.clone(),
                assigned,
            });
        };
        self.guard(best, view.plan.epoch, &mut in_flight)
            .ok_or_else(|| RouteError::NoReadyReplica {
                model: model.clone(),
                assigned,
            })
    }

    /// `chosen` as a route, counted in flight on each of its nodes (`None` for a candidate
    /// with no stage, which a complete chain never is).
    fn guard(
        &self,
        chosen: &Candidate<'_>,
        plan_epoch: u64,
        in_flight: &mut HashMap<NodeId, u64>,
    ) -> Option<RouteGuard> {
        let stages: Vec<RouteStage> = chosen
            .stages
            .iter()
            .map(|s| RouteStage {
                node: s.node.id.clone(),
                data_addr: s.node.data_addr.clone(),
                layers: s.layers,
            })
            .collect();
        let first = stages.first().cloned()?;
        for s in &stages {
            *in_flight.entry(s.node.clone()).or_insert(0) += 1;
        }
        Some(RouteGuard {
            node: first.node,
            data_addr: first.data_addr,
            layers: first.layers,
            stages,
            pipeline: chosen.id,
            plan_epoch,
            in_flight: Arc::clone(&self.in_flight),
        })
    }
}

impl Router {
    /// For a request for `model` still waiting in the queue of the whole-model replica on
    /// `node` (and counted there, by the node's load and this router's guard): the ready
    /// whole-model replica, none in `exclude`, expected to serve it soonest, when that is in
    /// under half the time `node` is expected to take. The route is counted in flight at once,
    /// so requests deciding together do not all pick the same one; the margin keeps them from
    /// moving back and forth between replicas of about the same load.
    pub fn pick_sooner(
        &self,
        model: &ModelId,
        node: &NodeId,
        exclude: &[NodeId],
    ) -> Option<RouteGuard> {
        let view = Arc::clone(&self.view.borrow());
        let spec = view.models.get(model)?;
        let mut in_flight = lock(&self.in_flight);
        let candidates: Vec<Candidate<'_>> = view
            .plan
            .chains(model)
            .iter()
            .filter_map(|c| candidate(&view, c, spec.n_layers, exclude, &in_flight))
            .filter(|c| c.stages.len() == 1)
            .collect();
        let latency = Latency::of(&candidates, spec.n_layers);
        let here = candidates.iter().find(|c| head(c) == Some(node))?;
        // A candidate's work counts the request as one more; here it is counted already.
        let stay: f64 = here
            .stages
            .iter()
            .map(|s| s.work.saturating_sub(1) as f64 * latency.seconds(s))
            .sum();
        let best = candidates
            .iter()
            .filter(|c| head(c) != Some(node))
            .min_by(|a, b| {
                latency
                    .expected(a)
                    .total_cmp(&latency.expected(b))
                    .then_with(|| head(a).cmp(&head(b)))
            })?;
        if 2.0 * latency.expected(best) >= stay {
            return None;
        }
        self.guard(best, view.plan.epoch, &mut in_flight)
    }

    /// A node to keep checkpoints of a generation of `model` that runs elsewhere: an alive
    /// node, not in `exclude`, with a whole replica of the model ready (a failover can then
    /// resume on it without a transfer), the least loaded first.
    pub fn checkpoint_peer(&self, model: &ModelId, exclude: &[NodeId]) -> Option<RouteStage> {
        let view = Arc::clone(&self.view.borrow());
        let spec = view.models.get(model)?;
        let in_flight = lock(&self.in_flight);
        view.plan
            .chains(model)
            .iter()
            .filter_map(|c| candidate(&view, c, spec.n_layers, exclude, &in_flight))
            .filter_map(|c| match c.stages.as_slice() {
                [only] => Some((only.work, only.node, only.layers)),
                _ => None,
            })
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)))
            .map(|(_, node, layers)| RouteStage {
                node: node.id.clone(),
                data_addr: node.data_addr.clone(),
                layers,
            })
    }
}

impl Router {
    /// A node to keep the checkpoints of a pipeline stage running `layers` of `model` on a
    /// route through `route` (its nodes): an alive node running a ready stage of the model
    /// (so it has the model's file), not in `exclude`. Preferred in order: one running the
    /// same layers (a failover can resume that stage on it without a transfer), one off the
    /// route (it does not go down with it), the least loaded.
    pub fn stage_checkpoint_peer(
        &self,
        model: &ModelId,
        layers: LayerRange,
        route: &[NodeId],
        exclude: &[NodeId],
    ) -> Option<RouteStage> {
        let view = Arc::clone(&self.view.borrow());
        let in_flight = lock(&self.in_flight);
        view.plan
            .chains(model)
            .iter()
            .flat_map(|c| c.stages.iter())
            .filter_map(|a| {
                let node = view.nodes.get(&a.node)?;
                let usable = node.state == NodeState::Alive
                    && node.is_ready(&a.model, a.layers)
                    && !exclude.contains(&a.node);
                let load = node
                    .load
                    .in_flight()
                    .saturating_add(in_flight.get(&a.node).copied().unwrap_or(0));
                usable.then_some(((a.layers != layers, route.contains(&a.node), load), node))
            })
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)))
            .map(|(_, node)| RouteStage {
                node: node.id.clone(),
                data_addr: node.data_addr.clone(),
                layers,
            })
    }
}

/// The first stage's node of a candidate.
fn head<'c>(c: &Candidate<'c>) -> Option<&'c NodeId> {
    c.stages.first().map(|s| &s.node.id)
}

/// Expected latencies of candidates (see the module docs).
struct Latency {
    /// A stage whose node has not measured this model is assumed as slow per layer as the
    /// slowest measured stage: it still gets work when the others are busy, never ahead of a
    /// known speed.
    fallback_per_layer: f64,
}

impl Latency {
    fn of(candidates: &[Candidate<'_>], n_layers: u32) -> Self {
        let fallback_per_layer = candidates
            .iter()
            .flat_map(|c| c.stages.iter())
            .filter_map(|s| s.seconds.map(|t| t / f64::from(s.layers.len())))
            .max_by(f64::total_cmp)
            .unwrap_or(1.0 / f64::from(n_layers.max(1)));
        Self { fallback_per_layer }
    }

    fn seconds(&self, s: &StageCandidate<'_>) -> f64 {
        s.seconds
            .unwrap_or(self.fallback_per_layer * f64::from(s.layers.len()))
    }

    /// Work is a small integer count, exact in f64.
    fn expected(&self, c: &Candidate<'_>) -> f64 {
        c.stages
            .iter()
            .map(|s| s.work as f64 * self.seconds(s))
            .sum()
    }

    fn per_token(&self, c: &Candidate<'_>) -> f64 {
        c.stages.iter().map(|s| self.seconds(s)).sum()
    }
}

/// `chain` as a candidate when it is complete, every stage is ready on an alive node and none
/// is excluded.
fn candidate<'a>(
    view: &'a ClusterView,
    chain: &Chain<'_>,
    n_layers: u32,
    exclude: &[NodeId],
    in_flight: &HashMap<NodeId, u64>,
) -> Option<Candidate<'a>> {
    if !chain.is_complete(n_layers) {
        return None;
    }
    let mut stages = Vec::with_capacity(chain.stages.len());
    for a in &chain.stages {
        let node = view.nodes.get(&a.node)?;
        if node.state != NodeState::Alive
            || !node.is_ready(&a.model, a.layers)
            || exclude.contains(&a.node)
            || stages
                .iter()
                .any(|s: &StageCandidate<'_>| s.node.id == a.node)
        {
            return None;
        }
        let ours = in_flight.get(&a.node).copied().unwrap_or(0);
        stages.push(StageCandidate {
            node,
            layers: a.layers,
            work: node.load.in_flight().saturating_add(ours).saturating_add(1),
            seconds: stage_seconds(node, &a.model, a.layers, n_layers),
        });
    }
    Some(Candidate {
        id: chain.id,
        stages,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::membership::{
        ModelSpeed, NodeCapability, NodeLoad, NodeView, ShardReport, ShardState,
    };
    use crate::placement::{Assignment, ModelSpec, Placement, Plan};
    use std::collections::BTreeMap;

    const M: &str = "m";

    fn full() -> LayerRange {
        LayerRange::full(4).unwrap()
    }

    fn node(id: &str, tps: Option<f64>, load: u32) -> NodeView {
        NodeView {
            id: NodeId::new(id),
            state: NodeState::Alive,
            data_addr: format!("{id}:7000"),
            http_addr: None,
            capability: NodeCapability {
                speeds: tps
                    .map(|t| ModelSpeed {
                        model: ModelId::new(M),
                        layer_decode_seconds: 0.0,
                        head_seconds: 0.0,
                        decode_tokens_per_second: t,
                        layer_bytes: 0,
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            memory_budget_bytes: 0,
            local_models: vec![],
            load: NodeLoad {
                queue_depth: load,
                ..Default::default()
            },
            shards: vec![ShardReport {
                model: ModelId::new(M),
                sha256: String::new(),
                layers: full(),
                plan_epoch: 1,
                state: ShardState::Ready,
                detail: String::new(),
            }],
            last_sequence: Some(1),
            lease_deadline: tokio::time::Instant::now(),
            kept_while_draining: vec![],
        }
    }

    fn view(nodes: Vec<NodeView>) -> (watch::Sender<Arc<ClusterView>>, Router) {
        let assignments = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Assignment {
                node: n.id.clone(),
                model: ModelId::new(M),
                layers: full(),
                pipeline: i as u32,
            })
            .collect();
        view_plan(nodes, assignments)
    }

    fn view_plan(
        nodes: Vec<NodeView>,
        assignments: Vec<Assignment>,
    ) -> (watch::Sender<Arc<ClusterView>>, Router) {
        let plan = Plan {
            epoch: 1,
            assignments,
        };
        let spec = ModelSpec {
            id: ModelId::new(M),
            sha256: String::new(),
            file_bytes: 1,
            n_layers: 4,
            layer_bytes: 0,
            kv_bytes_per_token: 0,
            context_length: 2048,
        };
        let view = ClusterView {
            cluster_id: "c".into(),
            version: 1,
            placement: Arc::new(Placement {
                plan: plan.clone(),
                outcomes: vec![],
            }),
            plan,
            nodes: nodes.into_iter().map(|n| (n.id.clone(), n)).collect(),
            models: BTreeMap::from([(spec.id.clone(), spec)]),
        };
        let (tx, rx) = watch::channel(Arc::new(view));
        (tx, Router::new(rx))
    }

    fn m() -> ModelId {
        ModelId::new(M)
    }

    #[test]
    fn prefers_the_faster_node_when_idle() {
        let (_tx, r) = view(vec![node("a", Some(10.0), 0), node("b", Some(40.0), 0)]);
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "b");
    }

    #[test]
    fn prefers_the_less_loaded_node_at_equal_speed() {
        let (_tx, r) = view(vec![node("a", Some(20.0), 3), node("b", Some(20.0), 1)]);
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "b");
    }

    #[test]
    fn a_fast_node_loses_when_its_queue_outweighs_its_speed() {
        // a: (5 + 1) / 40 = 0.15 s; b: (0 + 1) / 10 = 0.1 s.
        let (_tx, r) = view(vec![node("a", Some(40.0), 5), node("b", Some(10.0), 0)]);
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "b");
    }

    #[test]
    fn concurrent_requests_spread_in_proportion_to_speed() {
        // b is three times faster than a: a burst of held requests should land about 3:1, not
        // alternate (round-robin) and not pile onto b alone.
        let (_tx, r) = view(vec![node("a", Some(10.0), 0), node("b", Some(30.0), 0)]);
        let guards: Vec<RouteGuard> = (0..8).map(|_| r.pick(&m()).unwrap()).collect();
        let on_b = guards.iter().filter(|g| g.node.as_str() == "b").count();
        assert_eq!(
            on_b,
            6,
            "{:?}",
            guards.iter().map(|g| g.node.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(r.in_flight(&NodeId::new("a")), 2);
        drop(guards);
        assert_eq!(r.in_flight(&NodeId::new("a")), 0);
        assert_eq!(r.in_flight(&NodeId::new("b")), 0);
    }

    #[test]
    fn finished_requests_free_their_slot() {
        let (_tx, r) = view(vec![node("a", Some(10.0), 0), node("b", Some(10.0), 0)]);
        let first = r.pick(&m()).unwrap();
        assert_eq!(first.node.as_str(), "a"); // tie at equal speed: lower id
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "b"); // a is busy with `first`
        drop(first);
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "a");
    }

    #[test]
    fn unmeasured_nodes_rank_as_the_slowest_measured_one() {
        let (_tx, r) = view(vec![
            node("a", None, 0),
            node("b", Some(5.0), 0),
            node("c", Some(50.0), 0),
        ]);
        // c takes requests until ten are ahead of it (10 / 50 = 0.2 s, the idle score of a
        // 5 tok/s node); then b, measured, wins the tie against a, assumed.
        let picks: Vec<RouteGuard> = (0..12).map(|_| r.pick(&m()).unwrap()).collect();
        let order: Vec<&str> = picks.iter().map(|g| g.node.as_str()).collect();
        assert_eq!(order, [vec!["c"; 10], vec!["b", "a"]].concat());
    }

    #[test]
    fn a_queued_request_moves_only_to_a_replica_expected_in_under_half_the_time() {
        // a holds three requests, this one among them, b none, both at 20 tok/s: staying is
        // expected to take (3 + 1 - 1) / 20 = 0.15 s, b 1 / 20 = 0.05 s, under half of it.
        let (_tx, r) = view(vec![node("a", Some(20.0), 3), node("b", Some(20.0), 0)]);
        let (a, b) = (NodeId::new("a"), NodeId::new("b"));
        assert!(r.pick_sooner(&m(), &b, &[]).is_none());
        assert!(r.pick_sooner(&m(), &a, std::slice::from_ref(&b)).is_none());
        let moved = r.pick_sooner(&m(), &a, &[]).unwrap();
        assert_eq!(moved.node, b);
        // The move is counted on b at once: a second request deciding with it stays, as
        // (0 + 1 + 1) / 20 s is not under half of 0.15 s.
        assert_eq!(r.in_flight(&b), 1);
        assert!(r.pick_sooner(&m(), &a, &[]).is_none());
        drop(moved);
        assert_eq!(r.in_flight(&b), 0);
        // Two: 0.1 s against 0.05 s, not under half: it stays.
        let (_tx, r) = view(vec![node("a", Some(20.0), 2), node("b", Some(20.0), 0)]);
        assert!(r.pick_sooner(&m(), &a, &[]).is_none());
        // A node that is no candidate (unknown, excluded) stays where it is.
        assert!(r.pick_sooner(&m(), &NodeId::new("zz"), &[]).is_none());
        assert!(r.pick_sooner(&m(), &a, std::slice::from_ref(&a)).is_none());
    }

    #[test]
    fn a_preferred_replica_wins_unless_another_is_expected_in_half_the_time() {
        // Equally fast and busy: the preferred one, whatever the order of ids.
        let (_tx, r) = view(vec![node("a", Some(20.0), 1), node("b", Some(20.0), 1)]);
        let (a, b) = (NodeId::new("a"), NodeId::new("b"));
        assert_eq!(r.pick_preferring(&m(), &[], Some(&b)).unwrap().node, b);
        // One generation more than an idle replica as fast: (1 + 1) / 20 s is twice 1 / 20 s,
        // still the preferred one.
        let (_tx, r) = view(vec![node("a", Some(20.0), 1), node("b", Some(20.0), 0)]);
        assert_eq!(r.pick_preferring(&m(), &[], Some(&a)).unwrap().node, a);
        // Two more: the idle one, and the checkpoint is fetched.
        let (_tx, r) = view(vec![node("a", Some(20.0), 2), node("b", Some(20.0), 0)]);
        assert_eq!(r.pick_preferring(&m(), &[], Some(&a)).unwrap().node, b);
        let (_tx, r) = view(vec![node("a", Some(10.0), 5), node("b", Some(40.0), 0)]);
        assert_eq!(r.pick_preferring(&m(), &[], Some(&a)).unwrap().node, b);
        assert_eq!(
            r.pick_preferring(&m(), std::slice::from_ref(&a), Some(&a))
                .unwrap()
                .node
                .as_str(),
            "b"
        );
        // A preferred node that is not a candidate changes nothing.
        let gone = NodeId::new("zz");
        assert_eq!(
            r.pick_preferring(&m(), &[], Some(&gone))
                .unwrap()
                .node
                .as_str(),
            "b"
        );
    }

    #[test]
    fn the_checkpoint_peer_is_the_least_loaded_other_ready_replica() {
        let mut dead = node("d", Some(90.0), 0);
        dead.state = NodeState::Dead;
        let (_tx, r) = view(vec![
            node("a", Some(10.0), 0),
            node("b", Some(40.0), 3),
            node("c", Some(40.0), 1),
            dead,
        ]);
        let a = NodeId::new("a");
        let peer = r.checkpoint_peer(&m(), std::slice::from_ref(&a)).unwrap();
        assert_eq!(
            (peer.node.as_str(), peer.data_addr.as_str()),
            ("c", "c:7000")
        );
        // Requests this gateway sent count as load too.
        let _held: Vec<RouteGuard> = (0..3)
            .map(|_| {
                r.pick_preferring(&m(), &[], Some(&NodeId::new("c")))
                    .unwrap()
            })
            .collect();
        assert_eq!(
            r.checkpoint_peer(&m(), std::slice::from_ref(&a))
                .unwrap()
                .node
                .as_str(),
            "b"
        );
        let all = [a, NodeId::new("b"), NodeId::new("c")];
        assert!(r.checkpoint_peer(&m(), &all).is_none());
    }

    #[test]
    fn skips_draining_dead_and_unready_replicas() {
        let mut draining = node("a", Some(100.0), 0);
        draining.state = NodeState::Draining;
        let mut dead = node("b", Some(100.0), 0);
        dead.state = NodeState::Dead;
        let mut loading = node("c", Some(100.0), 0);
        loading.shards[0].state = ShardState::Loading;
        let (tx, r) = view(vec![draining, dead, loading, node("d", Some(1.0), 0)]);
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "d");

        // With d gone too, the model is known but unavailable.
        tx.send_modify(|v| {
            let v = Arc::make_mut(v);
            if let Some(d) = v.nodes.get_mut(&NodeId::new("d")) {
                d.state = NodeState::Dead;
            }
        });
        let err = r.pick(&m()).unwrap_err();
        assert_eq!(
            err,
            RouteError::NoReadyReplica {
                model: m(),
                assigned: 4
            }
        );
        assert_eq!(err.class(), ErrorClass::Unavailable);
    }

    #[test]
    fn an_unknown_model_is_not_found() {
        let (_tx, r) = view(vec![node("a", Some(10.0), 0)]);
        let err = r.pick(&ModelId::new("nope")).unwrap_err();
        assert_eq!(err.class(), ErrorClass::NotFound);
        assert_eq!(err.reason(), "model_not_found");
    }

    // ---- pipelines ----

    fn range(a: u32, b: u32) -> LayerRange {
        LayerRange::new(a, b).unwrap()
    }

    /// A node measured at `layer_ms` per layer that reports `ready` ranges of the model.
    fn stage_node(id: &str, layer_ms: f64, load: u32, ready: &[LayerRange]) -> NodeView {
        let mut n = node(id, Some(1e3 / (4.0 * layer_ms)), load);
        n.capability.speeds[0].layer_decode_seconds = layer_ms / 1e3;
        n.shards = ready
            .iter()
            .map(|r| ShardReport {
                model: m(),
                sha256: String::new(),
                layers: *r,
                plan_epoch: 1,
                state: ShardState::Ready,
                detail: String::new(),
            })
            .collect();
        n
    }

    fn assign(node: &str, layers: LayerRange, pipeline: u32) -> Assignment {
        Assignment {
            node: NodeId::new(node),
            model: m(),
            layers,
            pipeline,
        }
    }

    /// Pipeline 0 over a [0, 2) and b [2, 4), whole replica 1 on c.
    fn pipeline_and_whole(
        a: NodeView,
        b: NodeView,
        c: NodeView,
    ) -> (watch::Sender<Arc<ClusterView>>, Router) {
        view_plan(
            vec![a, b, c],
            // Listed out of order: the router orders stages by layer.
            vec![
                assign("b", range(2, 4), 0),
                assign("c", full(), 1),
                assign("a", range(0, 2), 0),
            ],
        )
    }

    #[test]
    fn a_pipeline_is_routed_through_its_stages_in_layer_order() {
        let (_tx, r) = pipeline_and_whole(
            stage_node("a", 5.0, 0, &[range(0, 2)]),
            stage_node("b", 5.0, 0, &[range(2, 4)]),
            stage_node("c", 50.0, 0, &[full()]),
        );
        let g = r.pick(&m()).unwrap();
        assert!(g.is_pipeline());
        assert_eq!(g.pipeline, 0);
        assert_eq!(
            (g.node.as_str(), g.data_addr.as_str(), g.layers),
            ("a", "a:7000", range(0, 2))
        );
        let stages: Vec<(&str, &str, LayerRange)> = g
            .stages
            .iter()
            .map(|s| (s.node.as_str(), s.data_addr.as_str(), s.layers))
            .collect();
        assert_eq!(
            stages,
            [("a", "a:7000", range(0, 2)), ("b", "b:7000", range(2, 4))]
        );
        // The request counts on every stage's node, and stops counting when it ends.
        assert_eq!(r.in_flight(&NodeId::new("a")), 1);
        assert_eq!(r.in_flight(&NodeId::new("b")), 1);
        assert_eq!(r.in_flight(&NodeId::new("c")), 0);
        drop(g);
        assert_eq!(r.in_flight(&NodeId::new("a")), 0);
        assert_eq!(r.in_flight(&NodeId::new("b")), 0);
    }

    #[test]
    fn a_stage_checkpoint_peer_runs_the_same_layers_else_is_off_the_route() {
        // Pipelines a [0, 2) -> b [2, 4) and d [0, 2) -> e [2, 4); c runs the whole model.
        let (_tx, r) = view_plan(
            vec![
                stage_node("a", 5.0, 0, &[range(0, 2)]),
                stage_node("b", 5.0, 0, &[range(2, 4)]),
                stage_node("c", 50.0, 0, &[full()]),
                stage_node("d", 5.0, 0, &[range(0, 2)]),
                stage_node("e", 5.0, 4, &[range(2, 4)]),
            ],
            vec![
                assign("a", range(0, 2), 0),
                assign("b", range(2, 4), 0),
                assign("c", full(), 1),
                assign("d", range(0, 2), 2),
                assign("e", range(2, 4), 2),
            ],
        );
        let ids = |v: &[&str]| v.iter().map(|n| NodeId::new(*n)).collect::<Vec<_>>();
        let route = ids(&["a", "b"]);
        let peer = |layers, exclude: &[&str]| {
            r.stage_checkpoint_peer(&m(), layers, &route, &ids(exclude))
                .map(|p| (p.node.to_string(), p.layers))
        };
        // The other pipeline's stage of the same layers, even loaded.
        assert_eq!(peer(range(2, 4), &["b"]), Some(("e".into(), range(2, 4))));
        assert_eq!(peer(range(0, 2), &["a"]), Some(("d".into(), range(0, 2))));
        // Without it: the least loaded node off the route (d idle, c idle: by id).
        assert_eq!(
            peer(range(2, 4), &["b", "e"]),
            Some(("c".into(), range(2, 4)))
        );
        // Only the route is left: a node on it.
        assert_eq!(
            peer(range(2, 4), &["b", "c", "d", "e"]),
            Some(("a".into(), range(2, 4)))
        );
        assert_eq!(peer(range(2, 4), &["a", "b", "c", "d", "e"]), None);
    }

    #[test]
    fn a_whole_replica_is_one_stage_naming_the_node() {
        let (_tx, r) = view(vec![node("a", Some(10.0), 0)]);
        let g = r.pick(&m()).unwrap();
        assert!(!g.is_pipeline());
        assert_eq!(
            g.stages,
            [RouteStage {
                node: NodeId::new("a"),
                data_addr: "a:7000".into(),
                layers: full(),
            }]
        );
    }

    #[test]
    fn a_pipeline_with_a_stage_not_ready_or_not_alive_is_skipped() {
        let (tx, r) = pipeline_and_whole(
            stage_node("a", 1.0, 0, &[range(0, 2)]),
            stage_node("b", 1.0, 0, &[]), // still loading its range
            stage_node("c", 50.0, 0, &[full()]),
        );
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "c");

        // Ready now, but reporting a different range than the plan's: still skipped.
        tx.send_modify(|v| {
            let v = Arc::make_mut(v);
            if let Some(b) = v.nodes.get_mut(&NodeId::new("b")) {
                *b = stage_node("b", 1.0, 0, &[range(1, 4)]);
            }
        });
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "c");

        tx.send_modify(|v| {
            let v = Arc::make_mut(v);
            if let Some(b) = v.nodes.get_mut(&NodeId::new("b")) {
                *b = stage_node("b", 1.0, 0, &[range(2, 4)]);
            }
        });
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "a");

        for state in [NodeState::Draining, NodeState::Dead] {
            tx.send_modify(|v| {
                let v = Arc::make_mut(v);
                if let Some(b) = v.nodes.get_mut(&NodeId::new("b")) {
                    b.state = state;
                }
            });
            assert_eq!(r.pick(&m()).unwrap().node.as_str(), "c", "{state:?}");
        }
    }

    #[test]
    fn an_incomplete_pipeline_is_never_picked() {
        // Pipeline 0 lacks [2, 4) in the plan; pipeline 1 has a gap ([0, 1) then [2, 4)).
        let (_tx, r) = view_plan(
            vec![
                stage_node("a", 1.0, 0, &[range(0, 2)]),
                stage_node("b", 1.0, 0, &[range(0, 1)]),
                stage_node("c", 1.0, 0, &[range(2, 4)]),
            ],
            vec![
                assign("a", range(0, 2), 0),
                assign("b", range(0, 1), 1),
                assign("c", range(2, 4), 1),
            ],
        );
        let err = r.pick(&m()).unwrap_err();
        assert!(matches!(err, RouteError::NoReadyReplica { .. }), "{err:?}");
    }

    #[test]
    fn pipelines_and_whole_replicas_compete_on_expected_latency() {
        // The pipeline: 2 × 10 ms on a, then 2 × 10 ms on b = 40 ms per token; c: 20 tok/s,
        // 50 ms per token. Idle, the pipeline wins.
        let (tx, r) = pipeline_and_whole(
            stage_node("a", 10.0, 0, &[range(0, 2)]),
            stage_node("b", 10.0, 0, &[range(2, 4)]),
            node("c", Some(20.0), 0),
        );
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "a");
        // One request queued on b: 20 ms + 2 × 20 ms = 60 ms against c's 50 ms.
        tx.send_modify(|v| {
            let v = Arc::make_mut(v);
            if let Some(b) = v.nodes.get_mut(&NodeId::new("b")) {
                b.load.queue_depth = 1;
            }
        });
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "c");
    }

    #[test]
    fn concurrent_requests_spread_between_a_pipeline_and_a_whole_replica() {
        // Both take 40 ms per token when idle; each held request adds its share.
        let (_tx, r) = pipeline_and_whole(
            stage_node("a", 10.0, 0, &[range(0, 2)]),
            stage_node("b", 10.0, 0, &[range(2, 4)]),
            node("c", Some(25.0), 0),
        );
        let guards: Vec<RouteGuard> = (0..4).map(|_| r.pick(&m()).unwrap()).collect();
        let heads: Vec<&str> = guards.iter().map(|g| g.node.as_str()).collect();
        assert_eq!(heads, ["a", "c", "a", "c"]);
        assert_eq!(r.in_flight(&NodeId::new("b")), 2);
        drop(guards);
        assert_eq!(r.in_flight(&NodeId::new("b")), 0);
    }

    #[test]
    fn excluding_one_stage_node_excludes_its_whole_pipeline() {
        let (_tx, r) = pipeline_and_whole(
            stage_node("a", 1.0, 0, &[range(0, 2)]),
            stage_node("b", 1.0, 0, &[range(2, 4)]),
            node("c", Some(1.0), 0),
        );
        assert_eq!(r.pick(&m()).unwrap().node.as_str(), "a");
        let g = r.pick_excluding(&m(), &[NodeId::new("b")]).unwrap();
        assert_eq!(g.node.as_str(), "c");
    }

    #[test]
    fn whole_replicas_of_a_plan_without_ids_are_still_separate_replicas() {
        // Plans written before replica ids existed read every assignment as id 0.
        let (_tx, r) = view_plan(
            vec![node("a", Some(10.0), 0), node("b", Some(10.0), 0)],
            vec![assign("a", full(), 0), assign("b", full(), 0)],
        );
        let first = r.pick(&m()).unwrap();
        let second = r.pick(&m()).unwrap();
        assert_eq!((first.node.as_str(), second.node.as_str()), ("a", "b"));
        assert_eq!(first.stages.len(), 1);
    }
}
