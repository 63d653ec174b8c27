//! Stage frames on the wire: every frame survives a protobuf round trip, a decode step stays
//! within its byte budget, and malformed peer input is a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use prost::Message as _;
use shoal_pipeline::frame::StepProblem;
use shoal_pipeline::wire::{MAX_HOPS, MAX_TEXT};
use shoal_pipeline::{
    Activations, Codec, CodecError, Frame, FrameError, HopCheckpoint, LinkAccept, LinkOpen,
    NodeAddr, Preference, SeqOutput, SeqSlice, SequenceOpen, StageFault, StageHop, Step,
    StepResult,
};
use shoal_proto::v1;
use shoal_types::{ErrorClass, LayerRange, ModelId, NodeId, RequestId, SeqId};

/// Frame → protobuf bytes → frame.
fn through_the_wire(f: &Frame) -> Frame {
    let bytes = v1::StageFrame::from(f.clone()).encode_to_vec();
    let back = v1::StageFrame::decode(bytes.as_slice()).unwrap();
    Frame::try_from(back).unwrap()
}

fn range(a: u32, b: u32) -> LayerRange {
    LayerRange::new(a, b).unwrap()
}

fn hidden(codec: Codec, rows: usize, width: u32) -> Activations {
    let values: Vec<f32> = (0..rows * width as usize)
        .map(|i| (i as f32 * 0.1).cos())
        .collect();
    Activations::encode(codec, width, &values).unwrap()
}

fn slice(seq: u64, pos: u32, n_tokens: u32, sample: bool) -> SeqSlice {
    SeqSlice {
        seq: SeqId(seq),
        pos,
        n_tokens,
        sample,
        tokens: (0..n_tokens).map(|t| 1000 + t).collect(),
    }
}

fn every_kind_of_frame() -> Vec<Frame> {
    vec![
        Frame::LinkOpen(LinkOpen {
            model: ModelId::new("smollm2"),
            model_sha256: "ab".repeat(32),
            layers: range(15, 30),
            plan_epoch: 7,
            pipeline: 2,
            codecs: vec![Codec::F16, Codec::Q8, Codec::F32],
            preference: Preference::Smallest,
            sender: NodeId::new("pi-1"),
        }),
        Frame::LinkAccept(LinkAccept {
            node: NodeId::new("pi-2"),
            codec: Codec::Q8,
            hidden_width: 576,
        }),
        Frame::SequenceOpen(SequenceOpen {
            seq: SeqId(41),
            request: RequestId::new("req-1"),
            downstream: vec![StageHop {
                node: NodeId::new("pi-3"),
                data_addr: "10.0.0.3:7001".into(),
                layers: range(20, 30),
                checkpoint: HopCheckpoint {
                    every: 64,
                    peer: Some(NodeAddr {
                        node: NodeId::new("pi-5"),
                        addr: "10.0.0.5:7001".into(),
                    }),
                    restore: None,
                },
            }],
            sampling: v1::SamplingParams {
                temperature: Some(0.7),
                seed: Some(99),
                ..Default::default()
            },
            sampled: 3,
            return_logits: false,
            max_context: 2048,
            stage: Some(Box::new(StageHop {
                checkpoint: HopCheckpoint {
                    every: 64,
                    peer: None,
                    restore: Some(NodeAddr {
                        node: NodeId::new("pi-4"),
                        addr: "10.0.0.4:7001".into(),
                    }),
                },
                ..StageHop::new(NodeId::new("pi-2"), "10.0.0.2:7001".into(), range(10, 20))
            })),
            restorable: vec![1, 2, 3],
        }),
        // A micro-batch: a prompt chunk of one sequence beside decode rows of two others.
        Frame::Step(Step {
            step: 12,
            seqs: vec![
                slice(41, 0, 5, false),
                slice(7, 88, 1, true),
                slice(9, 3, 1, true),
            ],
            hidden: hidden(Codec::F16, 7, 64),
            sent_unix_micros: 1_790_000_000_123_456,
        }),
        Frame::StepResult(StepResult {
            step: 12,
            outputs: vec![
                SeqOutput::Token {
                    seq: SeqId(7),
                    token: 4242,
                },
                SeqOutput::Logits {
                    seq: SeqId(9),
                    logits: hidden(Codec::F32, 1, 100),
                },
                SeqOutput::Restored {
                    seq: SeqId(41),
                    positions: 3,
                },
            ],
        }),
        Frame::Release(vec![SeqId(7), SeqId(u64::MAX)]),
        Frame::Error(StageFault {
            seq: Some(SeqId(9)),
            class: ErrorClass::CapacityExhausted,
            reason: "kv_budget".into(),
            message: "no room for the sequence's cache".into(),
        }),
        Frame::Error(StageFault {
            seq: None,
            class: ErrorClass::NotFound,
            reason: "layers_not_loaded".into(),
            message: String::new(),
        }),
    ]
}

