//! Attention of a group of query vectors against one head of an f16 KV cache: scores (each
//! query, rounded to f16, dotted with the keys it may see, times a scale), a softmax whose
//! weights are rounded to f16, and the weighted sum of the values. That is the precision the
//! reference implementation computes with.
//!
//! Each query's result depends only on that query and the keys and values it sees, never on
//! which other queries share the call: a token prefilled in a 128-row chunk and the same token
//! decoded alone get bit-identical outputs, which is what lets a generation resumed by
//! re-prefilling on another node continue exactly as it would have.

use half::f16;

use crate::{Isa, KernelError};

/// One head of a KV cache: position `p`'s key is `keys[p * stride..][..dim]` and its value
/// `values[p * stride..][..dim]` (a cache stores every head of a position together, so
/// `stride` is the width of all heads and the slices begin at this head's offset).
#[derive(Debug, Clone, Copy)]
pub struct KvHead<'a> {
    /// Keys, from this head's first element on.
    pub keys: &'a [f16],
    /// Values, laid out as the keys.
    pub values: &'a [f16],
    /// Elements from one position to the next.
    pub stride: usize,
    /// Elements of one head (the head dimension).
    pub dim: usize,
}

/// Buffers [`attend`] reuses from call to call.
#[derive(Debug, Default)]
pub struct AttnScratch {
    /// The queries rounded to f16 (as f32).
    pub(crate) queries: Vec<f32>,
    /// One row of scores, then weights, per query.
    pub(crate) scores: Vec<f32>,
    /// A block of keys or values widened to f32.
    pub(crate) block: Vec<f32>,
}

/// Attends each of the `lens.len()` queries (`queries`, `dim` elements each) to the first
/// `lens[i]` positions of `head` (a causal mask is a query's position + 1), writing the
/// results to `out` (as `queries`). A query that sees no position gets zeros.
pub fn attend(
    head: KvHead<'_>,
    queries: &[f32],
    lens: &[usize],
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) -> Result<(), KernelError> {
    attend_with(Isa::detected(), head, queries, lens, scale, out, scratch)
}

/// [`attend`] with a chosen implementation (they agree to rounding: the exponential differs).
pub fn attend_with(
    isa: Isa,
    head: KvHead<'_>,
    queries: &[f32],
    lens: &[usize],
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) -> Result<(), KernelError> {
    let dim = head.dim;
    let nq = lens.len();
    let want = nq.checked_mul(dim).ok_or(KernelError::Overflow {
        what: "attention queries",
    })?;
    for (what, actual) in [
        ("attention queries", queries.len()),
        ("attention output", out.len()),
    ] {
        if actual != want {
            return Err(KernelError::SizeMismatch {
                what,
                expected: want,
                actual,
            });
        }
    }
    let max_len = lens.iter().copied().max().unwrap_or(0);
    if max_len > 0 {
        let need = (max_len - 1)
            .checked_mul(head.stride)
            .and_then(|n| n.checked_add(dim))
            .ok_or(KernelError::Overflow {
                what: "attention cache",
            })?;
        for (what, actual) in [
            ("attention keys", head.keys.len()),
            ("attention values", head.values.len()),
        ] {
            if actual < need {
                return Err(KernelError::SizeMismatch {
                    what,
                    expected: need,
                    actual,
                });
            }
        }
        if head.stride < dim {
            return Err(KernelError::SizeMismatch {
                what: "attention cache stride",
                expected: dim,
                actual: head.stride,
            });
        }
    }
    // Queries at the precision of the keys they are dotted with.
    let q = &mut scratch.queries;
    q.clear();
    q.extend(queries.iter().map(|&x| f16::from_f32(x).to_f32()));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2
        && let Some(t) = crate::avx2::Avx2::get()
    {
        crate::avx2::attend(t, head, lens, scale, out, scratch);
        return Ok(());
    }
    let _ = isa;
    attend_scalar(head, lens, scale, out, scratch);
    Ok(())
}

