//! Server-side authorization, applied to every call before any handler runs: who is calling
//! (the peer certificate's shoal identity, in this cluster, not expired, not revoked), may
//! that role call this method (a per-service policy, deny by default), and does the caller
//! speak our protocol version. A rejection is logged with the peer and the reason and
//! answered with the matching status and the class/reason headers.
//!
//! The TLS handshake has already checked the chain to the cluster CA and the validity
//! window; the window is checked again here because connections outlive certificates.
//! Revocation lives here rather than in the handshake because a revoked peer may already
//! hold an open connection: the check runs per call, so revoking cuts it off at once.

use crate::error::{IdentityError, NetError};
use crate::identity::{CertificateInfo, PeerIdentity, Role};
use crate::status::status_with_code;
use crate::tls::TlsMode;
use futures::future::{Either, Ready, ready};
use shoal_proto::{PROTOCOL_VERSION, VERSION_HEADER};
use shoal_types::ErrorClass;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::SystemTime;
use tonic::Code;
use tonic::codegen::http::{HeaderMap, Request as HttpRequest, Response as HttpResponse};
use tonic::transport::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// Node ids and certificate serials that are no longer trusted, shared between the servers
/// of a process and whatever updates it (the coordinator's membership, an operator command).
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    inner: Arc<RwLock<RevokedSets>>,
}

#[derive(Debug, Default)]
struct RevokedSets {
    nodes: HashSet<String>,
    serials: HashSet<String>,
}

impl Revocations {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts off every certificate naming `node_id`, for every later call. Returns whether
    /// the node was not revoked before.
    pub fn revoke_node(&self, node_id: &str) -> bool {
        self.write(|s| s.nodes.insert(node_id.to_owned()))
    }

    /// Trusts `node_id` again. Returns whether it was revoked.
    pub fn restore_node(&self, node_id: &str) -> bool {
        self.write(|s| s.nodes.remove(node_id))
    }

    /// Cuts off one certificate by serial (hex, case and `:` separators ignored), leaving
    /// the node's other certificates valid: how a leaked certificate is retired.
    pub fn revoke_serial(&self, serial: &str) -> bool {
        let serial = normalize_serial(serial);
        self.write(|s| s.serials.insert(serial))
    }

    /// Trusts a certificate serial again. Returns whether it was revoked.
    pub fn restore_serial(&self, serial: &str) -> bool {
        let serial = normalize_serial(serial);
        self.write(|s| s.serials.remove(&serial))
    }

    /// Whether `node_id` is revoked.
    pub fn is_node_revoked(&self, node_id: &str) -> bool {
        self.read(|s| s.nodes.contains(node_id))
    }

    /// Whether the certificate with `serial` is revoked.
    pub fn is_serial_revoked(&self, serial: &str) -> bool {
        let serial = normalize_serial(serial);
        self.read(|s| s.serials.contains(&serial))
    }

    /// The revoked node ids, sorted.
    pub fn revoked_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read(|s| s.nodes.iter().cloned().collect());
        v.sort();
        v
    }

    /// The revoked certificate serials (normalized hex), sorted.
    pub fn revoked_serials(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read(|s| s.serials.iter().cloned().collect());
        v.sort();
        v
    }

    /// Makes the sets exactly `nodes` and `serials` (a complete list published by the
    /// coordinator). Returns whether anything changed.
    pub fn replace_all(&self, nodes: &[String], serials: &[String]) -> bool {
        let nodes: HashSet<String> = nodes.iter().cloned().collect();
        let serials: HashSet<String> = serials.iter().map(|s| normalize_serial(s)).collect();
        self.write(|s| {
            let changed = s.nodes != nodes || s.serials != serials;
            s.nodes = nodes;
            s.serials = serials;
            changed
        })
    }

    // A panic while holding the lock cannot leave the sets half-updated (each update is one
    // insert or remove), so a poisoned lock is still safe to use.
    fn read<T>(&self, f: impl FnOnce(&RevokedSets) -> T) -> T {
        f(&self.inner.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write<T>(&self, f: impl FnOnce(&mut RevokedSets) -> T) -> T {
        f(&mut self.inner.write().unwrap_or_else(PoisonError::into_inner))
    }
}

fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    hex.trim_start_matches('0').to_owned()
}

/// A small set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RoleSet(u8);

impl RoleSet {
    fn of(roles: &[Role]) -> Self {
        RoleSet(roles.iter().fold(0, |acc, r| acc | Self::bit(*r)))
    }
    fn contains(self, role: Role) -> bool {
        self.0 & Self::bit(role) != 0
    }
    fn bit(role: Role) -> u8 {
        match role {
            Role::Coordinator => 1,
            Role::Agent => 2,
            Role::Client => 4,
        }
    }
}

