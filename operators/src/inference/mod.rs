//! Model inference next to the data: telemetry samples scored by an anomaly model, on the
//! Hailo-8 NPU when there is one and on the CPU otherwise.
//!
//! The pieces, each usable on its own:
//! - [`Backend`] / [`Model`]: load a model, run a batch. [`cpu::CpuBackend`] runs any ONNX
//!   model with `tract-onnx` (pure Rust); `hailo::HailoBackend` (cargo feature `hailo`) runs a
//!   compiled HEF through HailoRT. [`quant`] holds the device-independent parts of the Hailo
//!   path (tensor layout, quantization, status mapping), compiled and tested everywhere.
//! - [`features::FeatureSpec`]: which metrics of a sample feed the model, and how they are
//!   normalized.
//! - [`batcher::Batcher`]: micro-batches that close at `batch_size` or after `max_wait`.
//! - [`cache::ModelCache`]: several models by name, least recently used evicted.
//! - [`executor::Scorer`]: runs batches on a thread of its own behind a bounded queue (a slow
//!   model slows the caller instead of growing memory), falls back from the NPU to the CPU on
//!   an error without losing or double-scoring a sample, and reports every batch as metrics.

pub mod batcher;
pub mod cache;
pub mod config;
pub mod cpu;
pub mod executor;
pub mod features;
pub mod quant;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The anomaly model shipped with primespark (`operators/models/anomaly_detector.onnx`, made by
/// `operators/models/train_anomaly.py`): 5 normalized features in, one score in `0..=1` out.
pub const BUILTIN_MODEL_ONNX: &[u8] = include_bytes!("../../models/anomaly_detector.onnx");

/// Name under which [`BUILTIN_MODEL_ONNX`] is known.
pub const BUILTIN_MODEL_NAME: &str = "telemetry-anomaly";

/// Where a model's ONNX graph comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// Bytes compiled into the binary (the shipped model).
    Builtin(&'static [u8]),
    /// A file.
    Path(PathBuf),
}

/// Everything a backend needs to load one model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name the model is known by (config key, metric label, `anomaly_scores.model`).
    pub name: Arc<str>,
    /// The ONNX graph (the CPU backend; also the reference for the NPU).
    pub onnx: ModelSource,
    /// The HEF compiled from it for the Hailo-8 (Hailo backend only).
    pub hef: Option<PathBuf>,
    /// Input features per sample.
    pub inputs: usize,
}

/// Which backend runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The NPU when one is found (and compiled in), else the CPU.
    #[default]
    Auto,
    /// The Hailo-8 NPU; start-up fails without one.
    Hailo,
    /// The CPU.
    Cpu,
}

/// Errors of loading and running models.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The model could not be read, parsed or prepared.
    #[error("loading model {model:?} on {backend}: {reason}")]
    Load {
        /// Model name.
        model: String,
        /// Backend name.
        backend: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The model's input or output is not what the pipeline feeds or reads.
    #[error("model {model:?}: {reason}")]
    Shape {
        /// Model name.
        model: String,
        /// The mismatch.
        reason: String,
    },
    /// A batch failed.
    #[error("running model {model:?} on {backend}: {reason}")]
    Run {
        /// Model name.
        model: String,
        /// Backend name.
        backend: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A HailoRT call returned an error status.
    #[error("HailoRT {function} failed: {status}")]
    Hailo {
        /// The C function.
        function: &'static str,
        /// The status, named.
        status: quant::HailoStatus,
    },
    /// `inference.backend = "hailo"` but no device was found or the feature is off.
    #[error("no Hailo backend: {0}")]
    NoDevice(String),
    /// The scoring thread is gone.
    #[error("the inference thread stopped")]
    Stopped,
}

/// A model loaded on a backend, ready to run batches.
pub trait Model: Send {
    /// The model's name.
    fn name(&self) -> &str;

    /// Features per sample.
    fn inputs(&self) -> usize;

    /// Scores `rows` samples laid out row-major in `features` (`rows * inputs()` values,
    /// already normalized) and appends one score per sample to `scores`, in order. On an error
    /// nothing is appended.
    fn run(
        &mut self,
        features: &[f32],
        rows: usize,
        scores: &mut Vec<f32>,
    ) -> Result<(), InferenceError>;
}

/// Something that loads models: the CPU, the NPU, or a test double.
pub trait Backend: Send {
    /// Short name: `cpu`, `hailo` (metric label, logs).
    fn name(&self) -> &'static str;

    /// Loads `spec` on this backend.
    fn load(&self, spec: &ModelSpec) -> Result<Box<dyn Model>, InferenceError>;
}

/// Checks a batch's shape before it reaches a backend: a wrong length would otherwise read
/// past a row or score a sample with its neighbour's features.
pub fn check_batch(
    model: &str,
    inputs: usize,
    features: &[f32],
    rows: usize,
) -> Result<(), InferenceError> {
    if rows.checked_mul(inputs) != Some(features.len()) {
        return Err(InferenceError::Shape {
            model: model.to_owned(),
            reason: format!(
                "{} values for {rows} samples of {inputs} features",
                features.len()
            ),
        });
    }
    Ok(())
}
