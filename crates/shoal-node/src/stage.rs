//! The pipeline data path: a model split into contiguous layer ranges on several agents.
//!
//! - The **head** (layers `[0, a)`) is a normal engine started with
//!   [`Engine::start_head`](shoal_engine::Engine::start_head): it tokenizes, schedules,
//!   detokenizes and matches stop strings like a whole model, but its forward pass ends in
//!   hidden states, which [`HeadLinks`] sends down `Stage.Open` links to the next stage. The
//!   sampled tokens come back up the same links.
//! - Every **later stage** is a [`StageShard`]: a compute thread that owns the range's
//!   [`CpuShard`](shoal_model::CpuShard) and a KV cache per sequence. The `Stage` gRPC service
//!   ([`StageService`]) accepts links from the stage before it, runs each step's rows through
//!   its layers and either forwards the hidden states on its own link to the next stage
//!   (opened when the first sequence names it) or, on the last stage, samples each sequence's
//!   next token and sends the results back up, where every stage relays them.
//!
//! Links are direct agent-to-agent mTLS streams; nothing goes through the coordinator. Each
//! link negotiates its codec (f32, f16 or 8-bit blocks) from the head's preference. Sequence
//! ids are the head's; a middle stage opens one downstream link per upstream link, so ids stay
//! unique per link without renaming. When a link breaks, every sequence on it fails with class
//! `unavailable` at the head, whose caller (the gateway) resumes them elsewhere.

use crate::checkpoint::{self, Pusher};
use crate::core::NodeCore;
use crate::link_metrics::{LinkMetrics, Peer, unix_micros};
use futures::Stream;
use shoal_engine::{
    CheckpointCursor, CheckpointSink, Downstream, EngineError, EngineRequest, HeadStep, Opened,
    TailEvent, TailSender,
};
use shoal_model::{
    KvSnapshot, Model, Sampler, SamplingParams, SeqStep, ShardInput, ShardOutput, ShardRuntime,
};
use shoal_net::{ConnectOptions, RenewableIdentity, Role, TlsMode};
use shoal_pipeline::{
    Activations, Codec, Frame, LinkOpen, Preference, SeqOutput, SeqSlice, SequenceOpen, StageFault,
    StageHop, Step, StepResult,
};
use shoal_proto::v1::{self, stage_client::StageClient, stage_server::Stage};
use shoal_types::{ErrorClass, LayerRange, ModelId, NodeId, RequestId, SeqId};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Codecs this node can encode and decode.
pub(crate) const CODECS: [Codec; 3] = [Codec::F32, Codec::F16, Codec::Q8];
/// Frames buffered per link direction.
const LINK_BUFFER: usize = 64;
/// Bound on a link's first frame (open or accept).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one link: links are long-lived and reopened after this.
const LINK_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// Bound on a resumed sequence's later stages importing their checkpoints (each fetch is
/// bounded by [`checkpoint::FETCH_TIMEOUT`]); past it the head computes everything.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(15);

/// What a node needs to open links to other stages.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// This node.
    pub node_id: NodeId,
    /// Credentials for agent-to-agent links.
    pub tls: TlsMode,
    /// An enrolled node's certificate, renewed at run time: new links present the current
    /// one instead of `tls`.
    pub renewing: Option<RenewableIdentity>,
    /// What the node's links carry, counted by every link it opens or accepts.
    pub metrics: Arc<LinkMetrics>,
}

impl LinkSettings {
    /// The credentials a link opened now presents.
    pub(crate) fn mode(&self) -> TlsMode {
        self.renewing
            .as_ref()
            .map_or_else(|| self.tls.clone(), RenewableIdentity::mode)
    }
}

fn fault(seq: Option<SeqId>, class: ErrorClass, reason: &str, message: String) -> StageFault {
    StageFault {
        seq,
        class,
        reason: reason.to_owned(),
        message,
    }
}

// ---------------------------------------------------------------------------------------
// Later stages: the compute thread.

/// What a stage's compute thread is asked to do.
enum Job {
    Open {
        link: u64,
        seq: SeqId,
        /// Set on the last stage: how to sample, and how many tokens were drawn before.
        sampling: Option<(SamplingParams, u32)>,
        /// Where the sequence's KV checkpoints go, if anywhere.
        checkpoint: Option<CheckpointSink>,
    },
    /// Imports the part of `snap` that holds exactly the leading `tokens` into a sequence
    /// just opened; answers the positions imported.
    Import {
        link: u64,
        seq: SeqId,
        snap: Box<KvSnapshot>,
        tokens: Vec<u32>,
        reply: oneshot::Sender<u32>,
    },
    Step {
        link: u64,
        slices: Vec<SeqSlice>,
        hidden: Vec<f32>,
        reply: oneshot::Sender<Result<StageOut, StageFault>>,
    },
    Release {
        link: u64,
        seqs: Vec<SeqId>,
    },
    CloseLink {
        link: u64,
    },
}

/// A step's result on one stage.
enum StageOut {
    /// Hidden states for the next stage.
    Hidden(Vec<f32>),
    /// The last stage's sampled tokens, one per slice that asked.
    Tokens(Vec<(SeqId, u32)>),
}

/// The last stage's per-sequence sampling state.
struct Tail {
    sampler: Sampler,
    drawn: u32,
}

struct SeqState {
    local: SeqId,
    tail: Option<Tail>,
    /// The sequence's tokens so far (sampling history, and the labels of its checkpoints).
    history: Vec<u32>,
    checkpoint: Option<(CheckpointSink, CheckpointCursor)>,
    /// Imported from a checkpoint: the first step may start before the cached end (the
    /// head restored less), and the cache is rewound to it.
    restored: bool,
}

