//! Costing replicas and searching for the fastest pipeline of each stage count.
//!
//! A pipeline's single-stream decode time per token is linear in the layers each stage holds
//! (`Σ layers × layer seconds`), plus the head on the last stage and the hops there and back
//! (each link twice; see [`Prediction`]). For a fixed set of nodes and a fixed choice
//! of which two hold the ends (the ends carry the embeddings and the head, so they have room
//! for fewer layers), the best split gives every stage one layer and then the rest to the
//! fastest stages first, each up to what its free memory holds: greedy is optimal for a
//! linear cost under per-stage bounds. The search tries every set of up to
//! [`MAX_CANDIDATES`] nodes and every pair of ends, so comparing the best `k`-stage pipeline
//! with the best `k+1`-stage one is what leaves out a node whose share would cost more (its
//! slowness, its latency) than it saves.

use super::{LayerRange, ModelSpec, NodeId, Prediction, StageChoice};
use std::cmp::Ordering;

/// Nodes the search looks at for one pipeline: the fastest ones (then lowest latency, then
/// most free memory, then id). Bounds the search at `2^12` node sets.
pub(super) const MAX_CANDIDATES: usize = 12;

/// Per-layer seconds assumed when no node has measured a model.
pub(super) const NOMINAL_LAYER_SECONDS: f64 = 0.01;

/// A node that could take a stage (or a whole replica) of one model.
#[derive(Debug, Clone)]
pub(super) struct Cand<'a> {
    pub id: &'a NodeId,
    /// Seconds per layer per token.
    pub layer_s: f64,
    /// Seconds of the output head per token.
    pub head_s: f64,
    /// One-way link latency.
    pub latency: f64,
    /// Bytes free on the node now.
    pub free: u64,
    /// Whether `layer_s`/`head_s` were measured rather than assumed.
    pub measured: bool,
}

/// A replica found by the search (or costed for comparison).
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub stages: Vec<StageChoice>,
    pub prediction: Prediction,
}

