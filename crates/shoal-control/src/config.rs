//! The coordinator's configuration: one serde struct that a TOML file (or the CLI's layering
//! of defaults, file, env and flags) fills, validated once into [`ValidatedCoordinatorConfig`]
//! with every problem reported together.

use crate::membership::MembershipConfig;
use crate::placement::{ModelSpec, PlacementMode, PlacementPolicy};
use crate::store::{MemoryStore, RedbStore, StateStore, StoreError};
use serde::{Deserialize, Serialize};
use shoal_types::{ModelId, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Default lease: a node silent this long is declared dead (four heartbeats missed).
pub const DEFAULT_LEASE_MS: u64 = 2_000;
/// Default heartbeat interval nodes are told to use.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 500;

/// The coordinator's settings as written by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// A node that sends no heartbeat for this long is declared dead (milliseconds).
    pub lease_ms: u64,
    /// Nodes send a heartbeat this often (milliseconds).
    pub heartbeat_interval_ms: u64,
    /// Static pins: a pinned model is placed only on the listed nodes.
    pub pins: BTreeMap<ModelId, Vec<NodeId>>,
    /// Replicas per model; absent places one on every eligible node with room.
    pub replicas: Option<usize>,
    /// Tokens of KV cache reserved beside each placed model.
    pub kv_reserve_tokens: u32,
    /// Whole replicas, pipelines, or whichever fits (the default).
    pub placement: PlacementMode,
    /// The state database file; absent keeps state in memory (lost on restart).
    pub store_path: Option<PathBuf>,
    /// The models the cluster serves.
    pub models: Vec<ModelSpec>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            lease_ms: DEFAULT_LEASE_MS,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            pins: BTreeMap::new(),
            replicas: None,
            kv_reserve_tokens: PlacementPolicy::default().kv_reserve_tokens,
            placement: PlacementMode::default(),
            store_path: None,
            models: Vec::new(),
        }
    }
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigProblem {
    /// The lease is zero.
    ZeroLease,
    /// The heartbeat interval is zero.
    ZeroHeartbeat,
    /// The lease does not cover two heartbeats, so one lost heartbeat would kill a node.
    LeaseTooShort {
        /// Configured lease.
        lease_ms: u64,
        /// Configured interval.
        heartbeat_interval_ms: u64,
    },
    /// A duration does not fit the protocol's 32-bit millisecond fields.
    TooLong {
        /// The setting.
        field: &'static str,
        /// Its value.
        ms: u64,
    },
    /// `replicas = 0` would place nothing.
    ZeroReplicas,
    /// The store path is empty.
    EmptyStorePath,
    /// A model id is empty.
    EmptyModelId,
    /// Two models share an id.
    DuplicateModel(ModelId),
    /// A model spec is inconsistent.
    BadModel {
        /// The model.
        model: ModelId,
        /// What is wrong.
        why: &'static str,
    },
    /// A pin names a model the catalogue does not have.
    PinnedUnknownModel(ModelId),
    /// A pin lists no node.
    EmptyPin(ModelId),
    /// A pin lists a node id that is not valid.
    BadPinnedNode {
        /// The model.
        model: ModelId,
        /// The node id.
        node: NodeId,
        /// What is wrong with it.
        why: crate::NodeIdProblem,
    },
    /// A pin lists a node twice.
    DuplicatePinnedNode {
        /// The model.
        model: ModelId,
        /// The repeated node.
        node: NodeId,
    },
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigProblem::ZeroLease => f.write_str("lease_ms must be greater than zero"),
            ConfigProblem::ZeroHeartbeat => {
                f.write_str("heartbeat_interval_ms must be greater than zero")
            }
            ConfigProblem::LeaseTooShort {
                lease_ms,
                heartbeat_interval_ms,
            } => write!(
                f,
                "lease_ms ({lease_ms}) must be at least twice heartbeat_interval_ms ({heartbeat_interval_ms})"
            ),
            ConfigProblem::TooLong { field, ms } => {
                write!(f, "{field} ({ms}) exceeds {} ms", u32::MAX)
            }
            ConfigProblem::ZeroReplicas => {
                f.write_str("replicas must be at least 1 (omit it for 'everywhere')")
            }
            ConfigProblem::EmptyStorePath => f.write_str("store_path is empty"),
            ConfigProblem::EmptyModelId => f.write_str("a model has an empty id"),
            ConfigProblem::DuplicateModel(m) => write!(f, "model {m} is listed twice"),
            ConfigProblem::BadModel { model, why } => write!(f, "model {model}: {why}"),
            ConfigProblem::PinnedUnknownModel(m) => write!(f, "pins: model {m} is not in models"),
            ConfigProblem::EmptyPin(m) => write!(f, "pins: model {m} lists no node"),
            ConfigProblem::BadPinnedNode { model, node, why } => {
                write!(f, "pins: model {model}: node id {node:?} {why}")
            }
            ConfigProblem::DuplicatePinnedNode { model, node } => {
                write!(f, "pins: model {model} lists node {node} twice")
            }
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML text does not parse into a configuration.
    #[error("cannot parse the coordinator configuration")]
    Parse(#[source] toml::de::Error),
    /// The configuration parsed but is not usable; every problem is listed.
    #[error("invalid coordinator configuration:\n  - {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - "))]
    Invalid(Vec<ConfigProblem>),
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// In memory; lost on restart.
    Memory,
    /// A redb file.
    Redb(PathBuf),
}

/// A configuration that passed [`CoordinatorConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedCoordinatorConfig {
    /// Lease after each heartbeat.
    pub lease: Duration,
    /// Heartbeat interval nodes are told to use.
    pub heartbeat_interval: Duration,
    /// Static pins.
    pub pins: BTreeMap<ModelId, BTreeSet<NodeId>>,
    /// Replica and KV-reserve policy.
    pub policy: PlacementPolicy,
    /// Where state lives.
    pub store: StoreChoice,
    /// The model catalogue.
    pub models: Vec<ModelSpec>,
}

