//! Which metrics of a telemetry sample feed a model, and how they are normalized.

use serde::{Deserialize, Serialize};

/// The feature mapping and normalization of one model: feature `i` is the metric
/// `names[i]`, normalized as `(value - mean[i]) / std[i]`. A metric the sample lacks (a host
/// without a temperature sensor) becomes `0.0`, the training mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Metric names, in the model's input order.
    pub names: Vec<String>,
    /// Per-feature mean.
    pub mean: Vec<f32>,
    /// Per-feature standard deviation (positive).
    pub std: Vec<f32>,
}

impl FeatureSpec {
    /// The shipped model's mapping (from `operators/models/anomaly_detector.golden.json`).
    pub fn builtin() -> Self {
        Self {
            names: [
                "cpu_percent",
                "memory_percent",
                "disk_percent",
                "temperature",
                "load_avg",
            ]
            .map(String::from)
            .to_vec(),
            mean: vec![40.1292, 52.4545, 34.8952, 50.0575, 1.6041],
            std: vec![20.3349, 13.2047, 14.3615, 5.9151, 0.8681],
        }
    }

    /// Features per sample.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no features.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Why this mapping cannot be used, if it cannot (message names the field).
    pub fn problem(&self) -> Option<String> {
        if self.names.is_empty() {
            return Some("features: at least one metric is needed".into());
        }
        if self.mean.len() != self.names.len() || self.std.len() != self.names.len() {
            return Some(format!(
                "mean and std need one value per feature ({} features, {} means, {} stds)",
                self.names.len(),
                self.mean.len(),
                self.std.len()
            ));
        }
        if let Some(i) = self.std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Some(format!(
                "std[{i}] ({}) must be a positive number",
                self.std[i]
            ));
        }
        if let Some(i) = self.mean.iter().position(|m| !m.is_finite()) {
            return Some(format!("mean[{i}] must be finite"));
        }
        None
    }

    /// Appends the normalized features of one sample to `out`. `metric` looks a metric up by
    /// name.
    pub fn normalize_into(&self, metric: impl Fn(&str) -> Option<f64>, out: &mut Vec<f32>) {
        for (i, name) in self.names.iter().enumerate() {
            out.push(self.normalize(i, metric(name)));
        }
    }

    /// Appends the normalized features of values already looked up with [`FeatureSpec::raw`].
    pub fn normalize_raw_into(&self, raw: &[Option<f64>], out: &mut Vec<f32>) {
        for (i, value) in raw.iter().enumerate() {
            out.push(self.normalize(i, *value));
        }
    }

    /// Feature `i`, normalized; a missing value is the mean (`0.0`).
    fn normalize(&self, i: usize, value: Option<f64>) -> f32 {
        // f32 arithmetic, as the training script computes the golden inputs.
        value.map_or(0.0, |v| (v as f32 - self.mean[i]) / self.std[i])
    }

    /// The raw values of the features (`None` where missing), for the `anomalies` table.
    pub fn raw(&self, metric: impl Fn(&str) -> Option<f64>) -> Vec<Option<f64>> {
        self.names.iter().map(|n| metric(n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_in_order_and_fills_missing_with_the_mean() {
        let spec = FeatureSpec::builtin();
        let metrics = [("cpu_percent", 40.1292), ("load_avg", 1.6041 + 0.8681)];
        let mut out = Vec::new();
        spec.normalize_into(
            |n| metrics.iter().find(|(k, _)| *k == n).map(|(_, v)| *v),
            &mut out,
        );
        assert_eq!(out.len(), 5);
        assert!(out[0].abs() < 1e-6);
        assert_eq!(&out[1..4], &[0.0, 0.0, 0.0]);
        assert!((out[4] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn problems_name_the_field() {
        let mut spec = FeatureSpec::builtin();
        assert_eq!(spec.problem(), None);
        spec.std[2] = 0.0;
        assert!(spec.problem().unwrap().contains("std[2]"));
        spec.mean.pop();
        assert!(spec.problem().unwrap().contains("one value per feature"));
    }
}
