//! Activations prepared for a matrix product: quantized into the format the weight type's dot
//! product consumes, in reusable buffers.
//!
//! The quantized blocks are stored split by field (all `qs` of a vector contiguous, scales in
//! their own f32 arrays) rather than as ggml's packed blocks: the kernels then load 32 aligned
//! quantized bytes per block without unpacking, and convert each f16 scale once here instead of
//! once per weight row. The values are exactly those of ggml's blocks (scales are the f16-rounded
//! values, widened); [`QuantizedActs::to_ggml_bytes`] rebuilds the packed form.
#![allow(unsafe_code)] // parallel quantization writes disjoint vectors (see `SharedMut`)

use half::f16;
use shoal_gguf::GgmlType;

use crate::quant::{self, QK, QK_K, kquants, legacy};
use crate::shared::SharedMut;
use crate::{Isa, KernelError, ThreadPool};

/// The format activations take for a given weight type (llama.cpp's `vec_dot_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActFormat {
    /// For Q8_0 and Q4_0 weights.
    Q8_0,
    /// For Q4_1 weights: Q8_0 plus the f16 sum `s = d * Σ q` per block.
    Q8_1,
    /// For Q4_K, Q5_K and Q6_K weights.
    Q8K,
    /// For F16 weights: activations rounded to f16.
    F16,
    /// For BF16 weights: activations rounded to bf16.
    BF16,
    /// For F32 weights: activations as they are.
    F32,
}

impl ActFormat {
    /// The format a matrix of `dtype` weights multiplies against.
    pub fn for_weights(dtype: GgmlType) -> Result<Self, KernelError> {
        Ok(match dtype {
            GgmlType::Q8_0 | GgmlType::Q4_0 => ActFormat::Q8_0,
            GgmlType::Q4_1 => ActFormat::Q8_1,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => ActFormat::Q8K,
            GgmlType::F16 => ActFormat::F16,
            GgmlType::BF16 => ActFormat::BF16,
            GgmlType::F32 => ActFormat::F32,
            GgmlType::Q8K => {
                return Err(KernelError::Unsupported {
                    dtype,
                    op: "weights of a matrix product",
                });
            }
        })
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            ActFormat::Q8_0 | ActFormat::Q8_1 => QK,
            ActFormat::Q8K => QK_K,
            ActFormat::F16 | ActFormat::BF16 | ActFormat::F32 => 1,
        }
    }
}

/// Reusable buffer of `n` activation vectors of `cols` elements, quantized for one weight type.
#[derive(Debug, Default, Clone)]
pub struct QuantizedActs {
    format: Option<ActFormat>,
    n: usize,
    cols: usize,
    /// Q8 formats: quantized values, `n * cols`.
    qs: Vec<i8>,
    /// Q8 formats: per-block scale, `n * cols / block`.
    d: Vec<f32>,
    /// Q8_1: per-block f16-rounded `d * Σ q`.
    s: Vec<f32>,
    /// Q8_K: per-16 sums of `qs`, `n * cols / 16`.
    bsums: Vec<i16>,
    /// F16.
    h: Vec<f16>,
    /// BF16 bits.
    bf: Vec<u16>,
    /// F32.
    f: Vec<f32>,
}

/// One activation vector as the kernels read it (only the fields of its format are non-empty).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub bsums: &'a [i16],
    pub h: &'a [f16],
    pub bf: &'a [u16],
    pub f: &'a [f32],
}

/// Vector count above which quantization is split over the pool (below, the hand-off costs more
/// than it saves).
const PARALLEL_MIN_VECTORS: usize = 4;

impl QuantizedActs {
    /// An empty buffer; the first [`QuantizedActs::quantize`] sizes it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The format of the current contents (`None` before the first quantization).
    pub fn format(&self) -> Option<ActFormat> {
        self.format
    }

    /// Number of vectors held.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Elements per vector.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Quantize `n` activation vectors (`x` is `n * cols`, row-major) into the format
    /// `weight_dtype` needs. Reuses capacity; splits the work over the pool when `n` is large.
    pub fn quantize(
        &mut self,
        pool: &ThreadPool,
        weight_dtype: GgmlType,
        x: &[f32],
        n: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        self.quantize_with(pool, weight_dtype, x, n, cols, Isa::detected())
    }

