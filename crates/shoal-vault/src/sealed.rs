//! The encrypted model format (laid out on [`Header`]), encryption and decryption.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hkdf};

use crate::key::{Key, KeyError, KeyProvider};
use crate::manifest::{FileEntry, HashingReader, ManifestError};

/// The first eight bytes of every encrypted model.
pub const MAGIC: [u8; 8] = *b"SHOALENC";
/// The format version written and read.
pub const FORMAT_VERSION: u16 = 1;
/// Chunk size used unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 1 << 12;
/// Largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u32 = 1 << 26;
/// Bytes of authentication tag after every chunk.
pub const TAG_LEN: usize = 16;
/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = u8::MAX as usize;
/// Length of the header without the key id.
const FIXED_HEADER_LEN: usize = 100;
const CHUNK_KEY_INFO: &[u8] = b"shoal-vault v1 chunk key";
const KEY_CHECK_INFO: &[u8] = b"shoal-vault v1 key check";

/// The AEAD sealing each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// AES-256 in GCM mode (fastest where the CPU has AES instructions).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fast everywhere, constant-time without AES instructions).
    ChaCha20Poly1305,
}

impl Algorithm {
    fn id(self) -> u8 {
        match self {
            Algorithm::Aes256Gcm => 1,
            Algorithm::ChaCha20Poly1305 => 2,
        }
    }

    fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Algorithm::Aes256Gcm),
            2 => Some(Algorithm::ChaCha20Poly1305),
            _ => None,
        }
    }

    fn ring(self) -> &'static aead::Algorithm {
        match self {
            Algorithm::Aes256Gcm => &aead::AES_256_GCM,
            Algorithm::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    /// The name used on the command line (`aes-256-gcm`, `chacha20-poly1305`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Aes256Gcm => "aes-256-gcm",
            Algorithm::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    /// The algorithm called `name` (see [`Algorithm::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

/// How to encrypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptOptions {
    /// The AEAD.
    pub algorithm: Algorithm,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// Written in the header; tells a [`KeyProvider`] which key to hand out.
    pub key_id: String,
}

impl Default for EncryptOptions {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Aes256Gcm,
            chunk_size: DEFAULT_CHUNK_SIZE,
            key_id: "default".to_owned(),
        }
    }
}

/// The parsed header of an encrypted file.
///
/// An encrypted model is this header, then the plaintext in fixed-size chunks, each sealed
/// with an AEAD (AES-256-GCM or ChaCha20-Poly1305) and followed by its 16-byte tag.
///
/// ```text
/// offset size  field (little-endian)
///      0    8  magic "SHOALENC"
///      8    2  format version (1)
///     10    1  algorithm (1 = AES-256-GCM, 2 = ChaCha20-Poly1305)
///     11    1  key id length k
///     12    4  chunk size in bytes (4 KiB ..= 64 MiB)
///     16    8  plaintext length
///     24   32  file id (random; HKDF salt)
///     56   12  base nonce (random)
///     68   32  key check
///    100    k  key id (UTF-8)
/// 100 + k      chunk 0 ciphertext, tag, chunk 1 ciphertext, tag, …
/// ```
///
/// Keys: HKDF-SHA256 with the file id as salt extracts a per-file secret from the master key;
/// it expands to the chunk key (bound to the algorithm) and to the key check, which tells a
/// wrong key apart from a damaged file. Chunk `i` is sealed with nonce `base ⊕ i` (`i`
/// big-endian in the last 8 bytes) and associated data `sha256(header) ‖ i ‖ last`, where `last`
/// is 1 for the final chunk only. So a changed header fails every chunk; swapped or moved chunks
/// fail (wrong index); a dropped final chunk fails (its predecessor is not marked last); and
/// the expected total size, known from the header, catches truncation and appended bytes before
/// any decryption. An empty plaintext is one empty final chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The AEAD.
    pub algorithm: Algorithm,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// Total plaintext bytes.
    pub plaintext_len: u64,
    /// The key's id.
    pub key_id: String,
    file_id: [u8; 32],
    base_nonce: [u8; 12],
    key_check: [u8; 32],
}

