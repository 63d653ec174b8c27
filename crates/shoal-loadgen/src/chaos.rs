//! `shoal chaos-report`: what faults cost a load run, from a fault-free recording of the same
//! requests (the reference), the recording made while faults were injected, the gateway's audit
//! log (which nodes served each request) and a log of the faults themselves.
//!
//! Both runs must send the same reproducible requests (`shoal bench --seed-per-request` or
//! greedy sampling, the same prompts, `--record`), so request `i` of one run is request `i` of
//! the other. The report gives:
//!
//! - **completed**: requests of the faulty run that completed;
//! - **identical**: requests whose output text and finish reason equal the reference's;
//! - **failed over**: requests the audit log shows moved to another node (its `failovers`
//!   field; in an older log without it, each node beyond the first counts as a move, which is
//!   right for whole-model replicas only); without an audit log, the requests in flight when a
//!   node was killed or frozen;
//! - **stall**: a request's longest silence (request sent → first chunk, or between two
//!   chunks), for the failed-over requests, beside the same requests' longest silence in the
//!   reference run and the difference (the extra latency of the failover);
//! - **per failover**, from the audit log's `resumes` (the gateway's own measure of each
//!   silence a move caused): the silence, the part the new node spent prefilling again, the
//!   silence beyond that re-prefill, and the time from the loss being noticed to the next
//!   token, whole and beyond the re-prefill. The silence starts at the client's last token,
//!   which may be well before the fault (the node was busy with another request's prefill);
//!   the time from the fault is the gateway's detection (below) plus the recovery;
//! - **detection**: from each fault (a kill; a freeze: the process stopped, alive but silent;
//!   a cut: the node partitioned away, running, its connections open but carrying nothing) to
//!   the coordinator declaring that node dead (its lease expired), to the gateway first
//!   noticing the loss in a generation it was relaying, and to the node being ready again;
//! - **slowdowns**: a slowed node (CPU capped, links delayed and lossy) is not dead. For the
//!   requests in flight on it during a slowdown (from the audit log's paths; without one, every
//!   request in flight then): how many moved away from it (none has to), their longest silence
//!   beside the reference's, and their extra end-to-end latency.
//!
//! The fault log is JSON lines `{"event": "kill" | "freeze" | "cut" | "heal" | "slow" |
//! "restore" | "dead" | "lost" | "ready", "node": "...", "unix_ms": ...}`, written by whatever
//! injects the faults (`scripts/bench/chaos.sh`): `heal` ends a cut, `restore` a slowdown.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::record::{
    RecordOutcome, RecordingError, RequestRecord, read_json_lines, read_recording,
};
use crate::stats::LatencySummary;

/// Arguments of `shoal chaos-report`.
#[derive(Debug, clap::Args)]
pub struct ChaosReportArgs {
    /// The fault-free recording (`shoal bench --record`).
    #[arg(long, value_name = "FILE")]
    pub reference: PathBuf,
    /// The recording made while faults were injected.
    #[arg(long, value_name = "FILE")]
    pub run: PathBuf,
    /// The gateway's audit log of the faulty run (`--audit-log`), to tell which requests
    /// moved to another node.
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// The fault log: JSON lines of kills, deaths declared and nodes ready again.
    #[arg(long, value_name = "FILE")]
    pub faults: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What happened to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// It was killed.
    Kill,
    /// It was frozen (SIGSTOP): alive, holding its connections, answering nothing.
    Freeze,
    /// It was cut off the network (data plane and coordinator link): running, its
    /// connections open, nothing crossing them.
    Cut,
    /// The cut ended: its links carry traffic again.
    Heal,
    /// It was slowed down (less CPU, a slower and lossy link): alive and serving, slowly.
    Slow,
    /// The slowdown ended.
    Restore,
    /// The coordinator declared it dead.
    Dead,
    /// The gateway noticed the loss in the middle of a generation (and moved it).
    Lost,
    /// It (restarted) reported its model ready.
    Ready,
}

/// One line of the fault log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// What happened.
    pub event: FaultKind,
    /// To which node.
    pub node: String,
    /// When, in milliseconds since the Unix epoch.
    pub unix_ms: f64,
}

/// The part of an audit-log entry the report uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AuditPath {
    /// The request's id.
    pub request_id: String,
    /// The nodes that served it, in order.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// How many times it moved to another node, when the log says (a pipeline's path lists
    /// every stage, so the node count alone over-counts its moves).
    #[serde(default)]
    pub failovers: Option<u32>,
    /// What each failover cost the client (absent in older logs).
    #[serde(default)]
    pub resumes: Vec<AuditResume>,
}

/// An audit entry's record of one silence its moves caused, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct AuditResume {
    /// Moves before the next token.
    pub moves: u32,
    /// The client's last token (or the request's start) → the next token.
    pub stall_ms: f64,
    /// The loss noticed → the next token.
    pub recovery_ms: f64,
    /// The new node's prefill → the next token.
    pub reprefill_ms: f64,
}

/// A request of the faulty run that did not complete.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedRequest {
    /// Its index.
    pub index: u64,
    /// How it ended.
    pub outcome: RecordOutcome,
    /// Its error.
    pub error: Option<String>,
}

/// One fault (a kill, a freeze or a cut) and what followed it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KillOutcome {
    /// Which fault.
    pub event: FaultKind,
    /// The node.
    pub node: String,
    /// When, in milliseconds since the Unix epoch.
    pub unix_ms: f64,
    /// Kill → the coordinator declared the node dead (none if it never did).
    pub detected_ms: Option<f64>,
    /// Kill → the gateway first noticed the loss in a generation (none if none was running).
    pub noticed_ms: Option<f64>,
    /// Kill → the restarted node was ready again.
    pub ready_ms: Option<f64>,
    /// Cut → healed (none for other faults).
    pub healed_ms: Option<f64>,
}

