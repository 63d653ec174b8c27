//! The coordinator process of a shoal cluster, assembled from the libraries below it:
//!
//! - [`Coordinator`]: membership (shoal-control) and the `Coordinator` and `Admin` gRPC
//!   services behind mTLS and the authorization layer (shoal-net), plus the OpenAI gateway
//!   (shoal-api) on the same process, exposing one `/metrics`.
//! - [`ClusterBackend`]: the gateway's backend: each request goes to the replica the router
//!   picks, over the agent's `Node.Generate` stream; a request that cannot start on a node is
//!   tried on another.
//! - [`AdminService`] / [`cluster_status`]: what `shoal status` shows, and drain.
//! - [`enroll`]: join tokens, enrollment and renewal of node certificates, revocation
//!   ([`Trust`], [`EnrollmentService`]); the control plane binds each call to the caller's
//!   certificate and publishes revocations to agents.
//! - [`model_spec`], [`spec_of`]: a model file (or an opened, decrypted one) described for the
//!   planner.
//!
//! Invariants: the gateway never talks to a node the router did not pick; every generation
//! call carries a deadline; a request counts as in flight on its node until its stream ends.

mod admin;
mod backend;
mod control;
mod coordinator;
pub mod enroll;
pub mod metrics;
mod spec;
mod wire;

pub use admin::{AdminService, cluster_status};
pub use backend::{ClusterBackend, ClusterBackendConfig, FailoverCause};
pub use coordinator::{ClusterError, Coordinator, CoordinatorOptions};
pub use enroll::{EnrollmentOptions, EnrollmentService, Trust};
pub use spec::{SpecError, model_spec, spec_of};
