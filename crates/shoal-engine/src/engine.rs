//! The engine actor: owns the runtime and every sequence's state.

use shoal_model::{
    FinishReason, GenerateOptions, KvSnapshot, ModelError, Sampler, SeqStep, ShardInput,
    ShardOutput, ShardRuntime, StopMatcher, StopScan, StreamDecoder, Tokenizer,
};
use shoal_types::{ErrorClass, RequestId, SeqId};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Free event slots a sequence's channel must have for a `Progress` event to be sent: the
/// token and final events of a step must always find room.
const PROGRESS_ROOM: usize = 4;

/// Limits of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_active: usize,
    /// Requests waiting for a slot at most; more are refused.
    pub max_waiting: usize,
    /// Rows (tokens) per forward step at most: decode rows plus prefill chunks. Small enough
    /// that a long prompt does not hold up the other sequences' next tokens for long; on CPUs
    /// a 128-row chunk loses nothing per token (one core prefills SmolLM2 at 152 tokens/s in
    /// 128-token chunks, 119 in 512-token ones).
    pub step_tokens: usize,
    /// Events buffered per request before its sequence is paused.
    pub event_buffer: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_active: 16,
            max_waiting: 64,
            step_tokens: 128,
            event_buffer: 64,
        }
    }
}

/// A generation to run.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// For logs and tracing.
    pub id: RequestId,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Limits, sampling and stop strings.
    pub options: GenerateOptions,
    /// Tokens this generation already produced elsewhere (a generation resumed after a node
    /// failed): they are prefilled after the prompt and replayed silently through the
    /// detokenizer and stop matcher, count towards `max_tokens` and usage, and the next draw
    /// uses sampling step `resume.len()`. The events then continue exactly where the first
    /// run's stopped: the same tokens, the same text, no repeats.
    pub resume: Vec<u32>,
    /// For a pipeline head: where the sequence's later stages are, opaque to the engine and
    /// handed to its [`Downstream`] when the sequence opens. `None` on a whole model.
    pub route: Option<RouteTag>,
    /// (Whole model.) A checkpoint of this generation's KV cache made elsewhere: the part of
    /// it that holds exactly the leading tokens of prompt + resume is imported instead of
    /// prefilled. At least the last token is always computed (its logits give the next draw).
    /// One that does not fit is ignored and everything is prefilled.
    pub restore: Option<KvSnapshot>,
    /// (Whole model.) Checkpoint this sequence's KV cache as it grows.
    pub checkpoint: Option<CheckpointSink>,
}

/// Where a sequence's KV cache goes as it grows: after each step that leaves at least `every`
/// positions not yet checkpointed, the engine copies them out (a memory copy of their keys and
/// values: 23,040 bytes a position for SmolLM2-135M) and offers them to `tx`. Each snapshot
/// continues the previous one; the first starts at position 0 (also after a restore: the
/// holder of the next checkpoint may be another node). When `tx` is full the copy is not made,
/// and the next checkpoint covers more; the channel closes when the sequence ends.
#[derive(Debug, Clone)]
pub struct CheckpointSink {
    /// Positions gathered before a checkpoint is sent, at least 1.
    pub every: u32,
    /// Receives the snapshots.
    pub tx: mpsc::Sender<KvSnapshot>,
    /// The receiver increments it to have the next snapshot start again at position 0 (the
    /// checkpoints now go to a new holder).
    pub restarts: Arc<AtomicU32>,
}

