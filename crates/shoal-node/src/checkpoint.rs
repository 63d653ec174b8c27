//! KV-cache checkpoints between agents, so a long generation that loses its node resumes on
//! another without recomputing its whole context.
//!
//! - **Origin**: a generation sent with a [`CheckpointPlan`] gets a [`CheckpointSink`] in its
//!   engine request; each snapshot the engine offers (the KV positions gathered since the
//!   last one) is sent by a [`Pusher`] task to the peer over `Node.PushCheckpoint`, in chunks
//!   of at most [`CHUNK_BYTES`]. When the generation finishes normally the peer is told to
//!   drop what it holds; when it is cut short the checkpoint stays for the failover. The
//!   gateway may name a new peer while the generation runs (`Node.RetargetCheckpoint`, through
//!   [`Retargets`]): its holder died, or there was none to name at the start. Checkpoints
//!   then start again from position 0 on the new peer.
//! - **Holder**: a [`CheckpointStore`] keeps the checkpoints peers push, each the
//!   concatenation of its pushes, within a byte budget (least recently used ones go first)
//!   and for a time to live.
//! - **Resume**: a generation resumed with a `restore` source takes the checkpoint from its
//!   own store or fetches it from the holder (`Node.FetchCheckpoint`, bounded by
//!   [`FETCH_TIMEOUT`]); the engine imports the part that matches the generation's tokens.
//!   Anything that goes wrong costs only the saving: the generation is prefilled as without
//!   a checkpoint.

use crate::core::NodeCore;
use crate::stage::LinkSettings;
use shoal_engine::CheckpointSink;
use shoal_model::KvSnapshot;
use shoal_net::{ConnectOptions, Role};
use shoal_pipeline::wire::range_to_wire;
use shoal_proto::v1;
use shoal_types::{LayerRange, ModelId, RequestId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Largest checkpoint chunk on the wire (well under gRPC's 4 MiB message limit).
pub(crate) const CHUNK_BYTES: usize = 1 << 20;
/// Bound on fetching a checkpoint before a resumed generation starts without it.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one push of a checkpoint (its snapshot's chunks).
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Snapshots waiting for the pusher; when it is behind, the engine gathers more per snapshot.
const SINK_BUFFER: usize = 2;
/// Longest request id a checkpoint is stored under.
const MAX_REQUEST_ID: usize = 256;
/// Widest `kv_dim` accepted from the wire (KV heads times head size).
const MAX_KV_DIM: u32 = 1 << 16;

/// Where a generation checkpoints its KV cache (from the wire's `CheckpointPlan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPlan {
    /// Positions gathered before each checkpoint.
    pub every: u32,
    /// The peer that stores it; `None` until the gateway names one.
    pub peer: Option<CheckpointSource>,
}

/// A node holding (or to hold) a generation's checkpoint: from the wire's `CheckpointSource`,
/// the peer of a `CheckpointPlan`, or a pipeline hop's holder.
pub type CheckpointSource = shoal_pipeline::NodeAddr;

impl CheckpointPlan {
    /// The plan a wire request carries, if a usable one.
    pub(crate) fn from_wire(p: Option<v1::CheckpointPlan>) -> Option<Self> {
        let p = p?;
        (p.every > 0).then(|| Self {
            every: p.every,
            peer: CheckpointSource::from_parts(p.peer_node, p.peer_addr),
        })
    }
}

/// The checkpoint source a wire request carries, if a usable one.
pub(crate) fn source_from_wire(s: Option<v1::CheckpointSource>) -> Option<CheckpointSource> {
    let s = s?;
    CheckpointSource::from_parts(s.node, s.addr)
}

/// Counters of the checkpoint traffic of one node.
#[derive(Debug, Default)]
pub struct CheckpointCounters {
    /// KV positions this node pushed to peers.
    pub pushed_tokens: AtomicU64,
    /// Bytes of entries this node pushed to peers.
    pub pushed_bytes: AtomicU64,
    /// Pushes that failed (the generation's next push starts again from position 0, after
    /// a pause).
    pub push_failures: AtomicU64,
    /// Generations whose checkpoints the gateway sent to a new holder.
    pub retargets: AtomicU64,
    /// KV positions peers pushed to this node.
    pub stored_tokens: AtomicU64,
    /// Checkpoints taken up by a resumed generation here (from this node's store or a peer).
    pub restores: AtomicU64,
    /// Resumed generations whose checkpoint could not be had.
    pub restore_misses: AtomicU64,
}

/// Why a checkpoint was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The chunk is malformed or does not continue what is stored.
    #[error("{0}")]
    Invalid(String),
    /// It does not fit the store's budget.
    #[error("the checkpoint store is full ({budget} bytes)")]
    Full {
        /// The budget.
        budget: usize,
    },
}

