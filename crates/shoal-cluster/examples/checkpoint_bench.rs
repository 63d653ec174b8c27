//! When KV-cache checkpoints pay: a generation with a long context loses its node in the
//! middle, and resumes on the other replica either by prefilling its whole context again or
//! from the checkpoint that replica holds.
//!
//! A coordinator and agents with one compute thread each run in this process, on loopback
//! over mTLS: two whole-model replicas (two agents), or with `--stages N` two pipelines of N
//! stages (2N agents, each with room for one stage only). For each context length, with
//! checkpoints off and then on (`--every` positions between checkpoints), it streams one
//! seeded completion without a fault, then the same one while the agent serving it (for
//! pipelines, stage `--kill-stage` of the busy pipeline; default the last) is killed after
//! `--kill-after` tokens. It prints the stall the client saw at the failover (the longest gap
//! between two tokens after the kill) beside the same gap in the fault-free run, whether the
//! output was identical, the positions the resumed generation did not compute again and how
//! many nodes restored a checkpoint, and what checkpointing cost the fault-free run (decode
//! tokens/s, bytes pushed per position, all stages together). Figures only: nothing is
//! asserted.
//!
//! ```text
//! cargo run --release -p shoal-cluster --example checkpoint_bench -- \
//!     [--model PATH] [--contexts 256,512,1024,2048] [--every 64] [--kill-after 16] \
//!     [--max-tokens 48] [--stages 1] [--kill-stage N]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{Value, json};
use shoal_cluster::Coordinator;
use shoal_control::{ModelSpec, PlacementMode};
use shoal_net::Role;
use shoal_node::{Agent, AgentConfig, ModelFile};
use shoal_types::{LayerRange, ModelId, NodeId};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "bench";

#[derive(Debug, Clone)]
struct Opts {
    model: PathBuf,
    contexts: Vec<u32>,
    every: u32,
    kill_after: usize,
    max_tokens: u32,
    /// Stages per replica: 1 for whole-model replicas.
    stages: usize,
    /// The stage of the busy replica killed (clamped to its last).
    kill_stage: usize,
}