/// Predicts the single-stream decode speed of `stages`, given as candidates and layer counts
/// in layer order.
pub(super) fn predict(stages: &[(&Cand<'_>, u32)]) -> Prediction {
    let mut compute = 0.0;
    for (c, layers) in stages {
        compute += f64::from(*layers) * c.layer_s;
    }
    if let Some((last, _)) = stages.last() {
        compute += last.head_s;
    }
    // Hidden states go down each link and the sampled token comes back up it.
    let hops: f64 = stages
        .windows(2)
        .map(|w| 2.0 * (w[0].0.latency + w[1].0.latency))
        .sum();
    let total = compute + hops;
    // Inputs are clamped to (0, MAX_BELIEVABLE_SECONDS], so total is finite and positive for
    // any non-empty replica; the guard keeps a degenerate call from dividing by zero.
    let tokens_per_second = if total > 0.0 && total.is_finite() {
        1.0 / total
    } else {
        f64::MIN_POSITIVE
    };
    Prediction {
        tokens_per_second,
        compute_seconds: compute,
        hop_seconds: hops,
        measured: stages.iter().all(|(c, _)| c.measured),
    }
}

/// Where a stage sits: an end (holds the embeddings or the head) or the middle.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    End,
    Middle,
}

/// Most layers a stage in `role` can hold in `free` bytes (0 when not even one fits). A stage
/// is always partial: an end holds at most `n - 1` layers, a middle at most `n - 2`.
fn max_layers(spec: &ModelSpec, kv_tokens: u32, free: u64, role: Role) -> u32 {
    let n = spec.n_layers;
    let (offset, hi) = match role {
        Role::End => (0, n.saturating_sub(1)),
        Role::Middle => (1, n.saturating_sub(2)),
    };
    let fits = |l: u32| {
        LayerRange::new(offset, offset + l).is_ok_and(|r| spec.need_bytes(r, kv_tokens) <= free)
    };
    // need_bytes grows with the number of layers, so the largest fitting count is found by
    // bisection over [0, hi].
    let (mut lo, mut hi) = (0u32, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

struct Best {
    cost: f64,
    /// Candidate indices of the set, ascending, and their layer counts.
    members: Vec<(usize, u32)>,
    first: usize,
    last: usize,
    key: Vec<NodeId>,
}

/// The fastest pipeline with exactly `k` stages for every `k` in `2..=max_stages` for which
/// one fits the candidates' free memory, by ascending `k`.
pub(super) fn best_by_stage_count(
    spec: &ModelSpec,
    kv_tokens: u32,
    cands: &[Cand<'_>],
    max_stages: u32,
) -> Vec<Found> {
    let n = spec.n_layers;
    let mut cands: Vec<&Cand<'_>> = cands.iter().collect();
    cands.sort_by(|a, b| {
        a.layer_s
            .total_cmp(&b.layer_s)
            .then_with(|| a.latency.total_cmp(&b.latency))
            .then_with(|| b.free.cmp(&a.free))
            .then_with(|| a.id.cmp(b.id))
    });
    cands.truncate(MAX_CANDIDATES);
    let kmax = usize::try_from(max_stages)
        .unwrap_or(usize::MAX)
        .min(cands.len())
        .min(usize::try_from(n).unwrap_or(usize::MAX));
    let end_cap: Vec<u32> = cands
        .iter()
        .map(|c| max_layers(spec, kv_tokens, c.free, Role::End))
        .collect();
    let mid_cap: Vec<u32> = cands
        .iter()
        .map(|c| max_layers(spec, kv_tokens, c.free, Role::Middle))
        .collect();

    let mut best: Vec<Option<Best>> = (0..kmax.saturating_sub(1)).map(|_| None).collect();
    let mut members: Vec<(usize, u32)> = Vec::with_capacity(kmax);
    for mask in 1u32..(1u32 << cands.len()) {
        let k = mask.count_ones() as usize;
        if k < 2 || k > kmax {
            continue;
        }
        let set: Vec<usize> = (0..cands.len()).filter(|i| mask & (1 << i) != 0).collect();
        let latency: f64 = set.iter().map(|&i| cands[i].latency).sum();
        for (ai, &a) in set.iter().enumerate() {
            for &b in &set[ai + 1..] {
                // The head runs on the last stage: give it to the end with the cheaper head
                // (on a tie the faster node, `a`, goes first).
                let (first, last) = if cands[b].head_s <= cands[a].head_s {
                    (a, b)
                } else {
                    (b, a)
                };
                let Some(cost) = fill(
                    &set,
                    first,
                    last,
                    n,
                    &end_cap,
                    &mid_cap,
                    &cands,
                    &mut members,
                ) else {
                    continue;
                };
                // Each link is crossed twice per token; a middle stage has two links, an end
                // one, whatever the middles' order.
                let hops = 2.0 * (2.0 * latency - cands[first].latency - cands[last].latency);
                let cost = cost + cands[last].head_s + hops;
                let slot = &mut best[k - 2];
                let better = match slot {
                    None => true,
                    Some(cur) => match cost.total_cmp(&cur.cost) {
                        Ordering::Less => true,
                        Ordering::Greater => false,
                        Ordering::Equal => {
                            let key = set_key(&set, &cands);
                            key < cur.key
                                || (key == cur.key && (first, last) < (cur.first, cur.last))
                        }
                    },
                };
                if better {
                    *slot = Some(Best {
                        cost,
                        members: members.clone(),
                        first,
                        last,
                        key: set_key(&set, &cands),
                    });
                }
            }
        }
    }
    best.into_iter()
        .flatten()
        .filter_map(|b| build(spec, &b, &cands))
        .collect()
}

fn set_key(set: &[usize], cands: &[&Cand<'_>]) -> Vec<NodeId> {
    let mut key: Vec<NodeId> = set.iter().map(|&i| cands[i].id.clone()).collect();
    key.sort();
    key
}

/// Splits `n` layers over `set` with `first` and `last` at the ends: one layer each, then the
/// rest to the fastest stages first (the set is in speed order), each up to its capacity.
/// Writes `(candidate, layers)` into `out` and returns the compute seconds of the layers, or
/// `None` when the set cannot hold the model.
#[allow(clippy::too_many_arguments)] // a hot inner helper; a struct would only rename them
fn fill(
    set: &[usize],
    first: usize,
    last: usize,
    n: u32,
    end_cap: &[u32],
    mid_cap: &[u32],
    cands: &[&Cand<'_>],
    out: &mut Vec<(usize, u32)>,
) -> Option<f64> {
    out.clear();
    let k = u32::try_from(set.len()).ok()?;
    let mut rest = n.checked_sub(k)?;
    let mut cost = 0.0;
    for &i in set {
        let cap = if i == first || i == last {
            end_cap[i]
        } else {
            mid_cap[i]
        };
        if cap == 0 {
            return None;
        }
        let extra = rest.min(cap - 1);
        rest -= extra;
        let layers = 1 + extra;
        cost += f64::from(layers) * cands[i].layer_s;
        out.push((i, layers));
    }
    (rest == 0).then_some(cost)
}

/// Lays out the ranges: `first`, the middles by node id, then `last`.
fn build(spec: &ModelSpec, b: &Best, cands: &[&Cand<'_>]) -> Option<Found> {
    let layers_of = |i: usize| b.members.iter().find(|(j, _)| *j == i).map(|(_, l)| *l);
    let mut middles: Vec<usize> = b
        .members
        .iter()
        .map(|(i, _)| *i)
        .filter(|i| *i != b.first && *i != b.last)
        .collect();
    middles.sort_by(|x, y| cands[*x].id.cmp(cands[*y].id));
    let order: Vec<usize> = std::iter::once(b.first)
        .chain(middles)
        .chain(std::iter::once(b.last))
        .collect();
    let mut start = 0;
    let mut stages = Vec::with_capacity(order.len());
    let mut costed = Vec::with_capacity(order.len());
    for i in order {
        let l = layers_of(i)?;
        let range = LayerRange::new(start, start + l).ok()?;
        start += l;
        stages.push(StageChoice {
            node: cands[i].id.clone(),
            layers: range,
        });
        costed.push((cands[i], l));
    }
    if start != spec.n_layers {
        return None;
    }
    Some(Found {
        stages,
        prediction: predict(&costed),
    })
}
