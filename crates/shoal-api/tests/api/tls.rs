//! The gateway over HTTPS: reachable by a client that trusts its certificate, not by one that
//! does not, and a plaintext client gets no HTTP answer at all.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use shoal_api::ApiConfig;
use shoal_api::tls::TlsFiles;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::*;

/// A self-signed certificate for `localhost`, written as PEM files in `dir`.
fn self_signed(dir: &std::path::Path) -> (TlsFiles, CertificateDer<'static>) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let files = TlsFiles {
        cert: dir.join("gateway.crt"),
        key: dir.join("gateway.key"),
    };
    std::fs::write(&files.cert, generated.cert.pem()).unwrap();
    std::fs::write(&files.key, generated.signing_key.serialize_pem()).unwrap();
    (files, generated.cert.der().clone())
}

fn client_config(trusted: CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// Sends one HTTP/1.1 request over TLS and returns the raw response.
async fn https(
    addr: SocketAddr,
    trusted: CertificateDer<'static>,
    request: String,
) -> std::io::Result<String> {
    let connector = tokio_rustls::TlsConnector::from(client_config(trusted));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    // The server closes after the response (`Connection: close`); a missing close_notify is not
    // this test's concern, so keep what arrived.
    let _ = tls.read_to_end(&mut out).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
}

fn post_chat() -> String {
    let body = chat_body(json!({})).to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn the_gateway_serves_https_and_refuses_plaintext_and_untrusted_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (files, cert) = self_signed(dir.path());
    let config = ApiConfig {
        tls: Some(files),
        ..ApiConfig::default()
    };
    let (server, state) = TestServer::start_gateway(ScriptedBackend::new(), config).await;
    assert!(state.is_tls());

    let health = within(
        "GET /healthz over TLS",
        https(server.addr, cert.clone(), get("/healthz")),
    )
    .await
    .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let chat = within(
        "a chat completion over TLS",
        https(server.addr, cert.clone(), post_chat()),
    )
    .await
    .unwrap();
    assert!(chat.starts_with("HTTP/1.1 200"), "{chat}");
    let body: Value = serde_json::from_str(chat.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello world");

    // A client trusting another certificate refuses the gateway's.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let untrusted = within(
        "a client with the wrong trust root",
        https(server.addr, other.cert.der().clone(), get("/healthz")),
    )
    .await;
    assert!(untrusted.is_err(), "{untrusted:?}");

    // Plaintext HTTP to the TLS port gets no HTTP response.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(get("/healthz").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = within(
        "the server to drop a plaintext client",
        plain.read_to_end(&mut answer),
    )
    .await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let reqwest_plain = reqwest::Client::new()
        .get(server.url("/healthz"))
        .send()
        .await;
    assert!(reqwest_plain.is_err(), "{reqwest_plain:?}");

    // Failed handshakes are counted (the counter moves once the handshake task has ended).
    within("the handshake failures to be counted", async {
        loop {
            let text = state.metrics().encode().unwrap();
            let failures = text
                .lines()
                .find_map(|l| l.strip_prefix("shoal_tls_handshake_failures_total "))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            if failures >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    server.stop().await;
}