struct Stored {
    model_sha256: String,
    snap: KvSnapshot,
    touched: Instant,
}

/// What a checkpoint is stored under: the request id and the layers it covers (a whole
/// model's, or one pipeline stage's: a holder may keep several stages of one generation).
type Key = (String, LayerRange);

/// The checkpoints peers pushed to this node, by request id and layer range.
pub(crate) struct CheckpointStore {
    entries: Mutex<HashMap<Key, Stored>>,
    budget: usize,
    ttl: Duration,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("budget", &self.budget)
            .field("ttl", &self.ttl)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl CheckpointStore {
    /// A store holding at most `budget` bytes of entries, each for `ttl` after its last use.
    pub fn new(budget: usize, ttl: Duration) -> Self {
        Self {
            entries: Mutex::default(),
            budget,
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Stored>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key of the fresh checkpoint of `request_id` over `layers` (any range when `None`)
    /// made with `model_sha256`.
    fn find(
        &self,
        entries: &HashMap<Key, Stored>,
        request_id: &str,
        layers: Option<LayerRange>,
        model_sha256: &str,
        now: Instant,
    ) -> Option<Key> {
        entries
            .iter()
            .find(|((id, l), s)| {
                id == request_id
                    && layers.is_none_or(|want| want == *l)
                    && s.model_sha256 == model_sha256
                    && now.duration_since(s.touched) < self.ttl
            })
            .map(|(k, _)| k.clone())
    }

    /// Bytes of entries held.
    pub fn bytes(&self) -> usize {
        self.lock().values().map(|s| s.snap.bytes()).sum()
    }

    /// Checkpoints held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Adds `chunk` to the checkpoint of `request_id` over the chunk's layers: a chunk at
    /// position 0 starts it over, any other must continue it. Returns the positions now held.
    pub fn append(
        &self,
        request_id: &str,
        model_sha256: &str,
        chunk: KvSnapshot,
    ) -> Result<usize, StoreError> {
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, s| now.duration_since(s.touched) < self.ttl);
        // A chunk inside what is stored (a generation that pushes again from position 0 to
        // a holder that has its checkpoint): where its tokens are the stored ones, so are
        // their keys and values, and only what it adds beyond is kept. A re-push cut short
        // then leaves the longer checkpoint whole. When any token differs, what is stored
        // from the chunk's start on is replaced.
        let mut chunk = chunk;
        let key: Key = (request_id.to_owned(), chunk.layers);
        match entries.get_mut(&key) {
            Some(s)
                if s.model_sha256 == model_sha256
                    && s.snap.layers == chunk.layers
                    && s.snap.kv_dim == chunk.kv_dim
                    && chunk.start as usize <= s.snap.len() =>
            {
                let from = chunk.start as usize;
                let overlap = (s.snap.len() - from).min(chunk.len());
                if chunk.tokens[..overlap] == s.snap.tokens[from..from + overlap] {
                    if overlap == chunk.len() {
                        s.touched = now;
                        return Ok(s.snap.len());
                    }
                    chunk = chunk.slice(overlap, chunk.len() - overlap);
                } else {
                    s.snap.truncate(from);
                }
            }
            _ if chunk.start == 0 => {
                entries.remove(&key);
            }
            _ => {}
        }
        let add = chunk.bytes();
        match entries.get(&key) {
            None if chunk.start != 0 => {
                return Err(StoreError::Invalid(format!(
                    "no checkpoint of {request_id} to continue at position {}",
                    chunk.start
                )));
            }
            Some(s) if s.model_sha256 != model_sha256 => {
                return Err(StoreError::Invalid(format!(
                    "the checkpoint of {request_id} is of another model version"
                )));
            }
            _ => {}
        }
        // Room: the least recently used other checkpoints go first.
        let mut held: usize = entries.values().map(|s| s.snap.bytes()).sum();
        while held + add > self.budget {
            let victim = entries
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, s)| s.touched)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                return Err(StoreError::Full {
                    budget: self.budget,
                });
            };
            if let Some(gone) = entries.remove(&victim) {
                held -= gone.snap.bytes();
                tracing::debug!(request = %victim.0, layers = %victim.1, "checkpoint evicted for room");
            }
        }
        let entry = match entries.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Stored {
                model_sha256: model_sha256.to_owned(),
                snap: KvSnapshot::empty(chunk.layers, chunk.kv_dim, 0),
                touched: now,
            }),
        };
        entry
            .snap
            .append(chunk)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        entry.touched = now;
        Ok(entry.snap.len())
    }

    /// A copy of the checkpoint of `request_id` over `layers` (any range when `None`) made
    /// with the model file `model_sha256`.
    pub fn get(
        &self,
        request_id: &str,
        layers: Option<LayerRange>,
        model_sha256: &str,
    ) -> Option<KvSnapshot> {
        let now = Instant::now();
        let mut entries = self.lock();
        let key = self.find(&entries, request_id, layers, model_sha256, now)?;
        let s = entries.get_mut(&key)?;
        s.touched = now;
        Some(s.snap.clone())
    }

    /// Takes the checkpoint of `request_id` over `layers` (any range when `None`) out of the
    /// store (a generation resuming here needs it once; its new checkpoints go to another
    /// peer).
    pub fn take(
        &self,
        request_id: &str,
        layers: Option<LayerRange>,
        model_sha256: &str,
    ) -> Option<KvSnapshot> {
        let now = Instant::now();
        let mut entries = self.lock();
        let key = self.find(&entries, request_id, layers, model_sha256, now)?;
        entries.remove(&key).map(|s| s.snap)
    }

    /// Forgets the checkpoint of `request_id` over `layers` (every one of the request's when
    /// `None`).
    pub fn remove(&self, request_id: &str, layers: Option<LayerRange>) -> bool {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|(id, l), _| id != request_id || layers.is_some_and(|want| want != *l));
        entries.len() < before
    }
}