/// A non-first layer range served as a pipeline stage.
#[derive(Debug)]
pub(crate) struct StageShard {
    pub model_id: ModelId,
    pub sha256: String,
    pub range: LayerRange,
    pub hidden: u32,
    pub is_last: bool,
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    next_link: AtomicU64,
}

impl StageShard {
    /// Cuts `range` out of `model` and starts its compute thread.
    pub fn start(
        model: &Model,
        model_id: ModelId,
        sha256: String,
        range: LayerRange,
        threads: usize,
    ) -> Result<Self, String> {
        let pool =
            Arc::new(shoal_model::ThreadPool::new(threads.max(1)).map_err(|e| e.to_string())?);
        let rt = model
            .shard(range, pool, shoal_model::ShardOptions::default())
            .map_err(|e| e.to_string())?;
        let cfg = model.config();
        let is_last = range.is_last(cfg.n_layers);
        let hidden = cfg.hidden as u32;
        let (tx, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("shoal-stage-{range}"))
            .spawn(move || stage_thread(Box::new(rt), rx))
            .map_err(|e| format!("spawning the stage thread: {e}"))?;
        Ok(Self {
            model_id,
            sha256,
            range,
            hidden,
            is_last,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            next_link: AtomicU64::new(1),
        })
    }

    fn send(&self, job: Job) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Stops the compute thread (after the jobs already queued) and joins it. Blocking.
    pub fn stop(&self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let t = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t
            && t.join().is_err()
        {
            tracing::error!("a stage compute thread panicked");
        }
    }
}

impl Drop for StageShard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stage_thread(mut rt: Box<dyn ShardRuntime>, rx: std_mpsc::Receiver<Job>) {
    let mut seqs: HashMap<(u64, SeqId), SeqState> = HashMap::new();
    let mut next_local = 0u64;
    let vocab = rt.config().vocab;
    while let Ok(job) = rx.recv() {
        match job {
            Job::Open {
                link,
                seq,
                sampling,
                checkpoint,
            } => {
                next_local += 1;
                let tail = match sampling {
                    None => None,
                    Some((params, drawn)) => match Sampler::new(params) {
                        Ok(sampler) => Some(Tail { sampler, drawn }),
                        Err(e) => {
                            tracing::warn!(error = %e, "bad sampling parameters on a stage link");
                            continue;
                        }
                    },
                };
                if let Some(old) = seqs.insert(
                    (link, seq),
                    SeqState {
                        local: SeqId(next_local),
                        tail,
                        history: Vec::new(),
                        checkpoint: checkpoint.map(|c| (c, CheckpointCursor::default())),
                        restored: false,
                    },
                ) {
                    rt.release(old.local);
                }
            }
            Job::Import {
                link,
                seq,
                snap,
                tokens,
                reply,
            } => {
                let n = match seqs.get_mut(&(link, seq)) {
                    Some(st) => import(rt.as_mut(), st, *snap, &tokens),
                    None => 0,
                };
                let _ = reply.send(n);
            }
            Job::Step {
                link,
                slices,
                hidden,
                reply,
            } => {
                let out = run_step(rt.as_mut(), &mut seqs, link, &slices, &hidden, vocab);
                let _ = reply.send(out);
                checkpoint(rt.as_ref(), &mut seqs, link, &slices);
            }
            Job::Release { link, seqs: gone } => {
                for s in gone {
                    if let Some(st) = seqs.remove(&(link, s)) {
                        rt.release(st.local);
                    }
                }
            }
            Job::CloseLink { link } => {
                let gone: Vec<(u64, SeqId)> =
                    seqs.keys().filter(|(l, _)| *l == link).copied().collect();
                for k in gone {
                    if let Some(st) = seqs.remove(&k) {
                        rt.release(st.local);
                    }
                }
            }
        }
    }
    for st in seqs.into_values() {
        rt.release(st.local);
    }
}

/// Imports the part of `snap` holding exactly the leading `tokens` into the sequence `st`
/// (just opened, empty); returns the positions imported.
fn import(
    rt: &mut dyn ShardRuntime,
    st: &mut SeqState,
    mut snap: KvSnapshot,
    tokens: &[u32],
) -> u32 {
    let usable = snap.matching_prefix(tokens);
    snap.truncate(usable);
    if snap.is_empty() {
        return 0;
    }
    match rt.import_kv(st.local, &snap) {
        Ok(()) => {
            st.history = snap.tokens;
            st.restored = true;
            usable as u32
        }
        Err(e) => {
            tracing::warn!(error = %e, "a stage checkpoint does not fit; computing everything");
            0
        }
    }
}

/// Offers the new KV positions of a step's sequences to their checkpoint sinks.
fn checkpoint(
    rt: &dyn ShardRuntime,
    seqs: &mut HashMap<(u64, SeqId), SeqState>,
    link: u64,
    slices: &[SeqSlice],
) {
    for s in slices {
        let Some(st) = seqs.get_mut(&(link, s.seq)) else {
            continue;
        };
        let Some((sink, cursor)) = st.checkpoint.as_mut() else {
            continue;
        };
        if let Err(why) = sink.offer(rt, st.local, cursor, &st.history) {
            if let Some(why) = why {
                tracing::warn!(error = %why, "stage checkpoint failed");
            }
            st.checkpoint = None;
        }
    }
}