/// One slowdown of a node and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlowOutcome {
    /// The node.
    pub node: String,
    /// When it was slowed, in milliseconds since the Unix epoch.
    pub unix_ms: f64,
    /// Slowed → restored (none if the run ended first).
    pub restored_ms: Option<f64>,
    /// Slowed → the coordinator declared it dead, if it did (a slow node is not dead).
    pub detected_ms: Option<f64>,
    /// Slowed → the gateway first took a generation away from it, if it did.
    pub noticed_ms: Option<f64>,
    /// Requests in flight on the node during the slowdown.
    pub requests: u64,
    /// Of them, moved away from the node (see [`ChaosReport::slowed_moved`]).
    pub moved: u64,
}

/// The report of `shoal chaos-report`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChaosReport {
    /// Requests in the faulty run.
    pub requests: u64,
    /// Of them, completed.
    pub completed: u64,
    /// `completed / requests`, in percent.
    pub completed_pct: f64,
    /// Completed with the reference's output text and finish reason.
    pub identical: u64,
    /// `identical / requests`, in percent.
    pub identical_pct: f64,
    /// Indices of completed requests whose output differs from the reference's.
    pub different: Vec<u64>,
    /// Completed requests whose token count differs from the reference's.
    pub token_count_different: u64,
    /// Requests with no completed counterpart in the reference (not comparable).
    pub without_reference: u64,
    /// Requests that did not complete.
    pub failed: Vec<FailedRequest>,
    /// How failed-over requests were found: `audit` or `in_flight_at_kill`.
    pub failover_source: String,
    /// Requests that failed over.
    pub failed_over: u64,
    /// Moves between nodes in all (a request can move more than once).
    pub moves: u64,
    /// Longest silence of each failed-over request in the faulty run (ms).
    pub stall_ms: Option<LatencySummary>,
    /// The same requests' longest silence in the reference run (ms).
    pub reference_stall_ms: Option<LatencySummary>,
    /// Per failed-over request, faulty minus reference longest silence (ms; floored at 0).
    pub extra_stall_ms: Option<LatencySummary>,
    /// Gaps between chunks of the completed requests that did not fail over (ms).
    pub normal_gap_ms: Option<LatencySummary>,
    /// Silences the gateway recorded as caused by moves (the audit log's `resumes`).
    pub resumes: u64,
    /// Each such silence: the client's last token (or the request's start) → the next (ms).
    pub resume_stall_ms: Option<LatencySummary>,
    /// Of each, the new node's re-prefill (ms).
    pub resume_reprefill_ms: Option<LatencySummary>,
    /// Each silence less its re-prefill (ms).
    pub resume_beyond_reprefill_ms: Option<LatencySummary>,
    /// The loss noticed → the next token (ms).
    pub resume_recovery_ms: Option<LatencySummary>,
    /// Each of those less the re-prefill: reconnecting and waiting for the new node's compute
    /// (ms). With the time the gateway took to notice a fault, what a failover adds beyond
    /// computing the context again.
    pub resume_recovery_beyond_reprefill_ms: Option<LatencySummary>,
    /// Every kill.
    pub kills: Vec<KillOutcome>,
    /// Kill → declared dead (ms).
    pub detection_ms: Option<LatencySummary>,
    /// Kill → the gateway noticed it in a generation (ms).
    pub gateway_detection_ms: Option<LatencySummary>,
    /// Kill → ready again (ms).
    pub recovery_ms: Option<LatencySummary>,
    /// Every slowdown.
    pub slowdowns: Vec<SlowOutcome>,
    /// Requests in flight on a slowed node during a slowdown (each counted once).
    pub slowed_requests: u64,
    /// Of them, moved away from the slowed node: moved, with the slowed node not the last
    /// of its path (for a pipeline, a stage before the last also counts); without an audit
    /// log, moved at all.
    pub slowed_moved: u64,
    /// Longest silence of each completed slowed request in the faulty run (ms).
    pub slowed_stall_ms: Option<LatencySummary>,
    /// The same requests' longest silence in the reference run (ms).
    pub slowed_reference_stall_ms: Option<LatencySummary>,
    /// Per completed slowed request, faulty minus reference longest silence (ms; floored at 0).
    pub slowed_extra_stall_ms: Option<LatencySummary>,
    /// Per completed slowed request, faulty minus reference end-to-end latency (ms; floored
    /// at 0).
    pub slowed_extra_e2e_ms: Option<LatencySummary>,
}

/// Why the report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChaosReportError {
    /// An input file is unreadable.
    #[error(transparent)]
    Read(#[from] RecordingError),
    /// The faulty run recorded nothing.
    #[error("the faulty run's recording holds no request")]
    EmptyRun,
}

fn summary(ms: impl IntoIterator<Item = f64>) -> Option<LatencySummary> {
    let mut durations: Vec<Duration> = ms
        .into_iter()
        .map(|m| Duration::try_from_secs_f64(m.max(0.0) / 1e3).unwrap_or(Duration::ZERO))
        .collect();
    LatencySummary::from_durations(&mut durations)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The longest silence of a request: sent → first chunk, or between two chunks; for a request
/// that received nothing, its whole duration.
pub fn longest_silence_ms(r: &RequestRecord) -> f64 {
    let mut prev = 0.0;
    let mut longest: f64 = 0.0;
    for &at in &r.chunk_ms {
        longest = longest.max(at - prev);
        prev = at;
    }
    if r.chunk_ms.is_empty() {
        r.e2e_ms
    } else {
        longest
    }
}

fn gaps_ms(r: &RequestRecord) -> impl Iterator<Item = f64> + '_ {
    r.chunk_ms.windows(2).map(|w| w[1] - w[0])
}

