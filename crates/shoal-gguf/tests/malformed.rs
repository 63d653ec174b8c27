//! One test per way a file can be malformed, each asserting the specific error.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use common::Raw;
use shoal_gguf::{GgufError, GgufFile, Location};

fn parse(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(f) => panic!("malformed file accepted: {f:?}"),
        Err(e) => {
            // Every error renders without panicking.
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

/// A file with one F32 tensor of `dims` at relative `offset`, with `data_len` data bytes.
fn one_tensor(name: &str, dims: &[u64], type_id: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut r = Raw::header(3, 1, 0);
    r.tensor(name, dims, type_id, offset)
        .pad_to(32)
        .zeros(data_len);
    r.build()
}

#[test]
fn bad_magic() {
    let mut bytes = common::valid_file();
    bytes[0] = b'X';
    assert!(matches!(parse(bytes), GgufError::BadMagic { found } if found == b"XGUF"));
    assert!(matches!(parse(b"GG".to_vec()), GgufError::BadMagic { found } if found == b"GG"));
    assert!(matches!(parse(vec![]), GgufError::BadMagic { .. }));
}

#[test]
fn version_1_is_refused() {
    let mut bytes = common::valid_file();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        parse(bytes),
        GgufError::UnsupportedVersion { version: 1 }
    ));
    let mut bytes = common::valid_file();
    bytes[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(
        parse(bytes),
        GgufError::UnsupportedVersion { version: 4 }
    ));
}

#[test]
fn version_2_is_accepted() {
    let mut bytes = common::valid_file();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufFile::from_bytes(bytes).unwrap().version(), 2);
}

#[test]
fn big_endian_is_refused() {
    let mut bytes = common::valid_file();
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(matches!(parse(bytes), GgufError::BigEndian { version: 3 }));
}

#[test]
fn truncated_header() {
    let bytes = common::valid_file()[..12].to_vec();
    assert!(matches!(
        parse(bytes),
        GgufError::Truncated {
            at: Location::Header,
            offset: 8,
            needed: 8,
            available: 4
        }
    ));
}

