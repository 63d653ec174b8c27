//! Token sampling: penalties, temperature, top-k, top-p, min-p and a seeded draw.
//!
//! The random draw for step `i` of a generation comes from a generator seeded with the request's
//! seed on stream `i`, so the sampler has no hidden state: a generation resumed elsewhere from its
//! journal (tokens so far + seed) draws exactly what the original would have.

use crate::ModelError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick the next token. The defaults sample nothing away: greedy needs `temperature: 0`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens; 1 is off.
    pub repetition_penalty: f32,
    /// Subtract `count * frequency_penalty` from a seen token's logit (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` from the logit of any seen token (OpenAI semantics).
    pub presence_penalty: f32,
    /// How many of the last tokens the penalties look at.
    pub penalty_last_n: u32,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every parameter, reporting all problems together.
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut problems = Vec::new();
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            problems.push(format!(
                "temperature must be a number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            problems.push(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            problems.push(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            problems.push(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                problems.push(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::InvalidRequest(problems.join("; ")))
        }
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// Picks tokens from logits. Holds only reusable buffers, no state that matters between steps.
#[derive(Debug, Default)]
pub struct Sampler {
    params: SamplingParams,
    candidates: Vec<(u32, f32)>,
    counts: Vec<(u32, u32)>,
}

/// Index of the largest logit; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler for validated parameters.
    pub fn new(params: SamplingParams) -> Result<Self, ModelError> {
        params.validate()?;
        Ok(Self {
            params,
            candidates: Vec::new(),
            counts: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the token for generation step `step`, given every token so far in `history`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], step: u64) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 && !p.has_penalties() {
            return argmax(logits);
        }
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if p.has_penalties() {
            self.apply_penalties(history);
        }
        let p = &self.params;
        if p.temperature == 0.0 {
            let best = self.candidates.iter().enumerate().fold(0, |b, (i, c)| {
                if c.1 > self.candidates[b].1 { i } else { b }
            });
            return self.candidates[best].0;
        }
        let inv_t = 1.0 / p.temperature;
        for c in &mut self.candidates {
            c.1 *= inv_t;
        }
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && (p.top_k as usize) < self.candidates.len() {
            let k = p.top_k as usize;
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
        // Softmax in place (candidates now hold probabilities).
        let max = self.candidates[0].1;
        let mut sum = 0.0f64;
        for c in &mut self.candidates {
            c.1 = (c.1 - max).exp();
            sum += f64::from(c.1);
        }
        for c in &mut self.candidates {
            c.1 = (f64::from(c.1) / sum) as f32;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0f32;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                acc += c.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = self.candidates[0].1 * p.min_p;
            let keep = self
                .candidates
                .iter()
                .take_while(|c| c.1 >= floor)
                .count()
                .max(1);
            self.candidates.truncate(keep);
        }
        let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        rng.set_stream(step);
        let mut u = rng.random::<f64>() * total;
        for c in &self.candidates {
            u -= f64::from(c.1);
            if u < 0.0 {
                return c.0;
            }
        }
        self.candidates.last().map_or(0, |c| c.0)
    }

    fn apply_penalties(&mut self, history: &[u32]) {
        let p = &self.params;
        let window = &history[history.len().saturating_sub(p.penalty_last_n as usize)..];
        self.counts.clear();
        for &t in window {
            match self.counts.iter_mut().find(|c| c.0 == t) {
                Some(c) => c.1 += 1,
                None => self.counts.push((t, 1)),
            }
        }
        for &(t, count) in &self.counts {
            let Some(c) = self.candidates.get_mut(t as usize) else {
                continue;
            };
            if c.1 > 0.0 {
                c.1 /= p.repetition_penalty;
            } else {
                c.1 *= p.repetition_penalty;
            }
            c.1 -= count as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_the_maximum_and_the_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy()).expect("valid");
        assert_eq!(s.sample(&logits(), &[], 0), 1);
        assert_eq!(argmax(&[2.0, 5.0, 5.0]), 1);
    }

    #[test]
    fn same_seed_and_step_give_the_same_token() {
        let params = SamplingParams {
            temperature: 1.5,
            seed: 42,
            ..SamplingParams::default()
        };
        let mut a = Sampler::new(params.clone()).expect("valid");
        let mut b = Sampler::new(params).expect("valid");
        let l: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let ta: Vec<u32> = (0..50).map(|step| a.sample(&l, &[], step)).collect();
        let tb: Vec<u32> = (0..50).map(|step| b.sample(&l, &[], step)).collect();
        assert_eq!(ta, tb);
        // Different steps draw differently, so the sequence is not constant.
        assert!(ta.iter().any(|&t| t != ta[0]));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            seed: 7,
            ..SamplingParams::default()
        })
        .expect("valid");
        for step in 0..20 {
            assert_eq!(s.sample(&logits(), &[], step), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let l = vec![10.0, 9.9, 0.0, -5.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.9,
            seed: 1,
            ..SamplingParams::default()
        })
        .expect("valid");
        let mut m = Sampler::new(SamplingParams {
            min_p: 0.5,
            seed: 1,
            ..SamplingParams::default()
        })
        .expect("valid");
        for step in 0..200 {
            assert!(s.sample(&l, &[], step) < 2);
            assert!(m.sample(&l, &[], step) < 2);
        }
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_seen_token() {
        let params = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params).expect("valid");
        assert_eq!(s.sample(&logits(), &[1], 0), 4);
    }

    #[test]
    fn invalid_parameters_are_all_reported() {
        let bad = SamplingParams {
            temperature: -1.0,
            top_p: 0.0,
            min_p: 2.0,
            ..SamplingParams::default()
        };
        let err = bad.validate().expect_err("invalid").to_string();
        assert!(
            err.contains("temperature") && err.contains("top_p") && err.contains("min_p"),
            "{err}"
        );
        assert!(
            SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::default()
            }
            .validate()
            .is_err()
        );
    }
}