impl CoordinatorConfig {
    /// Parses a TOML document (missing fields take their defaults; unknown fields are refused).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(ConfigError::Parse)
    }

    /// Checks every setting and reports every problem at once.
    pub fn validate(self) -> Result<ValidatedCoordinatorConfig, ConfigError> {
        let mut problems = Vec::new();
        if self.lease_ms == 0 {
            problems.push(ConfigProblem::ZeroLease);
        }
        if self.heartbeat_interval_ms == 0 {
            problems.push(ConfigProblem::ZeroHeartbeat);
        }
        if self.lease_ms != 0
            && self.heartbeat_interval_ms != 0
            && self.heartbeat_interval_ms.saturating_mul(2) > self.lease_ms
        {
            problems.push(ConfigProblem::LeaseTooShort {
                lease_ms: self.lease_ms,
                heartbeat_interval_ms: self.heartbeat_interval_ms,
            });
        }
        for (field, ms) in [
            ("lease_ms", self.lease_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ] {
            if ms > u64::from(u32::MAX) {
                problems.push(ConfigProblem::TooLong { field, ms });
            }
        }
        if self.replicas == Some(0) {
            problems.push(ConfigProblem::ZeroReplicas);
        }
        let store = match &self.store_path {
            None => StoreChoice::Memory,
            Some(p) if p.as_os_str().is_empty() => {
                problems.push(ConfigProblem::EmptyStorePath);
                StoreChoice::Memory
            }
            Some(p) => StoreChoice::Redb(p.clone()),
        };

        let mut seen = BTreeSet::new();
        for m in &self.models {
            if m.id.as_str().is_empty() {
                problems.push(ConfigProblem::EmptyModelId);
            } else if !seen.insert(&m.id) {
                problems.push(ConfigProblem::DuplicateModel(m.id.clone()));
            }
            check_model(m, &mut problems);
        }

        let mut pins = BTreeMap::new();
        for (model, nodes) in &self.pins {
            if !seen.contains(model) {
                problems.push(ConfigProblem::PinnedUnknownModel(model.clone()));
            }
            if nodes.is_empty() {
                problems.push(ConfigProblem::EmptyPin(model.clone()));
            }
            let mut set = BTreeSet::new();
            for node in nodes {
                if let Err(why) = crate::check_node_id(node.as_str()) {
                    problems.push(ConfigProblem::BadPinnedNode {
                        model: model.clone(),
                        node: node.clone(),
                        why,
                    });
                } else if !set.insert(node.clone()) {
                    problems.push(ConfigProblem::DuplicatePinnedNode {
                        model: model.clone(),
                        node: node.clone(),
                    });
                }
            }
            pins.insert(model.clone(), set);
        }

        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(ValidatedCoordinatorConfig {
            lease: Duration::from_millis(self.lease_ms),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            pins,
            policy: PlacementPolicy {
                replicas: self.replicas,
                kv_reserve_tokens: self.kv_reserve_tokens,
                mode: self.placement,
            },
            store,
            models: self.models,
        })
    }
}

fn check_model(m: &ModelSpec, problems: &mut Vec<ConfigProblem>) {
    let mut bad = |why| {
        problems.push(ConfigProblem::BadModel {
            model: m.id.clone(),
            why,
        })
    };
    if m.n_layers == 0 {
        bad("n_layers must be greater than zero");
    }
    if m.file_bytes == 0 {
        bad("file_bytes must be greater than zero");
    }
    if m.layer_bytes
        .checked_mul(u64::from(m.n_layers))
        .is_none_or(|all| all > m.file_bytes)
    {
        bad("layer_bytes × n_layers exceeds file_bytes");
    }
    let hex = m.sha256.len() == 64
        && m.sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        bad("sha256 must be 64 lower-case hex digits");
    }
}

impl ValidatedCoordinatorConfig {
    /// The membership actor's settings.
    pub fn membership(&self) -> MembershipConfig {
        MembershipConfig {
            lease: self.lease,
            heartbeat_interval: self.heartbeat_interval,
            models: self.models.clone(),
            pins: self.pins.clone(),
            policy: self.policy.clone(),
        }
    }