impl CheckpointSink {
    /// A sink checkpointing every `every` positions into `tx`.
    pub fn new(every: u32, tx: mpsc::Sender<KvSnapshot>) -> Self {
        Self {
            every,
            tx,
            restarts: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Offers the positions of `seq` cached since `cursor` (their tokens are `history`'s at
    /// the same positions) once there are `every` of them and the sink has room; returns the
    /// positions sent. `Err` when this sink takes no more checkpoints of the sequence: it
    /// was closed (`None`), or the cache could not be copied (why).
    pub fn offer(
        &self,
        rt: &dyn ShardRuntime,
        seq: SeqId,
        cursor: &mut CheckpointCursor,
        history: &[u32],
    ) -> Result<u32, Option<String>> {
        if self.tx.capacity() == 0 {
            return Ok(0);
        }
        let Some(cached) = rt.seq_len(seq) else {
            return Ok(0);
        };
        let restarts = self.restarts.load(Ordering::Acquire);
        if restarts != cursor.restarts || cursor.checkpointed > cached {
            // A new holder, or a cache rewound below what was sent: start again from 0.
            cursor.restarts = restarts;
            cursor.checkpointed = 0;
        }
        if cached < cursor.checkpointed.saturating_add(self.every.max(1)) {
            return Ok(0);
        }
        let Some(tokens) = history.get(cursor.checkpointed as usize..cached as usize) else {
            return Ok(0);
        };
        let snap = rt
            .export_kv(seq, cursor.checkpointed, tokens)
            .map_err(|e| Some(e.to_string()))?;
        match self.tx.try_send(snap) {
            Ok(()) => {
                let sent = cached - cursor.checkpointed;
                cursor.checkpointed = cached;
                Ok(sent)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(0),
            // Nobody takes checkpoints of this sequence any more.
            Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
        }
    }
}

/// How far a sequence's checkpoints into a [`CheckpointSink`] got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointCursor {
    /// Positions of the KV cache already sent.
    checkpointed: u32,
    /// The sink's `restarts` when `checkpointed` was last set.
    restarts: u32,
}

/// A value the engine carries for its [`Downstream`] without looking at it.
#[derive(Clone)]
pub struct RouteTag(pub Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for RouteTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteTag(..)")
    }
}

/// One sequence's rows in a step a pipeline head sends down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSlice {
    /// The sequence.
    pub seq: SeqId,
    /// Position of its first row.
    pub pos: u32,
    /// Rows.
    pub n_tokens: u32,
    /// Whether the last stage must sample after this slice's last row.
    pub sample: bool,
    /// The token ids of the rows (the last stage keeps them as sampling history).
    pub tokens: Vec<u32>,
}

/// One step of a pipeline head: the hidden states of every row, in slice order.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadStep {
    /// The sequences in row order.
    pub slices: Vec<HeadSlice>,
    /// Σ n_tokens rows of the hidden size.
    pub hidden: Vec<f32>,
}

/// Where a pipeline head sends its work: the later stages of the model, reached through the
/// network. Called from the engine's compute thread; must not block for long.
pub trait Downstream: Send + 'static {
    /// A sequence starts: `req` carries its sampling, its resume tokens and its route.
    /// `restorable` is the leading part of its tokens whose KV entries the head can import
    /// from a checkpoint (empty: none); the later stages import what their own checkpoints
    /// hold of it, and the head starts its prefill after the part every stage holds. May
    /// wait that long (a bounded fetch) when the route restores checkpoints.
    fn open(
        &mut self,
        seq: SeqId,
        req: &EngineRequest,
        restorable: &[u32],
    ) -> Result<Opened, EngineError>;
    /// Sends one step down.
    fn step(&mut self, step: HeadStep) -> Result<(), EngineError>;
    /// A sequence ended: its caches can be freed on every stage.
    fn release(&mut self, seq: SeqId);
}

/// A sequence opened on a pipeline's later stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Opened {
    /// How many stages follow the head on its route.
    pub depth: usize,
    /// Leading positions every later stage imported from a checkpoint (at most the
    /// `restorable` tokens given).
    pub restored: u32,
}

/// What comes back from a pipeline's later stages.
#[derive(Debug, Clone, PartialEq)]
pub enum TailEvent {
    /// The last stage sampled `token` for `seq`.
    Token {
        /// The sequence.
        seq: SeqId,
        /// The token.
        token: u32,
    },
    /// A sequence (or, with `None`, every sequence) failed downstream.
    Failed {
        /// The sequence, or `None` for all.
        seq: Option<SeqId>,
        /// Why.
        error: EngineError,
    },
}

/// Gives a [`Downstream`] the way back into its engine.
#[derive(Debug, Clone)]
pub struct TailSender(std_mpsc::Sender<Input>);

impl TailSender {
    /// Delivers an event; false once the engine has stopped.
    pub fn send(&self, ev: TailEvent) -> bool {
        self.0.send(Input::Tail(ev)).is_ok()
    }
}

/// What the compute thread receives.
enum Input {
    Submit(Box<Submission>),
    Tail(TailEvent),
    /// The engine is being dropped (the pipeline's senders keep the channel open).
    Shutdown,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Submit(s) => s.fmt(f),
            Input::Tail(t) => t.fmt(f),
            Input::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
}

/// What a request's receiver sees, in order: `Started`, any number of `Token`, then `Finished`
/// or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Admitted; the prompt is being processed.
    Started {
        /// Prompt tokens.
        prompt_tokens: u32,
        /// KV positions imported from a checkpoint instead of prefilled.
        restored: u32,
    },
    /// A generated token and the text it completes (may be empty while a character or a
    /// possible stop string is incomplete).
    Token {
        /// The token id.
        id: u32,
        /// Text that became final with this token.
        text: String,
    },
    /// Part of the prompt is being computed: sent as each prefill chunk is scheduled, before
    /// it runs, so a caller learns that the request got the node's compute (rather than
    /// waiting in its queue) and how far its KV cache will reach, restored positions included.
    Progress {
        /// KV positions the sequence holds once this chunk is computed.
        positions: u32,
    },
    /// The generation ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Text released at the end (held-back bytes), possibly empty.
        tail: String,
    },
    /// The generation failed.
    Failed(EngineError),
}

