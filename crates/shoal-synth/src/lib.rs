//! Random-weight GGUF models with the tensor layout and metadata llama.cpp expects, for fast
//! hermetic tests (tiny presets write in milliseconds) and for size/speed tests (presets with
//! real models' shapes).
//!
//! Owns: model specs and presets, a small deterministic byte-level BPE vocabulary, seeded weight
//! generation and streaming quantized writing. Must not: know how models are run. Invariant: a
//! spec (including its seed) determines the written file byte for byte, on any machine and with
//! any number of threads, so golden data can record the spec instead of the file.

mod spec;
pub mod vocab;
pub mod weights;
mod write;

use std::path::PathBuf;

use shoal_gguf::{GgmlType, GgufError};

pub use spec::{Arch, SynthSpec, VocabSpec};
pub use write::{gguf_skeleton, write_model};

/// Why a synthetic model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The spec is inconsistent (shapes, block sizes, vocabulary size).
    #[error("invalid synthetic model spec: {field}: {reason}")]
    InvalidSpec {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Building or streaming the GGUF container failed.
    #[error("writing the GGUF container failed")]
    Gguf(#[from] GgufError),
    /// Quantizing a tensor's rows failed.
    #[error("quantizing tensor `{tensor}` to {dtype} failed")]
    Quantize {
        /// The tensor.
        tensor: String,
        /// The target type.
        dtype: GgmlType,
        /// The kernel's reason.
        #[source]
        source: shoal_kernels::KernelError,
    },
    /// Creating, writing or renaming the output file failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// A generation thread panicked (a bug, reported instead of propagated).
    #[error("a weight generation thread panicked")]
    WorkerPanicked,
}
