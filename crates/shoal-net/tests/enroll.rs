//! Enrollment and renewal building blocks over real TLS on loopback: a signing request signed
//! by the CA gives working mTLS material whose key never left the requester; the enrollment
//! link trusts only the pinned CA and serves nothing but anonymous-allowed methods; a server
//! on `tls_incoming` presents a replaced certificate on the next handshake.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use common::*;
use shoal_net::{
    AccessPolicy, AuthLayer, CertificateRequest, ClusterCa, ConnectOptions, NetError, PeerIdentity,
    RenewableIdentity, Revocations, Role, TlsMode, VerifiedRequest, class_of, connect,
    connect_for_enrollment, enrollment_server_builder, node_client, tls_incoming,
};
use shoal_proto::v1::StatusRequest;
use shoal_proto::v1::node_server::NodeServer;
use shoal_types::ErrorClass;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::server::TcpIncoming;

const DEADLINE: Duration = Duration::from_secs(10);
const HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];

fn hosts() -> Vec<String> {
    HOSTS.iter().map(|h| (*h).to_owned()).collect()
}

#[test]
fn a_signed_request_gives_material_for_the_requested_node_and_the_cas_choice_of_role() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let request = CertificateRequest::generate("pi-7", &hosts()).unwrap();
    assert!(!format!("{request:?}").contains("PRIVATE"));
    let verified = VerifiedRequest::from_pem(request.csr_pem()).unwrap();
    assert_eq!(verified.node_id, "pi-7");
    assert_eq!(verified.hosts, hosts());
    let id = PeerIdentity::new(CLUSTER, Role::Agent, "pi-7").unwrap();
    let signed = ca
        .sign_request(&verified, &id, Duration::from_secs(60))
        .unwrap();
    let life = signed.not_after.duration_since(signed.not_before).unwrap();
    assert!(life <= Duration::from_secs(60 + 5 * 60), "{life:?}");
    let material = request.into_material(signed.cert_pem, ca.cert_pem().to_owned());
    assert_eq!(material.identity().unwrap(), id);
    // The key that signed the request is the certificate's key.
    let live = RenewableIdentity::new(material).unwrap();
    assert_eq!(live.certificate().serial, signed.serial);
}

#[test]
fn tampered_or_foreign_requests_are_refused() {
    let request = CertificateRequest::generate("pi-7", &[]).unwrap();
    let pem = request.csr_pem();
    // Flip one byte in the base64 body: the signature no longer verifies (or it no longer
    // parses); either way, nothing is signed.
    let mut lines: Vec<String> = pem.lines().map(str::to_owned).collect();
    let mid = lines.len() / 2;
    let mut bytes = lines[mid].clone().into_bytes();
    bytes[10] = if bytes[10] == b'A' { b'B' } else { b'A' };
    lines[mid] = String::from_utf8(bytes).unwrap();
    let tampered = lines.join("\n");
    assert!(matches!(
        VerifiedRequest::from_pem(&tampered),
        Err(NetError::InvalidRequest { .. })
    ));
    assert!(matches!(
        VerifiedRequest::from_pem("not a request"),
        Err(NetError::InvalidRequest { .. })
    ));
    assert!(CertificateRequest::generate("bad name!", &[]).is_err());
    assert!(CertificateRequest::generate("n", &["not a host!".to_owned()]).is_err());
}

/// An enrollment-style server: TLS without client certificates, the `Node` test double
/// behind the authorization layer with `policy`.
async fn enrollment_server(ca: &ClusterCa, policy: AccessPolicy) -> (Running, TestNode) {
    let material = material(ca, Role::Coordinator, "coord");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let node = TestNode::default();
    let layer =
        AuthLayer::new(&TlsMode::Mtls(material.clone()), policy, Revocations::new()).unwrap();
    let router = enrollment_server_builder(&material)
        .unwrap()
        .layer(layer)
        .add_service(NodeServer::new(node.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let stop = async {
            let _ = rx.await;
        };
        let _ = router
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop)
            .await;
    });
    (Running::new(addr, tx), node)
}

