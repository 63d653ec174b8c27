//! When KV-cache checkpoints pay: a generation with a long context loses its node in the
//! middle, and resumes on the other replica either by prefilling its whole context again or
//! from the checkpoint that replica holds.
//!
//! A coordinator and two agents (whole-model replicas, one compute thread each) run in this
//! process, on loopback over mTLS. For each context length, with checkpoints off and then on
//! (`--every` positions between checkpoints), it streams one seeded completion without a
//! fault, then the same one while the agent serving it is killed after `--kill-after` tokens.
//! It prints the stall the client saw at the failover (the longest gap between two tokens
//! after the kill) beside the same gap in the fault-free run, whether the output was identical, what the
//! survivor imported, and what checkpointing cost the fault-free run (decode tokens/s, bytes
//! pushed per token). Figures only: nothing is asserted.
//!
//! ```text
//! cargo run --release -p shoal-cluster --example checkpoint_bench -- \
//!     [--model PATH] [--contexts 256,512,1024,2048] [--every 64] [--kill-after 16] \
//!     [--max-tokens 48]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{Value, json};
use shoal_cluster::Coordinator;
use shoal_control::{ModelSpec, PlacementMode};
use shoal_net::Role;
use shoal_node::{Agent, AgentConfig, ModelFile};
use shoal_types::NodeId;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
}

fn parse() -> Opts {
    let mut o = Opts {
        model: PathBuf::from(common::DEFAULT_MODEL),
        contexts: vec![256, 512, 1024, 2048],
        every: 64,
        kill_after: 16,
        max_tokens: 48,
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
    async fn start(model: &ModelFile, spec: &ModelSpec, context: u32, every: u32) -> Cluster {
        let (coordinator, ca) =
            common::start_coordinator(spec, PlacementMode::Replicate, context, 2000, |backend| {
                backend.checkpoint_every = every;
                // A 2k-token prefill on one thread takes longer than the default bound.
                backend.first_token_timeout = Duration::from_secs(300);
            })
            .await;
        let mut agents = Vec::new();
        for i in 1..=2 {
            let name = format!("agent-{i}");
            let cfg = AgentConfig {
                node_id: NodeId::new(&name),
                coordinator: coordinator.grpc_addr().to_string(),
                tls: common::tls(&ca, Role::Agent, &name),
                data_listen: "127.0.0.1:0".parse().unwrap(),
                advertise_addr: None,
                http_listen: Some("127.0.0.1:0".parse().unwrap()),
                models: vec![model.clone()],
                threads: 1,
                engine: shoal_engine::EngineConfig::default(),
                default_max_tokens: 16,
                memory_budget: None,
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
        common::wait_serving(&cluster.coordinator, 2).await;
        cluster
    }

    /// Kills the agent with a request in flight (no Leave: like a crash, its connections
    /// close); returns its index.
    fn kill_busy(&mut self) -> usize {
        let router = self.coordinator.backend().router();
        let busy = (0..self.agents.len())
            .find(|&i| router.in_flight(&NodeId::new(format!("agent-{}", i + 1))) > 0)
            .expect("an agent with a request in flight");
        let (agent, cancel) = self.agents[busy].take().unwrap();
        cancel.cancel();
        drop(agent);
        busy
    }

    /// KV positions agent `i` imported from checkpoints (its `/metrics`).
    async fn restored_positions(&self, i: usize) -> u64 {
        let Some((agent, _)) = &self.agents[i] else {
            return 0;
        };
        let url = format!("http://{}/metrics", agent.http_addr().unwrap());
        let text = self
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("shoal_node_kv_restored_tokens_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
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
    println!(
        "checkpoint_bench: {} ({} layers, {kv_per_position} B of KV per position), 2 replicas with 1 compute thread each, {} cores; checkpoints every {} positions; kill after {} tokens of {}",
        opts.model.display(),
        spec.n_layers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        opts.every,
        opts.kill_after,
        opts.max_tokens,
    );
    println!(
        "\n{:>7} {:>11} | {:>9} {:>9} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>9}",
        "prompt",
        "checkpoints",
        "ttft",
        "decode",
        "pushed/tok",
        "stall",
        "no-fault",
        "extra",
        "restored",
        "identical"
    );
    // Per context, without checkpoints: (prompt tokens, prefill tokens/s, decode tokens/s).
    let mut rates = Vec::new();
    for &context in &opts.contexts {
        for every in [0, opts.every] {
            let mut cluster = Cluster::start(&model, &spec, context + opts.max_tokens, every).await;
            let (http, addr) = (cluster.http.clone(), cluster.coordinator.http_addr());
            // Fault-free: the reference output and what checkpointing costs.
            let reference =
                common::stream_chat(&http, addr, body(context, opts.max_tokens), |_| {}).await;
            let pushed: u64 = (0..2)
                .filter_map(|i| cluster.counters(i))
                .map(|c| c.pushed_bytes.load(Ordering::Relaxed))
                .sum();
            let positions = reference.prompt_tokens + reference.completion_tokens;
            // The same request again, its node killed after `kill_after` tokens.
            let killed = std::sync::Mutex::new(None);
            let run = {
                let cluster_ref = std::sync::Mutex::new(&mut cluster);
                common::stream_chat(&http, addr, body(context, opts.max_tokens), |n| {
                    if n == opts.kill_after {
                        *killed.lock().unwrap() = Some(cluster_ref.lock().unwrap().kill_busy());
                    }
                })
                .await
            };
            let killed = killed.into_inner().unwrap().expect("an agent was killed");
            let survivor = 1 - killed;
            let restored = cluster.restored_positions(survivor).await;
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
                "{:>7} {:>11} | {:>9} {:>7.1}/s {:>8.0} B | {:>9} {:>9} {:>9} {:>9} {:>9}",
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
            "  {prompt} tokens: prefill {prefill:.0} tok/s, so re-prefilling them takes {:.1} s; fetching the checkpoint at failover beats that on links faster than {:.0} Mbit/s (with the holder as the resume target nothing moves at failover); checkpointing streams {:.0} Mbit/s to the peer during the prefill and {:.1} Mbit/s while decoding at {decode:.0} tok/s",
            prompt as f64 / prefill,
            mbit(prefill * kv_per_position as f64),
            mbit(prefill * kv_per_position as f64),
            mbit(decode * kv_per_position as f64),
        );
    }
}
