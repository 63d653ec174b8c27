//! The planner: whole replicas and pipelines, greedy in rounds.
//!
//! Each round gives every model that is still below its replica target one more replica, on
//! the best eligible node (or set of nodes) that still has room. Rounds repeat until no model
//! can grow, so scarce memory is shared across models (every model gets its first replica
//! before any gets a second) and the result is maximal: no eligible node is left with room for
//! a whole replica of a model that is short of replicas.
//!
//! One more replica of a model is, by [`PlacementMode`]: `Replicate`, a whole replica; `Auto`,
//! a whole replica, or a pipeline when no usable node has room for the whole model; `Shard`, a
//! pipeline, or a whole replica when no pipeline fits. A pipeline of the plan in force is kept
//! as it is while all its nodes are usable and its stages still fit (no churn); otherwise the
//! search ([`super::search`]) finds the fastest one.
//!
//! Order, which decides who wins contended memory, is fixed and input-order independent:
//! pinned models first (they have the fewest choices), then larger models (they are the
//! hardest to fit), then by id. Among nodes for a whole replica: one that already holds the
//! model in the previous plan (no churn), one with the file on disk, the faster, the one with
//! more room left, then by id.

use super::search::{self, Cand, Found, NOMINAL_LAYER_SECONDS};
use super::{
    Alternative, Assignment, Exclusion, ModelOutcome, ModelSpec, NodeHealth, NodeInput, Placement,
    PlacementInput, PlacementMode, Plan, StageChoice, Verdict,
};
use shoal_types::{LayerRange, ModelId, NodeId};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// One replica chosen for a model.
#[derive(Debug, Clone)]
struct Replica {
    found: Found,
    /// Its id in the previous plan, when it is kept from there.
    previous_id: Option<u32>,
    id: u32,
}

/// What the planner tracks per model while it plans.
#[derive(Debug, Default)]
struct ModelState<'a> {
    replicas: Vec<Replica>,
    serving: BTreeSet<&'a NodeId>,
    /// The alternatives seen at the model's first step.
    first_look: Vec<Found>,
    /// A step found nothing: memory only shrinks, so later steps would not either.
    exhausted: bool,
}

/// Computes the plan for `input`. Pure: no clock, no I/O, and the same input (in any order of
/// its models and nodes) gives the same result.
pub fn place(input: &PlacementInput) -> Placement {
    let cx = Context::new(input);
    let target = input.policy.replicas.unwrap_or(usize::MAX);

    let mut order: Vec<&ModelSpec> = cx
        .models
        .values()
        .copied()
        .filter(|m| m.full_range().is_some())
        .collect();
    order.sort_by(|a, b| {
        let pinned = |m: &ModelSpec| input.pins.contains_key(&m.id);
        pinned(b)
            .cmp(&pinned(a))
            .then_with(|| cx.need(b).cmp(&cx.need(a)))
            .then_with(|| a.id.cmp(&b.id))
    });

    let mut free: BTreeMap<&NodeId, u64> =
        cx.nodes.values().map(|n| (&n.id, n.memory_bytes)).collect();
    let mut states: BTreeMap<&ModelId, ModelState<'_>> = BTreeMap::new();

    loop {
        let mut progress = false;
        for m in &order {
            let st = states.entry(&m.id).or_default();
            if st.exhausted || st.replicas.len() >= target {
                continue;
            }
            let Some(replica) = cx.step(m, st, &free) else {
                st.exhausted = true;
                continue;
            };
            for s in &replica.found.stages {
                let Some(node) = cx.nodes.get(&s.node) else {
                    continue;
                };
                if let Some(f) = free.get_mut(&node.id) {
                    *f = f.saturating_sub(m.need_bytes(s.layers, cx.kv_tokens));
                }
                st.serving.insert(&node.id);
            }
            st.replicas.push(replica);
            progress = true;
        }
        if !progress {
            break;
        }
    }

    let mut assignments = Vec::new();
    for (model, st) in &mut states {
        number_replicas(&mut st.replicas);
        for r in &st.replicas {
            for s in &r.found.stages {
                assignments.push(Assignment {
                    node: s.node.clone(),
                    model: (*model).clone(),
                    layers: s.layers,
                    pipeline: r.id,
                });
            }
        }
    }
    assignments.sort();

    let epoch = match &input.previous {
        None => 1,
        Some(p) if sorted(&p.assignments) == assignments => p.epoch,
        Some(p) => p.epoch.saturating_add(1),
    };

    let outcomes = input
        .models
        .iter()
        .filter(|m| {
            cx.models
                .get(&m.id)
                .is_some_and(|kept| std::ptr::eq(*kept, *m))
        })
        .map(|m| cx.outcome(m, states.get(&m.id), &free, target))
        .collect();

    Placement {
        plan: Plan { epoch, assignments },
        outcomes,
    }
}

