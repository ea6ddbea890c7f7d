//! Pure numbers: latency histograms and their percentiles, and the median / min–max / ratio
//! figures a comparison reports over several rounds.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Highest latency a histogram records exactly; longer ones are clamped to it (and counted).
const MAX_TRACKABLE_NS: u64 = 120_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits, 1 ns to 120 s.
#[derive(Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
    /// Samples above the trackable range, recorded as the maximum.
    clamped: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, 3)
                .expect("valid histogram bounds"),
            clamped: 0,
        }
    }

    pub fn record(&mut self, latency: Duration) {
        self.record_ns(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn record_ns(&mut self, ns: u64) {
        let ns = if ns > MAX_TRACKABLE_NS {
            self.clamped += 1;
            MAX_TRACKABLE_NS
        } else {
            ns.max(1)
        };
        self.histogram.record(ns).expect("value within bounds");
    }

    pub fn merge(&mut self, other: &Latency) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms of the same bounds");
        self.clamped += other.clamped;
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The percentiles in microseconds, or `None` without samples.
    pub fn summary(&self) -> Option<Percentiles> {
        if self.histogram.is_empty() {
            return None;
        }
        let us = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1000.0;
        Some(Percentiles {
            samples: self.histogram.len(),
            mean: self.histogram.mean() / 1000.0,
            p50: us(0.50),
            p90: us(0.90),
            p99: us(0.99),
            p999: us(0.999),
            max: self.histogram.max() as f64 / 1000.0,
            clamped: self.clamped,
        })
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// Samples above 120 s, counted as 120 s.
    #[serde(default)]
    pub clamped: u64,
}

/// Median, minimum and maximum of a set of values (one per round).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` for an empty set. NaNs are ignored.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        })
    }
}

/// Ratios `a[i] / b[i]` of values paired by round; rounds missing on either side, or with a
/// zero denominator, are skipped.
pub fn paired_ratios(a: &[(u32, f64)], b: &[(u32, f64)]) -> Vec<f64> {
    a.iter()
        .filter_map(|(round, x)| {
            let (_, y) = b.iter().find(|(r, _)| r == round)?;
            (*y != 0.0).then(|| x / y)
        })
        .collect()
}

/// A rate over an interval, 0 for an empty interval.
pub fn per_second(count: u64, interval: Duration) -> f64 {
    let secs = interval.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// `1234567.0` → `"1.23M"`, for progress lines and tables.
pub fn human(value: f64) -> String {
    let abs = value.abs();
    if abs >= 1e9 {
        format!("{:.2}G", value / 1e9)
    } else if abs >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if abs >= 1e4 {
        format!("{:.1}k", value / 1e3)
    } else if abs >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// Bytes as KiB/MiB/GiB with two decimals.
pub fn human_bytes(bytes: f64) -> String {
    let abs = bytes.abs();
    if abs >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
    } else if abs >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", bytes / (1u64 << 20) as f64)
    } else if abs >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut latency = Latency::new();
        for us in 1..=1000u64 {
            latency.record(Duration::from_micros(us));
        }
        let p = latency.summary().unwrap();
        assert_eq!(p.samples, 1000);
        // 3 significant digits: within 0.1 % of the exact order statistic.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(p.p50, 500.0), "{p:?}");
        assert!(close(p.p90, 900.0), "{p:?}");
        assert!(close(p.p99, 990.0), "{p:?}");
        assert!(close(p.p999, 999.0), "{p:?}");
        assert!(close(p.max, 1000.0), "{p:?}");
        assert!(close(p.mean, 500.5), "{p:?}");
        assert!(Latency::new().summary().is_none());
    }

    #[test]
    fn merged_histograms_count_everything_and_clamp_outliers() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        a.record(Duration::from_micros(10));
        b.record(Duration::from_secs(500));
        b.record_ns(0);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        let p = a.summary().unwrap();
        assert_eq!(p.clamped, 1);
        assert!(p.max >= 119_000_000.0, "{p:?}");
    }

    #[test]
    fn spread_median_min_max() {
        assert_eq!(Spread::of(&[]), None);
        let odd = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max, odd.n), (2.0, 1.0, 3.0, 3));
        let even = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
        let with_nan = Spread::of(&[f64::NAN, 5.0]).unwrap();
        assert_eq!((with_nan.median, with_nan.n), (5.0, 1));
    }

    #[test]
    fn ratios_pair_rounds_and_skip_gaps() {
        let relay = [(1, 100.0), (2, 120.0), (3, 90.0)];
        let nats = [(1, 50.0), (3, 0.0), (4, 10.0)];
        assert_eq!(paired_ratios(&relay, &nats), vec![2.0]);
        let js = [(3, 45.0), (2, 60.0), (1, 200.0)];
        assert_eq!(paired_ratios(&relay, &js), vec![0.5, 2.0, 2.0]);
    }

    #[test]
    fn rates_and_human_numbers() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(human(1_234_567.0), "1.23M");
        assert_eq!(human(45_600.0), "45.6k");
        assert_eq!(human(999.0), "999");
        assert_eq!(human(1.5), "1.50");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0), "3.00 MiB");
        assert_eq!(human_bytes(512.0), "512 B");
    }
}