#[test]
fn truncated_string() {
    // Key "general.architecture" cut in the middle of its bytes.
    let mut r = Raw::header(3, 0, 1);
    r.u64(20).bytes(b"general.arch");
    assert!(matches!(
        parse(r.build()),
        GgufError::Truncated {
            at: Location::MetadataKey { index: 0 },
            needed: 20,
            available: 12,
            ..
        }
    ));
    // A string value whose length runs past the end.
    let mut r = Raw::header(3, 0, 1);
    r.str("general.name").u32(8).u64(100).bytes(b"short");
    match parse(r.build()) {
        GgufError::Truncated {
            at: Location::MetadataValue { key },
            needed: 100,
            ..
        } => {
            assert_eq!(key, "general.name")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn truncated_array() {
    // An array of 3 strings whose third string is missing.
    let mut r = Raw::header(3, 0, 1);
    r.str("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(3)
        .str("a")
        .str("b")
        .u64(5)
        .bytes(b"ab");
    match parse(r.build()) {
        GgufError::Truncated {
            at: Location::MetadataValue { key },
            ..
        } => {
            assert_eq!(key, "tokenizer.ggml.tokens")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn truncated_tensor_info() {
    let mut r = Raw::header(3, 1, 0);
    r.str("blk.0.attn_q.weight").u32(2).u64(64);
    match parse(r.build()) {
        GgufError::Truncated {
            at: Location::TensorInfo { index: 0, name },
            ..
        } => {
            assert_eq!(name.as_deref(), Some("blk.0.attn_q.weight"))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn truncated_tensor_data() {
    let mut bytes = common::valid_file();
    bytes.truncate(bytes.len() - 40);
    match parse(bytes) {
        GgufError::TensorPastEnd {
            tensor,
            n_bytes: 68,
            ..
        } => assert_eq!(tensor, "q.weight"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn tensor_data_past_end_of_file() {
    let bytes = one_tensor("w", &[8], 0, 64, 32);
    match parse(bytes) {
        GgufError::TensorPastEnd {
            tensor,
            offset: 64,
            n_bytes: 32,
            ..
        } => assert_eq!(tensor, "w"),
        other => panic!("unexpected {other:?}"),
    }
    // An offset so large the end overflows.
    let bytes = one_tensor("w", &[8], 0, u64::MAX - 31, 32);
    assert!(matches!(parse(bytes), GgufError::TensorPastEnd { .. }));
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    let mut r = Raw::header(3, 0, u64::MAX / 2);
    r.kv_u32("a", 1);
    assert!(matches!(
        parse(r.build()),
        GgufError::CountTooLarge { at: Location::Header, count, .. } if count == u64::MAX / 2
    ));
    let r = Raw::header(3, 1 << 40, 0);
    assert!(matches!(
        parse(r.build()),
        GgufError::CountTooLarge {
            at: Location::Header,
            ..
        }
    ));
    // Array of 2^61 u64 elements: count * 8 overflows.
    let mut r = Raw::header(3, 0, 1);
    r.str("arr").u32(9).u32(10).u64(1 << 61).u64(0);
    match parse(r.build()) {
        GgufError::CountTooLarge {
            at: Location::MetadataValue { key },
            min_bytes_each: 8,
            ..
        } => {
            assert_eq!(key, "arr")
        }
        other => panic!("unexpected {other:?}"),
    }
    // A string array claiming a million entries in a few bytes.
    let mut r = Raw::header(3, 0, 1);
    r.str("toks").u32(9).u32(8).u64(1_000_000).str("a");
    assert!(matches!(
        parse(r.build()),
        GgufError::CountTooLarge {
            count: 1_000_000,
            ..
        }
    ));
    // A string with a length near u64::MAX.
    let mut r = Raw::header(3, 0, 1);
    r.u64(u64::MAX).bytes(b"x").zeros(8);
    assert!(matches!(parse(r.build()), GgufError::Truncated { .. }));
}

#[test]
fn invalid_utf8() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(3).bytes(&[b'a', 0xff, b'b']).u32(4).u32(1);
    assert!(matches!(
        parse(r.build()),
        GgufError::InvalidUtf8 {
            at: Location::MetadataKey { index: 0 },
            offset: 32
        }
    ));
    let mut r = Raw::header(3, 1, 0);
    r.u64(2)
        .bytes(&[0xc3, 0x28])
        .u32(1)
        .u64(4)
        .u32(0)
        .u64(0)
        .pad_to(32)
        .zeros(16);
    assert!(matches!(
        parse(r.build()),
        GgufError::InvalidUtf8 {
            at: Location::TensorInfo {
                index: 0,
                name: None
            },
            ..
        }
    ));
}

#[test]
fn unknown_value_type_and_bad_bool() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u32(0);
    assert!(matches!(
        parse(r.build()),
        GgufError::UnknownValueType { type_id: 13, .. }
    ));
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(7).u8(2);
    assert!(matches!(
        parse(r.build()),
        GgufError::InvalidBool { byte: 2, .. }
    ));
}

#[test]
fn deeply_nested_arrays_are_refused() {
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..10_000 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    assert!(matches!(parse(r.build()), GgufError::NestingTooDeep { key, .. } if key == "deep"));
}

#[test]
fn duplicate_metadata_key() {
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("llama.block_count", 1)
        .kv_u32("llama.block_count", 2);
    assert!(matches!(
        parse(r.build()),
        GgufError::DuplicateKey { key } if key == "llama.block_count"
    ));
}

#[test]
fn duplicate_tensor_name() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .pad_to(32)
        .zeros(64);
    assert!(matches!(parse(r.build()), GgufError::DuplicateTensor { tensor } if tensor == "w"));
}

#[test]
fn unknown_tensor_type() {
    let bytes = one_tensor("blk.3.ffn_up.weight", &[32], 77, 0, 128);
    match parse(bytes) {
        GgufError::UnknownTensorType {
            tensor,
            type_id: 77,
        } => {
            assert_eq!(tensor, "blk.3.ffn_up.weight")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn too_many_dims() {
    let bytes = one_tensor("w", &[1, 1, 1, 1, 1], 0, 0, 32);
    assert!(matches!(parse(bytes), GgufError::TooManyDims { tensor, n_dims: 5 } if tensor == "w"));
}

#[test]
fn zero_element_count() {
    let bytes = one_tensor("w", &[8, 0], 0, 0, 32);
    assert!(matches!(parse(bytes), GgufError::EmptyTensor { tensor, .. } if tensor == "w"));
    let bytes = one_tensor("w", &[], 0, 0, 32);
    assert!(matches!(parse(bytes), GgufError::EmptyTensor { .. }));
}

#[test]
fn overflowing_element_count() {
    let bytes = one_tensor("w", &[1 << 32, 1 << 32, 2], 0, 0, 32);
    assert!(matches!(
        parse(bytes),
        GgufError::ElementCountOverflow { tensor, dims } if tensor == "w" && dims.len() == 3
    ));
}

#[test]
fn row_not_multiple_of_block() {
    // Q4_1 (type 3) rows must be multiples of 32.
    let bytes = one_tensor("w", &[48, 2], 3, 0, 128);
    assert!(matches!(
        parse(bytes),
        GgufError::RowNotBlockAligned { tensor, row_len: 48, block_size: 32, .. } if tensor == "w"
    ));
}

#[test]
fn misaligned_tensor_offset() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[4], 0, 0)
        .tensor("b", &[4], 0, 16)
        .pad_to(32)
        .zeros(64);
    assert!(matches!(
        parse(r.build()),
        GgufError::MisalignedTensor { tensor, offset: 16, alignment: 32 } if tensor == "b"
    ));
    // With general.alignment = 16 the same layout is fine.
    let mut r = Raw::header(3, 2, 1);
    r.kv_u32("general.alignment", 16)
        .tensor("a", &[4], 0, 0)
        .tensor("b", &[4], 0, 16)
        .pad_to(16)
        .zeros(32);
    let f = GgufFile::from_bytes(r.build()).unwrap();
    assert_eq!(f.alignment(), 16);
    assert_eq!(f.tensor("b").unwrap().info.offset, f.data_offset() + 16);
}

#[test]
fn overlapping_tensors() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .pad_to(32)
        .zeros(96);
    match parse(r.build()) {
        GgufError::OverlappingTensors { first, second } => {
            assert_eq!((first.as_str(), second.as_str()), ("a", "b"))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bad_alignment_values() {
    for bad in [0u32, 3, 48] {
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", bad);
        assert!(
            matches!(parse(r.build()), GgufError::BadAlignment { .. }),
            "{bad}"
        );
    }
    let mut r = Raw::header(3, 0, 1);
    r.kv_str("general.alignment", "32");
    assert!(matches!(parse(r.build()), GgufError::BadAlignment { .. }));
}
