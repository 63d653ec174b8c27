//! Cluster identity on the coordinator: join tokens, enrollment and renewal of node
//! certificates, and revocation.
//!
//! - `shoal token create` ([`Trust::create_token`], Admin): a one-time token with an expiry;
//!   the store keeps only the sha256 of its secret.
//! - `Enrollment.Enroll` ([`EnrollmentService`]), on the enrollment listener (see
//!   `shoal_net::connect_for_enrollment` for why it is a separate listener): a node without a
//!   certificate sends the token and a signing request for a key it generated; the token is
//!   checked (exists, secret, unused, unexpired) and spent, and the CA signs a short-lived
//!   certificate naming the node and the token's role. A node id that is live in the cluster,
//!   or revoked, cannot be enrolled again.
//! - `Enrollment.Renew`, on the main listener over mTLS: the caller's current certificate is
//!   its credential; the new certificate names the same node and role.
//! - `shoal node revoke` ([`Trust::revoke_node`], Admin): the node id and every serial
//!   issued to it are revoked in the store and in the listener's [`Revocations`] (checked on
//!   every call), and the node is declared dead. Revocations are loaded again at start-up
//!   and published to agents in heartbeat answers.

use shoal_control::{MembershipHandle, TokenError, TrustStore};
use shoal_net::{
    ClusterCa, JoinToken, PeerIdentity, Revocations, Role, VerifiedRequest, peer_identity,
};
use shoal_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use shoal_proto::v1::{CertificateResponse, EnrollRequest, RenewRequest};
use shoal_types::{ErrorClass, NodeId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::{Request, Response, Status};

/// Default lifetime of an enrolled node's certificate.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a join token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest lifetime a join token may be given.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the coordinator enrolls new nodes. Without it the coordinator issues nothing and
/// runs no enrollment listener (certificates then come from `shoal up` or an operator).
#[derive(Clone)]
pub struct EnrollmentOptions {
    /// The cluster CA, with its key: the coordinator signs node certificates.
    pub ca: Arc<ClusterCa>,
    /// Where the enrollment listener binds (port 0 picks one).
    pub listen: SocketAddr,
    /// Lifetime of the certificates it signs (enrollment and renewal).
    pub cert_validity: Duration,
    /// Lifetime of a token created without one.
    pub token_ttl: Duration,
}

impl std::fmt::Debug for EnrollmentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentOptions")
            .field("cluster", &self.ca.cluster_id())
            .field("listen", &self.listen)
            .field("cert_validity", &self.cert_validity)
            .field("token_ttl", &self.token_ttl)
            .finish()
    }
}

/// The coordinator's trust state and what acts on it; shared by the Admin and Enrollment
/// services.
#[derive(Debug)]
pub struct Trust {
    store: TrustStore,
    revocations: Revocations,
    membership: MembershipHandle,
    signer: Option<EnrollmentOptions>,
}

fn status(class: ErrorClass, reason: &'static str, message: impl Into<String>) -> Status {
    shoal_net::status(class, reason, message)
}

fn internal(what: &str, e: &dyn std::error::Error) -> Status {
    tracing::error!(error = %e, "{what} failed");
    status(
        ErrorClass::Internal,
        "state_store_failed",
        format!("the coordinator could not {what}"),
    )
}

impl Trust {
    /// Trust kept in `store`, enforced through `revocations`; loads the stored revocations
    /// into `revocations`.
    pub async fn load(
        store: TrustStore,
        revocations: Revocations,
        membership: MembershipHandle,
        signer: Option<EnrollmentOptions>,
    ) -> Result<Trust, shoal_control::StoreError> {
        let revoked = store.revoked().await?;
        for node in &revoked.nodes {
            revocations.revoke_node(node);
        }
        for serial in &revoked.serials {
            revocations.revoke_serial(serial);
        }
        if !revoked.nodes.is_empty() || !revoked.serials.is_empty() {
            tracing::info!(
                nodes = revoked.nodes.len(),
                serials = revoked.serials.len(),
                "revocations restored"
            );
        }
        Ok(Trust {
            store,
            revocations,
            membership,
            signer,
        })
    }

    /// What the listeners check on every call.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Whether this coordinator signs certificates.
    pub fn enrollment(&self) -> Option<&EnrollmentOptions> {
        self.signer.as_ref()
    }

    fn signer(&self) -> Result<&EnrollmentOptions, Status> {
        self.signer.as_ref().ok_or_else(|| {
            status(
                ErrorClass::InvalidRequest,
                "enrollment_disabled",
                "this coordinator does not enroll nodes (start it with the cluster CA)",
            )
        })
    }

