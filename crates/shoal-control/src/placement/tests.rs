//! Planner tests: worked examples, then properties over random clusters.

use super::*;
use proptest::prelude::*;

const GB: u64 = 1 << 30;

fn model(id: &str, file_gb: u64) -> ModelSpec {
    ModelSpec {
        id: ModelId::new(id),
        sha256: "ab".repeat(32),
        file_bytes: file_gb * GB,
        n_layers: 10,
        layer_bytes: file_gb * GB / 20,
        kv_bytes_per_token: 0,
        context_length: 2048,
    }
}

fn node(id: &str, mem_gb: u64, health: NodeHealth) -> NodeInput {
    NodeInput::new(id, mem_gb * GB, health)
}

fn fast(mut n: NodeInput, model: &str, tps: f64) -> NodeInput {
    n.speeds.insert(ModelId::new(model), tps);
    n
}

fn on(p: &Placement, m: &str) -> Vec<String> {
    p.plan
        .for_model(&ModelId::new(m))
        .map(|a| a.node.to_string())
        .collect()
}

fn why<'a>(p: &'a Placement, m: &str, n: &str) -> &'a Exclusion {
    let o = p.outcomes.iter().find(|o| o.model.as_str() == m).unwrap();
    &o.excluded
        .iter()
        .find(|(id, _)| id.as_str() == n)
        .unwrap()
        .1
}

#[test]
fn a_node_with_another_version_of_the_model_gets_no_share_of_it() {
    let mut stale = fast(node("stale", 64, NodeHealth::Alive), "m", 100.0);
    stale.other_versions.insert(ModelId::new("m"));
    let input = PlacementInput {
        models: vec![model("m", 4), model("n", 4)],
        nodes: vec![stale, fast(node("ok", 8, NodeHealth::Alive), "m", 10.0)],
        ..Default::default()
    };
    let p = place(&input);
    assert_eq!(on(&p, "m"), ["ok"]);
    assert_eq!(why(&p, "m", "stale"), &Exclusion::OtherVersion);
    // Other models still go to it.
    assert!(
        on(&p, "n").contains(&"stale".to_owned()),
        "{:?}",
        on(&p, "n")
    );
    assert!(
        p.explain()
            .contains("stale: has another version of the model")
    );
}

#[test]
fn excluded_nodes_carry_their_reason() {
    let input = PlacementInput {
        models: vec![model("m", 4)],
        nodes: vec![
            node("dead", 16, NodeHealth::Dead),
            node("draining", 16, NodeHealth::Draining),
            node("small", 2, NodeHealth::Alive),
            node("ok", 8, NodeHealth::Alive),
        ],
        ..Default::default()
    };
    let p = place(&input);
    assert_eq!(on(&p, "m"), ["ok"]);
    assert_eq!(p.plan.assignments[0].layers, LayerRange::full(10).unwrap());
    assert_eq!(why(&p, "m", "dead"), &Exclusion::Dead);
    assert_eq!(why(&p, "m", "draining"), &Exclusion::Draining);
    assert_eq!(
        why(&p, "m", "small"),
        &Exclusion::NotEnoughMemory {
            need: 4 * GB,
            capacity: 2 * GB
        }
    );
    let text = p.explain();
    assert!(
        text.contains("model m (needs 4294967296 B): on ok"),
        "{text}"
    );
    assert!(text.contains("small: not enough memory"), "{text}");
    assert!(
        text.contains("dead: dead") && text.contains("draining: draining"),
        "{text}"
    );
}

#[test]
fn the_kv_reserve_counts_against_memory() {
    let mut m = model("m", 4);
    m.kv_bytes_per_token = 1 << 20; // 1 MiB per token
    let policy = PlacementPolicy {
        replicas: None,
        kv_reserve_tokens: 2048,
        ..Default::default()
    }; // 2 GiB reserve
    let input = PlacementInput {
        models: vec![m],
        nodes: vec![
            node("a", 5, NodeHealth::Alive),
            node("b", 6, NodeHealth::Alive),
        ],
        policy,
        ..Default::default()
    };
    let p = place(&input);
    assert_eq!(on(&p, "m"), ["b"]);
    assert_eq!(
        why(&p, "m", "a"),
        &Exclusion::NotEnoughMemory {
            need: 6 * GB,
            capacity: 5 * GB
        }
    );
}

