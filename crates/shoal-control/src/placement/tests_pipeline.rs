//! Pipeline planning: worked examples, then the plan invariants over random clusters where
//! models outgrow single nodes.

use super::tests::{arb_cluster, pinned_ok, used};
use super::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// A 10-layer model: 100 bytes per layer, 100 bytes of embeddings and head.
fn small_model(id: &str) -> ModelSpec {
    ModelSpec {
        id: ModelId::new(id),
        sha256: String::new(),
        file_bytes: 1100,
        n_layers: 10,
        layer_bytes: 100,
        kv_bytes_per_token: 0,
        context_length: 2048,
    }
}

/// A node with `mem` bytes that decodes one layer in `layer_ms` milliseconds.
fn node(id: &str, mem: u64, layer_ms: f64) -> NodeInput {
    let mut n = NodeInput::new(id, mem, NodeHealth::Alive);
    n.layer_speeds.insert(
        ModelId::new("m"),
        LayerSpeed {
            layer_seconds: layer_ms / 1e3,
            head_seconds: 0.0,
        },
    );
    n
}

fn input(nodes: Vec<NodeInput>, mode: PlacementMode, replicas: Option<usize>) -> PlacementInput {
    PlacementInput {
        models: vec![small_model("m")],
        nodes,
        policy: PlacementPolicy {
            replicas,
            kv_reserve_tokens: 0,
            mode,
        },
        ..Default::default()
    }
}

/// Each chain of model `m` as `["a[0,6)", "b[6,10)"]`-style strings.
fn chains(p: &Placement, m: &str) -> Vec<Vec<String>> {
    p.plan
        .chains(&ModelId::new(m))
        .iter()
        .map(|c| {
            c.stages
                .iter()
                .map(|a| format!("{}[{},{})", a.node, a.layers.start(), a.layers.end()))
                .collect()
        })
        .collect()
}

fn outcome<'a>(p: &'a Placement, m: &str) -> &'a ModelOutcome {
    p.outcomes.iter().find(|o| o.model.as_str() == m).unwrap()
}

fn why<'a>(p: &'a Placement, m: &str, n: &str) -> &'a Exclusion {
    &outcome(p, m)
        .excluded
        .iter()
        .find(|(id, _)| id.as_str() == n)
        .unwrap()
        .1
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn a_model_too_big_for_any_node_is_split_by_speed_and_memory() {
    // 700 bytes hold 6 layers at an end (6 × 100 + 100), 7 in the middle. a is twice as fast
    // as b, b twice as fast as c. Two stages suffice: a takes all it can hold.
    let p = place(&input(
        vec![
            node("a", 700, 1.0),
            node("b", 700, 2.0),
            node("c", 700, 4.0),
        ],
        PlacementMode::Auto,
        Some(1),
    ));
    assert_eq!(chains(&p, "m"), [["a[0,6)", "b[6,10)"]]);
    let o = outcome(&p, "m");
    let chosen: Vec<&Alternative> = o.chosen().collect();
    assert_eq!(chosen.len(), 1);
    // 6 × 1 ms + 4 × 2 ms = 14 ms per token, no hop latency.
    assert!(close(chosen[0].prediction.compute_seconds, 0.014));
    assert!(close(chosen[0].prediction.tokens_per_second, 1.0 / 0.014));
    assert!(chosen[0].prediction.measured);
    // Adding the slow c is considered and rejected: it must take a layer at 4 ms, while a
    // middle a could only take one more layer (7 instead of 6): 7 + 2 × 2 + 4 = 15 ms.
    let three = o
        .alternatives
        .iter()
        .find(|a| a.stages.len() == 3)
        .expect("a three-stage alternative");
    assert_eq!(three.verdict, Verdict::NotFaster);
    assert!(close(three.prediction.compute_seconds, 0.015));
    assert_eq!(why(&p, "m", "c"), &Exclusion::ReplicaLimit { replicas: 1 });
    let text = p.explain();
    assert!(
        text.contains("pipeline a [0, 6) -> b [6, 10): 71.43 tok/s (compute 14.0 ms + hops 0.0 ms): chosen (replica 0)"),
        "{text}"
    );
    assert!(
        text.contains("not chosen: no faster than the chosen one"),
        "{text}"
    );
}

