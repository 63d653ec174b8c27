//! The gateway's backend on the coordinator: each request goes to the replica the router picks,
//! over the agent's `Node.Generate` gRPC stream (mTLS), and the stream's events come back as
//! the gateway's [`GenerateEvent`]s.
//!
//! A request that cannot start on the chosen node (unreachable, refused as unavailable, or
//! failing before its first event) is tried on another replica, up to
//! [`ClusterBackendConfig::max_attempts`] nodes, so a node that died while idle costs the
//! client nothing.
//!
//! Once tokens flow, every request keeps a journal: its prompt as token ids (from the node's
//! `Started`) and the tokens delivered to the client so far. When the node fails in the middle
//! of the generation (the stream breaks, the node reports itself unavailable, it sends nothing
//! for [`ClusterBackendConfig::stall_timeout`], or the membership declares it or another stage
//! of its pipeline dead), the generation continues on another replica with `resume` set to the
//! delivered tokens: the new node prefills prompt + resume, replays them silently through its
//! detokenizer and stop matcher, and samples on from step `len(resume)` with the same seed (the
//! request id seeds sampling when the client gave none, and the id travels unchanged). The
//! client's stream goes on with no token repeated and none missing; with greedy or seeded
//! sampling the output is the one a run without the fault gives.
//!
//! Moves are bounded twice. A move after a leg that lost work (the node computed part of the
//! request, as its `Progress` events say, yet no token came and no later checkpoint holds more
//! of it) counts toward [`ClusterBackendConfig::max_failovers`]: a request that kills every
//! node it reaches stops there. A move after a leg that delivered tokens, or whose work a
//! checkpoint kept, or that only waited in a node's queue, costs the request nothing, and
//! every move counts toward [`ClusterBackendConfig::max_moves`].
//!
//! With [`ClusterBackendConfig::checkpoint_every`] set, each generation on a whole-model
//! replica checkpoints its KV cache to a second ready replica (the least loaded; not a node a
//! generation was just lost on). When its holder dies, or none was ready when it started, the
//! gateway names a new one (`Node.RetargetCheckpoint`), and the checkpoint starts again there.
//! A failover prefers the holder (unless another replica is expected to serve it in half the
//! time) and names it in `restore`, so the new node imports the
//! checkpoint instead of prefilling the context. On a pipeline each stage checkpoints its own
//! layers to a holder of its own (renamed the same way), and on a failover every stage of the
//! new route that runs the same layers as a live holder imports from it (see `stage_hops`).
//!
//! Each silence a move causes the client is measured (its last token, or the request's
//! start, to the next token; the loss noticed to that token; the new node's prefill up to
//! it), reported to the gateway as [`GenerateEvent::Resumed`] for the audit log, and
//! observed in the `shoal_failover_*_seconds` histograms.

use crate::metrics::{
    CHECKPOINT_RESTORED_POSITIONS_TOTAL, CHECKPOINT_RESTORES_TOTAL, FAILOVER_RECOVERY_SECONDS,
    FAILOVER_REPREFILL_SECONDS, FAILOVER_STALL_SECONDS, FAILOVERS_TOTAL, REQUESTS_REBALANCED_TOTAL,
};
use crate::wire;
use futures::StreamExt;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shoal_api::{
    BackendError, BoxFuture, GenerateEvent, GenerateRequest, InferenceBackend, ModelCard,
    Readiness, ResumeStall,
};
use shoal_control::{ClusterView, NodeState, RouteError, RouteGuard, Router};
use shoal_net::{ConnectOptions, Role, ShoalNodeClient, TlsMode};
use shoal_proto::v1;
use shoal_types::{ErrorClass, ModelId, NodeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;
use tonic::transport::Channel;

/// Events buffered per request between the agent's stream and the HTTP response.
const EVENT_BUFFER: usize = 64;
/// Bound on naming a new checkpoint holder to a generation's node.
const RETARGET_TIMEOUT: Duration = Duration::from_secs(2);
/// Least time between two attempts to name a generation a checkpoint holder.
const RETARGET_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two looks for a replica that would serve a queued generation sooner.
const REBALANCE_INTERVAL: Duration = Duration::from_secs(1);
/// Moves of one generation from a queue to a replica expected to serve it sooner, at most:
/// once it has moved, it waits its turn (under churn, replicas come and go faster than a
/// queue drains, and a generation chasing each would lose its place every time).
const MAX_REBALANCES: usize = 1;

/// How the gateway noticed that a node serving a generation was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are written as is
pub enum FailoverCause {
    /// The stream broke or ended without finishing (a closed connection, a killed process).
    stream_broken,
    /// The node reported itself unavailable or failing.
    node_error,
    /// The node sent nothing for the stall timeout.
    stalled,
    /// The membership declared the node, or another stage of its pipeline, dead.
    declared_dead,
}

impl FailoverCause {
    const ALL: [FailoverCause; 4] = [
        FailoverCause::stream_broken,
        FailoverCause::node_error,
        FailoverCause::stalled,
        FailoverCause::declared_dead,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CauseLabels {
    cause: FailoverCause,
}

/// Settings of a [`ClusterBackend`].
#[derive(Debug, Clone)]
pub struct ClusterBackendConfig {
    /// Bound on connecting to an agent (TCP + TLS + HTTP/2).
    pub connect_timeout: Duration,
    /// Bound on the wait for a generation's first event (admission and tokenization on the
    /// agent, not the prefill).
    pub start_timeout: Duration,
    /// The deadline of one whole generation call.
    pub generation_deadline: Duration,
    /// Replicas tried before a request is refused as unavailable.
    pub max_attempts: usize,
    /// A node that sends nothing for this long in the middle of a generation (after its first
    /// token) is taken for lost and the generation moves to another replica. It catches what
    /// the membership cannot: a node that still heartbeats but whose data links went silent
    /// (a node cut off entirely is declared dead when its lease runs out, sooner). It must
    /// outlast a busy node's longest step, such as a prefill chunk of another request on a
    /// slow device, or a slow node loses work it was doing.
    pub stall_timeout: Duration,
    /// The same bound before the first token: a request may wait in the node's queue, and
    /// then for its prefill (whose `Progress` events, one per chunk, restart the count).
    pub first_token_timeout: Duration,
    /// Moves to another replica in the middle of one generation that lost work, at most.
    pub max_failovers: usize,
    /// Moves of one generation at most, whatever they cost.
    pub max_moves: usize,
    /// How long a node a generation was lost on is kept from taking that generation back,
    /// and from holding checkpoints: long enough for the membership to declare it dead (a
    /// lease), after which it serves again only once it has rejoined and loaded its model.
    pub lost_node_exclusion: Duration,
    /// How pipeline links choose their activation codec (f16 by default; `Exact` for
    /// bit-identical hidden states).
    pub pipeline_codec: shoal_pipeline::Preference,
    /// When not 0, a generation checkpoints its KV cache every this many positions (on a
    /// whole-model replica to another ready replica; on a pipeline, each stage its own
    /// layers), and a failover resumes from the checkpoint instead of prefilling the whole
    /// context again.
    pub checkpoint_every: u32,
}

impl Default for ClusterBackendConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            start_timeout: Duration::from_secs(10),
            generation_deadline: Duration::from_secs(600),
            max_attempts: 3,
            stall_timeout: Duration::from_secs(10),
            first_token_timeout: Duration::from_secs(60),
            max_failovers: 3,
            max_moves: 16,
            lost_node_exclusion: Duration::from_secs(5),
            pipeline_codec: shoal_pipeline::Preference::default(),
            checkpoint_every: 0,
        }
    }
}

