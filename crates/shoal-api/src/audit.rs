//! The audit log: one JSON line per generation request, chained by hashes so that editing,
//! removing, reordering or truncating entries is detected by [`verify`].
//!
//! Entry `n` carries `seq = n` (from 1), `prev` = the `hash` of entry `n - 1` (64 zeros for the
//! first) and `hash` = SHA-256 over the entry's canonical form: the compact JSON of every field
//! except `hash`, in declaration order of [`AuditEntry`]. Prompts and responses are recorded as
//! SHA-256 digests (a text prompt's UTF-8 bytes; a chat's compact JSON array of
//! `{"role","content"}`; the concatenated completion text), and as text only when
//! `include_text` is set.
//!
//! Writing: one writer thread owns the file and is fed by a bounded channel. Each generation
//! request reserves a slot in that channel when it arrives and sends its entry into the slot when
//! it ends, so recording an ending (including a client that vanished) never waits. When every
//! slot is taken (the disk stalls), a new request waits up to `max_wait` for one and is refused
//! with 503 `audit_unavailable` after that, or at once if the writer stopped on a write error:
//! no request is served without its audit entry (fail closed). A restarted writer resumes the
//! chain from the file's last line, and refuses to start when that line is damaged.
//!
//! Limits: a hash chain shows changes inside the file, not the loss of whole entries at its end;
//! keep the `head` hash [`verify`] reports somewhere else to detect that.

use std::fs::File;
use std::io::{BufRead, BufWriter, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shoal_types::ErrorClass;
use tokio::sync::{mpsc, oneshot};

use crate::backend::Prompt;
use crate::error::{RequestError, reason};
use crate::keys::rfc3339;
use crate::metrics::{AuditFailure, Metrics};

/// `prev` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where and how the gateway writes its audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The JSON-lines file, appended to (created with mode 0600 if missing).
    pub path: PathBuf,
    /// Record prompt and response text, not only their digests.
    pub include_text: bool,
    /// Entries that may wait for the writer; each request holds one slot from arrival to end,
    /// so this must exceed the gateway's `max_in_flight`.
    pub queue_capacity: usize,
    /// How long a new request waits for a free slot before it is refused with 503.
    pub max_wait: Duration,
}

impl AuditConfig {
    /// Defaults for `path`: digests only, 4096 slots, 5 s wait.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            include_text: false,
            queue_capacity: 4096,
            max_wait: Duration::from_secs(5),
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When the request ended, RFC 3339 UTC.
    pub time: String,
    /// The request's id (`x-request-id`).
    pub request_id: String,
    /// The API key that authenticated the request; null on an open gateway or a refusal before
    /// authentication succeeded.
    pub key_id: Option<String>,
    /// The model asked for; null if the request was refused before its body was read.
    pub model: Option<String>,
    /// The nodes that served it, in pipeline order, as the backend reported them (after a
    /// failover, those of every path in turn).
    pub nodes: Vec<String>,
    /// How many times the generation moved to another node in its middle (absent when none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failovers: u32,
    /// What each failover cost the client, in order (absent when none): one entry per token
    /// that came after one or more moves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumes: Vec<AuditResume>,
    /// SHA-256 of the prompt; null if the request was refused before it was parsed.
    pub prompt_sha256: Option<String>,
    /// SHA-256 of the completion text sent; null if generation never started.
    pub response_sha256: Option<String>,
    /// The prompt (only with `include_text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The completion text (only with `include_text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// `ok` or the error class.
    pub outcome: String,
    /// The stable error reason (`invalid_api_key`, `rate_limit_exceeded`, …); null when ok.
    pub reason: Option<String>,
    /// Prompt tokens (0 if generation never started).
    pub prompt_tokens: u32,
    /// Completion tokens generated.
    pub completion_tokens: u32,
    /// From the request's arrival to its end, in milliseconds.
    pub latency_ms: u64,
    /// `hash` of the previous entry.
    pub prev: String,
    /// SHA-256 over this entry without `hash` (see the module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// The silence a client saw because its generation moved to another node (see
/// [`crate::ResumeStall`]), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditResume {
    /// Moves before the next token came.
    pub moves: u32,
    /// From the client's last token (or the request's start) to the next one.
    pub stall_ms: u64,
    /// From the loss being noticed to the next token.
    pub recovery_ms: u64,
    /// The new node's prefill of the generation, up to the next token.
    pub reprefill_ms: u64,
}

impl From<crate::ResumeStall> for AuditResume {
    fn from(r: crate::ResumeStall) -> Self {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            moves: r.moves,
            stall_ms: ms(r.stall),
            recovery_ms: ms(r.recovery),
            reprefill_ms: ms(r.reprefill),
        }
    }
}