/// Why the engine refused or failed a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The waiting queue is full.
    #[error("the engine is busy ({waiting} requests waiting)")]
    Busy {
        /// Requests waiting.
        waiting: usize,
    },
    /// The engine has stopped.
    #[error("the engine has shut down")]
    ShutDown,
    /// The request is invalid for this model.
    #[error("{0}")]
    Invalid(String),
    /// The model failed while running the request.
    #[error("model error: {0}")]
    Model(String),
    /// A pipeline stage this sequence needs could not be reached or was lost.
    #[error("{0}")]
    Unavailable(String),
}

impl EngineError {
    /// The wire class.
    pub fn class(&self) -> ErrorClass {
        match self {
            EngineError::Busy { .. } => ErrorClass::CapacityExhausted,
            EngineError::ShutDown => ErrorClass::Unavailable,
            EngineError::Invalid(_) => ErrorClass::InvalidRequest,
            EngineError::Model(_) => ErrorClass::Internal,
            EngineError::Unavailable(_) => ErrorClass::Unavailable,
        }
    }

    fn from_model(e: &ModelError) -> Self {
        match e.class() {
            ErrorClass::InvalidRequest => EngineError::Invalid(e.to_string()),
            _ => EngineError::Model(e.to_string()),
        }
    }
}

/// Live counters, readable from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting for a slot.
    pub waiting: AtomicUsize,
    /// Sequences in the running batch.
    pub active: AtomicUsize,
    /// KV cache bytes held.
    pub kv_bytes: AtomicUsize,
    /// Tokens generated since start.
    pub tokens_generated: AtomicU64,
    /// Forward steps run since start.
    pub steps: AtomicU64,
    /// Rows processed by those steps (sum of batch sizes).
    pub step_rows: AtomicU64,
    /// Requests finished since start (any outcome).
    pub finished: AtomicU64,
    /// KV positions sent to checkpoint sinks since start.
    pub checkpointed_tokens: AtomicU64,
    /// KV positions imported from checkpoints instead of prefilled, since start.
    pub restored_tokens: AtomicU64,
    /// Sequences per forward step (decode rows plus the prefill chunk's sequence), counted in
    /// fixed buckets so a metrics exporter can publish a histogram without a hook in the loop.
    pub batch_sequences: BatchHistogram,
}

/// Upper bounds (inclusive) of [`BatchHistogram`]'s buckets; one more bucket counts the rest.
pub const BATCH_BUCKETS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// A lock-free histogram of sequences per step: one counter per bucket of [`BATCH_BUCKETS`]
/// plus an overflow bucket, and the sum of all observations.
#[derive(Debug, Default)]
pub struct BatchHistogram {
    counts: [AtomicU64; BATCH_BUCKETS.len() + 1],
    sum: AtomicU64,
}

/// A copy of a [`BatchHistogram`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchSnapshot {
    /// Observations per bucket (not cumulative): `counts[i]` for `BATCH_BUCKETS[i]`, the last
    /// entry for larger batches.
    pub counts: [u64; BATCH_BUCKETS.len() + 1],
    /// Sum of the observed batch sizes.
    pub sum: u64,
}

impl BatchHistogram {
    /// Counts one step of `sequences` sequences.
    pub fn observe(&self, sequences: usize) {
        let n = sequences as u64;
        let i = BATCH_BUCKETS
            .iter()
            .position(|&b| n <= b)
            .unwrap_or(BATCH_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(n, Ordering::Relaxed);
    }

    /// The current counters.
    pub fn snapshot(&self) -> BatchSnapshot {
        let mut s = BatchSnapshot {
            sum: self.sum.load(Ordering::Relaxed),
            ..BatchSnapshot::default()
        };
        for (out, c) in s.counts.iter_mut().zip(&self.counts) {
            *out = c.load(Ordering::Relaxed);
        }
        s
    }
}

impl BatchSnapshot {
    /// Steps observed.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other`'s counters to these.
    pub fn add(&mut self, other: &BatchSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }
}

struct Submission {
    req: EngineRequest,
    cancel: CancellationToken,
    events: mpsc::Sender<EngineEvent>,
}

/// Handle to a running engine. Dropping it stops the compute thread after the current step.
#[derive(Debug)]
pub struct Engine {
    tx: Option<std_mpsc::Sender<Input>>,
    /// Vocabulary size: token ids must be below it.
    vocab: usize,
    stats: Arc<EngineStats>,
    cfg: EngineConfig,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("id", &self.req.id)
            .finish()
    }
}

impl Engine {
    /// Starts the compute thread that owns `runtime` (which must run the whole model).
    pub fn start(
        runtime: Box<dyn ShardRuntime>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        let n_layers = runtime.config().n_layers;
        let range = runtime.layers();
        if !range.is_first() || !range.is_last(n_layers) {
            return Err(EngineError::Invalid(format!(
                "the engine needs the whole model, got layers {range}"
            )));
        }
        Self::spawn(runtime, tokenizer, cfg, None)
    }

