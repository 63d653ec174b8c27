//! `GET /metrics`: the exposition parses and counts what happened.

use std::collections::{BTreeMap, HashMap};

use axum::http::{StatusCode, header};
use serde_json::json;
use shoal_api::metrics::ALL_NAMES;
use shoal_api::{BackendError, FinishReason};
use shoal_types::ErrorClass;

use crate::support::*;

/// Which text exposition a parse expects.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    OpenMetrics,
    PrometheusText,
}

/// A small exposition parser: checks structure and returns `series -> value`, where series is
/// the sample name with its label block exactly as written.
fn parse_exposition(text: &str, format: Format) -> BTreeMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeMap::new();
    let mut lines: Vec<&str> = text.lines().collect();
    if format == Format::OpenMetrics {
        assert_eq!(
            lines.pop(),
            Some("# EOF"),
            "OpenMetrics must end with # EOF"
        );
    }
    assert!(!lines.contains(&"# EOF"), "stray # EOF");
    for line in &lines {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has name and type");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unexpected type in {line}"
            );
            // Prometheus text declares counters by their sampled name; OpenMetrics without it.
            let declared_total = name.ends_with("_total");
            if kind == "counter" {
                assert_eq!(declared_total, format == Format::PrometheusText, "{line}");
            }
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "duplicate {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line}"
        );
        let labels = &series[name.len()..];
        if !labels.is_empty() {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels in {line}"
            );
            // Label values here come from closed enums and bucket bounds: no commas inside.
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').expect("label has =");
                assert!(
                    !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
            }
        }
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| types.contains_key(*base))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample {line} has no # TYPE for {family}"
        );
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series {line}"
        );
    }
    samples
}

#[tokio::test]
async fn metrics_endpoint_parses_and_counts() {
    let backend = ScriptedBackend::new();
    backend.push(Script::tokens(&["a", "b", "c"], FinishReason::Stop));
    backend.push(Script::Refuse(BackendError::new(
        ErrorClass::Unavailable,
        "no_nodes",
        "later",
    )));
    let router = app(backend);
    let (status, _, _) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({"n": 3}))),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let mut req = get("/metrics");
    req.headers_mut().insert(
        header::ACCEPT,
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            .parse()
            .unwrap(),
    );
    let (status, headers, openmetrics) = call_text(&router, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{headers:?}"
    );
    let from_openmetrics = parse_exposition(&openmetrics, Format::OpenMetrics);

    let (status, headers, text) = call_text(&router, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let samples = parse_exposition(&text, Format::PrometheusText);
    // Same series and values either way (the /metrics requests themselves count only once
    // their response is done, so neither scrape sees the other).
    let without_metrics_route = |m: &BTreeMap<String, f64>| -> Vec<(String, f64)> {
        m.iter()
            .filter(|(k, _)| !k.contains("route=\"metrics\""))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    assert_eq!(
        without_metrics_route(&samples),
        without_metrics_route(&from_openmetrics)
    );
    for name in ALL_NAMES {
        assert!(
            samples.keys().any(|series| series.starts_with(name)),
            "{name} missing from\n{text}"
        );
    }
    let value = |series: &str| -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    };
    assert_eq!(
        value(r#"shoal_http_requests_total{route="chat_completions",status_class="2xx"}"#),
        1.0
    );
    assert_eq!(
        value(r#"shoal_http_requests_total{route="chat_completions",status_class="5xx"}"#),
        1.0
    );
    assert_eq!(
        value(r#"shoal_http_requests_total{route="chat_completions",status_class="4xx"}"#),
        1.0
    );
    assert_eq!(value(r#"shoal_request_outcomes_total{class="ok"}"#), 1.0);
    assert_eq!(
        value(r#"shoal_request_outcomes_total{class="unavailable"}"#),
        1.0
    );
    assert_eq!(
        value(r#"shoal_request_outcomes_total{class="invalid_request"}"#),
        1.0
    );
    for class in ErrorClass::ALL {
        value(&format!(
            r#"shoal_request_outcomes_total{{class="{}"}}"#,
            class.as_str()
        ));
    }
    assert_eq!(value("shoal_request_ttft_seconds_count"), 1.0);
    assert_eq!(value("shoal_inter_token_seconds_count"), 2.0);
    // Two requests were admitted (the refused one held a permit while the backend answered).
    assert_eq!(value("shoal_request_duration_seconds_count"), 2.0);
    assert_eq!(value("shoal_requests_in_flight"), 0.0);
}

/// Lints the exposition with Prometheus' own `promtool check metrics`. Ignored by default
/// because it needs `promtool` (Debian package `prometheus`):
/// `cargo test -p shoal-api -- --ignored promtool`.
#[tokio::test]
#[ignore = "needs promtool (apt-get install prometheus)"]
async fn promtool_accepts_the_exposition() {
    use tokio::io::AsyncWriteExt;

    let backend = ScriptedBackend::new();
    let router = app(backend);
    let (status, _, _) = call(
        &router,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, text) = call_text(&router, get("/metrics")).await;

    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = within("promtool check metrics", child.wait_with_output())
        .await
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool rejected:\n{report}\n{text}"
    );
    assert!(
        report.trim().is_empty(),
        "promtool lint findings:\n{report}"
    );
}
