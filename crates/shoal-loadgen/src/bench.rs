//! `shoal bench`: a closed-loop load generator.
//!
//! `concurrency` workers each send one request, read the whole reply, and send the next, until
//! the run's stop condition: a request count (tickets handed out from one shared counter, so
//! exactly that many requests start) or a duration. At the deadline, and when the caller's
//! token is cancelled, requests still in flight are **cancelled**: their connection is
//! dropped (which makes shoal's gateway cancel the generation) and they are reported as
//! `cancelled`, neither ok nor failed; wall time then ends at the deadline, not when a slow
//! request would have finished.
//!
//! Optional warm-up requests run first at the same concurrency and are not measured.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::client::{
    ApiKey, BodyParams, DEFAULT_URL, Endpoint, HttpClient, ModelsError, RequestFailure,
    request_body,
};
use crate::prompts::{Prompt, PromptsError, builtin_prompts, load_prompts};
use crate::record::{RecordingError, RequestTag, write_recording};
use crate::report::{LoadReport, PhaseResult, RunMeta};

/// Arguments of `shoal bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the OpenAI-compatible API (including `/v1`).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Model to request (default: the first one `GET /models` lists).
    #[arg(long)]
    pub model: Option<String>,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    pub api_key: Option<ApiKey>,
    /// Requests in flight at once (each worker sends its next request when one finishes).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests to send in total (default 64 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    pub requests: Option<u64>,
    /// Run for this many seconds instead of a request count; requests still in flight at the
    /// end are cancelled and reported as such.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// JSONL file of prompts: one `{"prompt": "..."}` or `{"messages": [...]}` per line
    /// (default: a built-in set of 16 short chat prompts).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Most tokens per completion.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sampling seed sent with every request.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Give request `i` (from 0, in the order requests start) the seed `--seed + i` (`i`
    /// without --seed): every request differs and is reproducible.
    #[arg(long)]
    pub seed_per_request: bool,
    /// Send `x-request-id: PREFIX-i` with request `i` (`PREFIX-warmup-i` during warm-up);
    /// `bench` when --record is given without it.
    #[arg(long, value_name = "PREFIX")]
    pub request_id_prefix: Option<String>,
    /// Write every measured request (index, request id, seed, outcome, the whole output text
    /// and each content chunk's arrival time) to FILE as JSON lines, for `shoal chaos-report`.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Ask for whole replies instead of SSE streams (no TTFT or inter-token latency then).
    #[arg(long)]
    pub no_stream: bool,
    /// Use `/chat/completions` (the default).
    #[arg(long, conflicts_with = "completions")]
    pub chat: bool,
    /// Use `/completions`.
    #[arg(long)]
    pub completions: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Requests sent first and not measured (they open connections and warm caches).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Longest a single request may take before it counts as failed (`timeout`).
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub timeout: f64,
}

/// When a load run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopAfter {
    /// After this many requests have finished.
    Requests(u64),
    /// After this long; requests in flight then are cancelled.
    Duration(Duration),
}

/// A load run, in library form.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URL of the API, including `/v1`.
    pub url: String,
    /// Model to request; `None` asks `GET /models` and takes the first.
    pub model: Option<String>,
    /// Bearer key.
    pub api_key: Option<ApiKey>,
    /// Workers, each with one request in flight.
    pub concurrency: usize,
    /// Stop condition of the measured phase.
    pub stop: StopAfter,
    /// Unmeasured requests before the measured phase.
    pub warmup: u64,
    /// Prompts, used round-robin in request order.
    pub prompts: Vec<Prompt>,
    /// `max_tokens` of every request.
    pub max_tokens: u32,
    /// `temperature` of every request.
    pub temperature: f32,
    /// `seed` of every request.
    pub seed: Option<u64>,
    /// Request `i` carries `seed + i` (`i` without a seed).
    pub seed_per_request: bool,
    /// Requests carry `x-request-id: <prefix>-<i>`.
    pub request_id_prefix: Option<String>,
    /// Keep a [`RequestRecord`] of every measured request ([`LoadReport::records`]).
    pub record: bool,
    /// SSE streaming (true) or whole replies.
    pub stream: bool,
    /// Endpoint.
    pub endpoint: Endpoint,
    /// Per-request limit; a request over it fails with code `timeout`.
    pub request_timeout: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_owned(),
            model: None,
            api_key: None,
            concurrency: 8,
            stop: StopAfter::Requests(64),
            warmup: 0,
            prompts: builtin_prompts(),
            max_tokens: 64,
            temperature: 0.0,
            seed: None,
            seed_per_request: false,
            request_id_prefix: None,
            record: false,
            stream: true,
            endpoint: Endpoint::Chat,
            request_timeout: Duration::from_secs(300),
        }
    }
}

