//! Which tensors a model has and how their values are drawn. Every row has its own random
//! stream derived from (seed, tensor name, row), so rows can be generated on any number of
//! threads in any order and the file is still identical byte for byte. The generator is a
//! hand-written SplitMix64 rather than a library RNG so that a dependency update can never
//! silently change the golden models.

use shoal_gguf::GgmlType;

use crate::{Arch, SynthSpec};

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform with this standard deviation, centred on zero.
    Uniform {
        /// Standard deviation.
        std: f32,
    },
    /// RMSNorm weights: uniform in `1 ± spread`.
    Norm {
        /// Half-width around 1.
        spread: f32,
    },
}

/// One tensor of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// GGUF tensor name.
    pub name: String,
    /// Element type in the file.
    pub dtype: GgmlType,
    /// Dimensions in GGUF order: row length (input width) first.
    pub dims: Vec<u64>,
    /// How values are drawn.
    pub init: Init,
}

impl TensorPlan {
    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.dims.first().map_or(0, |&d| d as usize)
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
}

/// Spread of norm weights around 1.
const NORM_SPREAD: f32 = 0.1;
/// Standard deviation of QKV biases.
const BIAS_STD: f32 = 0.02;
/// Logit scale: embeddings (and the output head) get std `LOGIT_STD / sqrt(hidden)`, so
/// logits of a normalised hidden state have a standard deviation near `LOGIT_STD` whatever the
/// width (a spread that keeps greedy choices away from near-ties).
const LOGIT_STD: f32 = 4.0;

/// The tensors of `spec`, in the order they are written (llama.cpp's own order).
pub fn tensor_plan(spec: &SynthSpec) -> Vec<TensorPlan> {
    let h = spec.hidden as u64;
    let q = (spec.n_heads * spec.head_dim()) as u64;
    let kv = (spec.n_kv_heads * spec.head_dim()) as u64;
    let ffn = spec.ffn as u64;
    let vocab = spec.vocab.size() as u64;
    let fan_in = |n: u64| Init::Uniform {
        std: 1.0 / (n as f32).sqrt(),
    };
    let norm = Init::Norm {
        spread: NORM_SPREAD,
    };
    let embed = Init::Uniform {
        std: LOGIT_STD / (h as f32).sqrt(),
    };
    let t = |name: String, dtype, dims: &[u64], init| TensorPlan {
        name,
        dtype,
        dims: dims.to_vec(),
        init,
    };

    let mut plan = vec![t(
        "token_embd.weight".into(),
        spec.embed_dtype,
        &[h, vocab],
        embed,
    )];
    let w = spec.weight_dtype;
    for i in 0..spec.n_layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        plan.push(t(n("attn_norm.weight"), GgmlType::F32, &[h], norm));
        plan.push(t(n("attn_q.weight"), w, &[h, q], fan_in(h)));
        plan.push(t(n("attn_k.weight"), w, &[h, kv], fan_in(h)));
        plan.push(t(n("attn_v.weight"), w, &[h, kv], fan_in(h)));
        if spec.arch == Arch::Qwen2 {
            let bias = Init::Uniform { std: BIAS_STD };
            plan.push(t(n("attn_q.bias"), GgmlType::F32, &[q], bias));
            plan.push(t(n("attn_k.bias"), GgmlType::F32, &[kv], bias));
            plan.push(t(n("attn_v.bias"), GgmlType::F32, &[kv], bias));
        }
        plan.push(t(n("attn_output.weight"), w, &[q, h], fan_in(q)));
        plan.push(t(n("ffn_norm.weight"), GgmlType::F32, &[h], norm));
        plan.push(t(n("ffn_gate.weight"), w, &[h, ffn], fan_in(h)));
        plan.push(t(n("ffn_up.weight"), w, &[h, ffn], fan_in(h)));
        plan.push(t(n("ffn_down.weight"), w, &[ffn, h], fan_in(ffn)));
    }
    plan.push(t("output_norm.weight".into(), GgmlType::F32, &[h], norm));
    if !spec.tied_output {
        plan.push(t(
            "output.weight".into(),
            spec.embed_dtype,
            &[h, vocab],
            embed,
        ));
    }
    plan
}

/// SplitMix64: one 64-bit state, a Weyl increment and a finaliser. Small, fast and fully
/// specified, so the values never change across versions or platforms.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream starting at `state`.
    pub fn new(state: u64) -> Self {
        Self(state)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }
}

/// SplitMix64's finaliser: a bijection that scatters nearby inputs.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name, so a tensor's values depend on its name, not its position.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The random stream of one row.
pub fn row_stream(seed: u64, name: &str, row: usize) -> SplitMix64 {
    SplitMix64::new(mix64(
        mix64(seed ^ name_hash(name)).wrapping_add(row as u64),
    ))
}

/// Fills `out` with the values of row `row` of `plan`.
pub fn fill_row(seed: u64, plan: &TensorPlan, row: usize, out: &mut [f32]) {
    let mut rng = row_stream(seed, &plan.name, row);
    // Two 24-bit uniforms in [-1, 1) per draw; a uniform on [-a, a] has std a / sqrt(3).
    let (centre, half_width) = match plan.init {
        Init::Uniform { std } => (0.0, std * 3f32.sqrt()),
        Init::Norm { spread } => (1.0, spread),
    };
    let unit = |bits: u64| (bits & 0xFF_FFFF) as f32 * (2.0 / 16_777_216.0) - 1.0;
    for pair in out.chunks_mut(2) {
        let bits = rng.next_u64();
        for (k, x) in pair.iter_mut().enumerate() {
            *x = centre + half_width * unit(bits >> (32 * k));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // First outputs of SplitMix64 seeded with 0, as published with the algorithm.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn rows_are_independent_of_order_and_scaled() {
        let plan = TensorPlan {
            name: "blk.0.attn_q.weight".into(),
            dtype: GgmlType::Q8_0,
            dims: vec![4096, 8],
            init: Init::Uniform { std: 0.5 },
        };
        let mut a = vec![0.0; 4096];
        let mut b = vec![0.0; 4096];
        fill_row(7, &plan, 3, &mut a);
        fill_row(7, &plan, 2, &mut b);
        fill_row(7, &plan, 3, &mut b);
        assert_eq!(a, b);
        fill_row(8, &plan, 3, &mut b);
        assert_ne!(a, b);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.03, "std {}", var.sqrt());
    }

    #[test]
    fn norms_stay_near_one() {
        let plan = TensorPlan {
            name: "output_norm.weight".into(),
            dtype: GgmlType::F32,
            dims: vec![64],
            init: Init::Norm { spread: 0.1 },
        };
        let mut v = vec![0.0; 64];
        fill_row(1, &plan, 0, &mut v);
        assert!(v.iter().all(|x| (0.9..=1.1).contains(x)));
        assert!(v.iter().any(|&x| x != v[0]));
    }

    #[test]
    fn plan_shapes_follow_gguf_order() {
        let spec = SynthSpec::tiny_qwen2();
        let plan = tensor_plan(&spec);
        let get = |n: &str| plan.iter().find(|t| t.name == n).unwrap();
        assert_eq!(get("token_embd.weight").dims, [64, 512]);
        assert_eq!(get("blk.0.attn_k.weight").dims, [64, 16]);
        assert_eq!(get("blk.2.attn_q.bias").dims, [64]);
        assert_eq!(get("blk.1.ffn_down.weight").dims, [192, 64]);
        assert_eq!(get("output.weight").dims, [64, 512]);
        assert_eq!(plan.len(), 1 + 3 * 12 + 2);
    }
}
