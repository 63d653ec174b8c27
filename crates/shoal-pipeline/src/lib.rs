//! The parts of a layer-wise pipeline that need no I/O: how hidden states travel between the
//! stages of a model split over several nodes, and what the stages say to each other.
//!
//! - [`codec`]: [`Codec::F32`] (bit-exact), [`Codec::F16`] and [`Codec::Q8`] (8-bit blocks
//!   with a binary16 scale) turn rows of `f32` activations into bytes and back; [`negotiate`]
//!   picks the codec of a link from what both ends support and a [`Preference`].
//! - [`frame`]: the frames of the `shoal.v1.Stage` stream as domain types: opening a link and
//!   a sequence, one step of a micro-batch (several sequences, each a decode row or a prompt
//!   chunk), its sampled tokens or logits, releases and errors.
//! - [`wire`]: conversions between those frames and the generated protobuf messages, refusing
//!   malformed peer input with a typed [`FrameError`].
//!
//! This crate owns no sockets, threads or runtime, and does not know the model: the node agent
//! drives the stream and runs the layers. Invariants: encoding and decoding never panic on any
//! input; a [`Frame`] converted from the wire is internally consistent (see [`frame`]); every
//! codec's byte length determines its value count.

pub mod codec;
pub mod frame;
pub mod wire;

pub use codec::{Codec, CodecError, Preference, Q8_BLOCK, Q8_BLOCK_BYTES, negotiate};
pub use frame::{
    Activations, Frame, HopCheckpoint, LinkAccept, LinkOpen, MAX_SEQS_PER_STEP, NodeAddr,
    SeqOutput, SeqSlice, SequenceOpen, StageFault, StageHop, Step, StepProblem, StepResult,
};
pub use wire::{
    FrameError, codec_from_wire, codec_to_wire, preference_from_wire, preference_to_wire,
};
