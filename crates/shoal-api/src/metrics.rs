//! The gateway's metrics: names as constants in one place, labels from closed enums only (never
//! ids, models or prompts, which would explode cardinality), encoded for `GET /metrics`.
//!
//! Two expositions: OpenMetrics text (what `prometheus-client` writes; Prometheus asks for it in
//! its `Accept` header), where counters are declared without `_total` in `# HELP`/`# TYPE` lines,
//! and the classic Prometheus text format 0.0.4 for everyone else (curl, `promtool check
//! metrics`), where the declaration carries the sampled name.

use std::fmt::Write as _;
use std::time::Duration;

use axum::http::StatusCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shoal_types::ErrorClass;

/// HTTP responses by route and status class (counter).
pub const HTTP_REQUESTS_TOTAL: &str = "shoal_http_requests_total";
/// Time from admission to the first generated token (histogram).
pub const REQUEST_TTFT_SECONDS: &str = "shoal_request_ttft_seconds";
/// Time between consecutive generated tokens of one request (histogram).
pub const INTER_TOKEN_SECONDS: &str = "shoal_inter_token_seconds";
/// Time from admission to the end of a generation, streamed or not (histogram).
pub const REQUEST_DURATION_SECONDS: &str = "shoal_request_duration_seconds";
/// Generation requests currently holding an admission permit (gauge).
pub const REQUESTS_IN_FLIGHT: &str = "shoal_requests_in_flight";
/// Generation requests by final outcome: `ok` or an error class (counter).
pub const REQUEST_OUTCOMES_TOTAL: &str = "shoal_request_outcomes_total";

/// Requests refused by API key checks, by [`AuthFailure`] reason (counter).
pub const AUTH_FAILURES_TOTAL: &str = "shoal_auth_failures_total";
/// Requests refused by a key's rate limit or token quota, by [`LimitRefusal`] reason (counter).
pub const LIMIT_REFUSALS_TOTAL: &str = "shoal_limit_refusals_total";
/// Entries written to the audit log (counter).
pub const AUDIT_ENTRIES_TOTAL: &str = "shoal_audit_entries_total";
/// Requests that found the audit queue full and waited for a slot (counter).
pub const AUDIT_WAITS_TOTAL: &str = "shoal_audit_waits_total";
/// Audit failures by [`AuditFailure`] reason; each refused a request or stopped the writer
/// (counter).
pub const AUDIT_FAILURES_TOTAL: &str = "shoal_audit_failures_total";
/// TLS handshakes on the gateway's listener that failed or timed out (counter).
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "shoal_tls_handshake_failures_total";

/// Every metric name this module exposes, for tests and dashboards.
pub const ALL_NAMES: [&str; 12] = [
    HTTP_REQUESTS_TOTAL,
    REQUEST_TTFT_SECONDS,
    INTER_TOKEN_SECONDS,
    REQUEST_DURATION_SECONDS,
    REQUESTS_IN_FLIGHT,
    REQUEST_OUTCOMES_TOTAL,
    AUTH_FAILURES_TOTAL,
    LIMIT_REFUSALS_TOTAL,
    AUDIT_ENTRIES_TOTAL,
    AUDIT_WAITS_TOTAL,
    AUDIT_FAILURES_TOTAL,
    TLS_HANDSHAKE_FAILURES_TOTAL,
];

/// Why an API key check refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Not of the form `sk-shoal-<id>-<secret>`.
    Malformed,
    /// No key has that id.
    UnknownKey,
    /// The id exists, the secret does not match.
    WrongSecret,
    /// The key was revoked.
    Revoked,
    /// The key file cannot be read (fail closed: 503).
    StoreUnavailable,
}

impl AuthFailure {
    /// Every reason, to pre-create one series each.
    pub const ALL: [AuthFailure; 6] = [
        AuthFailure::Missing,
        AuthFailure::Malformed,
        AuthFailure::UnknownKey,
        AuthFailure::WrongSecret,
        AuthFailure::Revoked,
        AuthFailure::StoreUnavailable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_key",
            AuthFailure::Malformed => "malformed_key",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::WrongSecret => "wrong_secret",
            AuthFailure::Revoked => "revoked_key",
            AuthFailure::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Which per-key limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitRefusal {
    /// The key's token bucket was empty.
    RateLimit,
    /// The key's token quota is spent.
    Quota,
}

impl LimitRefusal {
    /// Every reason.
    pub const ALL: [LimitRefusal; 2] = [LimitRefusal::RateLimit, LimitRefusal::Quota];

    /// The label value (the error code clients see).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitRefusal::RateLimit => "rate_limit_exceeded",
            LimitRefusal::Quota => "insufficient_quota",
        }
    }
}