fn run_step(
    rt: &mut dyn ShardRuntime,
    seqs: &mut HashMap<(u64, SeqId), SeqState>,
    link: u64,
    slices: &[SeqSlice],
    hidden: &[f32],
    vocab: usize,
) -> Result<StageOut, StageFault> {
    let mut batch = Vec::with_capacity(slices.len());
    for s in slices {
        let Some(st) = seqs.get_mut(&(link, s.seq)) else {
            return Err(fault(
                Some(s.seq),
                ErrorClass::InvalidRequest,
                "unknown_sequence",
                format!("sequence {} was not opened on this link", s.seq.0),
            ));
        };
        if std::mem::take(&mut st.restored)
            && rt.seq_len(st.local).is_some_and(|cached| s.pos < cached)
        {
            // The head restored less than this stage: what it sends again replaces the rest.
            rt.truncate(st.local, s.pos);
            st.history.truncate(s.pos as usize);
        }
        st.history.extend_from_slice(&s.tokens);
        batch.push(SeqStep {
            seq: st.local,
            pos: s.pos,
            n_tokens: s.n_tokens,
            logits: s.sample,
        });
    }
    let out = rt
        .forward(&batch, ShardInput::Hidden(hidden))
        .map_err(|e| {
            fault(
                None,
                e.class(),
                "stage_forward_failed",
                format!("the stage could not run the step: {e}"),
            )
        })?;
    match out {
        ShardOutput::Hidden(h) => Ok(StageOut::Hidden(h.to_vec())),
        ShardOutput::Logits(l) => {
            let mut rows = l.chunks_exact(vocab);
            let mut tokens = Vec::new();
            for s in slices {
                let Some(st) = seqs.get_mut(&(link, s.seq)) else {
                    continue;
                };
                let Some(tail) = st.tail.as_mut() else {
                    if s.sample {
                        return Err(fault(
                            Some(s.seq),
                            ErrorClass::InvalidRequest,
                            "no_sampling",
                            "the sequence was opened without sampling parameters".into(),
                        ));
                    }
                    continue;
                };
                if !s.sample {
                    continue;
                }
                let Some(row) = rows.next() else {
                    return Err(fault(
                        None,
                        ErrorClass::Internal,
                        "missing_logits",
                        "the stage produced fewer logit rows than requested".into(),
                    ));
                };
                let token = tail.sampler.sample(row, &st.history, u64::from(tail.drawn));
                tail.drawn += 1;
                tokens.push((s.seq, token));
            }
            Ok(StageOut::Tokens(tokens))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Links: the client side.

/// One open link to the next stage.
struct Link {
    tx: mpsc::Sender<v1::StageFrame>,
    metrics: Arc<LinkMetrics>,
    codec: Codec,
    width: u32,
    /// Cancelled when the link ends (either side).
    closed: CancellationToken,
}

impl Link {
    /// Opens a link to `hop` for `model` and returns it with the receiving half.
    async fn open(
        hop: &StageHop,
        model: &ModelId,
        sha256: &str,
        settings: &LinkSettings,
        preference: Preference,
    ) -> Result<(Link, Streaming<v1::StageFrame>), StageFault> {
        let lost = |m: String| fault(None, ErrorClass::Unavailable, "stage_unreachable", m);
        let opts = ConnectOptions {
            expect_role: Some(Role::Agent),
            ..ConnectOptions::default()
        };
        let channel = shoal_net::connect_lazy(&hop.data_addr, &settings.mode(), opts)
            .map_err(|e| lost(format!("stage {} at {}: {e}", hop.node, hop.data_addr)))?;
        let mut client = StageClient::with_interceptor(
            channel,
            shoal_net::ClientInterceptor::new(LINK_DEADLINE),
        );
        let (tx, rx) = mpsc::channel::<v1::StageFrame>(LINK_BUFFER);
        let open = Frame::LinkOpen(LinkOpen {
            model: model.clone(),
            model_sha256: sha256.to_owned(),
            layers: hop.layers,
            plan_epoch: 0,
            pipeline: 0,
            codecs: CODECS.to_vec(),
            preference,
            sender: settings.node_id.clone(),
        });
        let open = v1::StageFrame::from(open);
        settings.metrics.frame_sent(Peer::Next, &open);
        tx.send(open)
            .await
            .map_err(|_| lost("link closed".into()))?;
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let call = async {
            let mut inbound = client
                .open(outbound)
                .await
                .map_err(|s| lost(format!("stage {}: {}", hop.node, s.message())))?
                .into_inner();
            let first = inbound
                .message()
                .await
                .map_err(|s| lost(format!("stage {}: {}", hop.node, s.message())))?;
            if let Some(f) = &first {
                settings.metrics.frame_received(Peer::Next, f);
            }
            match first.map(Frame::try_from) {
                Some(Ok(Frame::LinkAccept(a))) => Ok((a, inbound)),
                Some(Ok(Frame::Error(f))) => Err(f),
                other => Err(lost(format!(
                    "stage {} did not accept the link: {other:?}",
                    hop.node
                ))),
            }
        };
        let (accept, inbound) = tokio::time::timeout(HANDSHAKE_TIMEOUT, call)
            .await
            .map_err(|_| lost(format!("stage {} did not answer the link", hop.node)))??;
        tracing::debug!(to = %hop.node, codec = %accept.codec, "stage link open");
        Ok((
            Link {
                tx,
                metrics: settings.metrics.clone(),
                codec: accept.codec,
                width: accept.hidden_width,
                closed: CancellationToken::new(),
            },
            inbound,
        ))
    }

    /// Sends a frame down the link, stamping steps with the moment they are handed over.
    async fn send(&self, frame: Frame) -> bool {
        let mut wire = v1::StageFrame::from(frame);
        if let Some(v1::stage_frame::Frame::Step(s)) = &mut wire.frame {
            s.sent_unix_micros = unix_micros();
        }
        self.metrics.frame_sent(Peer::Next, &wire);
        self.tx.send(wire).await.is_ok()
    }
}

// ---------------------------------------------------------------------------------------
// The head's side: the engine's `Downstream`.

/// What the head's engine thread asks of its link task.
enum HeadCmd {
    Open(Box<HeadOpen>),
    Step(HeadStep),
    Release(SeqId),
}

struct HeadOpen {
    seq: SeqId,
    request: RequestId,
    hops: Arc<Vec<StageHop>>,
    preference: Preference,
    sampling: v1::SamplingParams,
    sampled: u32,
    max_context: u32,
    /// The leading tokens the head can restore, for the later stages to restore too.
    restorable: Vec<u32>,
    /// Receives the positions every later stage restored.
    restored: Option<std_mpsc::SyncSender<u32>>,
}

/// Resumed sequences waiting for their later stages to say what they restored.
type PendingRestores = Arc<Mutex<HashMap<SeqId, std_mpsc::SyncSender<u32>>>>;

fn pending(
    p: &PendingRestores,
) -> std::sync::MutexGuard<'_, HashMap<SeqId, std_mpsc::SyncSender<u32>>> {
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The route a pipeline head's request carries: the stages after the head, and how their
/// links choose a codec.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub hops: Arc<Vec<StageHop>>,
    pub preference: Preference,
}

/// The pipeline head's [`Downstream`]: hands the engine's steps to [`HeadLinks`], which runs
/// on the async runtime.
pub(crate) struct HeadDownstream {
    cmds: mpsc::Sender<HeadCmd>,
    max_context: u32,
}

impl HeadDownstream {
    /// Starts the link task on `runtime` and returns the engine's side.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        tail: TailSender,
        model: ModelId,
        sha256: String,
        settings: LinkSettings,
        max_context: u32,
    ) -> Self {
        let (cmds, rx) = mpsc::channel(1024);
        let links = HeadLinks {
            model,
            sha256,
            settings,
            tail,
            links: HashMap::new(),
            seq_link: HashMap::new(),
            next_step: 0,
            restores: PendingRestores::default(),
        };
        runtime.spawn(links.run(rx));
        Self { cmds, max_context }
    }

    fn send(&self, cmd: HeadCmd) -> Result<(), EngineError> {
        // Blocks the compute thread only while the link task is this far behind.
        self.cmds
            .blocking_send(cmd)
            .map_err(|_| EngineError::ShutDown)
    }
}

impl Downstream for HeadDownstream {
    fn open(
        &mut self,
        seq: SeqId,
        req: &EngineRequest,
        restorable: &[u32],
    ) -> Result<Opened, EngineError> {
        let route = req
            .route
            .as_ref()
            .and_then(|r| r.0.downcast_ref::<Route>())
            .filter(|r| !r.hops.is_empty())
            .ok_or_else(|| {
                EngineError::Invalid(
                    "this node runs the first layers of a pipeline: the request must name the later stages"
                        .into(),
                )
            })?;
        let s = &req.options.sampling;
        let sampling = v1::SamplingParams {
            temperature: Some(s.temperature),
            top_k: Some(s.top_k),
            top_p: Some(s.top_p),
            min_p: Some(s.min_p),
            repetition_penalty: Some(s.repetition_penalty),
            frequency_penalty: Some(s.frequency_penalty),
            presence_penalty: Some(s.presence_penalty),
            seed: Some(s.seed),
        };
        let later = route.hops.len();
        // Restoring pays only when every later stage has a checkpoint to import.
        let restoring =
            !restorable.is_empty() && route.hops.iter().all(|h| h.checkpoint.restore.is_some());
        let (restored, answer) = if restoring {
            let (tx, rx) = std_mpsc::sync_channel(1);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.send(HeadCmd::Open(Box::new(HeadOpen {
            seq,
            request: req.id.clone(),
            hops: route.hops.clone(),
            preference: route.preference,
            sampling,
            sampled: req.resume.len() as u32,
            max_context: self.max_context,
            restorable: if restoring {
                restorable.to_vec()
            } else {
                Vec::new()
            },
            restored,
        })))?;
        // Blocks the compute thread while the stages fetch their checkpoints (bounded).
        let restored = answer.map_or(0, |rx| rx.recv_timeout(RESTORE_TIMEOUT).unwrap_or(0));
        Ok(Opened {
            depth: later,
            restored,
        })
    }

    fn step(&mut self, step: HeadStep) -> Result<(), EngineError> {
        self.send(HeadCmd::Step(step))
    }

    fn release(&mut self, seq: SeqId) {
        let _ = self.send(HeadCmd::Release(seq));
    }
}

/// The head's links, one per distinct next stage, and which sequence uses which.
struct HeadLinks {
    model: ModelId,
    sha256: String,
    settings: LinkSettings,
    tail: TailSender,
    links: HashMap<String, Arc<Link>>,
    seq_link: HashMap<SeqId, String>,
    next_step: u64,
    restores: PendingRestores,
}

fn link_key(hop: &StageHop, preference: Preference) -> String {
    format!(
        "{}@{}#{}/{preference:?}",
        hop.node, hop.data_addr, hop.layers
    )
}

impl HeadLinks {
    async fn run(mut self, mut rx: mpsc::Receiver<HeadCmd>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                HeadCmd::Open(o) => self.open(*o).await,
                HeadCmd::Step(s) => self.step(s).await,
                HeadCmd::Release(seq) => {
                    if let Some(key) = self.seq_link.remove(&seq)
                        && let Some(link) = self.links.get(&key)
                    {
                        link.send(Frame::Release(vec![seq])).await;
                    }
                }
            }
        }
    }

    fn fail(&self, seq: Option<SeqId>, f: &StageFault) {
        let error = match f.class {
            ErrorClass::InvalidRequest => EngineError::Invalid(f.message.clone()),
            _ => EngineError::Unavailable(f.message.clone()),
        };
        self.tail.send(TailEvent::Failed { seq, error });
    }

    async fn open(&mut self, o: HeadOpen) {
        let first = &o.hops[0];
        let key = link_key(first, o.preference);
        let alive = self
            .links
            .get(&key)
            .is_some_and(|l| !l.closed.is_cancelled());
        if !alive {
            match Link::open(
                first,
                &self.model,
                &self.sha256,
                &self.settings,
                o.preference,
            )
            .await
            {
                Ok((link, inbound)) => {
                    let link = Arc::new(link);
                    tokio::spawn(read_results(
                        inbound,
                        link.closed.clone(),
                        link.metrics.clone(),
                        self.tail.clone(),
                        first.node.clone(),
                        self.restores.clone(),
                    ));
                    self.links.insert(key.clone(), link);
                }
                Err(f) => {
                    tracing::warn!(to = %first.node, error = %f.message, "opening a stage link failed");
                    self.fail(Some(o.seq), &f);
                    return;
                }
            }
        }
        let Some(link) = self.links.get(&key) else {
            return;
        };
        if let Some(tx) = o.restored {
            pending(&self.restores).insert(o.seq, tx);
        }
        let open = Frame::SequenceOpen(SequenceOpen {
            seq: o.seq,
            request: o.request,
            downstream: o.hops[1..].to_vec(),
            sampling: o.sampling,
            sampled: o.sampled,
            return_logits: false,
            max_context: o.max_context,
            stage: Some(Box::new(first.clone())),
            restorable: o.restorable,
        });
        if link.send(open).await {
            self.seq_link.insert(o.seq, key);
        } else {
            pending(&self.restores).remove(&o.seq);
            let f = fault(
                None,
                ErrorClass::Unavailable,
                "stage_lost",
                "the stage link closed".into(),
            );
            self.fail(Some(o.seq), &f);
        }
    }

    async fn step(&mut self, step: HeadStep) {
        // Split the step by link (in practice every sequence of a head goes the same way).
        let width = step
            .hidden
            .len()
            .checked_div(
                step.slices
                    .iter()
                    .map(|s| s.n_tokens as usize)
                    .sum::<usize>(),
            )
            .unwrap_or(0);
        let mut groups: Vec<(String, Vec<SeqSlice>, Vec<f32>)> = Vec::new();
        let mut row = 0usize;
        for s in step.slices {
            let n = s.n_tokens as usize;
            let rows = &step.hidden[row * width..(row + n) * width];
            row += n;
            let Some(key) = self.seq_link.get(&s.seq) else {
                continue; // its open failed; the engine was told
            };
            let slice = SeqSlice {
                seq: s.seq,
                pos: s.pos,
                n_tokens: s.n_tokens,
                sample: s.sample,
                tokens: s.tokens,
            };
            match groups.iter_mut().find(|g| &g.0 == key) {
                Some(g) => {
                    g.1.push(slice);
                    g.2.extend_from_slice(rows);
                }
                None => groups.push((key.clone(), vec![slice], rows.to_vec())),
            }
        }
        for (key, seqs, hidden) in groups {
            let Some(link) = self.links.get(&key).cloned() else {
                continue;
            };
            self.next_step += 1;
            let encoded = match Activations::encode(link.codec, link.width, &hidden) {
                Ok(a) => a,
                Err(e) => {
                    let f = fault(None, ErrorClass::Internal, "encode_failed", e.to_string());
                    for s in &seqs {
                        self.fail(Some(s.seq), &f);
                    }
                    continue;
                }
            };
            let ids: Vec<SeqId> = seqs.iter().map(|s| s.seq).collect();
            let frame = Frame::Step(Step {
                step: self.next_step,
                seqs,
                hidden: encoded,
                sent_unix_micros: 0,
            });
            if !link.send(frame).await {
                let f = fault(
                    None,
                    ErrorClass::Unavailable,
                    "stage_lost",
                    "the stage link closed".into(),
                );
                for s in ids {
                    self.fail(Some(s), &f);
                }
            }
        }
    }
}

