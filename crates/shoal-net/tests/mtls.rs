//! Real mutual TLS over loopback: a call with the right credentials succeeds and the handler
//! sees who called; every wrong credential is refused, either in the handshake (never
//! reaching a handler) or by the authorization layer with the documented status and headers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use common::*;
use shoal_net::{
    AccessPolicy, ClusterCa, ConnectOptions, NetError, PeerIdentity, Revocations, Role, TlsMode,
    class_of, connect, coordinator_client, node_client, with_deadline,
};
use shoal_proto::v1::node_client::NodeClient;
use shoal_proto::v1::{JoinRequest, StatusRequest};
use shoal_proto::{ERROR_CLASS_HEADER, VERSION_HEADER};
use shoal_types::ErrorClass;
use std::error::Error as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Code, Request};

const DEADLINE: Duration = Duration::from_secs(10);

struct Cluster {
    ca: ClusterCa,
    server_mode: TlsMode,
}

fn cluster() -> Cluster {
    init_logs();
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let server_mode = TlsMode::Mtls(material(&ca, Role::Agent, "server-node"));
    Cluster { ca, server_mode }
}

impl Cluster {
    fn mode(&self, role: Role, node: &str) -> TlsMode {
        TlsMode::Mtls(material(&self.ca, role, node))
    }

    async fn node_server(&self, revocations: Revocations) -> (Running, TestNode) {
        let node = TestNode::default();
        let running = spawn_server(
            &self.server_mode,
            AccessPolicy::shoal_default(),
            revocations,
            Service::Node(node.clone()),
        )
        .await;
        (running, node)
    }
}

/// The full error chain of a connection failure, for messages and assertions.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" <- ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Connects with `mode` and makes one `Status` call, which must fail below the
/// authorization layer (handshake or transport), never with a shoal status.
async fn assert_link_refused(endpoint: &str, mode: &TlsMode, opts: ConnectOptions) -> String {
    let channel = match within("connecting", connect(endpoint, mode, opts)).await {
        Err(e) => {
            assert!(
                matches!(e, NetError::Connect { .. }),
                "expected a connection failure, got {e:?}"
            );
            return chain(&e);
        }
        Ok(ch) => ch,
    };
    // With TLS 1.3 the client learns of a rejected client certificate only on its first read.
    let mut client = node_client(channel, DEADLINE);
    let status = within("a call on a refused link", client.status(StatusRequest {}))
        .await
        .expect_err("a call on a link that should have been refused succeeded");
    assert!(
        matches!(status.code(), Code::Unknown | Code::Unavailable),
        "{status:?}"
    );
    assert!(
        status.metadata().get(ERROR_CLASS_HEADER).is_none(),
        "{status:?}"
    );
    let why = status
        .source()
        .map_or_else(|| status.message().to_owned(), chain);
    if why.contains("received fatal alert") {
        assert_eq!(class_of(&status).0, ErrorClass::Unauthenticated, "{why}");
    }
    why
}

/// Asserts that a refused link failed in the TLS handshake with `alert` from the server.
fn assert_alert(why: &str, alert: &str) {
    assert!(
        why.contains(&format!("received fatal alert: {alert}")),
        "expected TLS alert {alert}, got: {why}"
    );
}

