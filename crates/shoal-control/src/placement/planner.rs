//! The v1 planner: whole-model replicas, greedy in rounds.
//!
//! Each round gives every model that is still below its replica target one more replica, on
//! the best eligible node that still has room. Rounds repeat until no model can grow, so
//! scarce memory is shared across models (every model gets its first replica before any gets
//! a second) and the result is maximal: no eligible node is left with room for a model that
//! is short of replicas.
//!
//! Order, which decides who wins contended memory, is fixed and input-order independent:
//! pinned models first (they have the fewest choices), then larger models (they are the
//! hardest to fit), then by id. Among nodes: one that already holds the model in the previous
//! plan (no churn), one with the file on disk, the faster, the one with more room left, then
//! by id.

use super::{
    Assignment, Exclusion, ModelOutcome, ModelSpec, NodeHealth, NodeInput, Placement,
    PlacementInput, Plan,
};
use shoal_types::{ModelId, NodeId};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// Computes the plan for `input`. Pure: no clock, no I/O, and the same input (in any order of
/// its models and nodes) gives the same result.
pub fn place(input: &PlacementInput) -> Placement {
    let nodes = unique_nodes(&input.nodes);
    let models = unique_models(&input.models);
    let kv_tokens = input.policy.kv_reserve_tokens;
    let target = input.policy.replicas.unwrap_or(usize::MAX);

    let previous: BTreeSet<(&NodeId, &ModelId)> = input
        .previous
        .iter()
        .flat_map(|p| p.assignments.iter().map(|a| (&a.node, &a.model)))
        .collect();

    let need = |m: &ModelSpec| m.full_range().map(|r| m.need_bytes(r, kv_tokens));
    let allowed = |m: &ModelSpec, n: &NodeInput| {
        n.health == NodeHealth::Alive
            && input
                .pins
                .get(&m.id)
                .is_none_or(|pins| pins.contains(&n.id))
    };

    let mut order: Vec<&ModelSpec> = models
        .values()
        .copied()
        .filter(|m| m.full_range().is_some())
        .collect();
    order.sort_by(|a, b| {
        let pinned = |m: &ModelSpec| input.pins.contains_key(&m.id);
        pinned(b)
            .cmp(&pinned(a))
            .then_with(|| need(b).cmp(&need(a)))
            .then_with(|| a.id.cmp(&b.id))
    });

    let mut free: BTreeMap<&NodeId, u64> =
        nodes.values().map(|n| (&n.id, n.memory_bytes)).collect();
    let mut placed: BTreeMap<&ModelId, BTreeSet<&NodeId>> = BTreeMap::new();

    loop {
        let mut progress = false;
        for m in &order {
            let Some(need_m) = need(m) else { continue };
            let holders = placed.entry(&m.id).or_default();
            if holders.len() >= target {
                continue;
            }
            let best = nodes
                .values()
                .filter(|n| allowed(m, n) && !holders.contains(&n.id))
                .filter(|n| free.get(&n.id).is_some_and(|f| *f >= need_m))
                .min_by(|a, b| prefer(a, b, m, &previous, &free));
            if let Some(n) = best {
                holders.insert(&n.id);
                if let Some(f) = free.get_mut(&n.id) {
                    *f -= need_m;
                }
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }

    let mut assignments = Vec::new();
    for (model, holders) in &placed {
        let Some(spec) = models.get(model) else {
            continue;
        };
        let Some(layers) = spec.full_range() else {
            continue;
        };
        for node in holders {
            assignments.push(Assignment {
                node: (*node).clone(),
                model: (*model).clone(),
                layers,
            });
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
            models
                .get(&m.id)
                .is_some_and(|kept| std::ptr::eq(*kept, *m))
        })
        .map(|m| {
            let holders = placed.get(&m.id);
            let need_m = need(m).unwrap_or(0);
            let excluded = nodes
                .values()
                .filter(|n| !holders.is_some_and(|h| h.contains(&n.id)))
                .map(|n| {
                    let why = match n.health {
                        NodeHealth::Dead => Exclusion::Dead,
                        NodeHealth::Draining => Exclusion::Draining,
                        NodeHealth::Alive if !allowed(m, n) => Exclusion::NotPinned,
                        NodeHealth::Alive if n.memory_bytes < need_m => {
                            Exclusion::NotEnoughMemory {
                                need: need_m,
                                capacity: n.memory_bytes,
                            }
                        }
                        NodeHealth::Alive if holders.is_some_and(|h| h.len() >= target) => {
                            Exclusion::ReplicaLimit { replicas: target }
                        }
                        NodeHealth::Alive => Exclusion::MemoryTaken {
                            need: need_m,
                            free: free.get(&n.id).copied().unwrap_or(0),
                        },
                    };
                    (n.id.clone(), why)
                })
                .collect();
            let unknown_pins = input
                .pins
                .get(&m.id)
                .map(|pins| {
                    pins.iter()
                        .filter(|p| !nodes.contains_key(p))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            ModelOutcome {
                model: m.id.clone(),
                need_bytes: need_m,
                placed_on: holders
                    .map(|h| h.iter().map(|n| (*n).clone()).collect())
                    .unwrap_or_default(),
                excluded,
                unknown_pins,
                invalid: m.full_range().is_none(),
            }
        })
        .collect();

    Placement {
        plan: Plan { epoch, assignments },
        outcomes,
    }
}

/// Orders candidate nodes for one replica of `m`: `Less` means `a` is preferred.
fn prefer(
    a: &NodeInput,
    b: &NodeInput,
    m: &ModelSpec,
    previous: &BTreeSet<(&NodeId, &ModelId)>,
    free: &BTreeMap<&NodeId, u64>,
) -> Ordering {
    let held = |n: &NodeInput| previous.contains(&(&n.id, &m.id));
    let local = |n: &NodeInput| n.local_models.contains(&m.id);
    let room = |n: &NodeInput| free.get(&n.id).copied().unwrap_or(0);
    held(b)
        .cmp(&held(a))
        .then_with(|| local(b).cmp(&local(a)))
        .then_with(|| b.speed(&m.id).total_cmp(&a.speed(&m.id)))
        .then_with(|| room(b).cmp(&room(a)))
        .then_with(|| a.id.cmp(&b.id))
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
