//! Conversions between the control-plane messages and membership's domain types. Everything
//! a peer sends is checked here, once: what passes is well-formed, what does not becomes a
//! [`WireError`] (an invalid request), never a panic.

use crate::membership::{
    HeartbeatInfo, JoinInfo, LocalModel, ModelSpeed, NodeCapability, NodeLoad, ShardReport,
    ShardState,
};
use crate::placement::{Assignment, ModelSpec};
use shoal_proto::v1;
use shoal_types::{LayerRange, ModelId, NodeId};
use std::collections::BTreeMap;

/// Most entries accepted in one repeated field (speeds, shards, models): bounds what a bad peer
/// can make the coordinator hold.
pub const MAX_LIST: usize = 1024;
/// Longest address accepted.
const MAX_ADDR: usize = 256;
/// Longest failure detail kept; longer ones are cut.
const MAX_DETAIL: usize = 1024;

/// Why a peer's message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The node id is not acceptable.
    #[error("node id {id:?} {problem}")]
    NodeId {
        /// What was sent.
        id: String,
        /// What is wrong with it.
        problem: crate::NodeIdProblem,
    },
    /// A required field is missing.
    #[error("{field} is required")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// A field has a value that cannot be right.
    #[error("{field} is invalid: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A repeated field has too many entries.
    #[error("{field} has more than {MAX_LIST} entries")]
    TooMany {
        /// The field.
        field: &'static str,
    },
}

impl WireError {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::NodeId { .. } => "invalid_node_id",
            WireError::Missing { .. } => "missing_field",
            WireError::Invalid { .. } => "invalid_field",
            WireError::TooMany { .. } => "too_many_entries",
        }
    }
}

fn node_id(raw: &str) -> Result<NodeId, WireError> {
    crate::check_node_id(raw).map_err(|problem| WireError::NodeId {
        id: raw.chars().take(80).collect(),
        problem,
    })?;
    Ok(NodeId::new(raw))
}

fn model_id(field: &'static str, raw: &str) -> Result<ModelId, WireError> {
    if raw.is_empty() || raw.len() > 256 {
        return Err(WireError::Invalid {
            field,
            why: "must be 1 to 256 bytes".into(),
        });
    }
    Ok(ModelId::new(raw))
}

fn bounded<T>(field: &'static str, list: &[T]) -> Result<(), WireError> {
    if list.len() > MAX_LIST {
        Err(WireError::TooMany { field })
    } else {
        Ok(())
    }
}

fn address(field: &'static str, raw: &str) -> Result<String, WireError> {
    if raw.len() > MAX_ADDR || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(WireError::Invalid {
            field,
            why: "must be host:port without spaces".into(),
        });
    }
    Ok(raw.to_owned())
}

fn layers(field: &'static str, r: Option<v1::LayerRange>) -> Result<LayerRange, WireError> {
    let r = r.ok_or(WireError::Missing { field })?;
    LayerRange::new(r.start, r.end).map_err(|e| WireError::Invalid {
        field,
        why: e.to_string(),
    })
}

/// Checks and converts a capability report.
pub fn capability(c: v1::Capability) -> Result<NodeCapability, WireError> {
    bounded("capability.speeds", &c.speeds)?;
    bounded("capability.cpu_features", &c.cpu_features)?;
    let speeds = c
        .speeds
        .into_iter()
        .map(|s| {
            Ok(ModelSpeed {
                model: model_id("capability.speeds.model_id", &s.model_id)?,
                layer_decode_seconds: s.layer_decode_seconds,
                head_seconds: s.head_seconds,
                decode_tokens_per_second: s.decode_tokens_per_second,
                layer_bytes: s.layer_bytes,
            })
        })
        .collect::<Result<_, WireError>>()?;
    Ok(NodeCapability {
        cores: c.cores,
        threads: c.threads,
        memory_total_bytes: c.memory_total_bytes,
        memory_available_bytes: c.memory_available_bytes,
        cpu_features: c.cpu_features,
        speeds,
        battery_percent: c.battery_percent,
        temperature_celsius: c.temperature_celsius,
    })
}

/// Checks and converts a join request.
pub fn join(r: v1::JoinRequest) -> Result<JoinInfo, WireError> {
    let node = node_id(&r.node_id)?;
    if r.data_addr.is_empty() {
        return Err(WireError::Missing { field: "data_addr" });
    }
    let data_addr = address("data_addr", &r.data_addr)?;
    let http_addr = if r.http_addr.is_empty() {
        None
    } else {
        Some(address("http_addr", &r.http_addr)?)
    };
    let capability = capability(r.capability.ok_or(WireError::Missing {
        field: "capability",
    })?)?;
    bounded("models", &r.models)?;
    let local_models = r
        .models
        .into_iter()
        .map(|m| {
            Ok(LocalModel {
                model: model_id("models.model_id", &m.model_id)?,
                sha256: m.sha256.to_ascii_lowercase(),
                bytes: m.bytes,
            })
        })
        .collect::<Result<_, WireError>>()?;
    Ok(JoinInfo {
        protocol_version: r.protocol_version,
        node,
        data_addr,
        http_addr,
        capability,
        local_models,
    })
}