/// How many times each request moved to another node.
enum Moves<'a> {
    /// Moves per request id, from the audit log.
    Audit(HashMap<&'a str, usize>),
    /// Kill times: a request in flight at a kill counts as moved once per such kill.
    InFlightAtKill(Vec<f64>),
}

/// Whether `r` was in flight at some moment of `[from, to)`.
fn in_flight_during(r: &RequestRecord, from: f64, to: f64) -> bool {
    r.started_unix_ms < to && from < r.started_unix_ms + r.e2e_ms
}

/// The faults that make a node unavailable: the ones detection is measured for.
fn is_outage(kind: FaultKind) -> bool {
    matches!(kind, FaultKind::Kill | FaultKind::Freeze | FaultKind::Cut)
}

impl Moves<'_> {
    fn source(&self) -> &'static str {
        match self {
            Moves::Audit(_) => "audit",
            Moves::InFlightAtKill(_) => "in_flight_at_kill",
        }
    }

    fn of(&self, r: &RequestRecord) -> u64 {
        match self {
            Moves::Audit(nodes) => r
                .request_id
                .as_deref()
                .and_then(|id| nodes.get(id))
                .map_or(0, |&n| n as u64),
            Moves::InFlightAtKill(times) => {
                let end = r.started_unix_ms + r.e2e_ms;
                times
                    .iter()
                    .filter(|&&t| r.started_unix_ms <= t && t < end)
                    .count() as u64
            }
        }
    }
}

