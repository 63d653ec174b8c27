//! The encrypted format: round trips, and every way of damaging a file is refused with its own
//! error (wrong key, flipped byte, truncation, dropped/swapped chunks, appended data, altered
//! header), never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use shoal_vault::{
    Algorithm, EncryptOptions, FileEntry, Key, KeyError, KeyProvider, Manifest, ManifestError,
    StaticKeyProvider, TAG_LEN, VaultError, decrypt, decrypt_bytes, decrypt_file, encrypt,
    encrypt_file, is_encrypted, read_header,
};
use std::path::Path;

const CHUNK: u32 = 4096;

fn key(b: u8) -> Key {
    Key::from_bytes([b; 32])
}

fn opts(algorithm: Algorithm) -> EncryptOptions {
    EncryptOptions {
        algorithm,
        chunk_size: CHUNK,
        key_id: "test-key".into(),
    }
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

fn seal(plain: &[u8], alg: Algorithm) -> Vec<u8> {
    let mut out = Vec::new();
    encrypt(plain, plain.len() as u64, &mut out, &key(1), &opts(alg)).unwrap();
    out
}

fn open(sealed: &[u8], k: &Key) -> Result<Vec<u8>, VaultError> {
    let p = StaticKeyProvider::new(k.clone());
    decrypt(sealed, Some(sealed.len() as u64), Some(&p))
}

/// Where chunk `i` (ciphertext and tag) starts, for a file of `CHUNK`-sized chunks.
fn chunk_at(sealed: &[u8], i: usize) -> usize {
    let header_len = 100 + "test-key".len();
    assert!(is_encrypted(sealed));
    header_len + i * (CHUNK as usize + TAG_LEN)
}

#[test]
fn round_trip_both_algorithms() {
    for alg in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096 + 17] {
            let plain = plaintext(len);
            let sealed = seal(&plain, alg);
            let chunks = len.div_ceil(CHUNK as usize).max(1);
            assert_eq!(sealed.len(), 108 + len + chunks * TAG_LEN);
            assert_eq!(open(&sealed, &key(1)).unwrap(), plain, "{alg:?} {len}");
            // Streams of unknown length work too.
            let p = StaticKeyProvider::new(key(1));
            assert_eq!(decrypt(&sealed[..], None, Some(&p)).unwrap(), plain);
        }
    }
}

#[test]
fn the_same_plaintext_encrypts_differently_each_time() {
    let plain = plaintext(5000);
    assert_ne!(
        seal(&plain, Algorithm::Aes256Gcm),
        seal(&plain, Algorithm::Aes256Gcm)
    );
}

#[test]
fn wrong_key_and_missing_key_are_named() {
    let sealed = seal(&plaintext(10_000), Algorithm::Aes256Gcm);
    let err = open(&sealed, &key(2)).unwrap_err();
    assert!(
        matches!(&err, VaultError::WrongKey { key_id } if key_id == "test-key"),
        "{err}"
    );
    let err = decrypt(&sealed[..], None, None).unwrap_err();
    assert!(
        matches!(&err, VaultError::KeyRequired { key_id } if key_id == "test-key"),
        "{err}"
    );
}

#[derive(Debug)]
struct NoKeys;
impl KeyProvider for NoKeys {
    fn key(&self, key_id: &str) -> Result<Key, KeyError> {
        Err(KeyError::NotFound {
            key_id: key_id.to_owned(),
        })
    }
}

#[test]
fn a_provider_without_the_key_is_reported() {
    let sealed = seal(&plaintext(10), Algorithm::Aes256Gcm);
    let err = decrypt(&sealed[..], None, Some(&NoKeys)).unwrap_err();
    assert!(
        matches!(&err, VaultError::Key(KeyError::NotFound { key_id }) if key_id == "test-key"),
        "{err}"
    );
}

#[test]
fn a_flipped_ciphertext_or_tag_byte_is_refused_at_its_chunk() {
    let plain = plaintext(3 * CHUNK as usize + 100);
    let sealed = seal(&plain, Algorithm::Aes256Gcm);
    for (at, chunk) in [
        (chunk_at(&sealed, 0), 0),
        (chunk_at(&sealed, 1) + 7, 1),
        (chunk_at(&sealed, 2) - 1, 1), // the last byte of chunk 1's tag
        (sealed.len() - 1, 3),
    ] {
        let mut bad = sealed.clone();
        bad[at] ^= 0x01;
        let err = open(&bad, &key(1)).unwrap_err();
        assert!(
            matches!(err, VaultError::ChunkRejected { index, chunks: 4 } if index == chunk),
            "byte {at}: {err}"
        );
    }
}

