//! The result of a load run: counts, rates, latency percentiles, errors by kind.
//!
//! Latencies cover successful requests only. Rates divide by the measured phase's wall time
//! (warm-up excluded): `requests_per_second` counts successful requests,
//! `output_tokens_per_second` their output tokens. TTFT and inter-token latency exist only for
//! streamed runs; inter-token gaps of all requests are pooled into one distribution.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::bench::{ErrorTally, Measured};
use crate::client::{Endpoint, RequestFailure};
use crate::record::RequestRecord;
use crate::stats::LatencySummary;

/// Failures with the same HTTP status and error code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorGroup {
    /// The HTTP status (200 for errors inside a stream or unreadable replies), `None` when no
    /// reply arrived (connection refused, timeout).
    pub status: Option<u16>,
    /// The OpenAI error code, or `connect`, `timeout`, `transport`, `unknown`,
    /// `bad_reply:<reason>`.
    pub code: String,
    /// How many requests failed this way.
    pub count: u64,
    /// The first message seen for it.
    pub message: String,
}

/// One successful request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestSample {
    /// Request sent → first chunk with content (streamed runs).
    pub ttft_ms: Option<f64>,
    /// Request sent → reply complete.
    pub e2e_ms: f64,
    /// Output tokens from `usage` (content chunks when the server sent no usage).
    pub output_tokens: u64,
    /// Prompt tokens from `usage`.
    pub prompt_tokens: Option<u64>,
    /// The reply's finish reason.
    pub finish_reason: Option<String>,
    /// Request size on the wire (approximate: see the crate docs).
    pub bytes_sent: u64,
    /// Reply size on the wire (approximate).
    pub bytes_received: u64,
    /// Gaps between consecutive content chunks; left out of JSON (it can be large).
    #[serde(skip)]
    pub itl_ms: Vec<f64>,
}

/// Report of a load run. `Serialize` gives the `--json` form.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Base URL.
    pub url: String,
    /// Model requested.
    pub model: String,
    /// Endpoint used.
    pub endpoint: Endpoint,
    /// Whether replies were streamed.
    pub stream: bool,
    /// Workers.
    pub concurrency: usize,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
    /// Warm-up requests sent before measuring (any outcome).
    pub warmup_requests: u64,
    /// Measured requests that completed.
    pub requests_ok: u64,
    /// Measured requests that failed.
    pub requests_failed: u64,
    /// Requests in flight when the run stopped (deadline or cancellation), dropped.
    pub requests_cancelled: u64,
    /// The run was cut short by its cancellation token.
    pub interrupted: bool,
    /// Measured phase duration.
    pub wall_seconds: f64,
    /// Successful requests per second.
    pub requests_per_second: f64,
    /// Output tokens of successful requests.
    pub output_tokens: u64,
    /// Output tokens per second, all requests together.
    pub output_tokens_per_second: f64,
    /// Time to first token (ms), streamed runs only.
    pub ttft_ms: Option<LatencySummary>,
    /// Inter-token latency (ms), streamed runs only.
    pub itl_ms: Option<LatencySummary>,
    /// End-to-end latency (ms).
    pub e2e_ms: Option<LatencySummary>,
    /// Mean request size on the wire (approximate).
    pub bytes_sent_per_request: Option<f64>,
    /// Mean reply size on the wire (approximate).
    pub bytes_received_per_request: Option<f64>,
    /// Successful requests by finish reason (`none` when the reply gave none).
    pub finish_reasons: BTreeMap<String, u64>,
    /// Successful requests whose reply had no `usage` (their token count is estimated).
    pub requests_without_usage: u64,
    /// Failures by status and code, most frequent first.
    pub errors: Vec<ErrorGroup>,
    /// Every successful request, in completion order per worker.
    pub samples: Vec<RequestSample>,
    /// Every measured request in full, when the run recorded them (`--record`), by index.
    #[serde(skip)]
    pub records: Vec<RequestRecord>,
}

/// Run facts that are not measurements.
#[derive(Debug, Clone)]
pub(crate) struct RunMeta {
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub concurrency: usize,
    pub max_tokens: u32,
    pub interrupted: bool,
}

/// Raw results of one phase (or one worker's share of it).
#[derive(Debug, Default)]
pub(crate) struct PhaseResult {
    pub samples: Vec<Measured>,
    pub records: Vec<RequestRecord>,
    pub errors: ErrorTally,
    pub failed: u64,
    pub cancelled: u64,
    pub wall: Duration,
}

impl PhaseResult {
    pub(crate) fn record_failure(&mut self, failure: &RequestFailure) {
        tracing::debug!(error = %failure.message(), "request failed");
        self.failed += 1;
        let entry = self
            .errors
            .entry((failure.status(), failure.code()))
            .or_insert_with(|| (0, failure.message()));
        entry.0 += 1;
    }

