//! Latency summaries shared by the benchmarks (included with `#[path]`).

use std::time::Duration;

use serde_json::{json, Value};

/// Latency summary of one series, in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// Samples.
    pub n: usize,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Stats {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Stats> {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.total_cmp(b));
        let n = us.len();
        // Nearest rank.
        let rank = |p: f64| us[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        (n > 0).then(|| Stats {
            n,
            p50: rank(0.50),
            p99: rank(0.99),
            max: us[n - 1],
            mean: us.iter().sum::<f64>() / n as f64,
        })
    }

    /// The summary as JSON (µs, one decimal).
    pub fn json(&self) -> Value {
        json!({"n": self.n, "p50_us": round(self.p50), "p99_us": round(self.p99),
               "max_us": round(self.max), "mean_us": round(self.mean)})
    }
}

/// `x` to one decimal.
pub fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = Stats::of(&d).unwrap();
        assert_eq!((s.n, s.p50, s.p99, s.max), (100, 50.0, 99.0, 100.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
        let one = Stats::of(&[Duration::from_micros(7)]).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert!(Stats::of(&[]).is_none());
    }
}
