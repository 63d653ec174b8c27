//! shoal's transport between the coordinator and node agents, and between agents: gRPC
//! (tonic) with mutual TLS on every link by default.
//!
//! What it owns:
//! - the cluster PKI ([`ClusterCa`]): one CA per cluster issuing certificates whose SAN URI
//!   `shoal://<cluster_id>/<role>/<node_id>` names the peer ([`PeerIdentity`]);
//! - the two ends of a link ([`server_builder`], [`connect`]) for a [`TlsMode`];
//! - authorization of every incoming call ([`AuthLayer`]): identity, cluster, revocation,
//!   per-method role policy and protocol version, before any handler runs;
//! - enrollment ([`JoinToken`], [`connect_for_enrollment`], [`enrollment_server_builder`],
//!   [`CertificateRequest`], [`ClusterCa::sign_request`]): a node without a certificate gets
//!   one for a key it generated, trusting the coordinator by the CA hash its token pins;
//! - renewal at run time ([`RenewableIdentity`], [`tls_incoming`]);
//! - the error contract on the wire ([`status`], [`class_of`]) and call deadlines
//!   ([`ClientInterceptor`], [`with_deadline`]).
//!
//! It must not know about models or scheduling. Invariants: a server built here in mTLS mode
//! never runs a handler for a caller without a valid, unrevoked identity of its cluster and
//! an allowed role; every client call built here carries the protocol version and a deadline.
//! Only the ring crypto provider is used.
//!
//! ```no_run
//! # async fn demo(material: shoal_net::TlsMaterial) -> Result<(), Box<dyn std::error::Error>> {
//! use shoal_net::{AccessPolicy, AuthLayer, Revocations, TlsMode, ConnectOptions};
//! use std::time::Duration;
//! let mode = TlsMode::Mtls(material);
//! let revocations = Revocations::new();
//! let server = shoal_net::server_builder(&mode)?
//!     .layer(AuthLayer::new(&mode, AccessPolicy::shoal_default(), revocations.clone())?);
//! // server.add_service(NodeServer::new(my_node)).serve(addr).await?;
//! let channel = shoal_net::connect("127.0.0.1:7070", &mode, ConnectOptions::default()).await?;
//! let mut node = shoal_net::node_client(channel, Duration::from_secs(5));
//! # Ok(()) }
//! ```

mod auth;
mod client;
mod enroll;
mod error;
pub mod faults;
mod identity;
mod live;
mod pki;
mod status;
mod tls;

pub use auth::{AccessPolicy, AuthLayer, AuthService, Rejection, Revocations, peer_identity};
pub use client::{
    ClientInterceptor, ShoalAdminClient, ShoalCoordinatorClient, ShoalEnrollmentClient,
    ShoalNodeClient, admin_client, coordinator_client, enrollment_client, node_client,
    with_deadline,
};
pub use enroll::{
    JOIN_TOKEN_PREFIX, JoinToken, check_pinned_ca, connect_for_enrollment,
    enrollment_server_builder,
};
pub use error::{IdentityError, NetError};
pub use identity::{CertificateInfo, PeerIdentity, Role};
pub use live::{RenewableIdentity, server_builder_for_incoming, tls_incoming};
pub use pki::{
    CA_CERT_FILE, CA_KEY_FILE, CertificateRequest, ClusterCa, IssuedCert, SignedCert,
    VerifiedRequest, ca_fingerprint,
};
pub use status::{class_of, parse_class, status, status_with_code};
pub use tls::{
    ConnectOptions, NODE_CERT_FILE, NODE_KEY_FILE, TlsMaterial, TlsMode, connect, connect_lazy,
    server_builder,
};
