//! A port scan of a whole cluster in one process (a coordinator that enrolls nodes, an agent
//! with issued material as `shoal up` makes them, an enrolled agent): every TCP port the
//! cluster listens on is found from the process's own sockets, and each is probed the way a
//! stranger on the network would. Alone in its test binary, so no other test's sockets mix in.
//!
//! What must hold:
//! - gRPC ports (coordinator, agents' data planes): plaintext HTTP/1.1, an HTTP/2 preface and
//!   a plaintext gRPC call get nothing but a TLS alert or a closed connection; TLS without a
//!   client certificate is refused in the handshake.
//! - the enrollment port (documented exception): plaintext likewise gets nothing; TLS
//!   without a client certificate reaches only `Enrollment.Enroll`, which refuses a bad
//!   token, and every other method is refused `UNAUTHENTICATED`/`no_client_certificate`.
//! - HTTP ports (gateway, agents' endpoints): health, readiness and metrics answer. With an
//!   API key configured, the gateway refuses inference without it (401). KNOWN GAP, recorded
//!   here so that fixing it shows: an agent's own HTTP endpoint has no API key setting
//!   (`AgentConfig` has none), so it answers inference without one; bind it to loopback or
//!   leave it off (`--http`) on untrusted networks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use shoal_net::{Role, TlsMode, class_of};
use shoal_proto::ERROR_CLASS_HEADER;
use shoal_proto::v1;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const KEY: &str = "sk-port-scan-test-key";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty HTTP/2 SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Ports this process listens on (TCP, IPv4 and IPv6), from /proc.
fn listening_ports() -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// Sends `bytes` in plaintext and returns what comes back before the server closes (or
/// within a few seconds).
async fn plaintext_probe(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Nothing, or only TLS alert records (content type 21).
fn only_tls_alerts(reply: &[u8]) -> bool {
    let mut rest = reply;
    while rest.len() >= 5 {
        if rest[0] != 0x15 || rest[1] != 0x03 {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        rest = &rest[(5 + len).min(rest.len())..];
    }
    rest.is_empty()
}

/// A channel over TLS that trusts the cluster CA and presents no certificate.
async fn tls_without_certificate(
    addr: SocketAddr,
    ca_pem: &str,
) -> Option<tonic::transport::Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()
}

fn versioned<T>(msg: T) -> tonic::Request<T> {
    let mut req = shoal_net::with_deadline(msg, Duration::from_secs(10));
    req.metadata_mut().insert(
        shoal_proto::VERSION_HEADER,
        shoal_proto::PROTOCOL_VERSION.into(),
    );
    req
}

/// A gRPC port: no answer to anyone without a cluster certificate.
async fn assert_mtls_only(name: &str, addr: SocketAddr, ca_pem: &str) {
    for (what, bytes) in [
        (
            "HTTP/1.1",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("HTTP/2 preface", [H2_PREFACE, H2_SETTINGS].concat()),
    ] {
        let reply = plaintext_probe(addr, &bytes).await;
        assert!(
            only_tls_alerts(&reply),
            "{name} {addr} answered plaintext {what} with {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    // A plaintext gRPC call (HTTP/2 with prior knowledge).
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    if let Ok(ch) = plain.connect().await {
        let err = within(
            "a plaintext gRPC call",
            v1::node_client::NodeClient::new(ch).status(versioned(v1::StatusRequest {})),
        )
        .await
        .expect_err("a plaintext gRPC call was answered");
        assert!(
            err.metadata().get(ERROR_CLASS_HEADER).is_none(),
            "{name}: a plaintext call reached the authorization layer: {err:?}"
        );
    }
    // TLS without a client certificate: refused in the handshake.
    if let Some(ch) = tls_without_certificate(addr, ca_pem).await {
        let err = within(
            "a gRPC call without a client certificate",
            v1::node_client::NodeClient::new(ch).status(versioned(v1::StatusRequest {})),
        )
        .await
        .expect_err("a call without a client certificate was answered");
        assert!(
            err.metadata().get(ERROR_CLASS_HEADER).is_none(),
            "{name}: a call without a certificate got past the handshake: {err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_port_of_a_cluster_refuses_strangers() {
    let before = listening_ports();
    let mut f = Fixture::start_with_api_key(Duration::from_secs(3600), Some(KEY)).await;
    let issued = f.issued_agent("issued-1").await;
    let token = f.token(Duration::from_secs(600)).await;
    let material = f.enroll("enrolled-1", &token).await.unwrap();
    let (enrolled, _) = f.renewing_agent("enrolled-1", material, None).await;
    f.wait_ready("issued-1").await;
    f.wait_ready("enrolled-1").await;
    let opened: BTreeSet<u16> = listening_ports().difference(&before).copied().collect();

    let c = &f.coordinator;
    let enroll_addr = c.enroll_addr().unwrap();
    let mut grpc = vec![("coordinator gRPC", c.grpc_addr())];
    let mut http = vec![("gateway", c.http_addr())];
    for (name, i) in [("issued agent", issued), ("enrolled agent", enrolled)] {
        let a = &f.agents[i].0;
        grpc.push((name, a.data_addr()));
        http.push((name, a.http_addr().unwrap()));
    }
    let known: BTreeSet<u16> = grpc
        .iter()
        .chain(http.iter())
        .map(|(_, a)| a.port())
        .chain([enroll_addr.port()])
        .collect();
    assert_eq!(
        opened, known,
        "the cluster listens on ports it does not document"
    );

    let ca_pem = f.ca.cert_pem().to_owned();
    for (name, addr) in &grpc {
        assert_mtls_only(name, *addr, &ca_pem).await;
    }

    // The enrollment port: plaintext gets nothing ...
    for bytes in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        [H2_PREFACE, H2_SETTINGS].concat(),
    ] {
        let reply = plaintext_probe(enroll_addr, &bytes).await;
        assert!(only_tls_alerts(&reply), "{reply:?}");
    }
    // ... and TLS without a certificate reaches Enroll only.
    let ch = tls_without_certificate(enroll_addr, &ca_pem).await.unwrap();
    let err = v1::admin_client::AdminClient::new(ch.clone())
        .cluster_status(versioned(v1::ClusterStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(class_of(&err).1.as_deref(), Some("no_client_certificate"));
    let err = v1::coordinator_client::CoordinatorClient::new(ch.clone())
        .heartbeat(versioned(v1::HeartbeatRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(class_of(&err).1.as_deref(), Some("no_client_certificate"));
    let err = v1::enrollment_client::EnrollmentClient::new(ch.clone())
        .renew(versioned(v1::RenewRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(class_of(&err).1.as_deref(), Some("no_client_certificate"));
    let csr = shoal_net::CertificateRequest::generate("intruder", &[]).unwrap();
    let err = v1::enrollment_client::EnrollmentClient::new(ch)
        .enroll(versioned(v1::EnrollRequest {
            token_id: "0".repeat(16),
            token_secret: "0".repeat(32),
            csr_pem: csr.csr_pem().to_owned(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(class_of(&err).1.as_deref(), Some("invalid_join_token"));

    // HTTP ports: the public endpoints answer.
    let client = reqwest::Client::new();
    for (name, addr) in &http {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let r = within(
                "a public HTTP endpoint",
                client.get(format!("http://{addr}{path}")).send(),
            )
            .await
            .unwrap();
            assert_eq!(r.status().as_u16(), 200, "{name} {path}");
        }
    }
    // The gateway: inference only with the key.
    assert_eq!(f.chat_at(c.http_addr(), None).await, 401);
    assert_eq!(f.chat_at(c.http_addr(), Some("sk-wrong")).await, 401);
    assert_eq!(f.chat_at(c.http_addr(), Some(KEY)).await, 200);
    // KNOWN GAP (see the module docs): agents' HTTP endpoints take no API key today.
    for (name, addr) in &http[1..] {
        assert_eq!(f.chat_at(*addr, None).await, 200, "{name}");
    }

    // An operator's certificate is needed for the Admin service on the gRPC port.
    let op = TlsMode::Mtls(material_for(&f, Role::Client));
    let ch = shoal_net::connect(
        &c.grpc_addr().to_string(),
        &op,
        shoal_net::ConnectOptions::default(),
    )
    .await
    .unwrap();
    shoal_net::admin_client(ch, Duration::from_secs(10))
        .cluster_status(v1::ClusterStatusRequest {})
        .await
        .unwrap();
}

fn material_for(f: &Fixture, role: Role) -> shoal_net::TlsMaterial {
    common::material(&f.ca, role, "scanner-operator")
}