fn parse() -> Opts {
    let mut o = Opts {
        model: PathBuf::from(common::DEFAULT_MODEL),
        contexts: vec![256, 512, 1024, 2048],
        every: 64,
        kill_after: 16,
        max_tokens: 48,
        stages: 1,
        kill_stage: usize::MAX,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model" => o.model = PathBuf::from(v()),
            "--contexts" => o.contexts = v().split(',').map(|s| s.parse().unwrap()).collect(),
            "--every" => o.every = v().parse().unwrap(),
            "--kill-after" => o.kill_after = v().parse().unwrap(),
            "--max-tokens" => o.max_tokens = v().parse().unwrap(),
            "--stages" => o.stages = v().parse::<usize>().unwrap().max(1),
            "--kill-stage" => o.kill_stage = v().parse().unwrap(),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

struct Cluster {
    coordinator: Coordinator,
    agents: Vec<Option<(Agent, CancellationToken)>>,
    http: reqwest::Client,
}

impl Cluster {
    /// Two replicas of `stages` stages each, for contexts of `context` positions.
    async fn start(
        model: &ModelFile,
        spec: &ModelSpec,
        context: u32,
        every: u32,
        stages: usize,
    ) -> Cluster {
        let (placement, memory_budget) = if stages == 1 {
            (PlacementMode::Replicate, None)
        } else {
            // Room for one share of the layers and no more: the planner must split the model
            // over `stages` nodes.
            let per_node = spec.n_layers.div_ceil(stages as u32);
            let range = LayerRange::new(0, per_node).unwrap();
            let budget = spec.need_bytes(range, context) + spec.layer_bytes * 9 / 10;
            (
                PlacementMode::Shard {
                    max_stages: stages as u32,
                },
                Some(budget),
            )
        };
        let (coordinator, ca) =
            common::start_coordinator(spec, placement, context, 2000, |backend| {
                backend.checkpoint_every = every;
                // A 2k-token prefill on one thread takes longer than the default bound.
                backend.first_token_timeout = Duration::from_secs(300);
            })
            .await;
        let mut agents = Vec::new();
        for i in 1..=2 * stages {
            let name = format!("agent-{i}");
            let cfg = AgentConfig {
                node_id: NodeId::new(&name),
                coordinator: coordinator.grpc_addr().to_string(),
                tls: common::tls(&ca, Role::Agent, &name),
                data_listen: "127.0.0.1:0".parse().unwrap(),
                advertise_addr: None,
                http_listen: None,
                models: vec![model.clone()],
                threads: 1,
                engine: shoal_engine::EngineConfig::default(),
                default_max_tokens: 16,
                memory_budget,
                // Whole checkpoints of the longest context, whatever the memory budget.
                checkpoint_store: Some(512 << 20),
                benchmark: false,
                model_keys: None,
            };
            let cancel = CancellationToken::new();
            let agent = Agent::start(cfg, cancel.clone()).await.unwrap();
            agents.push(Some((agent, cancel)));
        }
        let cluster = Cluster {
            coordinator,
            agents,
            http: reqwest::Client::new(),
        };
        let view = common::wait_serving(&cluster.coordinator, 2 * stages).await;
        let chains = view.plan.chains(&ModelId::new(MODEL));
        let shapes: Vec<usize> = chains.iter().map(|c| c.stages.len()).collect();
        assert!(
            shapes.len() == 2 && shapes.iter().all(|&n| n == stages),
            "the planner made replicas of {shapes:?} stages, not two of {stages}"
        );
        cluster
    }

    /// Kills stage `stage` (clamped to the last) of the replica with a request in flight (no
    /// Leave: like a crash, its connections close); returns its index.
    fn kill_busy(&mut self, stage: usize) -> usize {
        let i: usize = {
            let router = self.coordinator.backend().router();
            let view = self.coordinator.membership().view();
            let chains = view.plan.chains(&ModelId::new(MODEL));
            let busy = chains
                .iter()
                .find(|c| c.stages.iter().all(|a| router.in_flight(&a.node) > 0))
                .expect("a replica with a request in flight");
            let node = &busy.stages[stage.min(busy.stages.len() - 1)].node;
            node.as_str().trim_start_matches("agent-").parse().unwrap()
        };
        let (agent, cancel) = self.agents[i - 1].take().unwrap();
        cancel.cancel();
        drop(agent);
        i - 1
    }

    /// Summed over the live agents: their checkpoint counter `which`.
    fn counter(&self, which: fn(&shoal_node::CheckpointCounters) -> &AtomicU64) -> u64 {
        (0..self.agents.len())
            .filter_map(|i| self.counters(i))
            .map(|c| which(c).load(Ordering::Relaxed))
            .sum()
    }

    fn counters(&self, i: usize) -> Option<&shoal_node::CheckpointCounters> {
        self.agents[i]
            .as_ref()
            .map(|(a, _)| &**a.metrics().checkpoints())
    }

    async fn stop(self) {
        for (a, _) in self.agents.into_iter().flatten() {
            let _ = a.shutdown(Duration::from_secs(1)).await;
        }
    }
}

/// A user message of about `tokens` tokens.
fn prompt(tokens: u32) -> String {
    // About 13 tokens per sentence with this tokenizer; the usage reports the exact count.
    let sentence = "The tide rises over the grey rocks of the northern shore. ";
    sentence.repeat((tokens / 13).max(1) as usize)
}

fn body(context: u32, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt(context)}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": 3,
    })
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let opts = parse();
    let (model, spec) = common::model_file(MODEL, &opts.model);
    let kv_per_position = spec.kv_bytes_per_token;
    let replicas = if opts.stages == 1 {
        "2 whole-model replicas".to_owned()
    } else {
        let killed = opts.kill_stage.min(opts.stages - 1);
        format!(
            "2 pipelines of {} stages (stage {killed} of the busy one killed)",
            opts.stages
        )
    };
    println!(
        "checkpoint_bench: {} ({} layers, {kv_per_position} B of KV per position), {replicas}, 1 compute thread per agent, {} cores; checkpoints every {} positions; kill after {} tokens of {}",
        opts.model.display(),
        spec.n_layers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        opts.every,
        opts.kill_after,
        opts.max_tokens,
    );
    println!(
        "\n{:>7} {:>11} | {:>9} {:>9} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "prompt",
        "checkpoints",
        "ttft",
        "decode",
        "pushed/pos",
        "stall",
        "no-fault",
        "extra",
        "restored",
        "by nodes",
        "identical"
    );
    // Per context, without checkpoints: (prompt tokens, prefill tokens/s, decode tokens/s).
    let mut rates = Vec::new();
    for &context in &opts.contexts {
        for every in [0, opts.every] {
            let mut cluster =
                Cluster::start(&model, &spec, context + opts.max_tokens, every, opts.stages).await;
            let (http, addr) = (cluster.http.clone(), cluster.coordinator.http_addr());
            // Fault-free: the reference output and what checkpointing costs.
            let reference =
                common::stream_chat(&http, addr, body(context, opts.max_tokens), |_| {}).await;
            let pushed = cluster.counter(|c| &c.pushed_bytes);
            let positions = reference.prompt_tokens + reference.completion_tokens;
            // The same request again, its node killed after `kill_after` tokens.
            let killed = std::sync::Mutex::new(None);
            let run = {
                let cluster_ref = std::sync::Mutex::new(&mut cluster);
                common::stream_chat(&http, addr, body(context, opts.max_tokens), |n| {
                    if n == opts.kill_after {
                        let i = cluster_ref.lock().unwrap().kill_busy(opts.kill_stage);
                        *killed.lock().unwrap() = Some(i);
                    }
                })
                .await
            };
            assert!(
                killed.into_inner().unwrap().is_some(),
                "the answer ended before {} tokens",
                opts.kill_after
            );
            // Positions the resumed generation imported instead of computing, and the nodes
            // (stages) that restored a checkpoint.
            let (_, restored) = cluster.coordinator.backend().restores();
            let restoring_nodes = cluster.counter(|c| &c.restores);
            // Deltas already on their way when the node died still arrive after the kill: the
            // failover is the longest gap from there on.
            let stall = run.longest_gap_from(opts.kill_after);
            let quiet = reference.longest_gap_from(opts.kill_after);
            if every == 0 {
                let ttft = (reference.first() - reference.start).as_secs_f64();
                rates.push((
                    reference.prompt_tokens,
                    reference.prompt_tokens as f64 / ttft,
                    reference.decode_rate(),
                ));
            }
            println!(
                "{:>7} {:>11} | {:>9} {:>7.1}/s {:>8.0} B | {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}",
                reference.prompt_tokens,
                if every == 0 {
                    "off".to_owned()
                } else {
                    format!("every {every}")
                },
                secs(reference.first() - reference.start),
                reference.decode_rate(),
                pushed as f64 / positions.max(1) as f64,
                secs(stall),
                secs(quiet),
                secs(stall.saturating_sub(quiet)),
                restored,
                restoring_nodes,
                if run.text == reference.text {
                    "yes"
                } else {
                    "NO"
                },
            );
            cluster.stop().await;
        }
    }
    // When a checkpoint pays: moving a position's entries must beat computing it again.
    println!("\nwhen checkpoints pay ({kv_per_position} B of KV per position):");
    let mbit = |bytes_per_second: f64| bytes_per_second * 8.0 / 1e6;
    for (prompt, prefill, decode) in rates {
        println!(
            "  {prompt} tokens: prefill {prefill:.0} tok/s, so re-prefilling them takes {:.1} s; fetching the checkpoint at failover beats that on links faster than {:.0} Mbit/s (with the holder as the resume target nothing moves at failover); checkpointing streams {:.0} Mbit/s to the peers during the prefill and {:.1} Mbit/s while decoding at {decode:.0} tok/s (all stages together)",
            prompt as f64 / prefill,
            mbit(prefill * kv_per_position as f64),
            mbit(prefill * kv_per_position as f64),
            mbit(decode * kv_per_position as f64),
        );
    }
}