/// Why a file could not be encrypted or decrypted.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A file could not be read or written.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a caller's stream failed.
    #[error("read error")]
    Read(#[source] io::Error),
    /// Writing a caller's stream failed.
    #[error("write error")]
    Write(#[source] io::Error),
    /// The data does not start with [`MAGIC`].
    #[error("not an encrypted shoal model (the first bytes are not \"SHOALENC\")")]
    NotEncrypted,
    /// The format version is not one this build reads.
    #[error("encrypted model format version {version} is not supported (this build reads 1)")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The algorithm id is unknown.
    #[error("unknown encryption algorithm id {id}")]
    UnsupportedAlgorithm {
        /// The id found.
        id: u8,
    },
    /// A header field is out of range.
    #[error("invalid encrypted-model header: {reason}")]
    BadHeader {
        /// What is wrong.
        reason: String,
    },
    /// Encryption options are out of range.
    #[error("invalid encryption options: {reason}")]
    BadOptions {
        /// What is wrong.
        reason: String,
    },
    /// Fewer bytes than the header promises: the file is truncated or chunks were dropped.
    #[error("the encrypted model is {actual} bytes but its header implies {expected}: truncated")]
    Truncated {
        /// Size the header implies.
        expected: u64,
        /// Size found (for a stream, what could be read).
        actual: u64,
    },
    /// More bytes than the header promises: data was appended.
    #[error(
        "the encrypted model is {actual} bytes but its header implies {expected}: \
         data was appended"
    )]
    TrailingData {
        /// Size the header implies.
        expected: u64,
        /// Size found (for a stream, at least this).
        actual: u64,
    },
    /// The file is encrypted and no key provider was given.
    #[error("the model is encrypted (key id `{key_id}`) and no key was provided")]
    KeyRequired {
        /// The header's key id.
        key_id: String,
    },
    /// The key is not the one the file was encrypted with.
    #[error("wrong key for this encrypted model (key id `{key_id}`)")]
    WrongKey {
        /// The header's key id.
        key_id: String,
    },
    /// A chunk failed authentication: it was modified, moved, or belongs to another file, or
    /// the header was altered.
    #[error(
        "chunk {index} of {chunks} failed authentication: the encrypted model was modified, \
         its chunks reordered, or its header altered"
    )]
    ChunkRejected {
        /// Zero-based chunk index.
        index: u64,
        /// Chunks in the file.
        chunks: u64,
    },
    /// The plaintext does not fit in this machine's memory.
    #[error("cannot hold {bytes} decrypted bytes in memory")]
    OutOfMemory {
        /// Bytes needed.
        bytes: u64,
    },
    /// The input's length changed while it was being encrypted.
    #[error("the input changed while it was read: expected {expected} bytes, found {actual}")]
    InputChanged {
        /// Length at the start.
        expected: u64,
        /// Length read.
        actual: u64,
    },
    /// The key could not be had.
    #[error("getting the model key")]
    Key(#[from] KeyError),
    /// The manifest refused the file (or could not be read).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The cryptographic library refused an operation that cannot fail with valid inputs.
    #[error("internal cryptographic error: {0}")]
    Crypto(&'static str),
}

impl VaultError {
    fn at(path: &Path) -> impl Fn(io::Error) -> VaultError + '_ {
        move |source| VaultError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Attaches `path` to a stream error.
    fn with_path(self, path: &Path) -> Self {
        match self {
            VaultError::Read(source) | VaultError::Write(source) => VaultError::Io {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        }
    }
}

/// Whether `bytes` (a file's start) is an encrypted model.
pub fn is_encrypted(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

impl Header {
    /// Bytes the header occupies.
    pub fn header_len(&self) -> usize {
        FIXED_HEADER_LEN + self.key_id.len()
    }

    /// Number of chunks (an empty plaintext still has one).
    pub fn chunks(&self) -> u64 {
        self.plaintext_len
            .div_ceil(u64::from(self.chunk_size))
            .max(1)
    }

    /// The size of the whole encrypted file, if it is representable.
    pub fn encrypted_len(&self) -> Option<u64> {
        (self.header_len() as u64)
            .checked_add(self.plaintext_len)?
            .checked_add(self.chunks().checked_mul(TAG_LEN as u64)?)
    }

    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(self.header_len());
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.push(self.algorithm.id());
        // Checked at construction: the id is at most 255 bytes.
        h.push(u8::try_from(self.key_id.len()).unwrap_or(u8::MAX));
        h.extend_from_slice(&self.chunk_size.to_le_bytes());
        h.extend_from_slice(&self.plaintext_len.to_le_bytes());
        h.extend_from_slice(&self.file_id);
        h.extend_from_slice(&self.base_nonce);
        h.extend_from_slice(&self.key_check);
        h.extend_from_slice(self.key_id.as_bytes());
        h
    }

    /// Reads a header from the start of `r`; returns it with its raw bytes.
    fn read(r: &mut impl Read) -> Result<(Self, Vec<u8>), VaultError> {
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        let n = read_full(r, &mut fixed)?;
        if n < MAGIC.len() || !is_encrypted(&fixed) {
            return Err(VaultError::NotEncrypted);
        }
        if n < FIXED_HEADER_LEN {
            return Err(VaultError::Truncated {
                expected: FIXED_HEADER_LEN as u64,
                actual: n as u64,
            });
        }
        let field = |at: usize, len: usize| &fixed[at..at + len];
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != FORMAT_VERSION {
            return Err(VaultError::UnsupportedVersion { version });
        }
        let algorithm = Algorithm::from_id(fixed[10])
            .ok_or(VaultError::UnsupportedAlgorithm { id: fixed[10] })?;
        let key_id_len = usize::from(fixed[11]);
        let chunk_size = u32::from_le_bytes(array(field(12, 4)));
        check_chunk_size(chunk_size).map_err(|reason| VaultError::BadHeader { reason })?;
        let plaintext_len = u64::from_le_bytes(array(field(16, 8)));
        let mut key_id = vec![0u8; key_id_len];
        let got = read_full(r, &mut key_id)?;
        if got < key_id_len {
            return Err(VaultError::Truncated {
                expected: (FIXED_HEADER_LEN + key_id_len) as u64,
                actual: (FIXED_HEADER_LEN + got) as u64,
            });
        }
        let mut raw = fixed.to_vec();
        raw.extend_from_slice(&key_id);
        let key_id = String::from_utf8(key_id).map_err(|_| VaultError::BadHeader {
            reason: "the key id is not UTF-8".into(),
        })?;
        let h = Header {
            algorithm,
            chunk_size,
            plaintext_len,
            key_id,
            file_id: array(field(24, 32)),
            base_nonce: array(field(56, 12)),
            key_check: array(field(68, 32)),
        };
        if h.encrypted_len().is_none() {
            return Err(VaultError::BadHeader {
                reason: format!("plaintext length {plaintext_len} is out of range"),
            });
        }
        Ok((h, raw))
    }
}

/// Copies a slice of known length into an array (lengths are constants at every call).
fn array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

fn check_chunk_size(size: u32) -> Result<(), String> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "chunk size {size} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        ))
    }
}