#[test]
fn a_node_whose_link_costs_more_than_its_speed_saves_is_left_out() {
    // d is the fastest, but 50 ms away: a hop to it and back costs more than all its layers
    // would save. Without the latency it would be in the pipeline.
    let mut d = node("d", 700, 0.5);
    d.link_latency_seconds = 0.05;
    let nodes = vec![node("a", 700, 1.0), node("b", 700, 2.0), d];
    let p = place(&input(nodes.clone(), PlacementMode::Auto, Some(1)));
    assert_eq!(chains(&p, "m"), [["a[0,6)", "b[6,10)"]]);
    let with_d = outcome(&p, "m")
        .alternatives
        .iter()
        .filter(|a| a.stages.iter().any(|s| s.node.as_str() == "d"))
        .collect::<Vec<_>>();
    assert!(!with_d.is_empty());
    for a in with_d {
        assert_eq!(a.verdict, Verdict::NotFaster);
        // d sits at an end: its one link is crossed down and back, 50 ms each way (a and b
        // are on 0 ms links).
        assert!(close(a.prediction.hop_seconds, 0.1), "{:?}", a.prediction);
    }

    let mut near = nodes;
    near[2].link_latency_seconds = 0.0;
    let p = place(&input(near, PlacementMode::Auto, Some(1)));
    assert_eq!(chains(&p, "m"), [["d[0,6)", "a[6,10)"]]);
}

#[test]
fn a_middle_stage_pays_its_latency_on_both_links() {
    // 500 bytes hold 4 layers at an end, 5 in the middle: three stages are needed. The node
    // with the lowest latency goes in the middle, where its link counts twice.
    let mut nodes = vec![
        node("a", 500, 1.0),
        node("b", 500, 1.0),
        node("c", 500, 1.0),
    ];
    for (n, ms) in nodes.iter_mut().zip([1.0, 2.0, 4.0]) {
        n.link_latency_seconds = ms / 1e3;
    }
    let p = place(&input(nodes, PlacementMode::Auto, Some(1)));
    assert_eq!(chains(&p, "m"), [["b[0,4)", "a[4,9)", "c[9,10)"]]);
    let chosen = outcome(&p, "m").chosen().next().unwrap();
    // Links b-a (3 ms) and a-c (5 ms), each crossed twice.
    assert!(
        close(chosen.prediction.hop_seconds, 0.016),
        "{:?}",
        chosen.prediction
    );
    assert!(close(chosen.prediction.compute_seconds, 0.010));
}

#[test]
fn a_model_that_fits_is_replicated_whole_and_pipelines_are_only_explained() {
    let p = place(&input(
        vec![node("a", 2000, 1.0), node("b", 2000, 2.0)],
        PlacementMode::Auto,
        Some(1),
    ));
    assert_eq!(chains(&p, "m"), [["a[0,10)"]]);
    let o = outcome(&p, "m");
    let chosen = o.chosen().next().unwrap();
    assert!(close(chosen.prediction.tokens_per_second, 100.0)); // 10 × 1 ms
    assert_eq!(chosen.prediction.hop_seconds, 0.0);
    let pipeline = o.alternatives.iter().find(|a| a.is_pipeline()).unwrap();
    assert_eq!(pipeline.verdict, Verdict::WholeReplicaFits);
    let whole_b = o
        .alternatives
        .iter()
        .find(|a| a.stages.len() == 1 && a.stages[0].node.as_str() == "b")
        .unwrap();
    assert_eq!(whole_b.verdict, Verdict::ReplicaLimit);
    assert!(close(whole_b.prediction.tokens_per_second, 50.0));
}

#[test]
fn replicate_mode_never_splits() {
    let p = place(&input(
        vec![node("a", 700, 1.0), node("b", 700, 2.0)],
        PlacementMode::Replicate,
        None,
    ));
    assert!(p.plan.assignments.is_empty());
    let o = outcome(&p, "m");
    assert!(
        o.alternatives
            .iter()
            .all(|a| a.is_pipeline() && a.verdict == Verdict::ExcludedByPolicy)
    );
    assert!(p.explain().contains("NOT PLACED"), "{}", p.explain());
    assert_eq!(
        why(&p, "m", "a"),
        &Exclusion::NotEnoughMemory {
            need: 1100,
            capacity: 700
        }
    );
}

