//! An in-process store: for tests and for a coordinator that need not survive a restart.

use super::{Op, StateStore, StoreError, Txn};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// A [`StateStore`] held in memory; cloning shares nothing (use an `Arc` to share one).
#[derive(Debug, Default)]
pub struct MemoryStore {
    // A std mutex is right here: it is never held across an await, and every operation is a
    // few map calls.
    map: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-written (each operation is
        // a single map call or a fully checked batch), so a poisoned lock is still consistent.
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.lock().insert(key.to_owned(), value);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().remove(key).is_some())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let map = self.lock();
        Ok(map
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        let mut map = self.lock();
        let holds = txn
            .compares
            .iter()
            .all(|c| map.get(&c.key) == c.expected.as_ref());
        if !holds {
            return Ok(false);
        }
        for op in txn.ops {
            match op {
                Op::Put { key, value } => {
                    map.insert(key, value);
                }
                Op::Delete { key } => {
                    map.remove(&key);
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_honours_the_contract() {
        super::super::contract::check(&MemoryStore::new()).await;
    }
}
