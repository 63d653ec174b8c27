//! GGUF model files: reading (memory-mapped, every offset and size validated before use),
//! typed metadata access, tensor views, and a writer.
//!
//! This crate knows the container format and the byte sizes of each tensor type, nothing about
//! what the numbers mean (that is `shoal-kernels`) or about model architectures (`shoal-model`).
//! Invariant: any byte string, however malformed, yields an error value, never a panic or an
//! out-of-bounds read.

mod dtype;

pub use dtype::{GgmlType, UnknownGgmlType};
