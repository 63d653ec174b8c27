//! The cluster's trust state in the [`StateStore`]: join tokens, the certificates issued to
//! each node, and the nodes and certificates no longer trusted.
//!
//! Layout: `shoal/v1/join_tokens/<id>` ([`TokenRecord`]: the sha256 of the secret, never the
//! secret), `shoal/v1/issued/<node>/<serial>`, `shoal/v1/revoked/nodes/<node>`,
//! `shoal/v1/revoked/serials/<serial>`.
//!
//! A token is used at most once even when two nodes present it together: redeeming is a
//! compare-and-swap from the unused record to the used one, so exactly one wins. Hashing and
//! certificates are the caller's business (this crate holds no crypto); times are passed in,
//! so the rules are tested without clocks.

use crate::store::{StateStore, StoreError, Txn};
use serde::{Deserialize, Serialize};
use shoal_types::ErrorClass;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TOKENS_PREFIX: &str = "shoal/v1/join_tokens/";
const ISSUED_PREFIX: &str = "shoal/v1/issued/";
const REVOKED_NODES_PREFIX: &str = "shoal/v1/revoked/nodes/";
const REVOKED_SERIALS_PREFIX: &str = "shoal/v1/revoked/serials/";

/// A join token as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public id.
    pub id: String,
    /// sha256 of the secret, lower-case hex.
    pub secret_sha256: String,
    /// The role an enrolled node gets.
    pub role: String,
    /// Creation, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Expiry, ms since the Unix epoch.
    pub expires_unix_ms: u64,
    /// The node that used it, once used.
    pub used_by: Option<String>,
    /// When it was used, ms since the Unix epoch.
    pub used_unix_ms: Option<u64>,
}

/// Why a join token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No token has this id, or the secret does not match (the caller is not told which).
    #[error("unknown join token or wrong secret")]
    Invalid,
    /// The token's time ran out.
    #[error("the join token expired")]
    Expired,
    /// The token was used already (by `node`).
    #[error("the join token was already used by {node}")]
    Used {
        /// The node that used it.
        node: String,
    },
    /// The store failed.
    #[error("the join token could not be checked")]
    Store(#[from] StoreError),
}

impl TokenError {
    /// The class on the wire.
    pub fn class(&self) -> ErrorClass {
        match self {
            TokenError::Store(_) => ErrorClass::Internal,
            _ => ErrorClass::Unauthenticated,
        }
    }

    /// A stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Invalid => "invalid_join_token",
            TokenError::Expired => "join_token_expired",
            TokenError::Used { .. } => "join_token_used",
            TokenError::Store(_) => "state_store_failed",
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Equality of two hex digests without an early exit on the first difference.
fn digest_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

/// A revoked node or certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Revoked {
    node: String,
    revoked_unix_ms: u64,
}

/// An issued certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Issued {
    not_after_unix_ms: u64,
}

/// Every revoked node id and certificate serial.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokedSet {
    /// Node ids, sorted.
    pub nodes: Vec<String>,
    /// Serials, sorted.
    pub serials: Vec<String>,
}

/// Join tokens, issued certificates and revocations over a state store.
#[derive(Debug, Clone)]
pub struct TrustStore {
    store: Arc<dyn StateStore>,
}

