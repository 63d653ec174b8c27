//! Conversions between [`Frame`] and `shoal.v1.StageFrame`.
//!
//! Going to the wire cannot fail. Coming from it checks everything a peer could get wrong and
//! reports it as a [`FrameError`] (class `InvalidRequest`), never a panic: a missing message,
//! an empty id, an unknown codec, an inverted layer range, an oversized list, a step whose
//! rows and hidden states disagree. Unknown codecs in a link's offer are skipped rather than
//! refused (a newer peer may know more), and an unknown preference reads as the default.

use crate::codec::{Codec, CodecError, Preference};
use crate::frame::{
    Activations, Frame, HopCheckpoint, LinkAccept, LinkOpen, NodeAddr, SeqOutput, SeqSlice,
    SequenceOpen, StageFault, StageHop, Step, StepProblem, StepResult,
};
use shoal_proto::v1;
use shoal_proto::v1::stage_frame::Frame as WireFrame;
use shoal_proto::v1::stage_seq_output::Output as WireOutput;
use shoal_types::{ErrorClass, LayerRange, LayerRangeError, ModelId, NodeId, RequestId, SeqId};

/// Longest string field a frame may carry, in bytes.
pub const MAX_TEXT: usize = 1024;
/// Most stages a sequence's downstream chain may list.
pub const MAX_HOPS: usize = 64;
/// Most codecs a link offer may list.
pub const MAX_CODECS: usize = 16;
/// Most sequences one release may list.
pub const MAX_RELEASE: usize = 4096;
/// Most restorable tokens a sequence open may list (a context window of 1 Mi tokens).
pub const MAX_RESTORABLE: usize = 1 << 20;

/// Why a wire frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame (or a message it needs) is absent.
    #[error("missing {field}")]
    Missing {
        /// Which field.
        field: &'static str,
    },
    /// A codec value this build does not know.
    #[error("{field}: unknown codec {value}")]
    UnknownCodec {
        /// Which field.
        field: &'static str,
        /// The wire value.
        value: i32,
    },
    /// A layer range that is empty or inverted.
    #[error("{field}: {source}")]
    BadRange {
        /// Which field.
        field: &'static str,
        /// Why.
        #[source]
        source: LayerRangeError,
    },
    /// A string or list longer than allowed.
    #[error("{field} is longer than {max}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// Activations that do not decode as declared.
    #[error("{field}: {source}")]
    Codec {
        /// Which field.
        field: &'static str,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A step that is not internally consistent.
    #[error("step {step}: {problem}")]
    BadStep {
        /// The step number.
        step: u64,
        /// What is wrong.
        #[source]
        problem: StepProblem,
    },
    /// A logits output that is not exactly one row.
    #[error("logits of sequence {seq} hold {rows} rows, not 1")]
    LogitsRows {
        /// The sequence.
        seq: u64,
        /// Rows carried.
        rows: usize,
    },
}

impl FrameError {
    /// The error's class: a malformed frame is the sender's mistake.
    pub fn class(&self) -> ErrorClass {
        ErrorClass::InvalidRequest
    }

    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Missing { .. } => "missing_field",
            FrameError::UnknownCodec { .. } => "unknown_codec",
            FrameError::BadRange { .. } => "invalid_layer_range",
            FrameError::TooLong { .. } => "too_long",
            FrameError::Codec { .. } => "malformed_activations",
            FrameError::BadStep { .. } => "inconsistent_step",
            FrameError::LogitsRows { .. } => "malformed_logits",
        }
    }
}

/// The wire value of a codec.
pub fn codec_to_wire(c: Codec) -> v1::ActivationCodec {
    match c {
        Codec::F32 => v1::ActivationCodec::F32,
        Codec::F16 => v1::ActivationCodec::F16,
        Codec::Q8 => v1::ActivationCodec::Q8,
    }
}

/// The codec of a wire value, `None` for unspecified or unknown values.
pub fn codec_from_wire(value: i32) -> Option<Codec> {
    match v1::ActivationCodec::try_from(value) {
        Ok(v1::ActivationCodec::F32) => Some(Codec::F32),
        Ok(v1::ActivationCodec::F16) => Some(Codec::F16),
        Ok(v1::ActivationCodec::Q8) => Some(Codec::Q8),
        _ => None,
    }
}