/// Checks and converts a heartbeat.
pub fn heartbeat(r: v1::HeartbeatRequest) -> Result<HeartbeatInfo, WireError> {
    let node = node_id(&r.node_id)?;
    let load = r.load.map(|l| NodeLoad {
        queue_depth: l.queue_depth,
        active_sequences: l.active_sequences,
        kv_bytes: l.kv_bytes,
        tokens_per_second: l.tokens_per_second,
        tokens_generated_total: l.tokens_generated_total,
    });
    let capability = r.capability.map(capability).transpose()?;
    bounded("shards", &r.shards)?;
    let shards = r
        .shards
        .into_iter()
        .map(shard)
        .collect::<Result<_, WireError>>()?;
    Ok(HeartbeatInfo {
        node,
        sequence: r.sequence,
        load: load.unwrap_or_default(),
        capability,
        shards,
    })
}

fn shard(s: v1::ShardStatus) -> Result<ShardReport, WireError> {
    let a = s.assignment.ok_or(WireError::Missing {
        field: "shards.assignment",
    })?;
    let state = match v1::ShardState::try_from(s.state) {
        Ok(v1::ShardState::Loading) => ShardState::Loading,
        Ok(v1::ShardState::Ready) => ShardState::Ready,
        Ok(v1::ShardState::Failed) => ShardState::Failed,
        Ok(v1::ShardState::Unspecified) | Err(_) => {
            return Err(WireError::Invalid {
                field: "shards.state",
                why: format!("unknown state {}", s.state),
            });
        }
    };
    let mut detail = s.detail;
    if detail.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
    }
    Ok(ShardReport {
        model: model_id("shards.assignment.model_id", &a.model_id)?,
        sha256: a.model_sha256,
        layers: layers("shards.assignment.layers", a.layers)?,
        plan_epoch: a.plan_epoch,
        state,
        detail,
    })
}

/// An assignment as the wire carries it; the sha256 comes from the catalogue.
pub fn assignment(
    a: &Assignment,
    epoch: u64,
    catalogue: &BTreeMap<ModelId, ModelSpec>,
) -> v1::ShardAssignment {
    v1::ShardAssignment {
        model_id: a.model.to_string(),
        model_sha256: catalogue
            .get(&a.model)
            .map(|m| m.sha256.clone())
            .unwrap_or_default(),
        layers: Some(v1::LayerRange {
            start: a.layers.start(),
            end: a.layers.end(),
        }),
        plan_epoch: epoch,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn cap() -> v1::Capability {
        v1::Capability {
            cores: 4,
            memory_available_bytes: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn a_join_needs_a_good_id_an_address_and_a_capability() {
        let good = v1::JoinRequest {
            protocol_version: 1,
            node_id: "pi-1".into(),
            data_addr: "10.0.0.5:7070".into(),
            capability: Some(cap()),
            models: vec![v1::LocalModel {
                model_id: "m".into(),
                sha256: "AB".into(),
                bytes: 3,
            }],
            http_addr: String::new(),
        };
        let info = join(good.clone()).unwrap();
        assert_eq!(info.http_addr, None);
        assert_eq!(info.local_models[0].sha256, "ab");
        assert_eq!(info.capability.cores, 4);

        let bad_id = v1::JoinRequest {
            node_id: "a/../b".into(),
            ..good.clone()
        };
        assert_eq!(join(bad_id).unwrap_err().reason(), "invalid_node_id");
        let no_addr = v1::JoinRequest {
            data_addr: String::new(),
            ..good.clone()
        };
        assert_eq!(
            join(no_addr).unwrap_err(),
            WireError::Missing { field: "data_addr" }
        );
        let spaced = v1::JoinRequest {
            data_addr: "a b:1".into(),
            ..good.clone()
        };
        assert_eq!(join(spaced).unwrap_err().reason(), "invalid_field");
        let no_cap = v1::JoinRequest {
            capability: None,
            ..good.clone()
        };
        assert_eq!(
            join(no_cap).unwrap_err(),
            WireError::Missing {
                field: "capability"
            }
        );
        let flood = v1::JoinRequest {
            models: vec![v1::LocalModel::default(); MAX_LIST + 1],
            ..good
        };
        assert_eq!(join(flood).unwrap_err().reason(), "too_many_entries");
    }

    #[test]
    fn heartbeat_shards_must_be_well_formed() {
        let status = |start, end, state: i32| v1::ShardStatus {
            assignment: Some(v1::ShardAssignment {
                model_id: "m".into(),
                model_sha256: String::new(),
                layers: Some(v1::LayerRange { start, end }),
                plan_epoch: 2,
            }),
            state,
            detail: "é".repeat(MAX_DETAIL),
        };
        let hb = |shards| v1::HeartbeatRequest {
            node_id: "n".into(),
            sequence: 3,
            shards,
            ..Default::default()
        };
        let ok = heartbeat(hb(vec![status(0, 30, v1::ShardState::Ready as i32)])).unwrap();
        assert_eq!(ok.shards[0].state, ShardState::Ready);
        assert_eq!(ok.shards[0].layers, LayerRange::new(0, 30).unwrap());
        assert!(ok.shards[0].detail.len() <= MAX_DETAIL);
        assert_eq!(ok.load, NodeLoad::default());

        assert_eq!(
            heartbeat(hb(vec![status(5, 5, 2)])).unwrap_err().reason(),
            "invalid_field"
        );
        assert_eq!(
            heartbeat(hb(vec![status(0, 1, 0)])).unwrap_err().reason(),
            "invalid_field"
        );
        assert_eq!(
            heartbeat(hb(vec![status(0, 1, 77)])).unwrap_err().reason(),
            "invalid_field"
        );
        let missing = v1::ShardStatus {
            assignment: None,
            state: 2,
            detail: String::new(),
        };
        assert_eq!(
            heartbeat(hb(vec![missing])).unwrap_err().reason(),
            "missing_field"
        );
    }
}