/// Reads until `buf` is full or the stream ends; returns the count read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, VaultError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(VaultError::Read(e)),
        }
    }
    Ok(n)
}

/// The per-file keys derived from the master key.
struct FileKeys {
    chunk: LessSafeKey,
    check: [u8; 32],
}

/// An HKDF output length.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(master: &Key, file_id: &[u8; 32], algorithm: Algorithm) -> Result<FileKeys, VaultError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, file_id).extract(master.bytes());
    let alg_id = [algorithm.id()];
    let info = [CHUNK_KEY_INFO, &alg_id];
    let okm = prk
        .expand(&info, algorithm.ring())
        .map_err(|_| VaultError::Crypto("HKDF expand of the chunk key"))?;
    let chunk = LessSafeKey::new(UnboundKey::from(okm));
    let mut check = [0u8; 32];
    prk.expand(&[KEY_CHECK_INFO], Len(check.len()))
        .and_then(|okm| okm.fill(&mut check))
        .map_err(|_| VaultError::Crypto("HKDF expand of the key check"))?;
    Ok(FileKeys { chunk, check })
}

/// What each chunk binds: the header, its index, whether it is the last.
struct ChunkBinding {
    header_digest: [u8; 32],
    base_nonce: [u8; 12],
}

impl ChunkBinding {
    fn new(header_bytes: &[u8], base_nonce: [u8; 12]) -> Self {
        Self {
            header_digest: array(digest::digest(&digest::SHA256, header_bytes).as_ref()),
            base_nonce,
        }
    }

    fn nonce(&self, index: u64) -> Nonce {
        let mut n = self.base_nonce;
        for (b, i) in n[4..].iter_mut().zip(index.to_be_bytes()) {
            *b ^= i;
        }
        Nonce::assume_unique_for_key(n)
    }

    fn aad(&self, index: u64, last: bool) -> Aad<[u8; 41]> {
        let mut a = [0u8; 41];
        a[..32].copy_from_slice(&self.header_digest);
        a[32..40].copy_from_slice(&index.to_le_bytes());
        a[40] = u8::from(last);
        Aad::from(a)
    }
}

