//! Client access control on `/v1`: API keys from the key file, per-key rate limits (token
//! buckets) and token quotas.
//!
//! - The key file is re-read when it changes (device, inode, size or modification time differ
//!   from the last read; `shoal key` replaces it by rename, so every change is a new inode) and
//!   at least every [`MAX_CACHE_AGE`], so `shoal key create` and `shoal key revoke` take effect
//!   on the next request of a running gateway. A file that cannot be read or parsed fails
//!   closed: requests get 503 `auth_unavailable` until it is fixed.
//! - Keys are required once the file has held any key during this run (revoked ones count, so
//!   revoking the last key does not open the gateway), when `require_api_key` is set, or when a
//!   static `api_key` is configured. Otherwise the gateway is open and ignores any key sent.
//! - Rate limits are token buckets per key id, in memory (a restart refills them). Quotas count
//!   prompt plus completion tokens per key id; usage is persisted to `<stem>.usage.json` next to
//!   the key file at most once per [`USAGE_SAVE_INTERVAL`] and at shutdown, so a crash loses at
//!   most that much accounting. One gateway process owns a usage file. A request is admitted
//!   while usage is below the quota, so the request that crosses it completes; the next is
//!   refused with 429 `insufficient_quota`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, header};
use shoal_types::ErrorClass;
use tokio::time::Instant;

use crate::error::{RequestError, reason};
use crate::keys::{self, KeyError, KeyRecord, UsageDoc};
use crate::metrics::{AuthFailure, LimitRefusal, Metrics};

/// The longest a cached key file is trusted without looking at it again.
pub const MAX_CACHE_AGE: Duration = Duration::from_secs(2);
/// Usage is written to disk at most this often (and at shutdown).
pub const USAGE_SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// The key id recorded for the static `api_key` of [`crate::ApiConfig`].
pub const STATIC_KEY_ID: &str = "static";

/// Who is calling: the key that authenticated the request.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    key_id: String,
    /// Counters of a key from the file; none for the static key.
    counters: Option<(Arc<KeyStore>, Arc<KeyCounters>)>,
}

impl Principal {
    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Adds `tokens` to the key's usage.
    pub(crate) fn charge(&self, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if let Some((store, counters)) = &self.counters {
            counters.used.fetch_add(tokens, Ordering::Relaxed);
            store.usage_dirty.store(true, Ordering::Release);
            store.maybe_save_usage();
        }
    }
}

/// Authenticates requests and applies per-key limits.
pub(crate) struct Authenticator {
    static_key: Option<String>,
    store: Option<Arc<KeyStore>>,
    require: bool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "static_key",
                &self.static_key.as_ref().map(|_| "<redacted>"),
            )
            .field("key_file", &self.store.as_ref().map(|s| s.path.clone()))
            .field("require", &self.require)
            .finish()
    }
}

impl Authenticator {
    /// Loads the key file (a missing one holds no keys) and the saved usage.
    pub(crate) fn new(
        static_key: Option<String>,
        key_file: Option<&Path>,
        require: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KeyError> {
        let store = key_file.map(KeyStore::open).transpose()?.map(Arc::new);
        Ok(Self {
            static_key,
            store,
            require,
            metrics,
        })
    }

    /// Checks `Authorization: Bearer <key>`. `Ok(None)` means the gateway is open and the
    /// request carries no known key.
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Principal>, RequestError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let result = self.check(presented);
        if let Err(failure) = &result {
            self.metrics.auth_failure(*failure);
        }
        result.map_err(auth_error)
    }

