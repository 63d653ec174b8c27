//! The one error type this crate returns: every way a caller can hand the kernels inconsistent
//! sizes or types, plus thread start-up failure.

use shoal_gguf::GgmlType;

/// Why a kernel call was refused.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A row length is not a whole number of blocks of the type.
    #[error("{dtype}: {len} elements is not a whole number of {block_size}-element blocks")]
    PartialBlock {
        /// The tensor type.
        dtype: GgmlType,
        /// The number of elements asked for.
        len: usize,
        /// Elements per block of `dtype`.
        block_size: usize,
    },
    /// A buffer does not hold the number of bytes or elements its shape implies.
    #[error("{what}: expected {expected}, got {actual}")]
    SizeMismatch {
        /// Which buffer or dimension.
        what: &'static str,
        /// The size implied by the other arguments.
        expected: usize,
        /// The size given.
        actual: usize,
    },
    /// A size computation overflowed `usize`.
    #[error("{what}: size overflows")]
    Overflow {
        /// Which size.
        what: &'static str,
    },
    /// The type cannot be used for the requested operation.
    #[error("{dtype} is not supported for {op}")]
    Unsupported {
        /// The tensor type.
        dtype: GgmlType,
        /// The operation.
        op: &'static str,
    },
    /// Activations were quantized for a different weight type than the matrix has.
    #[error("activations are in format {acts:?} but the weights are {weights}")]
    ActsFormat {
        /// The format the activations hold (`None`: never quantized).
        acts: Option<crate::ActFormat>,
        /// The weight type of the matrix.
        weights: GgmlType,
    },
    /// A thread pool was asked for zero threads.
    #[error("a thread pool needs at least one thread")]
    NoThreads,
    /// The operating system refused to start a compute thread.
    #[error("could not start compute thread {index}")]
    ThreadSpawn {
        /// Index of the thread that failed to start.
        index: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