#[tokio::test]
async fn mtls_call_succeeds_and_the_server_sees_the_callers_identity() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    for (role, name) in [(Role::Agent, "agent-1"), (Role::Coordinator, "coord")] {
        let channel = within(
            "connecting with mTLS",
            connect(
                &server.endpoint(),
                &c.mode(role, name),
                ConnectOptions::default(),
            ),
        )
        .await
        .unwrap();
        let mut client = node_client(channel, DEADLINE);
        let reply = within("Status over mTLS", client.status(StatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.node_id, "test-node");
        assert_eq!(reply.models, vec!["tiny".to_owned()]);
        assert_eq!(
            node.calls.last_caller(),
            Some(PeerIdentity::new(CLUSTER, role, name).unwrap())
        );
    }
    assert_eq!(node.calls.count(), 2);

    // "localhost" is in the server certificate too, and a caller may check the role it expects.
    let opts = ConnectOptions {
        server_name: Some("localhost".to_owned()),
        expect_role: Some(Role::Agent),
        ..ConnectOptions::default()
    };
    let channel = within(
        "connecting by name",
        connect(&server.endpoint(), &c.mode(Role::Agent, "agent-2"), opts),
    )
    .await
    .unwrap();
    within(
        "Status by name",
        node_client(channel, DEADLINE).status(StatusRequest {}),
    )
    .await
    .unwrap();
    assert_eq!(node.calls.count(), 3);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_fails_the_handshake() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    // Same cluster name, different CA: what an attacker minting their own certificates has.
    let rogue = ClusterCa::generate(CLUSTER).unwrap();
    let mut m = material(&rogue, Role::Coordinator, "coord");
    m.ca_pem = c.ca.cert_pem().to_owned(); // it trusts the real server, so only its cert is wrong
    let why = assert_link_refused(
        &server.endpoint(),
        &TlsMode::Mtls(m),
        ConnectOptions::default(),
    )
    .await;
    // The chain names our CA, but its signature does not verify against our CA's key.
    assert_alert(&why, "DecryptError");
    assert_eq!(
        node.calls.count(),
        0,
        "a handler ran for a foreign client: {why}"
    );
}

#[tokio::test]
async fn an_expired_client_certificate_fails_the_handshake() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    let now = SystemTime::now();
    let id = PeerIdentity::new(CLUSTER, Role::Agent, "old-agent").unwrap();
    let expired =
        c.ca.issue_with_window(
            &id,
            &[],
            now - Duration::from_secs(2 * 86400),
            now - Duration::from_secs(86400),
        )
        .unwrap()
        .into_material(c.ca.cert_pem());
    let why = assert_link_refused(
        &server.endpoint(),
        &TlsMode::Mtls(expired),
        ConnectOptions::default(),
    )
    .await;
    assert_alert(&why, "CertificateExpired");
    assert_eq!(
        node.calls.count(),
        0,
        "a handler ran for an expired client: {why}"
    );
}

#[tokio::test]
async fn revoking_a_node_cuts_off_its_open_connection_at_once() {
    let c = cluster();
    let revocations = Revocations::new();
    let (server, node) = c.node_server(revocations.clone()).await;
    let connect_as = |name: &str| {
        let mode = c.mode(Role::Agent, name);
        let endpoint = server.endpoint();
        async move {
            let ch = within(
                "connecting",
                connect(&endpoint, &mode, ConnectOptions::default()),
            )
            .await
            .unwrap();
            node_client(ch, DEADLINE)
        }
    };
    let mut doomed = connect_as("agent-1").await;
    let mut other = connect_as("agent-2").await;
    within("Status before revocation", doomed.status(StatusRequest {}))
        .await
        .unwrap();

    assert!(revocations.revoke_node("agent-1"));
    let status = within("Status after revocation", doomed.status(StatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        class_of(&status),
        (ErrorClass::Unauthenticated, Some("revoked".to_owned()))
    );
    assert_eq!(
        node.calls.count(),
        1,
        "the revoked call reached the handler"
    );

    within(
        "Status of an unrevoked peer",
        other.status(StatusRequest {}),
    )
    .await
    .unwrap();
    assert!(revocations.restore_node("agent-1"));
    within("Status after restoring", doomed.status(StatusRequest {}))
        .await
        .unwrap();
    assert_eq!(node.calls.count(), 3);
}

#[tokio::test]
async fn a_plaintext_client_cannot_talk_to_a_tls_server() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    let why = assert_link_refused(
        &server.endpoint(),
        &TlsMode::Plaintext,
        ConnectOptions::default(),
    )
    .await;
    assert_eq!(
        node.calls.count(),
        0,
        "a plaintext call reached a handler: {why}"
    );
}