/// Positions per wire chunk of `snap`: as many as fit in [`CHUNK_BYTES`], at least one.
pub(crate) fn chunk_positions(snap: &KvSnapshot) -> usize {
    let per_position = (snap.bytes() / snap.len().max(1)).max(1);
    (CHUNK_BYTES / per_position).max(1)
}

/// Positions `[from, from + n)` of `snap` (relative to its start) as a wire chunk.
pub(crate) fn chunk_at(
    request_id: &str,
    model: &ModelId,
    model_sha256: &str,
    snap: &KvSnapshot,
    from: usize,
    n: usize,
) -> v1::KvChunk {
    let part = snap.slice(from, n);
    v1::KvChunk {
        request_id: request_id.to_owned(),
        model_id: model.as_str().to_owned(),
        model_sha256: model_sha256.to_owned(),
        layers: Some(range_to_wire(part.layers)),
        kv_dim: part.kv_dim as u32,
        start: part.start,
        kv: part.kv_bytes(),
        tokens: part.tokens,
    }
}

/// `snap` as wire chunks of at most [`CHUNK_BYTES`] each.
pub(crate) fn to_chunks(
    request_id: &str,
    model: &ModelId,
    model_sha256: &str,
    snap: &KvSnapshot,
) -> Vec<v1::KvChunk> {
    let step = chunk_positions(snap);
    (0..snap.len())
        .step_by(step)
        .map(|from| chunk_at(request_id, model, model_sha256, snap, from, step))
        .collect()
}

