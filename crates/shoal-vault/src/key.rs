//! Model keys and where they come from.
//!
//! A [`Key`] is 32 secret bytes. A [`KeyProvider`] hands out the key an encrypted file names by
//! its key id. Two providers ship here (a key file, an environment variable); a TPM- or
//! KMS-backed provider implements the same trait, typically unsealing or unwrapping a data key
//! selected by the key id, and returns it as a [`Key`].

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};

/// Length of a key in bytes (AES-256 and ChaCha20 both take 256-bit keys).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key. `Debug` never shows it; the bytes are overwritten on drop (best
/// effort: copies the compiler made are out of reach).
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// A key with these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        Ok(Self(bytes))
    }

    /// Parses a key written as text: 64 hex digits, or standard base64 (padded or not) of 32
    /// bytes. Surrounding whitespace is ignored. `origin` names where the text came from, for
    /// the error.
    pub fn from_text(text: &str, origin: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        // Hex first: base64 of 32 bytes is 43 or 44 characters, never an even run of hex.
        let bytes = if text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
                .ok()
        };
        let bytes = bytes.ok_or_else(|| KeyError::Encoding {
            origin: origin.to_owned(),
        })?;
        Self::from_slice(&bytes, origin)
    }

    /// A key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8], origin: &str) -> Result<Self, KeyError> {
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::Length {
            origin: origin.to_owned(),
            len: bytes.len(),
        })?;
        Ok(Self(arr))
    }

    /// The secret bytes, for this crate's key derivation only.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0 = [0; KEY_LEN];
        // Keeps the store from being elided as dead.
        std::hint::black_box(&self.0);
    }
}

/// Why a key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The provider has no key of this id.
    #[error("no key with id `{key_id}`")]
    NotFound {
        /// The id asked for.
        key_id: String,
    },
    /// A key file could not be read or written.
    #[error("key file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A key file is readable or writable by other users.
    #[error(
        "key file {} has mode {mode:03o}: it must not be accessible to group or others \
         (chmod 600)",
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key is not 32 bytes.
    #[error("the key from {origin} is {len} bytes long; keys are 32 bytes")]
    Length {
        /// Where it came from.
        origin: String,
        /// Its length.
        len: usize,
    },
    /// The text is neither 64 hex digits nor base64.
    #[error("the key from {origin} is neither 64 hex digits nor base64 of 32 bytes")]
    Encoding {
        /// Where it came from.
        origin: String,
    },
    /// The environment variable is not set (or not Unicode).
    #[error("environment variable {var} is not set")]
    EnvMissing {
        /// The variable.
        var: String,
    },
    /// The random source failed.
    #[error("the system random source failed")]
    Random,
    /// A provider outside this crate (TPM, KMS…) failed.
    #[error("key provider {provider} failed")]
    Provider {
        /// The provider's name.
        provider: &'static str,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Hands out the key an encrypted model names.
///
/// `key_id` is the id written in the encrypted file's header when it was sealed (`shoal model
/// encrypt --key-id`, `default` unless given). A provider holding one key may ignore it; a
/// provider over a key store (a TPM's sealed objects, a KMS's wrapped data keys) uses it to
/// pick the key. Answer with [`KeyError::NotFound`] for an unknown id and
/// [`KeyError::Provider`] for a failure of the store itself. A key that exists but is the wrong
/// one is detected by the file's key check, not by the provider.
///
/// Implementations are called at load time on a blocking thread and may block.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// The key named `key_id`.
    fn key(&self, key_id: &str) -> Result<Key, KeyError>;
}

/// One key, returned whatever the id (for tests and embedding).
#[derive(Debug, Clone)]
pub struct StaticKeyProvider(Key);

impl StaticKeyProvider {
    /// A provider of `key`.
    pub fn new(key: Key) -> Self {
        Self(key)
    }
}

impl KeyProvider for StaticKeyProvider {
    fn key(&self, _key_id: &str) -> Result<Key, KeyError> {
        Ok(self.0.clone())
    }
}

