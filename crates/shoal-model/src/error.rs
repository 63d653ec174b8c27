//! The model crate's error boundary.

use shoal_types::{ErrorClass, LayerRangeError, SeqId};

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file is not a valid GGUF container.
    #[error("invalid model file: {0}")]
    File(#[from] shoal_gguf::GgufError),
    /// The architecture named in `general.architecture` is not one shoal runs.
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2)")]
    UnknownArchitecture(String),
    /// A required tensor is absent.
    #[error("tensor `{name}` is missing")]
    MissingTensor {
        /// Tensor name.
        name: String,
    },
    /// A tensor's shape disagrees with the metadata.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// Tensor name.
        name: String,
        /// Dimensions found (row length first).
        found: Vec<u64>,
        /// Dimensions the metadata implies.
        expected: Vec<u64>,
    },
    /// A tensor's element type cannot be used where it is.
    #[error("tensor `{name}` has type {dtype}, which cannot be used here")]
    TensorType {
        /// Tensor name.
        name: String,
        /// Its type.
        dtype: shoal_gguf::GgmlType,
    },
    /// Metadata values contradict each other or are out of range.
    #[error("inconsistent model metadata: {0}")]
    Metadata(String),
    /// The tokenizer or chat template in the file is unusable.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] shoal_tokenizer::TokenizerError),
    /// A numeric kernel refused its inputs.
    #[error("kernel: {0}")]
    Kernel(#[from] shoal_kernels::KernelError),
    /// The requested layer range does not fit the model.
    #[error("layer range: {0}")]
    LayerRange(#[from] LayerRangeError),
    /// The batch's shape does not match its input.
    #[error("bad batch: {0}")]
    BadBatch(String),
    /// A step names a sequence whose KV cache does not exist or is at another position.
    #[error("{seq}: expected position {expected}, got {got}")]
    Position {
        /// The sequence.
        seq: SeqId,
        /// Tokens already in its cache.
        expected: u32,
        /// Position the step claimed.
        got: u32,
    },
    /// The sequence would grow past the model's context window.
    #[error("{seq}: {needed} tokens exceed the context window of {context} tokens")]
    ContextOverflow {
        /// The sequence.
        seq: SeqId,
        /// Tokens it would hold.
        needed: u32,
        /// The context window.
        context: u32,
    },
    /// The KV cache budget is spent.
    #[error("KV cache budget of {budget} bytes exhausted")]
    KvBudget {
        /// The configured budget.
        budget: usize,
    },
    /// A KV snapshot does not fit the runtime or the sequence it was given for.
    #[error("KV snapshot: {0}")]
    Snapshot(String),
    /// Invalid generation input (empty prompt, bad sampling parameter...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The generation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The file at rest was refused: a manifest mismatch, a wrong or missing key, a damaged
    /// or truncated encrypted file.
    #[error(transparent)]
    Vault(#[from] shoal_vault::VaultError),
    /// I/O outside the GGUF reader.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ModelError {
    /// The wire class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            ModelError::InvalidRequest(_) | ModelError::ContextOverflow { .. } => {
                ErrorClass::InvalidRequest
            }
            ModelError::KvBudget { .. } => ErrorClass::CapacityExhausted,
            ModelError::Cancelled => ErrorClass::Cancelled,
            _ => ErrorClass::Internal,
        }
    }
}
