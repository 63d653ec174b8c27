//! CPU numerics for shoal: block quantization formats (scalar reference), SIMD dot products,
//! matrix products, and the compute thread pool.
//!
//! What this crate owns: the byte layouts of the GGUF tensor types (as `shoal-gguf` names them
//! in [`GgmlType`]), quantizing activations into the format each weight type multiplies against,
//! and `out = W · x` for every weight type, spread over a persistent [`ThreadPool`].
//! What it must not do: know about models, files or networks.
//!
//! Invariants:
//! - Every SIMD kernel has a scalar twin in [`quant`] / the scalar backend, and is tested against it.
//! - The instruction set is detected once ([`Isa::detected`]); hot paths only branch on the result.
//! - Activation quantization follows llama.cpp's x86 rounding choices, and the AVX2 dot products
//!   keep llama.cpp's per-block accumulation order, so greedy outputs can match it token for token.
//! - No heap allocation per call on the hot path: [`QuantizedActs`] reuses its buffers.
//! - Malformed input (wrong sizes, unsupported types) is an error value, never a panic.

mod acts;
mod attn;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod error;
mod isa;
mod matmul;
mod pool;
pub mod quant;
mod scalar;
mod shared;
mod vec;

pub use acts::{ActFormat, QuantizedActs};
pub use attn::{AttnScratch, KvHead, attend, attend_with};
pub use error::KernelError;
pub use isa::Isa;
pub use matmul::{WeightMatrix, matmul, matmul_with};
pub use pool::ThreadPool;
pub use quant::{dequantize_row, quantize_row};
pub use shoal_gguf::GgmlType;
pub use vec::{axpy_f16, dot_f16, dot_f32, f16_to_f32, f32_to_f16};