    fn check(&self, presented: Option<&str>) -> Result<Option<Principal>, AuthFailure> {
        let keys = match &self.store {
            Some(store) => Some(
                store
                    .current()
                    .map_err(|()| AuthFailure::StoreUnavailable)?,
            ),
            None => None,
        };
        let required = self.require
            || self.static_key.is_some()
            || keys.as_ref().is_some_and(|k| k.ever_had_keys);
        let Some(presented) = presented else {
            return if required {
                Err(AuthFailure::Missing)
            } else {
                Ok(None)
            };
        };
        if let Some(expected) = &self.static_key
            && constant_time_eq(presented.as_bytes(), expected.as_bytes())
        {
            return Ok(Some(Principal {
                key_id: STATIC_KEY_ID.to_owned(),
                counters: None,
            }));
        }
        if !required {
            // An open gateway ignores keys: OpenAI clients always send one.
            return Ok(None);
        }
        let (Some(store), Some(keys)) = (&self.store, keys) else {
            return Err(AuthFailure::UnknownKey);
        };
        let parsed = keys::parse_presented(presented).ok_or(AuthFailure::Malformed)?;
        let entry = keys.by_id.get(parsed.id).ok_or(AuthFailure::UnknownKey)?;
        let digest = keys::secret_digest(parsed.secret);
        if !constant_time_eq(&digest, &entry.digest) {
            return Err(AuthFailure::WrongSecret);
        }
        if entry.revoked {
            return Err(AuthFailure::Revoked);
        }
        Ok(Some(Principal {
            key_id: parsed.id.to_owned(),
            counters: Some((store.clone(), entry.counters.clone())),
        }))
    }