/// The wire form of a codec preference.
pub fn preference_to_wire(p: Preference) -> v1::CodecPreference {
    match p {
        Preference::Balanced => v1::CodecPreference::Balanced,
        Preference::Exact => v1::CodecPreference::Exact,
        Preference::Smallest => v1::CodecPreference::Smallest,
    }
}

/// A codec preference from the wire (unknown values mean the default).
pub fn preference_from_wire(value: i32) -> Preference {
    match v1::CodecPreference::try_from(value) {
        Ok(v1::CodecPreference::Exact) => Preference::Exact,
        Ok(v1::CodecPreference::Smallest) => Preference::Smallest,
        _ => Preference::Balanced,
    }
}

/// A layer range on the wire.
pub fn range_to_wire(r: LayerRange) -> v1::LayerRange {
    v1::LayerRange {
        start: r.start(),
        end: r.end(),
    }
}

/// A layer range from the wire (`field` names it in the error).
pub fn range_from_wire(
    field: &'static str,
    r: Option<v1::LayerRange>,
) -> Result<LayerRange, FrameError> {
    let r = r.ok_or(FrameError::Missing { field })?;
    LayerRange::new(r.start, r.end).map_err(|source| FrameError::BadRange { field, source })
}

/// A bounded string; `required` refuses an empty one.
fn text(field: &'static str, s: String, required: bool) -> Result<String, FrameError> {
    if s.len() > MAX_TEXT {
        return Err(FrameError::TooLong {
            field,
            max: MAX_TEXT,
        });
    }
    if required && s.is_empty() {
        return Err(FrameError::Missing { field });
    }
    Ok(s)
}

fn bounded<T>(field: &'static str, v: Vec<T>, max: usize) -> Result<Vec<T>, FrameError> {
    if v.len() > max {
        return Err(FrameError::TooLong { field, max });
    }
    Ok(v)
}

impl From<Activations> for v1::Activations {
    fn from(a: Activations) -> Self {
        v1::Activations {
            codec: codec_to_wire(a.codec) as i32,
            width: a.width,
            data: a.data,
        }
    }
}

fn activations_from_wire(
    field: &'static str,
    a: Option<v1::Activations>,
) -> Result<Activations, FrameError> {
    let a = a.ok_or(FrameError::Missing { field })?;
    let codec = codec_from_wire(a.codec).ok_or(FrameError::UnknownCodec {
        field,
        value: a.codec,
    })?;
    let out = Activations {
        codec,
        width: a.width,
        data: a.data,
    };
    out.rows()
        .map_err(|source| FrameError::Codec { field, source })?;
    Ok(out)
}

impl From<StageHop> for v1::StageHop {
    fn from(h: StageHop) -> Self {
        v1::StageHop {
            node_id: h.node.to_string(),
            data_addr: h.data_addr,
            layers: Some(range_to_wire(h.layers)),
            checkpoint_every: h.checkpoint.every,
            checkpoint_node: node_of(h.checkpoint.peer.as_ref()),
            checkpoint_addr: addr_of(h.checkpoint.peer.as_ref()),
            restore_node: node_of(h.checkpoint.restore.as_ref()),
            restore_addr: addr_of(h.checkpoint.restore.as_ref()),
        }
    }
}

impl TryFrom<v1::StageHop> for StageHop {
    type Error = FrameError;
    fn try_from(h: v1::StageHop) -> Result<Self, FrameError> {
        Ok(StageHop {
            node: NodeId::new(text("downstream.node_id", h.node_id, true)?),
            data_addr: text("downstream.data_addr", h.data_addr, true)?,
            layers: range_from_wire("downstream.layers", h.layers)?,
            checkpoint: HopCheckpoint {
                every: h.checkpoint_every,
                peer: NodeAddr::from_parts(
                    text("downstream.checkpoint_node", h.checkpoint_node, false)?,
                    text("downstream.checkpoint_addr", h.checkpoint_addr, false)?,
                ),
                restore: NodeAddr::from_parts(
                    text("downstream.restore_node", h.restore_node, false)?,
                    text("downstream.restore_addr", h.restore_addr, false)?,
                ),
            },
        })
    }
}