/// Reads a head link's results and hands the tokens to the engine. When the link ends, every
/// sequence still waiting on it fails (the engine ignores sequences that already ended).
async fn read_results(
    mut inbound: Streaming<v1::StageFrame>,
    closed: CancellationToken,
    metrics: Arc<LinkMetrics>,
    tail: TailSender,
    node: NodeId,
    restores: PendingRestores,
) {
    let why = loop {
        let msg = tokio::select! {
            () = closed.cancelled() => break "the link was closed".to_owned(),
            m = inbound.message() => m,
        };
        if let Ok(Some(f)) = &msg {
            metrics.frame_received(Peer::Next, f);
        }
        match msg.map(|m| m.map(Frame::try_from)) {
            Ok(Some(Ok(Frame::StepResult(r)))) => {
                for out in r.outputs {
                    match out {
                        SeqOutput::Token { seq, token } => {
                            tail.send(TailEvent::Token { seq, token });
                        }
                        SeqOutput::Restored { seq, positions } => {
                            if let Some(tx) = pending(&restores).remove(&seq) {
                                let _ = tx.try_send(positions);
                            }
                        }
                        SeqOutput::Logits { .. } => {}
                    }
                }
            }
            Ok(Some(Ok(Frame::Error(f)))) if f.seq.is_some() => {
                let error = match f.class {
                    ErrorClass::InvalidRequest => EngineError::Invalid(f.message),
                    _ => EngineError::Unavailable(f.message),
                };
                tail.send(TailEvent::Failed { seq: f.seq, error });
            }
            Ok(Some(Ok(Frame::Error(f)))) => break f.message,
            Ok(Some(Ok(other))) => break format!("unexpected frame on a link: {other:?}"),
            Ok(Some(Err(e))) => break format!("bad frame: {e}"),
            Ok(None) => break "the stage ended the link".to_owned(),
            Err(s) => break s.message().to_owned(),
        }
    };
    closed.cancel();
    // Sequences waiting for their stages' restores compute everything (and then fail).
    pending(&restores).clear();
    tracing::warn!(stage = %node, reason = %why, "stage link lost");
    tail.send(TailEvent::Failed {
        seq: None,
        error: EngineError::Unavailable(format!("pipeline stage {node} was lost: {why}")),
    });
}