// serde's `skip_serializing_if` passes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl AuditEntry {
    /// SHA-256 (lowercase hex) of the canonical form: the entry without `hash`, compact JSON.
    pub fn compute_hash(&self) -> String {
        let body = AuditEntry {
            hash: None,
            ..self.clone()
        };
        // Serialising a plain struct of strings and integers cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened or read.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's last line is damaged, so the chain cannot be continued.
    #[error("audit log {}: line {line}: {problem}; check it with `shoal audit verify` and move it aside", path.display())]
    Damaged {
        /// Which file.
        path: PathBuf,
        /// The damaged line, from 1.
        line: u64,
        /// What is wrong.
        problem: VerifyProblem,
    },
    /// Another process is writing this log.
    #[error("audit log {} is in use by another process", path.display())]
    InUse {
        /// Which file.
        path: PathBuf,
    },
    /// The writer thread could not be started.
    #[error("starting the audit writer: {0}")]
    Spawn(#[source] std::io::Error),
    /// `queue_capacity` is 0.
    #[error("the audit queue capacity must be at least 1")]
    ZeroCapacity,
}

/// What is wrong with a line of an audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyProblem {
    /// The last line has no newline: the file was cut short.
    #[error("truncated: the last line is incomplete")]
    Truncated,
    /// The line is not a JSON audit entry.
    #[error("not a valid audit entry (bad JSON or fields): {0}")]
    Malformed(String),
    /// The entry's hash does not match its contents.
    #[error("edited: the entry's hash does not match its contents")]
    Edited,
    /// The sequence number is not the previous one plus one.
    #[error(
        "out of sequence: seq {found} where {expected} was expected (entries were removed, inserted or reordered)"
    )]
    OutOfSequence {
        /// The seq the position calls for.
        expected: u64,
        /// The seq written.
        found: u64,
    },
    /// `prev` is not the previous entry's hash.
    #[error(
        "broken chain: prev does not match the previous entry's hash (an entry was replaced or the file spliced)"
    )]
    BrokenChain,
}

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries in the file.
    pub entries: u64,
    /// The last entry's hash (the genesis hash for an empty log).
    pub head: String,
}

/// The first bad line of a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct VerifyFailure {
    /// The line, from 1.
    pub line: u64,
    /// What is wrong with it.
    pub problem: VerifyProblem,
}

/// Checks every line of a log: JSON shape, hash, sequence and chain. Reading errors count as a
/// malformed line.
pub fn verify(mut reader: impl BufRead) -> Result<VerifyReport, VerifyFailure> {
    let mut expected_seq = 1u64;
    let mut prev = GENESIS_HASH.to_owned();
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let fail = |line, problem| VerifyFailure { line, problem };
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| fail(line_no + 1, VerifyProblem::Malformed(e.to_string())))?;
        if n == 0 {
            return Ok(VerifyReport {
                entries: expected_seq - 1,
                head: prev,
            });
        }
        line_no += 1;
        let entry = check_line(&buf).map_err(|p| fail(line_no, p))?;
        if entry.seq != expected_seq {
            return Err(fail(
                line_no,
                VerifyProblem::OutOfSequence {
                    expected: expected_seq,
                    found: entry.seq,
                },
            ));
        }
        if entry.prev != prev {
            return Err(fail(line_no, VerifyProblem::BrokenChain));
        }
        prev = entry.hash.unwrap_or_default();
        expected_seq += 1;
    }
}

/// [`verify`] on a file.
pub fn verify_file(path: &Path) -> Result<Result<VerifyReport, VerifyFailure>, std::io::Error> {
    let file = File::open(path)?;
    Ok(verify(std::io::BufReader::new(file)))
}

/// Parses one line (with its newline) and checks its own hash.
fn check_line(line: &[u8]) -> Result<AuditEntry, VerifyProblem> {
    let Some(body) = line.strip_suffix(b"\n") else {
        return Err(VerifyProblem::Truncated);
    };
    let entry: AuditEntry =
        serde_json::from_slice(body).map_err(|e| VerifyProblem::Malformed(e.to_string()))?;
    let Some(hash) = &entry.hash else {
        return Err(VerifyProblem::Malformed("missing field `hash`".into()));
    };
    if *hash != entry.compute_hash() {
        return Err(VerifyProblem::Edited);
    }
    Ok(entry)
}

