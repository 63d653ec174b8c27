//! Everything the writer can express reads back identically.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use shoal_gguf::{
    GgmlType, GgufBytes, GgufError, GgufFile, GgufWriter, MetaArray, MetaValue, StringArray,
    ValueType,
};

fn every_value() -> Vec<(&'static str, MetaValue)> {
    vec![
        ("v.u8", MetaValue::U8(250)),
        ("v.i8", MetaValue::I8(-7)),
        ("v.u16", MetaValue::U16(65000)),
        ("v.i16", MetaValue::I16(-32000)),
        ("v.u32", MetaValue::U32(4_000_000_000)),
        ("v.i32", MetaValue::I32(-2_000_000_000)),
        ("v.u64", MetaValue::U64(u64::MAX)),
        ("v.i64", MetaValue::I64(i64::MIN)),
        ("v.f32", MetaValue::F32(-1.5e-3)),
        ("v.f64", MetaValue::F64(std::f64::consts::PI)),
        ("v.bool.t", MetaValue::Bool(true)),
        ("v.bool.f", MetaValue::Bool(false)),
        ("v.str", MetaValue::String("ünïcode ✓".into())),
        ("v.str.empty", MetaValue::String(String::new())),
        ("a.u8", vec![1u8, 2, 255].into()),
        ("a.i8", vec![-1i8, 0, 127].into()),
        ("a.u16", vec![1u16, 65535].into()),
        ("a.i16", vec![-32768i16, 5].into()),
        ("a.u32", vec![0u32, u32::MAX].into()),
        ("a.i32", vec![i32::MIN, 3].into()),
        ("a.u64", vec![u64::MAX, 0].into()),
        ("a.i64", vec![i64::MAX, -1].into()),
        ("a.f32", vec![0.25f32, -8.0].into()),
        ("a.f64", vec![1e300f64, -0.0].into()),
        ("a.bool", vec![true, false, true].into()),
        (
            "a.str",
            ["", "Ġthe", "<|im_start|>"]
                .into_iter()
                .collect::<StringArray>()
                .into(),
        ),
        ("a.empty", MetaValue::Array(MetaArray::F32(vec![]))),
        (
            "a.nested",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::I32(vec![1, 2]),
                MetaArray::String(["x"].into_iter().collect()),
                MetaArray::Array(vec![MetaArray::Bool(vec![true])]),
                MetaArray::Array(vec![]),
            ])),
        ),
    ]
}

#[test]
fn every_value_type_round_trips() {
    let mut w = GgufWriter::new();
    for (k, v) in every_value() {
        w.add_metadata(k, v).unwrap();
    }
    let bytes = w.write_to(Vec::new()).unwrap();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version(), 3);
    let m = f.metadata();
    assert_eq!(m.len(), every_value().len());
    for ((k, v), (rk, rv)) in every_value().into_iter().zip(m.iter()) {
        assert_eq!(k, rk, "order is preserved");
        assert_eq!(&v, rv, "value of {k}");
    }
    let tags: Vec<ValueType> = m.iter().map(|(_, v)| v.value_type()).collect();
    for id in 0..13 {
        let t = ValueType::from_id(id).unwrap();
        assert!(tags.contains(&t), "{t} is exercised");
    }
}

#[test]
fn tensors_round_trip_with_alignment_and_padding() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", 64u32).unwrap();
    w.add_metadata("general.architecture", "test").unwrap();
    let a: Vec<u8> = (0..3 * 4).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..18 * 3).map(|i| (i * 7) as u8).collect();
    let c: Vec<u8> = vec![0xAB; 2 * 5 * 2 * 3];
    w.add_tensor("a", GgmlType::F32, &[3], a.clone()).unwrap();
    w.add_tensor("b", GgmlType::Q4_0, &[32, 3], b.clone())
        .unwrap();
    w.add_tensor("c", GgmlType::F16, &[5, 2, 3], c.clone())
        .unwrap();
    let bytes = w.write_to(Vec::new()).unwrap();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.architecture().unwrap(), "test");
    assert_eq!(f.tensors().len(), 3);
    for (name, data, dims) in [
        ("a", &a, vec![3u64]),
        ("b", &b, vec![32, 3]),
        ("c", &c, vec![5, 2, 3]),
    ] {
        let t = f.tensor(name).unwrap();
        assert_eq!(t.data, data.as_slice());
        assert_eq!(t.info.dims, dims);
        assert_eq!(t.info.offset % 64, 0);
    }
    assert_eq!(f.tensor("b").unwrap().row(2), Some(&b[36..54]));
    assert!(matches!(
        f.tensor("missing"),
        Err(GgufError::TensorNotFound { name }) if name == "missing"
    ));
}