/// A wire chunk as a snapshot, checked.
pub(crate) fn from_chunk(c: &v1::KvChunk) -> Result<KvSnapshot, StoreError> {
    let bad = |m: String| StoreError::Invalid(m);
    if c.request_id.is_empty() || c.request_id.len() > MAX_REQUEST_ID {
        return Err(bad(format!(
            "a checkpoint needs a request id of 1 to {MAX_REQUEST_ID} bytes"
        )));
    }
    if c.kv_dim == 0 || c.kv_dim > MAX_KV_DIM {
        return Err(bad(format!("kv_dim {} is out of range", c.kv_dim)));
    }
    let layers = c
        .layers
        .ok_or_else(|| bad("a checkpoint chunk needs its layer range".into()))
        .and_then(|r| LayerRange::new(r.start, r.end).map_err(|e| bad(e.to_string())))?;
    KvSnapshot::from_kv_bytes(layers, c.kv_dim as usize, c.start, c.tokens.clone(), &c.kv)
        .map_err(|e| bad(e.to_string()))
}

/// The layer range a fetch or a drop names (`None`: any); an invalid one is refused.
pub(crate) fn range_from_wire(
    layers: Option<v1::LayerRange>,
) -> Result<Option<LayerRange>, tonic::Status> {
    layers
        .map(|r| {
            LayerRange::new(r.start, r.end)
                .map_err(|e| tonic::Status::invalid_argument(format!("layers: {e}")))
        })
        .transpose()
}

fn node_client(settings: &LinkSettings, addr: &str) -> Result<shoal_net::ShoalNodeClient, String> {
    let opts = ConnectOptions {
        expect_role: Some(Role::Agent),
        ..ConnectOptions::default()
    };
    let channel =
        shoal_net::connect_lazy(addr, &settings.mode(), opts).map_err(|e| e.to_string())?;
    Ok(shoal_net::node_client(channel, PUSH_TIMEOUT))
}

/// The running generations that checkpoint from this node, so the gateway can name a new
/// holder for one (`Node.RetargetCheckpoint`).
#[derive(Debug, Default)]
pub(crate) struct Retargets {
    next: AtomicU64,
    live: Mutex<HashMap<String, Registered>>,
}

/// A registered generation: its registration's key, and where its holder is sent.
type Registered = (u64, watch::Sender<Option<CheckpointSource>>);

impl Retargets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a generation; it stays registered while the [`Registration`] lives. A later
    /// generation of the same request id (resumed here again) takes the name over.
    fn register(
        self: &Arc<Self>,
        request_id: &str,
        peer: Option<CheckpointSource>,
    ) -> (watch::Receiver<Option<CheckpointSource>>, Registration) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(peer);
        self.lock().insert(request_id.to_owned(), (key, tx));
        let reg = Registration {
            owner: self.clone(),
            request_id: request_id.to_owned(),
            key,
        };
        (rx, reg)
    }

    /// Sends the checkpoints of `request_id` to `holder` from now on; false when no such
    /// generation checkpoints here.
    pub fn retarget(&self, request_id: &str, holder: CheckpointSource) -> bool {
        match self.lock().get(request_id) {
            Some((_, tx)) => tx.send(Some(holder)).is_ok(),
            None => false,
        }
    }

    /// Generations registered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Keeps a generation in [`Retargets`] while it lives.
struct Registration {
    owner: Arc<Retargets>,
    request_id: String,
    key: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = self.owner.lock();
        if live
            .get(&self.request_id)
            .is_some_and(|(k, _)| *k == self.key)
        {
            live.remove(&self.request_id);
        }
    }
}

/// Sends one generation's checkpoints to its holder, which the gateway may change while it
/// runs. A new holder, or a push that fails, restarts the checkpoint from position 0 (the
/// engine's next snapshot holds the whole cache); after a failure the same holder is tried
/// again after a pause that doubles up to [`RETRY_MAX`] (a holder that restarted has an empty
/// store; one that died is replaced by the gateway once the membership declares it dead).
pub(crate) struct Pusher {
    pub request_id: RequestId,
    pub model: ModelId,
    pub model_sha256: String,
    pub every: u32,
    pub peer: Option<CheckpointSource>,
    pub links: LinkSettings,
    pub counters: Arc<CheckpointCounters>,
    /// Where the gateway can name it a new holder.
    pub retargets: Arc<Retargets>,
}

