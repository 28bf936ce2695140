//! A mergeable quantile sketch with a relative-error guarantee (DDSketch, Masson et al.,
//! VLDB 2019), for latency, wait-time and run-time percentiles.
//!
//! Why this one: windows are aggregated on many workers and processes, and partial aggregates
//! must merge exactly. DDSketch buckets values on a logarithmic grid; merging two sketches adds
//! their bucket counts, so the merge of partial sketches *is* the sketch of all values, whatever
//! the split. Any quantile it returns lies within a relative error of [`RELATIVE_ERROR`] (0.5%,
//! half the 1% the dashboards may tolerate) of the exact value at the same rank.
//!
//! Rank convention: the q-quantile of `n` values is the value of rank `floor(q * (n - 1))`
//! (0-based) in sorted order, the "lower" quantile. Tests compare against that exact value.
//!
//! Values are non-negative durations or sizes. Values below [`MIN_INDEXABLE`] (including 0 and
//! negatives, which a caller should never send but a skewed clock can) count in a zero bucket and
//! are reported as 0. Memory: one `u64` per occupied bucket; with 0.5% error, values from 1 ms to
//! one day occupy at most ~1,900 buckets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The guaranteed relative error of every quantile: `|estimate - exact| <= 0.005 * exact`.
pub const RELATIVE_ERROR: f64 = 0.005;

/// Smallest value given its own bucket; smaller ones count as zero.
pub const MIN_INDEXABLE: f64 = 1e-9;

/// `gamma = (1 + a) / (1 - a)` for `a = RELATIVE_ERROR`.
fn gamma() -> f64 {
    (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR)
}

/// A mergeable quantile sketch (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantileSketch {
    /// Bucket index -> count; bucket `i` holds values in `(gamma^(i-1), gamma^i]`.
    buckets: BTreeMap<i32, u64>,
    /// Values below [`MIN_INDEXABLE`].
    zeros: u64,
    /// Number of values.
    count: u64,
    /// Exact minimum and maximum (clamped at 0), so p0 and p100 are exact.
    min: f64,
    max: f64,
}

impl QuantileSketch {
    /// An empty sketch.
    pub fn new() -> Self {
        Self::default()
    }

    fn index(value: f64) -> i32 {
        // ceil(log_gamma(value)); the cast saturates, and values are bounded far inside i32.
        (value.ln() / gamma().ln()).ceil() as i32
    }

    /// The representative value of bucket `i`: the point whose relative distance to both bucket
    /// bounds is the same, `2 gamma^i / (gamma + 1)`.
    fn value_of(i: i32) -> f64 {
        let g = gamma();
        2.0 * g.powi(i) / (g + 1.0)
    }

    /// Adds one value. Non-finite values are ignored (the decoder never lets one through).
    pub fn add(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let v = value.max(0.0);
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        if v < MIN_INDEXABLE {
            self.zeros += 1;
        } else {
            *self.buckets.entry(Self::index(v)).or_default() += 1;
        }
    }

    /// Adds every count of `other` to this sketch: the result equals one sketch of both inputs.
    pub fn merge(&mut self, other: &QuantileSketch) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.count += other.count;
        self.zeros += other.zeros;
        for (i, c) in &other.buckets {
            *self.buckets.entry(*i).or_default() += c;
        }
    }

    /// Number of values added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no value was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of occupied buckets (memory is proportional to it).
    pub fn buckets(&self) -> usize {
        self.buckets.len() + usize::from(self.zeros > 0)
    }

    /// The `q`-quantile (`q` in `0..=1`, clamped), `None` when empty. Within [`RELATIVE_ERROR`]
    /// of the exact value of rank `floor(q * (count - 1))`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        if rank == 0 {
            return Some(self.min);
        }
        if rank == self.count - 1 {
            return Some(self.max);
        }
        let mut seen = self.zeros;
        if rank < seen {
            return Some(0.0);
        }
        for (i, c) in &self.buckets {
            seen += c;
            if rank < seen {
                // The estimate may stray outside [min, max] at the edges; the exact bounds are
                // better there and never increase the error.
                return Some(Self::value_of(*i).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    fn within(estimate: f64, exact: f64) -> bool {
        (estimate - exact).abs() <= RELATIVE_ERROR * exact.abs() + 1e-12
    }

    #[test]
    fn empty_and_single() {
        let mut s = QuantileSketch::new();
        assert_eq!(s.quantile(0.5), None);
        s.add(812.5);
        for q in [0.0, 0.5, 0.95, 1.0] {
            assert_eq!(s.quantile(q), Some(812.5));
        }
    }

    #[test]
    fn zeros_and_negatives_count_as_zero() {
        let mut s = QuantileSketch::new();
        for v in [0.0, -3.0, 0.0, 10.0] {
            s.add(v);
        }
        assert_eq!(s.count(), 4);
        assert_eq!(s.quantile(0.5), Some(0.0));
        assert_eq!(s.quantile(1.0), Some(10.0));
    }

    #[test]
    fn buckets_stay_few_over_a_wide_range() {
        let mut s = QuantileSketch::new();
        let mut v = 1.0;
        while v < 86_400_000.0 {
            s.add(v);
            v *= 1.001;
        }
        assert!(s.buckets() < 2000, "{} buckets", s.buckets());
    }

    proptest! {
        #[test]
        fn quantiles_within_the_relative_error(
            values in proptest::collection::vec(0.0f64..1e7, 1..2000),
            q in 0.0f64..=1.0,
        ) {
            let mut s = QuantileSketch::new();
            for v in &values {
                s.add(*v);
            }
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let est = s.quantile(q).unwrap();
            let want = exact(&sorted, q);
            prop_assert!(within(est, want), "q={q} estimate {est} exact {want}");
        }

        #[test]
        fn merge_of_parts_equals_sketch_of_all(
            values in proptest::collection::vec(0.0f64..1e6, 0..500),
            cuts in proptest::collection::vec(0usize..500, 0..5),
        ) {
            let mut whole = QuantileSketch::new();
            for v in &values {
                whole.add(*v);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(values.len())).collect();
            cuts.sort_unstable();
            let mut merged = QuantileSketch::new();
            let mut start = 0;
            for end in cuts.into_iter().chain([values.len()]) {
                let mut part = QuantileSketch::new();
                for v in &values[start..end.max(start)] {
                    part.add(*v);
                }
                merged.merge(&part);
                start = end.max(start);
            }
            prop_assert_eq!(merged, whole);
        }
    }
}