/// Which roles may call which gRPC methods. Anything not allowed is denied, including
/// services the policy has never heard of.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Keyed by full service name (`shoal.v1.Node`).
    services: HashMap<String, RoleSet>,
    /// Keyed by `service/method`; takes precedence over the service's entry.
    methods: HashMap<String, RoleSet>,
    /// `service/method`s a caller without any certificate may call (enrollment only).
    anonymous: HashSet<String>,
}

impl AccessPolicy {
    /// A policy that denies everything.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// shoal's policy: agents call the coordinator's `Join`, `Heartbeat` and `Leave`; the
    /// coordinator and agents (pipeline peers) call the `Node` service, whose checkpoint
    /// methods only agents call; an agent opens the
    /// `Stage` stream of the next stage of its pipeline; operator tooling (the `client`
    /// role) calls the coordinator's `Admin` service and nothing else. An agent renews its
    /// certificate with `Enrollment.Renew`; `Enrollment.Enroll` is not allowed here (see
    /// [`AccessPolicy::enrollment`]).
    pub fn shoal_default() -> Self {
        let coordinator = shoal_proto::v1::coordinator_server::SERVICE_NAME;
        let node = shoal_proto::v1::node_server::SERVICE_NAME;
        let admin = shoal_proto::v1::admin_server::SERVICE_NAME;
        let stage = shoal_proto::v1::stage_server::SERVICE_NAME;
        let enrollment = shoal_proto::v1::enrollment_server::SERVICE_NAME;
        Self::deny_all()
            .allow_service(admin, &[Role::Client])
            .allow_method(coordinator, "Join", &[Role::Agent])
            .allow_method(coordinator, "Heartbeat", &[Role::Agent])
            .allow_method(coordinator, "Leave", &[Role::Agent])
            .allow_service(node, &[Role::Coordinator, Role::Agent])
            // KV-cache checkpoints move between agents only.
            .allow_method(node, "PushCheckpoint", &[Role::Agent])
            .allow_method(node, "FetchCheckpoint", &[Role::Agent])
            .allow_method(node, "DropCheckpoint", &[Role::Agent])
            // The gateway, in the coordinator, names a generation's holder.
            .allow_method(node, "RetargetCheckpoint", &[Role::Coordinator])
            .allow_method(stage, "Open", &[Role::Agent])
            .allow_method(enrollment, "Renew", &[Role::Agent])
    }

    /// The policy of the coordinator's enrollment listener: `Enrollment.Enroll` without a
    /// certificate (the join token in the request is the credential), nothing else.
    pub fn enrollment() -> Self {
        let enrollment = shoal_proto::v1::enrollment_server::SERVICE_NAME;
        Self::deny_all().allow_anonymous(enrollment, "Enroll")
    }

    /// Lets a caller with no certificate at all call `service`/`method`. Only for a method
    /// whose request carries its own credential.
    pub fn allow_anonymous(mut self, service: &str, method: &str) -> Self {
        self.anonymous.insert(format!("{service}/{method}"));
        self
    }

    /// Whether a caller without a certificate may call the gRPC `path`.
    pub fn allows_anonymous(&self, path: &str) -> bool {
        path.strip_prefix('/')
            .is_some_and(|full| self.anonymous.contains(full))
    }

    /// Lets `roles` call every method of `service` (a full name such as `shoal.v1.Node`)
    /// that has no method entry of its own.
    pub fn allow_service(mut self, service: &str, roles: &[Role]) -> Self {
        self.services.insert(service.to_owned(), RoleSet::of(roles));
        self
    }

    /// Lets exactly `roles` call `service`/`method`, whatever the service entry says.
    pub fn allow_method(mut self, service: &str, method: &str, roles: &[Role]) -> Self {
        self.methods
            .insert(format!("{service}/{method}"), RoleSet::of(roles));
        self
    }

    /// Whether `role` may call the gRPC `path` (`/service/method`).
    pub fn allows(&self, path: &str, role: Role) -> bool {
        let Some(full) = path.strip_prefix('/') else {
            return false;
        };
        let Some((service, method)) = full.split_once('/') else {
            return false;
        };
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return false;
        }
        match self.methods.get(full) {
            Some(set) => set.contains(role),
            None => self
                .services
                .get(service)
                .is_some_and(|set| set.contains(role)),
        }
    }
}

/// The identity the authorization layer verified for a call, if the server runs mTLS.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<PeerIdentity>()
}

