//! Models at rest: manifests, authenticated encryption and the keys for it.
//!
//! Owns: the model manifest (name, size and sha256 of every file, checked before load), the
//! encrypted model format (chunked AES-256-GCM or ChaCha20-Poly1305 with the header, chunk
//! index and last-chunk flag authenticated; the layout is on [`Header`]), and
//! the [`KeyProvider`] trait with file and environment providers.
//!
//! Must not: know what a model is (callers hand the decrypted bytes to the GGUF reader), write
//! a plaintext model anywhere but memory, or panic on any input: a damaged, truncated,
//! reordered or extended file, a wrong key and a bad manifest are each a distinct
//! [`VaultError`] or [`ManifestError`] naming the file and the expected and actual values.

mod key;
mod manifest;
mod sealed;

pub use key::{
    EnvKeyProvider, FileKeyProvider, KEY_LEN, Key, KeyError, KeyProvider, StaticKeyProvider,
    write_key_file,
};
pub use manifest::{
    FileEntry, HashingReader, MANIFEST_FORMAT, MANIFEST_SUFFIX, Manifest, ManifestError,
    sha256_file,
};
pub use sealed::{
    Algorithm, DEFAULT_CHUNK_SIZE, EncryptOptions, FORMAT_VERSION, Header, MAGIC, MAX_CHUNK_SIZE,
    MAX_KEY_ID_LEN, MIN_CHUNK_SIZE, TAG_LEN, VaultError, decrypt, decrypt_bytes, decrypt_file,
    encrypt, encrypt_file, is_encrypted, read_header,
};

use std::fs::File;
use std::io;
use std::path::Path;

/// Writes a new file at `path` through `fill`: into a temporary file in the same directory,
/// synced, then renamed over `path`, so readers see the old file or the whole new one. The
/// temporary file is removed on failure.
pub(crate) fn atomic_write<E>(
    path: &Path,
    io_err: impl Fn(io::Error) -> E,
    fill: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let mut suffix = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
        .map_err(|_| io_err(io::Error::other("the system random source failed")))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(&io_err)?;
    let result = fill(&mut f)
        .and_then(|()| f.sync_all().map_err(&io_err))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(&io_err));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
