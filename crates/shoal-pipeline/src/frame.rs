//! The frames two adjacent stages exchange on a link, as domain types.
//!
//! They mirror `shoal.v1.StageFrame` (see `stage.proto` for the protocol: who sends what, and
//! when); [`crate::wire`] converts between the two and checks everything a peer could get
//! wrong, so a [`Frame`] obtained from the wire is internally consistent: a step's rows match
//! its hidden states, its sequences are distinct, token lists have the declared length.

use crate::codec::{Codec, CodecError, Preference};
use shoal_proto::v1;
use shoal_types::{ErrorClass, LayerRange, ModelId, NodeId, RequestId, SeqId};

/// Rows of activations of one width, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activations {
    /// How `data` is encoded.
    pub codec: Codec,
    /// Values per row (the hidden size, or the vocabulary for logits).
    pub width: u32,
    /// The encoded values, row after row.
    pub data: Vec<u8>,
}

impl Activations {
    /// Encodes `values`, rows of `width` values each.
    pub fn encode(codec: Codec, width: u32, values: &[f32]) -> Result<Self, CodecError> {
        let w = usize::try_from(width).unwrap_or(usize::MAX);
        if width == 0 && !values.is_empty() || width != 0 && !values.len().is_multiple_of(w) {
            return Err(CodecError::Ragged {
                values: values.len(),
                width,
            });
        }
        let mut data = Vec::with_capacity(codec.encoded_len(values.len()));
        codec.encode(values, &mut data)?;
        Ok(Self { codec, width, data })
    }

    /// Rows the payload holds, without decoding it.
    pub fn rows(&self) -> Result<usize, CodecError> {
        let values = self.codec.decoded_len(self.data.len())?;
        let w = usize::try_from(self.width).unwrap_or(usize::MAX);
        match (values, w) {
            (0, _) => Ok(0),
            (_, 0) => Err(CodecError::Ragged {
                values,
                width: self.width,
            }),
            (v, w) if v.is_multiple_of(w) => Ok(v / w),
            (v, _) => Err(CodecError::Ragged {
                values: v,
                width: self.width,
            }),
        }
    }

    /// Appends the decoded rows to `out`; returns how many rows.
    pub fn decode(&self, out: &mut Vec<f32>) -> Result<usize, CodecError> {
        let rows = self.rows()?;
        self.codec.decode(&self.data, out)?;
        Ok(rows)
    }
}

/// One stage of a pipeline, as a peer needs to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageHop {
    /// The node running it.
    pub node: NodeId,
    /// Where its Stage service listens (`host:port`).
    pub data_addr: String,
    /// The layers it runs.
    pub layers: LayerRange,
    /// What the stage does with checkpoints of the sequences it runs.
    pub checkpoint: HopCheckpoint,
}

impl StageHop {
    /// A hop with no checkpoints.
    pub fn new(node: NodeId, data_addr: String, layers: LayerRange) -> Self {
        Self {
            node,
            data_addr,
            layers,
            checkpoint: HopCheckpoint::default(),
        }
    }
}

/// A node named by its id and data-plane address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// The node.
    pub node: NodeId,
    /// Its data-plane address (`host:port`).
    pub addr: String,
}

impl NodeAddr {
    /// The node named by `node` and `addr`, unless either is empty.
    pub fn from_parts(node: String, addr: String) -> Option<Self> {
        (!node.is_empty() && !addr.is_empty()).then(|| Self {
            node: NodeId::new(node),
            addr,
        })
    }
}

/// A stage's checkpoints of one sequence's KV cache over its layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HopCheckpoint {
    /// New positions gathered before each checkpoint; 0: no checkpoints.
    pub every: u32,
    /// The node the checkpoints go to.
    pub peer: Option<NodeAddr>,
    /// (A resumed generation.) The node holding a checkpoint of these layers to import.
    pub restore: Option<NodeAddr>,
}

