//! The API key file: what `shoal key` writes and the gateway reads.
//!
//! A key reads `sk-shoal-<id>-<secret>`: `id` is 16 hex digits naming the record, `secret` is 64
//! hex digits of a 256-bit random value from the operating system. The file keeps only the
//! SHA-256 of the secret (a plain hash suffices for a high-entropy random secret: there is
//! nothing to guess from it), so a leaked file does not leak keys. The secret is shown once, when
//! the key is created.
//!
//! File format (JSON, mode 0600):
//! `{"version":1,"keys":[{"id","name","secret_sha256","created","revoked",…limits}]}`.
//! Every change is a read-modify-write under an exclusive lock on `<file>.lock`, written to a
//! temporary file and renamed over the old one, so a reader (the gateway) sees either the old or
//! the new file and never half of one. Token usage lives in a sibling file
//! (`<stem>.usage.json`), written only by the gateway.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::TryRngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Every key starts with this.
pub const KEY_PREFIX: &str = "sk-shoal-";
/// File name of the key file inside a cluster directory.
pub const KEY_FILE_NAME: &str = "api-keys.json";
/// Version of the key file's format.
const FORMAT_VERSION: u32 = 1;
/// Hex digits of a key id (64 bits: ids only need to be unique within one file).
const ID_HEX_LEN: usize = 16;
/// Hex digits of a key secret (256 bits).
const SECRET_HEX_LEN: usize = 64;

/// Failures reading or changing the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file (or its lock or temporary file) could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("{} is not a valid key file: {source}", path.display())]
    Parse {
        /// Which file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The file was written by a newer shoal.
    #[error("{} has format version {version}; this shoal reads version {FORMAT_VERSION}", path.display())]
    UnsupportedVersion {
        /// Which file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// A record in the file is unusable.
    #[error("{}: key {id:?}: {problem}", path.display())]
    InvalidRecord {
        /// Which file.
        path: PathBuf,
        /// The record's id as written.
        id: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A new key's settings are unusable.
    #[error("{0}")]
    InvalidSettings(&'static str),
    /// No key has this id.
    #[error("no key with id {id:?}")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The operating system's random generator failed.
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
}

/// One key as the file stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The key's public id (the part between `sk-shoal-` and the secret).
    pub id: String,
    /// A label for operators.
    pub name: String,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_sha256: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// A revoked key is refused with 401.
    #[serde(default)]
    pub revoked: bool,
    /// When it was revoked, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Sustained requests per second allowed (token bucket refill rate); none = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Requests allowed in a burst (bucket size); default: the rate rounded up, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Total tokens (prompt plus completion) the key may use; none = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_tokens: Option<u64>,
}

impl KeyRecord {
    /// The bucket size: the configured burst, else the rate rounded up, at least 1.
    pub fn effective_burst(&self) -> Option<u32> {
        let rate = self.rate_per_second?;
        Some(self.burst.unwrap_or_else(|| {
            // Rates are validated finite and positive; the cast saturates for huge ones.
            (rate.ceil() as u32).max(1)
        }))
    }

    fn validate(&self, path: &Path) -> Result<(), KeyError> {
        let problem = if !is_lower_hex(&self.id, ID_HEX_LEN) {
            Some("the id is not 16 lowercase hex digits")
        } else if !is_lower_hex(&self.secret_sha256, 64) {
            Some("secret_sha256 is not 64 lowercase hex digits")
        } else {
            check_limits(&Limits {
                rate_per_second: self.rate_per_second,
                burst: self.burst,
                quota_tokens: self.quota_tokens,
            })
            .err()
        };
        match problem {
            Some(problem) => Err(KeyError::InvalidRecord {
                path: path.to_owned(),
                id: self.id.clone(),
                problem,
            }),
            None => Ok(()),
        }
    }
}

/// Limits of a new key.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Sustained requests per second; none = unlimited.
    pub rate_per_second: Option<f64>,
    /// Burst size; only meaningful with a rate.
    pub burst: Option<u32>,
    /// Total tokens; none = unlimited.
    pub quota_tokens: Option<u64>,
}

fn check_limits(limits: &Limits) -> Result<(), &'static str> {
    if let Some(rate) = limits.rate_per_second
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err("the rate must be a positive number of requests per second");
    }
    if limits.burst == Some(0) {
        return Err("the burst must be at least 1");
    }
    if limits.burst.is_some() && limits.rate_per_second.is_none() {
        return Err("a burst needs a rate");
    }
    Ok(())
}

/// A key in full. Shown once; `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    /// The key as clients send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A key just created: its record and the full key.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// What the file now holds.
    pub record: KeyRecord,
    /// The key to hand to the client.
    pub key: SecretKey,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileDoc {
    version: u32,
    keys: Vec<KeyRecord>,
}

/// Reads and validates every record; a missing file holds no keys.
pub fn read_keys(path: &Path) -> Result<Vec<KeyRecord>, KeyError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KeyError::Io {
                what: "reading",
                path: path.to_owned(),
                source,
            });
        }
    };
    parse_keys(path, &text)
}