#[test]
fn shard_mode_splits_a_model_that_fits_and_respects_its_stage_limit() {
    let nodes = vec![
        node("a", 2000, 1.0),
        node("b", 2000, 1.0),
        node("c", 2000, 1.0),
    ];
    let p = place(&input(
        nodes.clone(),
        PlacementMode::Shard { max_stages: 2 },
        Some(1),
    ));
    let c = chains(&p, "m");
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].len(), 2, "{}", p.explain());
    let whole = outcome(&p, "m")
        .alternatives
        .iter()
        .find(|a| !a.is_pipeline())
        .unwrap();
    assert_eq!(whole.verdict, Verdict::ExcludedByPolicy);

    // With one usable node left, the model falls back to a whole replica.
    let mut lonely = nodes;
    lonely[1].health = NodeHealth::Dead;
    lonely[2].health = NodeHealth::Draining;
    let p = place(&input(lonely, PlacementMode::Shard { max_stages: 3 }, None));
    assert_eq!(chains(&p, "m"), [["a[0,10)"]]);
}

#[test]
fn pinned_pipelines_stay_on_their_pins() {
    let mut i = input(
        vec![
            node("a", 700, 4.0),
            node("b", 700, 4.0),
            node("fast", 700, 0.1),
        ],
        PlacementMode::Auto,
        None,
    );
    i.pins.insert(
        ModelId::new("m"),
        [NodeId::new("a"), NodeId::new("b")].into(),
    );
    let p = place(&i);
    assert_eq!(chains(&p, "m"), [["a[0,6)", "b[6,10)"]]);
    assert_eq!(why(&p, "m", "fast"), &Exclusion::NotPinned);
}

#[test]
fn two_pipelines_of_one_model_get_their_own_ids() {
    let p = place(&input(
        vec![
            node("a", 700, 1.0),
            node("b", 700, 1.0),
            node("c", 700, 1.0),
            node("d", 700, 1.0),
        ],
        PlacementMode::Auto,
        None,
    ));
    let got = p.plan.chains(&ModelId::new("m"));
    assert_eq!(got.len(), 2, "{}", p.explain());
    assert_eq!(got[0].id, 0);
    assert_eq!(got[1].id, 1);
    assert!(got.iter().all(|c| c.is_complete(10) && c.stages.len() == 2));
}

#[test]
fn a_working_pipeline_is_kept_and_a_broken_one_replanned() {
    let mut i = input(
        vec![node("a", 700, 1.0), node("b", 700, 2.0)],
        PlacementMode::Auto,
        Some(1),
    );
    let first = place(&i);
    assert_eq!(chains(&first, "m"), [["a[0,6)", "b[6,10)"]]);

    // A faster pair arriving does not move the working pipeline.
    i.previous = Some(first.plan.clone());
    i.nodes.push(node("x", 700, 0.1));
    i.nodes.push(node("y", 700, 0.1));
    let second = place(&i);
    assert_eq!(second.plan, first.plan);
    let o = outcome(&second, "m");
    assert!(
        o.alternatives
            .iter()
            .any(|a| a.verdict == Verdict::KeepsCurrent)
    );

    // When one of its nodes dies the model is split again, over the fastest survivors.
    i.nodes[1].health = NodeHealth::Dead;
    let third = place(&i);
    assert_eq!(chains(&third, "m"), [["x[0,6)", "y[6,10)"]]);
    assert_eq!(third.plan.epoch, first.plan.epoch + 1);
}

#[test]
fn unmeasured_nodes_are_costed_like_the_slowest_measured_one() {
    let mut mystery = NodeInput::new("mystery", 700, NodeHealth::Alive);
    mystery.cores = 64;
    let p = place(&input(
        vec![node("a", 1000, 1.0), node("b", 700, 3.0), mystery],
        PlacementMode::Auto,
        Some(1),
    ));
    // mystery counts as 3 ms per layer, like b: the two tie and the lower id wins. A third
    // stage only adds a 3 ms layer (9 + 3 = 12 ms against 8 + 3 + 3 = 14 ms).
    assert_eq!(chains(&p, "m"), [["a[0,9)", "b[9,10)"]]);
    let o = outcome(&p, "m");
    let with_mystery = o
        .alternatives
        .iter()
        .find(|a| a.stages.iter().any(|s| s.node.as_str() == "mystery"))
        .unwrap();
    assert!(!with_mystery.prediction.measured);
    assert!(p.explain().contains("[assumed speeds]"));
}