/// First pause after a failed push.
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest pause between pushes to a failing holder.
const RETRY_MAX: Duration = Duration::from_secs(8);

/// A holder and the link to it.
struct Holder {
    peer: CheckpointSource,
    client: shoal_net::ShoalNodeClient,
}

impl Holder {
    fn connect(links: &LinkSettings, peer: Option<CheckpointSource>) -> Option<Self> {
        let peer = peer?;
        match node_client(links, &peer.addr) {
            Ok(client) => Some(Self { peer, client }),
            Err(e) => {
                tracing::warn!(peer = %peer.node, error = %e, "no checkpoint link");
                None
            }
        }
    }
}

impl Pusher {
    /// The engine's sink, the task that drains it (spawn it), and the sender that tells the
    /// task how the generation ended (`true`: finished, so the peer may drop the checkpoint).
    pub fn start(
        self,
    ) -> (
        CheckpointSink,
        impl std::future::Future<Output = ()> + Send + 'static,
        oneshot::Sender<bool>,
    ) {
        let (tx, rx) = mpsc::channel(SINK_BUFFER);
        let (done_tx, done_rx) = oneshot::channel();
        let sink = CheckpointSink::new(self.every, tx);
        let restarts = sink.restarts.clone();
        let (target, registration) = self
            .retargets
            .register(self.request_id.as_str(), self.peer.clone());
        let task = async move {
            let _registration = registration;
            self.run(rx, done_rx, target, restarts).await;
        };
        (sink, task, done_tx)
    }