impl TrustStore {
    /// Trust state kept in `store` (the coordinator's state store).
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store }
    }

    /// Stores a new token valid for `ttl` from `now`; drops expired tokens on the way.
    pub async fn create_token(
        &self,
        id: &str,
        secret_sha256: &str,
        role: &str,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<TokenRecord, StoreError> {
        self.prune_tokens(now).await?;
        let record = TokenRecord {
            id: id.to_owned(),
            secret_sha256: secret_sha256.to_owned(),
            role: role.to_owned(),
            created_unix_ms: unix_ms(now),
            expires_unix_ms: unix_ms(now + ttl),
            used_by: None,
            used_unix_ms: None,
        };
        let key = format!("{TOKENS_PREFIX}{id}");
        let stored = self
            .store
            .compare_and_swap(&key, None, encode(&key, &record)?)
            .await?;
        if !stored {
            // 64 random bits collided: refuse rather than overwrite someone's token.
            return Err(StoreError::backend(
                "create_token",
                "a join token with this id exists",
            ));
        }
        Ok(record)
    }

    /// Checks a token and marks it used by `node`, at most once. Returns its record (with
    /// the role the node gets). The secret is checked before anything else is revealed.
    pub async fn redeem_token(
        &self,
        id: &str,
        secret_sha256: &str,
        node: &str,
        now: SystemTime,
    ) -> Result<TokenRecord, TokenError> {
        let key = format!("{TOKENS_PREFIX}{id}");
        let Some(bytes) = self.store.get(&key).await? else {
            return Err(TokenError::Invalid);
        };
        let record: TokenRecord = decode(&key, &bytes)?;
        if !digest_eq(&record.secret_sha256, secret_sha256) {
            return Err(TokenError::Invalid);
        }
        if let Some(node) = &record.used_by {
            return Err(TokenError::Used { node: node.clone() });
        }
        if unix_ms(now) >= record.expires_unix_ms {
            return Err(TokenError::Expired);
        }
        let used = TokenRecord {
            used_by: Some(node.to_owned()),
            used_unix_ms: Some(unix_ms(now)),
            ..record
        };
        let swapped = self
            .store
            .compare_and_swap(&key, Some(bytes), encode(&key, &used)?)
            .await?;
        if !swapped {
            // Someone redeemed it between our read and our write.
            let node = match self.store.get(&key).await? {
                Some(b) => decode::<TokenRecord>(&key, &b)?.used_by,
                None => None,
            };
            return Err(TokenError::Used {
                node: node.unwrap_or_default(),
            });
        }
        Ok(used)
    }

    /// Deletes tokens that expired before `now` (used or not).
    pub async fn prune_tokens(&self, now: SystemTime) -> Result<usize, StoreError> {
        let now = unix_ms(now);
        let mut txn = Txn::new();
        let mut n = 0;
        for (key, bytes) in self.store.list(TOKENS_PREFIX).await? {
            // An unreadable record is left for an operator to look at.
            if let Ok(r) = decode::<TokenRecord>(&key, &bytes)
                && r.expires_unix_ms <= now
            {
                txn = txn.delete(key);
                n += 1;
            }
        }
        if n > 0 {
            self.store.commit(txn).await?;
        }
        Ok(n)
    }

    /// Records that the certificate `serial` was issued to `node`.
    pub async fn record_issued(
        &self,
        node: &str,
        serial: &str,
        not_after: SystemTime,
    ) -> Result<(), StoreError> {
        let key = format!("{ISSUED_PREFIX}{node}/{serial}");
        let value = encode(
            &key,
            &Issued {
                not_after_unix_ms: unix_ms(not_after),
            },
        )?;
        self.store.put(&key, value).await
    }

    /// Serials of the certificates issued to `node`, sorted.
    pub async fn issued_serials(&self, node: &str) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{ISSUED_PREFIX}{node}/");
        Ok(self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_owned))
            .collect())
    }

    /// Revokes `node` and the certificates `serials` in one transaction. Returns whether
    /// the node was not revoked before.
    pub async fn revoke_node(
        &self,
        node: &str,
        serials: &[String],
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        let node_key = format!("{REVOKED_NODES_PREFIX}{node}");
        let fresh = self.store.get(&node_key).await?.is_none();
        let record = Revoked {
            node: node.to_owned(),
            revoked_unix_ms: unix_ms(now),
        };
        let mut txn = Txn::new().put(node_key.clone(), encode(&node_key, &record)?);
        for serial in serials {
            let key = format!("{REVOKED_SERIALS_PREFIX}{serial}");
            txn = txn.put(key.clone(), encode(&key, &record)?);
        }
        self.store.commit(txn).await?;
        Ok(fresh)
    }

    /// Everything revoked.
    pub async fn revoked(&self) -> Result<RevokedSet, StoreError> {
        let names = |list: Vec<(String, Vec<u8>)>, prefix: &str| -> Vec<String> {
            list.into_iter()
                .filter_map(|(k, _)| k.strip_prefix(prefix).map(str::to_owned))
                .collect()
        };
        Ok(RevokedSet {
            nodes: names(
                self.store.list(REVOKED_NODES_PREFIX).await?,
                REVOKED_NODES_PREFIX,
            ),
            serials: names(
                self.store.list(REVOKED_SERIALS_PREFIX).await?,
                REVOKED_SERIALS_PREFIX,
            ),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn trust() -> TrustStore {
        TrustStore::new(Arc::new(MemoryStore::new()))
    }

    const HASH: &str = "aa11";
    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_token_is_redeemed_once_before_it_expires() {
        let t = trust();
        let now = SystemTime::now();
        let rec = t
            .create_token("id1", HASH, "agent", now, MINUTE)
            .await
            .unwrap();
        assert_eq!(rec.role, "agent");
        assert!(matches!(
            t.redeem_token("id1", "bb22", "n1", now).await,
            Err(TokenError::Invalid)
        ));
        assert!(matches!(
            t.redeem_token("nope", HASH, "n1", now).await,
            Err(TokenError::Invalid)
        ));
        let used = t.redeem_token("id1", HASH, "n1", now).await.unwrap();
        assert_eq!(used.used_by.as_deref(), Some("n1"));
        let again = t.redeem_token("id1", HASH, "n2", now).await.unwrap_err();
        assert!(matches!(&again, TokenError::Used { node } if node == "n1"));
        assert_eq!(again.reason(), "join_token_used");
        assert_eq!(again.class(), ErrorClass::Unauthenticated);

        t.create_token("id2", HASH, "agent", now, MINUTE)
            .await
            .unwrap();
        let late = t
            .redeem_token("id2", HASH, "n3", now + MINUTE)
            .await
            .unwrap_err();
        assert_eq!(late.reason(), "join_token_expired");
        // Creating another token prunes the expired ones.
        t.create_token("id3", HASH, "agent", now + 2 * MINUTE, MINUTE)
            .await
            .unwrap();
        assert!(matches!(
            t.redeem_token("id2", HASH, "n3", now).await,
            Err(TokenError::Invalid)
        ));
        assert!(
            t.create_token("id3", HASH, "agent", now, MINUTE)
                .await
                .is_err(),
            "an existing id was overwritten"
        );
    }

    #[tokio::test]
    async fn two_nodes_racing_for_one_token_get_it_once() {
        let t = trust();
        let now = SystemTime::now();
        t.create_token("race", HASH, "agent", now, MINUTE)
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            t.redeem_token("race", HASH, "a", now),
            t.redeem_token("race", HASH, "b", now)
        );
        assert_eq!(u8::from(a.is_ok()) + u8::from(b.is_ok()), 1, "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn revocations_and_issued_serials_persist() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
        let t = TrustStore::new(Arc::clone(&store));
        let now = SystemTime::now();
        t.record_issued("n1", "0abc", now + MINUTE).await.unwrap();
        t.record_issued("n1", "0def", now + MINUTE).await.unwrap();
        t.record_issued("n10", "0fff", now + MINUTE).await.unwrap();
        let serials = t.issued_serials("n1").await.unwrap();
        assert_eq!(serials, vec!["0abc".to_owned(), "0def".to_owned()]);
        assert!(t.revoke_node("n1", &serials, now).await.unwrap());
        assert!(!t.revoke_node("n1", &[], now).await.unwrap());
        let again = TrustStore::new(store);
        assert_eq!(
            again.revoked().await.unwrap(),
            RevokedSet {
                nodes: vec!["n1".to_owned()],
                serials,
            }
        );
    }

    #[test]
    fn digests_compare_exactly() {
        assert!(digest_eq("abc", "abc"));
        assert!(!digest_eq("abc", "abd"));
        assert!(!digest_eq("abc", "ab"));
    }
}