// ---------------------------------------------------------------------------------------
// The server side: `Stage.Open`.

/// The `Stage` service of one agent.
#[derive(Debug)]
pub(crate) struct StageService {
    core: Arc<NodeCore>,
    settings: LinkSettings,
}

impl StageService {
    pub fn new(core: Arc<NodeCore>, settings: LinkSettings) -> Self {
        Self { core, settings }
    }
}

/// The stream `Stage.Open` answers with.
pub type StageStream = Pin<Box<dyn Stream<Item = Result<v1::StageFrame, Status>> + Send>>;

#[tonic::async_trait]
impl Stage for StageService {
    type OpenStream = StageStream;

    async fn open(
        &self,
        request: Request<Streaming<v1::StageFrame>>,
    ) -> Result<Response<StageStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no link open frame"))??;
        let Some(first_wire) = first else {
            return Err(Status::invalid_argument(
                "the first frame of a link must open it",
            ));
        };
        self.settings
            .metrics
            .frame_received(Peer::Previous, &first_wire);
        let open = match Frame::try_from(first_wire) {
            Ok(Frame::LinkOpen(o)) => o,
            Err(e) => return Err(Status::invalid_argument(format!("bad frame: {e}"))),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first frame of a link must open it",
                ));
            }
        };
        let shard = self
            .core
            .shards
            .stage_for(open.model.as_str(), &open.model_sha256, open.layers)
            .map_err(|e| shoal_net::status(e.class, &e.reason, e.message))?;
        let Some(accept) = open.accept(&CODECS, self.core.node_id.clone(), shard.hidden) else {
            return Err(shoal_net::status(
                ErrorClass::InvalidRequest,
                "no_common_codec",
                "no activation codec acceptable to both ends",
            ));
        };
        let (tx, rx) = mpsc::channel::<Result<v1::StageFrame, Status>>(LINK_BUFFER);
        let up = Upstream {
            tx,
            metrics: self.settings.metrics.clone(),
        };
        up.send(Frame::LinkAccept(accept.clone())).await;
        let link = shard.next_link.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(from = %open.sender, layers = %shard.range, codec = %accept.codec, "stage link accepted");
        let server = LinkServer {
            shard,
            link,
            codec: accept.codec,
            preference: open.preference,
            settings: self.settings.clone(),
            up,
            down: None,
            opened: HashSet::new(),
            pushers: HashMap::new(),
            cancel: self.core.requests.child_token(),
            core: self.core.clone(),
        };
        tokio::spawn(server.run(inbound));
        Ok(Response::new(Box::pin(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
        ))))
    }
}

