//! The control loop: join the coordinator (retrying with capped exponential backoff while it is
//! unreachable), then heartbeat with load, capability and shard states, and act on each answer
//! (the complete set of shards to serve, drain, rejoin).
//!
//! A refusal that retrying cannot fix (another protocol version, a bad identity or message)
//! ends the loop with [`ControlState::Refused`]. Failed heartbeats are counted and retried;
//! the node keeps serving what it has meanwhile.
//!
//! Each heartbeat answer carries the cluster's revocations, which the data plane's
//! authorization then applies to peers; and an enrolled node renews its certificate here,
//! between heartbeats, once 2/3 of its lifetime has passed, then dials the coordinator
//! again with the new one.

use crate::capability::{HostProbe, host_capability};
use crate::core::NodeCore;
use crate::enroll::{Renewal, renewal_due};
use shoal_net::{
    ConnectOptions, Revocations, Role, ShoalCoordinatorClient, TlsMode, class_of,
    coordinator_client, enrollment_client, with_deadline,
};
use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::v1::{self, HeartbeatRequest, JoinRequest, LocalModel};
use shoal_types::ErrorClass;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// First wait before retrying a failed join.
const JOIN_BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest wait between join attempts.
const JOIN_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Deadline of one join call.
const JOIN_DEADLINE: Duration = Duration::from_secs(5);
/// Interval used when the coordinator names none.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Bounds of a heartbeat's deadline (three intervals in between).
const HEARTBEAT_DEADLINE_MIN: Duration = Duration::from_millis(500);
const HEARTBEAT_DEADLINE_MAX: Duration = Duration::from_secs(5);
/// How often the host's figures (memory, battery, temperature) are measured again.
const HOST_REFRESH: Duration = Duration::from_secs(10);
/// Time constant of the tokens-per-second average.
const RATE_TAU_SECONDS: f64 = 5.0;
/// Wait before retrying a failed renewal.
const RENEW_RETRY: Duration = Duration::from_secs(1);
/// Default deadline of calls on a rebuilt coordinator link.
pub(crate) const COORDINATOR_DEADLINE: Duration = Duration::from_secs(5);

/// Where the agent stands with its coordinator.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlState {
    /// Trying to join (the coordinator may be unreachable; attempts continue).
    Joining,
    /// Joined and heartbeating.
    Joined {
        /// The cluster's id, as the coordinator named it.
        cluster_id: String,
    },
    /// The coordinator refused this node in a way retrying cannot fix; the control loop has
    /// stopped (the node keeps serving what it has loaded).
    Refused {
        /// The refusal's class.
        class: ErrorClass,
        /// Its stable reason, when the coordinator gave one.
        reason: Option<String>,
        /// What the coordinator said.
        message: String,
    },
    /// The control loop ended (shutdown).
    Stopped,
}

/// Codes a coordinator answers with when this node can never be admitted as configured.
fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
    )
}