/// Encrypts exactly `plaintext_len` bytes of `input` into `output`, chunk by chunk (one chunk
/// buffer; nothing else is held). Fails with [`VaultError::InputChanged`] if `input` holds
/// fewer or more bytes. Returns the header written.
pub fn encrypt<R: Read, W: Write>(
    mut input: R,
    plaintext_len: u64,
    mut output: W,
    key: &Key,
    opts: &EncryptOptions,
) -> Result<Header, VaultError> {
    check_chunk_size(opts.chunk_size).map_err(|reason| VaultError::BadOptions { reason })?;
    if opts.key_id.len() > MAX_KEY_ID_LEN {
        return Err(VaultError::BadOptions {
            reason: format!("the key id is longer than {MAX_KEY_ID_LEN} bytes"),
        });
    }
    let rng = SystemRandom::new();
    let mut file_id = [0u8; 32];
    let mut base_nonce = [0u8; 12];
    rng.fill(&mut file_id)
        .and_then(|()| rng.fill(&mut base_nonce))
        .map_err(|_| VaultError::Key(KeyError::Random))?;
    let keys = derive(key, &file_id, opts.algorithm)?;
    let header = Header {
        algorithm: opts.algorithm,
        chunk_size: opts.chunk_size,
        plaintext_len,
        key_id: opts.key_id.clone(),
        file_id,
        base_nonce,
        key_check: keys.check,
    };
    if header.encrypted_len().is_none() {
        return Err(VaultError::BadOptions {
            reason: format!("plaintext length {plaintext_len} is out of range"),
        });
    }
    let header_bytes = header.encode();
    output.write_all(&header_bytes).map_err(VaultError::Write)?;
    let binding = ChunkBinding::new(&header_bytes, base_nonce);
    let chunks = header.chunks();
    let mut buf = vec![0u8; opts.chunk_size as usize];
    let mut done = 0u64;
    for index in 0..chunks {
        let want = (plaintext_len - done).min(u64::from(opts.chunk_size)) as usize;
        let got = read_full(&mut input, &mut buf[..want])?;
        if got < want {
            return Err(VaultError::InputChanged {
                expected: plaintext_len,
                actual: done + got as u64,
            });
        }
        let last = index + 1 == chunks;
        let tag = keys
            .chunk
            .seal_in_place_separate_tag(
                binding.nonce(index),
                binding.aad(index, last),
                &mut buf[..want],
            )
            .map_err(|_| VaultError::Crypto("sealing a chunk"))?;
        output
            .write_all(&buf[..want])
            .and_then(|()| output.write_all(tag.as_ref()))
            .map_err(VaultError::Write)?;
        done += want as u64;
    }
    let mut probe = [0u8; 1];
    if read_full(&mut input, &mut probe)? != 0 {
        return Err(VaultError::InputChanged {
            expected: plaintext_len,
            actual: plaintext_len + 1,
        });
    }
    output.flush().map_err(VaultError::Write)?;
    Ok(header)
}

/// Decrypts an encrypted model from `input` into memory. `total_len`, when known (a file's
/// size), is checked against the header before any decryption, so truncation and appended
/// data are reported as such; otherwise they are found at the end of the stream. The
/// plaintext is the only buffer allocated.
pub fn decrypt<R: Read>(
    mut input: R,
    total_len: Option<u64>,
    keys: Option<&dyn KeyProvider>,
) -> Result<Vec<u8>, VaultError> {
    let (header, header_bytes) = Header::read(&mut input)?;
    // Checked by `Header::read`.
    let expected = header.encrypted_len().unwrap_or(u64::MAX);
    match total_len {
        Some(actual) if actual < expected => {
            return Err(VaultError::Truncated { expected, actual });
        }
        Some(actual) if actual > expected => {
            return Err(VaultError::TrailingData { expected, actual });
        }
        _ => {}
    }
    let keys = keys.ok_or_else(|| VaultError::KeyRequired {
        key_id: header.key_id.clone(),
    })?;
    let master = keys.key(&header.key_id)?;
    let file_keys = derive(&master, &header.file_id, header.algorithm)?;
    drop(master);
    if !same_bytes(&file_keys.check, &header.key_check) {
        return Err(VaultError::WrongKey {
            key_id: header.key_id,
        });
    }
    let len = usize::try_from(header.plaintext_len).map_err(|_| VaultError::OutOfMemory {
        bytes: header.plaintext_len,
    })?;
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|_| VaultError::OutOfMemory {
            bytes: header.plaintext_len,
        })?;
    let binding = ChunkBinding::new(&header_bytes, header.base_nonce);
    let chunks = header.chunks();
    let mut read_so_far = header_bytes.len() as u64;
    let truncated = |actual: u64| VaultError::Truncated { expected, actual };
    for index in 0..chunks {
        let start = out.len();
        let want = (len - start).min(header.chunk_size as usize);
        let got = (&mut input)
            .take(want as u64)
            .read_to_end(&mut out)
            .map_err(VaultError::Read)?;
        read_so_far += got as u64;
        let mut tag = [0u8; TAG_LEN];
        let tag_got = if got == want {
            read_full(&mut input, &mut tag)?
        } else {
            0
        };
        read_so_far += tag_got as u64;
        if got < want || tag_got < TAG_LEN {
            wipe(&mut out);
            return Err(truncated(read_so_far));
        }
        let last = index + 1 == chunks;
        let opened = file_keys.chunk.open_in_place_separate_tag(
            binding.nonce(index),
            binding.aad(index, last),
            Tag::from(tag),
            &mut out[start..],
            0..,
        );
        if opened.is_err() {
            wipe(&mut out);
            return Err(VaultError::ChunkRejected { index, chunks });
        }
    }
    if total_len.is_none() {
        let mut probe = [0u8; 1];
        if read_full(&mut input, &mut probe)? != 0 {
            wipe(&mut out);
            return Err(VaultError::TrailingData {
                expected,
                actual: expected + 1,
            });
        }
    }
    Ok(out)
}