/// The answering half of an accepted link; counts what it sends.
#[derive(Clone)]
struct Upstream {
    tx: mpsc::Sender<Result<v1::StageFrame, Status>>,
    metrics: Arc<LinkMetrics>,
}

impl Upstream {
    /// Sends a frame up; false once the upstream stage is gone.
    async fn send(&self, frame: impl Into<v1::StageFrame>) -> bool {
        let wire = frame.into();
        self.metrics.frame_sent(Peer::Previous, &wire);
        self.tx.send(Ok(wire)).await.is_ok()
    }
}

/// One accepted link on a stage after the head.
struct LinkServer {
    shard: Arc<StageShard>,
    link: u64,
    /// The codec negotiated for steps arriving on this link (each frame names its own).
    codec: Codec,
    preference: Preference,
    settings: LinkSettings,
    up: Upstream,
    /// The link to the next stage, once a sequence named it.
    down: Option<Arc<Link>>,
    opened: HashSet<SeqId>,
    /// The checkpoint pushers of sequences that checkpoint: told `true` when the sequence
    /// ends normally (its holder drops the checkpoint); dropped when the link breaks (the
    /// checkpoint stays for the failover).
    pushers: HashMap<SeqId, oneshot::Sender<bool>>,
    cancel: CancellationToken,
    core: Arc<NodeCore>,
}

