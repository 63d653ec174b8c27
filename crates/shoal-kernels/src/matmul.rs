//! `out = W · x` for a quantized weight matrix and `n` prepared activation vectors, with rows
//! spread over the pool.
//!
//! Work is split into contiguous row chunks (whole multiples of 16 rows, so two threads never
//! write the same 64-byte line of `out`) that threads claim from an atomic counter: contiguous
//! rows keep the hardware prefetchers streaming, and claiming at run time absorbs a thread
//! being slowed by something else on the machine. Within a chunk, the SIMD path computes tiles
//! of several rows × several activations so each weight block is loaded once per tile.
#![allow(unsafe_code)] // disjoint writes into `out` from pool threads (see `SharedMut`)

use std::array::from_fn;
use std::sync::atomic::{AtomicUsize, Ordering};

use shoal_gguf::GgmlType;

use crate::acts::{ActFormat, ActRow, QuantizedActs};
use crate::shared::SharedMut;
use crate::{Isa, KernelError, ThreadPool, quant, scalar};

/// A row-major weight matrix: `rows` rows of `cols` elements, each row stored as `dtype` blocks.
#[derive(Debug, Clone, Copy)]
pub struct WeightMatrix<'a> {
    /// Element type of the rows.
    pub dtype: GgmlType,
    /// Number of rows (outputs).
    pub rows: usize,
    /// Elements per row (inputs).
    pub cols: usize,
    /// `rows * row_bytes` bytes.
    pub data: &'a [u8],
}