    /// Opens the configured store (creating the database file when needed).
    pub async fn open_store(&self) -> Result<Arc<dyn StateStore>, StoreError> {
        match &self.store {
            StoreChoice::Memory => Ok(Arc::new(MemoryStore::new())),
            StoreChoice::Redb(path) => {
                let path = path.clone();
                // Opening creates and may repair the file: blocking work.
                let store = tokio::task::spawn_blocking(move || RedbStore::open(path))
                    .await
                    .map_err(|_| StoreError::WorkerLost { operation: "open" })??;
                Ok(Arc::new(store))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn defaults_are_valid_and_match_the_documented_values() {
        let v = CoordinatorConfig::default().validate().unwrap();
        assert_eq!(v.lease, Duration::from_secs(2));
        assert_eq!(v.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(v.policy.replicas, None);
        assert_eq!(v.store, StoreChoice::Memory);
    }

    #[test]
    fn a_toml_file_fills_the_config() {
        let text = format!(
            r#"
            lease_ms = 4000
            replicas = 2
            store_path = "/var/lib/shoal/state.redb"

            [[models]]
            id = "smollm2"
            sha256 = "{SHA}"
            file_bytes = 100000000
            n_layers = 30
            layer_bytes = 3000000
            kv_bytes_per_token = 46080

            [pins]
            smollm2 = ["pi-1", "pi-2"]
            "#
        );
        let v = CoordinatorConfig::from_toml_str(&text)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(v.lease, Duration::from_secs(4));
        assert_eq!(v.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(v.policy.replicas, Some(2));
        assert_eq!(
            v.store,
            StoreChoice::Redb("/var/lib/shoal/state.redb".into())
        );
        assert_eq!(v.models[0].n_layers, 30);
        let pinned: Vec<&str> = v.pins[&ModelId::new("smollm2")]
            .iter()
            .map(NodeId::as_str)
            .collect();
        assert_eq!(pinned, ["pi-1", "pi-2"]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(matches!(
            CoordinatorConfig::from_toml_str("lease = 3"),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn every_problem_is_reported_together() {
        let cfg = CoordinatorConfig {
            lease_ms: 600,
            heartbeat_interval_ms: 500,
            replicas: Some(0),
            store_path: Some(PathBuf::new()),
            models: vec![
                ModelSpec {
                    id: ModelId::new("m"),
                    sha256: "XYZ".into(),
                    file_bytes: 10,
                    n_layers: 0,
                    layer_bytes: 1,
                    kv_bytes_per_token: 0,
                    context_length: 2048,
                },
                ModelSpec {
                    id: ModelId::new("m"),
                    sha256: SHA.into(),
                    file_bytes: 10,
                    n_layers: 4,
                    layer_bytes: 3,
                    kv_bytes_per_token: 0,
                    context_length: 2048,
                },
            ],
            pins: [
                (ModelId::new("ghost"), vec![]),
                (
                    ModelId::new("m"),
                    vec![NodeId::new("a"), NodeId::new("a"), NodeId::new("bad id")],
                ),
            ]
            .into(),
            ..Default::default()
        };
        let Err(ConfigError::Invalid(problems)) = cfg.validate() else {
            panic!("must be refused")
        };
        let expect = [
            ConfigProblem::LeaseTooShort {
                lease_ms: 600,
                heartbeat_interval_ms: 500,
            },
            ConfigProblem::ZeroReplicas,
            ConfigProblem::EmptyStorePath,
            ConfigProblem::DuplicateModel(ModelId::new("m")),
            ConfigProblem::PinnedUnknownModel(ModelId::new("ghost")),
            ConfigProblem::EmptyPin(ModelId::new("ghost")),
            ConfigProblem::DuplicatePinnedNode {
                model: ModelId::new("m"),
                node: NodeId::new("a"),
            },
        ];
        for p in &expect {
            assert!(problems.contains(p), "missing {p:?} in {problems:?}");
        }
        let bad_model = |why: &str| {
            problems
                .iter()
                .any(|p| matches!(p, ConfigProblem::BadModel { why: w, .. } if *w == why))
        };
        assert!(bad_model("n_layers must be greater than zero"));
        assert!(bad_model("sha256 must be 64 lower-case hex digits"));
        assert!(bad_model("layer_bytes × n_layers exceeds file_bytes"));
        assert!(
            problems
                .iter()
                .any(|p| matches!(p, ConfigProblem::BadPinnedNode { .. }))
        );
        let text = ConfigError::Invalid(problems).to_string();
        assert!(
            text.contains("replicas must be at least 1") && text.contains("lists node a twice"),
            "{text}"
        );
    }

    #[test]
    fn durations_must_fit_the_wire() {
        let cfg = CoordinatorConfig {
            lease_ms: u64::from(u32::MAX) + 1,
            ..Default::default()
        };
        let Err(ConfigError::Invalid(problems)) = cfg.validate() else {
            panic!("must be refused")
        };
        assert_eq!(
            problems,
            [ConfigProblem::TooLong {
                field: "lease_ms",
                ms: u64::from(u32::MAX) + 1
            }]
        );
    }
}