/// What went wrong with the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditFailure {
    /// No queue slot freed up in time; the request was refused.
    QueueTimeout,
    /// The writer had stopped; the request was refused.
    WriterStopped,
    /// Writing or flushing the file failed; the writer stopped.
    WriteError,
}

impl AuditFailure {
    /// Every reason.
    pub const ALL: [AuditFailure; 3] = [
        AuditFailure::QueueTimeout,
        AuditFailure::WriterStopped,
        AuditFailure::WriteError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditFailure::QueueTimeout => "queue_timeout",
            AuditFailure::WriterStopped => "writer_stopped",
            AuditFailure::WriteError => "write_error",
        }
    }
}

/// A closed label set given by its `as_str`.
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value!(AuthFailure, LimitRefusal, AuditFailure);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthLabels {
    reason: AuthFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    reason: LimitRefusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuditLabels {
    reason: AuditFailure,
}

/// The routes the gateway serves, as a closed label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `GET /v1/models`
    Models,
    /// `GET /v1/models/{id}`
    Model,
    /// `GET /healthz`
    Healthz,
    /// `GET /readyz`
    Readyz,
    /// `GET /metrics`
    Metrics,
    /// Anything that matched no route.
    Unmatched,
}

impl Route {
    /// Maps axum's matched path pattern to the label.
    pub fn from_matched_path(path: Option<&str>) -> Self {
        match path {
            Some("/v1/chat/completions") => Route::ChatCompletions,
            Some("/v1/completions") => Route::Completions,
            Some("/v1/models") => Route::Models,
            Some(p) if p.starts_with("/v1/models/") => Route::Model,
            Some("/healthz") => Route::Healthz,
            Some("/readyz") => Route::Readyz,
            Some("/metrics") => Route::Metrics,
            _ => Route::Unmatched,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat_completions",
            Route::Completions => "completions",
            Route::Models => "models",
            Route::Model => "model",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Unmatched => "unmatched",
        }
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `1xx` … `5xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusClass(u8);

impl StatusClass {
    /// The class of `status` (its first digit).
    pub fn of(status: StatusCode) -> Self {
        // as_u16 is 100..=999, so the first digit fits in a u8.
        Self(u8::try_from(status.as_u16() / 100).unwrap_or(9))
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}xx", self.0)
    }
}

/// How a generation request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It completed (finish reason `stop` or `length`).
    Ok,
    /// It failed with this class (including `cancelled` for client disconnects).
    Error(ErrorClass),
}

impl Outcome {
    /// The label value: `ok` or the class name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(class) => class.as_str(),
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HttpLabels {
    route: Route,
    status_class: StatusClass,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    class: Outcome,
}

/// The gateway's metric handles and the registry that exposes them. Cheap to share by `Arc`;
/// every handle is internally atomic.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    ttft: Histogram,
    inter_token: Histogram,
    duration: Histogram,
    in_flight: Gauge,
    outcomes: Family<OutcomeLabels, Counter>,
    auth_failures: Family<AuthLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    audit_entries: Counter,
    audit_waits: Counter,
    audit_failures: Family<AuditLabels, Counter>,
    tls_handshake_failures: Counter,
}

/// `prometheus-client` appends `_total` to counters itself; the constants carry the exposed name.
fn counter_base(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics and registers them, with one outcome series per class pre-created so
    /// dashboards see zeros rather than gaps.
    pub fn new() -> Self {
        Self::with_extension(|_| {})
    }

    /// Like [`Metrics::new`], letting the embedding process register its own metrics (a node's
    /// queue depth, a coordinator's heartbeat ages) in the same registry, so one `GET /metrics`
    /// exposes them all. Their names must follow the same rules (module constants, `shoal_`).
    pub fn with_extension(extend: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        extend(&mut registry);
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            counter_base(HTTP_REQUESTS_TOTAL),
            "HTTP responses by route and status class",
            http_requests.clone(),
        );
        // 5 ms .. ~41 s: first tokens on small CPUs can take seconds under load.
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            REQUEST_TTFT_SECONDS,
            "Time from admission to the first generated token",
            ttft.clone(),
        );
        // 1 ms .. ~8 s.
        let inter_token = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            INTER_TOKEN_SECONDS,
            "Time between consecutive tokens of one generation",
            inter_token.clone(),
        );
        // 10 ms .. ~5.5 min.
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            REQUEST_DURATION_SECONDS,
            "Time from admission to the end of a generation",
            duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            REQUESTS_IN_FLIGHT,
            "Generation requests holding an admission permit",
            in_flight.clone(),
        );
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            counter_base(REQUEST_OUTCOMES_TOTAL),
            "Generation requests by outcome (ok or error class)",
            outcomes.clone(),
        );
        let _ = outcomes.get_or_create(&OutcomeLabels { class: Outcome::Ok });
        for class in ErrorClass::ALL {
            let _ = outcomes.get_or_create(&OutcomeLabels {
                class: Outcome::Error(class),
            });
        }
        let auth_failures = Family::<AuthLabels, Counter>::default();
        registry.register(
            counter_base(AUTH_FAILURES_TOTAL),
            "Requests refused by API key checks, by reason",
            auth_failures.clone(),
        );
        for reason in AuthFailure::ALL {
            let _ = auth_failures.get_or_create(&AuthLabels { reason });
        }
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            counter_base(LIMIT_REFUSALS_TOTAL),
            "Requests refused by an API key's rate limit or token quota, by reason",
            limit_refusals.clone(),
        );
        for reason in LimitRefusal::ALL {
            let _ = limit_refusals.get_or_create(&LimitLabels { reason });
        }
        let audit_entries = Counter::default();
        registry.register(
            counter_base(AUDIT_ENTRIES_TOTAL),
            "Entries written to the audit log",
            audit_entries.clone(),
        );
        let audit_waits = Counter::default();
        registry.register(
            counter_base(AUDIT_WAITS_TOTAL),
            "Requests that found the audit queue full and waited for a slot",
            audit_waits.clone(),
        );
        let audit_failures = Family::<AuditLabels, Counter>::default();
        registry.register(
            counter_base(AUDIT_FAILURES_TOTAL),
            "Audit log failures by reason",
            audit_failures.clone(),
        );
        for reason in AuditFailure::ALL {
            let _ = audit_failures.get_or_create(&AuditLabels { reason });
        }
        let tls_handshake_failures = Counter::default();
        registry.register(
            counter_base(TLS_HANDSHAKE_FAILURES_TOTAL),
            "TLS handshakes on the gateway's listener that failed or timed out",
            tls_handshake_failures.clone(),
        );
        Self {
            registry,
            http_requests,
            ttft,
            inter_token,
            duration,
            in_flight,
            outcomes,
            auth_failures,
            limit_refusals,
            audit_entries,
            audit_waits,
            audit_failures,
            tls_handshake_failures,
        }
    }

    /// Counts a request refused by an API key check.
    pub fn auth_failure(&self, reason: AuthFailure) {
        self.auth_failures
            .get_or_create(&AuthLabels { reason })
            .inc();
    }

    /// Counts a request refused by a key's limits.
    pub fn limit_refusal(&self, reason: LimitRefusal) {
        self.limit_refusals
            .get_or_create(&LimitLabels { reason })
            .inc();
    }

    /// Counts an audit entry written.
    pub(crate) fn audit_entry(&self) {
        self.audit_entries.inc();
    }

    /// Counts a request that waited for an audit slot.
    pub(crate) fn audit_wait(&self) {
        self.audit_waits.inc();
    }

    /// Counts an audit failure.
    pub(crate) fn audit_failure(&self, reason: AuditFailure) {
        self.audit_failures
            .get_or_create(&AuditLabels { reason })
            .inc();
    }

    /// Counts a failed TLS handshake.
    pub(crate) fn tls_handshake_failure(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Counts one HTTP response.
    pub fn http_response(&self, route: Route, status: StatusCode) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route,
                status_class: StatusClass::of(status),
            })
            .inc();
    }

    /// Records the end of a generation request.
    pub fn outcome(&self, outcome: Outcome) {
        self.outcomes
            .get_or_create(&OutcomeLabels { class: outcome })
            .inc();
    }

    /// Records a time to first token.
    pub fn ttft(&self, elapsed: Duration) {
        self.ttft.observe(elapsed.as_secs_f64());
    }

    /// Records a gap between two tokens.
    pub fn inter_token(&self, elapsed: Duration) {
        self.inter_token.observe(elapsed.as_secs_f64());
    }

    /// Records a whole generation's duration.
    pub fn duration(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Adjusts the in-flight gauge.
    pub(crate) fn in_flight_add(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// Current value of the in-flight gauge.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// The OpenMetrics text exposition, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `Content-Type` of [`Metrics::encode_prometheus_text`]'s output.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    /// The classic Prometheus text exposition (format 0.0.4).
    pub fn encode_prometheus_text(&self) -> Result<String, std::fmt::Error> {
        Ok(openmetrics_to_prometheus_text(&self.encode()?))
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4. For the subset `prometheus-client`
/// writes here (counters, gauges, histograms; no exemplars, units or `_created`), the formats
/// differ only in counter declarations (`foo` vs `foo_total`) and the `# EOF` trailer.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let declaration = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| line.strip_prefix(prefix).map(|rest| (prefix, rest)));
        match declaration {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let _ = writeln!(out, "{prefix}{name}{suffix} {tail}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn names_follow_house_conventions() {
        for name in ALL_NAMES {
            assert!(name.starts_with("shoal_"), "{name}");
        }
        for counter in [
            HTTP_REQUESTS_TOTAL,
            REQUEST_OUTCOMES_TOTAL,
            AUTH_FAILURES_TOTAL,
            LIMIT_REFUSALS_TOTAL,
            AUDIT_ENTRIES_TOTAL,
            AUDIT_WAITS_TOTAL,
            AUDIT_FAILURES_TOTAL,
            TLS_HANDSHAKE_FAILURES_TOTAL,
        ] {
            assert!(counter.ends_with("_total"), "{counter}");
        }
        for other in [
            REQUEST_TTFT_SECONDS,
            INTER_TOKEN_SECONDS,
            REQUEST_DURATION_SECONDS,
            REQUESTS_IN_FLIGHT,
        ] {
            assert!(!other.ends_with("_total"), "{other}");
        }
    }

    #[test]
    fn exposition_has_every_metric_and_one_outcome_series_per_class() {
        let metrics = Metrics::new();
        metrics.http_response(Route::ChatCompletions, StatusCode::TOO_MANY_REQUESTS);
        metrics.outcome(Outcome::Error(ErrorClass::CapacityExhausted));
        metrics.ttft(Duration::from_millis(20));
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "shoal_http_requests_total{route=\"chat_completions\",status_class=\"4xx\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("shoal_request_outcomes_total{class=\"capacity_exhausted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("shoal_request_outcomes_total{class=\"ok\"} 0"),
            "{text}"
        );
        for class in ErrorClass::ALL {
            let series = format!(
                "shoal_request_outcomes_total{{class=\"{}\"}}",
                class.as_str()
            );
            assert_eq!(text.matches(&series).count(), 1, "{series}");
        }
        assert!(
            text.contains("shoal_request_ttft_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("shoal_requests_in_flight 0"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn prometheus_text_declares_counters_by_their_sampled_name() {
        let metrics = Metrics::new();
        metrics.http_response(Route::Healthz, StatusCode::OK);
        let text = metrics.encode_prometheus_text().unwrap();
        assert!(
            text.contains("# TYPE shoal_http_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP shoal_http_requests_total HTTP responses"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE shoal_request_outcomes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE shoal_request_ttft_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE shoal_requests_in_flight gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_http_requests_total{route=\"healthz\",status_class=\"2xx\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn route_labels_from_patterns() {
        assert_eq!(
            Route::from_matched_path(Some("/v1/models/{*id}")),
            Route::Model
        );
        assert_eq!(Route::from_matched_path(None), Route::Unmatched);
        assert_eq!(
            Route::from_matched_path(Some("/v1/chat/completions")),
            Route::ChatCompletions
        );
    }
}