/// The backoff before join attempt `attempt` (0-based): doubling from the start value up to the
/// cap, with a per-node jitter of up to a quarter so restarted nodes do not retry in lockstep.
pub(crate) fn join_backoff(attempt: u32, node: &str) -> Duration {
    let base = JOIN_BACKOFF_START
        .saturating_mul(1u32 << attempt.min(16))
        .min(JOIN_BACKOFF_CAP);
    let hash = node
        .bytes()
        .fold(u64::from(attempt) ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let jitter = (hash % 1000) as f64 / 4000.0; // [0, 0.25)
    base.mul_f64(1.0 - jitter)
}

pub(crate) struct Control {
    pub core: Arc<NodeCore>,
    pub client: ShoalCoordinatorClient,
    pub data_addr: String,
    pub http_addr: String,
    pub threads: usize,
    pub memory_budget: Option<u64>,
    pub state: watch::Sender<ControlState>,
    /// What the data plane's authorization consults.
    pub revocations: Revocations,
    /// The revocations the coordinator published last (local ones are left alone).
    pub published: (BTreeSet<String>, BTreeSet<String>),
    /// Renewal of an enrolled node's certificate, and the link it rebuilds afterwards.
    pub renewal: Option<RenewingLink>,
}

/// What renewing needs besides the certificate: the coordinator link to renew over and to
/// rebuild, and where the rebuilt client is published (the agent leaves over it).
pub(crate) struct RenewingLink {
    pub renewal: Renewal,
    pub coordinator: String,
    pub channel: Channel,
    pub clients: watch::Sender<ShoalCoordinatorClient>,
    pub retry_at: Option<SystemTime>,
    pub failing: bool,
}

enum Joined {
    Yes(v1::JoinResponse),
    Refused,
    Stopped,
}

enum Heartbeats {
    Rejoin,
    Stopped,
}

impl Control {
    /// Runs until `stop` fires or the coordinator refuses the node.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            self.state.send_replace(ControlState::Joining);
            let joined = match self.join(&stop).await {
                Joined::Yes(r) => r,
                Joined::Refused => return,
                Joined::Stopped => break,
            };
            tracing::info!(
                cluster = %joined.cluster_id,
                lease_ms = joined.lease_ms,
                heartbeat_ms = joined.heartbeat_interval_ms,
                "joined the cluster"
            );
            self.state.send_replace(ControlState::Joined {
                cluster_id: joined.cluster_id.clone(),
            });
            match self.heartbeats(&joined, &stop).await {
                Heartbeats::Rejoin => continue,
                Heartbeats::Stopped => break,
            }
        }
        self.state.send_replace(ControlState::Stopped);
    }

    fn join_request(&self) -> JoinRequest {
        JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            node_id: self.core.node_id.as_str().to_owned(),
            data_addr: self.data_addr.clone(),
            capability: Some(self.core.capability()),
            models: self
                .core
                .shards
                .files()
                .iter()
                .map(|f| LocalModel {
                    model_id: f.id.as_str().to_owned(),
                    sha256: f.sha256.clone(),
                    bytes: f.bytes,
                })
                .collect(),
            http_addr: self.http_addr.clone(),
        }
    }

    async fn join(&mut self, stop: &CancellationToken) -> Joined {
        let mut attempt = 0u32;
        loop {
            let req = with_deadline(self.join_request(), JOIN_DEADLINE);
            let result = tokio::select! {
                () = stop.cancelled() => return Joined::Stopped,
                r = self.client.join(req) => r,
            };
            let status = match result {
                Ok(r) => return Joined::Yes(r.into_inner()),
                Err(s) => s,
            };
            let (class, reason) = class_of(&status);
            if is_permanent(status.code()) {
                tracing::error!(
                    code = ?status.code(),
                    class = %class,
                    reason = reason.as_deref().unwrap_or(""),
                    message = status.message(),
                    "the coordinator refused this node; not retrying"
                );
                self.state.send_replace(ControlState::Refused {
                    class,
                    reason,
                    message: status.message().to_owned(),
                });
                return Joined::Refused;
            }
            let wait = join_backoff(attempt, self.core.node_id.as_str());
            if attempt == 0 {
                tracing::warn!(code = ?status.code(), message = status.message(), retry_in = ?wait, "joining the coordinator failed; retrying");
            } else {
                tracing::debug!(attempt, code = ?status.code(), retry_in = ?wait, "join failed");
            }
            attempt = attempt.saturating_add(1);
            tokio::select! {
                () = stop.cancelled() => return Joined::Stopped,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn heartbeats(
        &mut self,
        joined: &v1::JoinResponse,
        stop: &CancellationToken,
    ) -> Heartbeats {
        let interval = match joined.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT_INTERVAL,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let deadline = interval
            .saturating_mul(3)
            .clamp(HEARTBEAT_DEADLINE_MIN, HEARTBEAT_DEADLINE_MAX);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        let mut failing = false;
        let mut last_refresh = Instant::now();
        let mut rate = RateMeter::new(self.core.load().tokens_generated_total);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Heartbeats::Stopped,
                _ = ticker.tick() => {}
            }
            if last_refresh.elapsed() >= HOST_REFRESH {
                last_refresh = Instant::now();
                self.refresh_host().await;
            }
            self.renew_if_due().await;
            sequence += 1;
            let mut load = self.core.load();
            load.tokens_per_second = rate.update(load.tokens_generated_total);
            self.core.set_tokens_per_second(load.tokens_per_second);
            let req = HeartbeatRequest {
                node_id: self.core.node_id.as_str().to_owned(),
                sequence,
                load: Some(load),
                capability: Some(self.core.capability()),
                shards: self.core.shards.statuses(),
            };
            let result = tokio::select! {
                () = stop.cancelled() => return Heartbeats::Stopped,
                r = self.client.heartbeat(with_deadline(req, deadline)) => r,
            };
            match result {
                Ok(r) => {
                    if failing {
                        tracing::info!("heartbeats are getting through again");
                        failing = false;
                    }
                    let r = r.into_inner();
                    if r.rejoin {
                        tracing::info!("the coordinator asks this node to join again");
                        return Heartbeats::Rejoin;
                    }
                    self.core.set_draining(r.drain);
                    self.core.shards.apply(&r.assignments);
                    self.apply_revocations(&r.revoked_nodes, &r.revoked_serials);
                }
                Err(status) => {
                    self.core.metrics.heartbeat_failure();
                    if !failing {
                        tracing::warn!(code = ?status.code(), message = status.message(), "heartbeat failed; still serving, retrying");
                        failing = true;
                    }
                    if status.code() == Code::FailedPrecondition {
                        // The coordinator now speaks another version: joining again reports it.
                        return Heartbeats::Rejoin;
                    }
                }
            }
        }
    }

    /// Makes the coordinator's latest list the one in force, keeping revocations made here.
    fn apply_revocations(&mut self, nodes: &[String], serials: &[String]) {
        let nodes: BTreeSet<String> = nodes.iter().cloned().collect();
        let serials: BTreeSet<String> = serials.iter().cloned().collect();
        let (old_nodes, old_serials) = &self.published;
        for n in nodes.difference(old_nodes) {
            tracing::warn!(node = %n, "the coordinator revoked a node; refusing its calls");
            self.revocations.revoke_node(n);
        }
        for n in old_nodes.difference(&nodes) {
            self.revocations.restore_node(n);
        }
        for s in serials.difference(old_serials) {
            self.revocations.revoke_serial(s);
        }
        for s in old_serials.difference(&serials) {
            self.revocations.restore_serial(s);
        }
        self.published = (nodes, serials);
    }

    /// Renews the certificate once it is due, then dials the coordinator with the new one.
    async fn renew_if_due(&mut self) {
        let Some(link) = self.renewal.as_mut() else {
            return;
        };
        let now = SystemTime::now();
        let due = renewal_due(&link.renewal.identity.certificate());
        if now < due || link.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let mut client = enrollment_client(link.channel.clone(), COORDINATOR_DEADLINE);
        let material = match link.renewal.renew(&mut client).await {
            Ok(m) => m,
            Err(e) => {
                if !link.failing {
                    tracing::warn!(error = %e, "renewing the certificate failed; retrying");
                    link.failing = true;
                }
                link.retry_at = Some(now + RENEW_RETRY);
                return;
            }
        };
        link.failing = false;
        link.retry_at = None;
        let opts = ConnectOptions {
            expect_role: Some(Role::Coordinator),
            ..ConnectOptions::default()
        };
        match shoal_net::connect_lazy(&link.coordinator, &TlsMode::Mtls(material), opts) {
            Ok(channel) => {
                link.channel = channel.clone();
                self.client = coordinator_client(channel, COORDINATOR_DEADLINE);
                link.clients.send_replace(self.client.clone());
                let cert = link.renewal.identity.certificate();
                tracing::info!(serial = %cert.serial, "certificate renewed; new links use it");
            }
            Err(e) => tracing::error!(error = %e, "rebuilding the coordinator link failed"),
        }
    }

    async fn refresh_host(&self) {
        let (threads, budget) = (self.threads, self.memory_budget);
        let measured = tokio::task::spawn_blocking(move || {
            host_capability(&HostProbe::default(), threads, budget)
        })
        .await;
        if let Ok(host) = measured {
            self.core.refresh_host(host);
        }
    }
}

