//! The coordinator's durable state behind one small key-value trait, so that the backend can
//! be an in-process map (tests, a throwaway cluster), an embedded file ([`RedbStore`]), or later
//! a replicated store such as etcd without touching the membership logic.
//!
//! The trait is deliberately the intersection of what those backends offer natively: string
//! keys, byte values, listing by prefix, and one conditional multi-key transaction (compare
//! values, then apply puts and deletes atomically), which is exactly etcd's `Txn` restricted to
//! value comparisons.

mod memory;
mod redb_store;

pub use memory::MemoryStore;
pub use redb_store::RedbStore;

use async_trait::async_trait;
use std::fmt;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database could not be opened or created.
    #[error("cannot open the state store at {path}")]
    Open {
        /// The database file.
        path: std::path::PathBuf,
        /// What the database reported.
        #[source]
        source: Box<redb::Error>,
    },
    /// A read or write of the backend failed.
    #[error("state store {operation} failed")]
    Backend {
        /// What was being done (`get`, `put`, `list`, `commit`...).
        operation: &'static str,
        /// What the backend reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored value could not be decoded (written by an incompatible version, or corrupted).
    #[error("stored value under {key:?} is not valid")]
    Corrupt {
        /// The key whose value is bad.
        key: String,
        /// The decoding failure.
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode the value for {key:?}")]
    Encode {
        /// The key being written.
        key: String,
        /// The encoding failure.
        #[source]
        source: serde_json::Error,
    },
    /// The blocking worker running a backend call was lost (the runtime is shutting down).
    #[error("state store worker stopped before finishing {operation}")]
    WorkerLost {
        /// What was being done.
        operation: &'static str,
    },
}

impl StoreError {
    pub(crate) fn backend(
        operation: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError::Backend {
            operation,
            source: source.into(),
        }
    }
}

/// One condition of a [`Txn`]: the current value under `key` must equal `expected`
/// (`None`: the key must be absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key to check.
    pub key: String,
    /// The value it must hold, or `None` for "absent".
    pub expected: Option<Vec<u8>>,
}

/// One write of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
    },
    /// Remove `key` (no error when absent).
    Delete {
        /// The key.
        key: String,
    },
}

/// An atomic conditional write: if every comparison holds, every op is applied, all at once;
/// otherwise nothing changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions checked against the state before any op.
    pub compares: Vec<Compare>,
    /// Writes applied, in order, when all conditions hold.
    pub ops: Vec<Op>,
}

impl Txn {
    /// An empty transaction (no conditions, no writes).
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds the condition "`key` holds `expected`" (`None`: absent).
    pub fn when(mut self, key: impl Into<String>, expected: Option<Vec<u8>>) -> Self {
        self.compares.push(Compare {
            key: key.into(),
            expected,
        });
        self
    }
    /// Adds a put.
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
        });
        self
    }
    /// Adds a delete.
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }
}

/// Durable key-value state of the coordinator.
///
/// Implementations must make [`StateStore::commit`] atomic and must return [`StateStore::list`]
/// results sorted by key. Keys are UTF-8 strings; values are opaque bytes.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug {
    /// The value under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets `key` to `value`.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Removes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Every `(key, value)` whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies `txn` atomically; returns `false` (and changes nothing) when a condition failed.
    async fn commit(&self, txn: Txn) -> Result<bool, StoreError>;

    /// Sets `key` to `new` only if it currently holds `expected` (`None`: absent).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        self.commit(Txn::new().when(key, expected).put(key, new))
            .await
    }
}

/// Behaviour every backend must share; each backend's tests run it.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
pub(crate) mod contract {
    use super::*;

    pub(crate) async fn check(store: &dyn StateStore) {
        assert_eq!(store.get("a").await.unwrap(), None);
        store.put("a", b"1".to_vec()).await.unwrap();
        store.put("p/2", b"two".to_vec()).await.unwrap();
        store.put("p/1", b"one".to_vec()).await.unwrap();
        store.put("q/1", b"other".to_vec()).await.unwrap();
        assert_eq!(store.get("a").await.unwrap(), Some(b"1".to_vec()));

        // Listing is by prefix and sorted.
        let listed = store.list("p/").await.unwrap();
        assert_eq!(
            listed,
            vec![
                ("p/1".to_owned(), b"one".to_vec()),
                ("p/2".to_owned(), b"two".to_vec())
            ]
        );
        assert_eq!(store.list("").await.unwrap().len(), 4);
        assert!(store.list("zz").await.unwrap().is_empty());

        // Overwrite and delete.
        store.put("a", b"2".to_vec()).await.unwrap();
        assert_eq!(store.get("a").await.unwrap(), Some(b"2".to_vec()));
        assert!(store.delete("a").await.unwrap());
        assert!(!store.delete("a").await.unwrap());
        assert_eq!(store.get("a").await.unwrap(), None);

        // Compare-and-swap: absent, then a matching and a stale expectation.
        assert!(
            store
                .compare_and_swap("cas", None, b"x".to_vec())
                .await
                .unwrap()
        );
        assert!(
            !store
                .compare_and_swap("cas", None, b"y".to_vec())
                .await
                .unwrap()
        );
        assert!(
            !store
                .compare_and_swap("cas", Some(b"y".to_vec()), b"z".to_vec())
                .await
                .unwrap()
        );
        assert!(
            store
                .compare_and_swap("cas", Some(b"x".to_vec()), b"z".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(store.get("cas").await.unwrap(), Some(b"z".to_vec()));

        // A failed condition applies none of the ops, a passing one applies all of them.
        let txn = Txn::new()
            .when("p/1", Some(b"one".to_vec()))
            .when("cas", Some(b"wrong".to_vec()))
            .put("t/1", b"1".to_vec())
            .delete("p/2");
        assert!(!store.commit(txn).await.unwrap());
        assert_eq!(store.get("t/1").await.unwrap(), None);
        assert_eq!(store.get("p/2").await.unwrap(), Some(b"two".to_vec()));
        let txn = Txn::new()
            .when("p/1", Some(b"one".to_vec()))
            .when("absent", None)
            .put("t/1", b"1".to_vec())
            .put("t/2", b"2".to_vec())
            .delete("p/2");
        assert!(store.commit(txn).await.unwrap());
        assert_eq!(store.list("t/").await.unwrap().len(), 2);
        assert_eq!(store.get("p/2").await.unwrap(), None);

        // Ops apply in order: a put then a delete of the same key leaves it absent.
        assert!(
            store
                .commit(Txn::new().put("o", b"1".to_vec()).delete("o"))
                .await
                .unwrap()
        );
        assert_eq!(store.get("o").await.unwrap(), None);
    }
}