    /// As [`QuantizedActs::quantize`] with a chosen implementation (falls back to scalar if the
    /// CPU lacks it). Every implementation produces identical bytes.
    pub fn quantize_with(
        &mut self,
        pool: &ThreadPool,
        weight_dtype: GgmlType,
        x: &[f32],
        n: usize,
        cols: usize,
        isa: Isa,
    ) -> Result<(), KernelError> {
        let format = ActFormat::for_weights(weight_dtype)?;
        let bs = format.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(KernelError::PartialBlock {
                dtype: weight_dtype,
                len: cols,
                block_size: bs,
            });
        }
        let total = n.checked_mul(cols).ok_or(KernelError::Overflow {
            what: "activations",
        })?;
        if x.len() != total {
            return Err(KernelError::SizeMismatch {
                what: "activation elements (n * cols)",
                expected: total,
                actual: x.len(),
            });
        }
        self.format = Some(format);
        self.n = n;
        self.cols = cols;
        let blocks = total / bs;
        match format {
            ActFormat::Q8_0 | ActFormat::Q8_1 | ActFormat::Q8K => {
                self.qs.resize(total, 0);
                self.d.resize(blocks, 0.0);
                if format == ActFormat::Q8_1 {
                    self.s.resize(blocks, 0.0);
                }
                if format == ActFormat::Q8K {
                    self.bsums.resize(total / 16, 0);
                }
            }
            ActFormat::F16 => self.h.resize(total, f16::ZERO),
            ActFormat::BF16 => self.bf.resize(total, 0),
            ActFormat::F32 => {
                self.f.clear();
                self.f.extend_from_slice(x);
                return Ok(());
            }
        }
        let isa = isa.or_supported();
        let threads = if n >= PARALLEL_MIN_VECTORS {
            pool.n_threads().min(n)
        } else {
            1
        };
        let dst = ActsMut {
            qs: SharedMut::new(&mut self.qs),
            d: SharedMut::new(&mut self.d),
            s: SharedMut::new(&mut self.s),
            bsums: SharedMut::new(&mut self.bsums),
            h: SharedMut::new(&mut self.h),
            bf: SharedMut::new(&mut self.bf),
        };
        let work = |i: usize, nt: usize| {
            let (start, end) = (n * i / nt, n * (i + 1) / nt);
            for v in start..end {
                // SAFETY: vector ranges [start, end) are disjoint across thread indices, and
                // each vector's fields occupy their own index ranges in every buffer.
                unsafe { dst.quantize_vector(format, isa, &x[v * cols..(v + 1) * cols], v, cols) };
            }
        };
        if threads > 1 {
            pool.run(work);
        } else {
            work(0, 1);
        }
        Ok(())
    }

    /// The `i`-th vector in ggml's packed block layout (for interop and tests).
    pub fn to_ggml_bytes(&self, i: usize) -> Option<Vec<u8>> {
        if i >= self.n {
            return None;
        }
        let row = self.row(i);
        let mut out = Vec::new();
        match self.format? {
            ActFormat::Q8_0 | ActFormat::Q8_1 => {
                let with_s = self.format == Some(ActFormat::Q8_1);
                for (b, qs) in row.qs.chunks_exact(QK).enumerate() {
                    out.extend(quant::f16_bytes(row.d[b]));
                    if with_s {
                        out.extend(quant::f16_bytes(row.s[b]));
                    }
                    out.extend(qs.iter().map(|&q| q as u8));
                }
            }
            ActFormat::Q8K => {
                for (b, qs) in row.qs.chunks_exact(QK_K).enumerate() {
                    out.extend(row.d[b].to_le_bytes());
                    out.extend(qs.iter().map(|&q| q as u8));
                    for s in &row.bsums[16 * b..16 * b + 16] {
                        out.extend(s.to_le_bytes());
                    }
                }
            }
            ActFormat::F16 => row.h.iter().for_each(|v| out.extend(v.to_le_bytes())),
            ActFormat::BF16 => row.bf.iter().for_each(|v| out.extend(v.to_le_bytes())),
            ActFormat::F32 => row.f.iter().for_each(|v| out.extend(v.to_le_bytes())),
        }
        Some(out)
    }

    /// Vector `i` for the kernels. Callers guarantee `i < n`.
    pub(crate) fn row(&self, i: usize) -> ActRow<'_> {
        let c = self.cols;
        let (nb, bsum_len) = match self.format {
            Some(ActFormat::Q8_0 | ActFormat::Q8_1) => (c / QK, 0),
            Some(ActFormat::Q8K) => (c / QK_K, c / 16),
            _ => (0, 0),
        };
        fn part<T>(v: &[T], i: usize, len: usize) -> &[T] {
            v.get(i * len..(i + 1) * len).unwrap_or(&[])
        }
        ActRow {
            qs: part(&self.qs, i, if nb > 0 { c } else { 0 }),
            d: part(&self.d, i, nb),
            s: part(&self.s, i, nb),
            bsums: part(&self.bsums, i, bsum_len),
            h: part(&self.h, i, c),
            bf: part(&self.bf, i, c),
            f: part(&self.f, i, c),
        }
    }
}

