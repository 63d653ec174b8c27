//! Membership tests. Time is paused: leases expire exactly when virtual time says so.

use super::*;
use crate::store::{MemoryStore, Txn};
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::time::{Duration, sleep};

const GB: u64 = 1 << 30;

fn spec(id: &str) -> ModelSpec {
    ModelSpec {
        id: ModelId::new(id),
        sha256: "cd".repeat(32),
        file_bytes: GB,
        n_layers: 30,
        layer_bytes: GB / 40,
        kv_bytes_per_token: 0,
        context_length: 2048,
    }
}

/// A 3 s lease (the timings below are written for it) and the default 500 ms heartbeats.
fn config(replicas: Option<usize>) -> MembershipConfig {
    MembershipConfig {
        lease: Duration::from_secs(3),
        models: vec![spec("m")],
        policy: PlacementPolicy {
            replicas,
            kv_reserve_tokens: 0,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn join_info(id: &str, addr: &str, tps: f64) -> JoinInfo {
    JoinInfo {
        protocol_version: shoal_proto::PROTOCOL_VERSION,
        node: NodeId::new(id),
        data_addr: addr.into(),
        http_addr: None,
        capability: NodeCapability {
            cores: 4,
            memory_available_bytes: 4 * GB,
            speeds: vec![ModelSpeed {
                model: ModelId::new("m"),
                layer_decode_seconds: 0.001,
                head_seconds: 0.001,
                decode_tokens_per_second: tps,
                layer_bytes: GB / 40,
            }],
            ..Default::default()
        },
        local_models: vec![],
    }
}

fn hb(id: &str, sequence: u64, queued: u32) -> HeartbeatInfo {
    HeartbeatInfo {
        node: NodeId::new(id),
        sequence,
        load: NodeLoad {
            queue_depth: queued,
            ..Default::default()
        },
        capability: None,
        shards: vec![],
    }
}

struct Running {
    handle: MembershipHandle,
    task: JoinHandle<()>,
    cancel: CancellationToken,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

async fn start_with(config: MembershipConfig, store: Arc<dyn StateStore>) -> Running {
    let cancel = CancellationToken::new();
    let (handle, task) = start(config, store, cancel.clone()).await.unwrap();
    Running {
        handle,
        task,
        cancel,
    }
}

fn served(reply: &HeartbeatReply) -> Vec<String> {
    match reply {
        HeartbeatReply::Serve { assignments, .. } => {
            assignments.iter().map(|a| a.model.to_string()).collect()
        }
        HeartbeatReply::Rejoin => panic!("unexpected rejoin"),
    }
}

fn state(h: &MembershipHandle, id: &str) -> NodeState {
    h.view().nodes[&NodeId::new(id)].state
}

#[tokio::test(start_paused = true)]
async fn a_joined_node_turns_alive_on_its_first_heartbeat_and_gets_its_shards() {
    let run = start_with(config(None), Arc::new(MemoryStore::new())).await;
    let h = &run.handle;
    let mut events = h.subscribe_events();

    let accepted = h.join(join_info("a", "10.0.0.1:7000", 10.0)).await.unwrap();
    assert_eq!(accepted.lease, Duration::from_secs(3));
    assert_eq!(accepted.heartbeat_interval, Duration::from_millis(500));
    assert_eq!(accepted.cluster_id, h.view().cluster_id);
    assert_eq!(state(h, "a"), NodeState::Joining);

    let reply = h.heartbeat(hb("a", 1, 0)).await.unwrap();
    assert_eq!(served(&reply), ["m"]);
    assert_eq!(state(h, "a"), NodeState::Alive);
    let HeartbeatReply::Serve {
        plan_epoch,
        drain,
        assignments,
        ..
    } = reply
    else {
        unreachable!()
    };
    assert!(!drain);
    assert_eq!(plan_epoch, h.view().plan.epoch);
    assert_eq!(assignments[0].layers, LayerRange::full(30).unwrap());

    assert_eq!(
        events.recv().await.unwrap(),
        MembershipEvent::Joined(NodeId::new("a"))
    );
    assert!(matches!(
        events.recv().await.unwrap(),
        MembershipEvent::PlanChanged { .. }
    ));
    assert_eq!(
        events.recv().await.unwrap(),
        MembershipEvent::Alive(NodeId::new("a"))
    );
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_view_explains_why_a_node_got_nothing() {
    let run = start_with(config(None), Arc::new(MemoryStore::new())).await;
    let h = &run.handle;
    let mut small = join_info("tiny", "t:1", 1.0);
    small.capability.memory_available_bytes = GB / 2;
    h.join(small).await.unwrap();
    let view = h.view();
    assert!(view.plan.assignments.is_empty());
    let text = view.placement.explain();
    assert!(
        text.contains("model m (needs 1073741824 B): NOT PLACED"),
        "{text}"
    );
    assert!(text.contains("tiny: not enough memory"), "{text}");

    let bad = join_info("../tiny", "t:1", 1.0);
    let err = h.join(bad).await.unwrap_err();
    assert!(
        matches!(err, MembershipError::InvalidNodeId { .. }),
        "{err:?}"
    );
    assert_eq!(err.reason(), "invalid_node_id");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wrong_protocol_version_is_refused() {
    let run = start_with(config(None), Arc::new(MemoryStore::new())).await;
    let info = JoinInfo {
        protocol_version: shoal_proto::PROTOCOL_VERSION + 1,
        ..join_info("a", "x:1", 1.0)
    };
    let err = run.handle.join(info).await.unwrap_err();
    assert!(
        matches!(err, MembershipError::VersionMismatch { theirs: 2, .. }),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::InvalidRequest);
    assert!(run.handle.view().nodes.is_empty());
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_live_node_id_cannot_be_taken_from_another_address() {
    let run = start_with(config(None), Arc::new(MemoryStore::new())).await;
    let h = &run.handle;
    h.join(join_info("a", "10.0.0.1:7000", 1.0)).await.unwrap();
    let err = h
        .join(join_info("a", "10.0.0.2:7000", 1.0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MembershipError::DuplicateNode { ref live_addr, .. } if live_addr == "10.0.0.1:7000")
    );
    assert_eq!(h.view().nodes[&NodeId::new("a")].data_addr, "10.0.0.1:7000");

    // The same address is the node restarting: accepted, and its sequence starts over.
    h.heartbeat(hb("a", 40, 0)).await.unwrap();
    h.join(join_info("a", "10.0.0.1:7000", 1.0)).await.unwrap();
    assert_eq!(state(h, "a"), NodeState::Joining);
    assert_eq!(h.view().nodes[&NodeId::new("a")].last_sequence, None);
    assert!(matches!(
        h.heartbeat(hb("a", 1, 0)).await.unwrap(),
        HeartbeatReply::Serve { .. }
    ));

    // Once the holder is dead, the id is free for another address.
    sleep(Duration::from_secs(4)).await;
    assert_eq!(state(h, "a"), NodeState::Dead);
    h.join(join_info("a", "10.0.0.2:7000", 1.0)).await.unwrap();
    assert_eq!(h.view().nodes[&NodeId::new("a")].data_addr, "10.0.0.2:7000");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_dies_when_its_lease_ends_and_its_replica_moves() {
    let run = start_with(config(Some(1)), Arc::new(MemoryStore::new())).await;
    let h = &run.handle;
    h.join(join_info("fast", "f:1", 50.0)).await.unwrap();
    h.join(join_info("slow", "s:1", 5.0)).await.unwrap();
    h.heartbeat(hb("slow", 1, 0)).await.unwrap();
    let reply = h.heartbeat(hb("fast", 1, 0)).await.unwrap();
    assert_eq!(served(&reply), ["m"], "the single replica is on `fast`");
    let epoch_before = h.view().plan.epoch;
    let mut events = h.subscribe_events();

    // `slow` heartbeats every 500 ms; `fast` goes silent.
    for seq in 2..=6 {
        sleep(Duration::from_millis(500)).await;
        assert!(served(&h.heartbeat(hb("slow", seq, 0)).await.unwrap()).is_empty());
    }
    // 2.5 s after its last heartbeat, `fast` still holds its lease.
    assert_eq!(state(h, "fast"), NodeState::Alive);
    // Past its lease (3 s) by 100 ms, so the expiry and this heartbeat never share an instant.
    sleep(Duration::from_millis(600)).await;
    let reply = h.heartbeat(hb("slow", 7, 0)).await.unwrap();
    assert_eq!(state(h, "fast"), NodeState::Dead);
    assert_eq!(state(h, "slow"), NodeState::Alive);
    assert_eq!(served(&reply), ["m"], "the replica moved to the survivor");
    assert_eq!(h.view().plan.epoch, epoch_before + 1);
    assert_eq!(
        events.recv().await.unwrap(),
        MembershipEvent::Dead(NodeId::new("fast"))
    );
    assert_eq!(
        events.recv().await.unwrap(),
        MembershipEvent::PlanChanged {
            epoch: epoch_before + 1
        }
    );

    // The dead node comes back: told to rejoin, and once it does it is a member again.
    assert_eq!(
        h.heartbeat(hb("fast", 2, 0)).await.unwrap(),
        HeartbeatReply::Rejoin
    );
    h.join(join_info("fast", "f:1", 50.0)).await.unwrap();
    assert_eq!(state(h, "fast"), NodeState::Joining);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn reordered_heartbeats_change_nothing() {
    let run = start_with(config(None), Arc::new(MemoryStore::new())).await;
    let h = &run.handle;
    h.join(join_info("a", "a:1", 1.0)).await.unwrap();
    h.heartbeat(hb("a", 5, 3)).await.unwrap();
    let deadline = h.view().nodes[&NodeId::new("a")].lease_deadline;
    sleep(Duration::from_millis(200)).await;

    // An older heartbeat overtaken on the network: still answered, but its load is old news and
    // it proves nothing newer about liveness.
    let reply = h.heartbeat(hb("a", 4, 9)).await.unwrap();
    assert_eq!(served(&reply), ["m"]);
    let a = &h.view().nodes[&NodeId::new("a")];
    assert_eq!(a.load.queue_depth, 3);
    assert_eq!(a.last_sequence, Some(5));
    assert_eq!(a.lease_deadline, deadline);

    h.heartbeat(hb("a", 6, 1)).await.unwrap();
    let a = &h.view().nodes[&NodeId::new("a")];
    assert_eq!(a.load.queue_depth, 1);
    assert!(a.lease_deadline > deadline);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unknown_and_departed_nodes_are_told_to_rejoin() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let run = start_with(config(None), Arc::clone(&store)).await;
    let h = &run.handle;
    assert_eq!(
        h.heartbeat(hb("ghost", 1, 0)).await.unwrap(),
        HeartbeatReply::Rejoin
    );

    h.join(join_info("a", "a:1", 1.0)).await.unwrap();
    h.heartbeat(hb("a", 1, 0)).await.unwrap();
    assert!(store.get("shoal/v1/nodes/a").await.unwrap().is_some());
    h.leave(NodeId::new("a")).await.unwrap();
    assert_eq!(state(h, "a"), NodeState::Left);
    assert!(h.view().plan.assignments.is_empty());
    assert!(store.get("shoal/v1/nodes/a").await.unwrap().is_none());
    assert_eq!(
        h.heartbeat(hb("a", 2, 0)).await.unwrap(),
        HeartbeatReply::Rejoin
    );
    // Leaving twice, or leaving unknown, is not an error.
    h.leave(NodeId::new("a")).await.unwrap();
    h.leave(NodeId::new("ghost")).await.unwrap();
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_draining_node_keeps_its_shards_until_its_work_ends() {
    let run = start_with(config(None), Arc::new(MemoryStore::new())).await;
    let h = &run.handle;
    for id in ["a", "b"] {
        h.join(join_info(id, &format!("{id}:1"), 1.0))
            .await
            .unwrap();
        h.heartbeat(hb(id, 1, 0)).await.unwrap();
    }
    let mut events = h.subscribe_events();
    h.drain(NodeId::new("a")).await.unwrap();
    assert_eq!(state(h, "a"), NodeState::Draining);
    assert_eq!(
        h.view().plan.for_node(&NodeId::new("a")).count(),
        0,
        "the plan moves on"
    );
    assert_eq!(
        events.recv().await.unwrap(),
        MembershipEvent::Draining(NodeId::new("a"))
    );

    // Two requests still running: it keeps serving them, told to drain.
    let reply = h.heartbeat(hb("a", 2, 2)).await.unwrap();
    assert_eq!(served(&reply), ["m"]);
    assert!(matches!(reply, HeartbeatReply::Serve { drain: true, .. }));

    // Work done: the shard is released.
    let reply = h.heartbeat(hb("a", 3, 0)).await.unwrap();
    assert!(served(&reply).is_empty());
    assert!(matches!(reply, HeartbeatReply::Serve { drain: true, .. }));
    let drained = loop {
        match events.recv().await.unwrap() {
            MembershipEvent::Drained(n) => break n,
            _ => continue,
        }
    };
    assert_eq!(drained.as_str(), "a");

    // Back in service.
    h.undrain(NodeId::new("a")).await.unwrap();
    let reply = h.heartbeat(hb("a", 4, 0)).await.unwrap();
    assert_eq!(served(&reply), ["m"]);
    assert!(matches!(reply, HeartbeatReply::Serve { drain: false, .. }));

    let err = h.drain(NodeId::new("ghost")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::NotFound);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_coordinator_resumes_its_cluster() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let run = start_with(config(Some(1)), Arc::clone(&store)).await;
    for (id, tps) in [("a", 5.0), ("b", 50.0)] {
        run.handle
            .join(join_info(id, &format!("{id}:1"), tps))
            .await
            .unwrap();
        run.handle.heartbeat(hb(id, 1, 0)).await.unwrap();
    }
    run.handle.drain(NodeId::new("a")).await.unwrap();
    let before = run.handle.view();
    run.stop().await;

    let run = start_with(config(Some(1)), Arc::clone(&store)).await;
    let h = &run.handle;
    let after = h.view();
    assert_eq!(after.cluster_id, before.cluster_id);
    assert_eq!(after.plan, before.plan);
    assert_eq!(state(h, "a"), NodeState::Draining);
    assert_eq!(state(h, "b"), NodeState::Alive);
    assert_eq!(
        after.nodes[&NodeId::new("b")].capability,
        before.nodes[&NodeId::new("b")].capability
    );

    // Nodes carry on heartbeating without rejoining, and keep their shards.
    sleep(Duration::from_secs(2)).await;
    assert_eq!(served(&h.heartbeat(hb("b", 2, 0)).await.unwrap()), ["m"]);
    // A node that stays silent after the restart still dies one lease later.
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(state(h, "a"), NodeState::Dead);
    assert_eq!(state(h, "b"), NodeState::Alive);
    run.stop().await;
}

/// A store whose writes fail on demand.
#[derive(Debug, Default)]
struct FlakyStore {
    inner: MemoryStore,
    failing: AtomicBool,
}

impl FlakyStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::backend(
                "commit",
                std::io::Error::other("disk full"),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for FlakyStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.commit(txn).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_change_that_cannot_be_persisted_is_refused_and_undone() {
    let store = Arc::new(FlakyStore::default());
    let run = start_with(config(None), Arc::clone(&store) as Arc<dyn StateStore>).await;
    let h = &run.handle;
    h.join(join_info("a", "a:1", 1.0)).await.unwrap();
    h.heartbeat(hb("a", 1, 0)).await.unwrap();
    let before = h.view();

    store.failing.store(true, Ordering::SeqCst);
    let err = h.join(join_info("b", "b:1", 1.0)).await.unwrap_err();
    assert!(matches!(err, MembershipError::Store(_)));
    assert_eq!(err.class(), ErrorClass::Internal);
    let err = h.drain(NodeId::new("a")).await.unwrap_err();
    assert!(matches!(err, MembershipError::Store(_)));
    let after = h.view();
    assert!(!after.nodes.contains_key(&NodeId::new("b")));
    assert_eq!(state(h, "a"), NodeState::Alive);
    assert_eq!(after.plan, before.plan);

    // Heartbeats keep working through a store outage.
    assert_eq!(served(&h.heartbeat(hb("a", 2, 0)).await.unwrap()), ["m"]);
    store.failing.store(false, Ordering::SeqCst);
    h.join(join_info("b", "b:1", 1.0)).await.unwrap();
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn handles_report_shutdown_once_the_actor_stops() {
    let run = start_with(config(None), Arc::new(MemoryStore::new())).await;
    let h = run.handle.clone();
    run.stop().await;
    let err = h.join(join_info("a", "a:1", 1.0)).await.unwrap_err();
    assert!(matches!(err, MembershipError::ShuttingDown));
    assert_eq!(err.class(), ErrorClass::Unavailable);
}

#[tokio::test]
async fn a_redb_backed_coordinator_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.redb");
    let open =
        || -> Arc<dyn StateStore> { Arc::new(crate::store::RedbStore::open(&path).unwrap()) };
    let run = start_with(config(None), open()).await;
    run.handle.join(join_info("a", "a:1", 1.0)).await.unwrap();
    run.handle.heartbeat(hb("a", 1, 0)).await.unwrap();
    let before = run.handle.view();
    run.stop().await;

    let run = start_with(config(None), open()).await;
    let after = run.handle.view();
    assert_eq!(after.cluster_id, before.cluster_id);
    assert_eq!(after.plan, before.plan);
    assert_eq!(
        served(&run.handle.heartbeat(hb("a", 2, 0)).await.unwrap()),
        ["m"]
    );
    run.stop().await;
}