/// SHA-256 (hex) of a prompt and, with `include_text`, the text recorded for it.
pub(crate) fn prompt_digest(prompt: &Prompt) -> (String, String) {
    let text = match prompt {
        Prompt::Text(text) => text.clone(),
        Prompt::Chat(messages) => {
            let messages: Vec<_> = messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
                .collect();
            serde_json::Value::Array(messages).to_string()
        }
    };
    (hex::encode(Sha256::digest(text.as_bytes())), text)
}

/// What a request reports when it ends; the writer adds `seq`, `prev` and `hash`.
#[derive(Debug)]
pub(crate) struct AuditRecord {
    pub time: SystemTime,
    pub request_id: String,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub nodes: Vec<String>,
    pub failovers: u32,
    pub resumes: Vec<AuditResume>,
    pub prompt_sha256: Option<String>,
    pub response_sha256: Option<String>,
    pub prompt: Option<String>,
    pub response: Option<String>,
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u64,
}

#[derive(Debug)]
enum Command {
    Entry(Box<AuditRecord>),
    /// Write everything before this, flush to disk, answer whether it all went well.
    Flush(oneshot::Sender<bool>),
    /// Like `Flush`, then close the file (releasing its lock) and stop; answers once closed.
    Close(oneshot::Sender<bool>),
}

/// A reserved place in the writer's queue for one request's entry.
#[derive(Debug)]
pub(crate) struct AuditSlot(mpsc::OwnedPermit<Command>);

impl AuditSlot {
    /// Hands the entry to the writer; never waits.
    pub(crate) fn send(self, record: AuditRecord) {
        // If the writer has stopped the entry is lost; the writer counted and logged why.
        let _ = self.0.send(Command::Entry(Box::new(record)));
    }
}

/// The gateway's handle on the audit writer. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AuditLog {
    tx: mpsc::Sender<Command>,
    include_text: bool,
    max_wait: Duration,
    metrics: Arc<Metrics>,
}

impl AuditLog {
    /// Opens (or creates) the log, checks its last line and starts the writer thread.
    pub(crate) fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> Result<Self, AuditError> {
        if config.queue_capacity == 0 {
            return Err(AuditError::ZeroCapacity);
        }
        let (file, next_seq, prev) = resume(&config.path)?;
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let writer = Writer {
            path: config.path.clone(),
            out: BufWriter::new(file),
            next_seq,
            prev,
            metrics: metrics.clone(),
        };
        // A thread rather than a task: file writes block. It ends when every sender is gone
        // (the gateway's state dropped); `flush` is how shutdown makes sure it wrote everything.
        std::thread::Builder::new()
            .name("shoal-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(AuditError::Spawn)?;
        tracing::info!(file = %config.path.display(), next_seq, "audit log open");
        Ok(Self {
            tx,
            include_text: config.include_text,
            max_wait: config.max_wait,
            metrics,
        })
    }

    pub(crate) fn include_text(&self) -> bool {
        self.include_text
    }

    /// A slot for one request's entry; waits up to `max_wait` when the queue is full.
    pub(crate) async fn reserve(&self) -> Result<AuditSlot, RequestError> {
        let failure = match self.tx.clone().try_reserve_owned() {
            Ok(permit) => return Ok(AuditSlot(permit)),
            Err(mpsc::error::TrySendError::Closed(_)) => AuditFailure::WriterStopped,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.audit_wait();
                match tokio::time::timeout(self.max_wait, self.tx.clone().reserve_owned()).await {
                    Ok(Ok(permit)) => return Ok(AuditSlot(permit)),
                    Ok(Err(_)) => AuditFailure::WriterStopped,
                    Err(_) => AuditFailure::QueueTimeout,
                }
            }
        };
        self.metrics.audit_failure(failure);
        tracing::error!(
            failure = failure.as_str(),
            "refusing a request: the audit log cannot take its entry"
        );
        Err(RequestError::new(
            ErrorClass::Unavailable,
            reason::AUDIT_UNAVAILABLE,
            "The server cannot record requests right now; retry later.",
        ))
    }

    /// Waits until every entry sent so far is written and flushed; false if the writer failed.
    pub(crate) async fn flush(&self) -> bool {
        self.command(Command::Flush).await
    }

    /// Writes and flushes everything sent so far, then closes the file and stops the writer;
    /// later requests are refused. False if the writer had already stopped.
    pub(crate) async fn close(&self) -> bool {
        self.command(Command::Close).await
    }

    async fn command(&self, command: fn(oneshot::Sender<bool>) -> Command) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(command(done_tx)).await.is_err() {
            return false;
        }
        done_rx.await.unwrap_or(false)
    }
}