    async fn run(
        self,
        mut rx: mpsc::Receiver<KvSnapshot>,
        mut done: oneshot::Receiver<bool>,
        mut target: watch::Receiver<Option<CheckpointSource>>,
        restarts: Arc<AtomicU32>,
    ) {
        let id = self.request_id.as_str();
        let mut holder = Holder::connect(&self.links, target.borrow_and_update().clone());
        // After a restart, snapshots made before the engine saw it are skipped until one
        // from position 0 comes.
        let mut from_zero = false;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut pause = RETRY_FIRST;
        let mut sink_open = true;
        let mut targets_open = true;
        let mut layers = None;
        let finished = loop {
            let ready = holder.is_some() && sink_open && retry_at.is_none();
            let snap = tokio::select! {
                d = &mut done => break d == Ok(true),
                changed = target.changed(), if targets_open => {
                    if changed.is_err() {
                        targets_open = false;
                        continue;
                    }
                    let next = target.borrow_and_update().clone();
                    tracing::info!(
                        request = %id,
                        peer = ?next.as_ref().map(|p| p.node.as_str()),
                        "checkpoints go to a new holder, from position 0"
                    );
                    self.counters.retargets.fetch_add(1, Ordering::Relaxed);
                    holder = Holder::connect(&self.links, next);
                    restarts.fetch_add(1, Ordering::AcqRel);
                    from_zero = true;
                    retry_at = None;
                    pause = RETRY_FIRST;
                    continue;
                }
                () = crate::sleep_until_some(retry_at) => {
                    retry_at = None;
                    continue;
                }
                snap = rx.recv(), if ready => match snap {
                    Some(snap) => snap,
                    None => {
                        sink_open = false;
                        continue;
                    }
                },
            };
            if from_zero && snap.start != 0 {
                continue;
            }
            from_zero = false;
            layers = Some(snap.layers);
            let Some(h) = holder.as_mut() else { continue };
            let (tokens, bytes) = (snap.len() as u64, snap.bytes() as u64);
            let chunks = to_chunks(id, &self.model, &self.model_sha256, &snap);
            drop(snap);
            let push = h.client.push_checkpoint(futures::stream::iter(chunks));
            // A push to a holder that went silent is abandoned when the gateway names
            // another (the change is seen at the top of the loop).
            let outcome = tokio::select! {
                r = tokio::time::timeout(PUSH_TIMEOUT, push) => Some(r),
                _ = target.changed(), if targets_open => {
                    target.mark_changed();
                    None
                }
            };
            match outcome {
                None => {}
                Some(Ok(Ok(_))) => {
                    pause = RETRY_FIRST;
                    self.counters
                        .pushed_tokens
                        .fetch_add(tokens, Ordering::Relaxed);
                    self.counters
                        .pushed_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                }
                Some(failed) => {
                    let why = match failed {
                        Ok(Err(status)) => status.message().to_owned(),
                        _ => format!("no answer within {PUSH_TIMEOUT:?}"),
                    };
                    // The holder now misses a piece: later pieces could not continue it.
                    tracing::warn!(
                        request = %id,
                        peer = %h.peer.node,
                        error = %why,
                        retry_in = ?pause,
                        "checkpoint push failed; starting over from position 0 after a pause"
                    );
                    self.counters.push_failures.fetch_add(1, Ordering::Relaxed);
                    restarts.fetch_add(1, Ordering::AcqRel);
                    from_zero = true;
                    retry_at = Some(tokio::time::Instant::now() + pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        };
        if finished && let Some(h) = holder.as_mut() {
            let req = v1::DropCheckpointRequest {
                request_id: id.to_owned(),
                layers: layers.map(range_to_wire),
            };
            let _ = tokio::time::timeout(FETCH_TIMEOUT, h.client.drop_checkpoint(req)).await;
        }
    }
}

/// The checkpoint of `request_id` over `layers` (any range when `None`) made with the model
/// file `model_sha256` for a generation (or a pipeline stage of one) resuming on this node:
/// from this node's own store when it is the `source`, else fetched from it. `None` (the
/// positions are computed again) when there is none to be had.
pub(crate) async fn restore(
    core: &NodeCore,
    links: &LinkSettings,
    source: &CheckpointSource,
    request_id: &str,
    layers: Option<LayerRange>,
    model_sha256: &str,
) -> Option<KvSnapshot> {
    let counters = &core.checkpoint_counters;
    let got = if source.node == core.node_id {
        core.checkpoints
            .take(request_id, layers, model_sha256)
            .ok_or_else(|| "not in this node's store".to_owned())
    } else {
        fetch(links, &source.addr, request_id, layers, model_sha256).await
    };
    match got {
        Ok(snap) => {
            counters.restores.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                request = %request_id,
                holder = %source.node,
                layers = %snap.layers,
                positions = snap.len(),
                "resuming from a checkpoint"
            );
            Some(snap)
        }
        Err(why) => {
            counters.restore_misses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                request = %request_id,
                holder = %source.node,
                error = %why,
                "no checkpoint to resume from; computing everything"
            );
            None
        }
    }
}

/// The checkpoint of `request_id` over `layers` (any range when `None`) from the holder
/// at `addr`, or why not.
pub(crate) async fn fetch(
    links: &LinkSettings,
    addr: &str,
    request_id: &str,
    layers: Option<LayerRange>,
    model_sha256: &str,
) -> Result<KvSnapshot, String> {
    let mut client = node_client(links, addr)?;
    let call = async {
        let req = v1::FetchCheckpointRequest {
            request_id: request_id.to_owned(),
            model_sha256: model_sha256.to_owned(),
            layers: layers.map(range_to_wire),
        };
        let mut stream = client
            .fetch_checkpoint(req)
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let mut snap: Option<KvSnapshot> = None;
        while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_owned())? {
            if chunk.request_id != request_id || chunk.model_sha256 != model_sha256 {
                return Err("the holder sent another checkpoint".to_owned());
            }
            let part = from_chunk(&chunk).map_err(|e| e.to_string())?;
            if layers.is_some_and(|want| want != part.layers) {
                return Err(format!(
                    "the holder sent a checkpoint of layers {}",
                    part.layers
                ));
            }
            match &mut snap {
                None if part.start == 0 => snap = Some(part),
                None => return Err("the checkpoint does not start at position 0".to_owned()),
                Some(s) => s.append(part).map_err(|e| e.to_string())?,
            }
        }
        snap.ok_or_else(|| "the holder sent no entries".to_owned())
    };
    tokio::time::timeout(FETCH_TIMEOUT, call)
        .await
        .map_err(|_| format!("no checkpoint within {FETCH_TIMEOUT:?}"))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use half::f16;