/// Tokens per second, averaged exponentially over about [`RATE_TAU_SECONDS`].
struct RateMeter {
    last_total: u64,
    last_at: Instant,
    rate: f64,
}

impl RateMeter {
    fn new(total: u64) -> Self {
        Self {
            last_total: total,
            last_at: Instant::now(),
            rate: 0.0,
        }
    }

    fn update(&mut self, total: u64) -> f64 {
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64();
        if dt > 0.0 {
            let instant = total.saturating_sub(self.last_total) as f64 / dt;
            let alpha = 1.0 - (-dt / RATE_TAU_SECONDS).exp();
            self.rate += (instant - self.rate) * alpha;
            self.last_total = total;
            self.last_at = now;
        }
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let mut prev = Duration::ZERO;
        for attempt in 0..6 {
            let d = join_backoff(attempt, "pi-1");
            let base = JOIN_BACKOFF_START * (1 << attempt);
            assert!(d <= base && d > base.mul_f64(0.74), "{attempt}: {d:?}");
            assert!(d > prev);
            prev = d;
        }
        for attempt in [10, 20, 40, u32::MAX] {
            let d = join_backoff(attempt, "pi-1");
            assert!(d <= JOIN_BACKOFF_CAP && d > JOIN_BACKOFF_CAP.mul_f64(0.74));
        }
        assert_ne!(join_backoff(3, "pi-1"), join_backoff(3, "pi-2"));
    }

    #[test]
    fn only_unfixable_refusals_stop_the_join_loop() {
        assert!(is_permanent(Code::FailedPrecondition));
        assert!(is_permanent(Code::Unauthenticated));
        assert!(!is_permanent(Code::Unavailable));
        assert!(!is_permanent(Code::AlreadyExists));
        assert!(!is_permanent(Code::DeadlineExceeded));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_meter_follows_a_steady_rate() {
        let mut m = RateMeter::new(0);
        let mut total = 0;
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(500)).await;
            total += 50;
            m.update(total);
        }
        let r = m.update(total);
        assert!((r - 100.0).abs() < 1.0, "{r}");
    }
}