    /// Starts the head of a pipeline: `runtime` runs the first layers (it embeds tokens but
    /// does not reach the output head); `downstream` is built with the way back into the
    /// engine and carries every step to the later stages, whose last one samples. Scheduling,
    /// stop strings, detokenization, cancellation and resume work as on a whole model; a
    /// sequence waits for its token to come back before its next decode step, and the others
    /// run meanwhile, so several sequences are in flight along the pipeline at once.
    ///
    /// Micro-batches: the sequences sampled by one step form a group that travels the
    /// pipeline together. At most one group per stage is in flight; when that many are out,
    /// the head waits for one to come back whole instead of stepping the first sequences
    /// whose tokens return. Groups that return meanwhile are merged into the next step, so
    /// sequences that arrived one by one end up sharing steps instead of each keeping a
    /// one-row step of its own in every stage.
    pub fn start_head(
        runtime: Box<dyn ShardRuntime>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
        downstream: impl FnOnce(TailSender) -> Box<dyn Downstream>,
    ) -> Result<Self, EngineError> {
        let n_layers = runtime.config().n_layers;
        let range = runtime.layers();
        if !range.is_first() || range.is_last(n_layers) {
            return Err(EngineError::Invalid(format!(
                "a pipeline head runs the first layers but not the last, got layers {range}"
            )));
        }
        let (tx, rx) = std_mpsc::channel();
        let down = downstream(TailSender(tx.clone()));
        Self::spawn_with(runtime, tokenizer, cfg, Some(down), tx, rx)
    }

    fn spawn(
        runtime: Box<dyn ShardRuntime>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
        down: Option<Box<dyn Downstream>>,
    ) -> Result<Self, EngineError> {
        let (tx, rx) = std_mpsc::channel();
        Self::spawn_with(runtime, tokenizer, cfg, down, tx, rx)
    }

    fn spawn_with(
        runtime: Box<dyn ShardRuntime>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
        down: Option<Box<dyn Downstream>>,
        tx: std_mpsc::Sender<Input>,
        rx: std_mpsc::Receiver<Input>,
    ) -> Result<Self, EngineError> {
        let vocab = runtime.config().vocab;
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            rt: runtime,
            tok: tokenizer,
            cfg: cfg.clone(),
            rx,
            stats: stats.clone(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            next_seq: 0,
            logits: Vec::new(),
            down,
            groups: HashMap::new(),
            next_group: 0,
        };
        let thread = std::thread::Builder::new()
            .name("shoal-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::Model(format!("spawning the compute thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            vocab,
            stats,
            cfg,
            thread: Some(thread),
        })
    }

    /// Queues a generation. Events arrive on the returned receiver; cancelling `cancel` or
    /// dropping the receiver stops it and frees its KV cache.
    pub fn submit(
        &self,
        req: EngineRequest,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<EngineEvent>, EngineError> {
        req.options
            .sampling
            .validate()
            .map_err(|e| EngineError::from_model(&e))?;
        if req.prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if req.options.max_tokens == 0 {
            return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
        }
        if req.resume.len() > req.options.max_tokens as usize {
            return Err(EngineError::Invalid(format!(
                "{} tokens to resume exceed max_tokens ({})",
                req.resume.len(),
                req.options.max_tokens
            )));
        }
        if let Some(bad) = req
            .prompt
            .iter()
            .chain(&req.resume)
            .find(|&&t| t as usize >= self.vocab)
        {
            return Err(EngineError::Invalid(format!(
                "token {bad} is outside the vocabulary of {} tokens",
                self.vocab
            )));
        }
        let (events, rx) = mpsc::channel(self.cfg.event_buffer.max(2));
        let tx = self.tx.as_ref().ok_or(EngineError::ShutDown)?;
        // The queue is bounded by this count (the channel also carries the pipeline's
        // results, which must never be refused).
        let waiting = self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        if waiting >= self.cfg.max_waiting.max(1) {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Busy { waiting });
        }
        match tx.send(Input::Submit(Box::new(Submission {
            req,
            cancel,
            events,
        }))) {
            Ok(()) => Ok(rx),
            Err(_) => {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(EngineError::ShutDown)
            }
        }
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Stops accepting work, lets the compute thread finish its current step, and joins it.
    /// Generations still running receive `Failed(ShutDown)`.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Input::Shutdown);
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the engine's compute thread panicked");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Phase {
    /// Prompt tokens processed so far.
    Prefill(usize),
    /// Waiting to decode this token.
    Decode(u32),
    /// (Pipeline head.) The last rows went down the pipeline; waiting for the sampled token.
    Sampling,
}