#[tokio::test]
async fn a_tls_client_without_a_certificate_fails_the_handshake() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    // Built by hand: shoal's own TlsMode cannot express "TLS without a client certificate".
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(c.ca.cert_pem()))
        .domain_name("127.0.0.1");
    let endpoint = Endpoint::from_shared(format!("https://{}", server.endpoint()))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let result = match within("connecting without a client cert", endpoint.connect()).await {
        Err(e) => Err(chain(&e)),
        Ok(ch) => {
            let mut client = NodeClient::new(ch);
            within(
                "a call without a client cert",
                client.status(with_deadline(StatusRequest {}, DEADLINE)),
            )
            .await
            .map(|_| ())
            .map_err(|s| {
                // A TLS failure is classified as an authentication failure.
                assert_eq!(class_of(&s).0, ErrorClass::Unauthenticated, "{s:?}");
                s.source().map_or_else(|| s.message().to_owned(), chain)
            })
        }
    };
    let why = result.expect_err("a TLS client without a certificate was served");
    assert_alert(&why, "CertificateRequired");
    assert_eq!(node.calls.count(), 0, "{why}");
}

#[tokio::test]
async fn a_client_role_may_not_call_agent_or_coordinator_only_methods() {
    let c = cluster();
    let (node_server, node) = c.node_server(Revocations::new()).await;
    let cli = c.mode(Role::Client, "operator-cli");
    let ch = within(
        "connecting as a client",
        connect(&node_server.endpoint(), &cli, ConnectOptions::default()),
    )
    .await
    .unwrap();
    let status = within(
        "Status as a client",
        node_client(ch, DEADLINE).status(StatusRequest {}),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        class_of(&status),
        (
            ErrorClass::PermissionDenied,
            Some("role_not_allowed".to_owned())
        )
    );
    assert_eq!(node.calls.count(), 0);

    // The coordinator's Join is for agents only: a client and a second coordinator are refused.
    let coordinator = TestCoordinator::default();
    let coord_server = spawn_server(
        &c.mode(Role::Coordinator, "coord"),
        AccessPolicy::shoal_default(),
        Revocations::new(),
        Service::Coordinator(coordinator.clone()),
    )
    .await;
    let join = || JoinRequest {
        protocol_version: shoal_proto::PROTOCOL_VERSION,
        node_id: "x".to_owned(),
        ..Default::default()
    };
    for (role, name) in [
        (Role::Client, "operator-cli"),
        (Role::Coordinator, "coord-2"),
    ] {
        let opts = ConnectOptions {
            expect_role: Some(Role::Coordinator),
            ..ConnectOptions::default()
        };
        let ch = within(
            "connecting to the coordinator",
            connect(&coord_server.endpoint(), &c.mode(role, name), opts),
        )
        .await
        .unwrap();
        let status = within(
            "Join by a non-agent",
            coordinator_client(ch, DEADLINE).join(join()),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{role}");
        assert_eq!(class_of(&status).1.as_deref(), Some("role_not_allowed"));
    }
    assert_eq!(coordinator.calls.count(), 0);

    let ch = within(
        "connecting to the coordinator as an agent",
        connect(
            &coord_server.endpoint(),
            &c.mode(Role::Agent, "agent-1"),
            ConnectOptions::default(),
        ),
    )
    .await
    .unwrap();
    let reply = within(
        "Join by an agent",
        coordinator_client(ch, DEADLINE).join(join()),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(reply.cluster_id, CLUSTER);
    assert_eq!(
        coordinator.calls.last_caller(),
        Some(PeerIdentity::new(CLUSTER, Role::Agent, "agent-1").unwrap())
    );
}

#[tokio::test]
async fn a_wrong_or_missing_protocol_version_is_failed_precondition() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    let ch = within(
        "connecting",
        connect(
            &server.endpoint(),
            &c.mode(Role::Agent, "agent-1"),
            ConnectOptions::default(),
        ),
    )
    .await
    .unwrap();

    // The generated client alone sends no version header.
    let mut bare = NodeClient::new(ch.clone());
    let status = within(
        "Status without a version header",
        bare.status(with_deadline(StatusRequest {}, DEADLINE)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        class_of(&status),
        (
            ErrorClass::InvalidRequest,
            Some("protocol_version_missing".to_owned())
        )
    );

    let mut future_peer = NodeClient::with_interceptor(ch, |mut req: Request<()>| {
        req.metadata_mut()
            .insert(VERSION_HEADER, "2".parse().unwrap());
        req.set_timeout(DEADLINE);
        Ok(req)
    });
    let status = within(
        "Status with version 2",
        future_peer.status(StatusRequest {}),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        class_of(&status),
        (
            ErrorClass::InvalidRequest,
            Some("protocol_version_mismatch".to_owned())
        )
    );
    assert!(status.message().contains('2'), "{}", status.message());
    assert_eq!(node.calls.count(), 0);
}

#[tokio::test]
async fn the_client_refuses_servers_of_the_wrong_role_name_or_ca() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    let agent = c.mode(Role::Agent, "agent-1");

    // The server is an agent; a caller that dials the coordinator must not accept it.
    let expect_coordinator = ConnectOptions {
        expect_role: Some(Role::Coordinator),
        ..ConnectOptions::default()
    };
    let err = within(
        "connecting to an agent posing as the coordinator",
        connect(&server.endpoint(), &agent, expect_coordinator),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NetError::Connect { .. }), "{err:?}");
    let why = chain(&err);
    assert!(why.contains("WrongRole"), "{why}");

    let wrong_name = ConnectOptions {
        server_name: Some("other-host".to_owned()),
        ..ConnectOptions::default()
    };
    let err = within(
        "connecting under another server name",
        connect(&server.endpoint(), &agent, wrong_name),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NetError::Connect { .. }), "{err:?}");
    let why = chain(&err);
    assert!(why.contains("not valid for name"), "{why}");

    // A server whose certificate comes from a foreign CA.
    let rogue = ClusterCa::generate(CLUSTER).unwrap();
    let impostor = spawn_server(
        &TlsMode::Mtls(material(&rogue, Role::Agent, "server-node")),
        AccessPolicy::shoal_default(),
        Revocations::new(),
        Service::Node(TestNode::default()),
    )
    .await;
    let err = within(
        "connecting to an impostor",
        connect(&impostor.endpoint(), &agent, ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NetError::Connect { .. }), "{err:?}");
    let why = chain(&err);
    assert!(why.contains("BadSignature"), "{why}");
    assert_eq!(node.calls.count(), 0);
}

