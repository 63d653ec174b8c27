//! The coordinator of a shoal cluster: who is in it, what each node serves, and where each
//! request goes.
//!
//! - [`store`]: durable state behind the [`StateStore`] trait (memory, redb; etcd-shaped).
//! - [`membership`]: an actor owning the node table — joins, heartbeats with leases, failure
//!   detection, drain, leave — that re-plans on every membership change and publishes a
//!   [`ClusterView`].
//! - [`placement`]: the pure planner ([`place`]): models, nodes, pins and policy in; a [`Plan`]
//!   and its explanation out.
//! - [`router`]: picks the replica (a whole-model node or a pipeline of stages) with the least
//!   expected latency for each request.
//! - [`service`]: the `shoal.v1.Coordinator` gRPC service over membership.
//! - [`config`]: the coordinator's TOML-friendly configuration, validated once.
//! - [`trust`]: join tokens (hashes only, one use, expiry), issued certificates and
//!   revocations, kept in the state store.
//!
//! This crate holds no transport (shoal-net serves the service over mTLS) and no model code.
//! Invariants: the planner is pure and deterministic; only the membership actor mutates the
//! node table; a plan's epoch increases exactly when its assignments change; bad input from a
//! peer is an error value, never a panic.

pub mod config;
mod ids;
pub mod membership;
mod persist;
pub mod placement;
pub mod router;
pub mod service;
pub mod store;
pub mod trust;
pub mod wire;

pub use config::{
    ConfigError, ConfigProblem, CoordinatorConfig, StoreChoice, ValidatedCoordinatorConfig,
};
pub use ids::{MAX_NODE_ID_LEN, NodeIdProblem, check_node_id};
pub use membership::{
    ClusterView, HeartbeatInfo, HeartbeatReply, JoinAccepted, JoinInfo, MembershipConfig,
    MembershipError, MembershipEvent, MembershipHandle, NodeState, NodeView,
};
pub use placement::{
    Alternative, Assignment, Chain, LayerSpeed, ModelSpec, NodeHealth, NodeInput, Placement,
    PlacementInput, PlacementMode, PlacementPolicy, Plan, Prediction, StageChoice, Verdict, place,
};
pub use router::{RouteError, RouteGuard, RouteStage, Router};
pub use service::CoordinatorService;
pub use store::{MemoryStore, RedbStore, StateStore, StoreError, Txn};
pub use trust::{RevokedSet, TokenError, TokenRecord, TrustStore};