struct Active {
    seq: SeqId,
    /// (Pipeline head.) Stages after the head on this sequence's route.
    depth: usize,
    /// (Pipeline head.) The micro-batch this sequence's token is coming back with.
    group: Option<u64>,
    sub: Submission,
    phase: Phase,
    sampler: Sampler,
    stops: StopMatcher,
    decoder: StreamDecoder<Arc<Tokenizer>>,
    /// The prompt, then every generated token.
    history: Vec<u32>,
    /// How far its checkpoints got.
    checkpointed: CheckpointCursor,
    generated: u32,
    eog: Vec<u32>,
    done: Option<(FinishReason, String)>,
}

struct Worker {
    rt: Box<dyn ShardRuntime>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    rx: std_mpsc::Receiver<Input>,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Submission>,
    active: Vec<Active>,
    next_seq: u64,
    /// Logits of the last step, reused so a step allocates nothing.
    logits: Vec<f32>,
    /// A pipeline head's later stages; `None` on a whole model.
    down: Option<Box<dyn Downstream>>,
    /// (Pipeline head.) Micro-batches in flight: sequences still waiting for their token, by
    /// group.
    groups: HashMap<u64, usize>,
    next_group: u64,
}

impl Worker {
    fn run(mut self) {
        let mut open = true;
        while open || !self.waiting.is_empty() || !self.active.is_empty() {
            // Intake: block only when there is nothing to compute (on a pipeline head, when
            // every sequence waits for its token, or every stage has a micro-batch).
            let idle = self.pipeline_full()
                || (self.waiting.is_empty()
                    && self
                        .active
                        .iter()
                        .all(|a| matches!(a.phase, Phase::Sampling) && a.done.is_none()));
            if idle {
                // With sequences in flight, wake now and then to notice cancellations.
                let got = if self.active.is_empty() {
                    self.rx.recv().ok()
                } else {
                    match self.rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(i) => Some(i),
                        Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                };
                match got {
                    Some(i) => open &= self.input(i),
                    None if self.active.is_empty() => break,
                    None => {}
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(i) => open &= self.input(i),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if !open {
                self.fail_all(EngineError::ShutDown);
                break;
            }
            self.admit();
            let stepped = self.step();
            if stepped {
                self.checkpoint();
            }
            self.retire();
            if !stepped && !idle && self.active.iter().any(|a| a.done.is_none()) {
                // Every active sequence is paused on a slow reader: wait a little.
                std::thread::sleep(Duration::from_millis(1));
            }
            self.stats
                .active
                .store(self.active.len(), Ordering::Relaxed);
            self.stats
                .kv_bytes
                .store(self.rt.kv_bytes(), Ordering::Relaxed);
        }
    }

    /// Takes one input; false when the engine must stop.
    fn input(&mut self, i: Input) -> bool {
        match i {
            Input::Submit(s) => {
                // A generation resumed after a node failed has a client waiting mid-stream:
                // it goes ahead of new requests (behind earlier resumed ones).
                let s = *s;
                if s.req.resume.is_empty() {
                    self.waiting.push_back(s);
                } else {
                    let at = self
                        .waiting
                        .iter()
                        .position(|w| w.req.resume.is_empty())
                        .unwrap_or(self.waiting.len());
                    self.waiting.insert(at, s);
                }
            }
            Input::Tail(TailEvent::Token { seq, token }) => {
                let context = self.rt.config().context_length as usize;
                if let Some(a) = self.active.iter_mut().find(|a| a.seq == seq)
                    && matches!(a.phase, Phase::Sampling)
                    && a.done.is_none()
                {
                    if let Some(g) = a.group.take() {
                        group_returned(&mut self.groups, g);
                    }
                    a.generated += 1;
                    a.history.push(token);
                    self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
                    a.phase = Phase::Decode(token);
                    emit_token(a, token, context, Emit::Send);
                }
            }
            Input::Tail(TailEvent::Failed { seq, error }) => {
                for a in &mut self.active {
                    if seq.is_none_or(|s| s == a.seq) && a.done.is_none() {
                        let _ = a.sub.events.try_send(EngineEvent::Failed(error.clone()));
                        a.done = Some((FinishReason::Cancelled, String::new()));
                    }
                }
            }
            Input::Shutdown => return false,
        }
        true
    }

    fn admit(&mut self) {
        let context = self.rt.config().context_length as usize;
        while self.active.len() < self.cfg.max_active {
            let Some(sub) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if sub.cancel.is_cancelled() || sub.events.is_closed() {
                continue;
            }
            if sub.req.prompt.len() >= context {
                let msg = format!(
                    "the prompt has {} tokens; the context window is {context}",
                    sub.req.prompt.len()
                );
                let _ = sub
                    .events
                    .try_send(EngineEvent::Failed(EngineError::Invalid(msg)));
                continue;
            }
            let sampler = match Sampler::new(sub.req.options.sampling.clone()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = sub
                        .events
                        .try_send(EngineEvent::Failed(EngineError::from_model(&e)));
                    continue;
                }
            };
            self.next_seq += 1;
            let seq = SeqId(self.next_seq);
            let prompt_tokens = sub.req.prompt.len() as u32;
            let mut a = Active {
                seq,
                depth: 0,
                group: None,
                stops: StopMatcher::new(&sub.req.options.stop),
                history: sub.req.prompt.clone(),
                checkpointed: CheckpointCursor::default(),
                sub,
                phase: Phase::Prefill(0),
                sampler,
                decoder: StreamDecoder::new(self.tok.clone(), true),
                generated: 0,
                eog: self.tok.end_of_generation_tokens(),
                done: None,
            };
            replay(&mut a, context);
            let snap = usable_checkpoint(&mut a);
            let mut usable = snap.as_ref().map_or(0, KvSnapshot::len);
            if let Some(down) = self.down.as_mut() {
                match down.open(seq, &a.sub.req, &a.history[..usable]) {
                    Ok(o) => {
                        a.depth = o.depth;
                        usable = usable.min(o.restored as usize);
                    }
                    Err(e) => {
                        let _ = a.sub.events.try_send(EngineEvent::Failed(e));
                        continue;
                    }
                }
            }
            let restored = match snap {
                Some(mut snap) if usable > 0 => {
                    snap.truncate(usable);
                    self.restore(&mut a, &snap)
                }
                _ => 0,
            };
            let _ = a.sub.events.try_send(EngineEvent::Started {
                prompt_tokens,
                restored,
            });
            self.active.push(a);
        }
    }

    /// Imports `snap` (the part of a resumed generation's checkpoint it may use), so its
    /// prefill starts after it; returns the positions imported.
    fn restore(&mut self, a: &mut Active, snap: &KvSnapshot) -> u32 {
        let usable = snap.len();
        match self.rt.import_kv(a.seq, snap) {
            Ok(()) => {
                a.phase = Phase::Prefill(usable);
                self.stats
                    .restored_tokens
                    .fetch_add(usable as u64, Ordering::Relaxed);
                tracing::debug!(
                    request = %a.sub.req.id,
                    positions = usable,
                    of = a.history.len(),
                    "KV cache restored from a checkpoint"
                );
                usable as u32
            }
            Err(e) => {
                tracing::warn!(
                    request = %a.sub.req.id,
                    error = %e,
                    "the checkpoint does not fit; prefilling everything"
                );
                self.rt.release(a.seq);
                0
            }
        }
    }

    /// Sends each checkpointed sequence's new KV positions to its sink once there are
    /// `every` of them.
    fn checkpoint(&mut self) {
        for a in &mut self.active {
            let Some(sink) = &a.sub.req.checkpoint else {
                continue;
            };
            if a.done.is_some() {
                continue;
            }
            match sink.offer(self.rt.as_ref(), a.seq, &mut a.checkpointed, &a.history) {
                Ok(sent) => {
                    self.stats
                        .checkpointed_tokens
                        .fetch_add(u64::from(sent), Ordering::Relaxed);
                }
                Err(why) => {
                    if let Some(why) = why {
                        tracing::warn!(request = %a.sub.req.id, error = %why, "checkpoint failed");
                    }
                    a.sub.req.checkpoint = None;
                }
            }
        }
    }

    /// (Pipeline head.) Whether every stage has a micro-batch in flight, so the next step
    /// must wait for one to come back.
    fn pipeline_full(&self) -> bool {
        if self.down.is_none() || self.groups.is_empty() {
            return false;
        }
        let stages = self.active.iter().map(|a| a.depth + 1).max().unwrap_or(2);
        self.groups.len() >= stages.max(2)
    }

    /// Runs one forward step; returns false when nothing could be scheduled.
    fn step(&mut self) -> bool {
        for a in &mut self.active {
            if a.sub.cancel.is_cancelled() || a.sub.events.is_closed() {
                a.done
                    .get_or_insert((FinishReason::Cancelled, String::new()));
            }
        }
        if self.pipeline_full() {
            return false;
        }
        let mut batch = Vec::new();
        let mut tokens = Vec::new();
        let mut members = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            if a.done.is_some() {
                continue;
            }
            if let Phase::Decode(t) = a.phase {
                // Two slots: the token event and a possible final event.
                if a.sub.events.capacity() < 2 {
                    continue;
                }
                let pos = (a.history.len() - 1) as u32;
                batch.push(SeqStep {
                    seq: a.seq,
                    pos,
                    n_tokens: 1,
                    logits: true,
                });
                tokens.push(t);
                members.push(i);
            }
        }
        let mut budget = self.cfg.step_tokens.saturating_sub(tokens.len());
        // Prefill budget goes to resumed generations first (their clients are mid-stream), the
        // one with the least left to prefill first: one that a checkpoint restored need not
        // wait for another's whole re-prefill. Then to the others, in arrival order.
        let mut prefilling: Vec<(bool, usize, usize)> = self
            .active
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a.phase {
                Phase::Prefill(done) if a.done.is_none() => {
                    Some((a.sub.req.resume.is_empty(), a.history.len() - done, i))
                }
                _ => None,
            })
            .collect();
        prefilling.sort_by_key(|&(new, left, i)| (new, if new { i } else { left }, i));
        for (_, _, i) in prefilling {
            if budget == 0 {
                break;
            }
            let a = &mut self.active[i];
            let Phase::Prefill(done) = a.phase else {
                continue;
            };
            // The prompt, then the tokens of a resumed generation.
            let prompt = &a.history;
            let n = (prompt.len() - done).min(budget);
            let last = done + n == prompt.len();
            // Room is left for the token and final events.
            if a.sub.events.capacity() > PROGRESS_ROOM {
                let _ = a.sub.events.try_send(EngineEvent::Progress {
                    positions: (done + n) as u32,
                });
            }
            batch.push(SeqStep {
                seq: a.seq,
                pos: done as u32,
                n_tokens: n as u32,
                logits: last,
            });
            tokens.extend_from_slice(&prompt[done..done + n]);
            members.push(i);
            budget -= n;
        }
        if batch.is_empty() {
            return false;
        }
        let vocab = self.rt.config().vocab;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .step_rows
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        self.stats.batch_sequences.observe(batch.len());
        let out = self.rt.forward(&batch, ShardInput::Tokens(&tokens));
        match (out, &mut self.down) {
            (Ok(ShardOutput::Hidden(h)), Some(down)) => {
                // A pipeline head: the rows go down, the tokens come back later, together.
                let mut slices = Vec::with_capacity(batch.len());
                let mut row = 0;
                let group = self.next_group;
                self.next_group += 1;
                for (st, &i) in batch.iter().zip(&members) {
                    let n = st.n_tokens as usize;
                    slices.push(HeadSlice {
                        seq: st.seq,
                        pos: st.pos,
                        n_tokens: st.n_tokens,
                        sample: st.logits,
                        tokens: tokens[row..row + n].to_vec(),
                    });
                    row += n;
                    let a = &mut self.active[i];
                    a.phase = match a.phase {
                        Phase::Prefill(done) if !st.logits => Phase::Prefill(done + n),
                        _ => {
                            a.group = Some(group);
                            *self.groups.entry(group).or_default() += 1;
                            Phase::Sampling
                        }
                    };
                }
                let step = HeadStep {
                    slices,
                    hidden: h.to_vec(),
                };
                if let Err(e) = down.step(step) {
                    tracing::warn!(error = %e, "sending a step down the pipeline failed");
                    self.fail_members(&members, e);
                }
                return true;
            }
            (Ok(ShardOutput::Logits(l)), None) => {
                self.logits.clear();
                self.logits.extend_from_slice(l);
            }
            (Ok(_), _) => {
                self.fail_members(
                    &members,
                    EngineError::Model("the runtime's output does not match its role".into()),
                );
                return true;
            }
            (Err(e), _) => {
                tracing::warn!(error = %e, "forward step failed");
                self.fail_members(&members, EngineError::from_model(&e));
                return true;
            }
        }
        let mut rows = self.logits.chunks_exact(vocab);
        for (st, &i) in batch.iter().zip(&members) {
            let a = &mut self.active[i];
            if let Phase::Prefill(done) = a.phase {
                a.phase = Phase::Prefill(done + st.n_tokens as usize);
            }
            if !st.logits {
                continue;
            }
            let Some(row) = rows.next() else { break };
            let next = a.sampler.sample(row, &a.history, u64::from(a.generated));
            a.generated += 1;
            a.history.push(next);
            self.stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
            a.phase = Phase::Decode(next);
            emit_token(
                a,
                next,
                self.rt.config().context_length as usize,
                Emit::Send,
            );
        }
        true
    }

    fn fail_members(&mut self, members: &[usize], err: EngineError) {
        for &i in members {
            let a = &mut self.active[i];
            let _ = a.sub.events.try_send(EngineEvent::Failed(err.clone()));
            a.done = Some((FinishReason::Cancelled, String::new()));
        }
    }

    fn fail_all(&mut self, err: EngineError) {
        self.groups.clear();
        for a in self.active.drain(..) {
            let _ = a.sub.events.try_send(EngineEvent::Failed(err.clone()));
            self.rt.release(a.seq);
            if let Some(down) = &mut self.down {
                down.release(a.seq);
            }
        }
        for s in self.waiting.drain(..) {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = s.events.try_send(EngineEvent::Failed(err.clone()));
        }
    }

    /// Sends final events and frees the caches of sequences that ended.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].done.is_none() {
                i += 1;
                continue;
            }
            let a = self.active.swap_remove(i);
            if let Some(g) = a.group {
                group_returned(&mut self.groups, g);
            }
            self.rt.release(a.seq);
            if let Some(down) = &mut self.down {
                down.release(a.seq);
            }
            self.stats.finished.fetch_add(1, Ordering::Relaxed);
            if let Some((reason, tail)) = a.done
                && reason != FinishReason::Cancelled
            {
                let usage = Usage {
                    prompt_tokens: a.sub.req.prompt.len() as u32,
                    completion_tokens: a.generated,
                };
                let _ = a.sub.events.try_send(EngineEvent::Finished {
                    reason,
                    usage,
                    tail,
                });
            }
        }
    }
}

