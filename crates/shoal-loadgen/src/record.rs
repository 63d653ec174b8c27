//! Recordings of load runs (`shoal bench --record FILE`): one JSON line per measured request
//! with what it asked (prompt, seed, request id), how it ended and everything it received (the
//! whole output text and the arrival time of each content chunk), so two runs of the same
//! requests can be compared request by request (`shoal chaos-report`).
//!
//! A recording keeps every request's output in memory until the run ends: its size is the
//! run's request count times its longest reply.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bench::Measured;
use crate::client::RequestFailure;

/// How a recorded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordOutcome {
    /// The reply completed.
    Ok,
    /// The request failed (see `error`).
    Failed,
    /// The run ended while it was in flight.
    Cancelled,
}

/// One request of a recorded run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The request's position in the run (its ticket): the same index in two runs is the same
    /// request.
    pub index: u64,
    /// The `x-request-id` it was sent with.
    pub request_id: Option<String>,
    /// Which prompt it used (index into the run's prompts).
    pub prompt: usize,
    /// Its sampling seed.
    pub seed: Option<u64>,
    /// When it was sent, in milliseconds since the Unix epoch (to line it up with fault
    /// events).
    pub started_unix_ms: f64,
    /// How it ended.
    pub outcome: RecordOutcome,
    /// The failure, for failed requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The output text received (whole replies: empty; only streams are recorded in full).
    pub text: String,
    /// The reply's finish reason.
    pub finish_reason: Option<String>,
    /// Output tokens (from `usage`, else content chunks).
    pub output_tokens: u64,
    /// Arrival of each content chunk, in milliseconds after the request was sent.
    pub chunk_ms: Vec<f64>,
    /// Sent → reply complete (or failed), in milliseconds.
    pub e2e_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Milliseconds since the Unix epoch of `at`.
pub(crate) fn unix_ms(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map_or(0.0, ms)
}

/// What identifies a request in a recording, known before it is sent.
#[derive(Debug, Clone)]
pub(crate) struct RequestTag {
    pub index: u64,
    pub request_id: Option<String>,
    pub prompt: usize,
    pub seed: Option<u64>,
    pub started: SystemTime,
}

impl RequestTag {
    fn record(self, outcome: RecordOutcome) -> RequestRecord {
        RequestRecord {
            index: self.index,
            request_id: self.request_id,
            prompt: self.prompt,
            seed: self.seed,
            started_unix_ms: unix_ms(self.started),
            outcome,
            error: None,
            text: String::new(),
            finish_reason: None,
            output_tokens: 0,
            chunk_ms: Vec::new(),
            e2e_ms: 0.0,
        }
    }

    /// The record of a completed request.
    pub(crate) fn ok(self, m: &Measured) -> RequestRecord {
        let mut chunk_ms = Vec::with_capacity(m.gaps.len() + 1);
        if let Some(first) = m.ttft {
            let mut at = first;
            chunk_ms.push(ms(at));
            for gap in &m.gaps {
                at += *gap;
                chunk_ms.push(ms(at));
            }
        }
        RequestRecord {
            text: m.text.clone(),
            finish_reason: m.finish_reason.clone(),
            output_tokens: m.output_tokens,
            chunk_ms,
            e2e_ms: ms(m.e2e),
            ..self.record(RecordOutcome::Ok)
        }
    }

    /// The record of a failed request.
    pub(crate) fn failed(self, failure: &RequestFailure, elapsed: Duration) -> RequestRecord {
        RequestRecord {
            error: Some(format!("{}: {}", failure.code(), failure.message())),
            e2e_ms: ms(elapsed),
            ..self.record(RecordOutcome::Failed)
        }
    }

    /// The record of a request cut off by the end of the run.
    pub(crate) fn cancelled(self, elapsed: Duration) -> RequestRecord {
        RequestRecord {
            e2e_ms: ms(elapsed),
            ..self.record(RecordOutcome::Cancelled)
        }
    }
}

/// Why a recording could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a JSON object of the expected shape.
    #[error("{path} line {line}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Writes `records` to `path` as JSON lines, in index order.
pub async fn write_recording(path: &Path, records: &[RequestRecord]) -> Result<(), RecordingError> {
    let mut sorted: Vec<&RequestRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.index);
    let mut text = String::new();
    for r in sorted {
        // A record is plain data: serialising it cannot fail.
        text.push_str(&serde_json::to_string(r).unwrap_or_default());
        text.push('\n');
    }
    tokio::fs::write(path, text)
        .await
        .map_err(|source| RecordingError::Io {
            path: path.display().to_string(),
            source,
        })
}

/// Reads a JSON-lines file of `T` (blank lines skipped).
pub(crate) fn read_json_lines<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Vec<T>, RecordingError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecordingError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_json_lines(&text).map_err(|(line, source)| RecordingError::Parse {
        path: path.display().to_string(),
        line,
        source,
    })
}

/// Parses JSON lines; on error, the 1-based line number and why.
pub(crate) fn parse_json_lines<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<Vec<T>, (usize, serde_json::Error)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| (i + 1, e)))
        .collect()
}

/// Reads a recording written by [`write_recording`].
pub fn read_recording(path: &Path) -> Result<Vec<RequestRecord>, RecordingError> {
    read_json_lines(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tag(index: u64) -> RequestTag {
        RequestTag {
            index,
            request_id: Some(format!("r-{index}")),
            prompt: 1,
            seed: Some(7 + index),
            started: UNIX_EPOCH + Duration::from_millis(5_000),
        }
    }

    fn measured() -> Measured {
        Measured {
            ttft: Some(Duration::from_millis(100)),
            gaps: vec![Duration::from_millis(10), Duration::from_millis(30)],
            e2e: Duration::from_millis(150),
            output_tokens: 3,
            prompt_tokens: Some(4),
            usage_reported: true,
            finish_reason: Some("stop".into()),
            bytes_sent: 1,
            bytes_received: 2,
            text: "one two three".into(),
        }
    }

    #[test]
    fn a_completed_request_records_each_chunk_arrival() {
        let r = tag(3).ok(&measured());
        assert_eq!(r.outcome, RecordOutcome::Ok);
        assert_eq!(r.chunk_ms, vec![100.0, 110.0, 140.0]);
        assert_eq!(r.started_unix_ms, 5_000.0);
        assert_eq!(r.text, "one two three");
        assert_eq!((r.index, r.seed, r.prompt), (3, Some(10), 1));
        assert_eq!(r.e2e_ms, 150.0);
    }

    #[tokio::test]
    async fn recordings_round_trip_in_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.jsonl");
        let failed = tag(0).failed(
            &RequestFailure::Timeout(Duration::from_secs(1)),
            Duration::from_secs(1),
        );
        let cancelled = tag(2).cancelled(Duration::from_millis(3));
        let records = vec![tag(1).ok(&measured()), cancelled, failed];
        write_recording(&path, &records).await.unwrap();
        let back = read_recording(&path).unwrap();
        assert_eq!(back.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(back[0].outcome, RecordOutcome::Failed);
        assert!(back[0].error.as_deref().unwrap().starts_with("timeout"));
        assert_eq!(back[1], records[0]);
        assert_eq!(back[2].outcome, RecordOutcome::Cancelled);
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let text = "{\"request_id\": \"a\", \"nodes\": []}\n\nnot json\n";
        let err = parse_json_lines::<crate::chaos::AuditPath>(text).unwrap_err();
        assert_eq!(err.0, 3);
    }
}
