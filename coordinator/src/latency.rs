//! A fixed-size latency histogram (log buckets, 1/32 octave: about 2% resolution), so a
//! long-running coordinator can report percentiles without keeping every sample.

use std::time::Duration;

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (64 * SUB) as usize;

#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    max_ns: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.total)
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            max_ns: 0,
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let octave = 63 - u64::from(ns.leading_zeros());
    let sub = (ns >> (octave - u64::from(SUB_BITS))) & (SUB - 1);
    ((octave - u64::from(SUB_BITS) + 1) * SUB + sub) as usize
}

/// The smallest value of a bucket: reported percentiles round down by at most 1/32.
fn lower_bound(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let octave = index / SUB + u64::from(SUB_BITS) - 1;
    let sub = index % SUB;
    (1 << octave) | (sub << (octave - u64::from(SUB_BITS)))
}

impl Histogram {
    pub fn record(&mut self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The value below which a fraction `q` of the samples lie; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos(lower_bound(index));
            }
        }
        self.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_the_bucket_resolution() {
        let mut histogram = Histogram::default();
        for us in 1..=10_000u64 {
            histogram.record(Duration::from_micros(us));
        }
        let p50 = histogram.quantile(0.5).as_secs_f64() * 1e6;
        let p99 = histogram.quantile(0.99).as_secs_f64() * 1e6;
        assert!((p50 - 5_000.0).abs() / 5_000.0 < 0.04, "{p50}");
        assert!((p99 - 9_900.0).abs() / 9_900.0 < 0.04, "{p99}");
        assert_eq!(histogram.count(), 10_000);
        assert_eq!(histogram.max(), Duration::from_micros(10_000));
    }

    #[test]
    fn bucket_bounds_are_monotonic_and_contain_their_values() {
        for ns in [
            0u64,
            1,
            31,
            32,
            33,
            63,
            64,
            1_000,
            123_456_789,
            u64::MAX / 3,
        ] {
            let index = bucket(ns);
            assert!(lower_bound(index) <= ns, "{ns}");
            assert!(index + 1 == BUCKETS || lower_bound(index + 1) > ns, "{ns}");
        }
        assert!(Histogram::default().quantile(0.5).is_zero());
    }
}