/// Routes generations to the cluster's agents.
#[derive(Debug)]
pub struct ClusterBackend {
    inner: Arc<Inner>,
    created: u64,
    tasks: TaskTracker,
}

/// What the forwarding tasks share with the backend.
#[derive(Debug)]
struct Inner {
    cfg: ClusterBackendConfig,
    router: Router,
    view: watch::Receiver<Arc<ClusterView>>,
    tls: TlsMode,
    channels: Mutex<HashMap<String, Channel>>,
    failovers: AtomicU64,
    failovers_by_cause: Family<CauseLabels, Counter>,
    /// Failovers resumed from a checkpoint, and the positions they imported.
    restores: Counter,
    restored_positions: Counter,
    /// What failovers cost clients (see [`ResumeStall`]).
    stalls: StallHistograms,
    /// Generations moved from a node's queue to a replica expected to serve them sooner.
    rebalanced: Counter,
    /// Nodes a generation was lost on lately, by when: the membership may still count them
    /// alive for a lease, and they are no place for a checkpoint.
    suspects: Mutex<HashMap<NodeId, tokio::time::Instant>>,
}

impl ClusterBackend {
    /// A backend following the views `view` publishes, dialling agents with `tls`.
    pub fn new(
        view: watch::Receiver<Arc<ClusterView>>,
        tls: TlsMode,
        cfg: ClusterBackendConfig,
    ) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            inner: Arc::new(Inner {
                cfg,
                router: Router::new(view.clone()),
                view,
                tls,
                channels: Mutex::default(),
                failovers: AtomicU64::new(0),
                failovers_by_cause: Family::default(),
                restores: Counter::default(),
                restored_positions: Counter::default(),
                stalls: StallHistograms::default(),
                rebalanced: Counter::default(),
                suspects: Mutex::default(),
            }),
            created,
            tasks: TaskTracker::new(),
        }
    }

    /// The router (its in-flight counts are what the gateway adds to heartbeat loads).
    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    /// Generations moved to another replica in their middle since start.
    pub fn failovers(&self) -> u64 {
        self.inner.failovers.load(Ordering::Relaxed)
    }

    /// Registers the failover counter ([`FAILOVERS_TOTAL`], by [`FailoverCause`]) in
    /// `registry`; every cause is exposed from the start, at zero.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let family = &self.inner.failovers_by_cause;
        for cause in FailoverCause::ALL {
            let _ = family.get_or_create(&CauseLabels { cause });
        }
        registry.register(
            // The client library appends `_total` to counters.
            FAILOVERS_TOTAL
                .strip_suffix("_total")
                .unwrap_or(FAILOVERS_TOTAL),
            "Generations moved to another replica in their middle, by how the loss was noticed",
            family.clone(),
        );
        let base = |name: &'static str| name.strip_suffix("_total").unwrap_or(name);
        registry.register(
            base(CHECKPOINT_RESTORES_TOTAL),
            "Failovers that resumed from a KV checkpoint instead of prefilling the whole context",
            self.inner.restores.clone(),
        );
        registry.register(
            base(CHECKPOINT_RESTORED_POSITIONS_TOTAL),
            "KV positions failovers imported from checkpoints instead of prefilling",
            self.inner.restored_positions.clone(),
        );
        registry.register(
            base(REQUESTS_REBALANCED_TOTAL),
            "Generations moved from a node's queue, before any compute, to a replica expected to serve them in under half the time",
            self.inner.rebalanced.clone(),
        );
        let stalls = &self.inner.stalls;
        registry.register(
            FAILOVER_STALL_SECONDS,
            "Silence a client saw because its generation moved: from its last token (or the request's start) to the next",
            stalls.stall.clone(),
        );
        registry.register(
            FAILOVER_RECOVERY_SECONDS,
            "From a lost node being noticed to the generation's next token on another",
            stalls.recovery.clone(),
        );
        registry.register(
            FAILOVER_REPREFILL_SECONDS,
            "The part of a failover's recovery the new node spent prefilling the generation again",
            stalls.reprefill.clone(),
        );
    }

    /// Generations moved from a node's queue to a replica expected to serve them sooner,
    /// since start.
    pub fn rebalanced(&self) -> u64 {
        self.inner.rebalanced.get()
    }

    /// Failovers resumed from a checkpoint since start, and the positions they imported.
    pub fn restores(&self) -> (u64, u64) {
        (
            self.inner.restores.get(),
            self.inner.restored_positions.get(),
        )
    }

    /// Waits until every forwarding task has ended.
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Inner {
    fn client(&self, addr: &str) -> Result<ShoalNodeClient, BackendError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let opts = ConnectOptions {
                    connect_timeout: self.cfg.connect_timeout,
                    expect_role: Some(Role::Agent),
                    ..ConnectOptions::default()
                };
                let c = shoal_net::connect_lazy(addr, &self.tls, opts).map_err(|e| {
                    BackendError::new(ErrorClass::Internal, "agent_address", e.to_string())
                })?;
                channels.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(shoal_net::node_client(
            channel,
            self.cfg.generation_deadline,
        ))
    }

    /// Starts `req` on a replica of `model` with no node in `failed`, trying up to
    /// `max_attempts` replicas (`target` says which first); nodes that could not start it are
    /// added to `failed`.
    ///
    /// `held` names the live holders of the generation's pipeline-stage checkpoints: a stage
    /// of the new route running the same layers as one of them imports from it.
    async fn start(
        &self,
        model: &ModelId,
        req: &v1::GenerateRequest,
        failed: &mut Vec<NodeId>,
        target: Target<'_>,
        held: &[shoal_control::RouteStage],
        cancel: &CancellationToken,
    ) -> Result<Opened, BackendError> {
        let (prefer, mut reserved) = match target {
            Target::Pick(prefer) => (prefer, None),
            Target::Reserved(route) => (None, Some(route)),
        };
        let mut last_error = None;
        for _ in 0..self.cfg.max_attempts.max(1) {
            let route = match reserved.take() {
                Some(route) => route,
                None => match self.router.pick_preferring(model, failed, prefer) {
                    Ok(r) => r,
                    Err(e) => return Err(last_error.unwrap_or_else(|| route_error(&e))),
                },
            };
            // A whole-model replica checkpoints to another one, when asked to; when none is
            // ready, the relay names one later.
            let checkpoints = self.cfg.checkpoint_every > 0 && !route.is_pipeline();
            let checkpoint = if checkpoints {
                self.checkpoint_peer(model, &route.node, failed)
            } else {
                None
            };
            // A pipeline's head is told the stages after it.
            let routed;
            let mut stage_holders = Vec::new();
            let req = if checkpoints {
                routed = v1::GenerateRequest {
                    checkpoint: Some(v1::CheckpointPlan {
                        every: self.cfg.checkpoint_every,
                        peer_node: checkpoint
                            .as_ref()
                            .map(|p| p.node.as_str().to_owned())
                            .unwrap_or_default(),
                        peer_addr: checkpoint
                            .as_ref()
                            .map(|p| p.data_addr.clone())
                            .unwrap_or_default(),
                    }),
                    ..req.clone()
                };
                &routed
            } else if route.stages.len() > 1 {
                // Each stage checkpoints its layers to a holder of its own, and a resumed
                // one imports what a live holder keeps of them.
                let hops = self.stage_hops(model, &route, failed, held);
                let head = &hops[0].checkpoint;
                let source = |a: &shoal_pipeline::NodeAddr| v1::CheckpointSource {
                    node: a.node.to_string(),
                    addr: a.addr.clone(),
                };
                routed = v1::GenerateRequest {
                    downstream: hops[1..].iter().cloned().map(v1::StageHop::from).collect(),
                    codec: shoal_pipeline::preference_to_wire(self.cfg.pipeline_codec) as i32,
                    checkpoint: (head.every > 0).then(|| v1::CheckpointPlan {
                        every: head.every,
                        peer_node: head
                            .peer
                            .as_ref()
                            .map(|p| source(p).node)
                            .unwrap_or_default(),
                        peer_addr: head
                            .peer
                            .as_ref()
                            .map(|p| p.addr.clone())
                            .unwrap_or_default(),
                    }),
                    restore: head.restore.as_ref().map(source),
                    ..req.clone()
                };
                stage_holders = hops
                    .iter()
                    .filter_map(|h| {
                        let p = h.checkpoint.peer.as_ref()?;
                        Some(shoal_control::RouteStage {
                            node: p.node.clone(),
                            data_addr: p.addr.clone(),
                            layers: h.layers,
                        })
                    })
                    .collect();
                &routed
            } else {
                req
            };
            let opened = tokio::select! {
                () = cancel.cancelled() => {
                    return Err(BackendError::new(
                        ErrorClass::Cancelled,
                        "cancelled",
                        "the request was cancelled before it started",
                    ));
                }
                r = self.open(&route, req) => r,
            };
            match opened {
                Ok((stream, started)) => {
                    tracing::debug!(
                        request = %req.request_id,
                        node = %route.node,
                        resumed = req.resume.len(),
                        "generation started"
                    );
                    return Ok(Opened {
                        route,
                        stream,
                        started,
                        checkpoint,
                        stage_holders,
                    });
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => {
                    tracing::warn!(
                        request = %req.request_id,
                        node = %route.node,
                        error = %e,
                        "generation could not start on this node; trying another replica"
                    );
                    failed.push(route.node.clone());
                    self.suspect(&route.node);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            BackendError::new(
                ErrorClass::Unavailable,
                "no_ready_replica",
                "no replica could take the request",
            )
        }))
    }

    /// Opens the generation on one replica and waits for its `Started` event.
    async fn open(
        &self,
        route: &RouteGuard,
        req: &v1::GenerateRequest,
    ) -> Result<(Streaming<v1::GenerateEvent>, v1::Started), Attempt> {
        let mut client = self.client(&route.data_addr).map_err(Attempt::Fatal)?;
        let call = async {
            let mut stream = client
                .generate(shoal_net::with_deadline(
                    req.clone(),
                    self.cfg.generation_deadline,
                ))
                .await
                .map_err(|s| Attempt::from_status(&s))?
                .into_inner();
            match stream.next().await {
                Some(Ok(v1::GenerateEvent {
                    event: Some(v1::generate_event::Event::Started(started)),
                })) => Ok((stream, started)),
                Some(Ok(v1::GenerateEvent {
                    event: Some(v1::generate_event::Event::Error(e)),
                })) => Err(Attempt::from_wire_error(&e)),
                Some(Ok(other)) => Err(Attempt::Fatal(BackendError::new(
                    ErrorClass::Internal,
                    "protocol_violation",
                    format!("the node's first event was not Started: {other:?}"),
                ))),
                Some(Err(s)) => Err(Attempt::from_status(&s)),
                None => Err(Attempt::Retry(BackendError::new(
                    ErrorClass::Unavailable,
                    "stream_closed",
                    "the node closed the generation before it started",
                ))),
            }
        };
        // A node cut off while the call waits for its first event holds the call open; the
        // membership declaring it (or a later stage) dead ends the wait.
        let mut view = self.view.clone();
        let declared_dead = async {
            loop {
                if view.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if let Some(dead) = route.stages.iter().find(|s| !self.alive(&s.node)) {
                    return dead.node.clone();
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(self.cfg.start_timeout, call) => match r {
                Ok(r) => r,
                Err(_) => Err(Attempt::Retry(BackendError::new(
                    ErrorClass::Unavailable,
                    "start_timeout",
                    format!(
                        "node {} did not start the generation within {:?}",
                        route.node, self.cfg.start_timeout
                    ),
                ))),
            },
            dead = declared_dead => Err(Attempt::Retry(BackendError::new(
                ErrorClass::Unavailable,
                "node_lost",
                format!("node {dead} was declared dead before the generation started"),
            ))),
        }
    }

    /// Every stage of the pipeline `route`, the head included, as a hop with its checkpoint
    /// plan: when checkpoints are on, a holder for each stage's layers (see
    /// [`Router::stage_checkpoint_peer`]; never a node in `exclude` or just lost on), and
    /// the holder in `held` of the same layers to restore from.
    fn stage_hops(
        &self,
        model: &ModelId,
        route: &RouteGuard,
        exclude: &[NodeId],
        held: &[shoal_control::RouteStage],
    ) -> Vec<shoal_pipeline::StageHop> {
        let addr = |h: &shoal_control::RouteStage| shoal_pipeline::NodeAddr {
            node: h.node.clone(),
            addr: h.data_addr.clone(),
        };
        route
            .stages
            .iter()
            .map(|s| {
                let mut hop =
                    shoal_pipeline::StageHop::new(s.node.clone(), s.data_addr.clone(), s.layers);
                if self.cfg.checkpoint_every > 0 {
                    hop.checkpoint = shoal_pipeline::HopCheckpoint {
                        every: self.cfg.checkpoint_every,
                        peer: self.holder_for(model, route, s, exclude).as_ref().map(addr),
                        restore: held.iter().find(|h| h.layers == s.layers).map(addr),
                    };
                }
                hop
            })
            .collect()
    }

    /// The node to hold the checkpoints of `stage` of `route` (a whole model's one stage, or
    /// a pipeline's, see [`Router::stage_checkpoint_peer`]): not the stage's node, nor one in
    /// `exclude`, nor one a generation was just lost on.
    fn holder_for(
        &self,
        model: &ModelId,
        route: &RouteGuard,
        stage: &shoal_control::RouteStage,
        exclude: &[NodeId],
    ) -> Option<shoal_control::RouteStage> {
        if !route.is_pipeline() {
            return self.checkpoint_peer(model, &stage.node, exclude);
        }
        let on_route: Vec<NodeId> = route.stages.iter().map(|s| s.node.clone()).collect();
        let mut exclude = exclude.to_vec();
        exclude.push(stage.node.clone());
        exclude.extend(self.suspects());
        self.router
            .stage_checkpoint_peer(model, stage.layers, &on_route, &exclude)
    }

    /// The ready replica of `model` to hold the checkpoints of a generation running on
    /// `node`: not `node`, nor one in `exclude`, nor one a generation was just lost on.
    fn checkpoint_peer(
        &self,
        model: &ModelId,
        node: &NodeId,
        exclude: &[NodeId],
    ) -> Option<shoal_control::RouteStage> {
        let mut exclude = exclude.to_vec();
        exclude.push(node.clone());
        exclude.extend(self.suspects());
        self.router.checkpoint_peer(model, &exclude)
    }

    /// Tells the node at `addr` to send the checkpoints of `request_id` to `peer` from now
    /// on; `peer` once it agreed.
    async fn retarget(
        self: Arc<Self>,
        addr: String,
        request_id: String,
        peer: shoal_control::RouteStage,
    ) -> Option<shoal_control::RouteStage> {
        let mut client = self.client(&addr).ok()?;
        let req = v1::RetargetCheckpointRequest {
            request_id: request_id.clone(),
            plan: Some(v1::CheckpointPlan {
                every: self.cfg.checkpoint_every,
                peer_node: peer.node.as_str().to_owned(),
                peer_addr: peer.data_addr.clone(),
            }),
        };
        let call = client.retarget_checkpoint(shoal_net::with_deadline(req, RETARGET_TIMEOUT));
        match tokio::time::timeout(RETARGET_TIMEOUT, call).await {
            Ok(Ok(_)) => {
                tracing::info!(request = %request_id, peer = %peer.node, "checkpoint holder named");
                Some(peer)
            }
            Ok(Err(status)) => {
                tracing::debug!(
                    request = %request_id,
                    error = %status.message(),
                    "the node named no new checkpoint holder"
                );
                None
            }
            Err(_) => None,
        }
    }

    /// Nodes a generation was lost on within the last lease: the membership may not have
    /// declared them dead yet.
    fn suspects(&self) -> Vec<NodeId> {
        let now = tokio::time::Instant::now();
        let mut suspects = self
            .suspects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        suspects.retain(|_, at| now.duration_since(*at) < self.cfg.lost_node_exclusion);
        suspects.keys().cloned().collect()
    }

    fn suspect(&self, node: &NodeId) {
        self.suspects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(node.clone(), tokio::time::Instant::now());
    }

    /// Whether `holder` may have lost what it held since it was named: the membership does
    /// not count it alive, a generation was just lost on it, or it came back at another
    /// address (a restart: its store is empty).
    fn holder_gone(&self, holder: &shoal_control::RouteStage) -> bool {
        let restarted = self
            .view
            .borrow()
            .nodes
            .get(&holder.node)
            .is_none_or(|n| n.data_addr != holder.data_addr);
        restarted || !self.alive(&holder.node) || self.is_suspect(&holder.node)
    }

    /// Whether a generation was lost on `node` within the last
    /// [`ClusterBackendConfig::lost_node_exclusion`].
    fn is_suspect(&self, node: &NodeId) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(node)
            .is_some_and(|at| at.elapsed() < self.cfg.lost_node_exclusion)
    }

    /// Whether the membership still counts `node` alive. A draining node is: it finishes
    /// the generations it has.
    fn alive(&self, node: &NodeId) -> bool {
        self.view
            .borrow()
            .nodes
            .get(node)
            .is_some_and(|n| matches!(n.state, NodeState::Alive | NodeState::Draining))
    }
}

/// The failover histograms: 50 ms to about 100 s.
#[derive(Debug, Clone)]
struct StallHistograms {
    stall: Histogram,
    recovery: Histogram,
    reprefill: Histogram,
}

impl Default for StallHistograms {
    fn default() -> Self {
        let buckets = || Histogram::new(exponential_buckets(0.05, 2.0, 12));
        Self {
            stall: buckets(),
            recovery: buckets(),
            reprefill: buckets(),
        }
    }
}

impl StallHistograms {
    fn observe(&self, s: &ResumeStall) {
        self.stall.observe(s.stall.as_secs_f64());
        self.recovery.observe(s.recovery.as_secs_f64());
        self.reprefill.observe(s.reprefill.as_secs_f64());
    }
}

/// Which replica a generation is started on first.
enum Target<'a> {
    /// The router's choice, favouring the whole-model replica on this node (the holder of the
    /// generation's checkpoint) when given.
    Pick(Option<&'a NodeId>),
    /// A replica already chosen and counted in flight (a queued generation moving to it).
    Reserved(RouteGuard),
}

/// A generation running on one replica.
struct Opened {
    /// Holding it keeps the request counted as in flight on its node.
    route: RouteGuard,
    stream: Streaming<v1::GenerateEvent>,
    started: v1::Started,
    /// The node keeping this leg's checkpoints, if any.
    checkpoint: Option<shoal_control::RouteStage>,
    /// (A pipeline.) The nodes keeping this leg's stages' checkpoints, each with the layers
    /// it keeps.
    stage_holders: Vec<shoal_control::RouteStage>,
}

/// The outcome of one failed attempt to start a generation.
enum Attempt {
    /// Another replica may succeed.
    Retry(BackendError),
    /// The request itself is at fault (or the error is not about the node): no retry.
    Fatal(BackendError),
}

impl Attempt {
    fn from_status(s: &tonic::Status) -> Self {
        let err = wire::status_error(s);
        Self::classify(err)
    }

    fn from_wire_error(e: &v1::Error) -> Self {
        Self::classify(wire::event_error(e))
    }

    fn classify(err: BackendError) -> Self {
        match err.class {
            ErrorClass::Unavailable | ErrorClass::DeadlineExceeded | ErrorClass::Internal => {
                Attempt::Retry(err)
            }
            _ => Attempt::Fatal(err),
        }
    }
}

fn route_error(e: &RouteError) -> BackendError {
    BackendError::new(e.class(), e.reason(), e.to_string())
}

impl InferenceBackend for ClusterBackend {
    fn models(&self) -> Vec<ModelCard> {
        let view = Arc::clone(&self.inner.view.borrow());
        view.models
            .values()
            .map(|m| ModelCard {
                id: m.id.clone(),
                owned_by: "shoal".into(),
                created: self.created,
                context_length: m.context_length,
            })
            .collect()
    }

    fn readiness(&self) -> Readiness {
        let view = Arc::clone(&self.inner.view.borrow());
        if view.models.is_empty() {
            return Readiness::NotReady {
                reason: "no_models".into(),
            };
        }
        // A model is ready when one replica (a whole model, or every stage of a pipeline)
        // is alive and loaded.
        let ready = view.models.iter().all(|(model, spec)| {
            view.plan.chains(model).iter().any(|chain| {
                chain.is_complete(spec.n_layers)
                    && chain.stages.iter().all(|a| {
                        view.nodes.get(&a.node).is_some_and(|n| {
                            n.state == NodeState::Alive && n.is_ready(model, a.layers)
                        })
                    })
            })
        });
        if ready {
            Readiness::Ready
        } else {
            Readiness::NotReady {
                reason: "no_ready_replica".into(),
            }
        }
    }

    fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<mpsc::Receiver<GenerateEvent>, BackendError>> {
        Box::pin(async move {
            let wire_req = wire::generate_request(&req);
            let accepted = tokio::time::Instant::now();
            let mut failed: Vec<NodeId> = Vec::new();
            let opened = self
                .inner
                .start(
                    &req.model,
                    &wire_req,
                    &mut failed,
                    Target::Pick(None),
                    &[],
                    &cancel,
                )
                .await?;
            let (tx, rx) = mpsc::channel(EVENT_BUFFER);
            let until = Some(tokio::time::Instant::now() + self.inner.cfg.lost_node_exclusion);
            let relay = Relay {
                inner: self.inner.clone(),
                model: req.model.clone(),
                request: wire_req,
                excluded: failed.into_iter().map(|n| (n, until)).collect(),
                prompt_ids: opened.started.prompt_ids.clone(),
                delivered: Vec::new(),
                moves: 0,
                rebalances: 0,
                charged: 0,
                best_restored: 0,
                computed: false,
                holder: None,
                stage_holders: Vec::new(),
                last_token: accepted,
                silence: None,
                tx,
                cancel,
            };
            self.tasks.spawn(relay.run(opened));
            Ok(rx)
        })
    }
}

/// How one replica's stream ended.
enum Leg {
    /// The generation ended (finished, failed for a reason another node would share, or the
    /// client went away): nothing more to do.
    Done,
    /// The node failed in the middle: continue elsewhere.
    Lost(BackendError, FailoverCause, LegWork),
    /// The generation was still waiting in the node's queue, and another replica (this one,
    /// counted in flight already) is expected to serve it much sooner: start it there
    /// (nothing is lost).
    Queued(RouteGuard),
}

/// What one replica did for a generation before it was lost.
#[derive(Debug, Default, Clone, Copy)]
struct LegWork {
    /// It computed part of the request (a `Progress` event or a token came).
    computed: bool,
    /// Tokens it delivered.
    tokens: usize,
}

/// One generation's journal and the task that copies its events from the node to the gateway,
/// moving it to another replica when its node fails.
struct Relay {
    inner: Arc<Inner>,
    model: ModelId,
    /// The request as first sent.
    request: v1::GenerateRequest,
    /// Nodes this request was lost on or could not start on, each with when it may be tried
    /// again: a node that broke or was declared dead is back in service only once the
    /// membership counts it alive and ready again (a restart), so a few seconds are enough;
    /// one that went silent while still heartbeating (`None`) is not tried again.
    excluded: Vec<(NodeId, Option<tokio::time::Instant>)>,
    /// The prompt as the first node tokenized it.
    prompt_ids: Vec<u32>,
    /// Tokens the client has been sent, in order.
    delivered: Vec<u32>,
    /// Moves to another replica so far.
    moves: usize,
    /// Of them, moves of a generation still waiting in a node's queue to a replica expected
    /// to serve it sooner (not failovers).
    rebalances: usize,
    /// Moves after legs that lost work (see the module's documentation).
    charged: usize,
    /// The most KV positions a resumed leg imported from a checkpoint.
    best_restored: u32,
    /// Whether a lost leg computed part of the request. Until one did, no checkpoint of the
    /// generation can exist: a move from a queue names no holder to restore from.
    computed: bool,
    /// The node holding the latest checkpoint of the generation's KV cache, if any.
    holder: Option<shoal_control::RouteStage>,
    /// (Pipelines.) The nodes holding checkpoints of the generation's stages, each with the
    /// layers it holds.
    stage_holders: Vec<shoal_control::RouteStage>,
    /// When the client got its last token (the request's start until the first).
    last_token: tokio::time::Instant,
    /// Since the client's last token: when the first loss was noticed, and the moves made.
    silence: Option<(tokio::time::Instant, u32)>,
    tx: mpsc::Sender<GenerateEvent>,
    cancel: CancellationToken,
}

impl Relay {
    async fn run(mut self, first: Opened) {
        let prompt_tokens = first.started.prompt_ids.len() as u32;
        if self
            .tx
            .send(GenerateEvent::Started { prompt_tokens })
            .await
            .is_err()
        {
            return;
        }
        let mut opened = first;
        // Every node that served part of the generation, for the audit log.
        let mut path: Vec<String> = Vec::new();
        loop {
            let node = opened.route.node.clone();
            path.extend(opened.route.stages.iter().map(|s| s.node.to_string()));
            match &opened.checkpoint {
                Some(peer) => self.holder = Some(peer.clone()),
                // A leg running on the holder of the last checkpoint makes it useless for
                // the next failover (it would go down with the leg).
                None if self.holder.as_ref().is_some_and(|h| h.node == node) => {
                    self.holder = None;
                }
                // Otherwise an older checkpoint still holds a prefix of this generation.
                None => {}
            }
            // A stage's holder on the new route took its checkpoint (or goes down with the
            // route); the holders this leg named replace those of the same layers.
            self.stage_holders
                .retain(|h| !opened.route.stages.iter().any(|s| s.node == h.node));
            for named in &opened.stage_holders {
                self.stage_holders.retain(|h| h.layers != named.layers);
                self.stage_holders.push(named.clone());
            }
            let event = GenerateEvent::Path {
                nodes: path.clone(),
                failovers: u32::try_from(self.moves - self.rebalances).unwrap_or(u32::MAX),
            };
            if self.tx.send(event).await.is_err() {
                return;
            }
            let (err, cause, work) = match self.leg(opened, prompt_tokens).await {
                Leg::Done => return,
                Leg::Lost(err, cause, work) => (err, cause, work),
                Leg::Queued(to) => match self.rebalance(&node, to).await {
                    Some(next) => {
                        opened = next;
                        continue;
                    }
                    None => return,
                },
            };
            let noticed = tokio::time::Instant::now();
            let exclusion = self.inner.cfg.lost_node_exclusion;
            let until = match cause {
                FailoverCause::stalled => None,
                _ => Some(tokio::time::Instant::now() + exclusion),
            };
            self.excluded.push((node.clone(), until));
            if cause != FailoverCause::declared_dead {
                self.inner.suspect(&node);
            }
            // The node computed part of the request and no token came of it: unless the next
            // leg finds a checkpoint holding more than before, that work is lost.
            let wasted = work.computed && work.tokens == 0;
            if wasted {
                self.charged += 1;
            }
            self.computed |= work.computed;
            let mut exclude = self.exclusions();
            let resumed = self.resumed_request(&exclude);
            let holder = resumed
                .restore
                .as_ref()
                .map(|r| NodeId::new(r.node.clone()));
            let held: Vec<shoal_control::RouteStage> = self
                .stage_holders
                .iter()
                .filter(|h| {
                    self.computed && !exclude.contains(&h.node) && !self.inner.holder_gone(h)
                })
                .cloned()
                .collect();
            // A move that lost work may find it in a checkpoint: then the cap is checked once
            // the next node says what it restored.
            let may_restore = wasted && (holder.is_some() || !held.is_empty());
            if (self.charged > self.inner.cfg.max_failovers && !may_restore)
                || self.moves >= self.inner.cfg.max_moves
            {
                self.give_up(err).await;
                return;
            }
            self.moves += 1;
            let (_, moves) = self.silence.get_or_insert((noticed, 0));
            *moves += 1;
            tracing::warn!(
                request = %self.request.request_id,
                %node,
                delivered = self.delivered.len(),
                error = %err,
                "node lost in the middle of a generation; resuming on another replica"
            );
            let tried = exclude.len();
            let started = self
                .inner
                .start(
                    &self.model,
                    &resumed,
                    &mut exclude,
                    Target::Pick(holder.as_ref()),
                    &held,
                    &self.cancel,
                )
                .await;
            let until = Some(tokio::time::Instant::now() + exclusion);
            self.excluded
                .extend(exclude.drain(tried..).map(|n| (n, until)));
            match started {
                Ok(next) => {
                    let restored = next.started.restored_positions;
                    if wasted && restored > self.best_restored {
                        // A checkpoint kept the lost leg's work.
                        self.charged -= 1;
                    }
                    self.best_restored = self.best_restored.max(restored);
                    if self.charged > self.inner.cfg.max_failovers {
                        // Dropping the new leg cancels it.
                        self.give_up(err).await;
                        return;
                    }
                    self.inner.failovers.fetch_add(1, Ordering::Relaxed);
                    if restored > 0 {
                        self.inner.restores.inc();
                        self.inner.restored_positions.inc_by(u64::from(restored));
                    }
                    self.inner
                        .failovers_by_cause
                        .get_or_create(&CauseLabels { cause })
                        .inc();
                    tracing::info!(
                        request = %self.request.request_id,
                        from = %node,
                        to = %next.route.node,
                        restored = next.started.restored_positions,
                        queued_only = !work.computed,
                        tokens = work.tokens,
                        "generation resumed"
                    );
                    opened = next;
                }
                Err(e) => {
                    let e = if e.class == ErrorClass::Cancelled {
                        return;
                    } else {
                        BackendError::new(
                            ErrorClass::Unavailable,
                            "node_lost",
                            format!(
                                "node {node} failed during the generation and no other replica could continue it: {}",
                                e.message
                            ),
                        )
                    };
                    let _ = self.tx.send(GenerateEvent::Failed(e)).await;
                    return;
                }
            }
        }
    }

    /// Starts the generation, which was still waiting in `from`'s queue, on `to`, a replica
    /// expected to serve it sooner (or another, or back on `from`, when `to` cannot take it
    /// after all). `None` when the generation ended (cancelled, or failed: the client was
    /// told).
    async fn rebalance(&mut self, from: &NodeId, to: RouteGuard) -> Option<Opened> {
        self.moves += 1;
        self.rebalances += 1;
        self.inner.rebalanced.inc();
        tracing::info!(
            request = %self.request.request_id,
            %from,
            to = %to.node,
            "generation still queued; moving it to a replica expected to serve it sooner"
        );
        let mut exclude = self.exclusions();
        let req = self.resumed_request(&exclude);
        exclude.push(from.clone());
        let target = Target::Reserved(to);
        let mut started = self
            .inner
            .start(&self.model, &req, &mut exclude, target, &[], &self.cancel)
            .await;
        if started
            .as_ref()
            .is_err_and(|e| e.class != ErrorClass::Cancelled)
        {
            let mut exclude = self.exclusions();
            let target = Target::Pick(None);
            started = self
                .inner
                .start(&self.model, &req, &mut exclude, target, &[], &self.cancel)
                .await;
        }
        match started {
            Ok(next) => Some(next),
            Err(e) if e.class == ErrorClass::Cancelled => None,
            Err(e) => {
                let _ = self.tx.send(GenerateEvent::Failed(e)).await;
                None
            }
        }
    }

    /// Ends the generation with `err`: it moved too often.
    async fn give_up(&self, err: BackendError) {
        tracing::warn!(
            request = %self.request.request_id,
            moves = self.moves,
            lost_work = self.charged,
            "generation failed: too many moves"
        );
        let _ = self.tx.send(GenerateEvent::Failed(err)).await;
    }

    /// The nodes not to try now.
    fn exclusions(&mut self) -> Vec<NodeId> {
        let now = tokio::time::Instant::now();
        self.excluded
            .retain(|(_, until)| until.is_none_or(|until| now < until));
        self.excluded.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The request that continues this generation on another node: the prompt as token ids,
    /// the tokens delivered so far, and where its checkpoint is when a lost leg computed part
    /// of the request and the holder is alive and not in `exclude`.
    fn resumed_request(&self, exclude: &[NodeId]) -> v1::GenerateRequest {
        let restore = self
            .holder
            .as_ref()
            .filter(|h| self.computed && !exclude.contains(&h.node) && !self.inner.holder_gone(h))
            .map(|h| v1::CheckpointSource {
                node: h.node.as_str().to_owned(),
                addr: h.data_addr.clone(),
            });
        v1::GenerateRequest {
            prompt: Some(v1::generate_request::Prompt::Tokens(v1::TokenPrompt {
                ids: self.prompt_ids.clone(),
            })),
            resume: self.delivered.clone(),
            restore,
            ..self.request.clone()
        }
    }

    /// `peer` now holds the checkpoints of its layers of the generation (on a whole model,
    /// all of them) from a stage of `route`.
    fn holder_named(&mut self, route: &RouteGuard, peer: shoal_control::RouteStage) {
        if route.is_pipeline() {
            self.stage_holders.retain(|h| h.layers != peer.layers);
            self.stage_holders.push(peer);
        } else {
            self.holder = Some(peer);
        }
    }

    /// `gone` may have lost the checkpoints it held: no failover restores from it.
    fn forget_holder(&mut self, gone: &shoal_control::RouteStage) {
        if self.holder.as_ref().is_some_and(|h| h.node == gone.node) {
            self.holder = None;
        }
        self.stage_holders
            .retain(|h| !(h.node == gone.node && h.layers == gone.layers));
    }

    /// What the moves since the client's last token cost it, now that a token came at `now`
    /// from a node that began prefilling at `prefill_began`; `None` when nothing moved.
    fn resumed_stall(
        &mut self,
        now: tokio::time::Instant,
        prefill_began: Option<tokio::time::Instant>,
    ) -> Option<ResumeStall> {
        let (noticed, moves) = self.silence.take()?;
        Some(ResumeStall {
            moves,
            stall: now.saturating_duration_since(self.last_token),
            recovery: now.saturating_duration_since(noticed),
            // A node that sent no `Progress` (an older agent) is taken to have prefilled
            // nothing: the whole recovery is then counted as overhead.
            reprefill: prefill_began.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
        })
    }

    /// Copies the events of one replica's stream until the generation ends or the node is
    /// lost.
    async fn leg(&mut self, opened: Opened, prompt_tokens: u32) -> Leg {
        let Opened {
            route,
            mut stream,
            checkpoint,
            stage_holders,
            ..
        } = opened;
        let node = route.node.clone();
        let mut work = LegWork::default();
        let lost = |cause: FailoverCause, why: String, work: LegWork| {
            Leg::Lost(
                BackendError::new(
                    ErrorClass::Unavailable,
                    "node_lost",
                    format!("node {node} failed during the generation: {why}"),
                ),
                cause,
                work,
            )
        };
        // Where this leg's checkpoints go, by stage of the route (a whole model is one stage),
        // renamed when a holder dies or a stage has none.
        let checkpoints = self.inner.cfg.checkpoint_every > 0;
        let mut leg_holders: Vec<Option<shoal_control::RouteStage>> = if route.is_pipeline() {
            route
                .stages
                .iter()
                .map(|s| stage_holders.iter().find(|h| h.layers == s.layers).cloned())
                .collect()
        } else {
            vec![checkpoint]
        };
        let mut naming: futures::stream::FuturesUnordered<
            BoxFuture<'static, (usize, Option<shoal_control::RouteStage>)>,
        > = futures::stream::FuturesUnordered::new();
        let mut next_naming = vec![tokio::time::Instant::now(); leg_holders.len()];
        let mut being_named = vec![false; leg_holders.len()];
        let mut view = self.inner.view.clone();
        let mut last_id = self.delivered.last().copied().unwrap_or(0);
        // Until this node's first token it may be prefilling (the prompt and, after a
        // failover, the resumed tokens): a longer silence is allowed.
        let mut got_token = false;
        // The silence is counted from the node's last event: views changing meanwhile (every
        // heartbeat of every node changes one) must not restart it. It is counted from when
        // that event was passed on, not when it came: a client slow to read holds the relay
        // (and, through flow control, the node) without the node being silent.
        let mut last_event = tokio::time::Instant::now();
        // When this node began prefilling the generation (its first `Progress`).
        let mut prefill_began = None;
        // Not before the node's load shows in a heartbeat or two.
        let mut next_rebalance = tokio::time::Instant::now() + REBALANCE_INTERVAL;
        loop {
            let quiet = if got_token {
                self.inner.cfg.stall_timeout
            } else {
                self.inner.cfg.first_token_timeout
            };
            let next = tokio::select! {
                // Dropping the stream cancels the call; the node frees the sequence.
                () = self.cancel.cancelled() => return Leg::Done,
                () = self.tx.closed() => return Leg::Done,
                Some((stage, named)) = naming.next(), if !naming.is_empty() => {
                    being_named[stage] = false;
                    if let Some(peer) = named {
                        self.holder_named(&route, peer.clone());
                        leg_holders[stage] = Some(peer);
                    }
                    continue;
                }
                changed = view.changed() => {
                    // A pipeline is lost with any of its stages: a later one cut off from the
                    // network leaves the head alive and waiting.
                    let dead = route.stages.iter().find(|s| !self.inner.alive(&s.node));
                    if changed.is_ok() && let Some(dead) = dead {
                        let why = if dead.node == node {
                            "the membership declared it dead".to_owned()
                        } else {
                            format!("the membership declared its pipeline stage {} dead", dead.node)
                        };
                        return lost(FailoverCause::declared_dead, why, work);
                    }
                    let now = tokio::time::Instant::now();
                    // A generation still waiting in this node's queue moves (once) to a
                    // replica expected to serve it in under half the time (one that just
                    // became ready, or much less loaded): it loses nothing.
                    if !work.computed
                        && !route.is_pipeline()
                        && now >= next_rebalance
                        && self.rebalances < MAX_REBALANCES
                        && self.moves < self.inner.cfg.max_moves
                    {
                        next_rebalance = now + REBALANCE_INTERVAL;
                        let exclude = self.exclusions();
                        let sooner = self.inner.router.pick_sooner(&self.model, &node, &exclude);
                        if let Some(to) = sooner {
                            return Leg::Queued(to);
                        }
                    }
                    for (i, stage) in route.stages.iter().enumerate() {
                        // A holder that died or restarted since it was named holds nothing
                        // (its store went with it), even once it is back.
                        if let Some(h) = leg_holders[i].take_if(|h| self.inner.holder_gone(h)) {
                            self.forget_holder(&h);
                        }
                        // A stage whose checkpoints go nowhere (its holder is gone, or none
                        // was ready when it started) is given a holder.
                        if !checkpoints
                            || leg_holders[i].is_some()
                            || being_named[i]
                            || now < next_naming[i]
                        {
                            continue;
                        }
                        next_naming[i] = now + RETARGET_INTERVAL;
                        let exclude = self.exclusions();
                        let Some(peer) = self.inner.holder_for(&self.model, &route, stage, &exclude)
                        else {
                            continue;
                        };
                        being_named[i] = true;
                        let call = self.inner.clone().retarget(
                            stage.data_addr.clone(),
                            self.request.request_id.clone(),
                            peer,
                        );
                        naming.push(Box::pin(async move { (i, call.await) }));
                    }
                    continue;
                }
                () = tokio::time::sleep_until(last_event + quiet) => {
                    return lost(
                        FailoverCause::stalled,
                        format!("nothing received for {quiet:?}"),
                        work,
                    );
                }
                next = stream.next() => next,
            };
            let arrived = tokio::time::Instant::now();
            let event = match next {
                Some(Ok(v1::GenerateEvent { event: Some(e) })) => e,
                Some(Ok(v1::GenerateEvent { event: None })) => {
                    last_event = arrived;
                    continue;
                }
                Some(Err(status)) => {
                    let err = wire::status_error(&status);
                    if is_node_failure(err.class) {
                        return lost(FailoverCause::stream_broken, err.message, work);
                    }
                    let _ = self.tx.send(GenerateEvent::Failed(err)).await;
                    return Leg::Done;
                }
                None => {
                    return lost(
                        FailoverCause::stream_broken,
                        "the stream ended without finishing".into(),
                        work,
                    );
                }
            };
            match event {
                v1::generate_event::Event::Started(_) => {}
                v1::generate_event::Event::Progress(_) => {
                    work.computed = true;
                    prefill_began.get_or_insert(arrived);
                }
                v1::generate_event::Event::Token(t) => {
                    if let Some(stall) = self.resumed_stall(arrived, prefill_began) {
                        self.inner.stalls.observe(&stall);
                        if self.tx.send(GenerateEvent::Resumed(stall)).await.is_err() {
                            return Leg::Done;
                        }
                    }
                    self.last_token = arrived;
                    last_id = t.id;
                    got_token = true;
                    work.computed = true;
                    work.tokens += 1;
                    let ev = GenerateEvent::Token {
                        text: t.text,
                        token_id: t.id,
                    };
                    if self.tx.send(ev).await.is_err() {
                        return Leg::Done;
                    }
                    self.delivered.push(t.id);
                }
                v1::generate_event::Event::Finished(f) => {
                    // Text held back until the end belongs to the last token.
                    if !f.tail.is_empty() {
                        let tail = GenerateEvent::Token {
                            text: f.tail.clone(),
                            token_id: last_id,
                        };
                        if self.tx.send(tail).await.is_err() {
                            return Leg::Done;
                        }
                    }
                    let _ = self.tx.send(wire::finished(&f, prompt_tokens)).await;
                    return Leg::Done;
                }
                v1::generate_event::Event::Error(e) => {
                    let err = wire::event_error(&e);
                    if is_node_failure(err.class) {
                        return lost(FailoverCause::node_error, err.message, work);
                    }
                    let _ = self.tx.send(GenerateEvent::Failed(err)).await;
                    return Leg::Done;
                }
            }
            last_event = tokio::time::Instant::now();
        }
    }
}

/// Whether an error in the middle of a stream is the node's failure (another replica can
/// continue) rather than the request's.
fn is_node_failure(class: ErrorClass) -> bool {
    matches!(class, ErrorClass::Unavailable | ErrorClass::Internal)
}