#[test]
fn pins_are_never_violated_even_for_a_faster_node() {
    let mut input = PlacementInput {
        models: vec![model("m", 1)],
        nodes: vec![
            fast(node("a", 8, NodeHealth::Alive), "m", 100.0),
            fast(node("b", 8, NodeHealth::Alive), "m", 1.0),
        ],
        ..Default::default()
    };
    input.pins.insert(
        ModelId::new("m"),
        [NodeId::new("b"), NodeId::new("gone")].into(),
    );
    let p = place(&input);
    assert_eq!(on(&p, "m"), ["b"]);
    assert_eq!(why(&p, "m", "a"), &Exclusion::NotPinned);
    assert_eq!(p.outcomes[0].unknown_pins, [NodeId::new("gone")]);
    assert!(p.explain().contains("gone: pinned but not a known node"));

    // With its only pinned node dead the model stays unplaced rather than go elsewhere.
    input.nodes[1].health = NodeHealth::Dead;
    let p = place(&input);
    assert!(p.plan.assignments.is_empty());
    assert_eq!(p.unplaced().count(), 1);
    assert!(p.explain().contains("NOT PLACED"));
}

#[test]
fn a_replica_limit_prefers_the_faster_node_then_sticks() {
    let policy = PlacementPolicy {
        replicas: Some(1),
        kv_reserve_tokens: 0,
        ..Default::default()
    };
    let mut input = PlacementInput {
        models: vec![model("m", 1)],
        nodes: vec![
            fast(node("a", 8, NodeHealth::Alive), "m", 10.0),
            fast(node("b", 8, NodeHealth::Alive), "m", 30.0),
        ],
        policy,
        ..Default::default()
    };
    let first = place(&input);
    assert_eq!(on(&first, "m"), ["b"]);
    assert_eq!(first.plan.epoch, 1);
    assert_eq!(
        why(&first, "m", "a"),
        &Exclusion::ReplicaLimit { replicas: 1 }
    );

    // A faster node arriving does not move a working replica (no churn), and the epoch holds.
    input.previous = Some(first.plan.clone());
    input
        .nodes
        .push(fast(node("c", 8, NodeHealth::Alive), "m", 99.0));
    let second = place(&input);
    assert_eq!(second.plan, first.plan);

    // When the holder dies the replica moves to the fastest survivor and the epoch advances.
    input.nodes[1].health = NodeHealth::Dead;
    let third = place(&input);
    assert_eq!(on(&third, "m"), ["c"]);
    assert_eq!(third.plan.epoch, 2);
}

#[test]
fn scarce_memory_gives_every_model_a_first_replica_before_any_second() {
    // Two nodes that each fit one model: replicating the first model everywhere would starve
    // the second.
    let input = PlacementInput {
        models: vec![model("x", 5), model("y", 5)],
        nodes: vec![
            node("a", 6, NodeHealth::Alive),
            node("b", 6, NodeHealth::Alive),
        ],
        ..Default::default()
    };
    let p = place(&input);
    assert_eq!(on(&p, "x").len(), 1);
    assert_eq!(on(&p, "y").len(), 1);
    assert_ne!(on(&p, "x"), on(&p, "y"));
    let (holder_of_x, _) = (on(&p, "x")[0].clone(), ());
    let other = if holder_of_x == "a" { "b" } else { "a" };
    assert_eq!(
        why(&p, "x", other),
        &Exclusion::MemoryTaken {
            need: 5 * GB,
            free: GB
        }
    );
}

#[test]
fn default_policy_replicates_to_every_node_with_room() {
    let input = PlacementInput {
        models: vec![model("s", 1)],
        nodes: vec![
            node("a", 2, NodeHealth::Alive),
            node("b", 2, NodeHealth::Alive),
            node("c", 2, NodeHealth::Alive),
        ],
        ..Default::default()
    };
    assert_eq!(on(&place(&input), "s"), ["a", "b", "c"]);
}

#[test]
fn partial_ranges_are_priced_by_their_layers() {
    let m = ModelSpec {
        id: ModelId::new("m"),
        sha256: String::new(),
        file_bytes: 1100,
        n_layers: 10,
        layer_bytes: 100,
        kv_bytes_per_token: 10,
        context_length: 2048,
    };
    let r = |a, b| LayerRange::new(a, b).unwrap();
    assert_eq!(m.weight_bytes(r(0, 10)), 1100);
    assert_eq!(m.weight_bytes(r(0, 4)), 500); // 4 layers + embeddings
    assert_eq!(m.weight_bytes(r(4, 6)), 200); // middle: layers only
    assert_eq!(m.weight_bytes(r(6, 10)), 500); // 4 layers + head
    assert_eq!(m.kv_reserve_bytes(r(0, 10), 100), 1000);
    assert_eq!(m.kv_reserve_bytes(r(0, 3), 100), 300);
    assert_eq!(m.kv_reserve_bytes(r(0, 3), 1), 3); // 10 * 3 / 10
    assert_eq!(m.kv_reserve_bytes(r(0, 1), 1), 1); // rounds up, never zero
}