/// The first frame upstream → downstream: what the link is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOpen {
    /// The model.
    pub model: ModelId,
    /// sha256 of its file (lower-case hex).
    pub model_sha256: String,
    /// The layers the receiver must run.
    pub layers: LayerRange,
    /// The plan epoch the sender routes under.
    pub plan_epoch: u64,
    /// The replica (pipeline id) the link belongs to.
    pub pipeline: u32,
    /// Codecs the sender can encode.
    pub codecs: Vec<Codec>,
    /// How the receiver should choose among them.
    pub preference: Preference,
    /// The sender.
    pub sender: NodeId,
}

impl LinkOpen {
    /// The receiver's answer given the codecs it supports: the negotiated codec, or `None`
    /// when the two ends share none the preference accepts.
    pub fn accept(&self, ours: &[Codec], node: NodeId, hidden_width: u32) -> Option<LinkAccept> {
        let codec = crate::codec::negotiate(ours, &self.codecs, self.preference)?;
        Some(LinkAccept {
            node,
            codec,
            hidden_width,
        })
    }
}

/// The first frame downstream → upstream: the link is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAccept {
    /// The receiver.
    pub node: NodeId,
    /// The codec the sender should use.
    pub codec: Codec,
    /// The model's hidden size: every step's row width on this link.
    pub hidden_width: u32,
}

/// A sequence starts on a link.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceOpen {
    /// Its id on this link.
    pub seq: SeqId,
    /// The client request it serves.
    pub request: RequestId,
    /// The stages after the receiver, in order; empty when the receiver is last.
    pub downstream: Vec<StageHop>,
    /// How the last stage samples (as on the wire; absent fields mean the node's defaults).
    pub sampling: v1::SamplingParams,
    /// Tokens sampled before (a resumed generation).
    pub sampled: u32,
    /// The last stage returns logits instead of sampling.
    pub return_logits: bool,
    /// Longest context the sequence may reach.
    pub max_context: u32,
    /// The receiver's own hop, with its checkpoint plan and restore source.
    pub stage: Option<Box<StageHop>>,
    /// (A resumed generation.) The leading tokens whose KV entries every stage before the
    /// receiver imported: the receiver imports the longest prefix of them its checkpoint
    /// holds. Empty: nothing to restore.
    pub restorable: Vec<u32>,
}

/// One sequence's part in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// The sequence.
    pub seq: SeqId,
    /// Position of its first row.
    pub pos: u32,
    /// Rows it contributes (1 for a decode step, a prompt chunk's length otherwise).
    pub n_tokens: u32,
    /// Whether the last stage produces an output after this step's last row of it.
    pub sample: bool,
    /// Token ids of its rows: empty, or exactly `n_tokens` long.
    pub tokens: Vec<u32>,
}

/// Hidden states of one step of a micro-batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Step number on the link.
    pub step: u64,
    /// The sequences in row order.
    pub seqs: Vec<SeqSlice>,
    /// `Σ n_tokens` rows of hidden states.
    pub hidden: Activations,
    /// When the sender handed the step to its link, in microseconds since the Unix epoch (0:
    /// unknown). Across machines, `now - sent_unix_micros` includes their clock skew.
    pub sent_unix_micros: u64,
}

/// Why a step is not internally consistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepProblem {
    /// The step has no sequences.
    #[error("no sequences")]
    Empty,
    /// More sequences than a step may carry.
    #[error("{0} sequences (at most {max})", max = MAX_SEQS_PER_STEP)]
    TooManySeqs(usize),
    /// A sequence appears twice.
    #[error("sequence {0} appears twice")]
    DuplicateSeq(u64),
    /// A sequence contributes no rows.
    #[error("sequence {0} has no tokens")]
    NoTokens(u64),
    /// A sequence's token list has another length than its row count.
    #[error("sequence {seq} lists {listed} tokens for {n_tokens} rows")]
    TokenCount {
        /// The sequence.
        seq: u64,
        /// Its declared rows.
        n_tokens: u32,
        /// Token ids listed.
        listed: usize,
    },
    /// A sequence's positions would pass `u32::MAX`.
    #[error("sequence {0} runs past the largest position")]
    PositionOverflow(u64),
    /// The hidden states hold another number of rows than the sequences declare.
    #[error("sequences declare {declared} rows, hidden states hold {carried}")]
    RowMismatch {
        /// `Σ n_tokens`.
        declared: u64,
        /// Rows in the payload.
        carried: usize,
    },
    /// The payload is malformed.
    #[error("hidden states: {0}")]
    Codec(#[from] CodecError),
}