pub(crate) fn parse_keys(path: &Path, text: &[u8]) -> Result<Vec<KeyRecord>, KeyError> {
    let doc: KeyFileDoc = serde_json::from_slice(text).map_err(|source| KeyError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if doc.version != FORMAT_VERSION {
        return Err(KeyError::UnsupportedVersion {
            path: path.to_owned(),
            version: doc.version,
        });
    }
    let mut seen = std::collections::HashSet::new();
    for record in &doc.keys {
        record.validate(path)?;
        if !seen.insert(record.id.as_str()) {
            return Err(KeyError::InvalidRecord {
                path: path.to_owned(),
                id: record.id.clone(),
                problem: "the id appears twice",
            });
        }
    }
    Ok(doc.keys)
}

/// Creates a key named `name` with `limits`, adds it to the file (created if missing) and
/// returns it with its secret.
pub fn create_key(path: &Path, name: &str, limits: Limits) -> Result<NewKey, KeyError> {
    if name.trim().is_empty() {
        return Err(KeyError::InvalidSettings("the key needs a non-empty name"));
    }
    check_limits(&limits).map_err(KeyError::InvalidSettings)?;
    modify(path, |keys| {
        let id = loop {
            let id = hex::encode(random_bytes::<{ ID_HEX_LEN / 2 }>()?);
            if keys.iter().all(|k| k.id != id) {
                break id;
            }
        };
        let secret = hex::encode(random_bytes::<{ SECRET_HEX_LEN / 2 }>()?);
        let record = KeyRecord {
            id: id.clone(),
            name: name.trim().to_owned(),
            secret_sha256: hex::encode(secret_digest(&secret)),
            created: rfc3339_now(),
            revoked: false,
            revoked_at: None,
            rate_per_second: limits.rate_per_second,
            burst: limits.burst,
            quota_tokens: limits.quota_tokens,
        };
        keys.push(record.clone());
        Ok(NewKey {
            record,
            key: SecretKey(format!("{KEY_PREFIX}{id}-{secret}")),
        })
    })
}

/// Marks key `id` revoked (a no-op for one already revoked) and returns its record.
pub fn revoke_key(path: &Path, id: &str) -> Result<KeyRecord, KeyError> {
    modify(path, |keys| {
        let record = keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| KeyError::NotFound { id: id.to_owned() })?;
        if !record.revoked {
            record.revoked = true;
            record.revoked_at = Some(rfc3339_now());
        }
        Ok(record.clone())
    })
}

/// Runs `change` on the file's records under an exclusive lock and writes the result atomically.
fn modify<T>(
    path: &Path,
    change: impl FnOnce(&mut Vec<KeyRecord>) -> Result<T, KeyError>,
) -> Result<T, KeyError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            what: "creating the directory of",
            path: path.to_owned(),
            source,
        })?;
    }
    let lock_path = sibling(path, ".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| KeyError::Io {
            what: "opening the lock",
            path: lock_path.clone(),
            source,
        })?;
    lock.lock().map_err(|source| KeyError::Io {
        what: "locking",
        path: lock_path.clone(),
        source,
    })?;
    let mut keys = read_keys(path)?;
    let out = change(&mut keys)?;
    let doc = KeyFileDoc {
        version: FORMAT_VERSION,
        keys,
    };
    let mut text = serde_json::to_vec_pretty(&doc).map_err(|source| KeyError::Parse {
        path: path.to_owned(),
        source,
    })?;
    text.push(b'\n');
    write_atomically(path, &text)?;
    // The lock is released when `lock` is dropped.
    drop(lock);
    Ok(out)
}

/// Writes `bytes` to a temporary file next to `path` (mode 0600), syncs it and renames it over
/// `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let tmp = sibling(path, &format!(".tmp-{:016x}", rand::random::<u64>()));
    let io = |what, source| KeyError::Io {
        what,
        path: tmp.clone(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(|e| io("creating", e))?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("writing", e));
    drop(file);
    let renamed = written.and_then(|()| {
        fs::rename(&tmp, path).map_err(|source| KeyError::Io {
            what: "replacing",
            path: path.to_owned(),
            source,
        })
    });
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Where the gateway keeps the token usage of the keys in `keys_path`:
/// `api-keys.json` → `api-keys.usage.json`.
pub fn usage_path(keys_path: &Path) -> PathBuf {
    let stem = keys_path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    keys_path.with_file_name(format!("{stem}.usage.json"))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageDoc {
    pub version: u32,
    pub used_tokens: HashMap<String, u64>,
}

/// Tokens used so far per key id, as last saved by a gateway (empty when none was saved).
pub fn read_usage(keys_path: &Path) -> Result<HashMap<String, u64>, KeyError> {
    let path = usage_path(keys_path);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(source) => {
            return Err(KeyError::Io {
                what: "reading",
                path,
                source,
            });
        }
    };
    let doc: UsageDoc =
        serde_json::from_slice(&text).map_err(|source| KeyError::Parse { path, source })?;
    Ok(doc.used_tokens)
}

/// A key as a client presented it, split into id and secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PresentedKey<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

/// Splits `sk-shoal-<id>-<secret>`; `None` if it does not have that shape.
pub(crate) fn parse_presented(key: &str) -> Option<PresentedKey<'_>> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    (is_lower_hex(id, ID_HEX_LEN) && is_lower_hex(secret, SECRET_HEX_LEN))
        .then_some(PresentedKey { id, secret })
}