#[test]
fn every_frame_survives_the_wire() {
    for f in every_kind_of_frame() {
        assert_eq!(through_the_wire(&f), f);
    }
}

#[test]
fn a_single_sequence_decode_step_costs_at_most_two_bytes_per_value_plus_64() {
    let n_embd = 576u32;
    // Large ids and counters make every varint long: the worst case of a long generation.
    let step = Frame::Step(Step {
        step: u64::MAX,
        seqs: vec![SeqSlice {
            seq: SeqId(u64::MAX),
            pos: 131_071,
            n_tokens: 1,
            sample: true,
            tokens: vec![151_935],
        }],
        hidden: hidden(Codec::F16, 1, n_embd),
        // A send time in this century: an 8-byte varint.
        sent_unix_micros: 1_790_000_000_123_456,
    });
    let wire = v1::StageFrame::from(step.clone());
    let len = wire.encoded_len();
    assert_eq!(len, wire.encode_to_vec().len());
    let budget = 2 * n_embd as usize + 64;
    println!("decode step at f16: {len} bytes on the wire (budget {budget})");
    assert!(len <= budget, "{len} bytes > {budget}");
    assert_eq!(through_the_wire(&step), step);

    // The same step in Q8: 18 blocks of 34 bytes plus the same framing.
    let Frame::Step(mut q8) = step else {
        unreachable!()
    };
    q8.hidden = hidden(Codec::Q8, 1, n_embd);
    assert_eq!(q8.hidden.data.len(), 18 * 34);
    let len_q8 = v1::StageFrame::from(Frame::Step(q8)).encoded_len();
    assert!(len_q8 <= 18 * 34 + 64, "{len_q8}");
}

fn wire_step(seqs: Vec<v1::StageSeqSlice>, hidden: Option<v1::Activations>) -> v1::StageFrame {
    v1::StageFrame {
        frame: Some(v1::stage_frame::Frame::Step(v1::StageStep {
            step: 5,
            seqs,
            hidden,
            sent_unix_micros: 0,
        })),
    }
}

fn wire_slice(seq: u64, n_tokens: u32, tokens: Vec<u32>) -> v1::StageSeqSlice {
    v1::StageSeqSlice {
        seq,
        pos: 0,
        n_tokens,
        sample: true,
        tokens,
    }
}

fn f16_rows(rows: usize, width: u32) -> Option<v1::Activations> {
    Some(hidden(Codec::F16, rows, width).into())
}

fn refused(f: v1::StageFrame) -> FrameError {
    let err = Frame::try_from(f).unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidRequest);
    err
}

fn bad_step(f: v1::StageFrame) -> StepProblem {
    match refused(f) {
        FrameError::BadStep { step: 5, problem } => problem,
        other => panic!("not a step problem: {other:?}"),
    }
}