#[test]
fn streamed_tensors_match_attached_ones() {
    let build = |stream: bool| {
        let mut w = GgufWriter::new();
        w.add_metadata("k", 1u8).unwrap();
        w.add_tensor("first", GgmlType::F32, &[2], vec![1; 8])
            .unwrap();
        if stream {
            w.declare_tensor("second", GgmlType::Q8_0, &[64]).unwrap();
        } else {
            w.add_tensor("second", GgmlType::Q8_0, &[64], vec![2; 68])
                .unwrap();
        }
        w.add_tensor("third", GgmlType::F16, &[3], vec![3; 6])
            .unwrap();
        if stream {
            let mut s = w.begin(Vec::new()).unwrap();
            assert_eq!(s.next_tensor().unwrap(), Some("second"));
            assert!(matches!(
                s.write_tensor("third", &[3; 6]),
                Err(GgufError::StreamOrder { .. })
            ));
            assert!(matches!(
                s.write_tensor("second", &[2; 67]),
                Err(GgufError::DataSizeMismatch {
                    expected: 68,
                    actual: 67,
                    ..
                })
            ));
            s.write_tensor("second", &[2; 68]).unwrap();
            s.finish().unwrap()
        } else {
            w.write_to(Vec::new()).unwrap()
        }
    };
    let streamed = build(true);
    assert_eq!(streamed, build(false));
    let f = GgufFile::from_bytes(streamed).unwrap();
    assert_eq!(f.tensor("second").unwrap().data, &[2; 68]);
}

#[test]
fn stream_left_unfinished_is_an_error() {
    let mut w = GgufWriter::new();
    w.declare_tensor("t", GgmlType::F32, &[4]).unwrap();
    assert!(matches!(
        w.write_to(Vec::new()),
        Err(GgufError::StreamOrder { expected, .. }) if expected == "t"
    ));
    let s = w.begin(Vec::new()).unwrap();
    assert!(matches!(
        s.finish(),
        Err(GgufError::StreamOrder { expected, .. }) if expected == "t"
    ));
}

#[test]
fn writer_validates_what_it_is_given() {
    let mut w = GgufWriter::new();
    assert!(matches!(
        w.add_tensor("t", GgmlType::Q4_0, &[16], vec![0; 9]),
        Err(GgufError::RowNotBlockAligned { row_len: 16, .. })
    ));
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[2], vec![0; 7]),
        Err(GgufError::DataSizeMismatch {
            expected: 8,
            actual: 7,
            ..
        })
    ));
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4]),
        Err(GgufError::TooManyDims { n_dims: 5, .. })
    ));
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[0], vec![]),
        Err(GgufError::EmptyTensor { .. })
    ));
    w.add_tensor("t", GgmlType::F32, &[1], vec![0; 4]).unwrap();
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[1], vec![0; 4]),
        Err(GgufError::DuplicateTensor { tensor }) if tensor == "t"
    ));
    assert!(matches!(
        w.add_metadata("general.alignment", 24u32),
        Err(GgufError::BadAlignment { .. })
    ));
    w.add_metadata("x", 1u8).unwrap();
    assert!(matches!(
        w.add_metadata("x", 2u8),
        Err(GgufError::DuplicateKey { key }) if key == "x"
    ));
    let mut deep = MetaArray::U8(vec![1]);
    for _ in 0..shoal_gguf::MAX_ARRAY_NESTING {
        deep = MetaArray::Array(vec![deep]);
    }
    assert!(matches!(
        w.add_metadata("deep", deep),
        Err(GgufError::NestingTooDeep { .. })
    ));
}