#[tokio::test]
async fn plaintext_mode_skips_identities_but_still_checks_the_version() {
    init_logs();
    let node = TestNode::default();
    let server = spawn_server(
        &TlsMode::Plaintext,
        AccessPolicy::shoal_default(),
        Revocations::new(),
        Service::Node(node.clone()),
    )
    .await;
    let ch = within(
        "connecting in plaintext",
        connect(
            &server.endpoint(),
            &TlsMode::Plaintext,
            ConnectOptions::default(),
        ),
    )
    .await
    .unwrap();
    within(
        "plaintext Status",
        node_client(ch.clone(), DEADLINE).status(StatusRequest {}),
    )
    .await
    .unwrap();
    assert_eq!(node.calls.count(), 1);
    assert_eq!(node.calls.last_caller(), None);

    let status = within(
        "plaintext Status without a version",
        NodeClient::new(ch).status(with_deadline(StatusRequest {}, DEADLINE)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(node.calls.count(), 1);
}

#[tokio::test]
async fn calls_past_their_deadline_fail_with_deadline_exceeded() {
    let c = cluster();
    let (server, node) = c.node_server(Revocations::new()).await;
    node.calls.hang.store(true, Ordering::SeqCst);
    let ch = within(
        "connecting",
        connect(
            &server.endpoint(),
            &c.mode(Role::Agent, "agent-1"),
            ConnectOptions::default(),
        ),
    )
    .await
    .unwrap();

    // An explicit deadline on the request.
    let mut client = node_client(ch.clone(), DEADLINE);
    let status = within(
        "a call with a 200 ms deadline to a server that never answers",
        client.status(with_deadline(StatusRequest {}, Duration::from_millis(200))),
    )
    .await
    .unwrap_err();
    assert_eq!(
        class_of(&status).0,
        ErrorClass::DeadlineExceeded,
        "{status:?}"
    );

    // The client's default deadline applies when the request sets none.
    let mut short = node_client(ch, Duration::from_millis(200));
    let status = within(
        "a call under the default deadline to a server that never answers",
        short.status(StatusRequest {}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        class_of(&status).0,
        ErrorClass::DeadlineExceeded,
        "{status:?}"
    );
    assert_eq!(node.calls.count(), 2);
}