#[test]
fn inconsistent_steps_are_refused_with_the_reason() {
    // Rows declared and carried disagree.
    assert_eq!(
        bad_step(wire_step(vec![wire_slice(1, 2, vec![])], f16_rows(3, 8))),
        StepProblem::RowMismatch {
            declared: 2,
            carried: 3
        }
    );
    assert_eq!(
        bad_step(wire_step(
            vec![wire_slice(1, 1, vec![]), wire_slice(1, 1, vec![])],
            f16_rows(2, 8)
        )),
        StepProblem::DuplicateSeq(1)
    );
    assert_eq!(
        bad_step(wire_step(vec![wire_slice(1, 0, vec![])], f16_rows(0, 8))),
        StepProblem::NoTokens(1)
    );
    assert_eq!(
        bad_step(wire_step(vec![wire_slice(1, 2, vec![5])], f16_rows(2, 8))),
        StepProblem::TokenCount {
            seq: 1,
            n_tokens: 2,
            listed: 1
        }
    );
    assert_eq!(
        bad_step(wire_step(vec![], f16_rows(0, 8))),
        StepProblem::Empty
    );
    let mut far = wire_slice(1, 2, vec![]);
    far.pos = u32::MAX;
    assert_eq!(
        bad_step(wire_step(vec![far], f16_rows(2, 8))),
        StepProblem::PositionOverflow(1)
    );
    // Hidden states that are not whole rows, or not whole values.
    let ragged = v1::Activations {
        codec: v1::ActivationCodec::F16 as i32,
        width: 8,
        data: vec![0; 18],
    };
    assert_eq!(
        refused(wire_step(vec![wire_slice(1, 1, vec![])], Some(ragged))),
        FrameError::Codec {
            field: "step.hidden",
            source: CodecError::Ragged {
                values: 9,
                width: 8
            }
        }
    );
    let odd = v1::Activations {
        codec: v1::ActivationCodec::F16 as i32,
        width: 8,
        data: vec![0; 15],
    };
    assert!(matches!(
        refused(wire_step(vec![wire_slice(1, 1, vec![])], Some(odd))),
        FrameError::Codec {
            source: CodecError::BadLength { .. },
            ..
        }
    ));
    let unknown = v1::Activations {
        codec: 42,
        width: 8,
        data: vec![0; 16],
    };
    assert_eq!(
        refused(wire_step(vec![wire_slice(1, 1, vec![])], Some(unknown))),
        FrameError::UnknownCodec {
            field: "step.hidden",
            value: 42
        }
    );
    assert_eq!(
        refused(wire_step(vec![wire_slice(1, 1, vec![])], None)),
        FrameError::Missing {
            field: "step.hidden"
        }
    );
}

#[test]
fn malformed_control_frames_are_refused() {
    assert_eq!(
        refused(v1::StageFrame { frame: None }),
        FrameError::Missing { field: "frame" }
    );
    let open = |f: fn(&mut v1::StageLinkOpen)| {
        let mut o = v1::StageLinkOpen {
            model_id: "m".into(),
            layers: Some(v1::LayerRange { start: 0, end: 4 }),
            sender_node_id: "a".into(),
            ..Default::default()
        };
        f(&mut o);
        v1::StageFrame {
            frame: Some(v1::stage_frame::Frame::LinkOpen(o)),
        }
    };
    assert!(Frame::try_from(open(|_| {})).is_ok());
    assert_eq!(
        refused(open(|o| o.model_id.clear())).reason(),
        "missing_field"
    );
    assert_eq!(
        refused(open(
            |o| o.layers = Some(v1::LayerRange { start: 4, end: 4 })
        ))
        .reason(),
        "invalid_layer_range"
    );
    assert_eq!(
        refused(open(|o| o.layers = None)),
        FrameError::Missing {
            field: "link_open.layers"
        }
    );
    assert_eq!(
        refused(open(|o| o.model_sha256 = "x".repeat(MAX_TEXT + 1))).reason(),
        "too_long"
    );
    // Codecs this build does not know are skipped, not refused; so is an unknown preference.
    let Frame::LinkOpen(o) = Frame::try_from(open(|o| {
        o.codecs = vec![99, v1::ActivationCodec::Q8 as i32, 0];
        o.preference = 77;
    }))
    .unwrap() else {
        unreachable!()
    };
    assert_eq!(o.codecs, [Codec::Q8]);
    assert_eq!(o.preference, Preference::Balanced);

    let seq_open = |downstream: Vec<v1::StageHop>| v1::StageFrame {
        frame: Some(v1::stage_frame::Frame::SequenceOpen(
            v1::StageSequenceOpen {
                seq: 1,
                downstream,
                ..Default::default()
            },
        )),
    };
    let hop = v1::StageHop {
        node_id: "b".into(),
        data_addr: "b:1".into(),
        layers: Some(v1::LayerRange { start: 2, end: 4 }),
        ..Default::default()
    };
    assert!(Frame::try_from(seq_open(vec![hop.clone()])).is_ok());
    assert_eq!(
        refused(seq_open(vec![hop.clone(); MAX_HOPS + 1])).reason(),
        "too_long"
    );
    let no_addr = v1::StageHop {
        data_addr: String::new(),
        ..hop
    };
    assert_eq!(
        refused(seq_open(vec![no_addr])),
        FrameError::Missing {
            field: "downstream.data_addr"
        }
    );

    let accept = v1::StageFrame {
        frame: Some(v1::stage_frame::Frame::LinkAccept(v1::StageLinkAccept {
            node_id: "b".into(),
            codec: 0,
            hidden_width: 8,
        })),
    };
    assert_eq!(refused(accept).reason(), "unknown_codec");

    let error = v1::StageFrame {
        frame: Some(v1::stage_frame::Frame::Error(v1::StageError {
            seq: None,
            error: None,
        })),
    };
    assert_eq!(refused(error).reason(), "missing_field");

    let two_rows_of_logits = v1::StageFrame {
        frame: Some(v1::stage_frame::Frame::StepResult(v1::StageStepResult {
            step: 1,
            outputs: vec![v1::StageSeqOutput {
                seq: 3,
                output: Some(v1::stage_seq_output::Output::Logits(
                    hidden(Codec::F32, 2, 10).into(),
                )),
            }],
        })),
    };
    assert_eq!(
        refused(two_rows_of_logits),
        FrameError::LogitsRows { seq: 3, rows: 2 }
    );
}

