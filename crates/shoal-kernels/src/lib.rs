//! CPU numerics: block quantization formats (scalar reference), SIMD dot products, matrix
//! products, and the compute thread pool.