#[test]
fn an_altered_header_is_refused() {
    let sealed = seal(&plaintext(9000), Algorithm::Aes256Gcm);
    // Plaintext length (offset 16): the size no longer matches.
    let mut bad = sealed.clone();
    bad[16] ^= 1;
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::Truncated { .. } | VaultError::TrailingData { .. })
    ));
    // Base nonce (offset 56): every chunk fails.
    let mut bad = sealed.clone();
    bad[60] ^= 1;
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::ChunkRejected { index: 0, .. })
    ));
    // File id (offset 24): keys derive differently, reported as a key mismatch.
    let mut bad = sealed.clone();
    bad[30] ^= 1;
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::WrongKey { .. })
    ));
    // Algorithm, version, chunk size.
    let mut bad = sealed.clone();
    bad[10] = 9;
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::UnsupportedAlgorithm { id: 9 })
    ));
    let mut bad = sealed.clone();
    bad[10] = 2; // the other algorithm: different chunk key
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::ChunkRejected { index: 0, .. })
    ));
    let mut bad = sealed.clone();
    bad[8] = 2;
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::UnsupportedVersion { version: 2 })
    ));
    let mut bad = sealed.clone();
    bad[12..16].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::BadHeader { .. })
    ));
    // Key id text: a different key is asked for, and the header digest changes.
    let mut bad = sealed.clone();
    bad[100] = b'T';
    assert!(matches!(
        open(&bad, &key(1)),
        Err(VaultError::ChunkRejected { index: 0, .. })
    ));
    // Not encrypted at all.
    assert!(matches!(
        open(b"GGUF\x03\0\0\0", &key(1)),
        Err(VaultError::NotEncrypted)
    ));
}

#[test]
fn truncation_dropped_chunks_and_appended_data_are_refused() {
    let plain = plaintext(3 * CHUNK as usize);
    let sealed = seal(&plain, Algorithm::ChaCha20Poly1305);
    let full = sealed.len() as u64;
    for cut in [sealed.len() - 1, chunk_at(&sealed, 2), 50, 8] {
        let err = open(&sealed[..cut], &key(1)).unwrap_err();
        assert!(
            matches!(err, VaultError::Truncated { expected, actual } if expected == full && actual == cut as u64)
                || (cut < 100 && matches!(err, VaultError::Truncated { .. })),
            "cut at {cut}: {err}"
        );
        // Without a known length the stream runs dry and says so.
        let p = StaticKeyProvider::new(key(1));
        let err = decrypt(&sealed[..cut], None, Some(&p)).unwrap_err();
        assert!(matches!(err, VaultError::Truncated { .. }), "{err}");
    }
    // The last chunk dropped and the length field patched to match: chunk 1 was not sealed
    // as the last one, and the header changed, so authentication fails.
    let mut dropped = sealed[..chunk_at(&sealed, 2)].to_vec();
    dropped[16..24].copy_from_slice(&(2 * u64::from(CHUNK)).to_le_bytes());
    assert!(matches!(
        open(&dropped, &key(1)),
        Err(VaultError::ChunkRejected { index: 0, .. })
    ));
    let mut longer = sealed.clone();
    longer.extend_from_slice(b"garbage");
    let err = open(&longer, &key(1)).unwrap_err();
    assert!(
        matches!(err, VaultError::TrailingData { expected, actual } if expected == full && actual == full + 7),
        "{err}"
    );
    let p = StaticKeyProvider::new(key(1));
    assert!(matches!(
        decrypt(&longer[..], None, Some(&p)),
        Err(VaultError::TrailingData { .. })
    ));
}

#[test]
fn swapped_or_repeated_chunks_are_refused() {
    let plain = plaintext(3 * CHUNK as usize);
    let sealed = seal(&plain, Algorithm::Aes256Gcm);
    let span = CHUNK as usize + TAG_LEN;
    let (a, b) = (chunk_at(&sealed, 0), chunk_at(&sealed, 1));
    let mut swapped = sealed.clone();
    let first = sealed[a..a + span].to_vec();
    swapped.copy_within(b..b + span, a);
    swapped[b..b + span].copy_from_slice(&first);
    assert!(matches!(
        open(&swapped, &key(1)),
        Err(VaultError::ChunkRejected { index: 0, .. })
    ));
    let mut repeated = sealed.clone();
    repeated.copy_within(a..a + span, b);
    assert!(matches!(
        open(&repeated, &key(1)),
        Err(VaultError::ChunkRejected { index: 1, .. })
    ));
    // A chunk from another file under the same key, at the same index.
    let other = seal(&plain, Algorithm::Aes256Gcm);
    let mut spliced = sealed.clone();
    spliced[b..b + span].copy_from_slice(&other[b..b + span]);
    assert!(matches!(
        open(&spliced, &key(1)),
        Err(VaultError::ChunkRejected { index: 1, .. })
    ));
}

#[test]
fn options_out_of_range_are_refused() {
    let mut o = opts(Algorithm::Aes256Gcm);
    o.chunk_size = 100;
    let err = encrypt(&b""[..], 0, Vec::new(), &key(1), &o).unwrap_err();
    assert!(matches!(err, VaultError::BadOptions { .. }), "{err}");
    let mut o = opts(Algorithm::Aes256Gcm);
    o.key_id = "x".repeat(256);
    assert!(matches!(
        encrypt(&b""[..], 0, Vec::new(), &key(1), &o),
        Err(VaultError::BadOptions { .. })
    ));
    // The input is shorter or longer than announced.
    assert!(matches!(
        encrypt(
            &b"abc"[..],
            5,
            Vec::new(),
            &key(1),
            &opts(Algorithm::Aes256Gcm)
        ),
        Err(VaultError::InputChanged {
            expected: 5,
            actual: 3
        })
    ));
    assert!(matches!(
        encrypt(
            &b"abcdef"[..],
            5,
            Vec::new(),
            &key(1),
            &opts(Algorithm::Aes256Gcm)
        ),
        Err(VaultError::InputChanged { expected: 5, .. })
    ));
}