/// SHA-256 of a secret as the file stores it.
pub(crate) fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(bytes)
}

/// The current time as RFC 3339 UTC with millisecond precision.
pub(crate) fn rfc3339_now() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `time` as RFC 3339 UTC (`2026-01-02T03:04:05.678Z`).
pub(crate) fn rfc3339(time: std::time::SystemTime) -> String {
    let at = time::OffsetDateTime::from(time);
    let millis = at.millisecond();
    let at = at.replace_nanosecond(0).unwrap_or(at);
    let base = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    match base.strip_suffix('Z') {
        Some(stem) => format!("{stem}.{millis:03}Z"),
        None => base,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn create_list_revoke_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(KEY_FILE_NAME);
        assert!(read_keys(&path).unwrap().is_empty());
        let a = create_key(&path, " alice ", Limits::default()).unwrap();
        let b = create_key(
            &path,
            "bob",
            Limits {
                rate_per_second: Some(2.5),
                burst: None,
                quota_tokens: Some(1000),
            },
        )
        .unwrap();
        assert_eq!(a.record.name, "alice");
        assert_ne!(a.record.id, b.record.id);
        let parsed = parse_presented(a.key.expose()).unwrap();
        assert_eq!(parsed.id, a.record.id);
        assert_eq!(
            hex::encode(secret_digest(parsed.secret)),
            a.record.secret_sha256
        );
        assert_eq!(b.record.effective_burst(), Some(3));
        let keys = read_keys(&path).unwrap();
        assert_eq!(keys, vec![a.record.clone(), b.record.clone()]);
        // The secret itself is nowhere in the file.
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(parsed.secret));

        let revoked = revoke_key(&path, &a.record.id).unwrap();
        assert!(revoked.revoked && revoked.revoked_at.is_some());
        let again = revoke_key(&path, &a.record.id).unwrap();
        assert_eq!(again.revoked_at, revoked.revoked_at);
        assert!(read_keys(&path).unwrap()[0].revoked);
        assert!(matches!(
            revoke_key(&path, "0000000000000000"),
            Err(KeyError::NotFound { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_settings_and_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE_NAME);
        for limits in [
            Limits {
                rate_per_second: Some(0.0),
                ..Limits::default()
            },
            Limits {
                rate_per_second: Some(f64::NAN),
                ..Limits::default()
            },
            Limits {
                rate_per_second: Some(1.0),
                burst: Some(0),
                ..Limits::default()
            },
            Limits {
                burst: Some(3),
                ..Limits::default()
            },
        ] {
            assert!(matches!(
                create_key(&path, "x", limits),
                Err(KeyError::InvalidSettings(_))
            ));
        }
        assert!(matches!(
            create_key(&path, "  ", Limits::default()),
            Err(KeyError::InvalidSettings(_))
        ));
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(read_keys(&path), Err(KeyError::Parse { .. })));
        fs::write(&path, r#"{"version":9,"keys":[]}"#).unwrap();
        assert!(matches!(
            read_keys(&path),
            Err(KeyError::UnsupportedVersion { version: 9, .. })
        ));
        fs::write(
            &path,
            r#"{"version":1,"keys":[{"id":"XYZ","name":"n","secret_sha256":"00","created":"t"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            read_keys(&path),
            Err(KeyError::InvalidRecord { .. })
        ));
    }

    #[test]
    fn presented_keys_must_have_the_exact_shape() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        assert!(parse_presented(&format!("sk-shoal-{id}-{secret}")).is_some());
        assert!(parse_presented(&format!("sk-other-{id}-{secret}")).is_none());
        assert!(parse_presented(&format!("sk-shoal-{id}-{}", &secret[1..])).is_none());
        assert!(parse_presented(&format!("sk-shoal-{id}-{}", secret.to_uppercase())).is_none());
        assert!(parse_presented(&format!("sk-shoal-{id}{secret}")).is_none());
        assert!(parse_presented("").is_none());
    }

    #[test]
    fn usage_path_is_a_sibling() {
        assert_eq!(
            usage_path(Path::new("/a/b/api-keys.json")),
            Path::new("/a/b/api-keys.usage.json")
        );
    }

    #[test]
    fn rfc3339_has_milliseconds_and_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn secret_key_debug_is_redacted() {
        let key = SecretKey("sk-shoal-0123-4567".into());
        let shown = format!("{key:?}");
        assert!(!shown.contains("4567"), "{shown}");
    }
}