/// One key read from a file at construction, returned whatever the id.
///
/// The file holds the 32 raw bytes (as `shoal model keygen` writes them), or the key as hex or
/// base64 text. On Unix the file must not be accessible to group or others, as with SSH keys.
#[derive(Debug, Clone)]
pub struct FileKeyProvider {
    path: PathBuf,
    key: Key,
}

impl FileKeyProvider {
    /// Reads the key in `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        check_private(&path, std::fs::metadata(&path).map_err(io)?)?;
        let bytes = std::fs::read(&path).map_err(io)?;
        let origin = format!("key file {}", path.display());
        let key = if bytes.len() == KEY_LEN {
            Key::from_slice(&bytes, &origin)?
        } else {
            let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Length {
                origin: origin.clone(),
                len: bytes.len(),
            })?;
            Key::from_text(text, &origin)?
        };
        Ok(Self { path, key })
    }

    /// The file the key came from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl KeyProvider for FileKeyProvider {
    fn key(&self, _key_id: &str) -> Result<Key, KeyError> {
        Ok(self.key.clone())
    }
}

/// One key read from an environment variable (hex or base64) at construction, returned
/// whatever the id. The variable is read once, at start-up, never on a request path.
#[derive(Debug, Clone)]
pub struct EnvKeyProvider {
    var: String,
    key: Key,
}

impl EnvKeyProvider {
    /// Reads and parses `var`.
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let value = std::env::var(var).map_err(|_| KeyError::EnvMissing {
            var: var.to_owned(),
        })?;
        Self::from_value(var, &value)
    }

    /// Parses `value` as if it were the content of `var` (for callers that read the
    /// environment themselves).
    pub fn from_value(var: &str, value: &str) -> Result<Self, KeyError> {
        let key = Key::from_text(value, &format!("environment variable {var}"))?;
        Ok(Self {
            var: var.to_owned(),
            key,
        })
    }

    /// The variable the key came from.
    pub fn var(&self) -> &str {
        &self.var
    }
}

impl KeyProvider for EnvKeyProvider {
    fn key(&self, _key_id: &str) -> Result<Key, KeyError> {
        Ok(self.key.clone())
    }
}

/// Writes `key` as 32 raw bytes to a new file at `path`, readable by its owner only. An
/// existing file is never overwritten.
pub fn write_key_file(path: impl AsRef<Path>, key: &Key) -> Result<(), KeyError> {
    let path = path.as_ref();
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(key.bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(unix)]
fn check_private(path: &Path, meta: std::fs::Metadata) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _meta: std::fs::Metadata) -> Result<(), KeyError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn text_keys_parse_as_hex_or_base64() {
        let raw: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let hex_text = format!("  {}\n", hex::encode(raw));
        assert_eq!(Key::from_text(&hex_text, "t").unwrap().0, raw);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(Key::from_text(&b64, "t").unwrap().0, raw);
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
        assert_eq!(Key::from_text(&b64, "t").unwrap().0, raw);
        assert!(matches!(
            Key::from_text("zz", "t"),
            Err(KeyError::Encoding { .. })
        ));
        assert!(matches!(
            Key::from_text(&hex::encode([1u8; 16]), "t"),
            Err(KeyError::Length { len: 16, .. })
        ));
    }

    #[test]
    fn debug_hides_the_key() {
        let k = Key::from_bytes([0xAB; 32]);
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
        let p = StaticKeyProvider::new(k);
        assert!(!format!("{p:?}").contains("171"));
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = Key::generate().unwrap();
        write_key_file(&path, &key).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
        let p = FileKeyProvider::open(&path).unwrap();
        assert_eq!(p.key("any").unwrap().0, key.0);
        assert!(matches!(
            write_key_file(&path, &key),
            Err(KeyError::Io { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = FileKeyProvider::open(&path).unwrap_err();
            assert!(
                matches!(err, KeyError::Permissions { mode: 0o644, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn env_values_parse() {
        let raw = [9u8; 32];
        let p = EnvKeyProvider::from_value("X", &hex::encode(raw)).unwrap();
        assert_eq!(p.key("k").unwrap().0, raw);
        let err = EnvKeyProvider::from_value("X", "short").unwrap_err();
        assert!(err.to_string().contains("environment variable X"), "{err}");
    }
}