impl LinkServer {
    async fn run(mut self, mut inbound: Streaming<v1::StageFrame>) {
        let why = loop {
            let msg = tokio::select! {
                () = self.cancel.cancelled() => break "the node is shutting down".to_owned(),
                () = self.up.tx.closed() => break "the upstream stage went away".to_owned(),
                m = inbound.message() => m,
            };
            if let Ok(Some(f)) = &msg {
                self.up.metrics.frame_received(Peer::Previous, f);
            }
            let frame = match msg {
                Ok(Some(f)) => match Frame::try_from(f) {
                    Ok(f) => f,
                    Err(e) => {
                        self.error(None, ErrorClass::InvalidRequest, "bad_frame", e.to_string())
                            .await;
                        break format!("bad frame: {e}");
                    }
                },
                Ok(None) => break "the upstream stage ended the link".to_owned(),
                Err(s) => break s.message().to_owned(),
            };
            let ok = match frame {
                Frame::SequenceOpen(o) => self.open_sequence(o).await,
                Frame::Step(step) => self.step(step).await,
                Frame::Release(seqs) => {
                    for s in &seqs {
                        self.opened.remove(s);
                        if let Some(done) = self.pushers.remove(s) {
                            let _ = done.send(true);
                        }
                    }
                    self.shard.send(Job::Release {
                        link: self.link,
                        seqs: seqs.clone(),
                    });
                    if let Some(d) = &self.down {
                        d.send(Frame::Release(seqs)).await;
                    }
                    true
                }
                other => {
                    let m = format!("unexpected frame from upstream: {other:?}");
                    self.error(
                        None,
                        ErrorClass::InvalidRequest,
                        "protocol_violation",
                        m.clone(),
                    )
                    .await;
                    false
                }
            };
            if !ok {
                break "the link failed".to_owned();
            }
        };
        tracing::debug!(layers = %self.shard.range, codec = %self.codec, reason = %why, "stage link closed");
        self.shard.send(Job::CloseLink { link: self.link });
        if let Some(d) = self.down.take() {
            d.closed.cancel();
        }
    }

    async fn error(&self, seq: Option<SeqId>, class: ErrorClass, reason: &str, message: String) {
        let f = Frame::Error(fault(seq, class, reason, message));
        self.up.send(f).await;
    }

    async fn open_sequence(&mut self, o: SequenceOpen) -> bool {
        let last = self.shard.is_last;
        if last != o.downstream.is_empty() {
            let m = format!(
                "stage {} {} the last, but the sequence names {} later stages",
                self.shard.range,
                if last { "is" } else { "is not" },
                o.downstream.len()
            );
            self.error(Some(o.seq), ErrorClass::InvalidRequest, "bad_route", m)
                .await;
            return true;
        }
        let sampling = if last {
            let s = &o.sampling;
            let d = SamplingParams::default();
            Some((
                SamplingParams {
                    temperature: s.temperature.unwrap_or(d.temperature),
                    top_k: s.top_k.unwrap_or(d.top_k),
                    top_p: s.top_p.unwrap_or(d.top_p),
                    min_p: s.min_p.unwrap_or(d.min_p),
                    repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
                    frequency_penalty: s.frequency_penalty.unwrap_or(d.frequency_penalty),
                    presence_penalty: s.presence_penalty.unwrap_or(d.presence_penalty),
                    seed: s.seed.unwrap_or(d.seed),
                    ..d
                },
                o.sampled,
            ))
        } else {
            None
        };
        if let Some((params, _)) = &sampling
            && let Err(e) = params.validate()
        {
            self.error(
                Some(o.seq),
                ErrorClass::InvalidRequest,
                "invalid_sampling",
                e.to_string(),
            )
            .await;
            return true;
        }
        let plan = o
            .stage
            .as_ref()
            .map(|h| h.checkpoint.clone())
            .unwrap_or_default();
        let checkpoint = self.checkpoint_sink(&o, &plan);
        self.shard.send(Job::Open {
            link: self.link,
            seq: o.seq,
            sampling,
            checkpoint,
        });
        self.opened.insert(o.seq);
        let restored = self.restore(&o, &plan).await;
        let mut restorable = o.restorable.clone();
        restorable.truncate(restored as usize);
        if !o.restorable.is_empty() && (last || restored == 0) {
            // The head waits for this: every stage after this one restores nothing more.
            let answer = StepResult {
                step: 0,
                outputs: vec![SeqOutput::Restored {
                    seq: o.seq,
                    positions: restored,
                }],
            };
            if !self.up.send(Frame::StepResult(answer)).await {
                return false;
            }
        }
        if !last {
            if self.down.as_ref().is_none_or(|d| d.closed.is_cancelled()) {
                let hop = &o.downstream[0];
                let (model, sha) = (&self.shard.model_id, &self.shard.sha256);
                match Link::open(hop, model, sha, &self.settings, self.preference).await {
                    Ok((link, inbound)) => {
                        let link = Arc::new(link);
                        tokio::spawn(relay_results(inbound, link.closed.clone(), self.up.clone()));
                        self.down = Some(link);
                    }
                    Err(f) => {
                        // The whole link is unusable for this route: tell the head and end.
                        self.up
                            .send(Frame::Error(StageFault { seq: None, ..f }))
                            .await;
                        return false;
                    }
                }
            }
            let fwd = SequenceOpen {
                stage: Some(Box::new(o.downstream[0].clone())),
                downstream: o.downstream[1..].to_vec(),
                restorable,
                ..o
            };
            if let Some(d) = &self.down
                && !d.send(Frame::SequenceOpen(fwd)).await
            {
                return false;
            }
        }
        true
    }