// ---- properties ----

pub(super) fn arb_mode() -> impl Strategy<Value = PlacementMode> {
    prop_oneof![
        3 => Just(PlacementMode::Auto),
        1 => Just(PlacementMode::Replicate),
        1 => (0u32..5).prop_map(|max_stages| PlacementMode::Shard { max_stages }),
    ]
}

/// Random clusters: `node_quarter_gb` bounds node memory in quarter-GiB, so small bounds make
/// models outgrow single nodes (and get sharded).
pub(super) fn arb_cluster(node_quarter_gb: u64) -> impl Strategy<Value = PlacementInput> {
    let models = prop::collection::vec((1u64..64, 0u64..8, prop::bool::weighted(0.3)), 1..5);
    let nodes = prop::collection::vec(
        (
            0u64..node_quarter_gb,
            0u8..6,
            prop::collection::vec(0.0f64..50.0, 5),
            prop::collection::vec(any::<bool>(), 5),
            prop::collection::vec(
                prop::option::weighted(0.5, (1e-4f64..0.05, 0.0f64..0.01)),
                5,
            ),
            prop_oneof![Just(0.0), 0.0f64..0.02, Just(f64::NAN), Just(-1.0)],
        ),
        0..7,
    );
    let replicas = prop::option::of(1usize..4);
    (models, nodes, replicas, 0u32..4, arb_mode()).prop_map(
        |(models, nodes, replicas, kv, mode)| {
            let node_ids: Vec<NodeId> = (0..nodes.len())
                .map(|i| NodeId::new(format!("n{i}")))
                .collect();
            let nodes: Vec<NodeInput> = nodes
                .into_iter()
                .enumerate()
                .map(|(i, (mem, h, speeds, local, layer_speeds, latency))| {
                    let health = match h {
                        0 => NodeHealth::Dead,
                        1 => NodeHealth::Draining,
                        _ => NodeHealth::Alive,
                    };
                    let mut n = NodeInput::new(node_ids[i].clone(), mem * GB / 4, health);
                    for (j, s) in speeds.into_iter().enumerate() {
                        n.speeds.insert(ModelId::new(format!("m{j}")), s);
                    }
                    for (j, l) in local.into_iter().enumerate() {
                        if l {
                            n.local_models.insert(ModelId::new(format!("m{j}")));
                        }
                    }
                    for (j, ls) in layer_speeds.into_iter().enumerate() {
                        if let Some((layer_seconds, head_seconds)) = ls {
                            n.layer_speeds.insert(
                                ModelId::new(format!("m{j}")),
                                LayerSpeed {
                                    layer_seconds,
                                    head_seconds,
                                },
                            );
                        }
                    }
                    n.link_latency_seconds = latency;
                    n
                })
                .collect();
            let mut pins = BTreeMap::new();
            let specs = models
                .iter()
                .enumerate()
                .map(|(j, (size, kv, pinned))| {
                    let id = ModelId::new(format!("m{j}"));
                    if *pinned {
                        // Pin to every other node (and one unknown name) so pins bite.
                        let mut set: BTreeSet<NodeId> =
                            node_ids.iter().skip(j % 2).step_by(2).cloned().collect();
                        set.insert(NodeId::new("nowhere"));
                        pins.insert(id.clone(), set);
                    }
                    ModelSpec {
                        id,
                        sha256: String::new(),
                        file_bytes: size * GB / 4,
                        n_layers: 8,
                        layer_bytes: size * GB / 40,
                        kv_bytes_per_token: kv << 16,
                        context_length: 2048,
                    }
                })
                .collect();
            PlacementInput {
                models: specs,
                nodes,
                pins,
                policy: PlacementPolicy {
                    replicas,
                    kv_reserve_tokens: kv * 1024,
                    mode,
                },
                previous: None,
            }
        },
    )
}

fn arb_input() -> impl Strategy<Value = PlacementInput> {
    arb_cluster(160)
}

fn need(input: &PlacementInput, m: &ModelId) -> u64 {
    let spec = input.models.iter().find(|s| &s.id == m).unwrap();
    spec.need_bytes(spec.full_range().unwrap(), input.policy.kv_reserve_tokens)
}

/// Bytes the node's assignments need, each priced by its own range.
pub(super) fn used(input: &PlacementInput, plan: &Plan, n: &NodeId) -> u64 {
    plan.for_node(n)
        .map(|a| {
            let spec = input.models.iter().find(|s| s.id == a.model).unwrap();
            spec.need_bytes(a.layers, input.policy.kv_reserve_tokens)
        })
        .sum()
}