    pub(crate) fn merge(&mut self, other: PhaseResult) {
        self.samples.extend(other.samples);
        self.records.extend(other.records);
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        for (key, (count, message)) in other.errors {
            self.errors.entry(key).or_insert((0, message)).0 += count;
        }
    }

    fn total(&self) -> u64 {
        self.samples.len() as u64 + self.failed + self.cancelled
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn per_second(count: u64, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

impl LoadReport {
    pub(crate) fn build(meta: RunMeta, warmup: Option<&PhaseResult>, phase: PhaseResult) -> Self {
        let ok = phase.samples.len() as u64;
        let mut ttft: Vec<Duration> = phase.samples.iter().filter_map(|s| s.ttft).collect();
        let mut itl: Vec<Duration> = phase
            .samples
            .iter()
            .flat_map(|s| s.gaps.iter().copied())
            .collect();
        let mut e2e: Vec<Duration> = phase.samples.iter().map(|s| s.e2e).collect();
        let output_tokens = phase.samples.iter().map(|s| s.output_tokens).sum();
        let mean = |f: fn(&Measured) -> u64| {
            (ok > 0).then(|| phase.samples.iter().map(f).sum::<u64>() as f64 / ok as f64)
        };
        let mut finish_reasons = BTreeMap::new();
        for s in &phase.samples {
            let reason = s.finish_reason.clone().unwrap_or_else(|| "none".to_owned());
            *finish_reasons.entry(reason).or_insert(0) += 1;
        }
        let mut errors: Vec<ErrorGroup> = phase
            .errors
            .iter()
            .map(|((status, code), (count, message))| ErrorGroup {
                status: *status,
                code: code.clone(),
                count: *count,
                message: message.clone(),
            })
            .collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.count));
        Self {
            url: meta.url,
            model: meta.model,
            endpoint: meta.endpoint,
            stream: meta.stream,
            concurrency: meta.concurrency,
            max_tokens: meta.max_tokens,
            warmup_requests: warmup.map_or(0, PhaseResult::total),
            requests_ok: ok,
            requests_failed: phase.failed,
            requests_cancelled: phase.cancelled,
            interrupted: meta.interrupted,
            wall_seconds: phase.wall.as_secs_f64(),
            requests_per_second: per_second(ok, phase.wall),
            output_tokens,
            output_tokens_per_second: per_second(output_tokens, phase.wall),
            ttft_ms: LatencySummary::from_durations(&mut ttft),
            itl_ms: LatencySummary::from_durations(&mut itl),
            e2e_ms: LatencySummary::from_durations(&mut e2e),
            bytes_sent_per_request: mean(|s| s.bytes_sent),
            bytes_received_per_request: mean(|s| s.bytes_received),
            finish_reasons,
            requests_without_usage: phase.samples.iter().filter(|s| !s.usage_reported).count()
                as u64,
            errors,
            samples: phase
                .samples
                .iter()
                .map(|s| RequestSample {
                    ttft_ms: s.ttft.map(ms),
                    e2e_ms: ms(s.e2e),
                    output_tokens: s.output_tokens,
                    prompt_tokens: s.prompt_tokens,
                    finish_reason: s.finish_reason.clone(),
                    bytes_sent: s.bytes_sent,
                    bytes_received: s.bytes_received,
                    itl_ms: s.gaps.iter().copied().map(ms).collect(),
                })
                .collect(),
            records: {
                let mut records = phase.records;
                records.sort_by_key(|r| r.index);
                records
            },
        }
    }

    /// The report for a person, a few aligned lines.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let mode = if self.stream {
            "streamed"
        } else {
            "whole replies"
        };
        let _ = writeln!(
            out,
            "target      {} model {} ({}, {mode}), concurrency {}, max_tokens {}",
            self.url,
            self.model,
            self.endpoint.as_str(),
            self.concurrency,
            self.max_tokens
        );
        let _ = write!(
            out,
            "requests    {} ok, {} failed, {} cancelled in {:.3} s",
            self.requests_ok, self.requests_failed, self.requests_cancelled, self.wall_seconds
        );
        if self.warmup_requests > 0 {
            let _ = write!(out, " (after {} warm-up)", self.warmup_requests);
        }
        if self.interrupted {
            out.push_str(" [interrupted]");
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "throughput  {:.2} requests/s, {:.1} output tokens/s ({} tokens)",
            self.requests_per_second, self.output_tokens_per_second, self.output_tokens
        );
        let _ = writeln!(
            out,
            "latency ms  {:>9} {:>9} {:>9} {:>9}",
            "mean", "p50", "p95", "p99"
        );
        for (name, summary) in [
            ("TTFT", &self.ttft_ms),
            ("ITL", &self.itl_ms),
            ("e2e", &self.e2e_ms),
        ] {
            match summary {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "  {name:<9} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                        s.mean, s.p50, s.p95, s.p99
                    );
                }
                None => {
                    let _ = writeln!(out, "  {name:<9} {:>9}", "n/a");
                }
            }
        }
        if let (Some(sent), Some(received)) =
            (self.bytes_sent_per_request, self.bytes_received_per_request)
        {
            let _ = writeln!(
                out,
                "wire        {sent:.0} B sent, {received:.0} B received per request (HTTP/1.1 head and body; approximate)"
            );
        }
        if !self.finish_reasons.is_empty() {
            let reasons: Vec<String> = self
                .finish_reasons
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            let _ = write!(out, "finish      {}", reasons.join(", "));
            if self.requests_without_usage > 0 {
                let _ = write!(
                    out,
                    " ({} replies without usage; tokens estimated)",
                    self.requests_without_usage
                );
            }
            out.push('\n');
        }
        for (i, e) in self.errors.iter().enumerate() {
            let label = if i == 0 { "errors" } else { "" };
            let status = e
                .status
                .map_or_else(|| "no reply".to_owned(), |s| format!("HTTP {s}"));
            let _ = writeln!(
                out,
                "{label:<11} {} x {status} {}: {}",
                e.count, e.code, e.message
            );
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn sample(ttft: u64, gaps: &[u64], e2e: u64, tokens: u64) -> Measured {
        Measured {
            ttft: Some(Duration::from_millis(ttft)),
            gaps: gaps.iter().map(|&g| Duration::from_millis(g)).collect(),
            e2e: Duration::from_millis(e2e),
            output_tokens: tokens,
            prompt_tokens: Some(10),
            usage_reported: true,
            finish_reason: Some("length".into()),
            bytes_sent: 100,
            bytes_received: 300,
            text: String::new(),
        }
    }

    fn meta() -> RunMeta {
        RunMeta {
            url: "http://127.0.0.1:1/v1".into(),
            model: "m".into(),
            endpoint: Endpoint::Chat,
            stream: true,
            concurrency: 2,
            max_tokens: 3,
            interrupted: false,
        }
    }

    #[test]
    fn aggregates_samples_and_groups_errors() {
        let mut a = PhaseResult::default();
        a.samples.push(sample(10, &[5, 7], 30, 3));
        a.record_failure(&RequestFailure::Status {
            status: 429,
            code: Some("too_many_requests".into()),
            message: "busy".into(),
        });
        let mut b = PhaseResult::default();
        b.samples.push(sample(20, &[6], 40, 2));
        b.record_failure(&RequestFailure::Status {
            status: 429,
            code: Some("too_many_requests".into()),
            message: "still busy".into(),
        });
        b.record_failure(&RequestFailure::Timeout(Duration::from_secs(1)));
        b.cancelled = 1;
        a.merge(b);
        a.wall = Duration::from_secs(2);
        let report = LoadReport::build(meta(), None, a);
        assert_eq!(report.requests_ok, 2);
        assert_eq!(report.requests_failed, 3);
        assert_eq!(report.requests_cancelled, 1);
        assert_eq!(report.output_tokens, 5);
        assert!((report.output_tokens_per_second - 2.5).abs() < 1e-9);
        assert!((report.requests_per_second - 1.0).abs() < 1e-9);
        assert_eq!(report.itl_ms.unwrap().count, 3);
        assert!((report.ttft_ms.unwrap().mean - 15.0).abs() < 1e-9);
        assert_eq!(report.bytes_sent_per_request, Some(100.0));
        assert_eq!(
            report.errors[0],
            ErrorGroup {
                status: Some(429),
                code: "too_many_requests".into(),
                count: 2,
                message: "busy".into(),
            }
        );
        assert_eq!(report.errors[1].status, None);
        assert_eq!(report.errors[1].code, "timeout");
        assert_eq!(report.finish_reasons["length"], 2);
        let text = report.render_text();
        assert!(text.contains("2 ok, 3 failed, 1 cancelled"), "{text}");
        assert!(
            text.contains("2 x HTTP 429 too_many_requests: busy"),
            "{text}"
        );
        assert!(text.contains("1 x no reply timeout"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["errors"][0]["code"], "too_many_requests");
        assert_eq!(json["endpoint"], "chat");
        assert!(json["samples"][0].get("itl_ms").is_none());
    }

    #[test]
    fn empty_run_renders_without_latencies() {
        let report = LoadReport::build(meta(), None, PhaseResult::default());
        assert_eq!(report.requests_per_second, 0.0);
        assert!(report.e2e_ms.is_none());
        let text = report.render_text();
        assert!(text.contains("n/a"), "{text}");
    }
}
