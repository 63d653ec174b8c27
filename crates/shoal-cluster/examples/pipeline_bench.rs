//! Pipeline benchmarks on a real model: a coordinator and agents in this process, on
//! loopback over mTLS, every agent with one compute thread, greedy decoding of a fixed prompt
//! through the OpenAI gateway (streamed).
//!
//! Prints, for one node and pipelines of 2 and 3 stages, single-stream decode tokens/s (and
//! their ratio to one node); for 2 stages, the aggregate tokens/s of concurrent streams
//! against one stream, each hop's latency (p50/p99, from the agents' link metrics) and the
//! bytes per token crossing each hop; then the same 2-stage figures with a delay and packet
//! loss on the stage link (a fault-injecting proxy between the stages; loss through nftables
//! when this process may use it, else emulated in the proxy; the output says which).
//! Figures only: nothing is asserted.
//!
//! ```text
//! cargo run --release -p shoal-cluster --example pipeline_bench -- \
//!     [--model PATH] [--tokens 128] [--runs 3] [--streams 8] [--delay-ms 5] [--loss-pct 1] \
//!     [--codec f16|f32|q8] [--stages 1,2,3] [--no-faults]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Streamed;
use serde_json::json;
use shoal_cluster::Coordinator;
use shoal_control::{ModelSpec, PlacementMode};
use shoal_net::Role;
use shoal_net::faults::{FaultProxy, Faults, LossModel, MIN_RTO, NftLoss};
use shoal_node::{Agent, AgentConfig, LatencySnapshot, ModelFile, Peer, PeerTotals};
use shoal_pipeline::Preference;
use shoal_types::{ModelId, NodeId};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "bench";
const PROMPT: &str = "Count from 1 to 500, separated by commas.";
/// Context the planner reserves per sequence (prompt plus completion fit).
const KV_TOKENS: u32 = 512;

#[derive(Debug, Clone)]
struct Opts {
    model: PathBuf,
    tokens: u32,
    runs: usize,
    streams: usize,
    delay: Duration,
    loss_pct: u8,
    codec: Preference,
    stages: Vec<usize>,
    faults: bool,
}