/// Why a call was refused: what the caller sees, and the detail only the log gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The gRPC code.
    pub code: Code,
    /// The class sent in `shoal-error-class`.
    pub class: ErrorClass,
    /// The stable reason sent in `shoal-error-reason`.
    pub reason: &'static str,
    /// Operator detail for the log (never sent).
    pub detail: String,
}

impl Rejection {
    fn new(class: ErrorClass, reason: &'static str, detail: impl Into<String>) -> Self {
        Rejection {
            code: shoal_proto::code_for_class(class),
            class,
            reason,
            detail: detail.into(),
        }
    }

    fn identity(e: &IdentityError) -> Self {
        Self::new(ErrorClass::Unauthenticated, e.reason(), e.to_string())
    }

    fn version(reason: &'static str, detail: String) -> Self {
        Rejection {
            code: Code::FailedPrecondition,
            class: ErrorClass::InvalidRequest,
            reason,
            detail,
        }
    }

    /// The status the caller receives.
    pub fn to_status(&self) -> tonic::Status {
        let message = match self.reason {
            "protocol_version_mismatch" => format!(
                "this server speaks shoal protocol {PROTOCOL_VERSION}; {}",
                self.detail
            ),
            "protocol_version_missing" | "protocol_version_invalid" => {
                format!("send header {VERSION_HEADER}: {PROTOCOL_VERSION}")
            }
            _ => match self.class {
                ErrorClass::PermissionDenied => "this peer may not call this method".to_owned(),
                _ => "peer authentication failed".to_owned(),
            },
        };
        status_with_code(self.code, self.class, self.reason, message)
    }
}

#[derive(Debug)]
enum PeerCheck {
    /// Require a shoal identity of this cluster.
    Mtls { cluster_id: String },
    /// Development: there are no identities to check.
    Plaintext,
}

#[derive(Debug)]
struct AuthState {
    peers: PeerCheck,
    policy: AccessPolicy,
    revocations: Revocations,
    parsed: ParsedCertificates,
}

/// Most peer certificates a server remembers parsed; the cache is emptied when it fills.
const PARSED_CAPACITY: usize = 1024;

/// Peer certificates already parsed, by their DER bytes. Parsing X.509 costs more than all
/// the other checks of a call together, and a connection presents the same certificate on
/// every call. Only the parse is cached: expiry, revocation and policy are checked per call.
#[derive(Debug, Default)]
struct ParsedCertificates {
    map: Mutex<HashMap<Vec<u8>, Arc<CertificateInfo>>>,
}

impl ParsedCertificates {
    fn get_or_parse(&self, der: &[u8]) -> Result<Arc<CertificateInfo>, IdentityError> {
        // As with the revocation sets, a poisoned map is still a consistent map.
        if let Some(hit) = self.lock().get(der) {
            return Ok(Arc::clone(hit));
        }
        let info = Arc::new(CertificateInfo::from_der(der)?);
        let mut map = self.lock();
        if map.len() >= PARSED_CAPACITY {
            map.clear();
        }
        map.insert(der.to_vec(), Arc::clone(&info));
        Ok(info)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Arc<CertificateInfo>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The tower layer that authorizes every call of a tonic server (see the module docs).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    state: Arc<AuthState>,
}

impl AuthLayer {
    /// A layer for a server running in `mode`. With mTLS, callers must belong to the cluster
    /// named by the server's own certificate; in plaintext mode only the protocol version is
    /// checked.
    pub fn new(
        mode: &TlsMode,
        policy: AccessPolicy,
        revocations: Revocations,
    ) -> Result<Self, NetError> {
        let peers = match mode {
            TlsMode::Mtls(m) => PeerCheck::Mtls {
                cluster_id: m.identity()?.cluster_id,
            },
            TlsMode::Plaintext => {
                tracing::warn!(
                    "PLAINTEXT gRPC server: caller identities and roles are NOT checked; development only"
                );
                PeerCheck::Plaintext
            }
        };
        Ok(AuthLayer {
            state: Arc::new(AuthState {
                peers,
                policy,
                revocations,
                parsed: ParsedCertificates::default(),
            }),
        })
    }

    /// The revocation set this layer consults.
    pub fn revocations(&self) -> &Revocations {
        &self.state.revocations
    }