fn node_of(a: Option<&NodeAddr>) -> String {
    a.map(|a| a.node.to_string()).unwrap_or_default()
}

fn addr_of(a: Option<&NodeAddr>) -> String {
    a.map(|a| a.addr.clone()).unwrap_or_default()
}

impl From<Frame> for v1::StageFrame {
    fn from(f: Frame) -> Self {
        let frame = match f {
            Frame::LinkOpen(o) => WireFrame::LinkOpen(v1::StageLinkOpen {
                model_id: o.model.to_string(),
                model_sha256: o.model_sha256,
                layers: Some(range_to_wire(o.layers)),
                plan_epoch: o.plan_epoch,
                pipeline: o.pipeline,
                codecs: o
                    .codecs
                    .into_iter()
                    .map(|c| codec_to_wire(c) as i32)
                    .collect(),
                preference: preference_to_wire(o.preference) as i32,
                sender_node_id: o.sender.to_string(),
            }),
            Frame::LinkAccept(a) => WireFrame::LinkAccept(v1::StageLinkAccept {
                node_id: a.node.to_string(),
                codec: codec_to_wire(a.codec) as i32,
                hidden_width: a.hidden_width,
            }),
            Frame::SequenceOpen(s) => WireFrame::SequenceOpen(v1::StageSequenceOpen {
                seq: s.seq.0,
                request_id: s.request.to_string(),
                downstream: s.downstream.into_iter().map(Into::into).collect(),
                sampling: Some(s.sampling),
                sampled: s.sampled,
                return_logits: s.return_logits,
                max_context: s.max_context,
                stage: s.stage.map(|h| (*h).into()),
                restorable: s.restorable,
            }),
            Frame::Step(s) => WireFrame::Step(v1::StageStep {
                step: s.step,
                seqs: s
                    .seqs
                    .into_iter()
                    .map(|q| v1::StageSeqSlice {
                        seq: q.seq.0,
                        pos: q.pos,
                        n_tokens: q.n_tokens,
                        sample: q.sample,
                        tokens: q.tokens,
                    })
                    .collect(),
                hidden: Some(s.hidden.into()),
                sent_unix_micros: s.sent_unix_micros,
            }),
            Frame::StepResult(r) => WireFrame::StepResult(v1::StageStepResult {
                step: r.step,
                outputs: r
                    .outputs
                    .into_iter()
                    .map(|o| match o {
                        SeqOutput::Token { seq, token } => v1::StageSeqOutput {
                            seq: seq.0,
                            output: Some(WireOutput::Token(token)),
                        },
                        SeqOutput::Logits { seq, logits } => v1::StageSeqOutput {
                            seq: seq.0,
                            output: Some(WireOutput::Logits(logits.into())),
                        },
                        SeqOutput::Restored { seq, positions } => v1::StageSeqOutput {
                            seq: seq.0,
                            output: Some(WireOutput::Restored(positions)),
                        },
                    })
                    .collect(),
            }),
            Frame::Release(seqs) => WireFrame::Release(v1::StageRelease {
                seqs: seqs.into_iter().map(|s| s.0).collect(),
            }),
            Frame::Error(e) => WireFrame::Error(v1::StageError {
                seq: e.seq.map(|s| s.0),
                error: Some(v1::Error {
                    class: shoal_proto::class_to_wire(e.class) as i32,
                    reason: e.reason,
                    message: e.message,
                }),
            }),
        };
        v1::StageFrame { frame: Some(frame) }
    }
}

impl TryFrom<v1::StageFrame> for Frame {
    type Error = FrameError;