    fn snap(start: u32, n: usize, seed: u16) -> KvSnapshot {
        let layers = LayerRange::new(0, 2).unwrap();
        let kv_dim = 4;
        let vals = |off: u16| {
            (0..n * kv_dim)
                .map(|i| f16::from_f32(f32::from(seed + off + i as u16)))
                .collect::<Vec<_>>()
        };
        KvSnapshot {
            layers,
            kv_dim,
            start,
            tokens: (0..n as u32).map(|i| start + i).collect(),
            kv: (0..2u16)
                .map(|l| (vals(l * 100), vals(l * 100 + 50)))
                .collect(),
        }
    }

    #[test]
    fn pushes_continue_a_checkpoint_and_a_push_from_zero_keeps_what_matches() {
        let store = CheckpointStore::new(1 << 20, Duration::from_secs(60));
        assert_eq!(store.append("r1", "sha", snap(0, 10, 1)).unwrap(), 10);
        assert_eq!(store.append("r1", "sha", snap(10, 5, 2)).unwrap(), 15);
        // A gap, or another model version, is refused and changes nothing.
        assert!(matches!(
            store.append("r1", "sha", snap(16, 5, 3)),
            Err(StoreError::Invalid(_))
        ));
        assert!(store.append("r1", "other", snap(15, 5, 3)).is_err());
        assert!(store.append("r2", "sha", snap(4, 5, 3)).is_err());
        let got = store.get("r1", None, "sha").unwrap();
        assert_eq!(got.len(), 15);
        assert_eq!(got.slice(10, 5), snap(10, 5, 2));
        assert!(store.get("r1", None, "other").is_none());
        assert!(store.take("r1", None, "other").is_none());
        assert_eq!(store.take("r1", None, "sha"), Some(got));
        assert!(store.get("r1", None, "sha").is_none());
        // A push from zero of the same tokens keeps what is stored and adds what it has
        // beyond; one whose tokens differ replaces it from where it starts.
        store.append("r1", "sha", snap(0, 10, 1)).unwrap();
        assert_eq!(store.append("r1", "sha", snap(0, 3, 9)).unwrap(), 10);
        assert_eq!(store.get("r1", None, "sha").unwrap(), snap(0, 10, 1));
        assert_eq!(store.append("r1", "sha", snap(0, 12, 1)).unwrap(), 12);
        assert_eq!(store.get("r1", None, "sha").unwrap(), snap(0, 12, 1));
        let mut other = snap(0, 4, 5);
        other.tokens[2] += 100;
        assert_eq!(store.append("r1", "sha", other.clone()).unwrap(), 4);
        assert_eq!(store.get("r1", None, "sha").unwrap(), other);
        assert!(store.remove("r1", None));
        assert!(store.get("r1", None, "sha").is_none());
    }