/// Most sequences one step may carry.
pub const MAX_SEQS_PER_STEP: usize = 4096;

impl Step {
    /// Rows the sequences declare (`Σ n_tokens`).
    pub fn rows(&self) -> u64 {
        self.seqs.iter().map(|s| u64::from(s.n_tokens)).sum()
    }

    /// Checks that the step is internally consistent (see [`StepProblem`]).
    pub fn check(&self) -> Result<(), StepProblem> {
        if self.seqs.is_empty() {
            return Err(StepProblem::Empty);
        }
        if self.seqs.len() > MAX_SEQS_PER_STEP {
            return Err(StepProblem::TooManySeqs(self.seqs.len()));
        }
        let mut ids: Vec<u64> = self.seqs.iter().map(|s| s.seq.0).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(StepProblem::DuplicateSeq(w[0]));
        }
        for s in &self.seqs {
            if s.n_tokens == 0 {
                return Err(StepProblem::NoTokens(s.seq.0));
            }
            if !s.tokens.is_empty() && s.tokens.len() as u64 != u64::from(s.n_tokens) {
                return Err(StepProblem::TokenCount {
                    seq: s.seq.0,
                    n_tokens: s.n_tokens,
                    listed: s.tokens.len(),
                });
            }
            if s.pos.checked_add(s.n_tokens).is_none() {
                return Err(StepProblem::PositionOverflow(s.seq.0));
            }
        }
        let carried = self.hidden.rows()?;
        let declared = self.rows();
        if carried as u64 != declared {
            return Err(StepProblem::RowMismatch { declared, carried });
        }
        Ok(())
    }
}

/// What the last stage produced for one sequence in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqOutput {
    /// A sampled token.
    Token {
        /// The sequence.
        seq: SeqId,
        /// The token id.
        token: u32,
    },
    /// One row of logits.
    Logits {
        /// The sequence.
        seq: SeqId,
        /// The logits, one row of the vocabulary's width.
        logits: Activations,
    },
    /// The answer to a sequence opened with `restorable`: the KV positions every stage holds.
    Restored {
        /// The sequence.
        seq: SeqId,
        /// Positions imported from checkpoints on every stage.
        positions: u32,
    },
}

impl SeqOutput {
    /// The sequence it belongs to.
    pub fn seq(&self) -> SeqId {
        match self {
            SeqOutput::Token { seq, .. }
            | SeqOutput::Logits { seq, .. }
            | SeqOutput::Restored { seq, .. } => *seq,
        }
    }
}

/// The outputs of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResult {
    /// The step answered.
    pub step: u64,
    /// One output per sequence that asked for one, in the step's order.
    pub outputs: Vec<SeqOutput>,
}

/// A failure of one sequence (`seq` set) or of the whole link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageFault {
    /// The sequence, or `None` for the link.
    pub seq: Option<SeqId>,
    /// The error's class.
    pub class: ErrorClass,
    /// A stable machine-readable reason.
    pub reason: String,
    /// Safe to show a client.
    pub message: String,
}

/// One message on a link, in either direction.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Upstream → downstream, first frame.
    LinkOpen(LinkOpen),
    /// Downstream → upstream, first frame.
    LinkAccept(LinkAccept),
    /// Upstream → downstream: a sequence starts.
    SequenceOpen(SequenceOpen),
    /// Upstream → downstream: one step's hidden states.
    Step(Step),
    /// Downstream → upstream: one step's outputs.
    StepResult(StepResult),
    /// Upstream → downstream: sequences that ended.
    Release(Vec<SeqId>),
    /// Either direction: a failure.
    Error(StageFault),
}
