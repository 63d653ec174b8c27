//! The task that owns the membership table. Nothing else mutates it, so no lock is needed and
//! every change (state, plan, store, published view) happens in one well-defined order.

use super::{
    ClusterView, Command, HeartbeatInfo, HeartbeatReply, JoinAccepted, JoinInfo, LocalModel,
    MembershipConfig, MembershipError, MembershipEvent, NodeLoad, NodeState, NodeView,
};
use crate::persist::{self, Batch, NodeRecord};
use crate::placement::{
    self, Assignment, LayerSpeed, ModelSpec, NodeHealth, NodeInput, Placement, PlacementInput, Plan,
};
use crate::store::{StateStore, StoreError};
use shoal_types::{ModelId, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(super) struct Actor {
    config: MembershipConfig,
    catalogue: BTreeMap<ModelId, ModelSpec>,
    store: Arc<dyn StateStore>,
    events: broadcast::Sender<MembershipEvent>,
    view_tx: watch::Sender<Arc<ClusterView>>,
    cluster_id: String,
    nodes: BTreeMap<NodeId, NodeView>,
    plan: Plan,
    /// The latest planning, with its reasons (also when it left the plan unchanged).
    placement: Arc<Placement>,
    version: u64,
}

/// What a refused change restores.
struct Checkpoint {
    nodes: BTreeMap<NodeId, NodeView>,
    plan: Plan,
    placement: Arc<Placement>,
}

impl Actor {
    pub(super) async fn restore(
        config: MembershipConfig,
        store: Arc<dyn StateStore>,
        events: broadcast::Sender<MembershipEvent>,
        view_tx: watch::Sender<Arc<ClusterView>>,
    ) -> Result<Self, MembershipError> {
        let fresh = format!("shoal-{:032x}", rand::random::<u128>());
        let cluster_id = persist::cluster_id(store.as_ref(), fresh).await?;
        let now = Instant::now();
        let mut nodes = BTreeMap::new();
        for rec in persist::load_nodes(store.as_ref()).await? {
            let view = NodeView {
                id: rec.id.clone(),
                state: rec.state,
                data_addr: rec.data_addr,
                http_addr: rec.http_addr,
                capability: rec.capability,
                memory_budget_bytes: rec.memory_budget_bytes,
                local_models: rec.local_models,
                load: NodeLoad::default(),
                shards: Vec::new(),
                last_sequence: None,
                // A fresh lease: the nodes did not stop heartbeating, the coordinator did.
                lease_deadline: now + config.lease,
                kept_while_draining: Vec::new(),
            };
            nodes.insert(rec.id, view);
        }
        let plan = persist::load_plan(store.as_ref())
            .await?
            .unwrap_or_default();
        let catalogue = config
            .models
            .iter()
            .map(|m| (m.id.clone(), m.clone()))
            .collect();
        let placement = Arc::new(Placement {
            plan: plan.clone(),
            outcomes: Vec::new(),
        });
        let mut actor = Actor {
            config,
            catalogue,
            store,
            events,
            view_tx,
            cluster_id,
            nodes,
            plan,
            placement,
            version: 0,
        };
        tracing::info!(
            cluster_id = %actor.cluster_id,
            nodes = actor.nodes.len(),
            plan_epoch = actor.plan.epoch,
            "membership restored"
        );
        // The catalogue or pins may have changed while the coordinator was down.
        let changed = actor.settle(&[], &[]).await?;
        actor.publish(
            changed
                .into_iter()
                .map(|epoch| MembershipEvent::PlanChanged { epoch })
                .collect(),
        );
        Ok(actor)
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>, cancel: CancellationToken) {
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                () = sleep_until(deadline) => self.expire().await,
            }
        }
        tracing::debug!("membership actor stopped");
    }

    async fn handle(&mut self, cmd: Command) {
        // A caller that gave up waiting dropped its receiver; its answer has nowhere to go,
        // which is fine, so send results are ignored throughout.
        match cmd {
            Command::Join(info, reply) => {
                let _ = reply.send(self.join(*info).await);
            }
            Command::Heartbeat(info, reply) => {
                let _ = reply.send(self.heartbeat(*info).await);
            }
            Command::Leave(node, reply) => {
                let _ = reply.send(self.leave(node).await);
            }
            Command::Drain(node, reply) => {
                let _ = reply.send(self.drain(node).await);
            }
            Command::Undrain(node, reply) => {
                let _ = reply.send(self.undrain(node).await);
            }
            Command::DeclareDead(node, reply) => {
                let _ = reply.send(self.declare_dead(node).await);
            }
        }
    }

    async fn join(&mut self, info: JoinInfo) -> Result<JoinAccepted, MembershipError> {
        if info.protocol_version != shoal_proto::PROTOCOL_VERSION {
            return Err(MembershipError::VersionMismatch {
                ours: shoal_proto::PROTOCOL_VERSION,
                theirs: info.protocol_version,
            });
        }
        // The gRPC layer checks ids too; in-process callers reach this directly, and ids become
        // store keys.
        if let Err(problem) = crate::check_node_id(info.node.as_str()) {
            return Err(MembershipError::InvalidNodeId {
                node: info.node,
                problem,
            });
        }
        let existing = self.nodes.get(&info.node);
        if let Some(e) = existing.filter(|e| e.state.is_live() && e.data_addr != info.data_addr) {
            return Err(MembershipError::DuplicateNode {
                node: info.node,
                live_addr: e.data_addr.clone(),
            });
        }
        // A draining node that restarts stays draining: draining is the operator's intent.
        let state = match existing.map(|e| e.state) {
            Some(NodeState::Draining) => NodeState::Draining,
            _ => NodeState::Joining,
        };
        let id = info.node.clone();
        let view = NodeView {
            id: id.clone(),
            state,
            data_addr: info.data_addr,
            http_addr: info.http_addr,
            // Memory free at join, before the node loads anything, is what it can give to
            // shards; later readings shrink as it loads the very shards it was given.
            memory_budget_bytes: info.capability.memory_available_bytes,
            capability: info.capability,
            local_models: info.local_models,
            load: NodeLoad::default(),
            shards: Vec::new(),
            last_sequence: None,
            lease_deadline: Instant::now() + self.config.lease,
            kept_while_draining: Vec::new(),
        };
        let saved = self.checkpoint();
        self.nodes.insert(id.clone(), view);
        match self.settle(std::slice::from_ref(&id), &[]).await {
            Ok(changed) => {
                tracing::info!(node = %id, "node joined");
                let mut events = vec![MembershipEvent::Joined(id)];
                events.extend(changed.map(|epoch| MembershipEvent::PlanChanged { epoch }));
                self.publish(events);
                Ok(JoinAccepted {
                    cluster_id: self.cluster_id.clone(),
                    lease: self.config.lease,
                    heartbeat_interval: self.config.heartbeat_interval,
                })
            }
            Err(e) => {
                self.rollback(saved);
                Err(e.into())
            }
        }
    }

    async fn heartbeat(&mut self, hb: HeartbeatInfo) -> HeartbeatReply {
        let lease = self.config.lease;
        let Some(node) = self.nodes.get_mut(&hb.node).filter(|n| n.state.is_live()) else {
            return HeartbeatReply::Rejoin;
        };
        if node.last_sequence.is_some_and(|last| hb.sequence <= last) {
            // Reordered or repeated: older news than what we have. Answer, change nothing.
            tracing::debug!(node = %hb.node, sequence = hb.sequence, "stale heartbeat ignored");
            return self.reply(&hb.node);
        }
        node.last_sequence = Some(hb.sequence);
        node.lease_deadline = Instant::now() + lease;
        node.load = hb.load;
        node.shards = hb.shards;
        let mut events = Vec::new();
        let mut durable = false;
        if let Some(cap) = hb.capability {
            durable |= cap.differs_durably(&node.capability);
            node.capability = cap;
        }
        if node.state == NodeState::Joining {
            node.state = NodeState::Alive;
            durable = true;
            events.push(MembershipEvent::Alive(hb.node.clone()));
        }
        if node.state == NodeState::Draining
            && !node.kept_while_draining.is_empty()
            && node.load.in_flight() == 0
        {
            node.kept_while_draining.clear();
            events.push(MembershipEvent::Drained(hb.node.clone()));
        }
        if durable {
            let mut batch = Batch::default();
            let stored = batch.put_node(&record(node));
            if let Err(e) = async {
                stored?;
                batch.commit(self.store.as_ref()).await
            }
            .await
            {
                // The heartbeat still counts; the record is rewritten on the next change.
                tracing::warn!(node = %hb.node, error = %e, "could not persist node record");
            }
        }
        self.publish(events);
        self.reply(&hb.node)
    }

    fn reply(&self, id: &NodeId) -> HeartbeatReply {
        let Some(node) = self.nodes.get(id) else {
            return HeartbeatReply::Rejoin;
        };
        let (assignments, drain) = if node.state == NodeState::Draining {
            (node.kept_while_draining.clone(), true)
        } else {
            (self.plan.for_node(id).cloned().collect(), false)
        };
        HeartbeatReply::Serve {
            lease: self.config.lease,
            plan_epoch: self.plan.epoch,
            assignments,
            drain,
        }
    }

    async fn leave(&mut self, id: NodeId) -> Result<(), MembershipError> {
        let Some(node) = self.nodes.get(&id).filter(|n| n.state != NodeState::Left) else {
            return Ok(());
        };
        let previous = node.state;
        let saved = self.checkpoint();
        self.set_state(&id, NodeState::Left);
        match self.settle(&[], std::slice::from_ref(&id)).await {
            Ok(changed) => {
                tracing::info!(node = %id, ?previous, "node left");
                let mut events = vec![MembershipEvent::Left(id)];
                events.extend(changed.map(|epoch| MembershipEvent::PlanChanged { epoch }));
                self.publish(events);
                Ok(())
            }
            Err(e) => {
                self.rollback(saved);
                Err(e.into())
            }
        }
    }

    async fn drain(&mut self, id: NodeId) -> Result<(), MembershipError> {
        let state = self.nodes.get(&id).map(|n| n.state);
        match state {
            Some(NodeState::Draining) => return Ok(()),
            Some(NodeState::Joining | NodeState::Alive) => {}
            _ => return Err(MembershipError::NotLive { node: id }),
        }
        let saved = self.checkpoint();
        let kept: Vec<Assignment> = self.plan.for_node(&id).cloned().collect();
        if let Some(n) = self.nodes.get_mut(&id) {
            n.state = NodeState::Draining;
            n.kept_while_draining = kept;
        }
        self.transition(id, saved, MembershipEvent::Draining).await
    }

    async fn undrain(&mut self, id: NodeId) -> Result<(), MembershipError> {
        match self.nodes.get(&id).map(|n| n.state) {
            Some(NodeState::Draining) => {}
            Some(NodeState::Joining | NodeState::Alive) => return Ok(()),
            _ => return Err(MembershipError::NotLive { node: id }),
        }
        let saved = self.checkpoint();
        self.set_state(&id, NodeState::Alive);
        self.transition(id, saved, MembershipEvent::Undrained).await
    }

    async fn declare_dead(&mut self, id: NodeId) -> Result<(), MembershipError> {
        if !self.nodes.get(&id).is_some_and(|n| n.state.is_live()) {
            return Ok(());
        }
        tracing::warn!(node = %id, "node declared dead by the coordinator");
        let saved = self.checkpoint();
        self.set_state(&id, NodeState::Dead);
        self.transition(id, saved, MembershipEvent::Dead).await
    }

    /// Settles a state change of one node, undoing it when it cannot be persisted.
    async fn transition(
        &mut self,
        id: NodeId,
        saved: Checkpoint,
        event: fn(NodeId) -> MembershipEvent,
    ) -> Result<(), MembershipError> {
        match self.settle(std::slice::from_ref(&id), &[]).await {
            Ok(changed) => {
                let mut events = vec![event(id)];
                events.extend(changed.map(|epoch| MembershipEvent::PlanChanged { epoch }));
                self.publish(events);
                Ok(())
            }
            Err(e) => {
                self.rollback(saved);
                Err(e.into())
            }
        }
    }

    async fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.state.is_live() && n.lease_deadline <= now)
            .map(|n| n.id.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        for id in &expired {
            tracing::warn!(node = %id, "lease expired; node declared dead");
            self.set_state(id, NodeState::Dead);
        }
        let mut events: Vec<MembershipEvent> =
            expired.iter().cloned().map(MembershipEvent::Dead).collect();
        // Unlike a caller's request, expiry cannot be refused: the node is dead whether or not
        // the store takes the news. A failed write is retried by the next change.
        match self.settle(&expired, &[]).await {
            Ok(changed) => {
                events.extend(changed.map(|epoch| MembershipEvent::PlanChanged { epoch }))
            }
            Err(e) => tracing::error!(error = %e, "could not persist dead nodes"),
        }
        self.publish(events);
    }

    fn set_state(&mut self, id: &NodeId, state: NodeState) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.state = state;
            n.kept_while_draining.clear();
            if !state.is_live() {
                n.shards.clear();
                n.load = NodeLoad::default();
            }
        }
    }

    /// Re-plans, then persists the touched node records, the deleted ones and the plan (when
    /// it changed) in one transaction. Returns the new epoch when the plan changed.
    async fn settle(
        &mut self,
        touched: &[NodeId],
        deleted: &[NodeId],
    ) -> Result<Option<u64>, StoreError> {
        let placement = placement::place(&self.placement_input());
        let changed = placement.plan != self.plan;
        let mut batch = Batch::default();
        for id in touched {
            if let Some(n) = self.nodes.get(id) {
                batch.put_node(&record(n))?;
            }
        }
        for id in deleted {
            batch.delete_node(id);
        }
        if changed {
            batch.put_plan(&placement.plan)?;
        }
        batch.commit(self.store.as_ref()).await?;
        let placement = Arc::new(placement);
        self.placement = Arc::clone(&placement);
        if !changed {
            return Ok(None);
        }
        tracing::info!(
            epoch = placement.plan.epoch,
            assignments = placement.plan.assignments.len(),
            "plan changed"
        );
        tracing::debug!(explain = %placement.explain(), "placement");
        for o in placement.unplaced() {
            tracing::warn!(model = %o.model, "model has no replica");
        }
        self.plan = placement.plan.clone();
        Ok(Some(self.plan.epoch))
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            nodes: self.nodes.clone(),
            plan: self.plan.clone(),
            placement: Arc::clone(&self.placement),
        }
    }

    fn rollback(&mut self, c: Checkpoint) {
        self.nodes = c.nodes;
        self.plan = c.plan;
        self.placement = c.placement;
    }

    /// Of a node's model files, the models it holds at the version the cluster serves and
    /// those it holds only at another version.
    fn versions(&self, files: &[LocalModel]) -> (BTreeSet<ModelId>, BTreeSet<ModelId>) {
        let (mut right, mut other) = (BTreeSet::new(), BTreeSet::new());
        for f in files {
            match self.catalogue.get(&f.model) {
                Some(m) if m.sha256.eq_ignore_ascii_case(&f.sha256) => {
                    right.insert(f.model.clone());
                }
                Some(_) => {
                    other.insert(f.model.clone());
                }
                None => {}
            }
        }
        other.retain(|m| !right.contains(m));
        (right, other)
    }

    fn placement_input(&self) -> PlacementInput {
        let nodes = self
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Left)
            .map(|n| (n, self.versions(&n.local_models)))
            .map(|(n, versions)| NodeInput {
                id: n.id.clone(),
                memory_bytes: n.memory_budget_bytes,
                cores: n.capability.cores,
                health: match n.state {
                    NodeState::Joining | NodeState::Alive => NodeHealth::Alive,
                    NodeState::Draining => NodeHealth::Draining,
                    NodeState::Dead | NodeState::Left => NodeHealth::Dead,
                },
                speeds: n
                    .capability
                    .speeds
                    .iter()
                    .map(|s| (s.model.clone(), s.decode_tokens_per_second))
                    .collect(),
                layer_speeds: n
                    .capability
                    .speeds
                    .iter()
                    .map(|s| {
                        let speed = LayerSpeed {
                            layer_seconds: s.layer_decode_seconds,
                            head_seconds: s.head_seconds,
                        };
                        (s.model.clone(), speed)
                    })
                    .collect(),
                // Not measured yet: every link costs nothing until nodes report it.
                link_latency_seconds: 0.0,
                local_models: versions.0,
                other_versions: versions.1,
            })
            .collect();
        PlacementInput {
            models: self.config.models.clone(),
            nodes,
            pins: self.config.pins.clone(),
            policy: self.config.policy.clone(),
            previous: Some(self.plan.clone()),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.nodes
            .values()
            .filter(|n| n.state.is_live())
            .map(|n| n.lease_deadline)
            .min()
    }

    pub(super) fn snapshot(&self) -> Arc<ClusterView> {
        Arc::new(ClusterView {
            cluster_id: self.cluster_id.clone(),
            version: self.version,
            plan: self.plan.clone(),
            placement: Arc::clone(&self.placement),
            nodes: self.nodes.clone(),
            models: self.catalogue.clone(),
        })
    }

    fn publish(&mut self, events: Vec<MembershipEvent>) {
        self.version += 1;
        self.view_tx.send_replace(self.snapshot());
        for e in events {
            // No subscriber is not an error: events are for whoever listens.
            let _ = self.events.send(e);
        }
    }
}

fn record(n: &NodeView) -> NodeRecord {
    NodeRecord {
        id: n.id.clone(),
        state: n.state,
        data_addr: n.data_addr.clone(),
        http_addr: n.http_addr.clone(),
        capability: n.capability.clone(),
        memory_budget_bytes: n.memory_budget_bytes,
        local_models: n.local_models.clone(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