fn parse() -> Opts {
    let mut o = Opts {
        model: PathBuf::from(common::DEFAULT_MODEL),
        tokens: 128,
        runs: 3,
        streams: 8,
        delay: Duration::from_millis(5),
        loss_pct: 1,
        codec: Preference::Balanced,
        stages: vec![1, 2, 3],
        faults: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model" => o.model = PathBuf::from(val()),
            "--tokens" => o.tokens = val().parse().expect("--tokens"),
            "--runs" => o.runs = val().parse().expect("--runs"),
            "--streams" => o.streams = val().parse().expect("--streams"),
            "--delay-ms" => o.delay = Duration::from_millis(val().parse().expect("--delay-ms")),
            "--loss-pct" => o.loss_pct = val().parse().expect("--loss-pct"),
            "--codec" => {
                o.codec = match val().as_str() {
                    "f16" => Preference::Balanced,
                    "f32" => Preference::Exact,
                    "q8" => Preference::Smallest,
                    other => panic!("unknown codec {other}"),
                }
            }
            "--stages" => {
                o.stages = val()
                    .split(',')
                    .map(|s| s.parse().expect("--stages"))
                    .collect()
            }
            "--no-faults" => o.faults = false,
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

struct BenchAgent {
    agent: Agent,
    _cancel: CancellationToken,
    /// In front of its data plane, when the run injects faults.
    proxy: Option<FaultProxy>,
}

struct Cluster {
    coordinator: Coordinator,
    agents: Vec<BenchAgent>,
    /// Agent indexes in stage order.
    chain: Vec<usize>,
    http: reqwest::Client,
}

impl Cluster {
    async fn start(
        model: &ModelFile,
        spec: &ModelSpec,
        stages: usize,
        codec: Preference,
        proxied: bool,
    ) -> Cluster {
        let (placement, memory_budget) = if stages == 1 {
            (PlacementMode::Replicate, None)
        } else {
            // Room for one share of the layers and no more: the planner must split the model
            // over exactly `stages` nodes.
            let per_node = spec.n_layers.div_ceil(stages as u32);
            let range = shoal_types::LayerRange::new(0, per_node).unwrap();
            let budget = spec.need_bytes(range, KV_TOKENS) + spec.layer_bytes * 9 / 10;
            (
                PlacementMode::Shard {
                    max_stages: stages as u32,
                },
                Some(budget),
            )
        };
        let (coordinator, ca) =
            common::start_coordinator(spec, placement, KV_TOKENS, 3000, |backend| {
                backend.pipeline_codec = codec;
            })
            .await;
        let mut agents = Vec::new();
        for i in 1..=stages {
            let name = format!("agent-{i}");
            let port = shoal_net::faults::free_port().unwrap();
            let proxy = if proxied {
                let upstream = format!("127.0.0.1:{port}").parse().unwrap();
                let p =
                    FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream, Faults::default())
                        .await
                        .unwrap();
                Some(p)
            } else {
                None
            };
            let cfg = AgentConfig {
                node_id: NodeId::new(&name),
                coordinator: coordinator.grpc_addr().to_string(),
                tls: common::tls(&ca, Role::Agent, &name),
                data_listen: format!("127.0.0.1:{port}").parse().unwrap(),
                advertise_addr: proxy.as_ref().map(|p| p.local_addr().to_string()),
                http_listen: None,
                models: vec![model.clone()],
                threads: 1,
                engine: shoal_engine::EngineConfig::default(),
                default_max_tokens: 16,
                memory_budget,
                checkpoint_store: None,
                benchmark: false,
                model_keys: None,
            };
            let cancel = CancellationToken::new();
            let agent = Agent::start(cfg, cancel.clone()).await.unwrap();
            agents.push(BenchAgent {
                agent,
                _cancel: cancel,
                proxy,
            });
        }
        let mut cluster = Cluster {
            coordinator,
            agents,
            chain: Vec::new(),
            http: reqwest::Client::new(),
        };
        cluster.wait_ready(stages).await;
        cluster
    }

    async fn wait_ready(&mut self, stages: usize) {
        let v = common::wait_serving(&self.coordinator, stages).await;
        let chains = v.plan.chains(&ModelId::new(MODEL));
        let c = chains.first().expect("a replica of the model");
        assert_eq!(c.stages.len(), stages, "the planner made another pipeline");
        self.chain = c
            .stages
            .iter()
            .map(|a| {
                let n: usize = a
                    .node
                    .as_str()
                    .trim_start_matches("agent-")
                    .parse()
                    .unwrap();
                n - 1
            })
            .collect();
        let layers: Vec<String> = c
            .stages
            .iter()
            .map(|a| format!("{}:{}", a.node, a.layers))
            .collect();
        println!("  pipeline: {}", layers.join(" -> "));
    }

    /// The agent running stage `i`.
    fn stage(&self, i: usize) -> &BenchAgent {
        &self.agents[self.chain[i]]
    }

    /// Per hop (stage i → i+1), what the receiving stage exchanged with its previous one.
    fn hops(&self) -> Vec<(PeerTotals, LatencySnapshot, (u64, u64))> {
        (1..self.chain.len())
            .map(|i| {
                let a = self.stage(i);
                let links = a.agent.metrics().links();
                let wire = a.proxy.as_ref().map_or((0, 0), FaultProxy::bytes);
                (links.with(Peer::Previous), links.hop_latency(), wire)
            })
            .collect()
    }

    async fn stream(&self, max_tokens: u32) -> Streamed {
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        common::stream_chat(&self.http, self.coordinator.http_addr(), body, |_| {}).await
    }

    /// `n` concurrent streams; aggregate decode tokens/s and the runs.
    async fn concurrent(&self, n: usize, max_tokens: u32) -> (f64, Vec<Streamed>) {
        let runs = futures::future::join_all((0..n).map(|_| self.stream(max_tokens))).await;
        let decoded: u64 = runs
            .iter()
            .map(|r| r.completion_tokens.saturating_sub(1))
            .sum();
        let from = runs.iter().map(Streamed::first).min().unwrap();
        let to = runs.iter().map(Streamed::last).max().unwrap();
        (decoded as f64 / (to - from).as_secs_f64(), runs)
    }

    async fn stop(self) {
        for a in self.agents {
            let _ = a.agent.shutdown(Duration::from_secs(1)).await;
        }
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.3} ms", d.as_secs_f64() * 1e3))
}

/// `p50 … p99 …` of a hop's latency.
fn percentiles(lat: &LatencySnapshot) -> String {
    format!(
        "p50 {} p99 {}",
        ms(lat.quantile(0.5)),
        ms(lat.quantile(0.99))
    )
}

/// Single-stream decode rate, median of `runs`.
async fn single(cluster: &Cluster, opts: &Opts) -> (f64, Vec<f64>) {
    let mut rates = Vec::new();
    for _ in 0..opts.runs {
        let r = cluster.stream(opts.tokens).await;
        if r.completion_tokens < u64::from(opts.tokens) {
            println!("  (a stream stopped after {} tokens)", r.completion_tokens);
        }
        rates.push(r.decode_rate());
    }
    (common::median(rates.clone()), rates)
}

/// Prints the 2-stage figures: single vs concurrent, hop latency, bytes per token.
async fn two_stage_figures(cluster: &Cluster, opts: &Opts, hidden: u64) -> (f64, f64) {
    let before = cluster.hops();
    let (one, rates) = single(cluster, opts).await;
    println!(
        "  1 stream:  {one:.1} tok/s (median of {:?})",
        rates.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>()
    );
    let mid = cluster.hops();
    for (h, ((_, l0, _), (_, l1, _))) in before.iter().zip(&mid).enumerate() {
        let lat = l1.since(l0);
        println!(
            "  hop {h}->{} with 1 stream: latency {} over {} steps",
            h + 1,
            percentiles(&lat),
            lat.count()
        );
    }
    let mut aggs = Vec::new();
    let mut produced = 0u64;
    for _ in 0..opts.runs {
        let (agg, runs) = cluster.concurrent(opts.streams, opts.tokens).await;
        produced += runs.iter().map(|r| r.completion_tokens).sum::<u64>();
        let ttft = runs
            .iter()
            .map(|r| (r.first() - r.start).as_secs_f64() * 1e3)
            .fold(0f64, f64::max);
        println!(
            "    {} streams: {agg:.1} tok/s aggregate (slowest first token {ttft:.0} ms)",
            opts.streams
        );
        aggs.push(agg);
    }
    let agg = common::median(aggs);
    println!(
        "  {} streams: {agg:.1} tok/s aggregate (median) = {:.2}x one stream (target >= 2.5x)",
        opts.streams,
        agg / one
    );
    let after = cluster.hops();
    let budget = 2 * hidden + 64;
    for (h, (((t0, _, w0), (_, l0, _)), (t1, l1, w1))) in
        before.iter().zip(&mid).zip(&after).enumerate()
    {
        let t = t1.since(t0);
        let lat = l1.since(l0);
        let rows = t.received.rows.max(1);
        let per_row = t.bytes() as f64 / rows as f64;
        println!(
            "  hop {h}->{} with {} streams: latency {} mean {} over {} steps (includes waiting behind the stage's previous step)",
            h + 1,
            opts.streams,
            percentiles(&lat),
            ms(lat.mean()),
            lat.count()
        );
        println!(
            "    frames (whole block): {:.1} B per token position (down {:.1} + up {:.1}; {} rows, {} tokens sampled) vs target {budget} B (2 x {hidden} + 64)",
            per_row,
            t.received.bytes as f64 / rows as f64,
            t.sent.bytes as f64 / rows as f64,
            t.received.rows,
            produced,
        );
        if w1 != &(0, 0) {
            let wire = (w1.0 - w0.0) + (w1.1 - w0.1);
            println!(
                "    on the wire (TLS + HTTP/2 + gRPC framing, both directions, from the proxy): {:.1} B per token position",
                wire as f64 / rows as f64
            );
        }
    }
    (one, agg)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let opts = parse();
    let (model, spec) = common::model_file(MODEL, &opts.model);
    let hidden = {
        let file = shoal_gguf::GgufFile::open(&opts.model).unwrap();
        shoal_model::ModelConfig::from_gguf(&file).unwrap().hidden as u64
    };
    println!(
        "pipeline_bench: {} ({} layers, hidden {hidden}), {} tokens per stream, {} runs, codec {:?}, 1 compute thread per agent, {} cores",
        opts.model.display(),
        spec.n_layers,
        opts.tokens,
        opts.runs,
        opts.codec,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("prompt: {PROMPT:?} (greedy)");

    let mut base = None;
    for &stages in &opts.stages {
        println!("\n== {stages} stage(s), loopback");
        let cluster = Cluster::start(&model, &spec, stages, opts.codec, false).await;
        // Warm up: links open, caches fault in.
        let _ = cluster.stream(16).await;
        if stages == 2 {
            let (one, _) = two_stage_figures(&cluster, &opts, hidden).await;
            report_ratio(stages, one, base);
        } else {
            let (one, rates) = single(&cluster, &opts).await;
            println!(
                "  1 stream: {one:.1} tok/s (median of {:?})",
                rates.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>()
            );
            if stages == 1 {
                base = Some(one);
            }
            report_ratio(stages, one, base);
            if stages > 2 {
                print_hops(&cluster);
            }
        }
        cluster.stop().await;
    }

    if opts.faults {
        println!(
            "\n== 2 stages, {} ms one-way delay and {} % loss on the stage link",
            opts.delay.as_millis(),
            opts.loss_pct
        );
        let cluster = Cluster::start(&model, &spec, 2, opts.codec, true).await;
        let proxy = cluster.stage(1).proxy.as_ref().unwrap();
        let port = proxy.local_addr().port();
        let (loss, _guard) = if opts.loss_pct == 0 {
            (LossModel::None, None)
        } else if NftLoss::available() {
            let g = NftLoss::install(port, opts.loss_pct).expect("installing the nftables rule");
            println!(
                "  loss model: real packet loss, nftables table inet {} drops {} % of TCP packets to/from port {port} (kernel retransmits)",
                g.table(),
                opts.loss_pct
            );
            (LossModel::None, Some(g))
        } else {
            println!(
                "  loss model: emulated in the proxy (no nftables here): {} % of chunks stall one minimum RTO ({} ms)",
                opts.loss_pct,
                MIN_RTO.as_millis()
            );
            (
                LossModel::Stall {
                    probability: f64::from(opts.loss_pct) / 100.0,
                    stall: MIN_RTO,
                },
                None,
            )
        };
        proxy.set_faults(Faults {
            delay: opts.delay,
            loss,
        });
        println!(
            "  delay: {} ms per direction in a userspace proxy between stage 0 and stage 1",
            opts.delay.as_millis()
        );
        let _ = cluster.stream(16).await;
        two_stage_figures(&cluster, &opts, hidden).await;
        cluster.stop().await;
    }
}

fn report_ratio(stages: usize, one: f64, base: Option<f64>) {
    if let Some(b) = base
        && stages > 1
    {
        let target = if stages == 2 { " (target >= 0.9x)" } else { "" };
        println!("  = {:.2}x one node{target}", one / b);
    }
}

fn print_hops(cluster: &Cluster) {
    for (h, (_, lat, _)) in cluster.hops().iter().enumerate() {
        println!(
            "  hop {h}->{}: latency {} over {} steps (whole run)",
            h + 1,
            percentiles(lat),
            lat.count()
        );
    }
}