    /// Decides one call: the verified identity (`None` in plaintext mode) or why not.
    ///
    /// `peer_certs` is the chain the TLS handshake verified, end-entity first.
    pub fn authorize(
        &self,
        path: &str,
        headers: &HeaderMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
        now: SystemTime,
    ) -> Result<Option<PeerIdentity>, Rejection> {
        let state = &self.state;
        let identity = match &state.peers {
            PeerCheck::Plaintext => None,
            PeerCheck::Mtls { cluster_id } => {
                let Some(der) = peer_certs.and_then(<[_]>::first) else {
                    if state.policy.allows_anonymous(path) {
                        check_version(headers)?;
                        return Ok(None);
                    }
                    return Err(Rejection::identity(&IdentityError::NoCertificate));
                };
                let info = state
                    .parsed
                    .get_or_parse(der)
                    .map_err(|e| Rejection::identity(&e))?;
                check_certificate(state, cluster_id, &info, now)?;
                if !state.policy.allows(path, info.identity.role) {
                    return Err(Rejection::new(
                        ErrorClass::PermissionDenied,
                        "role_not_allowed",
                        format!("{} may not call {path}", info.identity),
                    ));
                }
                Some(info.identity.clone())
            }
        };
        check_version(headers)?;
        Ok(identity)
    }
}

fn check_certificate(
    state: &AuthState,
    cluster_id: &str,
    info: &CertificateInfo,
    now: SystemTime,
) -> Result<(), Rejection> {
    let id = &info.identity;
    let unauthenticated =
        |reason, detail| Err(Rejection::new(ErrorClass::Unauthenticated, reason, detail));
    if id.cluster_id != cluster_id {
        return unauthenticated(
            "wrong_cluster",
            format!("{id} is not of cluster {cluster_id}"),
        );
    }
    if now > info.not_after {
        return unauthenticated(
            "certificate_expired",
            format!("certificate {} of {id} expired", info.serial),
        );
    }
    if now < info.not_before {
        return unauthenticated(
            "certificate_not_yet_valid",
            format!("certificate {} of {id} is not valid yet", info.serial),
        );
    }
    if state.revocations.is_node_revoked(&id.node_id) {
        return unauthenticated("revoked", format!("node {} is revoked", id.node_id));
    }
    if state.revocations.is_serial_revoked(&info.serial) {
        return unauthenticated(
            "revoked",
            format!("certificate {} of {id} is revoked", info.serial),
        );
    }
    Ok(())
}

fn check_version(headers: &HeaderMap) -> Result<(), Rejection> {
    let Some(value) = headers.get(VERSION_HEADER) else {
        return Err(Rejection::version(
            "protocol_version_missing",
            format!("no {VERSION_HEADER} header"),
        ));
    };
    let major = value
        .to_str()
        .ok()
        .and_then(|s| s.trim().split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        None => Err(Rejection::version(
            "protocol_version_invalid",
            format!("unreadable {VERSION_HEADER} header {value:?}"),
        )),
        Some(v) if v != PROTOCOL_VERSION => Err(Rejection::version(
            "protocol_version_mismatch",
            format!("caller speaks {v}"),
        )),
        Some(_) => Ok(()),
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a server's routes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    state: AuthLayer,
}

impl<S, B, ResBody> Service<HttpRequest<B>> for AuthService<S>
where
    S: Service<HttpRequest<B>, Response = HttpResponse<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = HttpResponse<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest<B>) -> Self::Future {
        // Take the service that was polled ready; a rejected call drops it, releasing
        // whatever capacity it reserved, and leaves a fresh clone in its place.
        let fresh = self.inner.clone();
        let mut ready_inner = std::mem::replace(&mut self.inner, fresh);

        let (peer_addr, peer_certs) = connection_info(&req);
        let decision = self.state.authorize(
            req.uri().path(),
            req.headers(),
            peer_certs.as_deref().map(Vec::as_slice),
            SystemTime::now(),
        );
        match decision {
            Ok(identity) => {
                if let Some(identity) = identity {
                    req.extensions_mut().insert(identity);
                }
                Either::Right(ready_inner.call(req))
            }
            Err(rejection) => {
                tracing::warn!(
                    peer = %peer_addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
                    path = req.uri().path(),
                    reason = rejection.reason,
                    detail = %rejection.detail,
                    "rejected gRPC call"
                );
                Either::Left(ready(Ok(rejection.to_status().into_http())))
            }
        }
    }
}

type PeerCerts = Arc<Vec<CertificateDer<'static>>>;

fn connection_info<B>(req: &HttpRequest<B>) -> (Option<SocketAddr>, Option<PeerCerts>) {
    let ext = req.extensions();
    if let Some(tls) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        return (tls.get_ref().remote_addr(), tls.peer_certs());
    }
    let addr = ext.get::<TcpConnectInfo>().and_then(|t| t.remote_addr());
    (addr, None)
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