impl ChaosReport {
    /// Compares `run` with `reference`; `audit` (when given) tells which requests moved;
    /// `faults` gives kills, deaths and recoveries.
    pub fn build(
        reference: &[RequestRecord],
        run: &[RequestRecord],
        audit: Option<&[AuditPath]>,
        faults: &[FaultEvent],
    ) -> Self {
        let by_index: HashMap<u64, &RequestRecord> = reference
            .iter()
            .filter(|r| r.outcome == RecordOutcome::Ok)
            .map(|r| (r.index, r))
            .collect();
        let mut kills: Vec<&FaultEvent> = faults.iter().filter(|f| is_outage(f.event)).collect();
        kills.sort_by(|a, b| a.unix_ms.total_cmp(&b.unix_ms));
        let mut slows: Vec<&FaultEvent> = faults
            .iter()
            .filter(|f| f.event == FaultKind::Slow)
            .collect();
        slows.sort_by(|a, b| a.unix_ms.total_cmp(&b.unix_ms));
        // What follows a fault belongs to it until the node's next fault of any kind.
        let next_fault = |fault: &FaultEvent| {
            faults
                .iter()
                .filter(|f| {
                    (is_outage(f.event) || f.event == FaultKind::Slow)
                        && f.node == fault.node
                        && f.unix_ms > fault.unix_ms
                })
                .map(|f| f.unix_ms)
                .min_by(f64::total_cmp)
                .unwrap_or(f64::INFINITY)
        };
        // The first `kind` event of the fault's node after it (and before its next fault), in
        // ms after it.
        let after = |fault: &FaultEvent, kind: FaultKind| {
            let bound = next_fault(fault);
            faults
                .iter()
                .filter(|f| {
                    f.event == kind
                        && f.node == fault.node
                        && f.unix_ms >= fault.unix_ms
                        && f.unix_ms < bound
                })
                .map(|f| f.unix_ms - fault.unix_ms)
                .min_by(f64::total_cmp)
        };
        // The paths of the audit log, to tell which requests a slowed node served.
        let paths: Option<HashMap<&str, &[String]>> = audit.map(|entries| {
            entries
                .iter()
                .map(|e| (e.request_id.as_str(), e.nodes.as_slice()))
                .collect()
        });

        // Moves per request: from the audit log, or exposure to a kill.
        let moves = match audit {
            Some(entries) => Moves::Audit(
                entries
                    .iter()
                    .map(|e| {
                        let moves = e
                            .failovers
                            .map_or_else(|| e.nodes.len().saturating_sub(1), |n| n as usize);
                        (e.request_id.as_str(), moves)
                    })
                    .collect(),
            ),
            None => Moves::InFlightAtKill(kills.iter().map(|k| k.unix_ms).collect()),
        };
        let mut report = ChaosReport {
            requests: run.len() as u64,
            completed: 0,
            completed_pct: 0.0,
            identical: 0,
            identical_pct: 0.0,
            different: Vec::new(),
            token_count_different: 0,
            without_reference: 0,
            failed: Vec::new(),
            failover_source: moves.source().to_owned(),
            failed_over: 0,
            moves: 0,
            stall_ms: None,
            reference_stall_ms: None,
            extra_stall_ms: None,
            normal_gap_ms: None,
            resumes: 0,
            resume_stall_ms: None,
            resume_reprefill_ms: None,
            resume_beyond_reprefill_ms: None,
            resume_recovery_ms: None,
            resume_recovery_beyond_reprefill_ms: None,
            kills: Vec::new(),
            detection_ms: None,
            gateway_detection_ms: None,
            recovery_ms: None,
            slowdowns: Vec::new(),
            slowed_requests: 0,
            slowed_moved: 0,
            slowed_stall_ms: None,
            slowed_reference_stall_ms: None,
            slowed_extra_stall_ms: None,
            slowed_extra_e2e_ms: None,
        };
        let mut stalls = Vec::new();
        let mut reference_stalls = Vec::new();
        let mut extra = Vec::new();
        let mut normal_gaps = Vec::new();
        for r in run {
            let moved = moves.of(r);
            report.moves += moved;
            if moved > 0 {
                report.failed_over += 1;
            }
            if r.outcome != RecordOutcome::Ok {
                report.failed.push(FailedRequest {
                    index: r.index,
                    outcome: r.outcome,
                    error: r.error.clone(),
                });
                continue;
            }
            report.completed += 1;
            let reference = by_index.get(&r.index);
            match reference {
                None => report.without_reference += 1,
                Some(reference) => {
                    if reference.text == r.text && reference.finish_reason == r.finish_reason {
                        report.identical += 1;
                    } else {
                        report.different.push(r.index);
                    }
                    if reference.output_tokens != r.output_tokens {
                        report.token_count_different += 1;
                    }
                }
            }
            if moved > 0 {
                let stall = longest_silence_ms(r);
                stalls.push(stall);
                if let Some(reference) = reference {
                    let before = longest_silence_ms(reference);
                    reference_stalls.push(before);
                    extra.push(stall - before);
                }
            } else {
                normal_gaps.extend(gaps_ms(r));
            }
        }
        report.completed_pct = pct(report.completed, report.requests);
        report.identical_pct = pct(report.identical, report.requests);
        report.stall_ms = summary(stalls);
        report.reference_stall_ms = summary(reference_stalls);
        report.extra_stall_ms = summary(extra);
        report.normal_gap_ms = summary(normal_gaps);
        let resumes: Vec<&AuditResume> = audit
            .unwrap_or_default()
            .iter()
            .flat_map(|e| &e.resumes)
            .collect();
        report.resumes = resumes.len() as u64;
        report.resume_stall_ms = summary(resumes.iter().map(|r| r.stall_ms));
        report.resume_reprefill_ms = summary(resumes.iter().map(|r| r.reprefill_ms));
        report.resume_beyond_reprefill_ms =
            summary(resumes.iter().map(|r| r.stall_ms - r.reprefill_ms));
        report.resume_recovery_ms = summary(resumes.iter().map(|r| r.recovery_ms));
        report.resume_recovery_beyond_reprefill_ms =
            summary(resumes.iter().map(|r| r.recovery_ms - r.reprefill_ms));

        // Each kill pairs with the first death and the first readiness of that node after it
        // (and before its next fault).
        for kill in &kills {
            report.kills.push(KillOutcome {
                event: kill.event,
                node: kill.node.clone(),
                unix_ms: kill.unix_ms,
                detected_ms: after(kill, FaultKind::Dead),
                noticed_ms: after(kill, FaultKind::Lost),
                ready_ms: after(kill, FaultKind::Ready),
                healed_ms: (kill.event == FaultKind::Cut)
                    .then(|| after(kill, FaultKind::Heal))
                    .flatten(),
            });
        }
        report.detection_ms = summary(report.kills.iter().filter_map(|k| k.detected_ms));
        report.gateway_detection_ms = summary(report.kills.iter().filter_map(|k| k.noticed_ms));
        report.recovery_ms = summary(report.kills.iter().filter_map(|k| k.ready_ms));

        // Each slowdown lasts until the node is restored (or the run ends); the requests in
        // flight on the node meanwhile are its. One of them moved away from the node when it
        // moved and the node is not the last of its path (a request that moved *to* the slowed
        // node fled another fault); without an audit log, when it moved at all.
        let mut slowed: BTreeMap<u64, (&RequestRecord, bool)> = BTreeMap::new();
        for slow in &slows {
            let restored_ms = after(slow, FaultKind::Restore);
            let end = restored_ms.map_or(f64::INFINITY, |ms| slow.unix_ms + ms);
            let path = |r: &RequestRecord| {
                paths.as_ref().map(|paths| {
                    r.request_id
                        .as_deref()
                        .and_then(|id| paths.get(id))
                        .copied()
                        .unwrap_or_default()
                })
            };
            let on_node =
                |r: &RequestRecord| path(r).is_none_or(|nodes| nodes.contains(&slow.node));
            let moved_away = |r: &RequestRecord| {
                moves.of(r) > 0 && path(r).is_none_or(|nodes| nodes.last() != Some(&slow.node))
            };
            let mut outcome = SlowOutcome {
                node: slow.node.clone(),
                unix_ms: slow.unix_ms,
                restored_ms,
                detected_ms: after(slow, FaultKind::Dead),
                noticed_ms: after(slow, FaultKind::Lost),
                requests: 0,
                moved: 0,
            };
            for r in run {
                if in_flight_during(r, slow.unix_ms, end) && on_node(r) {
                    let away = moved_away(r);
                    outcome.requests += 1;
                    outcome.moved += u64::from(away);
                    let entry = slowed.entry(r.index).or_insert((r, false));
                    entry.1 |= away;
                }
            }
            report.slowdowns.push(outcome);
        }
        report.slowed_requests = slowed.len() as u64;
        report.slowed_moved = slowed.values().filter(|(_, away)| *away).count() as u64;
        let (mut stall, mut before, mut extra, mut extra_e2e) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, _) in slowed
            .values()
            .filter(|(r, _)| r.outcome == RecordOutcome::Ok)
        {
            let silence = longest_silence_ms(r);
            stall.push(silence);
            if let Some(reference) = by_index.get(&r.index) {
                let reference_silence = longest_silence_ms(reference);
                before.push(reference_silence);
                extra.push(silence - reference_silence);
                extra_e2e.push(r.e2e_ms - reference.e2e_ms);
            }
        }
        report.slowed_stall_ms = summary(stall);
        report.slowed_reference_stall_ms = summary(before);
        report.slowed_extra_stall_ms = summary(extra);
        report.slowed_extra_e2e_ms = summary(extra_e2e);
        report
    }

    /// The report for a person.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let line = |s: &Option<LatencySummary>| match s {
            Some(s) => format!(
                "p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms  (n={})",
                s.p50, s.p99, s.max, s.count
            ),
            None => "n/a".to_owned(),
        };
        let _ = writeln!(
            out,
            "completed        {}/{} ({:.1}%)",
            self.completed, self.requests, self.completed_pct
        );
        let _ = writeln!(
            out,
            "identical output {}/{} ({:.1}%)",
            self.identical, self.requests, self.identical_pct
        );
        if !self.different.is_empty() {
            let _ = writeln!(out, "  different: requests {:?}", self.different);
        }
        if self.token_count_different > 0 {
            let _ = writeln!(
                out,
                "  token counts differ: {} requests",
                self.token_count_different
            );
        }
        if self.without_reference > 0 {
            let _ = writeln!(
                out,
                "  {} requests have no completed reference",
                self.without_reference
            );
        }
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for f in &self.failed {
            let key = f
                .error
                .clone()
                .unwrap_or_else(|| format!("{:?}", f.outcome));
            *errors.entry(key).or_insert(0) += 1;
        }
        for (error, count) in errors {
            let _ = writeln!(out, "  {count} x {error}");
        }
        let _ = writeln!(
            out,
            "failed over      {} requests, {} moves (from {})",
            self.failed_over, self.moves, self.failover_source
        );
        let _ = writeln!(out, "stall            {}", line(&self.stall_ms));
        let _ = writeln!(
            out,
            "  same requests without faults {}",
            line(&self.reference_stall_ms)
        );
        let _ = writeln!(out, "  extra          {}", line(&self.extra_stall_ms));
        let _ = writeln!(out, "  normal gaps    {}", line(&self.normal_gap_ms));
        if self.resumes > 0 {
            let _ = writeln!(
                out,
                "per failover     {} silences caused by moves (the gateway's measure)",
                self.resumes
            );
            let _ = writeln!(out, "  stall          {}", line(&self.resume_stall_ms));
            let _ = writeln!(out, "  re-prefill     {}", line(&self.resume_reprefill_ms));
            let _ = writeln!(
                out,
                "  beyond it      {}",
                line(&self.resume_beyond_reprefill_ms)
            );
            let _ = writeln!(
                out,
                "  noticed → next token {}",
                line(&self.resume_recovery_ms)
            );
            let _ = writeln!(
                out,
                "    beyond re-prefill  {}",
                line(&self.resume_recovery_beyond_reprefill_ms)
            );
        }
        let count = |kind: FaultKind| self.kills.iter().filter(|k| k.event == kind).count();
        let _ = writeln!(
            out,
            "faults           {} ({} kills, {} freezes, {} cuts)",
            self.kills.len(),
            count(FaultKind::Kill),
            count(FaultKind::Freeze),
            count(FaultKind::Cut)
        );
        let _ = writeln!(out, "  declared dead  {}", line(&self.detection_ms));
        let _ = writeln!(out, "  gateway saw it {}", line(&self.gateway_detection_ms));
        let _ = writeln!(out, "  ready again    {}", line(&self.recovery_ms));
        if !self.slowdowns.is_empty() {
            let dead = self
                .slowdowns
                .iter()
                .filter(|s| s.detected_ms.is_some())
                .count();
            let _ = writeln!(
                out,
                "slowdowns        {} ({dead} declared dead); {} requests in flight on a slowed node, {} moved away",
                self.slowdowns.len(),
                self.slowed_requests,
                self.slowed_moved
            );
            let _ = writeln!(out, "  stall          {}", line(&self.slowed_stall_ms));
            let _ = writeln!(
                out,
                "  same requests without faults {}",
                line(&self.slowed_reference_stall_ms)
            );
            let _ = writeln!(
                out,
                "  extra stall    {}",
                line(&self.slowed_extra_stall_ms)
            );
            let _ = writeln!(out, "  extra e2e      {}", line(&self.slowed_extra_e2e_ms));
        }
        out
    }
}

