//! The gateway's backend on the coordinator: each request goes to the replica the router picks,
//! over the agent's `Node.Generate` gRPC stream (mTLS), and the stream's events come back as
//! the gateway's [`GenerateEvent`]s.
//!
//! A request that cannot start on the chosen node (unreachable, refused as unavailable, or
//! failing before its first event) is tried on another replica, up to
//! [`ClusterBackendConfig::max_attempts`] nodes, so a node that died while idle costs the
//! client nothing. Once tokens flow, a broken stream is reported as a failure of class
//! `unavailable`.

use crate::wire;
use futures::StreamExt;
use shoal_api::{
    BackendError, BoxFuture, GenerateEvent, GenerateRequest, InferenceBackend, ModelCard, Readiness,
};
use shoal_control::{ClusterView, NodeState, RouteError, RouteGuard, Router};
use shoal_net::{ConnectOptions, Role, ShoalNodeClient, TlsMode};
use shoal_proto::v1;
use shoal_types::{ErrorClass, NodeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;
use tonic::transport::Channel;

/// Events buffered per request between the agent's stream and the HTTP response.
const EVENT_BUFFER: usize = 64;

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
}

impl Default for ClusterBackendConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            start_timeout: Duration::from_secs(10),
            generation_deadline: Duration::from_secs(600),
            max_attempts: 3,
        }
    }
}

/// Routes generations to the cluster's agents.
#[derive(Debug)]
pub struct ClusterBackend {
    cfg: ClusterBackendConfig,
    router: Router,
    view: watch::Receiver<Arc<ClusterView>>,
    tls: TlsMode,
    channels: Mutex<HashMap<String, Channel>>,
    created: u64,
    tasks: TaskTracker,
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
            cfg,
            router: Router::new(view.clone()),
            view,
            tls,
            channels: Mutex::default(),
            created,
            tasks: TaskTracker::new(),
        }
    }

    /// The router (its in-flight counts are what the gateway adds to heartbeat loads).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Waits until every forwarding task has ended.
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

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
        match tokio::time::timeout(self.cfg.start_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Attempt::Retry(BackendError::new(
                ErrorClass::Unavailable,
                "start_timeout",
                format!(
                    "node {} did not start the generation within {:?}",
                    route.node, self.cfg.start_timeout
                ),
            ))),
        }
    }
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
        let view = Arc::clone(&self.view.borrow());
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
        let view = Arc::clone(&self.view.borrow());
        if view.models.is_empty() {
            return Readiness::NotReady {
                reason: "no_models".into(),
            };
        }
        let ready = view.models.keys().all(|model| {
            view.plan.for_model(model).any(|a| {
                view.nodes
                    .get(&a.node)
                    .is_some_and(|n| n.state == NodeState::Alive && n.is_ready(model, a.layers))
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
            let mut failed: Vec<NodeId> = Vec::new();
            let mut last_error = None;
            for _ in 0..self.cfg.max_attempts.max(1) {
                let route = match self.router.pick_excluding(&req.model, &failed) {
                    Ok(r) => r,
                    Err(e) => return Err(last_error.unwrap_or_else(|| route_error(&e))),
                };
                let opened = tokio::select! {
                    () = cancel.cancelled() => {
                        return Err(BackendError::new(
                            ErrorClass::Cancelled,
                            "cancelled",
                            "the request was cancelled before it started",
                        ));
                    }
                    r = self.open(&route, &wire_req) => r,
                };
                match opened {
                    Ok((stream, started)) => {
                        tracing::debug!(
                            request = %req.request_id,
                            node = %route.node,
                            "generation started"
                        );
                        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
                        let prompt_tokens = started.prompt_ids.len() as u32;
                        self.tasks
                            .spawn(forward(route, stream, prompt_tokens, tx, cancel));
                        return Ok(rx);
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
        })
    }
}

/// Copies one generation's events from the node to the gateway. Holding `route` keeps the
/// request counted as in flight on its node until the generation ends.
async fn forward(
    route: RouteGuard,
    mut stream: Streaming<v1::GenerateEvent>,
    prompt_tokens: u32,
    tx: mpsc::Sender<GenerateEvent>,
    cancel: CancellationToken,
) {
    if tx
        .send(GenerateEvent::Started { prompt_tokens })
        .await
        .is_err()
    {
        return;
    }
    let mut last_id = 0;
    loop {
        let next = tokio::select! {
            // Dropping the stream cancels the call; the node frees the sequence.
            () = cancel.cancelled() => break,
            () = tx.closed() => break,
            next = stream.next() => next,
        };
        let event = match next {
            Some(Ok(v1::GenerateEvent { event: Some(e) })) => e,
            Some(Ok(v1::GenerateEvent { event: None })) => continue,
            Some(Err(status)) => {
                let mut err = wire::status_error(&status);
                if err.class == ErrorClass::Internal || err.class == ErrorClass::Unavailable {
                    err = BackendError::new(
                        ErrorClass::Unavailable,
                        "node_lost",
                        format!(
                            "node {} failed during the generation: {}",
                            route.node, err.message
                        ),
                    );
                }
                let _ = tx.send(GenerateEvent::Failed(err)).await;
                break;
            }
            None => {
                let _ = tx
                    .send(GenerateEvent::Failed(BackendError::new(
                        ErrorClass::Unavailable,
                        "node_lost",
                        format!("node {} ended the stream without finishing", route.node),
                    )))
                    .await;
                break;
            }
        };
        match event {
            v1::generate_event::Event::Started(_) => {}
            v1::generate_event::Event::Token(t) => {
                last_id = t.id;
                let ev = GenerateEvent::Token {
                    text: t.text,
                    token_id: t.id,
                };
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
            v1::generate_event::Event::Finished(f) => {
                // Text held back until the end belongs to the last token.
                if !f.tail.is_empty() {
                    let tail = GenerateEvent::Token {
                        text: f.tail.clone(),
                        token_id: last_id,
                    };
                    if tx.send(tail).await.is_err() {
                        break;
                    }
                }
                let _ = tx.send(wire::finished(&f, prompt_tokens)).await;
                break;
            }
            v1::generate_event::Event::Error(e) => {
                let _ = tx.send(GenerateEvent::Failed(wire::event_error(&e))).await;
                break;
            }
        }
    }
    drop(route);
}