/// Compares without stopping at the first difference. (The check value is public, so timing
/// would reveal little; equal-time comparison is the habit for anything derived from a key.)
fn same_bytes(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Overwrites a refused plaintext before it is freed.
fn wipe(buf: &mut Vec<u8>) {
    buf.fill(0);
    std::hint::black_box(&buf);
}

/// Encrypts the file at `input` into a new file at `output` (written beside it under a
/// temporary name, then renamed into place). The plaintext is streamed, never held whole.
pub fn encrypt_file(
    input: &Path,
    output: &Path,
    key: &Key,
    opts: &EncryptOptions,
) -> Result<Header, VaultError> {
    let file = std::fs::File::open(input).map_err(VaultError::at(input))?;
    let len = file.metadata().map_err(VaultError::at(input))?.len();
    let reader = io::BufReader::with_capacity(1 << 16, file);
    let mut header = None;
    crate::atomic_write(output, VaultError::at(output), |out| {
        let mut w = io::BufWriter::with_capacity(1 << 16, out);
        let h = encrypt(reader, len, &mut w, key, opts).map_err(|e| match e {
            VaultError::Read(source) => VaultError::Io {
                path: input.to_path_buf(),
                source,
            },
            VaultError::Write(source) => VaultError::Io {
                path: output.to_path_buf(),
                source,
            },
            other => other,
        })?;
        header = Some(h);
        Ok(())
    })?;
    header.ok_or(VaultError::Crypto("encryption produced no header"))
}

/// Decrypts the encrypted model at `path` into memory. When `manifest` is given, the file's
/// size is checked against it first and its sha256 is computed in the same pass as the
/// decryption and checked before the plaintext is returned.
pub fn decrypt_file(
    path: &Path,
    keys: Option<&dyn KeyProvider>,
    manifest: Option<&FileEntry>,
) -> Result<Vec<u8>, VaultError> {
    let file = std::fs::File::open(path).map_err(VaultError::at(path))?;
    let len = file.metadata().map_err(VaultError::at(path))?.len();
    decrypt_checked(
        io::BufReader::with_capacity(1 << 16, file),
        len,
        path,
        keys,
        manifest,
    )
}

/// Decrypts an encrypted model held in `bytes` (e.g. a memory map of `path`), checking it
/// against `manifest` as [`decrypt_file`] does.
pub fn decrypt_bytes(
    bytes: &[u8],
    path: &Path,
    keys: Option<&dyn KeyProvider>,
    manifest: Option<&FileEntry>,
) -> Result<Vec<u8>, VaultError> {
    decrypt_checked(bytes, bytes.len() as u64, path, keys, manifest)
}

fn decrypt_checked<R: Read>(
    input: R,
    len: u64,
    path: &Path,
    keys: Option<&dyn KeyProvider>,
    manifest: Option<&FileEntry>,
) -> Result<Vec<u8>, VaultError> {
    let Some(entry) = manifest else {
        return decrypt(input, Some(len), keys).map_err(|e| e.with_path(path));
    };
    entry.check_size(path, len)?;
    let mut hashing = HashingReader::new(input);
    let mut plain = decrypt(&mut hashing, Some(len), keys).map_err(|e| e.with_path(path))?;
    let (sha256, _) = hashing.finish();
    if let Err(e) = entry.check_sha256(path, &sha256) {
        wipe(&mut plain);
        return Err(e.into());
    }
    Ok(plain)
}

/// Reads the header of the encrypted model at `path` (to show its algorithm, key id and size).
pub fn read_header(path: &Path) -> Result<Header, VaultError> {
    let mut file = std::fs::File::open(path).map_err(VaultError::at(path))?;
    Header::read(&mut file)
        .map(|(h, _)| h)
        .map_err(|e| e.with_path(path))
}