    /// A new join token for `role` (only agents for now) valid for `ttl` (`None`: the
    /// default). Returns the token and its expiry.
    pub async fn create_token(
        &self,
        ttl: Option<Duration>,
        role: &str,
    ) -> Result<(JoinToken, SystemTime), Status> {
        let signer = self.signer()?;
        let role = match role {
            "" | "agent" => Role::Agent,
            other => {
                return Err(status(
                    ErrorClass::InvalidRequest,
                    "role_not_enrollable",
                    format!("a join token can grant the agent role only, not {other:?}"),
                ));
            }
        };
        let ttl = ttl.unwrap_or(signer.token_ttl);
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(status(
                ErrorClass::InvalidRequest,
                "invalid_token_ttl",
                format!("a token lives more than 0 and at most {MAX_TOKEN_TTL:?}"),
            ));
        }
        let fingerprint = signer
            .ca
            .fingerprint()
            .map_err(|e| internal("hash the CA certificate", &e))?;
        let token =
            JoinToken::generate(&fingerprint).map_err(|e| internal("generate a join token", &e))?;
        let now = SystemTime::now();
        self.store
            .create_token(
                &token.id,
                &JoinToken::secret_hash(&token.secret),
                role.as_str(),
                now,
                ttl,
            )
            .await
            .map_err(|e| internal("store the join token", &e))?;
        tracing::info!(token = %token.id, %role, ?ttl, "join token created");
        Ok((token, now + ttl))
    }

    /// Revokes `node`: its id and every serial issued to it, in the store and at once on
    /// the listeners; then declares it dead. Returns whether it was newly revoked and the
    /// serials.
    pub async fn revoke_node(&self, node: &str) -> Result<(bool, Vec<String>), Status> {
        shoal_control::check_node_id(node).map_err(|why| {
            status(
                ErrorClass::InvalidRequest,
                "invalid_node_id",
                format!("invalid node id {node:?}: {why}"),
            )
        })?;
        let serials = self
            .store
            .issued_serials(node)
            .await
            .map_err(|e| internal("read the issued certificates", &e))?;
        let fresh = self
            .store
            .revoke_node(node, &serials, SystemTime::now())
            .await
            .map_err(|e| internal("store the revocation", &e))?;
        self.revocations.revoke_node(node);
        for s in &serials {
            self.revocations.revoke_serial(s);
        }
        tracing::warn!(%node, serials = serials.len(), "node revoked");
        if let Err(e) = self.membership.declare_dead(NodeId::new(node)).await {
            // The node is cut off either way; its lease will run out.
            tracing::warn!(%node, error = %e, "could not declare the revoked node dead");
        }
        Ok((fresh, serials))
    }

    fn sign(
        &self,
        request: &VerifiedRequest,
        role: Role,
    ) -> Result<(PeerIdentity, shoal_net::SignedCert), Status> {
        let signer = self.signer()?;
        let id = PeerIdentity::new(signer.ca.cluster_id(), role, request.node_id.as_str())
            .map_err(|e| {
                status(
                    ErrorClass::InvalidRequest,
                    "invalid_node_id",
                    format!("the request names no valid node: {e}"),
                )
            })?;
        let cert = signer
            .ca
            .sign_request(request, &id, signer.cert_validity)
            .map_err(|e| internal("sign the certificate", &e))?;
        Ok((id, cert))
    }

    async fn answer(
        &self,
        id: &PeerIdentity,
        cert: shoal_net::SignedCert,
    ) -> Result<CertificateResponse, Status> {
        self.store
            .record_issued(&id.node_id, &cert.serial, cert.not_after)
            .await
            .map_err(|e| internal("record the issued certificate", &e))?;
        let ca_pem = self.signer()?.ca.cert_pem().to_owned();
        Ok(CertificateResponse {
            cert_pem: cert.cert_pem,
            ca_pem,
            serial: cert.serial,
            not_after_unix_ms: shoal_control::trust::unix_ms(cert.not_after),
        })
    }
}

fn verified(csr_pem: &str) -> Result<VerifiedRequest, Status> {
    let request = VerifiedRequest::from_pem(csr_pem).map_err(|e| {
        status(
            ErrorClass::InvalidRequest,
            "invalid_certificate_request",
            e.to_string(),
        )
    })?;
    shoal_control::check_node_id(&request.node_id).map_err(|why| {
        status(
            ErrorClass::InvalidRequest,
            "invalid_node_id",
            format!("invalid node id {:?}: {why}", request.node_id),
        )
    })?;
    Ok(request)
}

/// The `shoal.v1.Enrollment` service.
#[derive(Debug, Clone)]
pub struct EnrollmentService {
    trust: Arc<Trust>,
}

