//! Percentiles and latency summaries.
//!
//! Percentiles use the nearest-rank method: the `p`-th percentile of `n` sorted samples is the
//! sample at 1-based rank `ceil(p * n / 100)` (at least 1). It is always one of the samples,
//! never an interpolation, and it is monotone in `p`, so `p50 <= p95 <= p99 <= max`.

use std::time::Duration;

use serde::Serialize;

/// The nearest-rank `pct`-th percentile of `sorted` (ascending); `None` when it is empty.
/// `pct` is clamped to `1..=100` (the 0th percentile is taken as the minimum).
pub fn nearest_rank<T: Copy>(sorted: &[T], pct: u8) -> Option<T> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let pct = usize::from(pct.clamp(1, 100));
    // Integer arithmetic: ceil(pct * n / 100) without float rounding at exact ranks.
    let rank = (pct * n).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Nearest-rank median.
    pub p50: f64,
    /// Nearest-rank 95th percentile.
    pub p95: f64,
    /// Nearest-rank 99th percentile.
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl LatencySummary {
    /// Summarises `samples` (sorted in place); `None` when there are none.
    pub fn from_durations(samples: &mut [Duration]) -> Option<Self> {
        samples.sort_unstable();
        let count = samples.len();
        let (&min, &max) = (samples.first()?, samples.last()?);
        let total: u128 = samples.iter().map(Duration::as_nanos).sum();
        let mean_ns = total / count as u128;
        Some(Self {
            count,
            mean: mean_ns as f64 / 1e6,
            p50: ms(nearest_rank(samples, 50)?),
            p95: ms(nearest_rank(samples, 95)?),
            p99: ms(nearest_rank(samples, 99)?),
            min: ms(min),
            max: ms(max),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 50), Some(50));
        assert_eq!(nearest_rank(&v, 95), Some(95));
        assert_eq!(nearest_rank(&v, 99), Some(99));
        assert_eq!(nearest_rank(&v, 100), Some(100));
        assert_eq!(nearest_rank(&v, 0), Some(1));
        // 20 samples: 95% of 20 is exactly 19, which float arithmetic can push to 20.
        let v: Vec<u32> = (1..=20).collect();
        assert_eq!(nearest_rank(&v, 95), Some(19));
        assert_eq!(nearest_rank(&[7], 1), Some(7));
        assert_eq!(nearest_rank::<u32>(&[], 50), None);
        // Classic textbook example: 15, 20, 35, 40, 50.
        let v = [15, 20, 35, 40, 50];
        assert_eq!(nearest_rank(&v, 30), Some(20));
        assert_eq!(nearest_rank(&v, 40), Some(20));
        assert_eq!(nearest_rank(&v, 50), Some(35));
        assert_eq!(nearest_rank(&v, 100), Some(50));
    }

    #[test]
    fn summary_of_durations() {
        let mut d: Vec<Duration> = [30, 10, 20, 40].map(Duration::from_millis).to_vec();
        let s = LatencySummary::from_durations(&mut d).unwrap();
        assert_eq!(s.count, 4);
        assert!((s.mean - 25.0).abs() < 1e-9);
        assert!((s.p50 - 20.0).abs() < 1e-9);
        assert!((s.p95 - 40.0).abs() < 1e-9);
        assert!((s.min - 10.0).abs() < 1e-9 && (s.max - 40.0).abs() < 1e-9);
        assert_eq!(LatencySummary::from_durations(&mut []), None);
    }

    proptest! {
        #[test]
        fn nearest_rank_is_the_smallest_sample_covering_pct(
            mut v in proptest::collection::vec(0u32..1000, 1..200),
            pct in 1u8..=100,
        ) {
            v.sort_unstable();
            let n = v.len();
            let got = nearest_rank(&v, pct).unwrap();
            prop_assert!(v.contains(&got));
            // At least pct% of the samples are <= it...
            let at_or_below = v.iter().filter(|&&x| x <= got).count();
            prop_assert!(at_or_below * 100 >= usize::from(pct) * n);
            // ...and fewer than pct% are strictly below it (so no smaller sample qualifies).
            let below = v.iter().filter(|&&x| x < got).count();
            prop_assert!(below * 100 < usize::from(pct) * n);
        }

        #[test]
        fn nearest_rank_is_monotone_and_bounded(
            mut v in proptest::collection::vec(any::<i64>(), 1..100),
            a in 0u8..=120,
            b in 0u8..=120,
        ) {
            v.sort_unstable();
            let (lo, hi) = (a.min(b), a.max(b));
            let (x, y) = (nearest_rank(&v, lo).unwrap(), nearest_rank(&v, hi).unwrap());
            prop_assert!(x <= y);
            prop_assert!(v[0] <= x && y <= v[v.len() - 1]);
            prop_assert_eq!(nearest_rank(&v, 100).unwrap(), v[v.len() - 1]);
        }

        #[test]
        fn summary_is_ordered(ns in proptest::collection::vec(0u64..10_000_000_000, 1..100)) {
            let mut d: Vec<Duration> = ns.iter().map(|&n| Duration::from_nanos(n)).collect();
            let s = LatencySummary::from_durations(&mut d).unwrap();
            prop_assert!(s.min <= s.p50 && s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.max);
            prop_assert!(s.min <= s.mean + 1e-6 && s.mean <= s.max + 1e-6);
        }
    }
}