    /// Applies the key's quota, then its rate limit, to one generation request.
    pub(crate) fn admit(&self, principal: Option<&Principal>) -> Result<(), RequestError> {
        let Some(principal) = principal else {
            return Ok(());
        };
        let Some((store, counters)) = &principal.counters else {
            return Ok(());
        };
        let Ok(keys) = store.current() else {
            self.metrics.auth_failure(AuthFailure::StoreUnavailable);
            return Err(auth_error(AuthFailure::StoreUnavailable));
        };
        let Some(entry) = keys.by_id.get(principal.key_id()) else {
            // Removed from the file since authentication: treat as unknown.
            self.metrics.auth_failure(AuthFailure::UnknownKey);
            return Err(auth_error(AuthFailure::UnknownKey));
        };
        if let Some(quota) = entry.quota_tokens
            && counters.used.load(Ordering::Relaxed) >= quota
        {
            self.metrics.limit_refusal(LimitRefusal::Quota);
            return Err(RequestError::new(
                ErrorClass::CapacityExhausted,
                reason::INSUFFICIENT_QUOTA,
                "You exceeded your current quota of tokens for this API key.",
            ));
        }
        if let Some((rate, burst)) = entry.rate {
            let mut bucket = counters
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(wait) = bucket.try_take(rate, burst, Instant::now()) {
                self.metrics.limit_refusal(LimitRefusal::RateLimit);
                let mut err = RequestError::new(
                    ErrorClass::CapacityExhausted,
                    reason::RATE_LIMIT_EXCEEDED,
                    format!(
                        "Rate limit reached for this API key ({rate} requests per second); retry after the time in Retry-After."
                    ),
                );
                err.retry_after_secs = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Writes pending usage (at shutdown).
    pub(crate) fn save_usage(&self) {
        if let Some(store) = &self.store {
            store.save_usage();
        }
    }
}

fn auth_error(failure: AuthFailure) -> RequestError {
    match failure {
        AuthFailure::Missing => RequestError::new(
            ErrorClass::Unauthenticated,
            reason::INVALID_API_KEY,
            "Missing API key: send 'Authorization: Bearer <key>'.",
        ),
        AuthFailure::Malformed | AuthFailure::UnknownKey | AuthFailure::WrongSecret => {
            RequestError::new(
                ErrorClass::Unauthenticated,
                reason::INVALID_API_KEY,
                "Incorrect API key provided.",
            )
        }
        AuthFailure::Revoked => RequestError::new(
            ErrorClass::Unauthenticated,
            reason::INVALID_API_KEY,
            "This API key has been revoked.",
        ),
        AuthFailure::StoreUnavailable => RequestError::new(
            ErrorClass::Unavailable,
            reason::AUTH_UNAVAILABLE,
            "API keys cannot be checked right now; retry later.",
        ),
    }
}

/// Compares without an early exit so response timing does not reveal how much of a guessed key
/// matched (the length is not secret).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token bucket: `burst` requests at once, refilled at `rate` per second.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    /// Takes one token, or says how long until one is available.
    fn try_take(&mut self, rate: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        let cap = f64::from(burst);
        self.tokens = match self.last {
            None => cap,
            Some(last) => (self.tokens + now.duration_since(last).as_secs_f64() * rate).min(cap),
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Per-key state that outlives reloads of the key file.
#[derive(Debug)]
pub(crate) struct KeyCounters {
    used: AtomicU64,
    bucket: Mutex<Bucket>,
}

/// One key as the gateway checks it.
#[derive(Debug)]
struct KeyEntry {
    digest: [u8; 32],
    revoked: bool,
    quota_tokens: Option<u64>,
    rate: Option<(f64, u32)>,
    counters: Arc<KeyCounters>,
}

/// A parsed key file.
#[derive(Debug)]
struct Keys {
    by_id: HashMap<String, KeyEntry>,
    ever_had_keys: bool,
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    dev_ino: (u64, u64),
}

fn identity(path: &Path) -> std::io::Result<Option<FileIdentity>> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(FileIdentity {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            dev_ino: {
                use std::os::unix::fs::MetadataExt as _;
                (meta.dev(), meta.ino())
            },
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Debug)]
struct Cache {
    identity: Option<Option<FileIdentity>>,
    read_at: Instant,
    keys: Result<Arc<Keys>, ()>,
    ever_had_keys: bool,
    counters: HashMap<String, Arc<KeyCounters>>,
}

/// The key file as the gateway sees it, and the keys' usage.
#[derive(Debug)]
struct KeyStore {
    path: PathBuf,
    usage_path: PathBuf,
    cache: Mutex<Cache>,
    usage_dirty: AtomicBool,
    last_usage_save: Mutex<Instant>,
}

impl KeyStore {
    fn open(path: &Path) -> Result<KeyStore, KeyError> {
        let records = keys::read_keys(path)?;
        let saved = keys::read_usage(path)?;
        let counters = saved
            .into_iter()
            .map(|(id, used)| (id, new_counters(used)))
            .collect();
        let mut cache = Cache {
            identity: None,
            read_at: Instant::now(),
            keys: Err(()),
            ever_had_keys: false,
            counters,
        };
        let identity = identity(path).map_err(|source| KeyError::Io {
            what: "reading",
            path: path.to_owned(),
            source,
        })?;
        cache.install(identity, records);
        tracing::info!(file = %path.display(), keys = cache.keys.as_ref().map_or(0, |k| k.by_id.len()), "API key file loaded");
        Ok(KeyStore {
            path: path.to_owned(),
            usage_path: keys::usage_path(path),
            cache: Mutex::new(cache),
            usage_dirty: AtomicBool::new(false),
            last_usage_save: Mutex::new(Instant::now()),
        })
    }

    /// The keys as of now, re-read if the file changed; `Err` while it is unreadable.
    fn current(&self) -> Result<Arc<Keys>, ()> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let identity = match identity(&self.path) {
            Ok(identity) => identity,
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot stat the API key file; refusing requests");
                cache.identity = None;
                cache.keys = Err(());
                return Err(());
            }
        };
        let stale = now.duration_since(cache.read_at) >= MAX_CACHE_AGE;
        if cache.identity.as_ref() != Some(&identity) || stale {
            match keys::read_keys(&self.path) {
                Ok(records) => {
                    if cache.identity.as_ref() != Some(&identity) {
                        tracing::info!(file = %self.path.display(), keys = records.len(), "API key file reloaded");
                    }
                    cache.install(identity, records);
                }
                Err(e) => {
                    if cache.keys.is_ok() || cache.identity.as_ref() != Some(&identity) {
                        tracing::error!(error = %e, "the API key file is unusable; refusing requests until it is fixed");
                    }
                    cache.identity = Some(identity);
                    cache.keys = Err(());
                }
            }
            cache.read_at = now;
        }
        cache.keys.clone()
    }

    fn maybe_save_usage(&self) {
        let due = {
            let mut last = self
                .last_usage_save
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            if now.duration_since(*last) >= USAGE_SAVE_INTERVAL {
                *last = now;
                true
            } else {
                false
            }
        };
        if due {
            self.save_usage();
        }
    }

    fn save_usage(&self) {
        if !self.usage_dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let used_tokens = {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cache
                .counters
                .iter()
                .map(|(id, c)| (id.clone(), c.used.load(Ordering::Relaxed)))
                .filter(|(_, used)| *used > 0)
                .collect()
        };
        let doc = UsageDoc {
            version: 1,
            used_tokens,
        };
        let written = serde_json::to_vec_pretty(&doc)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                keys::write_atomically(&self.usage_path, &bytes).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            self.usage_dirty.store(true, Ordering::Release);
            tracing::error!(file = %self.usage_path.display(), error = %e, "saving API key usage failed");
        }
    }
}

fn new_counters(used: u64) -> Arc<KeyCounters> {
    Arc::new(KeyCounters {
        used: AtomicU64::new(used),
        bucket: Mutex::new(Bucket {
            tokens: 0.0,
            last: None,
        }),
    })
}

impl Cache {
    fn install(&mut self, identity: Option<FileIdentity>, records: Vec<KeyRecord>) {
        self.ever_had_keys |= !records.is_empty();
        let by_id = records
            .into_iter()
            .filter_map(|record| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(&record.secret_sha256, &mut digest).ok()?;
                let counters = self
                    .counters
                    .entry(record.id.clone())
                    .or_insert_with(|| new_counters(0))
                    .clone();
                let rate = record.rate_per_second.zip(record.effective_burst());
                Some((
                    record.id,
                    KeyEntry {
                        digest,
                        revoked: record.revoked,
                        quota_tokens: record.quota_tokens,
                        rate,
                        counters,
                    },
                ))
            })
            .collect();
        self.identity = Some(identity);
        self.keys = Ok(Arc::new(Keys {
            by_id,
            ever_had_keys: self.ever_had_keys,
        }));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::keys::{Limits, create_key, revoke_key};
    use axum::http::HeaderValue;

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        headers
    }

    fn auth(path: &Path, require: bool) -> Authenticator {
        Authenticator::new(None, Some(path), require, Arc::new(Metrics::new())).unwrap()
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[tokio::test]
    async fn open_until_a_key_exists_then_closed_even_after_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.json");
        let a = auth(&path, false);
        assert!(a.authenticate(&HeaderMap::new()).unwrap().is_none());
        assert!(a.authenticate(&bearer("anything")).unwrap().is_none());

        let key = create_key(&path, "k", Limits::default()).unwrap();
        let err = a.authenticate(&HeaderMap::new()).unwrap_err();
        assert_eq!(err.reason, reason::INVALID_API_KEY);
        let who = a.authenticate(&bearer(key.key.expose())).unwrap().unwrap();
        assert_eq!(who.key_id(), key.record.id);

        revoke_key(&path, &key.record.id).unwrap();
        let err = a.authenticate(&bearer(key.key.expose())).unwrap_err();
        assert_eq!(err.class, ErrorClass::Unauthenticated);
        assert!(err.message.contains("revoked"), "{}", err.message);
        // Revoking the last key does not open the gateway.
        assert!(a.authenticate(&HeaderMap::new()).is_err());
        // Nor does deleting the file.
        std::fs::remove_file(&path).unwrap();
        assert!(a.authenticate(&HeaderMap::new()).is_err());
        assert!(a.authenticate(&bearer(key.key.expose())).is_err());
    }

    #[tokio::test]
    async fn wrong_secret_and_malformed_keys_are_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.json");
        let key = create_key(&path, "k", Limits::default()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let a = Authenticator::new(None, Some(&path), false, metrics.clone()).unwrap();
        let mut forged = key.key.expose().to_owned();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        assert!(a.authenticate(&bearer(&forged)).is_err());
        assert!(a.authenticate(&bearer("sk-shoal-nope")).is_err());
        let other_id = format!("sk-shoal-{}-{}", "0".repeat(16), "0".repeat(64));
        assert!(a.authenticate(&bearer(&other_id)).is_err());
        assert!(a.authenticate(&HeaderMap::new()).is_err());
        let text = metrics.encode().unwrap();
        for reason in [
            "wrong_secret",
            "malformed_key",
            "unknown_key",
            "missing_key",
        ] {
            assert!(
                text.contains(&format!(
                    "shoal_auth_failures_total{{reason=\"{reason}\"}} 1"
                )),
                "{reason}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn require_flag_closes_an_empty_store_and_broken_file_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.json");
        let a = auth(&path, true);
        assert!(a.authenticate(&HeaderMap::new()).is_err());
        let key = create_key(&path, "k", Limits::default()).unwrap();
        assert!(a.authenticate(&bearer(key.key.expose())).is_ok());
        std::fs::write(&path, "{broken").unwrap();
        let err = a.authenticate(&bearer(key.key.expose())).unwrap_err();
        assert_eq!(err.class, ErrorClass::Unavailable);
        assert_eq!(err.reason, reason::AUTH_UNAVAILABLE);
    }

    #[test]
    fn a_broken_file_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.json");
        std::fs::write(&path, "[]").unwrap();
        assert!(Authenticator::new(None, Some(&path), false, Arc::new(Metrics::new())).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_a_burst_then_refills_at_the_rate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.json");
        let limits = Limits {
            rate_per_second: Some(0.5),
            burst: Some(2),
            quota_tokens: None,
        };
        let key = create_key(&path, "k", limits).unwrap();
        let a = auth(&path, false);
        let who = a.authenticate(&bearer(key.key.expose())).unwrap();
        assert!(a.admit(who.as_ref()).is_ok());
        assert!(a.admit(who.as_ref()).is_ok());
        let err = a.admit(who.as_ref()).unwrap_err();
        assert_eq!(err.reason, reason::RATE_LIMIT_EXCEEDED);
        assert_eq!(err.retry_after_secs, Some(2));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.admit(who.as_ref()).unwrap_err().retry_after_secs, Some(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(a.admit(who.as_ref()).is_ok());
    }

    #[tokio::test]
    async fn quota_refuses_once_spent_and_usage_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.json");
        let limits = Limits {
            quota_tokens: Some(10),
            ..Limits::default()
        };
        let key = create_key(&path, "k", limits).unwrap();
        let a = auth(&path, false);
        let who = a.authenticate(&bearer(key.key.expose())).unwrap().unwrap();
        assert!(a.admit(Some(&who)).is_ok());
        who.charge(9);
        assert!(a.admit(Some(&who)).is_ok());
        who.charge(5);
        let err = a.admit(Some(&who)).unwrap_err();
        assert_eq!(err.reason, reason::INSUFFICIENT_QUOTA);
        assert_eq!(err.retry_after_secs, None);
        a.save_usage();
        assert_eq!(keys::read_usage(&path).unwrap()[&key.record.id], 14);

        let b = auth(&path, false);
        let who = b.authenticate(&bearer(key.key.expose())).unwrap();
        assert_eq!(
            b.admit(who.as_ref()).unwrap_err().reason,
            reason::INSUFFICIENT_QUOTA
        );
    }

    #[test]
    fn static_key_is_accepted_and_others_refused() {
        let a = Authenticator::new(
            Some("sk-static".into()),
            None,
            false,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let who = a.authenticate(&bearer("sk-static")).unwrap().unwrap();
        assert_eq!(who.key_id(), STATIC_KEY_ID);
        assert!(a.authenticate(&bearer("sk-other")).is_err());
        assert!(a.authenticate(&HeaderMap::new()).is_err());
        assert!(a.admit(Some(&who)).is_ok());
    }
}