/// Runs `shoal chaos-report`: reads the files, prints the report.
pub fn run_chaos_report(args: &ChaosReportArgs) -> Result<ChaosReport, ChaosReportError> {
    let reference = read_recording(&args.reference)?;
    let run = read_recording(&args.run)?;
    if run.is_empty() {
        return Err(ChaosReportError::EmptyRun);
    }
    let audit: Option<Vec<AuditPath>> = args.audit.as_deref().map(read_json_lines).transpose()?;
    let faults: Vec<FaultEvent> = match &args.faults {
        Some(path) => read_json_lines(path)?,
        None => Vec::new(),
    };
    Ok(ChaosReport::build(
        &reference,
        &run,
        audit.as_deref(),
        &faults,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const T0: f64 = 1_000_000.0;

    fn ok(index: u64, text: &str, started: f64, chunk_ms: &[f64]) -> RequestRecord {
        RequestRecord {
            index,
            request_id: Some(format!("run-{index}")),
            prompt: 0,
            seed: Some(index),
            started_unix_ms: started,
            outcome: RecordOutcome::Ok,
            error: None,
            text: text.to_owned(),
            finish_reason: Some("length".into()),
            output_tokens: chunk_ms.len() as u64,
            chunk_ms: chunk_ms.to_vec(),
            e2e_ms: chunk_ms.last().copied().unwrap_or(0.0) + 1.0,
        }
    }

    fn fault(event: FaultKind, node: &str, unix_ms: f64) -> FaultEvent {
        FaultEvent {
            event,
            node: node.into(),
            unix_ms,
        }
    }

    fn audit(id: &str, nodes: &[&str]) -> AuditPath {
        AuditPath {
            request_id: id.into(),
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            failovers: None,
            resumes: Vec::new(),
        }
    }

    #[test]
    fn each_silence_a_move_caused_is_split_into_re_prefill_and_the_rest() {
        let reference = vec![ok(0, "ab", T0, &[10.0, 20.0]), ok(1, "cd", T0, &[10.0])];
        let run = reference.clone();
        // As the gateway writes it: one entry per silence, absent when nothing moved.
        let moved: AuditPath = serde_json::from_str(
            r#"{"request_id":"run-0","nodes":["a","b","c"],"failovers":3,"resumes":[
                {"moves":1,"stall_ms":900,"recovery_ms":850,"reprefill_ms":400},
                {"moves":2,"stall_ms":3000,"recovery_ms":2900,"reprefill_ms":1000}]}"#,
        )
        .unwrap();
        let entries = vec![moved, audit("run-1", &["a"])];
        let r = ChaosReport::build(&reference, &run, Some(&entries), &[]);
        assert_eq!(r.resumes, 2);
        let beyond = r.resume_beyond_reprefill_ms.unwrap();
        assert_eq!((beyond.min, beyond.max), (500.0, 2_000.0));
        let reprefill = r.resume_reprefill_ms.unwrap();
        assert_eq!((reprefill.min, reprefill.max), (400.0, 1_000.0));
        assert_eq!(r.resume_stall_ms.unwrap().max, 3_000.0);
        assert_eq!(r.resume_recovery_ms.unwrap().min, 850.0);
        let waited = r.resume_recovery_beyond_reprefill_ms.unwrap();
        assert_eq!((waited.min, waited.max), (450.0, 1_900.0));
        let text = r.render_text();
        assert!(text.contains("2 silences caused by moves"), "{text}");
        // No audit log, or one without the field: nothing to say.
        let r = ChaosReport::build(&reference, &run, None, &[]);
        assert_eq!((r.resumes, r.resume_stall_ms), (0, None));
        assert!(!r.render_text().contains("per failover"));
    }

    #[test]
    fn a_frozen_node_is_a_fault_like_a_killed_one() {
        let reference = vec![ok(0, "a", T0, &[10.0])];
        let faults = vec![
            fault(FaultKind::Freeze, "a", T0 + 100.0),
            fault(FaultKind::Dead, "a", T0 + 3_200.0),
            fault(FaultKind::Ready, "a", T0 + 5_600.0),
        ];
        let r = ChaosReport::build(&reference, &reference, None, &faults);
        assert_eq!(r.kills.len(), 1);
        assert_eq!(r.kills[0].event, FaultKind::Freeze);
        assert_eq!(r.kills[0].detected_ms, Some(3_100.0));
        assert_eq!(r.kills[0].ready_ms, Some(5_500.0));
        assert!(r.render_text().contains("1 (0 kills, 1 freezes, 0 cuts)"));
        let parsed: FaultEvent =
            serde_json::from_str(r#"{"event":"freeze","node":"a","unix_ms":1}"#).unwrap();
        assert_eq!(parsed.event, FaultKind::Freeze);
    }

    #[test]
    fn a_pipeline_path_counts_the_moves_the_log_records_not_its_stages() {
        let reference = vec![ok(0, "abc", T0, &[10.0]), ok(1, "def", T0, &[10.0])];
        let run = reference.clone();
        let line = |id: &str, stages: &[&str], failovers: Option<u32>| AuditPath {
            failovers,
            ..audit(id, stages)
        };
        let entries = vec![
            // A 3-stage pipeline that never moved.
            line("run-0", &["a", "b", "c"], Some(0)),
            // Moved once, from a 2-stage pipeline to another.
            line("run-1", &["a", "b", "c", "d"], Some(1)),
        ];
        let r = ChaosReport::build(&reference, &run, Some(&entries), &[]);
        assert_eq!((r.failed_over, r.moves), (1, 1));
        // An entry without the count (an older log) falls back to the node count.
        let old = vec![audit("run-0", &["a"]), audit("run-1", &["a", "b", "c"])];
        let r = ChaosReport::build(&reference, &run, Some(&old), &[]);
        assert_eq!((r.failed_over, r.moves), (1, 2));
        // The audit log's own field: absent when zero, read back when present.
        let parsed: AuditPath =
            serde_json::from_str(r#"{"request_id":"x","nodes":["a","b"],"failovers":2}"#).unwrap();
        assert_eq!(parsed.failovers, Some(2));
    }

    #[test]
    fn longest_silence_counts_the_wait_for_the_first_chunk() {
        assert_eq!(
            longest_silence_ms(&ok(0, "x", 0.0, &[50.0, 60.0, 70.0])),
            50.0
        );
        assert_eq!(
            longest_silence_ms(&ok(0, "x", 0.0, &[5.0, 10.0, 900.0])),
            890.0
        );
        let mut silent = ok(0, "", 0.0, &[]);
        silent.e2e_ms = 42.0;
        assert_eq!(longest_silence_ms(&silent), 42.0);
    }

    #[test]
    fn outputs_stalls_and_detection_are_compared_request_by_request() {
        let reference = vec![
            ok(0, "abc", T0, &[10.0, 20.0, 30.0]),
            ok(1, "def", T0, &[10.0, 20.0, 30.0]),
            ok(2, "ghi", T0, &[10.0, 20.0, 30.0]),
            ok(3, "jkl", T0, &[10.0, 20.0, 30.0]),
        ];
        let mut failed = ok(3, "", T0, &[]);
        failed.outcome = RecordOutcome::Failed;
        failed.error = Some("node_lost: gone".into());
        let run = vec![
            // Unmoved and identical.
            ok(0, "abc", T0, &[10.0, 25.0, 40.0]),
            // Moved once, identical, with a 500 ms hole.
            ok(1, "def", T0, &[10.0, 510.0, 520.0]),
            // Moved twice and different: a lost token.
            ok(2, "gh", T0, &[10.0, 20.0, 400.0]),
            failed,
        ];
        let audit = vec![
            audit("run-0", &["a"]),
            audit("run-1", &["a", "b"]),
            audit("run-2", &["a", "b", "c"]),
            audit("run-3", &["c"]),
        ];
        let faults = vec![
            fault(FaultKind::Kill, "a", T0 + 100.0),
            fault(FaultKind::Lost, "a", T0 + 130.0),
            fault(FaultKind::Dead, "a", T0 + 3_100.0),
            fault(FaultKind::Ready, "a", T0 + 5_100.0),
            fault(FaultKind::Kill, "b", T0 + 10_000.0),
            // A death of `a` long after its kill and after nothing else: not b's.
            fault(FaultKind::Dead, "a", T0 + 12_000.0),
        ];
        let r = ChaosReport::build(&reference, &run, Some(&audit), &faults);
        assert_eq!(r.requests, 4);
        assert_eq!(r.completed, 3);
        assert_eq!(r.completed_pct, 75.0);
        assert_eq!(r.identical, 2);
        assert_eq!(r.identical_pct, 50.0);
        assert_eq!(r.different, vec![2]);
        assert_eq!(r.token_count_different, 0);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].index, 3);
        assert_eq!(r.failover_source, "audit");
        assert_eq!(r.failed_over, 2);
        assert_eq!(r.moves, 3);
        let stall = r.stall_ms.unwrap();
        assert_eq!((stall.count, stall.min, stall.max), (2, 380.0, 500.0));
        let extra = r.extra_stall_ms.unwrap();
        assert_eq!((extra.min, extra.max), (370.0, 490.0));
        // Only the unmoved request's gaps are normal ones.
        let normal = r.normal_gap_ms.unwrap();
        assert_eq!((normal.count, normal.max), (2, 15.0));
        assert_eq!(r.kills.len(), 2);
        assert_eq!(r.kills[0].detected_ms, Some(3_000.0));
        assert_eq!(r.kills[0].ready_ms, Some(5_000.0));
        assert_eq!(r.kills[0].noticed_ms, Some(30.0));
        assert_eq!(r.kills[1].detected_ms, None);
        assert_eq!(r.detection_ms.unwrap().count, 1);
        let text = r.render_text();
        assert!(text.contains("completed        3/4 (75.0%)"), "{text}");
        assert!(text.contains("1 x node_lost: gone"), "{text}");
    }

    #[test]
    fn without_an_audit_log_requests_in_flight_at_a_kill_count_as_failed_over() {
        let reference = vec![ok(0, "a", T0, &[10.0]), ok(1, "b", T0 + 500.0, &[10.0])];
        let run = vec![
            ok(0, "a", T0, &[10.0, 300.0]),
            ok(1, "b", T0 + 500.0, &[10.0]),
        ];
        let faults = vec![fault(FaultKind::Kill, "a", T0 + 100.0)];
        let r = ChaosReport::build(&reference, &run, None, &faults);
        assert_eq!(r.failover_source, "in_flight_at_kill");
        assert_eq!(r.failed_over, 1);
        assert_eq!(r.stall_ms.unwrap().max, 290.0);
        assert_eq!(r.identical, 2);
    }

    #[test]
    fn a_cut_pairs_with_its_death_the_gateway_noticing_its_heal_and_readiness() {
        let reference = vec![ok(0, "abc", T0, &[10.0, 20.0, 30.0])];
        // In flight on `a` when it was cut: moved after the lease ran out.
        let run = vec![ok(0, "abc", T0, &[10.0, 2_300.0, 2_310.0])];
        let faults = vec![
            fault(FaultKind::Cut, "a", T0 + 15.0),
            fault(FaultKind::Dead, "a", T0 + 2_015.0),
            fault(FaultKind::Lost, "a", T0 + 2_020.0),
            fault(FaultKind::Heal, "a", T0 + 5_015.0),
            fault(FaultKind::Ready, "a", T0 + 6_015.0),
            // The next cut of `a` owns what follows it.
            fault(FaultKind::Cut, "a", T0 + 20_000.0),
            fault(FaultKind::Heal, "a", T0 + 25_000.0),
        ];
        let audit = vec![audit("run-0", &["a", "b"])];
        let r = ChaosReport::build(&reference, &run, Some(&audit), &faults);
        assert_eq!(r.kills.len(), 2);
        let cut = &r.kills[0];
        assert_eq!(cut.event, FaultKind::Cut);
        assert_eq!(cut.detected_ms, Some(2_000.0));
        assert_eq!(cut.noticed_ms, Some(2_005.0));
        assert_eq!(cut.healed_ms, Some(5_000.0));
        assert_eq!(cut.ready_ms, Some(6_000.0));
        assert_eq!(r.kills[1].detected_ms, None);
        assert_eq!(r.kills[1].healed_ms, Some(5_000.0));
        assert_eq!((r.failed_over, r.identical), (1, 1));
        assert_eq!(r.stall_ms.unwrap().max, 2_290.0);
        assert!(r.slowdowns.is_empty());
        let text = r.render_text();
        assert!(text.contains("2 (0 kills, 0 freezes, 2 cuts)"), "{text}");
        assert!(!text.contains("slowdowns"), "{text}");
        // Without an audit log a cut, like a kill, moves what was in flight.
        let r = ChaosReport::build(&reference, &run, None, &faults);
        assert_eq!(r.failed_over, 1);
        let parsed: FaultEvent =
            serde_json::from_str(r#"{"event":"heal","node":"a","unix_ms":1}"#).unwrap();
        assert_eq!(parsed.event, FaultKind::Heal);
    }

    #[test]
    fn a_slowdown_counts_the_requests_on_the_slowed_node_and_their_extra_latency() {
        let reference = vec![
            ok(0, "a", T0, &[10.0, 20.0, 30.0]),
            ok(1, "b", T0, &[10.0, 20.0, 30.0]),
            ok(2, "c", T0 + 10_000.0, &[10.0, 20.0, 30.0]),
            ok(3, "d", T0, &[10.0, 20.0, 30.0]),
            ok(4, "e", T0, &[10.0, 20.0, 30.0]),
        ];
        let run = vec![
            // On the slowed node `a` during the slowdown: a 290 ms silence, 470 ms longer.
            ok(0, "a", T0, &[10.0, 210.0, 500.0]),
            // On `a` too, and moved away from it.
            ok(1, "b", T0, &[10.0, 20.0, 120.0]),
            // On `a`, but after the slowdown ended.
            ok(2, "c", T0 + 10_000.0, &[10.0, 20.0, 30.0]),
            // During the slowdown, on another node.
            ok(3, "d", T0, &[10.0, 20.0, 30.0]),
            // Moved to the slowed node, away from another fault: not moved by the slowdown.
            ok(4, "e", T0, &[10.0, 20.0, 30.0]),
        ];
        let mut entries = vec![
            audit("run-0", &["a"]),
            audit("run-1", &["a", "b"]),
            audit("run-2", &["a"]),
            audit("run-3", &["b"]),
            audit("run-4", &["c", "a"]),
        ];
        entries[1].failovers = Some(1);
        entries[4].failovers = Some(1);
        let faults = vec![
            fault(FaultKind::Slow, "a", T0 + 5.0),
            fault(FaultKind::Restore, "a", T0 + 5_005.0),
            // A second slowdown of `a` that the run outlives: open-ended, nothing in flight.
            fault(FaultKind::Slow, "a", T0 + 20_000.0),
        ];
        let r = ChaosReport::build(&reference, &run, Some(&entries), &faults);
        assert!(r.kills.is_empty());
        assert_eq!(r.slowdowns.len(), 2);
        let slow = &r.slowdowns[0];
        assert_eq!(slow.restored_ms, Some(5_000.0));
        assert_eq!((slow.detected_ms, slow.noticed_ms), (None, None));
        assert_eq!((slow.requests, slow.moved), (3, 1));
        assert_eq!(r.slowdowns[1].restored_ms, None);
        assert_eq!(r.slowdowns[1].requests, 0);
        assert_eq!((r.slowed_requests, r.slowed_moved), (3, 1));
        let stall = r.slowed_stall_ms.unwrap();
        assert_eq!((stall.count, stall.min, stall.max), (3, 10.0, 290.0));
        assert_eq!(r.slowed_reference_stall_ms.unwrap().max, 10.0);
        let extra = r.slowed_extra_stall_ms.unwrap();
        assert_eq!((extra.min, extra.max), (0.0, 280.0));
        let e2e = r.slowed_extra_e2e_ms.unwrap();
        assert_eq!((e2e.min, e2e.max), (0.0, 470.0));
        let text = r.render_text();
        assert!(
            text.contains("slowdowns        2 (0 declared dead); 3 requests in flight on a slowed node, 1 moved away"),
            "{text}"
        );
        // Without an audit log, every request in flight during a slowdown counts.
        let r = ChaosReport::build(&reference, &run, None, &faults);
        assert_eq!((r.slowed_requests, r.slowed_moved), (4, 0));
        // A slowdown that got the node declared dead says so.
        let mut dead = faults.clone();
        dead.push(fault(FaultKind::Dead, "a", T0 + 2_005.0));
        let r = ChaosReport::build(&reference, &run, Some(&entries), &dead);
        assert_eq!(r.slowdowns[0].detected_ms, Some(2_000.0));
        assert!(r.render_text().contains("(1 declared dead)"));
    }

    #[test]
    fn a_later_kill_of_the_same_node_bounds_the_pairing() {
        let faults = vec![
            fault(FaultKind::Kill, "a", T0),
            fault(FaultKind::Kill, "a", T0 + 1_000.0),
            fault(FaultKind::Dead, "a", T0 + 2_000.0),
        ];
        let run = vec![ok(0, "a", T0, &[1.0])];
        let r = ChaosReport::build(&run, &run, None, &faults);
        assert_eq!(r.kills[0].detected_ms, None);
        assert_eq!(r.kills[1].detected_ms, Some(1_000.0));
    }
}
