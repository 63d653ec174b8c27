//! The human-readable account of a placement.

use super::{Alternative, NodeId, Placement};
use std::fmt::Write as _;

impl Placement {
    /// A human-readable account of the plan: where each model went, every alternative weighed
    /// with its predicted single-stream decode speed and why it was or was not chosen, and for
    /// every node left out, why.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(out, "plan epoch {}", self.plan.epoch);
        for o in &self.outcomes {
            if o.invalid {
                let _ = writeln!(out, "model {}: not placed: the spec has no layers", o.model);
                continue;
            }
            if o.placed_on.is_empty() {
                let _ = writeln!(
                    out,
                    "model {} (needs {} B): NOT PLACED",
                    o.model, o.need_bytes
                );
            } else {
                let nodes: Vec<&str> = o.placed_on.iter().map(NodeId::as_str).collect();
                let _ = writeln!(
                    out,
                    "model {} (needs {} B): on {}",
                    o.model,
                    o.need_bytes,
                    nodes.join(", ")
                );
            }
            if !o.alternatives.is_empty() {
                let _ = writeln!(out, "  alternatives (predicted single-stream decode):");
                for a in &o.alternatives {
                    let _ = writeln!(out, "    {}: {}", shape(a), a.verdict);
                }
            } else if o.placed_on.is_empty() && !o.excluded.is_empty() {
                let _ = writeln!(
                    out,
                    "  no whole replica or pipeline fits the memory left on usable nodes"
                );
            }
            for (node, why) in &o.excluded {
                let _ = writeln!(out, "  {node}: {why}");
            }
            for node in &o.unknown_pins {
                let _ = writeln!(out, "  {node}: pinned but not a known node");
            }
            if o.placed_on.is_empty() && o.excluded.is_empty() {
                let _ = writeln!(out, "  no nodes in the cluster");
            }
        }
        out
    }
}

/// `whole on a: 12.50 tok/s (compute 80.0 ms)` or
/// `pipeline a [0, 12) -> b [12, 30): 9.10 tok/s (compute 100.0 ms + hops 9.9 ms)`.
fn shape(a: &Alternative) -> String {
    let mut s = String::new();
    if let [only] = a.stages.as_slice() {
        let _ = write!(s, "whole on {}", only.node);
    } else {
        let stages: Vec<String> = a
            .stages
            .iter()
            .map(|st| format!("{} {}", st.node, st.layers))
            .collect();
        let _ = write!(s, "pipeline {}", stages.join(" -> "));
    }
    let p = &a.prediction;
    let _ = write!(
        s,
        ": {:.2} tok/s (compute {:.1} ms",
        p.tokens_per_second,
        p.compute_seconds * 1e3
    );
    if a.is_pipeline() {
        let _ = write!(s, " + hops {:.1} ms", p.hop_seconds * 1e3);
    }
    s.push(')');
    if !p.measured {
        s.push_str(" [assumed speeds]");
    }
    s
}
