//! `shoal status` and `shoal drain`: the cluster as the coordinator sees it, and moving work
//! off a node.

use crate::tls::TlsArgs;
use anyhow::{Context, Result};
use clap::Args;
use shoal_net::{ConnectOptions, Role, ShoalAdminClient};
use shoal_proto::v1;
use std::fmt::Write as _;
use std::time::Duration;

/// Deadline of one admin call.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// How to reach the coordinator's Admin service.
#[derive(Debug, Args)]
pub struct AdminTarget {
    /// The coordinator's gRPC address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub coordinator: String,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Arguments of `shoal status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print the raw status as JSON-like debug output instead of tables.
    #[arg(long)]
    pub raw: bool,
}

/// Arguments of `shoal drain` / `shoal undrain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The node.
    pub node: String,
    #[command(flatten)]
    pub target: AdminTarget,
}

/// An Admin client on the coordinator `target` names.
pub(crate) async fn admin(target: &AdminTarget) -> Result<ShoalAdminClient> {
    let tls = target.tls.mode(Role::Client, "operator")?;
    let opts = ConnectOptions {
        expect_role: Some(Role::Coordinator),
        ..ConnectOptions::default()
    };
    let channel = shoal_net::connect(&target.coordinator, &tls, opts)
        .await
        .with_context(|| format!("connecting to the coordinator at {}", target.coordinator))?;
    Ok(shoal_net::admin_client(channel, CALL_DEADLINE))
}

/// Prints the cluster's status.
pub fn run(args: StatusArgs) -> Result<()> {
    let status = fetch(&args.target)?;
    if args.raw {
        println!("{status:#?}");
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// Prints the current plan's explanation: per model, where it runs, the alternatives
/// considered with their predicted tokens/s, and why each other node was left out.
pub fn plan(target: AdminTarget) -> Result<()> {
    let status = fetch(&target)?;
    println!("{}", status.placement.trim_end());
    Ok(())
}

fn fetch(target: &AdminTarget) -> Result<v1::ClusterStatusResponse> {
    crate::runtime()?.block_on(async {
        let mut admin = admin(target).await?;
        Ok(admin
            .cluster_status(v1::ClusterStatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner())
    })
}

/// Drains (or undrains) a node.
pub fn drain(args: DrainArgs, undrain: bool) -> Result<()> {
    crate::runtime()?.block_on(async {
        let mut admin = admin(&args.target).await?;
        let req = v1::DrainRequest {
            node_id: args.node.clone(),
        };
        let r = if undrain {
            admin.undrain(req).await
        } else {
            admin.drain(req).await
        };
        r.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        println!(
            "{} {}",
            args.node,
            if undrain {
                "is back in service"
            } else {
                "is draining: it takes no new requests and finishes those it has"
            }
        );
        Ok(())
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn shard_state(s: i32) -> &'static str {
    match v1::ShardState::try_from(s) {
        Ok(v1::ShardState::Loading) => "loading",
        Ok(v1::ShardState::Ready) => "ready",
        Ok(v1::ShardState::Failed) => "failed",
        _ => "?",
    }
}

/// The status as tables.
pub fn render(s: &v1::ClusterStatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {} · plan epoch {}",
        s.cluster_id, s.plan_epoch
    );
    let _ = writeln!(
        out,
        "\n{:<14} {:<9} {:<22} {:>5} {:>11} {:>8} {:>7} {:>6} {:>9} {:>8}  shards",
        "NODE", "STATE", "DATA", "CORES", "MEM FREE", "TOK/S*", "QUEUE", "ACTIVE", "KV", "HB AGE"
    );
    for n in &s.nodes {
        let cap = n.capability.clone().unwrap_or_default();
        let load = n.load.unwrap_or_default();
        let speed = cap
            .speeds
            .iter()
            .map(|m| format!("{:.0}", m.decode_tokens_per_second))
            .collect::<Vec<_>>()
            .join(",");
        let shards = n
            .shards
            .iter()
            .map(|sh| {
                let a = sh.assignment.clone().unwrap_or_default();
                let l = a.layers.unwrap_or_default();
                format!(
                    "{}[{}..{})={}",
                    a.model_id,
                    l.start,
                    l.end,
                    shard_state(sh.state)
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        let age = n
            .heartbeat_age_ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"));
        let _ = writeln!(
            out,
            "{:<14} {:<9} {:<22} {:>5} {:>11} {:>8} {:>7} {:>6} {:>9} {:>8}  {}",
            n.node_id,
            n.state,
            n.data_addr,
            format!("{}/{}", cap.threads, cap.cores),
            mib(cap.memory_available_bytes),
            if speed.is_empty() { "-".into() } else { speed },
            load.queue_depth,
            load.active_sequences,
            mib(load.kv_bytes),
            age,
            shards
        );
        let mut extra = Vec::new();
        if !cap.cpu_features.is_empty() {
            extra.push(cap.cpu_features.join(","));
        }
        if let Some(b) = cap.battery_percent {
            extra.push(format!("battery {b:.0}%"));
        }
        if let Some(t) = cap.temperature_celsius {
            extra.push(format!("{t:.0} °C"));
        }
        if !extra.is_empty() {
            let _ = writeln!(out, "{:<14} {}", "", extra.join(" · "));
        }
    }
    let _ = writeln!(
        out,
        "(* measured decode tokens/s of each model on the node; threads/cores)"
    );
    let _ = writeln!(out, "\nMODELS");
    for m in &s.models {
        let placed = m
            .shards
            .iter()
            .map(|p| {
                let l = p.layers.unwrap_or_default();
                format!(
                    "{}[{}..{}){}",
                    p.node_id,
                    l.start,
                    l.end,
                    if p.ready { "" } else { " (not ready)" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "{} · {} layers · {} · context {} · on: {}",
            m.model_id,
            m.n_layers,
            mib(m.file_bytes),
            m.context_length,
            if placed.is_empty() {
                "nowhere".into()
            } else {
                placed
            }
        );
    }
    let _ = writeln!(out, "\nPLACEMENT\n{}", s.placement.trim_end());
    out
}