/// Gives kept replicas their previous id (the first to claim one wins) and new ones the
/// smallest ids left, in the order they were chosen.
fn number_replicas(replicas: &mut [Replica]) {
    let mut used = BTreeSet::new();
    let mut fresh = Vec::new();
    for (i, r) in replicas.iter_mut().enumerate() {
        match r.previous_id {
            Some(id) if used.insert(id) => r.id = id,
            _ => fresh.push(i),
        }
    }
    let mut next = 0u32;
    for i in fresh {
        while used.contains(&next) {
            next = next.saturating_add(1);
        }
        used.insert(next);
        if let Some(r) = replicas.get_mut(i) {
            r.id = next;
        }
    }
}

/// The planner's read-only view of its input.
struct Context<'a> {
    input: &'a PlacementInput,
    nodes: BTreeMap<&'a NodeId, &'a NodeInput>,
    models: BTreeMap<&'a ModelId, &'a ModelSpec>,
    kv_tokens: u32,
    mode: PlacementMode,
    /// Whole-model assignments of the previous plan: (node, model) → replica id.
    previous_whole: BTreeMap<(&'a NodeId, &'a ModelId), u32>,
    /// Complete pipelines of the previous plan, per model, by id.
    previous_chains: BTreeMap<&'a ModelId, Vec<(u32, Vec<StageChoice>)>>,
}

impl<'a> Context<'a> {
    fn new(input: &'a PlacementInput) -> Self {
        let models = unique_models(&input.models);
        let mut previous_whole = BTreeMap::new();
        let mut previous_chains: BTreeMap<&ModelId, Vec<(u32, Vec<StageChoice>)>> = BTreeMap::new();
        if let Some(plan) = &input.previous {
            for (id, spec) in &models {
                for chain in plan.chains(id) {
                    if !chain.is_complete(spec.n_layers) {
                        continue;
                    }
                    if let [whole] = chain.stages.as_slice() {
                        previous_whole
                            .entry((&whole.node, &whole.model))
                            .or_insert(chain.id);
                    } else {
                        let stages = chain
                            .stages
                            .iter()
                            .map(|a| StageChoice {
                                node: a.node.clone(),
                                layers: a.layers,
                            })
                            .collect();
                        previous_chains
                            .entry(*id)
                            .or_default()
                            .push((chain.id, stages));
                    }
                }
            }
        }
        Self {
            input,
            nodes: unique_nodes(&input.nodes),
            models,
            kv_tokens: input.policy.kv_reserve_tokens,
            mode: input.policy.mode,
            previous_whole,
            previous_chains,
        }
    }

    /// Bytes a whole replica of `m` needs, `None` for a spec without layers.
    fn need(&self, m: &ModelSpec) -> Option<u64> {
        m.full_range().map(|r| m.need_bytes(r, self.kv_tokens))
    }

    fn allowed(&self, m: &ModelSpec, n: &NodeInput) -> bool {
        n.health == NodeHealth::Alive
            && !n.other_versions.contains(&m.id)
            && self
                .input
                .pins
                .get(&m.id)
                .is_none_or(|pins| pins.contains(&n.id))
    }