/// Opens `path` for appending and finds where the chain continues.
fn resume(path: &Path) -> Result<(File, u64, String), AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    // Two writers would fork the chain; the lock lives as long as the writer's handle.
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => AuditError::InUse {
            path: path.to_owned(),
        },
        std::fs::TryLockError::Error(source) => io(source),
    })?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok((file, 1, GENESIS_HASH.to_owned()));
    }
    let line = last_line(&mut file, len).map_err(io)?;
    match check_line(&line) {
        Ok(entry) => {
            let hash = entry.hash.unwrap_or_default();
            Ok((file, entry.seq + 1, hash))
        }
        Err(problem) => Err(AuditError::Damaged {
            path: path.to_owned(),
            line: count_lines(&mut file).map_err(io)?,
            problem,
        }),
    }
}

/// The file's last line including its newline (without one if the file does not end in one).
fn last_line(file: &mut File, len: u64) -> std::io::Result<Vec<u8>> {
    const CHUNK: u64 = 64 * 1024;
    let mut tail = Vec::new();
    let mut pos = len;
    // The final newline ends the last line; the one before it starts it.
    let mut skip_final_newline = true;
    while pos > 0 {
        let step = pos.min(CHUNK);
        pos -= step;
        let mut chunk = vec![0u8; usize::try_from(step).unwrap_or(0)];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk)?;
        let search_end = if skip_final_newline && chunk.last() == Some(&b'\n') {
            chunk.len() - 1
        } else {
            chunk.len()
        };
        skip_final_newline = false;
        let start = chunk[..search_end].iter().rposition(|&b| b == b'\n');
        if let Some(i) = start {
            chunk.drain(..=i);
        }
        chunk.extend_from_slice(&tail);
        tail = chunk;
        if start.is_some() {
            break;
        }
    }
    Ok(tail)
}

/// Lines in the file (a final line without newline counts), for error messages.
fn count_lines(file: &mut File) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::new(&mut *file);
    let mut lines = 0u64;
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf)? > 0 {
        lines += 1;
        buf.clear();
    }
    Ok(lines)
}

struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    next_seq: u64,
    prev: String,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut waiting = Vec::new();
        let mut closing = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut result = self.handle(first, &mut waiting, &mut closing);
            // Write whatever else is queued before paying for a flush.
            while result.is_ok() && closing.is_empty() {
                match rx.try_recv() {
                    Ok(command) => result = self.handle(command, &mut waiting, &mut closing),
                    Err(_) => break,
                }
            }
            let result = result.and_then(|()| self.out.flush());
            let result = if waiting.is_empty() && closing.is_empty() {
                result
            } else {
                result.and_then(|()| self.out.get_ref().sync_data())
            };
            let ok = result.is_ok();
            for done in waiting.drain(..) {
                let _ = done.send(ok);
            }
            if let Err(e) = result {
                self.metrics.audit_failure(AuditFailure::WriteError);
                tracing::error!(file = %self.path.display(), error = %e, "writing the audit log failed; the gateway refuses requests from now on");
                break;
            }
            if !closing.is_empty() {
                break;
            }
        }
        // Closing the file releases its lock before anyone hears the log is closed.
        drop(rx);
        drop(self);
        for done in closing {
            let _ = done.send(true);
        }
    }

    fn handle(
        &mut self,
        command: Command,
        waiting: &mut Vec<oneshot::Sender<bool>>,
        closing: &mut Vec<oneshot::Sender<bool>>,
    ) -> std::io::Result<()> {
        match command {
            Command::Flush(done) => {
                waiting.push(done);
                Ok(())
            }
            Command::Close(done) => {
                closing.push(done);
                Ok(())
            }
            Command::Entry(record) => {
                let mut entry = AuditEntry {
                    seq: self.next_seq,
                    time: rfc3339(record.time),
                    request_id: record.request_id,
                    key_id: record.key_id,
                    model: record.model,
                    nodes: record.nodes,
                    failovers: record.failovers,
                    resumes: record.resumes,
                    prompt_sha256: record.prompt_sha256,
                    response_sha256: record.response_sha256,
                    prompt: record.prompt,
                    response: record.response,
                    outcome: record.outcome.to_owned(),
                    reason: record.reason,
                    prompt_tokens: record.prompt_tokens,
                    completion_tokens: record.completion_tokens,
                    latency_ms: record.latency_ms,
                    prev: self.prev.clone(),
                    hash: None,
                };
                let hash = entry.compute_hash();
                entry.hash = Some(hash.clone());
                let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
                line.push(b'\n');
                self.out.write_all(&line)?;
                self.next_seq += 1;
                self.prev = hash;
                self.metrics.audit_entry();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