#[test]
fn file_round_trip_through_disk_is_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    w.add_tensor("t", GgmlType::BF16, &[4, 2], vec![9; 16])
        .unwrap();
    w.write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert!(f.is_mapped());
    assert_eq!(f.tensor("t").unwrap().data, &[9; 16]);
    assert_eq!(f.bytes(), std::fs::read(&path).unwrap().as_slice());
    assert!(matches!(
        GgufFile::open(dir.path().join("absent.gguf")),
        Err(GgufError::Io { .. })
    ));
    assert!(matches!(
        GgufBytes::map(dir.path().join("absent.gguf")),
        Err(GgufError::Io { .. })
    ));

    // The bytes can be held (and checked) before parsing; mapped and owned parse alike.
    let mapped = GgufBytes::map(&path).unwrap();
    assert!(mapped.is_mapped());
    let owned = GgufBytes::from(mapped.as_slice().to_vec());
    assert!(!owned.is_mapped());
    let (a, b) = (
        GgufFile::parse(mapped).unwrap(),
        GgufFile::parse(owned).unwrap(),
    );
    assert!(a.is_mapped() && !b.is_mapped());
    assert_eq!(a.bytes(), b.bytes());
    assert_eq!(a.tensors(), b.tensors());
    assert_eq!(b.tensor("t").unwrap().data, &[9; 16]);
    assert!(matches!(
        GgufFile::parse(GgufBytes::from(b"GGUX".to_vec())),
        Err(GgufError::BadMagic { .. })
    ));
}

#[test]
fn common_fixture_is_valid() {
    let f = GgufFile::from_bytes(common::valid_file()).unwrap();
    assert_eq!(f.tensors().len(), 2);
    let m = f.metadata();
    assert_eq!(m.require_u32("llama.block_count").unwrap(), 2);
    assert_eq!(
        m.require_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .to_vec(),
        ["a", "b", "héllo"]
    );
    assert!(m.require_bool("flag").unwrap());
}

#[test]
fn tensor_data_can_be_streamed_in_pieces() {
    let declare = || {
        let mut w = GgufWriter::new();
        w.declare_tensor("big", GgmlType::F32, &[10]).unwrap();
        w.declare_tensor("next", GgmlType::F32, &[1]).unwrap();
        w
    };
    let data: Vec<u8> = (0..40).collect();
    let mut s = declare().begin(Vec::new()).unwrap();
    let mut sink = s.begin_tensor("big").unwrap();
    sink.write(&data[..7]).unwrap();
    sink.write(&data[7..30]).unwrap();
    assert_eq!(sink.remaining(), 10);
    assert!(matches!(
        sink.write(&[0; 11]),
        Err(GgufError::DataSizeMismatch {
            expected: 40,
            actual: 41,
            ..
        })
    ));
    sink.write(&data[30..]).unwrap();
    sink.finish().unwrap();
    s.write_tensor("next", &[1, 2, 3, 4]).unwrap();
    let f = GgufFile::from_bytes(s.finish().unwrap()).unwrap();
    assert_eq!(f.tensor("big").unwrap().data, data.as_slice());
    assert_eq!(f.tensor("next").unwrap().data, &[1, 2, 3, 4]);

    // An unfinished piece-wise tensor is reported, and a dropped sink poisons the stream.
    let mut s = declare().begin(Vec::new()).unwrap();
    let mut sink = s.begin_tensor("big").unwrap();
    sink.write(&data[..8]).unwrap();
    assert!(matches!(
        sink.finish(),
        Err(GgufError::DataSizeMismatch {
            expected: 40,
            actual: 8,
            ..
        })
    ));
    assert!(matches!(
        s.write_tensor("next", &[0; 4]),
        Err(GgufError::StreamOrder { .. })
    ));
    assert!(matches!(s.finish(), Err(GgufError::StreamOrder { .. })));
}
