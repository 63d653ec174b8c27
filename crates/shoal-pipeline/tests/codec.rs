//! Codec properties: exact, rounded and quantized round trips at any length; malformed
//! payloads are typed errors; negotiation follows the preference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use half::f16;
use proptest::prelude::*;
use shoal_pipeline::{Activations, Codec, CodecError, Preference, Q8_BLOCK, negotiate};

fn roundtrip(codec: Codec, values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    codec.encode(values, &mut bytes).unwrap();
    assert_eq!(bytes.len(), codec.encoded_len(values.len()));
    assert_eq!(codec.decoded_len(bytes.len()).unwrap(), values.len());
    let mut back = Vec::new();
    assert_eq!(codec.decode(&bytes, &mut back).unwrap(), values.len());
    (bytes, back)
}

/// Values of every magnitude a hidden state might take, plus exact zeros.
fn activation() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        -1.0f32..1.0,
        -100.0f32..100.0,
        -4000.0f32..4000.0,
        (-1e-6f32..1e-6),
    ]
}

/// The binary16 scale of Q8 block `b` in `bytes`.
fn q8_scale(bytes: &[u8], b: usize) -> f32 {
    let at = b * 34;
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn f32_is_bit_exact_for_every_bit_pattern(bits in prop::collection::vec(any::<u32>(), 0..300)) {
        let values: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let (bytes, back) = roundtrip(Codec::F32, &values);
        let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        prop_assert_eq!(bytes, expected);
        let back_bits: Vec<u32> = back.iter().map(|v| v.to_bits()).collect();
        prop_assert_eq!(back_bits, bits);
    }

    #[test]
    fn f16_is_within_binary16_rounding(values in prop::collection::vec(prop_oneof![activation(), -65000.0f32..65000.0], 0..700)) {
        let (bytes, back) = roundtrip(Codec::F16, &values);
        for (i, (x, y)) in values.iter().zip(&back).enumerate() {
            // Exactly what binary16 round-to-nearest gives, and within its relative error.
            prop_assert_eq!(y.to_bits(), f16::from_f32(*x).to_f32().to_bits(), "value {}", i);
            prop_assert!((x - y).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25), "{} -> {}", x, y);
            prop_assert_eq!(&bytes[2 * i..2 * i + 2], &f16::from_f32(*x).to_le_bytes()[..]);
        }
    }

    #[test]
    fn q8_error_is_at_most_half_a_step(values in prop::collection::vec(activation(), 0..500), scale in prop_oneof![Just(1.0f32), Just(1e-3), Just(300.0)]) {
        let values: Vec<f32> = values.iter().map(|v| v * scale).collect();
        let (bytes, back) = roundtrip(Codec::Q8, &values);
        for (i, (x, y)) in values.iter().zip(&back).enumerate() {
            let d = q8_scale(&bytes, i / Q8_BLOCK);
            let amax = values[i / Q8_BLOCK * Q8_BLOCK..].iter().take(Q8_BLOCK).fold(0.0f32, |m, v| m.max(v.abs()));
            // The scale never rounds below max|x| / 127, so nothing clips ...
            prop_assert!(d * 127.0 >= amax, "block {} scale {} for max {}", i / Q8_BLOCK, d, amax);
            // ... and each value is off by at most half a step (plus f32 rounding).
            prop_assert!((x - y).abs() <= d * (0.5 + 1e-4) + x.abs() * 1e-6, "value {}: {} -> {} (d = {})", i, x, y, d);
        }
    }

    #[test]
    fn q8_takes_34_bytes_per_32_values_and_any_length(n in 0usize..1000) {
        let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let (bytes, back) = roundtrip(Codec::Q8, &values);
        let rest = n % 32;
        prop_assert_eq!(bytes.len(), n / 32 * 34 + if rest == 0 { 0 } else { rest + 2 });
        prop_assert_eq!(back.len(), n);
    }

    #[test]
    fn arbitrary_bytes_decode_or_fail_with_a_type(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        for codec in Codec::ALL {
            let mut out = vec![1.0f32];
            match codec.decode(&bytes, &mut out) {
                Ok(n) => prop_assert_eq!(out.len(), 1 + n),
                Err(CodecError::BadLength { len, .. }) => {
                    prop_assert_eq!(len, bytes.len());
                    prop_assert_eq!(out.len(), 1, "output touched on error");
                }
                Err(CodecError::BadScale { .. }) => {
                    prop_assert_eq!(codec, Codec::Q8);
                    prop_assert_eq!(out.len(), 1, "output touched on error");
                }
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }

    #[test]
    fn negotiation_picks_the_first_common_codec_of_the_preference(
        ours in prop::sample::subsequence(Codec::ALL.to_vec(), 0..=3),
        theirs in prop::sample::subsequence(Codec::ALL.to_vec(), 0..=3),
        pref in prop_oneof![Just(Preference::Balanced), Just(Preference::Exact), Just(Preference::Smallest)],
    ) {
        let got = negotiate(&ours, &theirs, pref);
        let common: Vec<Codec> = pref.order().iter().copied().filter(|c| ours.contains(c) && theirs.contains(c)).collect();
        prop_assert_eq!(got, common.first().copied());
        prop_assert_eq!(got, negotiate(&theirs, &ours, pref), "symmetric");
    }
}

#[test]
fn lengths_that_no_payload_has_are_refused() {
    let mut out = Vec::new();
    for (codec, len) in [
        (Codec::F32, 3),
        (Codec::F32, 6),
        (Codec::F16, 1),
        (Codec::F16, 1153),
        (Codec::Q8, 1),
        (Codec::Q8, 2),
        (Codec::Q8, 34 + 1),
        (Codec::Q8, 34 * 3 + 2),
    ] {
        let bytes = vec![0u8; len];
        assert_eq!(
            codec.decode(&bytes, &mut out),
            Err(CodecError::BadLength { codec, len }),
            "{codec} {len}"
        );
    }
    assert!(out.is_empty());
    assert_eq!(Codec::Q8.decoded_len(34 + 3), Ok(33));
    assert_eq!(Codec::Q8.decoded_len(0), Ok(0));
}

#[test]
fn decoding_into_a_buffer_of_the_wrong_size_is_refused() {
    let mut bytes = Vec::new();
    Codec::F16.encode(&[1.0, 2.0, 3.0], &mut bytes).unwrap();
    let mut four = [0.0f32; 4];
    assert_eq!(
        Codec::F16.decode_into(&bytes, &mut four),
        Err(CodecError::WrongCount {
            codec: Codec::F16,
            expected: 4,
            got: 3
        })
    );
    let mut three = [0.0f32; 3];
    Codec::F16.decode_into(&bytes, &mut three).unwrap();
    assert_eq!(three, [1.0, 2.0, 3.0]);
}

#[test]
fn values_a_codec_cannot_carry_are_refused_and_leave_the_output_alone() {
    let mut out = vec![7u8];
    let mut values = vec![0.5f32; 40];
    values[35] = 1e6; // beyond binary16
    assert_eq!(
        Codec::F16.encode(&values, &mut out),
        Err(CodecError::OutOfRange {
            codec: Codec::F16,
            index: 35
        })
    );
    assert_eq!(out, [7]);
    // Just under binary16's largest value rounds to it rather than failing.
    Codec::F16.encode(&[65510.0], &mut out).unwrap();

    values[35] = f32::NAN;
    assert_eq!(
        Codec::Q8.encode(&values, &mut out),
        Err(CodecError::NonFinite {
            codec: Codec::Q8,
            index: 35
        })
    );
    values[35] = f32::INFINITY;
    assert!(matches!(
        Codec::Q8.encode(&values, &mut out),
        Err(CodecError::NonFinite { index: 35, .. })
    ));
    values[35] = 1e9; // scale 7.9e6: not a binary16
    assert_eq!(
        Codec::Q8.encode(&values, &mut out),
        Err(CodecError::OutOfRange {
            codec: Codec::Q8,
            index: 35
        })
    );
    assert_eq!(out.len(), 3);

    // F16 carries infinities and NaN as themselves; F32 anything.
    let (_, back) = roundtrip(Codec::F16, &[f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    assert_eq!(back[..2], [f32::INFINITY, f32::NEG_INFINITY]);
    assert!(back[2].is_nan());
}

#[test]
fn q8_blocks_of_zeros_and_of_tiny_values() {
    let (bytes, back) = roundtrip(Codec::Q8, &[0.0; 40]);
    assert_eq!(back, [0.0; 40]);
    assert_eq!(q8_scale(&bytes, 0), 0.0);
    // A scale below binary16's smallest subnormal rounds up to it, never to zero.
    let tiny = [1e-9f32, -2e-9, 3e-10];
    let (bytes, back) = roundtrip(Codec::Q8, &tiny);
    let d = q8_scale(&bytes, 0);
    assert!(d > 0.0);
    for (x, y) in tiny.iter().zip(&back) {
        assert!((x - y).abs() <= d / 2.0);
    }
}

#[test]
fn q8_layout_is_scale_then_signed_bytes() {
    let values: Vec<f32> = (0..33).map(|i| i as f32 - 16.0).collect();
    let mut bytes = Vec::new();
    Codec::Q8.encode(&values, &mut bytes).unwrap();
    assert_eq!(bytes.len(), 34 + 3);
    // Block 0: max |x| = 16, scale 16/127 rounded up to binary16; -16 maps to -127.
    let d = q8_scale(&bytes, 0);
    assert!((16.0 / 127.0..16.0 / 127.0 * 1.001).contains(&d), "{d}");
    assert_eq!(bytes[2] as i8, -127);
    assert_eq!(bytes[2 + 16] as i8, 0);
    // Block 1: the lone value 16 gets its own scale and q = 127.
    assert_eq!(bytes[34 + 2] as i8, 127);
    // A negative scale is malformed.
    let mut bad = bytes.clone();
    bad[1] |= 0x80;
    assert_eq!(
        Codec::Q8.decode(&bad, &mut Vec::new()),
        Err(CodecError::BadScale { block: 0 })
    );
}

#[test]
fn activations_know_their_rows() {
    let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let a = Activations::encode(Codec::F32, 4, &values).unwrap();
    assert_eq!(a.rows(), Ok(3));
    let mut out = Vec::new();
    assert_eq!(a.decode(&mut out), Ok(3));
    assert_eq!(out, values);
    assert_eq!(
        Activations::encode(Codec::F32, 5, &values),
        Err(CodecError::Ragged {
            values: 12,
            width: 5
        })
    );
    assert!(Activations::encode(Codec::F16, 0, &values).is_err());
    assert_eq!(
        Activations::encode(Codec::F16, 0, &[]).unwrap().rows(),
        Ok(0)
    );
    let ragged = Activations {
        codec: Codec::F16,
        width: 5,
        data: vec![0; 24],
    };
    assert_eq!(
        ragged.rows(),
        Err(CodecError::Ragged {
            values: 12,
            width: 5
        })
    );
}

#[test]
fn default_negotiation_prefers_f16_then_q8_then_f32() {
    use Codec::*;
    assert_eq!(Preference::default(), Preference::Balanced);
    assert_eq!(
        negotiate(&[F32, F16, Q8], &[Q8, F16, F32], Preference::default()),
        Some(F16)
    );
    assert_eq!(
        negotiate(&[F32, Q8], &[Q8, F16, F32], Preference::default()),
        Some(Q8)
    );
    assert_eq!(
        negotiate(&[F32], &[Q8, F16, F32], Preference::default()),
        Some(F32)
    );
    assert_eq!(
        negotiate(&[F16, Q8], &[Q8, F16, F32], Preference::Exact),
        None
    );
    assert_eq!(
        negotiate(&[F32, F16], &[F32, F16], Preference::Exact),
        Some(F32)
    );
    assert_eq!(
        negotiate(&ALL_CODECS, &ALL_CODECS, Preference::Smallest),
        Some(Q8)
    );
    assert_eq!(negotiate(&[F16], &[Q8], Preference::default()), None);
}

const ALL_CODECS: [Codec; 3] = Codec::ALL;

/// Encode and decode throughput of each codec on a micro-batch of hidden states. Run with
/// `cargo test --release -p shoal-pipeline --test codec -- --ignored --nocapture`.
#[test]
#[ignore = "prints throughput; run by hand"]
fn codec_throughput() {
    let width = 576;
    let rows = 64;
    let values: Vec<f32> = (0..width * rows)
        .map(|i| ((i as f32) * 0.013).sin() * 3.0)
        .collect();
    let mb = (values.len() * 4) as f64 / 1e6;
    for codec in Codec::ALL {
        let mut bytes = Vec::with_capacity(codec.encoded_len(values.len()));
        let mut back = vec![0.0f32; values.len()];
        let reps = 400;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            bytes.clear();
            codec
                .encode(std::hint::black_box(&values), &mut bytes)
                .unwrap();
        }
        let enc = start.elapsed().as_secs_f64() / f64::from(reps);
        let start = std::time::Instant::now();
        for _ in 0..reps {
            codec
                .decode_into(std::hint::black_box(&bytes), &mut back)
                .unwrap();
        }
        let dec = start.elapsed().as_secs_f64() / f64::from(reps);
        println!(
            "{codec}: {} rows x {width}: {:>6} bytes, encode {:>7.0} MB/s, decode {:>7.0} MB/s (of f32 input)",
            rows,
            bytes.len(),
            mb / enc,
            mb / dec
        );
    }
}
