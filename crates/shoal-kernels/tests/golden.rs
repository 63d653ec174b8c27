//! Agreement with llama.cpp's ggml on vectors it produced (see `tests/golden/gen.py`):
//! the byte layouts (decoded by the independent `gguf` Python package), the legacy weight
//! quantizers and activation quantizers bit for bit, and the dot products.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use shoal_kernels::quant::{QK, QK_K, kquants, legacy};
use shoal_kernels::{GgmlType, dequantize_row, quantize_row};

/// One golden file, parsed.
struct Golden {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    src: Vec<f32>,
    wq: Vec<u8>,
    deq: Vec<f32>,
    n_acts: usize,
    x: Vec<f32>,
    xq: Vec<u8>,
    dots: Vec<f32>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn u32(&mut self) -> usize {
        u32::from_le_bytes(self.bytes(4).try_into().unwrap()) as usize
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.bytes(4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn act_bytes(dtype: GgmlType, cols: usize) -> usize {
    match dtype {
        GgmlType::Q8_0 | GgmlType::Q4_0 => cols / 32 * 34,
        GgmlType::Q4_1 => cols / 32 * 36,
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => cols / 256 * 292,
        _ => cols * 2,
    }
}

fn load(dtype: GgmlType) -> Golden {
    let path = format!(
        "{}/tests/golden/{}.bin",
        env!("CARGO_MANIFEST_DIR"),
        dtype.name()
    );
    let data = std::fs::read(&path).unwrap();
    let mut r = Reader(&data);
    let rows = r.u32();
    let cols = r.u32();
    let src = r.f32s(rows * cols);
    let wq = r.bytes(rows * dtype.row_bytes(cols).unwrap());
    let deq = r.f32s(rows * cols);
    let n_acts = r.u32();
    let x = r.f32s(n_acts * cols);
    let xq = r.bytes(n_acts * act_bytes(dtype, cols));
    let dots = r.f32s(n_acts * rows);
    assert!(r.0.is_empty(), "{path}: trailing bytes");
    Golden {
        dtype,
        rows,
        cols,
        src,
        wq,
        deq,
        n_acts,
        x,
        xq,
        dots,
    }
}

const TYPES: [GgmlType; 8] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::F16,
    GgmlType::BF16,
];

#[test]
fn dequantization_matches_the_gguf_package() {
    for dtype in TYPES {
        let g = load(dtype);
        let mut out = vec![0.0; g.rows * g.cols];
        let rb = dtype.row_bytes(g.cols).unwrap();
        for r in 0..g.rows {
            dequantize_row(
                dtype,
                &g.wq[r * rb..(r + 1) * rb],
                &mut out[r * g.cols..(r + 1) * g.cols],
            )
            .unwrap();
        }
        for (i, (a, b)) in out.iter().zip(&g.deq).enumerate() {
            // The Python decoder may multiply in another order; allow one rounding.
            assert!(
                (a - b).abs() <= b.abs() * 1e-6 + 1e-9,
                "{dtype} element {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn legacy_and_float_quantizers_match_ggml_bit_for_bit() {
    for dtype in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::F16,
        GgmlType::BF16,
    ] {
        let g = load(dtype);
        let mut bytes = Vec::new();
        for r in 0..g.rows {
            quantize_row(dtype, &g.src[r * g.cols..(r + 1) * g.cols], &mut bytes).unwrap();
        }
        assert!(bytes == g.wq, "{dtype}: quantized bytes differ from ggml's");
    }
}

#[test]
fn activation_quantizers_match_ggml_bit_for_bit() {
    for dtype in TYPES {
        let g = load(dtype);
        let mut bytes = Vec::new();
        for x in g.x.chunks_exact(g.cols) {
            match dtype {
                GgmlType::Q8_0 | GgmlType::Q4_0 => {
                    for b in x.as_chunks::<QK>().0 {
                        bytes.extend(legacy::quantize_q8_0_act(b));
                    }
                }
                GgmlType::Q4_1 => {
                    for b in x.as_chunks::<QK>().0 {
                        bytes.extend(legacy::quantize_q8_1(b));
                    }
                }
                GgmlType::F16 | GgmlType::BF16 => quantize_row(dtype, x, &mut bytes).unwrap(),
                _ => {
                    for b in x.as_chunks::<QK_K>().0 {
                        bytes.extend(kquants::quantize_q8_k(b));
                    }
                }
            }
        }
        assert_eq!(bytes.len(), g.xq.len());
        let first_diff = bytes.iter().zip(&g.xq).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "{dtype}: activation bytes differ");
        assert_eq!((g.dtype, g.dots.len()), (dtype, g.n_acts * g.rows));
    }
}

/// ggml's dot products on ggml's quantized weights. The AVX2 kernels of every quantized format
/// must agree bit for bit (that is what greedy agreement with llama.cpp rests on); the float
/// formats (whose ggml build here sums in another order) and the scalar fallback within float
/// reordering error.
#[test]
fn dot_products_match_ggml() {
    use shoal_kernels::{Isa, QuantizedActs, ThreadPool, WeightMatrix, matmul_with};
    let pool = ThreadPool::new(2).unwrap();
    for dtype in TYPES {
        let g = load(dtype);
        let w = WeightMatrix::new(dtype, g.rows, g.cols, &g.wq).unwrap();
        let mut acts = QuantizedActs::new();
        acts.quantize(&pool, dtype, &g.x, g.n_acts, g.cols).unwrap();
        for isa in Isa::available() {
            let mut out = vec![0.0; g.n_acts * g.rows];
            matmul_with(&pool, &w, &acts, &mut out, isa).unwrap();
            let bitwise = out
                .iter()
                .zip(&g.dots)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            for (k, (a, b)) in out.iter().zip(&g.dots).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{dtype} {isa:?} #{k}: {a} vs {b}"
                );
            }
            if isa == Isa::Avx2 && dtype.is_quantized() {
                assert!(bitwise, "{dtype}: {out:?} vs {:?}", g.dots);
            }
        }
    }
}