/// One thing wrong with a [`LoadConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// The URL does not parse or is not `http://` (this build has no TLS).
    #[error("url {0:?} must be an http:// URL")]
    BadUrl(String),
    /// `concurrency` is 0.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
    /// The request count is 0.
    #[error("the request count must be at least 1")]
    ZeroRequests,
    /// The duration is zero, negative or not finite.
    #[error("the duration must be a positive number of seconds")]
    BadDuration,
    /// No prompts.
    #[error("at least one prompt is needed")]
    NoPrompts,
    /// `max_tokens` is 0.
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// Negative or not finite.
    #[error("temperature must be a finite number >= 0")]
    BadTemperature,
    /// The per-request timeout is zero, negative or not finite.
    #[error("the request timeout must be a positive number of seconds")]
    BadTimeout,
}

impl LoadConfig {
    /// Checks every field, reporting all problems together.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        if !is_http_url(&self.url) {
            problems.push(ConfigProblem::BadUrl(self.url.clone()));
        }
        if self.concurrency == 0 {
            problems.push(ConfigProblem::ZeroConcurrency);
        }
        match self.stop {
            StopAfter::Requests(0) => problems.push(ConfigProblem::ZeroRequests),
            StopAfter::Duration(d) if d.is_zero() => problems.push(ConfigProblem::BadDuration),
            _ => {}
        }
        if self.prompts.is_empty() {
            problems.push(ConfigProblem::NoPrompts);
        }
        if self.max_tokens == 0 {
            problems.push(ConfigProblem::ZeroMaxTokens);
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            problems.push(ConfigProblem::BadTemperature);
        }
        if self.request_timeout.is_zero() {
            problems.push(ConfigProblem::BadTimeout);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

pub(crate) fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| u.scheme() == "http" && u.host_str().is_some())
}

fn seconds(secs: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
}

