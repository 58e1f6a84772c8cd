//! A histogram any thread can observe into without a lock: one relaxed
//! atomic counter per bucket (not cumulative; [`HistogramSnapshot`] adds
//! them up for the exposition) and the sum kept as `f64` bits.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket bounds for round trips and other network latencies, in seconds:
/// 0.25 ms (a veth pair) up to 2.5 s (a path across the world, a relay
/// under load).
pub const LATENCY_SECONDS: &[f64] = &[
    0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Bucket bounds for disk work, in seconds: 50 µs (a read from the page
/// cache) up to 1 s (a stalled fsync).
pub const STORAGE_SECONDS: &[f64] = &[
    0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Counts of observations per bucket, and their sum.
pub struct Histogram {
    bounds: Box<[f64]>,
    /// `counts[i]`: observations in `(bounds[i-1], bounds[i]]`; the last
    /// one is above every bound.
    counts: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("Histogram")
            .field("count", &s.count())
            .field("sum", &s.sum)
            .finish()
    }
}

impl Histogram {
    /// A histogram with these upper bounds (ascending; `+Inf` is implied).
    pub fn new(bounds: &[f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Histogram {
            bounds: bounds.into(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation (NaN is ignored).
    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.sum_bits.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Records a duration, in seconds.
    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }

    /// The counts now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// The upper bounds.
    pub bounds: Vec<f64>,
    /// Observations per bucket (one more than bounds: the last is `+Inf`).
    pub counts: Vec<u64>,
    /// The sum of the observations.
    pub sum: f64,
}

impl HistogramSnapshot {
    /// Each bound with the observations at or below it.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds
            .iter()
            .zip(self.counts.iter().scan(0u64, |acc, c| {
                *acc += c;
                Some(*acc)
            }))
            .map(|(b, c)| (*b, c))
    }

    /// All observations (the `+Inf` bucket; computed from the buckets, so
    /// it always agrees with them even while other threads observe).
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 2.0, 3.0, f64::NAN] {
            h.observe(v);
        }
        let s = h.snapshot();
        // Bounds are inclusive (`le`): 1.0 counts in the first bucket.
        assert_eq!(s.counts, vec![2, 2, 1]);
        assert_eq!(s.count(), 5, "NaN is not counted");
        assert_eq!(s.sum, 8.0);
        assert_eq!(s.cumulative().collect::<Vec<_>>(), vec![(1.0, 2), (2.0, 4)]);
    }

    #[test]
    fn threads_observe_without_losing_counts() {
        let h = std::sync::Arc::new(Histogram::new(LATENCY_SECONDS));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        h.observe(0.001);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 4000);
        assert!((s.sum - 4.0).abs() < 1e-9, "sum {}", s.sum);
    }
}
