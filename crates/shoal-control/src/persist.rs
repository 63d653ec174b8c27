//! The coordinator's durable layout on top of [`StateStore`]: which keys hold what, and the
//! JSON records stored under them. JSON keeps the store readable with generic tools (and by an
//! etcd client) and lets fields be added without a migration.
//!
//! Layout: `shoal/v1/cluster_id` (raw UTF-8), `shoal/v1/nodes/<node id>` ([`NodeRecord`]),
//! `shoal/v1/plan` ([`Plan`]).

use crate::membership::{LocalModel, NodeCapability, NodeState};
use crate::placement::Plan;
use crate::store::{StateStore, StoreError, Txn};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_types::NodeId;

const CLUSTER_ID_KEY: &str = "shoal/v1/cluster_id";
const NODES_PREFIX: &str = "shoal/v1/nodes/";
const PLAN_KEY: &str = "shoal/v1/plan";

/// What survives a restart about a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    pub id: NodeId,
    pub state: NodeState,
    pub data_addr: String,
    pub http_addr: Option<String>,
    pub capability: NodeCapability,
    pub memory_budget_bytes: u64,
    pub local_models: Vec<LocalModel>,
}

pub(crate) fn node_key(id: &NodeId) -> String {
    format!("{NODES_PREFIX}{id}")
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

/// The cluster id: the stored one, or `fresh` stored now. A compare-and-swap makes two
/// coordinators starting together on a shared store agree on one id.
pub(crate) async fn cluster_id(
    store: &dyn StateStore,
    fresh: String,
) -> Result<String, StoreError> {
    if let Some(bytes) = store.get(CLUSTER_ID_KEY).await? {
        return Ok(String::from_utf8_lossy(&bytes).into_owned());
    }
    if store
        .compare_and_swap(CLUSTER_ID_KEY, None, fresh.clone().into_bytes())
        .await?
    {
        return Ok(fresh);
    }
    // Lost the race: the winner's id is there now.
    let bytes = store.get(CLUSTER_ID_KEY).await?.unwrap_or_default();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Every stored node.
pub(crate) async fn load_nodes(store: &dyn StateStore) -> Result<Vec<NodeRecord>, StoreError> {
    store
        .list(NODES_PREFIX)
        .await?
        .iter()
        .map(|(k, v)| decode(k, v))
        .collect()
}

/// The stored plan, if any.
pub(crate) async fn load_plan(store: &dyn StateStore) -> Result<Option<Plan>, StoreError> {
    store
        .get(PLAN_KEY)
        .await?
        .map(|v| decode(PLAN_KEY, &v))
        .transpose()
}

/// Collects the writes of one membership change, committed together.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    txn: Txn,
}

impl Batch {
    pub fn put_node(&mut self, record: &NodeRecord) -> Result<(), StoreError> {
        let key = node_key(&record.id);
        let value = encode(&key, record)?;
        self.txn.ops.push(crate::store::Op::Put { key, value });
        Ok(())
    }

    pub fn delete_node(&mut self, id: &NodeId) {
        self.txn
            .ops
            .push(crate::store::Op::Delete { key: node_key(id) });
    }

    pub fn put_plan(&mut self, plan: &Plan) -> Result<(), StoreError> {
        let value = encode(PLAN_KEY, plan)?;
        self.txn.ops.push(crate::store::Op::Put {
            key: PLAN_KEY.to_owned(),
            value,
        });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.txn.ops.is_empty()
    }

    /// Writes everything atomically.
    pub async fn commit(self, store: &dyn StateStore) -> Result<(), StoreError> {
        if self.is_empty() {
            return Ok(());
        }
        // No conditions: a single coordinator owns these keys, so the commit always applies.
        store.commit(self.txn).await.map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn the_first_cluster_id_sticks() {
        let store = MemoryStore::new();
        assert_eq!(cluster_id(&store, "one".into()).await.unwrap(), "one");
        assert_eq!(cluster_id(&store, "two".into()).await.unwrap(), "one");
    }

    #[tokio::test]
    async fn records_round_trip_and_garbage_is_reported() {
        let store = MemoryStore::new();
        let rec = NodeRecord {
            id: NodeId::new("a"),
            state: NodeState::Draining,
            data_addr: "10.0.0.1:7000".into(),
            http_addr: None,
            capability: NodeCapability {
                cores: 4,
                ..Default::default()
            },
            memory_budget_bytes: 42,
            local_models: vec![],
        };
        let mut batch = Batch::default();
        batch.put_node(&rec).unwrap();
        batch
            .put_plan(&Plan {
                epoch: 7,
                assignments: vec![],
            })
            .unwrap();
        batch.commit(&store).await.unwrap();
        assert_eq!(load_nodes(&store).await.unwrap(), vec![rec]);
        assert_eq!(load_plan(&store).await.unwrap().unwrap().epoch, 7);

        store
            .put(&node_key(&NodeId::new("b")), b"{not json".to_vec())
            .await
            .unwrap();
        assert!(
            matches!(load_nodes(&store).await, Err(StoreError::Corrupt { key, .. }) if key.ends_with("/b"))
        );
    }
}