/// One sequence of micro-batch `g` is back (or gone); the group ends with its last.
fn group_returned(groups: &mut HashMap<u64, usize>, g: u64) {
    if let Some(left) = groups.get_mut(&g) {
        *left = left.saturating_sub(1);
        if *left == 0 {
            groups.remove(&g);
        }
    }
}

/// Replays the tokens of a resumed generation through the detokenizer and the stop matcher
/// without emitting them, so the held-back bytes and the stop matcher's window are what they
/// were on the node that produced them. A resumed generation that had in fact ended (every
/// token delivered but not the final event) finishes here the way it finished there.
/// The part of a resumed generation's checkpoint that holds exactly its leading tokens, short
/// of the last one (computed again: its logits give the next draw); `None` when nothing of it
/// is usable.
fn usable_checkpoint(a: &mut Active) -> Option<KvSnapshot> {
    let mut snap = a.sub.req.restore.take()?;
    if a.done.is_some() {
        return None;
    }
    let usable = snap
        .matching_prefix(&a.history)
        .min(a.history.len().saturating_sub(1));
    snap.truncate(usable);
    (!snap.is_empty()).then_some(snap)
}

fn replay(a: &mut Active, context: usize) {
    let resume = std::mem::take(&mut a.sub.req.resume);
    for &t in &resume {
        if a.done.is_some() {
            break;
        }
        a.generated += 1;
        a.history.push(t);
        emit_token(a, t, context, Emit::Silent);
    }
    a.sub.req.resume = resume;
}

