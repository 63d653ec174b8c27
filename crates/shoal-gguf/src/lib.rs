//! GGUF model files: reading (memory-mapped, every offset and size validated before use),
//! typed metadata access, tensor views, and a writer.
//!
//! This crate knows the container format and the byte sizes of each tensor type, nothing about
//! what the numbers mean (that is `shoal-kernels`) or about model architectures (`shoal-model`).
//! Invariant: any byte string, however malformed, yields an error value, never a panic or an
//! out-of-bounds read. Only little-endian GGUF v2 and v3 are read; v3 is written.

mod dtype;
mod error;
mod file;
mod metadata;
mod mmap;
mod reader;
mod tensor;
mod value;
mod writer;

pub use dtype::{GgmlType, UnknownGgmlType};
pub use error::{GgufError, Location};
pub use file::{GgufBytes, GgufFile};
pub use metadata::Metadata;
pub use reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_NESTING};
pub use tensor::{MAX_DIMS, TensorInfo, TensorView};
pub use value::{MetaArray, MetaValue, StringArray, StringArrayIter, ValueType};
pub use writer::{GgufWriter, TensorSink, TensorStream, WRITE_VERSION};