#[test]
fn files_round_trip_and_manifests_check_the_ciphertext_in_the_same_pass() {
    let dir = tempfile::tempdir().unwrap();
    let plain_path = dir.path().join("m.gguf");
    let enc_path = dir.path().join("m.gguf.enc");
    let plain = plaintext(100_000);
    std::fs::write(&plain_path, &plain).unwrap();
    let header = encrypt_file(
        &plain_path,
        &enc_path,
        &key(3),
        &EncryptOptions {
            chunk_size: 8192,
            ..EncryptOptions::default()
        },
    )
    .unwrap();
    assert_eq!(read_header(&enc_path).unwrap(), header);
    assert_eq!(header.plaintext_len, 100_000);
    assert_eq!(header.key_id, "default");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no temporary file is left: {leftovers:?}"
    );
    let p = StaticKeyProvider::new(key(3));
    assert_eq!(decrypt_file(&enc_path, Some(&p), None).unwrap(), plain);

    let m = Manifest::describe(&[&enc_path], None, None).unwrap();
    let entry = &m.files[0];
    assert_eq!(
        decrypt_file(&enc_path, Some(&p), Some(entry)).unwrap(),
        plain
    );
    let bytes = std::fs::read(&enc_path).unwrap();
    assert_eq!(
        decrypt_bytes(&bytes, &enc_path, Some(&p), Some(entry)).unwrap(),
        plain
    );

    // A validly encrypted but different file (same key) passes authentication: only the
    // manifest catches the substitution.
    let other_path = dir.path().join("other.enc");
    encrypt_file(
        &plain_path,
        &other_path,
        &key(3),
        &EncryptOptions::default(),
    )
    .unwrap();
    let other = std::fs::read(&other_path).unwrap();
    let resized = FileEntry {
        size: other.len() as u64,
        ..entry.clone()
    };
    let err = decrypt_bytes(&other, &enc_path, Some(&p), Some(&resized)).unwrap_err();
    assert!(
        matches!(&err, VaultError::Manifest(ManifestError::HashMismatch { file, .. }) if file == &enc_path),
        "{err}"
    );
    let err =
        decrypt_bytes(&bytes[..bytes.len() - 3], &enc_path, Some(&p), Some(entry)).unwrap_err();
    assert!(
        matches!(
            &err,
            VaultError::Manifest(ManifestError::SizeMismatch { expected, actual, .. })
                if *expected == bytes.len() as u64 && *actual == bytes.len() as u64 - 3
        ),
        "{err}"
    );
    // A missing file names itself.
    let err = decrypt_file(Path::new("/nonexistent/x.enc"), Some(&p), None).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.enc"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Sizes around chunk boundaries, both algorithms, a few chunk sizes: decrypt(encrypt(x)) = x.
    #[test]
    fn round_trip_around_chunk_boundaries(
        chunks in 0usize..4,
        delta in -2i64..=2,
        chunk_pow in 12u32..15,
        chacha in any::<bool>(),
        seed in any::<u8>(),
    ) {
        let chunk = 1usize << chunk_pow;
        let len = (chunks as i64 * chunk as i64 + delta).max(0) as usize;
        let plain: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
        let o = EncryptOptions {
            algorithm: if chacha { Algorithm::ChaCha20Poly1305 } else { Algorithm::Aes256Gcm },
            chunk_size: chunk as u32,
            key_id: String::new(),
        };
        let mut sealed = Vec::new();
        let h = encrypt(&plain[..], len as u64, &mut sealed, &key(seed), &o).unwrap();
        prop_assert_eq!(sealed.len() as u64, h.encrypted_len().unwrap());
        prop_assert_eq!(h.chunks(), len.div_ceil(chunk).max(1) as u64);
        let p = StaticKeyProvider::new(key(seed));
        prop_assert_eq!(decrypt(&sealed[..], Some(sealed.len() as u64), Some(&p)).unwrap(), plain);
    }

    /// Any single flipped bit anywhere in the file is refused, never a panic.
    #[test]
    fn any_flipped_bit_is_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let plain = plaintext(2 * CHUNK as usize + 33);
        let mut sealed = seal(&plain, Algorithm::Aes256Gcm);
        let at = pos.index(sealed.len());
        sealed[at] ^= 1 << bit;
        prop_assert!(open(&sealed, &key(1)).is_err());
    }

    /// Arbitrary bytes after a valid magic never panic.
    #[test]
    fn garbage_never_panics(tail in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = b"SHOALENC".to_vec();
        bytes.extend_from_slice(&tail);
        prop_assert!(open(&bytes, &key(1)).is_err());
    }
}
