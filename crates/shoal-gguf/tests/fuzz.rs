//! Random damage to valid files never panics the reader: it errors, or it parses and every
//! tensor view it hands out is in bounds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use proptest::prelude::*;
use shoal_gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};

/// A richer valid file than the common fixture: nested arrays, more tensors, wider types.
fn rich_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", 16u32).unwrap();
    w.add_metadata("general.architecture", "qwen2").unwrap();
    w.add_metadata("s", "text").unwrap();
    w.add_metadata("i16", MetaValue::I16(-4)).unwrap();
    w.add_metadata("f64", 2.5f64).unwrap();
    w.add_metadata(
        "nested",
        MetaArray::Array(vec![
            MetaArray::U16(vec![1, 2]),
            MetaArray::Bool(vec![false]),
        ]),
    )
    .unwrap();
    w.add_metadata("merges", vec![1u64, 2, 3]).unwrap();
    w.add_tensor("a", GgmlType::Q4_1, &[32, 2], vec![1; 40])
        .unwrap();
    w.add_tensor("b", GgmlType::F16, &[3, 1, 2], vec![2; 12])
        .unwrap();
    w.add_tensor("c", GgmlType::Q4K, &[256], vec![3; 144])
        .unwrap();
    w.write_to(Vec::new()).unwrap()
}

/// Parses and, on success, touches everything a caller could.
fn exercise(bytes: Vec<u8>) {
    let len = bytes.len();
    if let Ok(f) = GgufFile::from_bytes(bytes) {
        for (k, v) in f.metadata().iter() {
            let _ = format!("{k}{v:?}");
            let _ = f.metadata().get_u32(k);
            let _ = f.metadata().get_str_array(k).map(|a| a.map(|a| a.to_vec()));
        }
        for t in f.tensors() {
            let view = f.tensor(&t.name).unwrap();
            assert_eq!(view.data.len(), t.n_bytes);
            assert!(t.offset + t.n_bytes <= len);
            let _ = view.row(0);
        }
    }
}

#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, mask: u8 },
    Word { at: usize, value: u64 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    let extreme = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1 << 32),
        Just(255),
        any::<u64>(),
    ];
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        (any::<usize>(), extreme).prop_map(|(at, value)| Damage::Word { at, value }),
        any::<usize>().prop_map(|at| Damage::Truncate { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
    ]
}

fn apply(mut bytes: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    for d in damages {
        if bytes.is_empty() {
            break;
        }
        match d {
            Damage::Flip { at, mask } => {
                let i = at % bytes.len();
                bytes[i] ^= mask;
            }
            Damage::Word { at, value } => {
                let i = at % bytes.len();
                let end = (i + 8).min(bytes.len());
                let n = end - i;
                bytes[i..end].copy_from_slice(&value.to_le_bytes()[..n]);
            }
            Damage::Truncate { at } => {
                let n = at % bytes.len();
                bytes.truncate(n);
            }
            Damage::Insert { at, bytes: ins } => {
                let i = at % (bytes.len() + 1);
                bytes.splice(i..i, ins.iter().copied());
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn damaged_files_never_panic(
        rich in any::<bool>(),
        damages in proptest::collection::vec(damage(), 1..4),
    ) {
        let base = if rich { rich_file() } else { common::valid_file() };
        exercise(apply(base, &damages));
    }

    #[test]
    fn random_bytes_after_magic_never_panic(
        version in prop_oneof![Just(2u32), Just(3u32)],
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&tail);
        exercise(bytes);
    }
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    for base in [common::valid_file(), rich_file()] {
        assert!(GgufFile::from_bytes(base.clone()).is_ok());
        // The last tensor's padding is not needed by the reader, so cut at its data end.
        let f = GgufFile::from_bytes(base.clone()).unwrap();
        let data_end = f
            .tensors()
            .iter()
            .map(|t| t.offset + t.n_bytes)
            .max()
            .unwrap();
        for n in 0..data_end {
            assert!(
                GgufFile::from_bytes(base[..n].to_vec()).is_err(),
                "prefix of {n} bytes parsed"
            );
        }
    }
}