    fn try_from(f: v1::StageFrame) -> Result<Self, FrameError> {
        let frame = f.frame.ok_or(FrameError::Missing { field: "frame" })?;
        Ok(match frame {
            WireFrame::LinkOpen(o) => Frame::LinkOpen(LinkOpen {
                model: ModelId::new(text("link_open.model_id", o.model_id, true)?),
                model_sha256: text("link_open.model_sha256", o.model_sha256, false)?,
                layers: range_from_wire("link_open.layers", o.layers)?,
                plan_epoch: o.plan_epoch,
                pipeline: o.pipeline,
                codecs: bounded("link_open.codecs", o.codecs, MAX_CODECS)?
                    .into_iter()
                    .filter_map(codec_from_wire)
                    .collect(),
                preference: preference_from_wire(o.preference),
                sender: NodeId::new(text("link_open.sender_node_id", o.sender_node_id, true)?),
            }),
            WireFrame::LinkAccept(a) => Frame::LinkAccept(LinkAccept {
                node: NodeId::new(text("link_accept.node_id", a.node_id, true)?),
                codec: codec_from_wire(a.codec).ok_or(FrameError::UnknownCodec {
                    field: "link_accept.codec",
                    value: a.codec,
                })?,
                hidden_width: a.hidden_width,
            }),
            WireFrame::SequenceOpen(s) => Frame::SequenceOpen(SequenceOpen {
                seq: SeqId(s.seq),
                request: RequestId::new(text("sequence_open.request_id", s.request_id, false)?),
                downstream: bounded("sequence_open.downstream", s.downstream, MAX_HOPS)?
                    .into_iter()
                    .map(StageHop::try_from)
                    .collect::<Result<_, _>>()?,
                sampling: s.sampling.unwrap_or_default(),
                sampled: s.sampled,
                return_logits: s.return_logits,
                max_context: s.max_context,
                stage: s.stage.map(StageHop::try_from).transpose()?.map(Box::new),
                restorable: bounded("sequence_open.restorable", s.restorable, MAX_RESTORABLE)?,
            }),
            WireFrame::Step(s) => {
                let step = Step {
                    step: s.step,
                    seqs: s
                        .seqs
                        .into_iter()
                        .map(|q| SeqSlice {
                            seq: SeqId(q.seq),
                            pos: q.pos,
                            n_tokens: q.n_tokens,
                            sample: q.sample,
                            tokens: q.tokens,
                        })
                        .collect(),
                    hidden: activations_from_wire("step.hidden", s.hidden)?,
                    sent_unix_micros: s.sent_unix_micros,
                };
                step.check().map_err(|problem| FrameError::BadStep {
                    step: s.step,
                    problem,
                })?;
                Frame::Step(step)
            }
            WireFrame::StepResult(r) => Frame::StepResult(StepResult {
                step: r.step,
                outputs: bounded("step_result.outputs", r.outputs, crate::MAX_SEQS_PER_STEP)?
                    .into_iter()
                    .map(output_from_wire)
                    .collect::<Result<_, _>>()?,
            }),
            WireFrame::Release(r) => Frame::Release(
                bounded("release.seqs", r.seqs, MAX_RELEASE)?
                    .into_iter()
                    .map(SeqId)
                    .collect(),
            ),
            WireFrame::Error(e) => {
                let err = e.error.ok_or(FrameError::Missing {
                    field: "error.error",
                })?;
                Frame::Error(StageFault {
                    seq: e.seq.map(SeqId),
                    class: shoal_proto::class_from_wire(err.class),
                    reason: text("error.reason", err.reason, false)?,
                    message: text("error.message", err.message, false)?,
                })
            }
        })
    }
}

fn output_from_wire(o: v1::StageSeqOutput) -> Result<SeqOutput, FrameError> {
    let seq = SeqId(o.seq);
    match o.output.ok_or(FrameError::Missing {
        field: "step_result.outputs.output",
    })? {
        WireOutput::Token(token) => Ok(SeqOutput::Token { seq, token }),
        WireOutput::Restored(positions) => Ok(SeqOutput::Restored { seq, positions }),
        WireOutput::Logits(l) => {
            let logits = activations_from_wire("step_result.outputs.logits", Some(l))?;
            match logits.rows() {
                Ok(1) => Ok(SeqOutput::Logits { seq, logits }),
                Ok(rows) => Err(FrameError::LogitsRows { seq: o.seq, rows }),
                Err(source) => Err(FrameError::Codec {
                    field: "step_result.outputs.logits",
                    source,
                }),
            }
        }
    }
}