#[test]
fn a_link_offer_is_answered_with_the_negotiated_codec() {
    let mut offer = LinkOpen {
        model: ModelId::new("m"),
        model_sha256: String::new(),
        layers: range(2, 4),
        plan_epoch: 1,
        pipeline: 0,
        codecs: Codec::ALL.to_vec(),
        preference: Preference::Balanced,
        sender: NodeId::new("a"),
    };
    let accept = offer.accept(&Codec::ALL, NodeId::new("b"), 576).unwrap();
    assert_eq!(accept.codec, Codec::F16);
    assert_eq!(accept.hidden_width, 576);
    offer.preference = Preference::Exact;
    assert_eq!(
        offer
            .accept(&Codec::ALL, NodeId::new("b"), 576)
            .unwrap()
            .codec,
        Codec::F32
    );
    assert!(offer.accept(&[Codec::Q8], NodeId::new("b"), 576).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Whatever bytes a peer sends, decoding is an error value or a consistent frame that
    /// survives another round trip unchanged.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(wire) = v1::StageFrame::decode(bytes.as_slice())
            && let Ok(frame) = Frame::try_from(wire)
        {
            prop_assert_eq!(through_the_wire(&frame), frame);
        }
    }

    /// Steps built from random pieces: accepted exactly when consistent.
    #[test]
    fn random_steps_are_accepted_exactly_when_consistent(
        seqs in prop::collection::vec((0u64..6, 0u32..4, any::<bool>(), 0usize..4), 0..5),
        rows in 0usize..12,
        codec in prop::sample::select(Codec::ALL.to_vec()),
    ) {
        let slices: Vec<v1::StageSeqSlice> = seqs
            .iter()
            .map(|(seq, n, sample, listed)| v1::StageSeqSlice {
                seq: *seq,
                pos: 3,
                n_tokens: *n,
                sample: *sample,
                tokens: vec![7; *listed],
            })
            .collect();
        let wire = wire_step(slices, Some(hidden(codec, rows, 16).into()));
        let declared: usize = seqs.iter().map(|s| s.1 as usize).sum();
        let mut ids: Vec<u64> = seqs.iter().map(|s| s.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let consistent = !seqs.is_empty()
            && ids.len() == seqs.len()
            && seqs.iter().all(|(_, n, _, listed)| *n > 0 && (*listed == 0 || *listed == *n as usize))
            && declared == rows;
        let got = Frame::try_from(wire);
        prop_assert_eq!(got.is_ok(), consistent, "{:?}", got);
    }
}