#[test]
fn the_kv_reserve_shrinks_what_a_stage_holds() {
    let mut i = input(
        vec![node("a", 700, 1.0), node("b", 3000, 2.0)],
        PlacementMode::Auto,
        Some(1),
    );
    i.models[0].file_bytes = 2100; // 10 layers + 1100 bytes of embeddings and head
    i.models[0].kv_bytes_per_token = 10; // 100 bytes per layer at 100 tokens
    i.policy.kv_reserve_tokens = 100;
    let p = place(&i);
    // a's end stage (1100 + 200 × layers) never fits in 700 bytes, a middle stage needs a
    // third node, and b cannot hold the whole 2100 + 1000. So nothing fits.
    assert!(p.plan.assignments.is_empty(), "{}", p.explain());

    i.nodes[0].memory_bytes = 1500; // now a holds two layers at an end
    let p = place(&i);
    assert_eq!(chains(&p, "m"), [["a[0,2)", "b[2,10)"]]);
    for a in &p.plan.assignments {
        let n = i.nodes.iter().find(|n| n.id == a.node).unwrap();
        assert!(i.models[0].need_bytes(a.layers, 100) <= n.memory_bytes);
    }
}

// ---- invariants ----

/// Every property a plan must hold, whatever the input.
pub(super) fn check_invariants(input: &PlacementInput, p: &Placement) -> Result<(), TestCaseError> {
    let explain = p.explain();
    let mut sorted = p.plan.assignments.clone();
    sorted.sort();
    prop_assert_eq!(&sorted, &p.plan.assignments);

    for n in &input.nodes {
        if input
            .nodes
            .iter()
            .find(|m| m.id == n.id)
            .is_some_and(|first| std::ptr::eq(first, n))
        {
            prop_assert!(
                used(input, &p.plan, &n.id) <= n.memory_bytes,
                "{} over memory:\n{}",
                n.id,
                explain
            );
        }
    }
    let mut seen = BTreeSet::new();
    for a in &p.plan.assignments {
        let n = input.nodes.iter().find(|n| n.id == a.node).unwrap();
        prop_assert_eq!(n.health, NodeHealth::Alive, "{}", explain);
        prop_assert!(pinned_ok(input, &a.model, &a.node));
        prop_assert!(
            seen.insert((&a.node, &a.model)),
            "two shards of {} on {}",
            a.model,
            a.node
        );
    }

    let target = input.policy.replicas.unwrap_or(usize::MAX);
    for m in &input.models {
        let chains = p.plan.chains(&m.id);
        prop_assert!(chains.len() <= target);
        let ids: BTreeSet<u32> = chains.iter().map(|c| c.id).collect();
        prop_assert_eq!(ids.len(), chains.len(), "replica ids repeat:\n{}", explain);
        let staged: usize = chains.iter().map(|c| c.stages.len()).sum();
        prop_assert_eq!(staged, p.plan.for_model(&m.id).count());
        for c in &chains {
            prop_assert!(c.is_complete(m.n_layers), "incomplete chain:\n{}", explain);
            let limit = match input.policy.mode {
                PlacementMode::Replicate => 1,
                mode => mode.stage_limit().unwrap() as usize,
            };
            prop_assert!(
                c.stages.len() <= limit,
                "{} stages:\n{}",
                c.stages.len(),
                explain
            );
        }
        let Some(o) = p.outcomes.iter().find(|o| o.model == m.id) else {
            continue;
        };
        for alt in &o.alternatives {
            let pr = alt.prediction;
            prop_assert!(
                pr.tokens_per_second.is_finite() && pr.tokens_per_second > 0.0,
                "{:?}",
                pr
            );
            prop_assert!(
                pr.compute_seconds > 0.0 && pr.hop_seconds >= 0.0,
                "{:?}",
                pr
            );
            let mut next = 0;
            for s in &alt.stages {
                prop_assert_eq!(s.layers.start(), next);
                next = s.layers.end();
            }
            prop_assert_eq!(next, m.n_layers);
        }
        // The chosen alternatives are exactly the plan's replicas.
        let mut chosen: Vec<(u32, Vec<StageChoice>)> = o
            .chosen()
            .map(|a| match a.verdict {
                Verdict::Chosen { pipeline } => (pipeline, a.stages.clone()),
                _ => unreachable!(),
            })
            .collect();
        chosen.sort_by_key(|(id, _)| *id);
        let planned: Vec<(u32, Vec<StageChoice>)> = chains
            .iter()
            .map(|c| {
                let stages = c
                    .stages
                    .iter()
                    .map(|a| StageChoice {
                        node: a.node.clone(),
                        layers: a.layers,
                    })
                    .collect();
                (c.id, stages)
            })
            .collect();
        prop_assert_eq!(chosen, planned);
    }
    Ok(())
}