impl<'a> WeightMatrix<'a> {
    /// Checks that `data` holds exactly `rows` rows of `cols` elements of `dtype`, and that
    /// `dtype` can be a weight type.
    pub fn new(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        ActFormat::for_weights(dtype)?;
        let row_bytes = quant::row_bytes(dtype, cols)?;
        let expected = row_bytes.checked_mul(rows).ok_or(KernelError::Overflow {
            what: "weight matrix bytes",
        })?;
        if data.len() != expected {
            return Err(KernelError::SizeMismatch {
                what: "weight matrix bytes",
                expected,
                actual: data.len(),
            });
        }
        Ok(WeightMatrix {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    /// The bytes of row `r` (empty if `r` is out of range).
    pub fn row_data(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        let start = r.saturating_mul(rb);
        self.data
            .get(start..start.saturating_add(rb))
            .unwrap_or(&[])
    }
}

/// Rows per chunk are a multiple of this (16 f32 outputs = one 64-byte cache line).
const ROW_ALIGN: usize = 16;
/// Chunks per thread: enough to rebalance when one thread is slowed down, few enough that the
/// shared counter is touched rarely.
const CHUNKS_PER_THREAD: usize = 4;
/// SIMD tile for one activation vector (decode): several rows give the FMA dependency chains
/// independent work and share each activation block load.
const DECODE_TILE_ROWS: usize = 4;
/// SIMD tiles for several activation vectors (rows × activations), by weight format. Wider
/// tiles share each unpacked weight block among more activations, until the accumulators no
/// longer fit in the 16 vector registers; measured on Zen 4.
const Q4_1_BATCH_TILE: (usize, usize) = (4, 4);
/// See [`Q4_1_BATCH_TILE`]; the 8-bit formats spill sooner.
const Q8_BATCH_TILE: (usize, usize) = (4, 2);

/// `out[i * w.rows + r] = dot(w row r, activation i)` for `i in 0..acts.n()`.
pub fn matmul(
    pool: &ThreadPool,
    w: &WeightMatrix<'_>,
    acts: &QuantizedActs,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_with(pool, w, acts, out, Isa::detected())
}

/// [`matmul`] with a chosen implementation (the scalar one if the CPU lacks the one asked for).
pub fn matmul_with(
    pool: &ThreadPool,
    w: &WeightMatrix<'_>,
    acts: &QuantizedActs,
    out: &mut [f32],
    isa: Isa,
) -> Result<(), KernelError> {
    // Re-validate: the fields are public and may have been changed after `new`.
    let w = WeightMatrix::new(w.dtype, w.rows, w.cols, w.data)?;
    let want = ActFormat::for_weights(w.dtype)?;
    if acts.format() != Some(want) {
        return Err(KernelError::ActsFormat {
            acts: acts.format(),
            weights: w.dtype,
        });
    }
    if acts.cols() != w.cols {
        return Err(KernelError::SizeMismatch {
            what: "activation length vs weight columns",
            expected: w.cols,
            actual: acts.cols(),
        });
    }
    let n = acts.n();
    let expected = n.checked_mul(w.rows).ok_or(KernelError::Overflow {
        what: "matmul output",
    })?;
    if out.len() != expected {
        return Err(KernelError::SizeMismatch {
            what: "matmul output (n * rows)",
            expected,
            actual: out.len(),
        });
    }
    if expected == 0 {
        return Ok(());
    }
    let isa = isa.or_supported();
    let rows = w.rows;
    let nt = pool.n_threads();
    let chunk = rows
        .div_ceil(nt * CHUNKS_PER_THREAD)
        .next_multiple_of(ROW_ALIGN);
    let n_chunks = rows.div_ceil(chunk);
    let out = SharedMut::new(out);
    let next = AtomicUsize::new(0);
    let job = |_: usize, _: usize| {
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= n_chunks {
                break;
            }
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            compute_rows(isa, &w, acts, r0, r1, &out);
        }
    };
    if n_chunks == 1 || nt == 1 {
        job(0, 1);
    } else {
        pool.run(job);
    }
    Ok(())
}

/// Computes rows `r0..r1` of every output vector. Row ranges handed to different threads are
/// disjoint, which is what makes the writes to `out` exclusive.
fn compute_rows(
    isa: Isa,
    w: &WeightMatrix<'_>,
    acts: &QuantizedActs,
    r0: usize,
    r1: usize,
    out: &SharedMut<'_, f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2
        && let Some(t) = crate::avx2::Avx2::get()
    {
        avx2_rows(t, w, acts, r0, r1, out);
        return;
    }
    let _ = isa;
    // Blocks of rows, all activations per block: the block's weights stay in cache while the
    // activations stream past them.
    let n = acts.n();
    let mut rb = r0;
    while rb < r1 {
        let re = (rb + ROW_ALIGN).min(r1);
        for i in 0..n {
            let y = acts.row(i);
            for r in rb..re {
                let v = scalar::dot(w.dtype, w.row_data(r), &y);
                // SAFETY: row r belongs to this thread's chunk, so index i*rows + r is ours.
                unsafe { out.write(i * w.rows + r, v) };
            }
        }
        rb = re;
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_rows(
    t: crate::avx2::Avx2,
    w: &WeightMatrix<'_>,
    acts: &QuantizedActs,
    r0: usize,
    r1: usize,
    out: &SharedMut<'_, f32>,
) {
    use crate::avx2;
    let n = acts.n();
    let nb = w.cols / w.dtype.block_size();
    match w.dtype {
        GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_0 if n == 1 => {
            tiled_rows::<DECODE_TILE_ROWS, 1>(t, w, acts, r0, r1, nb, out)
        }
        GgmlType::Q4_1 => {
            const T: (usize, usize) = Q4_1_BATCH_TILE;
            tiled_rows::<{ T.0 }, { T.1 }>(t, w, acts, r0, r1, nb, out)
        }
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            const T: (usize, usize) = Q8_BATCH_TILE;
            tiled_rows::<{ T.0 }, { T.1 }>(t, w, acts, r0, r1, nb, out)
        }
        _ => {
            let mut rb = r0;
            while rb < r1 {
                let re = (rb + ROW_ALIGN).min(r1);
                for i in 0..n {
                    let y = acts.row(i);
                    for r in rb..re {
                        let wr = w.row_data(r);
                        let v = match w.dtype {
                            GgmlType::Q4K => avx2::q4_k_dot(t, wr, &y, nb),
                            GgmlType::Q5K => avx2::q5_k_dot(t, wr, &y, nb),
                            GgmlType::Q6K => avx2::q6_k_dot(t, wr, &y, nb),
                            GgmlType::F16 => avx2::dot_f16_bytes(t, wr, y.h),
                            GgmlType::BF16 => avx2::dot_bf16_bytes(t, wr, y.bf),
                            GgmlType::F32 => avx2::dot_f32_bytes(t, wr, y.f),
                            _ => scalar::dot(w.dtype, wr, &y),
                        };
                        // SAFETY: row r belongs to this thread's chunk.
                        unsafe { out.write(i * w.rows + r, v) };
                    }
                }
                rb = re;
            }
        }
    }
}

/// Rows `r0..r1` against every activation in tiles of `R` rows × `C` activations.
#[cfg(target_arch = "x86_64")]
fn tiled_rows<const R: usize, const C: usize>(
    t: crate::avx2::Avx2,
    w: &WeightMatrix<'_>,
    acts: &QuantizedActs,
    r0: usize,
    r1: usize,
    nb: usize,
    out: &SharedMut<'_, f32>,
) {
    let mut r = r0;
    while r + R <= r1 {
        tile_rows::<R, C>(t, w, acts, r, nb, out);
        r += R;
    }
    while r < r1 {
        tile_rows::<1, C>(t, w, acts, r, nb, out);
        r += 1;
    }
}

/// Rows `r..r + R` against every activation, `C` activations at a time.
#[cfg(target_arch = "x86_64")]
fn tile_rows<const R: usize, const C: usize>(
    t: crate::avx2::Avx2,
    w: &WeightMatrix<'_>,
    acts: &QuantizedActs,
    r: usize,
    nb: usize,
    out: &SharedMut<'_, f32>,
) {
    let n = acts.n();
    let wr: [&[u8]; R] = from_fn(|k| w.row_data(r + k));
    let mut i = 0;
    while i + C <= n {
        let y: [ActRow<'_>; C] = from_fn(|c| acts.row(i + c));
        store(out, w.rows, r, i, tile::<R, C>(t, w.dtype, &wr, &y, nb));
        i += C;
    }
    while i < n {
        let y = [acts.row(i)];
        store(out, w.rows, r, i, tile::<R, 1>(t, w.dtype, &wr, &y, nb));
        i += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn tile<const R: usize, const C: usize>(
    t: crate::avx2::Avx2,
    dtype: GgmlType,
    w: &[&[u8]; R],
    y: &[ActRow<'_>; C],
    nb: usize,
) -> [[f32; C]; R] {
    use crate::avx2;
    match dtype {
        GgmlType::Q4_1 => avx2::q4_1_tile(t, w, y, nb),
        GgmlType::Q8_0 => avx2::q8_0_tile(t, w, y, nb),
        _ => avx2::q4_0_tile(t, w, y, nb),
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn store<const R: usize, const C: usize>(
    out: &SharedMut<'_, f32>,
    rows: usize,
    r: usize,
    i: usize,
    v: [[f32; C]; R],
) {
    for (k, vr) in v.iter().enumerate() {
        for (c, &x) in vr.iter().enumerate() {
            // SAFETY: rows r..r+R belong to this thread's chunk.
            unsafe { out.write((i + c) * rows + r + k, x) };
        }
    }
}