impl EnrollmentService {
    /// A service acting on `trust`.
    pub fn new(trust: Arc<Trust>) -> Self {
        Self { trust }
    }

    /// Wrapped for a tonic server.
    pub fn into_server(self) -> EnrollmentServer<Self> {
        EnrollmentServer::new(self)
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let trust = &self.trust;
        trust.signer()?;
        let msg = req.into_inner();
        let request = verified(&msg.csr_pem)?;
        let node = request.node_id.clone();
        let refuse = |class, reason: &'static str, message: String| {
            tracing::warn!(%node, token = %msg.token_id, reason, "enrollment refused");
            status(class, reason, message)
        };
        if trust.revocations.is_node_revoked(&node) {
            return Err(refuse(
                ErrorClass::PermissionDenied,
                "node_revoked",
                format!("node {node} is revoked"),
            ));
        }
        let live = trust
            .membership
            .view()
            .nodes
            .get(&NodeId::new(&node))
            .is_some_and(|n| n.state.is_live());
        if live {
            return Err(refuse(
                ErrorClass::InvalidRequest,
                "node_id_in_use",
                format!("node id {node} belongs to a live node"),
            ));
        }
        let record = trust
            .store
            .redeem_token(
                &msg.token_id,
                &JoinToken::secret_hash(&msg.token_secret),
                &node,
                SystemTime::now(),
            )
            .await
            .map_err(|e| match e {
                TokenError::Store(source) => internal("check the join token", &source),
                other => refuse(other.class(), other.reason(), other.to_string()),
            })?;
        let role: Role = record.role.parse().map_err(|_| {
            internal(
                "read the token's role",
                &std::io::Error::other(record.role.clone()),
            )
        })?;
        let (id, cert) = trust.sign(&request, role)?;
        tracing::info!(peer = %id, serial = %cert.serial, token = %record.id, "node enrolled");
        Ok(Response::new(trust.answer(&id, cert).await?))
    }

    async fn renew(
        &self,
        req: Request<RenewRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let trust = &self.trust;
        trust.signer()?;
        let Some(caller) = peer_identity(&req).cloned() else {
            return Err(status(
                ErrorClass::Unauthenticated,
                "no_client_certificate",
                "renewal needs the current certificate",
            ));
        };
        let request = verified(&req.get_ref().csr_pem)?;
        if request.node_id != caller.node_id {
            tracing::warn!(peer = %caller, requested = %request.node_id, "renewal for another node refused");
            return Err(status(
                ErrorClass::PermissionDenied,
                "csr_names_another_node",
                "a node renews its own certificate only",
            ));
        }
        let (id, cert) = trust.sign(&request, caller.role)?;
        tracing::info!(peer = %id, serial = %cert.serial, "certificate renewed");
        Ok(Response::new(trust.answer(&id, cert).await?))
    }
}

/// A server task that ends when its cancellation token fires.
pub(crate) type ServeTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Binds the enrollment listener when `trust` signs certificates: TLS with the
/// coordinator's certificate (and the CA, for the pin), no client certificates, and the
/// authorization layer letting `Enrollment.Enroll` through and nothing else.
pub(crate) async fn serve_enrollment(
    tls: &shoal_net::TlsMode,
    trust: &Arc<Trust>,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(Option<ServeTask>, Option<SocketAddr>), crate::ClusterError> {
    let Some(signer) = trust.enrollment() else {
        return Ok((None, None));
    };
    let shoal_net::TlsMode::Mtls(material) = tls else {
        return Err(crate::ClusterError::InvalidOptions {
            problem: "enrollment needs mTLS (a plaintext coordinator cannot vouch for itself)",
        });
    };
    let own = material.identity()?;
    if own.cluster_id != signer.ca.cluster_id() || own.role != Role::Coordinator {
        return Err(crate::ClusterError::InvalidOptions {
            problem: "the enrollment CA must be the CA of the coordinator's own certificate",
        });
    }
    let listener = tokio::net::TcpListener::bind(signer.listen)
        .await
        .map_err(|source| crate::ClusterError::Bind {
            addr: signer.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| crate::ClusterError::Bind {
            addr: signer.listen,
            source,
        })?;
    let layer = shoal_net::AuthLayer::new(
        tls,
        shoal_net::AccessPolicy::enrollment(),
        trust.revocations().clone(),
    )?;
    let router = shoal_net::enrollment_server_builder(material)?
        .layer(layer)
        .add_service(EnrollmentService::new(trust.clone()).into_server());
    tracing::info!(%addr, "enrollment listener serving");
    let task = Box::pin(async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, cancel.cancelled())
            .await
        {
            tracing::error!(error = %e, "the enrollment listener failed");
        }
    });
    Ok((Some(task), Some(addr)))
}
