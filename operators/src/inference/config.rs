//! `[inference]`: the configuration of anomaly scoring (models, batching, the backend), with
//! pure validation that names the wrong key. Model files are loaded by
//! [`crate::scoring::ModelTable::load`] at start-up, not here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use primespark_schemas::config::{duration, InvalidConfig};
use serde::{Deserialize, Serialize};

use super::features::FeatureSpec;
use super::{BackendChoice, BUILTIN_MODEL_NAME};

/// `[inference]`: anomaly scoring of telemetry samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Score telemetry at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `auto` (the NPU when found, else the CPU), `hailo` or `cpu`.
    #[serde(default)]
    pub backend: BackendChoice,
    /// The model for devices no `devices` prefix matches.
    #[serde(default = "default_model")]
    pub model: String,
    /// A batch closes at this many samples...
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// ...or this long after its first sample.
    #[serde(default = "default_max_wait", with = "duration")]
    pub max_wait: Duration,
    /// Batches in flight per worker (queued or running) before the worker waits.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// After the NPU fails a batch, use the CPU this long before trying the NPU again.
    #[serde(default = "default_retry_after", with = "duration")]
    pub retry_after: Duration,
    /// Models kept loaded per backend (least recently used evicted).
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// Models by name. `telemetry-anomaly` is built in and needs no entry.
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Device-id prefix -> model name; the longest matching prefix wins.
    #[serde(default)]
    pub devices: BTreeMap<String, String>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            backend: BackendChoice::Auto,
            model: default_model(),
            batch_size: default_batch_size(),
            max_wait: default_max_wait(),
            queue: default_queue(),
            retry_after: default_retry_after(),
            cache_size: default_cache_size(),
            models: BTreeMap::new(),
            devices: BTreeMap::new(),
        }
    }
}

/// One model of `[inference.models.<name>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The ONNX file (CPU backend). Only the built-in model may omit it.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The HEF compiled from it for the Hailo-8.
    #[serde(default)]
    pub hef: Option<PathBuf>,
    /// Metric names in the model's input order.
    #[serde(default = "default_features")]
    pub features: Vec<String>,
    /// Normalization mean per feature.
    #[serde(default = "default_mean")]
    pub mean: Vec<f32>,
    /// Normalization standard deviation per feature.
    #[serde(default = "default_std")]
    pub std: Vec<f32>,
    /// A sample scoring at or over this is an anomaly.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
}

fn default_true() -> bool {
    true
}
fn default_model() -> String {
    BUILTIN_MODEL_NAME.into()
}
fn default_batch_size() -> usize {
    8
}
fn default_max_wait() -> Duration {
    Duration::from_millis(2)
}
fn default_queue() -> usize {
    4
}
fn default_retry_after() -> Duration {
    Duration::from_secs(60)
}
fn default_cache_size() -> usize {
    4
}
pub(crate) fn default_features() -> Vec<String> {
    FeatureSpec::builtin().names
}
pub(crate) fn default_mean() -> Vec<f32> {
    FeatureSpec::builtin().mean
}
pub(crate) fn default_std() -> Vec<f32> {
    FeatureSpec::builtin().std
}
pub(crate) fn default_threshold() -> f32 {
    0.5
}

impl InferenceConfig {
    /// Checks values without touching files (the model table loads them at start-up).
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if !(1..=4096).contains(&self.batch_size) {
            return Err(InvalidConfig::new(
                "inference.batch_size",
                "must be between 1 and 4096",
            ));
        }
        if self.max_wait > Duration::from_secs(1) {
            return Err(InvalidConfig::new(
                "inference.max_wait",
                "must be at most 1s (samples wait that long for a batch)",
            ));
        }
        if !(1..=1024).contains(&self.queue) {
            return Err(InvalidConfig::new(
                "inference.queue",
                "must be between 1 and 1024",
            ));
        }
        if self.cache_size == 0 {
            return Err(InvalidConfig::new(
                "inference.cache_size",
                "must be at least 1",
            ));
        }
        let known = |name: &str| name == BUILTIN_MODEL_NAME || self.models.contains_key(name);
        if !known(&self.model) {
            return Err(InvalidConfig::new(
                "inference.model",
                format!(
                    "no model named {:?} (built in: {BUILTIN_MODEL_NAME:?}; others need [inference.models.<name>])",
                    self.model
                ),
            ));
        }
        for (prefix, model) in &self.devices {
            if !known(model) {
                return Err(InvalidConfig::new(
                    format!("inference.devices.{prefix}"),
                    format!("no model named {model:?}"),
                ));
            }
        }
        for (name, m) in &self.models {
            let key = |k: &str| format!("inference.models.{name}.{k}");
            if m.path.is_none() && name != BUILTIN_MODEL_NAME {
                return Err(InvalidConfig::new(
                    key("path"),
                    "an ONNX file is needed (only the built-in model has none)",
                ));
            }
            if let Some(problem) = m.feature_spec().problem() {
                return Err(InvalidConfig::new(key("features"), problem));
            }
            if !m.threshold.is_finite() {
                return Err(InvalidConfig::new(key("threshold"), "must be a number"));
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    /// The model's feature mapping and normalization.
    pub fn feature_spec(&self) -> FeatureSpec {
        FeatureSpec {
            names: self.features.clone(),
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}