    /// Per-layer and head seconds assumed for nodes that have not measured `m`: those of the
    /// slowest alive node that has, or a nominal figure.
    fn fallback_cost(&self, m: &ModelSpec) -> (f64, f64) {
        let measured = self
            .nodes
            .values()
            .filter(|n| n.health == NodeHealth::Alive)
            .filter_map(|n| n.layer_cost(&m.id, m.n_layers));
        let mut worst: Option<(f64, f64)> = None;
        for (l, h) in measured {
            worst = Some(match worst {
                None => (l, h),
                Some((wl, wh)) => (wl.max(l), wh.max(h)),
            });
        }
        worst.unwrap_or((NOMINAL_LAYER_SECONDS, 0.0))
    }

    /// The nodes that could take a new replica (or stage) of `m` now.
    fn candidates(
        &self,
        m: &ModelSpec,
        st: &ModelState<'_>,
        free: &BTreeMap<&NodeId, u64>,
    ) -> Vec<Cand<'a>> {
        let fallback = self.fallback_cost(m);
        self.nodes
            .values()
            .filter(|n| self.allowed(m, n) && !st.serving.contains(&n.id))
            .map(|n| {
                let measured = n.layer_cost(&m.id, m.n_layers);
                let (layer_s, head_s) = measured.unwrap_or(fallback);
                Cand {
                    id: &n.id,
                    layer_s,
                    head_s,
                    latency: n.link_latency(),
                    free: free.get(&n.id).copied().unwrap_or(0),
                    measured: measured.is_some(),
                }
            })
            .collect()
    }

    /// One more replica of `m`, or `None` when none fits.
    fn step(
        &self,
        m: &ModelSpec,
        st: &mut ModelState<'_>,
        free: &BTreeMap<&NodeId, u64>,
    ) -> Option<Replica> {
        let cands = self.candidates(m, st, free);
        let need = self.need(m)?;
        let mut pipelines = None;
        if st.replicas.is_empty() && st.first_look.is_empty() {
            // The first step records what could be done, for the explanation.
            let mut look: Vec<Found> = cands
                .iter()
                .filter(|c| c.free >= need)
                .filter_map(|c| whole(m, c))
                .collect();
            let limit = self.mode.stage_limit().unwrap_or(super::AUTO_MAX_STAGES);
            let found = search::best_by_stage_count(m, self.kv_tokens, &cands, limit);
            look.extend(found.iter().cloned());
            st.first_look = look;
            pipelines = Some(found);
        }
        let whole_replica = || self.whole_replica(m, &cands, need);
        let pipeline = |pipelines: Option<Vec<Found>>| {
            self.kept_pipeline(m, st, free)
                .or_else(|| self.new_pipeline(m, &cands, pipelines))
        };
        match self.mode {
            PlacementMode::Replicate => whole_replica(),
            PlacementMode::Auto => whole_replica().or_else(|| pipeline(pipelines)),
            PlacementMode::Shard { .. } => pipeline(pipelines).or_else(whole_replica),
        }
    }

    /// The best node for a whole replica (see the module docs for the order).
    fn whole_replica(&self, m: &ModelSpec, cands: &[Cand<'_>], need: u64) -> Option<Replica> {
        let best = cands
            .iter()
            .filter(|c| c.free >= need)
            .min_by(|a, b| self.prefer(a, b, m))?;
        Some(Replica {
            found: whole(m, best)?,
            previous_id: self.previous_whole.get(&(best.id, &m.id)).copied(),
            id: 0,
        })
    }

    /// Orders candidate nodes for a whole replica of `m`: `Less` means `a` is preferred.
    fn prefer(&self, a: &Cand<'_>, b: &Cand<'_>, m: &ModelSpec) -> Ordering {
        let held = |c: &Cand<'_>| self.previous_whole.contains_key(&(c.id, &m.id));
        let local = |c: &Cand<'_>| {
            self.nodes
                .get(c.id)
                .is_some_and(|n| n.local_models.contains(&m.id))
        };
        // Predicted whole-model tokens/s, 0 for a node that has not measured the model.
        let speed = |c: &Cand<'_>| {
            if c.measured {
                1.0 / (f64::from(m.n_layers) * c.layer_s + c.head_s)
            } else {
                0.0
            }
        };
        held(b)
            .cmp(&held(a))
            .then_with(|| local(b).cmp(&local(a)))
            .then_with(|| speed(b).total_cmp(&speed(a)))
            .then_with(|| b.free.cmp(&a.free))
            .then_with(|| a.id.cmp(b.id))
    }

    /// A pipeline of the previous plan, unchanged, if all its nodes can still hold their
    /// stages and the mode still allows that many stages.
    fn kept_pipeline(
        &self,
        m: &ModelSpec,
        st: &ModelState<'_>,
        free: &BTreeMap<&NodeId, u64>,
    ) -> Option<Replica> {
        let limit = usize::try_from(self.mode.stage_limit()?).unwrap_or(usize::MAX);
        let taken: BTreeSet<u32> = st.replicas.iter().filter_map(|r| r.previous_id).collect();
        let chains = self.previous_chains.get(&m.id)?;
        let cands = self.candidates(m, st, free);
        chains.iter().find_map(|(id, stages)| {
            if taken.contains(id) || stages.len() > limit {
                return None;
            }
            let mut costed = Vec::with_capacity(stages.len());
            let mut nodes = BTreeSet::new();
            for s in stages {
                let c = cands.iter().find(|c| c.id == &s.node)?;
                if !nodes.insert(c.id) || c.free < m.need_bytes(s.layers, self.kv_tokens) {
                    return None;
                }
                costed.push((c, s.layers.len()));
            }
            Some(Replica {
                found: Found {
                    stages: stages.clone(),
                    prediction: search::predict(&costed),
                },
                previous_id: Some(*id),
                id: 0,
            })
        })
    }

    /// The fastest new pipeline (fewer stages on a tie), reusing the first step's search.
    fn new_pipeline(
        &self,
        m: &ModelSpec,
        cands: &[Cand<'_>],
        searched: Option<Vec<Found>>,
    ) -> Option<Replica> {
        let limit = self.mode.stage_limit()?;
        let found = searched
            .unwrap_or_else(|| search::best_by_stage_count(m, self.kv_tokens, cands, limit));
        let best = found.into_iter().min_by(|a, b| {
            b.prediction
                .tokens_per_second
                .total_cmp(&a.prediction.tokens_per_second)
                .then_with(|| a.stages.len().cmp(&b.stages.len()))
        })?;
        Some(Replica {
            found: best,
            previous_id: None,
            id: 0,
        })
    }

    fn outcome(
        &self,
        m: &ModelSpec,
        st: Option<&ModelState<'_>>,
        free: &BTreeMap<&NodeId, u64>,
        target: usize,
    ) -> ModelOutcome {
        let need = self.need(m).unwrap_or(0);
        let replicas: &[Replica] = st.map(|s| s.replicas.as_slice()).unwrap_or(&[]);
        let serving: BTreeSet<&NodeId> = replicas
            .iter()
            .flat_map(|r| r.found.stages.iter().map(|s| &s.node))
            .collect();
        let piped = replicas.iter().any(|r| r.found.stages.len() > 1);
        let sharding = matches!(self.mode, PlacementMode::Shard { .. });
        let excluded = self
            .nodes
            .values()
            .filter(|n| !serving.contains(&n.id))
            .map(|n| {
                let why = match n.health {
                    NodeHealth::Dead => Exclusion::Dead,
                    NodeHealth::Draining => Exclusion::Draining,
                    NodeHealth::Alive if n.other_versions.contains(&m.id) => {
                        Exclusion::OtherVersion
                    }
                    NodeHealth::Alive if !self.allowed(m, n) => Exclusion::NotPinned,
                    NodeHealth::Alive if !piped && n.memory_bytes < need => {
                        Exclusion::NotEnoughMemory {
                            need,
                            capacity: n.memory_bytes,
                        }
                    }
                    NodeHealth::Alive if replicas.len() >= target => {
                        Exclusion::ReplicaLimit { replicas: target }
                    }
                    NodeHealth::Alive if piped && (n.memory_bytes < need || sharding) => {
                        Exclusion::NotInPipeline
                    }
                    NodeHealth::Alive => Exclusion::MemoryTaken {
                        need,
                        free: free.get(&n.id).copied().unwrap_or(0),
                    },
                };
                (n.id.clone(), why)
            })
            .collect();
        let unknown_pins = self
            .input
            .pins
            .get(&m.id)
            .map(|pins| {
                pins.iter()
                    .filter(|p| !self.nodes.contains_key(p))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let first_look: &[Found] = st.map(|s| s.first_look.as_slice()).unwrap_or(&[]);
        ModelOutcome {
            model: m.id.clone(),
            need_bytes: need,
            placed_on: serving.into_iter().cloned().collect(),
            excluded,
            unknown_pins,
            invalid: m.full_range().is_none(),
            alternatives: self.alternatives(first_look, replicas, target),
        }
    }

    /// The chosen replicas (by id), then what the first step saw that was not chosen, each
    /// with the reason.
    fn alternatives(
        &self,
        first_look: &[Found],
        replicas: &[Replica],
        target: usize,
    ) -> Vec<Alternative> {
        let mut chosen: Vec<&Replica> = replicas.iter().collect();
        chosen.sort_by_key(|r| r.id);
        let serving: BTreeSet<&NodeId> = replicas
            .iter()
            .flat_map(|r| r.found.stages.iter().map(|s| &s.node))
            .collect();
        let first = replicas.first();
        let any_whole = replicas.iter().any(|r| r.found.stages.len() == 1);
        let any_pipeline = replicas.iter().any(|r| r.found.stages.len() > 1);
        let mut out: Vec<Alternative> = chosen
            .iter()
            .map(|r| Alternative {
                stages: r.found.stages.clone(),
                prediction: r.found.prediction,
                verdict: Verdict::Chosen { pipeline: r.id },
            })
            .collect();
        for f in first_look {
            if replicas.iter().any(|r| r.found.stages == f.stages) {
                continue;
            }
            let busy = f.stages.iter().any(|s| serving.contains(&s.node));
            let verdict = if f.stages.len() == 1 {
                if matches!(self.mode, PlacementMode::Shard { .. }) && any_pipeline {
                    Verdict::ExcludedByPolicy
                } else if replicas.len() >= target {
                    Verdict::ReplicaLimit
                } else if busy {
                    Verdict::NodeBusy
                } else {
                    Verdict::MemoryTaken
                }
            } else if self.mode == PlacementMode::Replicate {
                Verdict::ExcludedByPolicy
            } else if self.mode == PlacementMode::Auto && any_whole {
                Verdict::WholeReplicaFits
            } else if first.is_some_and(|r| {
                r.found.prediction.tokens_per_second >= f.prediction.tokens_per_second
            }) {
                Verdict::NotFaster
            } else if first.is_some_and(|r| r.previous_id.is_some()) {
                Verdict::KeepsCurrent
            } else if replicas.len() >= target {
                Verdict::ReplicaLimit
            } else if busy {
                Verdict::NodeBusy
            } else {
                Verdict::MemoryTaken
            };
            out.push(Alternative {
                stages: f.stages.clone(),
                prediction: f.prediction,
                verdict,
            });
        }
        out
    }
}

/// A whole replica of `m` on `c`.
fn whole(m: &ModelSpec, c: &Cand<'_>) -> Option<Found> {
    let layers = LayerRange::full(m.n_layers).ok()?;
    Some(Found {
        stages: vec![StageChoice {
            node: c.id.clone(),
            layers,
        }],
        prediction: search::predict(&[(c, m.n_layers)]),
    })
}

/// Nodes by id; when an id repeats, the first occurrence wins (membership never repeats one,
/// but the planner must not depend on that).
fn unique_nodes(nodes: &[NodeInput]) -> BTreeMap<&NodeId, &NodeInput> {
    let mut out = BTreeMap::new();
    for n in nodes {
        out.entry(&n.id).or_insert(n);
    }
    out
}

/// Models by id; the first occurrence of a repeated id wins.
fn unique_models(models: &[ModelSpec]) -> BTreeMap<&ModelId, &ModelSpec> {
    let mut out = BTreeMap::new();
    for m in models {
        out.entry(&m.id).or_insert(m);
    }
    out
}

fn sorted(a: &[Assignment]) -> Vec<Assignment> {
    let mut v = a.to_vec();
    v.sort();
    v
}