/// The portable implementation: one query at a time.
fn attend_scalar(
    head: KvHead<'_>,
    lens: &[usize],
    scale: f32,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let dim = head.dim;
    for (i, (&len, o)) in lens.iter().zip(out.chunks_exact_mut(dim)).enumerate() {
        o.fill(0.0);
        if len == 0 {
            continue;
        }
        let q = &scratch.queries[i * dim..(i + 1) * dim];
        let scores = &mut scratch.scores;
        scores.clear();
        scores.extend((0..len).map(|p| {
            let key = &head.keys[p * head.stride..][..dim];
            q.iter().zip(key).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale
        }));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += f64::from(*s);
        }
        let inv = (1.0 / sum) as f32;
        for (p, &s) in scores.iter().enumerate() {
            let w = f16::from_f32(s * inv).to_f32();
            let value = &head.values[p * head.stride..][..dim];
            for (o, v) in o.iter_mut().zip(value) {
                *o += w * v.to_f32();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    struct Case {
        keys: Vec<f16>,
        values: Vec<f16>,
        queries: Vec<f32>,
        lens: Vec<usize>,
        stride: usize,
        dim: usize,
    }

    fn case(seed: u64, dim: usize, heads: usize, positions: usize, lens: Vec<usize>) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let stride = dim * heads;
        let mut half = |n: usize| -> Vec<f16> {
            (0..n)
                .map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0)))
                .collect()
        };
        let keys = half(stride * positions);
        let values = half(stride * positions);
        let queries = (0..lens.len() * dim)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        Case {
            keys,
            values,
            queries,
            lens,
            stride,
            dim,
        }
    }

    impl Case {
        fn head(&self, h: usize) -> KvHead<'_> {
            KvHead {
                keys: &self.keys[h * self.dim..],
                values: &self.values[h * self.dim..],
                stride: self.stride,
                dim: self.dim,
            }
        }

        fn run(&self, isa: Isa, h: usize) -> Vec<f32> {
            let mut out = vec![f32::NAN; self.queries.len()];
            let mut scratch = AttnScratch::default();
            let scale = 1.0 / (self.dim as f32).sqrt();
            attend_with(
                isa,
                self.head(h),
                &self.queries,
                &self.lens,
                scale,
                &mut out,
                &mut scratch,
            )
            .unwrap();
            out
        }

        /// In f64 with the same roundings to f16 (queries, weights).
        fn exact(&self, h: usize) -> Vec<f64> {
            let head = self.head(h);
            let scale = 1.0 / (self.dim as f64).sqrt();
            let mut out = Vec::new();
            for (i, &len) in self.lens.iter().enumerate() {
                let q: Vec<f64> = self.queries[i * self.dim..(i + 1) * self.dim]
                    .iter()
                    .map(|&x| f64::from(f16::from_f32(x).to_f32()))
                    .collect();
                let scores: Vec<f64> = (0..len)
                    .map(|p| {
                        let k = &head.keys[p * self.stride..][..self.dim];
                        q.iter().zip(k).map(|(a, b)| a * b.to_f64()).sum::<f64>() * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let mut o = vec![0.0; self.dim];
                for (p, s) in scores.iter().enumerate() {
                    let w = f16::from_f64((s - max).exp() / sum).to_f64();
                    let v = &head.values[p * self.stride..][..self.dim];
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += w * v.to_f64();
                    }
                }
                out.extend(o);
            }
            out
        }
    }

    #[test]
    fn every_implementation_matches_an_exact_computation() {
        // Head dims with and without a fast path, few queries (read in place) and many
        // (widened in blocks), contexts crossing block boundaries, and an empty one.
        for (dim, nq, positions) in [(64, 3, 40), (64, 24, 700), (128, 6, 300), (40, 9, 90)] {
            let lens: Vec<usize> = (0..nq).map(|i| positions - i * positions / nq).collect();
            let mut c = case(dim as u64 + nq as u64, dim, 3, positions, lens);
            c.lens[nq - 1] = 0;
            for isa in Isa::available() {
                for h in 0..3 {
                    let got = c.run(isa, h);
                    let want = c.exact(h);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        // A weight may round to the neighbouring f16 (2^-11 relative) when the
                        // exponential's last bit differs; values are below 2 in magnitude.
                        assert!(
                            (f64::from(*g) - w).abs() <= 2e-3,
                            "{isa:?} dim {dim} head {h} element {i}: {g} vs {w}"
                        );
                    }
                    let zeros = &got[(nq - 1) * dim..];
                    assert!(
                        zeros.iter().all(|&z| z == 0.0),
                        "{isa:?}: no position, no output"
                    );
                }
            }
        }
    }

    #[test]
    fn a_query_gets_the_same_bits_alone_or_among_others() {
        // Alone (in place) or beside 31 others (widened blocks): identical outputs.
        let c = case(7, 64, 3, 600, (0..32).map(|i| 600 - 17 * i).collect());
        for isa in Isa::available() {
            let all = c.run(isa, 1);
            for i in [0, 5, 31] {
                let one = Case {
                    queries: c.queries[i * 64..(i + 1) * 64].to_vec(),
                    lens: vec![c.lens[i]],
                    keys: c.keys.clone(),
                    values: c.values.clone(),
                    ..c
                };
                let alone = one.run(isa, 1);
                assert_eq!(
                    alone.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    all[i * 64..(i + 1) * 64]
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>(),
                    "{isa:?} query {i}"
                );
            }
        }
    }

    #[test]
    fn inconsistent_sizes_are_errors() {
        let c = case(1, 64, 1, 10, vec![10]);
        let mut out = vec![0.0; 64];
        let mut s = AttnScratch::default();
        let short = KvHead {
            keys: &c.keys[..9 * 64],
            ..c.head(0)
        };
        assert!(attend(short, &c.queries, &[10], 1.0, &mut out, &mut s).is_err());
        assert!(attend(c.head(0), &c.queries[..63], &[10], 1.0, &mut out, &mut s).is_err());
        assert!(attend(c.head(0), &c.queries, &[10, 1], 1.0, &mut out, &mut s).is_err());
        assert!(attend(c.head(0), &c.queries, &[10], 1.0, &mut out, &mut s).is_ok());
    }
}