/// Nodes of at most 10 GiB, models of up to 16 GiB: sharding happens often.
fn arb_tight() -> impl Strategy<Value = PlacementInput> {
    arb_cluster(40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn tight_clusters_keep_the_plan_invariants(input in arb_tight()) {
        let p = place(&input);
        check_invariants(&input, &p)?;
    }

    #[test]
    fn tight_plans_are_deterministic_and_order_independent(input in arb_tight()) {
        let p = place(&input);
        prop_assert_eq!(&place(&input), &p);
        let mut shuffled = input.clone();
        shuffled.nodes.reverse();
        shuffled.models.reverse();
        prop_assert_eq!(&place(&shuffled).plan, &p.plan);
    }

    #[test]
    fn replanning_a_tight_cluster_changes_nothing(input in arb_tight()) {
        let first = place(&input);
        let again = place(&PlacementInput { previous: Some(first.plan.clone()), ..input.clone() });
        prop_assert_eq!(&again.plan, &first.plan, "{}\n{}", first.explain(), again.explain());
    }

    #[test]
    fn after_a_node_dies_the_plan_still_holds_and_survivors_keep_what_fits(
        input in arb_tight(),
        kill in 0usize..7,
    ) {
        let first = place(&input);
        let mut changed = PlacementInput { previous: Some(first.plan.clone()), ..input.clone() };
        if let Some(n) = changed.nodes.get_mut(kill) {
            n.health = NodeHealth::Dead;
        }
        let second = place(&changed);
        check_invariants(&changed, &second)?;
        let same = second.plan.assignments == first.plan.assignments;
        prop_assert_eq!(second.plan.epoch, if same { first.plan.epoch } else { first.plan.epoch + 1 });
    }

    #[test]
    fn a_pipeline_is_never_predicted_faster_than_the_best_stage_node_running_everything(
        input in arb_tight(),
    ) {
        // Compute only grows when layers move to slower nodes, and hops only add: no
        // alternative beats the fastest node's whole-model time (its memory aside).
        let p = place(&input);
        for m in &input.models {
            let Some(o) = p.outcomes.iter().find(|o| o.model == m.id) else { continue };
            for alt in &o.alternatives {
                let best_layer = alt
                    .stages
                    .iter()
                    .map(|s| {
                        let n = input.nodes.iter().find(|n| n.id == s.node).unwrap();
                        n.layer_cost(&m.id, m.n_layers).map_or(f64::INFINITY, |c| c.0)
                    })
                    .fold(f64::INFINITY, f64::min);
                if alt.prediction.measured && best_layer.is_finite() {
                    let floor = best_layer * f64::from(m.n_layers);
                    prop_assert!(
                        alt.prediction.compute_seconds + 1e-12 >= floor,
                        "{:?} below {floor}", alt.prediction
                    );
                }
            }
        }
    }
}

/// Prints how long planning a large tight cluster takes (run with `--ignored --nocapture`).
#[test]
#[ignore = "prints a timing; run by hand"]
fn planner_speed() {
    let nodes: Vec<NodeInput> = (0..24u32)
        .map(|i| {
            let mut n = node(
                &format!("n{i:02}"),
                700 + 50 * u64::from(i % 5),
                1.0 + f64::from(i % 7),
            );
            n.link_latency_seconds = 0.001 * f64::from(i % 3);
            n
        })
        .collect();
    let mut i = input(nodes, PlacementMode::Auto, None);
    i.models = (0..4).map(|j| small_model(&format!("m{j}"))).collect();
    i.models.push(small_model("m"));
    let start = std::time::Instant::now();
    let p = place(&i);
    let first = start.elapsed();
    let start = std::time::Instant::now();
    let again = place(&PlacementInput {
        previous: Some(p.plan.clone()),
        ..i.clone()
    });
    println!(
        "24 nodes, 5 models: {} assignments in {first:?}; replanning {:?}",
        p.plan.assignments.len(),
        start.elapsed()
    );
    assert_eq!(again.plan, p.plan);
}
