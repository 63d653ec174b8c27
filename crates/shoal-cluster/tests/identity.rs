//! Cluster identity end to end, in one process over real TLS: a node enrolls with a join
//! token and serves; tokens are one-time and expire; an enrolled node renews its short-lived
//! certificate and keeps serving past the first one's expiry; a revoked node is cut off at
//! once, declared dead and refused by the other agents; nodes act only as themselves and
//! operators not as nodes. Every refusal is checked by its class and reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shoal_control::NodeState;
use shoal_net::{
    ClusterCa, ConnectOptions, JoinToken, Role, TlsMode, class_of, connect, coordinator_client,
    node_client,
};
use shoal_node::EnrollError;
use shoal_proto::v1;
use shoal_types::{ErrorClass, NodeId};
use std::time::{Duration, SystemTime};
use tonic::Code;

fn refusal(e: EnrollError) -> (ErrorClass, String) {
    match e {
        EnrollError::Refused { class, reason, .. } => (class, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_enrolls_with_a_one_time_token_and_serves() {
    let mut f = Fixture::start(Duration::from_secs(3600)).await;
    let token = f.token(Duration::from_secs(600)).await;
    let material = f.enroll("edge-1", &token).await.unwrap();
    let id = material.identity().unwrap();
    assert_eq!(
        (id.cluster_id.as_str(), id.role, id.node_id.as_str()),
        ("enroll-test", Role::Agent, "edge-1")
    );
    assert_eq!(material.ca_pem.trim(), f.ca.cert_pem().trim());

    // The key is written by the node, readable by its owner only.
    let dir = f.dir.path().join("edge-1");
    material.save(&dir).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(shoal_net::NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    f.renewing_agent("edge-1", material, Some(dir)).await;
    f.wait_ready("edge-1").await;
    assert_eq!(f.chat().await, 200);

    // Used once: the same token is refused, whoever presents it.
    let (class, reason) = refusal(f.enroll("edge-2", &token).await.unwrap_err());
    assert_eq!(
        (class, reason.as_str()),
        (ErrorClass::Unauthenticated, "join_token_used")
    );

    // A wrong secret and an unknown id look the same.
    let fresh = f.token(Duration::from_secs(600)).await;
    let mut wrong = fresh.clone();
    wrong.secret = "0".repeat(32);
    let (class, reason) = refusal(f.enroll("edge-2", &wrong).await.unwrap_err());
    assert_eq!(
        (class, reason.as_str()),
        (ErrorClass::Unauthenticated, "invalid_join_token")
    );
    let mut unknown = fresh.clone();
    unknown.id = "0".repeat(16);
    assert_eq!(
        refusal(f.enroll("edge-2", &unknown).await.unwrap_err()).1,
        "invalid_join_token"
    );

    // A live node's id cannot be taken over with a token, and the refusal spends nothing.
    let (class, reason) = refusal(f.enroll("edge-1", &fresh).await.unwrap_err());
    assert_eq!(
        (class, reason.as_str()),
        (ErrorClass::InvalidRequest, "node_id_in_use")
    );
    f.enroll("edge-2", &fresh).await.unwrap();

    // An expired token.
    let short = f.token(Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (class, reason) = refusal(f.enroll("edge-3", &short).await.unwrap_err());
    assert_eq!(
        (class, reason.as_str()),
        (ErrorClass::Unauthenticated, "join_token_expired")
    );

    // A token whose pin is not this cluster's CA: the node does not trust the coordinator,
    // and sends nothing.
    let mut foreign = f.token(Duration::from_secs(600)).await;
    foreign.ca_sha256 = ClusterCa::generate("other").unwrap().fingerprint().unwrap();
    match f.enroll("edge-4", &foreign).await.unwrap_err() {
        EnrollError::Net(_) => {}
        other => panic!("a coordinator of another CA was trusted: {other:?}"),
    }
    // ... so that token is still unused.
    let mut same = foreign.clone();
    same.ca_sha256 = f.ca.fingerprint().unwrap();
    f.enroll("edge-4", &same).await.unwrap();

    // Only agent tokens, with a sane lifetime.
    let mut admin = f.admin().await;
    for (ttl_ms, role, reason) in [
        (60_000, "client", "role_not_enrollable"),
        (60_000, "coordinator", "role_not_enrollable"),
        (30 * 24 * 3600 * 1000, "agent", "invalid_token_ttl"),
    ] {
        let err = admin
            .create_join_token(v1::CreateJoinTokenRequest {
                ttl_ms,
                role: role.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(class_of(&err).1.as_deref(), Some(reason), "{role}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_renews_its_certificate_and_keeps_serving_past_the_first_expiry() {
    // 6 s certificates: renewed about 4.5 s after issue (2/3 of 6 s plus 1.5 s back-dating).
    let mut f = Fixture::start(Duration::from_secs(6)).await;
    let token = f.token(Duration::from_secs(600)).await;
    let material = f.enroll("edge-r", &token).await.unwrap();
    let dir = f.dir.path().join("edge-r");
    let (_, identity) = f
        .renewing_agent("edge-r", material, Some(dir.clone()))
        .await;
    let first = identity.certificate();
    f.wait_ready("edge-r").await;

    within("the certificate being renewed", async {
        while identity.certificate().serial == first.serial {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let second = identity.certificate();
    assert!(second.not_after > first.not_after);
    assert_eq!(second.identity, first.identity);
    // Saved for the next start.
    let saved = shoal_net::TlsMaterial::load(&dir).unwrap();
    assert_eq!(saved, identity.material());

    // Past the first certificate's end, the node still heartbeats and serves: the
    // coordinator checks expiry on every call, so only the new certificate gets through.
    let wait = first
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        + Duration::from_secs(1);
    tokio::time::sleep(wait).await;
    let node = NodeId::new("edge-r");
    let after = f.coordinator.membership().view().nodes[&node].last_sequence;
    f.wait_view("a heartbeat after the first certificate expired", |v| {
        v.nodes[&node].state == NodeState::Alive && v.nodes[&node].last_sequence > after
    })
    .await;
    assert_eq!(f.chat().await, 200);

    // The expired certificate itself is refused, with its reason.
    // (the node's old key is gone; an expired certificate for the same node from the CA)
    let expired =
        f.ca.issue_with_window(
            &first.identity,
            &hosts(),
            SystemTime::now() - Duration::from_secs(60),
            SystemTime::now() - Duration::from_secs(1),
        )
        .unwrap()
        .into_material(f.ca.cert_pem());
    let refused = heartbeat_as(&f, TlsMode::Mtls(expired), "edge-r").await;
    // The handshake itself refuses an expired client certificate; nothing reaches a handler.
    assert_eq!(refused.0, ErrorClass::Unauthenticated, "{refused:?}");
}

/// A channel to the coordinator's main listener presenting `mode`.
async fn coordinator_channel(f: &Fixture, mode: &TlsMode) -> tonic::transport::Channel {
    connect(
        &f.coordinator.grpc_addr().to_string(),
        mode,
        ConnectOptions::default(),
    )
    .await
    .unwrap()
}

/// One `Heartbeat` for `node` with `mode`; the refusal's class and reason (or the handshake's).
async fn heartbeat_as(f: &Fixture, mode: TlsMode, node: &str) -> (ErrorClass, Option<String>) {
    let endpoint = f.coordinator.grpc_addr().to_string();
    let ch = match connect(&endpoint, &mode, ConnectOptions::default()).await {
        Ok(ch) => ch,
        Err(_) => return (ErrorClass::Unauthenticated, Some("handshake".into())),
    };
    let err = within(
        "a heartbeat that must be refused",
        coordinator_client(ch, Duration::from_secs(10)).heartbeat(v1::HeartbeatRequest {
            node_id: node.into(),
            sequence: u64::MAX,
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    if err
        .metadata()
        .get(shoal_proto::ERROR_CLASS_HEADER)
        .is_none()
        && matches!(
            err.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled
        )
    {
        // Nothing reached a handler: the server refused the certificate in the handshake.
        // With TLS 1.3 the client learns of it on its first read, as the server's alert or,
        // when the server's close overtakes the alert, as a dropped connection.
        return (ErrorClass::Unauthenticated, Some("handshake".into()));
    }
    class_of(&err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_declared_dead_and_refused_by_other_agents() {
    let mut f = Fixture::start(Duration::from_secs(3600)).await;
    let token = f.token(Duration::from_secs(600)).await;
    let material = f.enroll("bad-1", &token).await.unwrap();
    let (_, bad_identity) = f.renewing_agent("bad-1", material.clone(), None).await;
    let good = f.issued_agent("good-1").await;
    f.wait_ready("bad-1").await;
    f.wait_ready("good-1").await;

    let r = f
        .admin()
        .await
        .revoke_node(v1::RevokeNodeRequest {
            node_id: "bad-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.newly_revoked);
    assert_eq!(r.revoked_serials, vec![bad_identity.certificate().serial]);
    f.wait_state("bad-1", NodeState::Dead).await;

    // Its certificate is refused on the next call, with the reason.
    let (class, reason) = heartbeat_as(&f, TlsMode::Mtls(material.clone()), "bad-1").await;
    assert_eq!(
        (class, reason.as_deref()),
        (ErrorClass::Unauthenticated, Some("revoked"))
    );
    // It stays dead: its own heartbeats do not get through.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        f.coordinator.membership().view().nodes[&NodeId::new("bad-1")].state,
        NodeState::Dead
    );
    // The other agent learns of it in a heartbeat answer and refuses it on its data plane.
    let other = &f.agents[good].0;
    within("the other agent hearing of the revocation", async {
        while !other.revocations().is_node_revoked("bad-1") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let ch = connect(
        &other.data_addr().to_string(),
        &TlsMode::Mtls(material),
        ConnectOptions::default(),
    )
    .await
    .unwrap();
    let err = node_client(ch, Duration::from_secs(10))
        .status(v1::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(class_of(&err).1.as_deref(), Some("revoked"));

    // A revoked node id cannot enroll again, even with a fresh token.
    let fresh = f.token(Duration::from_secs(600)).await;
    let (class, reason) = refusal(f.enroll("bad-1", &fresh).await.unwrap_err());
    assert_eq!(
        (class, reason.as_str()),
        (ErrorClass::PermissionDenied, "node_revoked")
    );
    // Revoking again is idempotent.
    let again = f
        .admin()
        .await
        .revoke_node(v1::RevokeNodeRequest {
            node_id: "bad-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.newly_revoked);
    // The cluster goes on serving with the good node.
    assert_eq!(f.chat().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_act_only_as_themselves_and_operators_and_strangers_not_at_all() {
    let mut f = Fixture::start(Duration::from_secs(3600)).await;
    f.issued_agent("node-a").await;
    f.wait_ready("node-a").await;

    // Another agent's certificate cannot heartbeat (or leave) for node-a.
    let b = TlsMode::Mtls(material(&f.ca, Role::Agent, "node-b"));
    let (class, reason) = heartbeat_as(&f, b.clone(), "node-a").await;
    assert_eq!(
        (class, reason.as_deref()),
        (ErrorClass::PermissionDenied, Some("node_id_mismatch"))
    );
    let ch = coordinator_channel(&f, &b).await;
    let err = coordinator_client(ch, Duration::from_secs(10))
        .leave(v1::LeaveRequest {
            node_id: "node-a".into(),
            reason: "hijack".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(class_of(&err).1.as_deref(), Some("node_id_mismatch"));
    assert_eq!(
        f.coordinator.membership().view().nodes[&NodeId::new("node-a")].state,
        NodeState::Alive
    );

    // An operator certificate may not act as a node.
    let op = TlsMode::Mtls(material(&f.ca, Role::Client, "operator"));
    let (class, reason) = heartbeat_as(&f, op.clone(), "operator").await;
    assert_eq!(
        (class, reason.as_deref()),
        (ErrorClass::PermissionDenied, Some("role_not_allowed"))
    );
    let ch = coordinator_channel(&f, &op).await;
    let err = coordinator_client(ch, Duration::from_secs(10))
        .join(v1::JoinRequest {
            protocol_version: shoal_proto::PROTOCOL_VERSION,
            node_id: "operator".into(),
            data_addr: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(class_of(&err).1.as_deref(), Some("role_not_allowed"));
    // ... nor renew a node certificate.
    let ch = coordinator_channel(&f, &op).await;
    let csr = shoal_net::CertificateRequest::generate("operator", &[]).unwrap();
    let err = shoal_net::enrollment_client(ch, Duration::from_secs(10))
        .renew(v1::RenewRequest {
            csr_pem: csr.csr_pem().to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(class_of(&err).1.as_deref(), Some("role_not_allowed"));

    // An agent renews only its own certificate.
    let a = TlsMode::Mtls(material(&f.ca, Role::Agent, "node-a"));
    let ch = coordinator_channel(&f, &a).await;
    let csr = shoal_net::CertificateRequest::generate("node-z", &[]).unwrap();
    let err = shoal_net::enrollment_client(ch, Duration::from_secs(10))
        .renew(v1::RenewRequest {
            csr_pem: csr.csr_pem().to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(class_of(&err).1.as_deref(), Some("csr_names_another_node"));

    // A certificate from another CA never gets past the handshake.
    let stranger = ClusterCa::generate("enroll-test").unwrap();
    let (class, _) = heartbeat_as(
        &f,
        TlsMode::Mtls(material(&stranger, Role::Agent, "node-a")),
        "node-a",
    )
    .await;
    assert_eq!(class, ErrorClass::Unauthenticated);
    // Nor does a token minted by a stranger's tooling (it names no stored token).
    let forged: JoinToken = format!(
        "shoal-join.{}.{}.{}",
        "1".repeat(16),
        "2".repeat(32),
        f.ca.fingerprint().unwrap()
    )
    .parse()
    .unwrap();
    assert_eq!(
        refusal(f.enroll("node-c", &forged).await.unwrap_err()).1,
        "invalid_join_token"
    );
}

/// A coordinator with no models on a redb store in `dir`, enrolling with `ca`.
async fn bare_coordinator(
    dir: &std::path::Path,
    ca: &std::sync::Arc<ClusterCa>,
) -> shoal_cluster::Coordinator {
    let config = shoal_control::CoordinatorConfig {
        store_path: Some(dir.join("state.redb")),
        ..shoal_control::CoordinatorConfig::default()
    }
    .validate()
    .unwrap();
    let opts = shoal_cluster::CoordinatorOptions::on_loopback(
        config,
        TlsMode::Mtls(material(ca, Role::Coordinator, "coordinator")),
    );
    let enrollment = shoal_cluster::EnrollmentOptions {
        ca: ca.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_validity: Duration::from_secs(3600),
        token_ttl: Duration::from_secs(600),
    };
    within(
        "starting a coordinator",
        shoal_cluster::Coordinator::start_with_enrollment(
            opts,
            Some(enrollment),
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_and_spent_tokens_survive_a_coordinator_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let ca = std::sync::Arc::new(ClusterCa::generate("restart-test").unwrap());
    let op = TlsMode::Mtls(material(&ca, Role::Client, "operator"));
    let admin = |c: &shoal_cluster::Coordinator| {
        let endpoint = c.grpc_addr().to_string();
        let op = op.clone();
        async move {
            let ch = connect(&endpoint, &op, ConnectOptions::default())
                .await
                .unwrap();
            shoal_net::admin_client(ch, Duration::from_secs(10))
        }
    };

    let first = bare_coordinator(dir.path(), &ca).await;
    let r = admin(&first)
        .await
        .revoke_node(v1::RevokeNodeRequest {
            node_id: "gone-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.newly_revoked);
    let token: JoinToken = admin(&first)
        .await
        .create_join_token(v1::CreateJoinTokenRequest {
            ttl_ms: 600_000,
            role: "agent".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .parse()
        .unwrap();
    within("stopping the coordinator", first.shutdown())
        .await
        .unwrap();

    let second = bare_coordinator(dir.path(), &ca).await;
    assert!(second.revocations().is_node_revoked("gone-1"));
    let again = admin(&second)
        .await
        .revoke_node(v1::RevokeNodeRequest {
            node_id: "gone-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.newly_revoked);
    // A token created before the restart still works, once.
    let config = |name: &str| shoal_node::EnrollConfig {
        enroll_addr: second.enroll_addr().unwrap().to_string(),
        token: token.clone(),
        node_id: NodeId::new(name),
        hosts: hosts(),
        connect_timeout: Duration::from_secs(10),
    };
    within(
        "enrolling after a restart",
        shoal_node::enroll(&config("fresh-1")),
    )
    .await
    .unwrap();
    let (class, reason) = refusal(
        within("reusing the token", shoal_node::enroll(&config("fresh-2")))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (class, reason.as_str()),
        (ErrorClass::Unauthenticated, "join_token_used")
    );
    within("stopping the coordinator", second.shutdown())
        .await
        .unwrap();
}