/// Why a load run could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration failed validation.
    #[error("invalid load configuration: {}", join(.0))]
    InvalidConfig(Vec<ConfigProblem>),
    /// The prompts file could not be used.
    #[error("prompts file")]
    Prompts(#[from] PromptsError),
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// No model was given and none could be discovered.
    #[error("finding a model")]
    Model(#[from] ModelsError),
    /// The run was cancelled before it started (during model discovery).
    #[error("cancelled before the run started")]
    Cancelled,
    /// The recording could not be written.
    #[error("recording")]
    Recording(#[from] RecordingError),
    /// A worker task ended abnormally (a bug: workers catch every request failure).
    #[error("a load worker stopped abnormally")]
    Worker(#[source] tokio::task::JoinError),
}

fn join(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl BenchArgs {
    /// The library configuration these flags describe (reads the prompts file).
    pub async fn to_config(&self) -> Result<LoadConfig, LoadError> {
        let mut problems = Vec::new();
        let stop = match (self.requests, self.duration) {
            (_, Some(secs)) => match seconds(secs) {
                Some(d) => StopAfter::Duration(d),
                None => {
                    problems.push(ConfigProblem::BadDuration);
                    StopAfter::Duration(Duration::ZERO)
                }
            },
            (Some(n), None) => StopAfter::Requests(n),
            (None, None) => StopAfter::Requests(64),
        };
        let request_timeout = seconds(self.timeout).unwrap_or_else(|| {
            problems.push(ConfigProblem::BadTimeout);
            Duration::ZERO
        });
        let prompts = match &self.prompts {
            Some(path) => load_prompts(path).await?,
            None => builtin_prompts(),
        };
        let cfg = LoadConfig {
            url: self.url.clone(),
            model: self.model.clone(),
            api_key: self.api_key.clone(),
            concurrency: self.concurrency,
            stop,
            warmup: self.warmup,
            prompts,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            seed: self.seed,
            seed_per_request: self.seed_per_request,
            request_id_prefix: self
                .request_id_prefix
                .clone()
                .or_else(|| self.record.as_ref().map(|_| "bench".to_owned())),
            record: self.record.is_some(),
            stream: !self.no_stream,
            endpoint: if self.completions {
                Endpoint::Completions
            } else {
                Endpoint::Chat
            },
            request_timeout,
        };
        if let Err(mut more) = cfg.validate() {
            more.retain(|p| !problems.contains(p));
            problems.extend(more);
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(LoadError::InvalidConfig(problems))
        }
    }
}

/// Runs `shoal bench`: the load run, then its report on stdout (text, or JSON with `--json`).
/// Ctrl-C stops the run early; the report then covers what finished. Fails when every
/// measured request failed.
pub async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let cfg = args.to_config().await?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    let signal = tokio::spawn(async move {
        tokio::select! {
            _ = on_signal.cancelled() => {}
            result = tokio::signal::ctrl_c() => {
                if result.is_ok() {
                    eprintln!("interrupted: cancelling requests in flight");
                }
                on_signal.cancel();
            }
        }
    });
    eprintln!(
        "bench: {} to {} at concurrency {}",
        match cfg.stop {
            StopAfter::Requests(1) => "1 request".to_owned(),
            StopAfter::Requests(n) => format!("{n} requests"),
            StopAfter::Duration(d) => format!("{:.1} s", d.as_secs_f64()),
        },
        cfg.url,
        cfg.concurrency
    );
    let result = run_load(cfg, cancel.clone()).await;
    cancel.cancel();
    let _ = signal.await;
    let report = result?;
    if let Some(path) = &args.record {
        write_recording(path, &report.records).await?;
        eprintln!(
            "bench: {} requests recorded in {}",
            report.records.len(),
            path.display()
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    if report.requests_ok == 0 && report.requests_failed > 0 {
        anyhow::bail!("every request failed");
    }
    Ok(())
}

/// What every worker of a run shares.
#[derive(Debug)]
struct Shared {
    client: HttpClient,
    endpoint: Endpoint,
    stream: bool,
    /// Request bodies, one per prompt.
    templates: Vec<serde_json::Value>,
    /// The same, serialised once (used as they are unless seeds vary per request).
    bodies: Vec<bytes::Bytes>,
    seed: Option<u64>,
    seed_per_request: bool,
    request_id_prefix: Option<String>,
    record: bool,
    timeout: Duration,
}

impl Shared {
    /// The shared state of a run of `cfg` against `model`.
    fn new(cfg: &LoadConfig, client: HttpClient, model: String) -> Self {
        let params = BodyParams {
            model,
            max_tokens: cfg.max_tokens,
            temperature: cfg.temperature,
            seed: cfg.seed,
            stream: cfg.stream,
        };
        let templates: Vec<serde_json::Value> = cfg
            .prompts
            .iter()
            .map(|p| request_body(&params, cfg.endpoint, p))
            .collect();
        let bodies = templates
            .iter()
            .map(|b| bytes::Bytes::from(b.to_string()))
            .collect();
        Shared {
            client,
            endpoint: cfg.endpoint,
            stream: cfg.stream,
            templates,
            bodies,
            seed: cfg.seed,
            seed_per_request: cfg.seed_per_request,
            request_id_prefix: cfg.request_id_prefix.clone(),
            record: cfg.record,
            timeout: cfg.request_timeout,
        }
    }

    /// What request `ticket` of a phase sends: its tag (prompt, seed, id) and body.
    fn request(&self, ticket: u64, warmup: bool) -> Option<(RequestTag, bytes::Bytes)> {
        let prompt = usize::try_from(ticket % self.bodies.len() as u64).ok()?;
        let (seed, body) = if self.seed_per_request {
            let seed = self.seed.unwrap_or(0).wrapping_add(ticket);
            let mut body = self.templates.get(prompt)?.clone();
            body["seed"] = seed.into();
            (Some(seed), bytes::Bytes::from(body.to_string()))
        } else {
            (self.seed, self.bodies.get(prompt)?.clone())
        };
        let request_id = self.request_id_prefix.as_ref().map(|p| {
            if warmup {
                format!("{p}-warmup-{ticket}")
            } else {
                format!("{p}-{ticket}")
            }
        });
        let tag = RequestTag {
            index: ticket,
            request_id,
            prompt,
            seed,
            started: SystemTime::now(),
        };
        Some((tag, body))
    }
}

/// A successful request's measurements.
#[derive(Debug, Clone)]
pub(crate) struct Measured {
    pub ttft: Option<Duration>,
    pub gaps: Vec<Duration>,
    pub e2e: Duration,
    pub output_tokens: u64,
    pub prompt_tokens: Option<u64>,
    pub usage_reported: bool,
    pub finish_reason: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The output text (kept only when recording).
    pub text: String,
}

/// Runs a load run and returns its report. Request failures are counted in the report, never
/// returned; this fails only when the run cannot start. Cancelling `cancel` ends the run early
/// with a report of what finished (`interrupted` set).
pub async fn run_load(cfg: LoadConfig, cancel: CancellationToken) -> Result<LoadReport, LoadError> {
    cfg.validate().map_err(LoadError::InvalidConfig)?;
    let client = HttpClient::new(&cfg.url, cfg.api_key.clone(), cfg.concurrency)
        .map_err(LoadError::Client)?;
    let model = match &cfg.model {
        Some(model) => model.clone(),
        None => tokio::select! {
            _ = cancel.cancelled() => return Err(LoadError::Cancelled),
            found = client.first_model() => found?,
        },
    };
    let shared = Arc::new(Shared::new(&cfg, client, model.clone()));
    let warmup = if cfg.warmup > 0 {
        Some(
            run_phase(
                &shared,
                cfg.concurrency,
                StopAfter::Requests(cfg.warmup),
                true,
                &cancel,
            )
            .await?,
        )
    } else {
        None
    };
    let measured = run_phase(&shared, cfg.concurrency, cfg.stop, false, &cancel).await?;
    let meta = RunMeta {
        url: shared.client.base().to_owned(),
        model,
        endpoint: cfg.endpoint,
        stream: cfg.stream,
        concurrency: cfg.concurrency,
        max_tokens: cfg.max_tokens,
        interrupted: cancel.is_cancelled(),
    };
    Ok(LoadReport::build(meta, warmup.as_ref(), measured))
}

/// Runs one phase (warm-up or measured) to its stop condition.
async fn run_phase(
    shared: &Arc<Shared>,
    concurrency: usize,
    stop: StopAfter,
    warmup: bool,
    cancel: &CancellationToken,
) -> Result<PhaseResult, LoadError> {
    let phase = cancel.child_token();
    let tickets = Arc::new(AtomicU64::new(0));
    let limit = match stop {
        StopAfter::Requests(n) => Some(n),
        StopAfter::Duration(_) => None,
    };
    let started = Instant::now();
    let timer = match stop {
        StopAfter::Duration(d) => {
            let phase = phase.clone();
            Some(tokio::spawn(async move {
                tokio::select! {
                    _ = phase.cancelled() => {}
                    _ = tokio::time::sleep(d) => phase.cancel(),
                }
            }))
        }
        StopAfter::Requests(_) => None,
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        workers.spawn(worker(
            shared.clone(),
            tickets.clone(),
            limit,
            warmup,
            phase.clone(),
        ));
    }
    let mut result = PhaseResult::default();
    let mut abnormal = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(part) => result.merge(part),
            Err(err) => {
                phase.cancel();
                abnormal.get_or_insert(err);
            }
        }
    }
    result.wall = started.elapsed();
    phase.cancel();
    if let Some(timer) = timer {
        // The timer only sleeps and cancels; it cannot fail in a way that matters here.
        let _ = timer.await;
    }
    match abnormal {
        Some(err) => Err(LoadError::Worker(err)),
        None => Ok(result),
    }
}

/// One closed-loop worker: takes tickets until the limit or the phase's end.
async fn worker(
    shared: Arc<Shared>,
    tickets: Arc<AtomicU64>,
    limit: Option<u64>,
    warmup: bool,
    phase: CancellationToken,
) -> PhaseResult {
    let mut result = PhaseResult::default();
    let record = shared.record && !warmup;
    while !phase.is_cancelled() {
        let ticket = tickets.fetch_add(1, Ordering::Relaxed);
        if limit.is_some_and(|n| ticket >= n) {
            break;
        }
        let Some((tag, body)) = shared.request(ticket, warmup) else {
            break;
        };
        let start = Instant::now();
        let attempt = tokio::time::timeout(
            shared.timeout,
            run_one(&shared, body, tag.request_id.as_deref()),
        );
        let (recorded, failure) = tokio::select! {
            biased;
            _ = phase.cancelled() => {
                result.cancelled += 1;
                (tag.cancelled(start.elapsed()), None)
            }
            outcome = attempt => match outcome {
                Ok(Ok(measured)) => {
                    let recorded = tag.ok(&measured);
                    result.samples.push(measured);
                    (recorded, None)
                }
                Ok(Err(failure)) => (tag.failed(&failure, start.elapsed()), Some(failure)),
                Err(_) => {
                    let failure = RequestFailure::Timeout(shared.timeout);
                    (tag.failed(&failure, start.elapsed()), Some(failure))
                }
            },
        };
        if let Some(failure) = failure {
            result.record_failure(&failure);
        }
        if record {
            result.records.push(recorded);
        }
    }
    result
}

/// Sends one request and reads its reply to the end.
async fn run_one(
    shared: &Shared,
    body: bytes::Bytes,
    request_id: Option<&str>,
) -> Result<Measured, RequestFailure> {
    let (request, bytes_sent) =
        shared
            .client
            .prepare(shared.endpoint, body, shared.stream, request_id)?;
    let start = Instant::now();
    let mut reply = shared.client.send(request).await?;
    if !shared.stream {
        let whole = reply.whole().await?;
        return Ok(Measured {
            ttft: None,
            gaps: Vec::new(),
            e2e: start.elapsed(),
            output_tokens: whole.info.usage.map_or(0, |u| u.completion_tokens),
            prompt_tokens: whole.info.usage.map(|u| u.prompt_tokens),
            usage_reported: whole.info.usage.is_some(),
            finish_reason: whole.info.finish_reason,
            bytes_sent,
            bytes_received: whole.bytes_received,
            text: String::new(),
        });
    }
    let mut ttft = None;
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::new();
    let mut content_chunks = 0u64;
    let mut usage = None;
    let mut finish_reason = None;
    let mut text = String::new();
    while let Some((at, chunk)) = reply.next_chunk().await? {
        if !chunk.content.is_empty() {
            if shared.record {
                text.push_str(&chunk.content);
            }
            content_chunks += 1;
            match last {
                None => ttft = Some(at.saturating_duration_since(start)),
                Some(prev) => gaps.push(at.saturating_duration_since(prev)),
            }
            last = Some(at);
        }
        if chunk.finish_reason.is_some() {
            finish_reason = chunk.finish_reason;
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    Ok(Measured {
        ttft,
        gaps,
        e2e: start.elapsed(),
        // Without a usage chunk, content chunks are the best estimate (one per token in
        // shoal's gateway); the report counts such requests.
        output_tokens: usage.map_or(content_chunks, |u| u.completion_tokens),
        prompt_tokens: usage.map(|u| u.prompt_tokens),
        usage_reported: usage.is_some(),
        finish_reason,
        bytes_sent,
        bytes_received: reply.bytes_received(),
        text,
    })
}

/// Failures grouped by (status, code): count and the first message seen.
pub(crate) type ErrorTally = BTreeMap<(Option<u16>, String), (u64, String)>;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[tokio::test]
    async fn defaults_match_the_documented_ones() {
        let cfg = parse(&[]).unwrap().to_config().await.unwrap();
        assert_eq!(cfg.url, "http://127.0.0.1:8080/v1");
        assert_eq!(cfg.concurrency, 8);
        assert_eq!(cfg.stop, StopAfter::Requests(64));
        assert_eq!(cfg.max_tokens, 64);
        assert_eq!(cfg.temperature, 0.0);
        assert!(cfg.stream);
        assert_eq!(cfg.endpoint, Endpoint::Chat);
        assert_eq!(cfg.prompts.len(), 16);
        assert_eq!(cfg.warmup, 0);
    }

    #[tokio::test]
    async fn flags_map_to_the_config() {
        let args = parse(&[
            "--url",
            "http://127.0.0.1:9/v1",
            "--completions",
            "--no-stream",
            "--duration",
            "2.5",
            "--api-key",
            "k",
            "--seed",
            "3",
            "--warmup",
            "2",
        ])
        .unwrap();
        assert!(
            !format!("{args:?}").contains("\"k\""),
            "key in Debug output"
        );
        let cfg = args.to_config().await.unwrap();
        assert_eq!(cfg.endpoint, Endpoint::Completions);
        assert!(!cfg.stream);
        assert_eq!(cfg.stop, StopAfter::Duration(Duration::from_millis(2500)));
        assert_eq!(cfg.seed, Some(3));
        assert_eq!(cfg.warmup, 2);
    }

    #[tokio::test]
    async fn per_request_seeds_and_ids_follow_the_request_index() {
        let args = parse(&["--seed", "100", "--seed-per-request", "--record", "x.jsonl"]).unwrap();
        let cfg = args.to_config().await.unwrap();
        assert!(cfg.record);
        assert_eq!(cfg.request_id_prefix.as_deref(), Some("bench"));
        let client = HttpClient::new(&cfg.url, None, 1).unwrap();
        let shared = Shared::new(&cfg, client, "m".into());
        let body = |b: &bytes::Bytes| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        let (tag, sent) = shared.request(17, false).unwrap();
        assert_eq!(tag.seed, Some(117));
        assert_eq!(tag.prompt, 17 % cfg.prompts.len());
        assert_eq!(tag.request_id.as_deref(), Some("bench-17"));
        assert_eq!(body(&sent)["seed"], 117);
        // The same index gives the same request; warm-up ids differ from measured ones.
        let (again, resent) = shared.request(17, true).unwrap();
        assert_eq!(resent, sent);
        assert_eq!(again.request_id.as_deref(), Some("bench-warmup-17"));

        // Without the flag every request carries --seed and no id.
        let cfg = parse(&["--seed", "5"]).unwrap().to_config().await.unwrap();
        let client = HttpClient::new(&cfg.url, None, 1).unwrap();
        let shared = Shared::new(&cfg, client, "m".into());
        let (tag, sent) = shared.request(3, false).unwrap();
        assert_eq!((tag.seed, tag.request_id), (Some(5), None));
        assert_eq!(body(&sent)["seed"], 5);
    }

    #[test]
    fn exclusive_flags_are_refused() {
        assert!(parse(&["--requests", "3", "--duration", "1"]).is_err());
        assert!(parse(&["--chat", "--completions"]).is_err());
    }

    #[tokio::test]
    async fn every_problem_is_reported_together() {
        let args = parse(&[
            "--url",
            "https://example.invalid/v1",
            "--concurrency",
            "0",
            "--duration=-1",
            "--max-tokens",
            "0",
            "--temperature=-0.5",
            "--timeout",
            "0",
        ])
        .unwrap();
        match args.to_config().await {
            Err(LoadError::InvalidConfig(problems)) => {
                assert_eq!(
                    problems,
                    vec![
                        ConfigProblem::BadDuration,
                        ConfigProblem::BadTimeout,
                        ConfigProblem::BadUrl("https://example.invalid/v1".into()),
                        ConfigProblem::ZeroConcurrency,
                        ConfigProblem::ZeroMaxTokens,
                        ConfigProblem::BadTemperature,
                    ]
                );
            }
            other => panic!("expected config problems, got {other:?}"),
        }
        let cfg = LoadConfig {
            stop: StopAfter::Requests(0),
            prompts: Vec::new(),
            ..LoadConfig::default()
        };
        assert_eq!(
            cfg.validate(),
            Err(vec![ConfigProblem::ZeroRequests, ConfigProblem::NoPrompts])
        );
    }
}
