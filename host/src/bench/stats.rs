//! Reducing timing samples to the numbers the benchmark reports.

use std::time::Duration;

/// Nearest-rank percentile of an ascending slice; `p` is in percent.
///
/// Nearest rank (rather than interpolation) always reports a latency that was actually
/// observed, which keeps p99 honest for small sample counts.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Sorts in place so several percentiles can be read off one sort.
pub fn sort_samples(samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
}

/// Decimal gigabytes per second, the unit disk and network figures are quoted in.
pub fn gbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

/// Three decimals are far below run-to-run noise; more only clutters the JSON.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// How many unmeasured iterations to run first, so connection setup, page faults and
/// cold caches stay out of the samples without doubling the run time.
pub fn warmup(iters: usize) -> usize {
    (iters / 10).clamp(1, 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 0.5), Some(1.0));
        assert_eq!(percentile(&v, 99.1), Some(100.0));
    }

    #[test]
    fn small_and_degenerate_inputs() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0], 51.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 99.0), Some(5.0));
        assert_eq!(percentile(&[1.0], 101.0), None);
        assert_eq!(percentile(&[1.0], f64::NAN), None);
    }

    #[test]
    fn sorting_and_units() {
        let mut v = vec![3.0, 1.0, 2.0];
        sort_samples(&mut v);
        assert_eq!(v, [1.0, 2.0, 3.0]);
        assert_eq!(gbps(2_000_000_000, Duration::from_secs(2)), 1.0);
        assert_eq!(round3(1.23456), 1.235);
        assert_eq!(warmup(5), 1);
        assert_eq!(warmup(20_000), 1000);
    }
}
