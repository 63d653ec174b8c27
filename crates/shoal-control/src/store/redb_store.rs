//! A durable store in one embedded redb file, for a single coordinator that must resume after a
//! restart. Every call runs on tokio's blocking pool: commits fsync, and that must never stall
//! the reactor.

use super::{Op, StateStore, StoreError, Txn};
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Every key lives in one table: the trait's keyspace is flat and prefixes give it structure.
const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("shoal_state");

/// A [`StateStore`] backed by a redb database file.
#[derive(Debug, Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl RedbStore {
    /// Opens the database at `path`, creating the file (and its table) when missing.
    ///
    /// Blocking: call it at start-up, or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |e: redb::Error| StoreError::Open {
            path: path.clone(),
            source: Box::new(e),
        };
        let db = Database::create(&path).map_err(|e| open_err(e.into()))?;
        // Creating the table up front lets every read transaction open it unconditionally.
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        txn.open_table(TABLE).map_err(|e| open_err(e.into()))?;
        txn.commit().map_err(|e| open_err(e.into()))?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, operation: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|_| StoreError::WorkerLost { operation })?
            .map_err(|e| StoreError::backend(operation, e))
    }
}

#[async_trait]
impl StateStore for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.blocking("get", move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TABLE)?;
            Ok(table.get(key.as_str())?.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.blocking("put", move |db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(TABLE)?;
                table.insert(key.as_str(), value.as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.blocking("delete", move |db| {
            let txn = db.begin_write()?;
            let existed = {
                let mut table = txn.open_table(TABLE)?;
                table.remove(key.as_str())?.is_some()
            };
            txn.commit()?;
            Ok(existed)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking("list", move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TABLE)?;
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..)? {
                let (k, v) = entry?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                out.push((k.to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        self.blocking("commit", move |db| {
            // redb has a single writer at a time, so checking and writing inside one write
            // transaction is atomic with respect to every other commit.
            let wtx = db.begin_write()?;
            let applied = {
                let mut table = wtx.open_table(TABLE)?;
                let mut holds = true;
                for c in &txn.compares {
                    let current = table.get(c.key.as_str())?.map(|v| v.value().to_vec());
                    if current != c.expected {
                        holds = false;
                        break;
                    }
                }
                if holds {
                    for op in &txn.ops {
                        match op {
                            Op::Put { key, value } => {
                                table.insert(key.as_str(), value.as_slice())?;
                            }
                            Op::Delete { key } => {
                                table.remove(key.as_str())?;
                            }
                        }
                    }
                }
                holds
            };
            if applied {
                wtx.commit()?;
            } else {
                wtx.abort()?;
            }
            Ok(applied)
        })
        .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[tokio::test]
    async fn redb_store_honours_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
        super::super::contract::check(&store).await;
    }

    #[tokio::test]
    async fn redb_store_keeps_values_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            store.put("k", b"v".to_vec()).await.unwrap();
            assert!(
                store
                    .commit(Txn::new().put("a/1", b"1".to_vec()))
                    .await
                    .unwrap()
            );
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get("k").await.unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            store.list("a/").await.unwrap(),
            vec![("a/1".to_owned(), b"1".to_vec())]
        );
    }

    #[test]
    fn opening_a_non_database_file_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.redb");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        assert!(matches!(
            RedbStore::open(&path),
            Err(StoreError::Open { .. })
        ));
    }
}