pub(super) fn pinned_ok(input: &PlacementInput, m: &ModelId, n: &NodeId) -> bool {
    input.pins.get(m).is_none_or(|p| p.contains(n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_node_holds_no_more_than_its_memory(input in arb_input()) {
        let p = place(&input);
        for n in &input.nodes {
            prop_assert!(used(&input, &p.plan, &n.id) <= n.memory_bytes, "{}", p.explain());
        }
    }

    #[test]
    fn the_plan_keeps_its_invariants(input in arb_input()) {
        let p = place(&input);
        super::tests_pipeline::check_invariants(&input, &p)?;
    }

    #[test]
    fn no_model_is_short_of_replicas_while_a_usable_node_has_room(input in arb_input()) {
        // In shard mode a whole replica is only a fallback, so room for one proves nothing.
        prop_assume!(!matches!(input.policy.mode, PlacementMode::Shard { .. }));
        let p = place(&input);
        let target = input.policy.replicas.unwrap_or(usize::MAX);
        for m in &input.models {
            let holders: BTreeSet<&NodeId> = p.plan.for_model(&m.id).map(|a| &a.node).collect();
            let replicas = p.plan.chains(&m.id).len();
            prop_assert!(replicas <= target);
            if replicas == target {
                continue;
            }
            for n in input.nodes.iter().filter(|n| n.health == NodeHealth::Alive && !holders.contains(&n.id)) {
                if pinned_ok(&input, &m.id, &n.id) {
                    let free = n.memory_bytes - used(&input, &p.plan, &n.id);
                    prop_assert!(free < need(&input, &m.id), "{} fits on {}:\n{}", m.id, n.id, p.explain());
                }
            }
        }
    }

    #[test]
    fn a_model_that_fits_a_usable_node_alone_is_placed(input in arb_input()) {
        // One model at a time: fitting somewhere then means being placed (whole, unless the
        // mode asks for pipelines); not fitting anywhere means a pipeline or nothing.
        for m in &input.models {
            let single = PlacementInput { models: vec![m.clone()], ..input.clone() };
            let fits = input.nodes.iter().any(|n| {
                n.health == NodeHealth::Alive && pinned_ok(&input, &m.id, &n.id) && n.memory_bytes >= need(&input, &m.id)
            });
            let p = place(&single);
            let chains = p.plan.chains(&m.id);
            if fits {
                prop_assert!(!chains.is_empty(), "{}", p.explain());
                if !matches!(input.policy.mode, PlacementMode::Shard { .. }) {
                    prop_assert!(chains.iter().any(|c| c.stages.len() == 1), "{}", p.explain());
                }
            } else {
                prop_assert!(chains.iter().all(|c| c.stages.len() > 1), "{}", p.explain());
                if input.policy.mode == PlacementMode::Replicate {
                    prop_assert!(chains.is_empty());
                }
            }
        }
    }

    #[test]
    fn models_that_fit_together_on_one_node_are_all_placed(mut input in arb_input()) {
        input.pins.clear();
        let total: u64 = input.models.iter().map(|m| need(&input, &m.id)).sum();
        let roomy = input.nodes.iter().any(|n| n.health == NodeHealth::Alive && n.memory_bytes >= total);
        prop_assume!(roomy);
        let p = place(&input);
        prop_assert_eq!(p.unplaced().count(), 0, "{}", p.explain());
    }

    #[test]
    fn the_plan_is_deterministic_and_order_independent(input in arb_input()) {
        let p = place(&input);
        prop_assert_eq!(&place(&input), &p);
        let mut shuffled = input.clone();
        shuffled.nodes.reverse();
        shuffled.models.reverse();
        prop_assert_eq!(&place(&shuffled).plan, &p.plan);
    }

    #[test]
    fn replanning_an_unchanged_cluster_changes_nothing(input in arb_input()) {
        let first = place(&input);
        let again = place(&PlacementInput { previous: Some(first.plan.clone()), ..input.clone() });
        prop_assert_eq!(&again.plan, &first.plan);
    }

    #[test]
    fn the_epoch_moves_exactly_when_assignments_change(input in arb_input(), kill in 0usize..7) {
        let first = place(&input);
        let mut changed = PlacementInput { previous: Some(first.plan.clone()), ..input.clone() };
        if let Some(n) = changed.nodes.get_mut(kill) {
            n.health = NodeHealth::Dead;
        }
        let second = place(&changed);
        let same = second.plan.assignments == first.plan.assignments;
        prop_assert_eq!(second.plan.epoch, if same { first.plan.epoch } else { first.plan.epoch + 1 });
    }
}