/// Write access to every buffer for the parallel quantization.
struct ActsMut<'a> {
    qs: SharedMut<'a, i8>,
    d: SharedMut<'a, f32>,
    s: SharedMut<'a, f32>,
    bsums: SharedMut<'a, i16>,
    h: SharedMut<'a, f16>,
    bf: SharedMut<'a, u16>,
}

impl ActsMut<'_> {
    /// Quantizes vector `v` in place.
    ///
    /// # Safety
    /// No other thread may be quantizing vector `v` at the same time.
    unsafe fn quantize_vector(
        &self,
        format: ActFormat,
        isa: Isa,
        x: &[f32],
        v: usize,
        cols: usize,
    ) {
        // SAFETY (all slices below): vector `v`'s ranges are exclusive to this call by contract.
        match format {
            ActFormat::Q8_0 | ActFormat::Q8_1 => {
                let nb = cols / QK;
                let qs = unsafe { self.qs.slice_mut(v * cols, cols) };
                let d = unsafe { self.d.slice_mut(v * nb, nb) };
                let s = if format == ActFormat::Q8_1 {
                    Some(unsafe { self.s.slice_mut(v * nb, nb) })
                } else {
                    None
                };
                quantize_q8(isa, x, qs, d, s);
            }
            ActFormat::Q8K => {
                let nb = cols / QK_K;
                let qs = unsafe { self.qs.slice_mut(v * cols, cols) };
                let d = unsafe { self.d.slice_mut(v * nb, nb) };
                let bsums = unsafe { self.bsums.slice_mut(v * cols / 16, cols / 16) };
                for (b, xb) in x.as_chunks::<QK_K>().0.iter().enumerate() {
                    let (db, q, sums) = kquants::quantize_q8_k_parts(xb);
                    d[b] = db;
                    qs[b * QK_K..(b + 1) * QK_K].copy_from_slice(&q);
                    bsums[b * 16..(b + 1) * 16].copy_from_slice(&sums);
                }
            }
            ActFormat::F16 => {
                crate::vec::f32_to_f16_with(isa, x, unsafe { self.h.slice_mut(v * cols, cols) })
            }
            ActFormat::BF16 => {
                let out = unsafe { self.bf.slice_mut(v * cols, cols) };
                for (o, &xv) in out.iter_mut().zip(x) {
                    *o = quant::f32_to_bf16_bits(xv);
                }
            }
            ActFormat::F32 => {}
        }
    }
}

/// Quantizes one vector to Q8_0 (or Q8_1 when `s` is given) into split fields.
pub(crate) fn quantize_q8(
    isa: Isa,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: Option<&mut [f32]>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2
        && let Some(t) = crate::avx2::Avx2::get()
    {
        crate::avx2::quantize_q8(t, x, qs, d, s);
        return;
    }
    let _ = isa;
    let mut s = s;
    for (b, (xb, qb)) in x
        .as_chunks::<QK>()
        .0
        .iter()
        .zip(qs.as_chunks_mut::<QK>().0)
        .enumerate()
    {
        let (db, q) = legacy::quantize_act_block(xb);
        *qb = q;
        d[b] = f16::from_f32(db).to_f32();
        if let Some(s) = s.as_deref_mut() {
            let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
            s[b] = f16::from_f32(db * sum as f32).to_f32();
        }
    }
}