#[tokio::test]
async fn the_enrollment_link_trusts_only_the_pinned_ca_and_only_anonymous_methods() {
    init_logs();
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let pin = ca.fingerprint().unwrap();
    let anon_status = AccessPolicy::deny_all().allow_anonymous("shoal.v1.Node", "Status");
    let (server, node) = enrollment_server(&ca, anon_status).await;

    // The right pin: the call goes through without any client certificate.
    let ch = within(
        "connecting with the right pin",
        connect_for_enrollment(&server.endpoint(), &pin, ConnectOptions::default()),
    )
    .await
    .unwrap();
    let reply = within(
        "an anonymous-allowed call",
        node_client(ch.clone(), DEADLINE).status(StatusRequest {}),
    )
    .await
    .unwrap();
    assert_eq!(reply.into_inner().node_id, "test-node");
    assert_eq!(node.calls.count(), 1);
    assert_eq!(node.calls.last_caller(), None);

    // Any other method on the same link is refused by the authorization layer.
    let err = within(
        "a method not open to anonymous callers",
        node_client(ch, DEADLINE).generate(shoal_proto::v1::GenerateRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        class_of(&err),
        (
            ErrorClass::Unauthenticated,
            Some("no_client_certificate".to_owned())
        )
    );
    assert_eq!(node.calls.count(), 1);

    // A pin of another CA: the handshake fails before any request is sent.
    let other = ClusterCa::generate(CLUSTER).unwrap();
    let wrong = other.fingerprint().unwrap();
    let result = within(
        "connecting with another CA's pin",
        connect_for_enrollment(&server.endpoint(), &wrong, ConnectOptions::default()),
    )
    .await;
    let refused = match result {
        Err(e) => matches!(e, NetError::Connect { .. }),
        Ok(ch) => within(
            "a call over a link with the wrong pin",
            node_client(ch, DEADLINE).status(StatusRequest {}),
        )
        .await
        .is_err(),
    };
    assert!(refused, "a coordinator of another CA was trusted");
    assert_eq!(node.calls.count(), 1);
}

#[tokio::test]
async fn the_enrollment_policy_opens_enroll_and_nothing_else() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let (server, node) = enrollment_server(&ca, AccessPolicy::enrollment()).await;
    let ch = connect_for_enrollment(
        &server.endpoint(),
        &ca.fingerprint().unwrap(),
        ConnectOptions::default(),
    )
    .await
    .unwrap();
    let err = within(
        "Node.Status on the enrollment listener",
        node_client(ch, DEADLINE).status(StatusRequest {}),
    )
    .await
    .unwrap_err();
    assert_eq!(class_of(&err).1.as_deref(), Some("no_client_certificate"));
    assert_eq!(node.calls.count(), 0);
}

#[tokio::test]
async fn a_server_on_tls_incoming_presents_a_renewed_certificate_on_new_links() {
    init_logs();
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let first = material(&ca, Role::Agent, "renewing");
    let identity = RenewableIdentity::new(first.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let node = TestNode::default();
    let layer = AuthLayer::new(
        &identity.mode(),
        AccessPolicy::shoal_default(),
        Revocations::new(),
    )
    .unwrap();
    let router = shoal_net::server_builder_for_incoming()
        .layer(layer)
        .add_service(NodeServer::new(node.clone()));
    let incoming = tls_incoming(listener, &identity).unwrap();
    tokio::spawn(router.serve_with_incoming(incoming));

    let caller = TlsMode::Mtls(material(&ca, Role::Coordinator, "coord"));
    let served_serial = |identity: &RenewableIdentity| identity.certificate().serial;
    let seen = presented_serial(addr, &caller).await;
    assert_eq!(seen, served_serial(&identity));

    // Renewed: same identity, new certificate and key.
    let second = material(&ca, Role::Agent, "renewing");
    identity.replace(second).unwrap();
    let seen_after = presented_serial(addr, &caller).await;
    assert_eq!(seen_after, served_serial(&identity));
    assert_ne!(seen, seen_after);

    // gRPC calls still go through the authorization layer, which sees the caller.
    let ch = connect(&addr.to_string(), &caller, ConnectOptions::default())
        .await
        .unwrap();
    within(
        "Status over the renewing server",
        node_client(ch, DEADLINE).status(StatusRequest {}),
    )
    .await
    .unwrap();
    assert_eq!(
        node.calls.last_caller(),
        Some(PeerIdentity::new(CLUSTER, Role::Coordinator, "coord").unwrap())
    );

    // A caller without a client certificate is refused in the handshake, as on tonic's TLS.
    let anonymous = tokio_rustls_client(ca.cert_pem(), None);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = match anonymous
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
    {
        Err(_) => true,
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // TLS 1.3: the refusal arrives on the first read.
            let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate was served");

    // Another peer or CA cannot be swapped in.
    let other = material(&ca, Role::Agent, "someone-else");
    assert!(matches!(
        identity.replace(other),
        Err(NetError::RenewalMismatch { .. })
    ));
    let foreign_ca = ClusterCa::generate(CLUSTER).unwrap();
    assert!(matches!(
        identity.replace(material(&foreign_ca, Role::Agent, "renewing")),
        Err(NetError::RenewalMismatch { .. })
    ));
}

/// A rustls client trusting `ca_pem`, presenting `client` if given.
fn tokio_rustls_client(
    ca_pem: &str,
    client: Option<&shoal_net::TlsMaterial>,
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(m) => {
            let certs = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The serial of the certificate the server at `addr` presents in a fresh handshake.
async fn presented_serial(addr: std::net::SocketAddr, caller: &TlsMode) -> String {
    let TlsMode::Mtls(m) = caller else {
        unreachable!()
    };
    let connector = tokio_rustls_client(&m.ca_pem, Some(m));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = within(
        "a handshake with the renewing server",
        connector.connect("127.0.0.1".try_into().unwrap(), tcp),
    )
    .await
    .unwrap();
    let (_, session) = tls.get_ref();
    let der = session.peer_certificates().unwrap()[0].clone();
    shoal_net::CertificateInfo::from_der(&der).unwrap().serial
}