/// Whether a token's events reach the receiver.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Emit {
    /// A token sampled now.
    Send,
    /// A token of a resumed generation: the client already has it.
    Silent,
}

/// Turns a sampled token into events and decides whether the sequence is done.
fn emit_token(a: &mut Active, next: u32, context: usize, emit: Emit) {
    let send_token = |a: &Active, text: String| {
        if emit == Emit::Send {
            let _ = a.sub.events.try_send(EngineEvent::Token { id: next, text });
        }
    };
    let opts = &a.sub.req.options;
    if !opts.ignore_eos && a.eog.contains(&next) {
        let tail = finish_text(a);
        send_token(a, String::new());
        a.done = Some((FinishReason::Stop, tail));
        return;
    }
    // Bytes are held back until they form whole characters.
    let text = match a.decoder.push(next) {
        Ok(t) => t,
        Err(e) => {
            let _ = a
                .sub
                .events
                .try_send(EngineEvent::Failed(EngineError::Model(e.to_string())));
            a.done = Some((FinishReason::Cancelled, String::new()));
            return;
        }
    };
    match a.stops.push(&text) {
        StopScan::Continue(t) => {
            send_token(a, t);
            let max_tokens = a.sub.req.options.max_tokens;
            if a.generated >= max_tokens || a.history.len() >= context {
                let tail = finish_text(a);
                a.done = Some((FinishReason::Length, tail));
            }
        }
        StopScan::Stopped(t) => {
            send_token(a, t);
            a.done = Some((FinishReason::Stop, String::new()));
        }
    }
}

fn finish_text(a: &mut Active) -> String {
    let rest = a.decoder.finish();
    let mut out = match a.stops.push(&rest) {
        StopScan::Continue(t) | StopScan::Stopped(t) => t,
    };
    out.push_str(&a.stops.finish());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn batch_histogram_counts_each_step_in_its_bucket() {
        let h = BatchHistogram::default();
        for n in [1, 1, 2, 3, 8, 9, 128, 129, 1000] {
            h.observe(n);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, [2, 1, 1, 1, 1, 0, 0, 1, 2]);
        assert_eq!(s.sum, 1 + 1 + 2 + 3 + 8 + 9 + 128 + 129 + 1000);
        assert_eq!(s.count(), 9);
        let mut total = s;
        total.add(&s);
        assert_eq!(total.count(), 18);
        assert_eq!(total.sum, 2 * s.sum);
    }
}