    /// Starts pushing the sequence's checkpoints when its hop asks for them; the sink for the
    /// compute thread. A hop that names no holder (none was ready) gets one later from the
    /// gateway (`Node.RetargetCheckpoint`), as does one whose holder dies.
    fn checkpoint_sink(
        &mut self,
        o: &SequenceOpen,
        plan: &shoal_pipeline::HopCheckpoint,
    ) -> Option<CheckpointSink> {
        if plan.every == 0 {
            return None;
        }
        let peer = plan.peer.clone().filter(|p| p.node != self.core.node_id);
        let (sink, task, done) = Pusher {
            request_id: o.request.clone(),
            model: self.shard.model_id.clone(),
            model_sha256: self.shard.sha256.clone(),
            every: plan.every,
            peer,
            links: self.settings.clone(),
            counters: self.core.checkpoint_counters.clone(),
            retargets: self.core.checkpoint_targets.clone(),
        }
        .start();
        tokio::spawn(task);
        self.pushers.insert(o.seq, done);
        Some(sink)
    }

    /// Imports this stage's checkpoint of a resumed sequence, as far as the stages before it
    /// restored (`restorable`); returns the positions imported.
    async fn restore(&self, o: &SequenceOpen, plan: &shoal_pipeline::HopCheckpoint) -> u32 {
        let Some(holder) = plan.restore.as_ref() else {
            return 0;
        };
        if o.restorable.is_empty() {
            return 0;
        }
        let Some(snap) = checkpoint::restore(
            &self.core,
            &self.settings,
            holder,
            o.request.as_str(),
            Some(self.shard.range),
            &self.shard.sha256,
        )
        .await
        else {
            return 0;
        };
        let (reply, rx) = oneshot::channel();
        let sent = self.shard.send(Job::Import {
            link: self.link,
            seq: o.seq,
            snap: Box::new(snap),
            tokens: o.restorable.clone(),
            reply,
        });
        if !sent {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    async fn step(&mut self, step: Step) -> bool {
        if let Err(p) = step.check() {
            self.error(None, ErrorClass::InvalidRequest, "bad_step", p.to_string())
                .await;
            return false;
        }
        if step.hidden.width != self.shard.hidden {
            let m = format!(
                "the step's rows are {} wide; this model's hidden size is {}",
                step.hidden.width, self.shard.hidden
            );
            self.error(None, ErrorClass::InvalidRequest, "bad_width", m)
                .await;
            return false;
        }
        let mut hidden = Vec::new();
        if let Err(e) = step.hidden.decode(&mut hidden) {
            self.error(
                None,
                ErrorClass::InvalidRequest,
                "bad_activations",
                e.to_string(),
            )
            .await;
            return false;
        }
        let (reply, rx) = oneshot::channel();
        let slices = step.seqs;
        if !self.shard.send(Job::Step {
            link: self.link,
            slices: slices.clone(),
            hidden,
            reply,
        }) {
            self.error(
                None,
                ErrorClass::Unavailable,
                "shutting_down",
                "the stage is stopping".into(),
            )
            .await;
            return false;
        }
        let out = match rx.await {
            Ok(Ok(out)) => out,
            Ok(Err(f)) => {
                let link_wide = f.seq.is_none();
                self.up.send(Frame::Error(f)).await;
                return !link_wide;
            }
            Err(_) => {
                self.error(
                    None,
                    ErrorClass::Unavailable,
                    "shutting_down",
                    "the stage stopped".into(),
                )
                .await;
                return false;
            }
        };
        match out {
            StageOut::Tokens(tokens) => {
                let result = StepResult {
                    step: step.step,
                    outputs: tokens
                        .into_iter()
                        .map(|(seq, token)| SeqOutput::Token { seq, token })
                        .collect(),
                };
                self.up.send(Frame::StepResult(result)).await
            }
            StageOut::Hidden(h) => {
                let Some(d) = &self.down else {
                    self.error(
                        None,
                        ErrorClass::Internal,
                        "no_downstream",
                        "no link to the next stage".into(),
                    )
                    .await;
                    return false;
                };
                let hidden = match Activations::encode(d.codec, d.width, &h) {
                    Ok(a) => a,
                    Err(e) => {
                        self.error(None, ErrorClass::Internal, "encode_failed", e.to_string())
                            .await;
                        return false;
                    }
                };
                d.send(Frame::Step(Step {
                    step: step.step,
                    seqs: slices,
                    hidden,
                    sent_unix_micros: 0,
                }))
                .await
            }
        }
    }
}

/// Relays a middle stage's downstream results (and errors) to its upstream.
async fn relay_results(
    mut inbound: Streaming<v1::StageFrame>,
    closed: CancellationToken,
    up: Upstream,
) {
    loop {
        let msg = tokio::select! {
            () = closed.cancelled() => return,
            m = inbound.message() => m,
        };
        match msg {
            Ok(Some(frame)) => {
                up.metrics.frame_received(Peer::Next, &frame);
                if !up.send(frame).await {
                    break;
                }
            }
            Ok(None) | Err(_) => {
                let why = match msg {
                    Err(s) => s.message().to_owned(),
                    _ => "the next stage ended the link".to_owned(),
                };
                let f = Frame::Error(fault(None, ErrorClass::Unavailable, "stage_lost", why));
                up.send(f).await;
                break;
            }
        }
    }
    closed.cancel();
}
