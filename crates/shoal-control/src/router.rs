//! Routing: which replica serves the next request for a model.
//!
//! The router picks the ready replica with the least expected latency, estimated as the work
//! ahead of the request divided by the node's measured speed:
//!
//! `(queued + active + in flight from this router + 1) / decode tokens per second`
//!
//! The `+ 1` is the request itself: without it every idle node would score zero and speed would
//! stop mattering exactly when the cluster is quiet. Heartbeats report queue and active counts
//! only every interval, so the router also counts the requests it sent and that have not
//! finished ([`RouteGuard`]); that is what spreads a burst of concurrent requests before the next
//! heartbeat shows it. Ties go to the faster node, then to the lower node id, so the choice is
//! deterministic.

use crate::membership::{ClusterView, NodeState};
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

/// The replica chosen for one request. Holding it counts the request as in flight to the node;
/// drop it when the request ends (finished, failed or cancelled).
#[derive(Debug)]
pub struct RouteGuard {
    /// The node to send the request to.
    pub node: NodeId,
    /// Its data-plane address.
    pub data_addr: String,
    /// The layers it serves (the whole model in v1).
    pub layers: LayerRange,
    /// The plan epoch the choice was made under.
    pub plan_epoch: u64,
    in_flight: InFlight,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.in_flight);
        if let Some(n) = map.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.node);
            }
        }
    }
}

struct Candidate<'a> {
    node: &'a NodeId,
    data_addr: &'a str,
    layers: LayerRange,
    work: u64,
    speed: Option<f64>,
}

impl Router {
    /// A router following the views published by membership.
    pub fn new(view: watch::Receiver<Arc<ClusterView>>) -> Self {
        Self {
            view,
            in_flight: Arc::default(),
        }
    }

    /// Requests this router has sent to `node` that have not ended.
    pub fn in_flight(&self, node: &NodeId) -> u64 {
        lock(&self.in_flight).get(node).copied().unwrap_or(0)
    }

    /// Chooses the replica for one request to `model`.
    pub fn pick(&self, model: &ModelId) -> Result<RouteGuard, RouteError> {
        self.pick_excluding(model, &[])
    }

    /// Like [`Router::pick`], never choosing a node in `exclude` (nodes a request already failed
    /// on, which the membership view may still show alive until their lease runs out).
    pub fn pick_excluding(
        &self,
        model: &ModelId,
        exclude: &[NodeId],
    ) -> Result<RouteGuard, RouteError> {
        let view = Arc::clone(&self.view.borrow());
        if !view.models.contains_key(model) {
            return Err(RouteError::UnknownModel {
                model: model.clone(),
            });
        }
        let mut in_flight = lock(&self.in_flight);
        let mut assigned = 0;
        let mut candidates = Vec::new();
        for a in view.plan.for_model(model) {
            assigned += 1;
            let Some(node) = view.nodes.get(&a.node) else {
                continue;
            };
            if node.state != NodeState::Alive
                || !node.is_ready(model, a.layers)
                || exclude.contains(&a.node)
            {
                continue;
            }
            let ours = in_flight.get(&a.node).copied().unwrap_or(0);
            candidates.push(Candidate {
                node: &node.id,
                data_addr: &node.data_addr,
                layers: a.layers,
                work: node.load.in_flight().saturating_add(ours).saturating_add(1),
                speed: node.capability.tokens_per_second(model),
            });
        }
        // A node that has not measured this model yet is assumed as slow as the slowest one
        // that has: it still gets work when the others are busy, never ahead of a known speed.
        let fallback = candidates
            .iter()
            .filter_map(|c| c.speed)
            .min_by(f64::total_cmp)
            .unwrap_or(1.0);
        let best = candidates.into_iter().min_by(|a, b| {
            let (sa, sb) = (a.speed.unwrap_or(fallback), b.speed.unwrap_or(fallback));
            // Work is a small integer count, exact in f64.
            let (wa, wb) = (a.work as f64 / sa, b.work as f64 / sb);
            wa.total_cmp(&wb)
                .then_with(|| sb.total_cmp(&sa))
                .then_with(|| b.speed.is_some().cmp(&a.speed.is_some()))
                .then_with(|| a.node.cmp(b.node))
        });
        let Some(best) = best else {
            return Err(RouteError::NoReadyReplica {
                model: model.clone(),
                assigned,
            });
        };
        *in_flight.entry(best.node.clone()).or_insert(0) += 1;
        Ok(RouteGuard {
            node: best.node.clone(),
            data_addr: best.data_addr.to_owned(),
            layers: best.layers,
            plan_epoch: view.plan.epoch,
            in_flight: Arc::clone(&self.in_flight),
        })
    }
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
        let plan = Plan {
            epoch: 1,
            assignments: nodes
                .iter()
                .map(|n| Assignment {
                    node: n.id.clone(),
                    model: ModelId::new(M),
                    layers: full(),
                })
                .collect(),
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
}
