//! Load runs and chat sessions against the real gateway over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{WAIT, start_gateway};
use shoal_loadgen::{ChatArgs, Endpoint, LoadConfig, LoadReport, StopAfter, run_chat, run_load};
use tokio_util::sync::CancellationToken;

async fn load(cfg: LoadConfig) -> LoadReport {
    tokio::time::timeout(WAIT, run_load(cfg, CancellationToken::new()))
        .await
        .expect("the load run hung")
        .expect("the load run could not start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_load_is_measured_per_request() {
    let gw = start_gateway(64).await;
    let max_tokens = 8;
    let report = load(LoadConfig {
        url: gw.url.clone(),
        concurrency: 3,
        stop: StopAfter::Requests(12),
        warmup: 2,
        max_tokens,
        ..LoadConfig::default()
    })
    .await;
    eprintln!("{}", report.render_text());
    assert_eq!(report.model, "tiny", "discovered from GET /models");
    assert_eq!(report.requests_ok, 12, "{}", report.render_text());
    assert_eq!(report.requests_failed, 0);
    assert_eq!(report.requests_cancelled, 0);
    assert_eq!(report.warmup_requests, 2);
    assert_eq!(report.requests_without_usage, 0);
    assert_eq!(report.samples.len(), 12);
    let mut total = 0;
    for s in &report.samples {
        match s.finish_reason.as_deref() {
            Some("length") => assert_eq!(s.output_tokens, u64::from(max_tokens)),
            Some("stop") => assert!(s.output_tokens <= u64::from(max_tokens)),
            other => panic!("unexpected finish reason {other:?}"),
        }
        let ttft = s.ttft_ms.expect("every answer streams some text");
        assert!(ttft <= s.e2e_ms, "ttft {ttft} > e2e {}", s.e2e_ms);
        assert!(s.itl_ms.iter().all(|&g| g >= 0.0 && g <= s.e2e_ms));
        assert!(s.prompt_tokens.unwrap() > 0);
        assert!(s.bytes_sent > 200 && s.bytes_received > s.output_tokens * 20);
        total += s.output_tokens;
    }
    assert_eq!(report.output_tokens, total);
    for summary in [report.ttft_ms, report.itl_ms, report.e2e_ms] {
        let s = summary.expect("latency summaries of a streamed run");
        assert!(s.min <= s.p50 && s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.max);
    }
    assert_eq!(report.ttft_ms.unwrap().count, 12);
    assert_eq!(report.e2e_ms.unwrap().count, 12);
    assert!(report.ttft_ms.unwrap().p50 <= report.e2e_ms.unwrap().max);
    assert!(report.output_tokens_per_second > 0.0 && report.requests_per_second > 0.0);
    let text = report.render_text();
    assert!(text.contains("12 ok, 0 failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_completions_report_usage_without_stream_timings() {
    let gw = start_gateway(64).await;
    let report = load(LoadConfig {
        url: gw.url.clone(),
        model: Some("tiny".into()),
        concurrency: 2,
        stop: StopAfter::Requests(4),
        max_tokens: 5,
        stream: false,
        endpoint: Endpoint::Completions,
        seed: Some(7),
        ..LoadConfig::default()
    })
    .await;
    assert_eq!(report.requests_ok, 4, "{}", report.render_text());
    assert!(report.ttft_ms.is_none() && report.itl_ms.is_none());
    assert_eq!(report.e2e_ms.unwrap().count, 4);
    assert_eq!(report.requests_without_usage, 0);
    for s in &report.samples {
        assert!(s.output_tokens >= 1 && s.output_tokens <= 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refusals_are_counted_by_status() {
    let gw = start_gateway(1).await;
    let report = load(LoadConfig {
        url: gw.url.clone(),
        concurrency: 4,
        stop: StopAfter::Requests(12),
        max_tokens: 8,
        ..LoadConfig::default()
    })
    .await;
    eprintln!("{}", report.render_text());
    // How many are refused depends on timing; what each outcome is does not.
    assert_eq!(report.requests_ok + report.requests_failed, 12);
    assert!(report.requests_ok >= 1);
    for e in &report.errors {
        assert_eq!(
            (e.status, e.code.as_str()),
            (Some(429), "too_many_requests"),
            "{e:?}"
        );
    }
    assert_eq!(
        report.errors.iter().map(|e| e.count).sum::<u64>(),
        report.requests_failed
    );
}

/// The `[P prompt + A answer tokens, ...]` lines of a transcript, in order.
fn prompt_tokens(transcript: &str) -> Vec<u64> {
    transcript
        .match_indices('[')
        .filter_map(|(i, _)| {
            let rest = &transcript[i + 1..];
            let (n, tail) = rest.split_once(' ')?;
            tail.starts_with("prompt + ").then(|| n.parse().ok())?
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_keeps_history_resets_and_survives_errors() {
    let gw = start_gateway(64).await;
    let args = ChatArgs {
        url: gw.url.clone(),
        model: None,
        api_key: None,
        system: Some("You are brief.".into()),
        max_tokens: 8,
        temperature: 0.0,
        seed: None,
    };
    let oversized = "the river ".repeat(300);
    let script = format!(
        "hello there\n\nhello there\n{oversized}\n/reset\nhello there\n/exit\nnever sent\n"
    );
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, run_chat(args, script.as_bytes(), &mut out))
        .await
        .expect("the chat session hung")
        .unwrap();
    let transcript = String::from_utf8(out).unwrap();
    eprintln!("{transcript}");
    assert!(
        transcript.starts_with(&format!("shoal chat: tiny at {}\n", gw.url)),
        "{transcript}"
    );
    // Same message three times: alone, after one exchange, and alone again after /reset.
    let prompts = prompt_tokens(&transcript);
    assert_eq!(prompts.len(), 3, "{transcript}");
    assert!(prompts[1] > prompts[0], "history not sent: {prompts:?}");
    assert_eq!(prompts[2], prompts[0], "history not cleared: {prompts:?}");
    // The oversized turn failed on one line and the session went on.
    let errors: Vec<&str> = transcript
        .lines()
        .filter(|l| l.contains("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{transcript}");
    assert!(errors[0].contains("context window"), "{transcript}");
    assert!(transcript.contains("(conversation cleared)"));
    // Every answer streamed some text between the prompt marker and its stats line.
    for turn in transcript.split("> ").filter(|t| t.contains(" prompt + ")) {
        let answer = &turn[..turn.find("\n[").unwrap()];
        assert!(!answer.is_empty(), "empty answer: {transcript}");
    }
}

/// A TCP relay on loopback counting the bytes each way, to check the wire-size estimate.
struct Relay {
    url: String,
    up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    down: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        // Counted before forwarding, so the count is complete once the peer has the bytes.
        count.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn relay_to(target_url: &str) -> Relay {
    let target: std::net::SocketAddr = target_url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .parse()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let up = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let down = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (u, d) = (up.clone(), down.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(target).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, u.clone()));
            tokio::spawn(pump(sr, cw, d.clone()));
        }
    });
    Relay { url, up, down }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_bytes_match_a_byte_counting_relay() {
    use std::sync::atomic::Ordering::SeqCst;
    let gw = start_gateway(64).await;
    // Whole replies carry a content-length, so the estimate is exact.
    let relay = relay_to(&gw.url).await;
    let cfg = LoadConfig {
        url: relay.url.clone(),
        model: Some("tiny".into()),
        concurrency: 2,
        stop: StopAfter::Requests(6),
        max_tokens: 6,
        stream: false,
        ..LoadConfig::default()
    };
    let report = load(cfg.clone()).await;
    assert_eq!(report.requests_ok, 6, "{}", report.render_text());
    let sent: u64 = report.samples.iter().map(|s| s.bytes_sent).sum();
    let received: u64 = report.samples.iter().map(|s| s.bytes_received).sum();
    assert_eq!(sent, relay.up.load(SeqCst));
    assert_eq!(received, relay.down.load(SeqCst));
    // Streams are chunked; the framing (a few bytes per chunk) is not counted.
    let relay = relay_to(&gw.url).await;
    let report = load(LoadConfig {
        url: relay.url.clone(),
        stream: true,
        ..cfg
    })
    .await;
    assert_eq!(report.requests_ok, 6, "{}", report.render_text());
    let sent: u64 = report.samples.iter().map(|s| s.bytes_sent).sum();
    let received: u64 = report.samples.iter().map(|s| s.bytes_received).sum();
    let wire_down = relay.down.load(SeqCst);
    eprintln!("streamed: counted {received} B, relay saw {wire_down} B");
    assert_eq!(sent, relay.up.load(SeqCst));
    assert!(received <= wire_down && wire_down - received <= wire_down / 10);
}