    #[test]
    fn checkpoints_of_one_request_over_other_layers_are_kept_apart() {
        let store = CheckpointStore::new(1 << 20, Duration::from_secs(60));
        let whole = snap(0, 10, 1);
        let mut stage = snap(0, 6, 2);
        stage.layers = LayerRange::new(2, 4).unwrap();
        store.append("r1", "sha", whole.clone()).unwrap();
        // A checkpoint of other layers starts at 0 without touching the first.
        assert_eq!(store.append("r1", "sha", stage.clone()).unwrap(), 6);
        assert_eq!(
            store.get("r1", Some(whole.layers), "sha"),
            Some(whole.clone())
        );
        assert_eq!(
            store.get("r1", Some(stage.layers), "sha"),
            Some(stage.clone())
        );
        assert!(
            store
                .get("r1", Some(LayerRange::new(0, 1).unwrap()), "sha")
                .is_none()
        );
        // Dropping one range keeps the other; dropping the request drops all.
        assert!(store.remove("r1", Some(stage.layers)));
        assert_eq!(store.take("r1", None, "sha"), Some(whole.clone()));
        store.append("r1", "sha", whole).unwrap();
        store.append("r1", "sha", stage).unwrap();
        assert!(store.remove("r1", None));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn the_store_keeps_to_its_budget_dropping_the_least_recently_used() {
        let one = snap(0, 10, 1).bytes();
        let store = CheckpointStore::new(2 * one, Duration::from_secs(60));
        store.append("a", "sha", snap(0, 10, 1)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        store.append("b", "sha", snap(0, 10, 1)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        // Using `a` makes `b` the older one.
        assert!(store.get("a", None, "sha").is_some());
        store.append("c", "sha", snap(0, 10, 1)).unwrap();
        assert!(store.get("b", None, "sha").is_none());
        assert!(store.get("a", None, "sha").is_some() && store.get("c", None, "sha").is_some());
        assert!(store.bytes() <= 2 * one);
        // One checkpoint larger than the whole budget is refused.
        assert!(matches!(
            store.append("d", "sha", snap(0, 30, 1)),
            Err(StoreError::Full { .. })
        ));
    }

    #[test]
    fn a_generation_can_be_retargeted_while_it_is_registered() {
        let retargets = Arc::new(Retargets::default());
        let holder = |n: &str| CheckpointSource {
            node: shoal_types::NodeId::new(n),
            addr: format!("{n}:1"),
        };
        let (mut first, first_reg) = retargets.register("r", None);
        assert!(first.borrow_and_update().is_none());
        assert!(retargets.retarget("r", holder("b")));
        assert!(first.has_changed().unwrap());
        assert_eq!(*first.borrow_and_update(), Some(holder("b")));
        assert!(!retargets.retarget("other", holder("b")));
        // The same request resumed here again takes the name over; the first generation
        // ending does not unregister the second.
        let (second, second_reg) = retargets.register("r", Some(holder("c")));
        drop(first_reg);
        assert_eq!(retargets.len(), 1);
        assert!(retargets.retarget("r", holder("d")));
        assert_eq!(*second.borrow(), Some(holder("d")));
        drop(second_reg);
        assert_eq!(retargets.len(), 0);
        assert!(!retargets.retarget("r", holder("d")));
    }

    #[test]
    fn expired_checkpoints_are_gone() {
        let store = CheckpointStore::new(1 << 20, Duration::from_millis(1));
        store.append("a", "sha", snap(0, 10, 1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(store.get("a", None, "sha").is_none());
        store.append("b", "sha", snap(0, 10, 1)).unwrap();
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn chunks_carry_a_snapshot_whole_and_bad_chunks_are_refused() {
        let s = snap(0, 100, 7);
        let model = ModelId::new("m");
        let per = s.bytes() / s.len();
        let chunks = to_chunks("r", &model, "sha", &s);
        assert_eq!(chunks.len(), 100usize.div_ceil(CHUNK_BYTES / per).max(1));
        let mut back = from_chunk(&chunks[0]).unwrap();
        for c in &chunks[1..] {
            back.append(from_chunk(c).unwrap()).unwrap();
        }
        assert_eq!(back, s);
        // Small chunks split a large snapshot.
        let big = KvSnapshot {
            layers: LayerRange::new(0, 30).unwrap(),
            kv_dim: 192,
            start: 0,
            tokens: vec![1; 300],
            kv: (0..30)
                .map(|_| (vec![f16::ONE; 300 * 192], vec![f16::ONE; 300 * 192]))
                .collect(),
        };
        let chunks = to_chunks("r", &model, "sha", &big);
        assert!(chunks.len() > 1);
        assert!(chunks.iter().all(|c| c.kv.len() <= CHUNK_BYTES));
        let mut bad = chunks[0].clone();
        bad.kv.pop();
        assert!(from_chunk(&bad).is_err());
        let mut bad = chunks[0].clone();
        bad.layers = None;
        assert!(from_chunk(&bad).is_err());
        let mut bad = chunks[0].clone();
        bad.request_id.clear();
        assert!(from_chunk(&bad).is_err());
        let mut bad = chunks[0].clone();
        bad.kv_dim = 0;
        assert!(from_chunk(&bad).is_err());
    }
}
