//! The CPU backend: any ONNX model through `tract-onnx`, pure Rust, no system library.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::{check_batch, Backend, InferenceError, Model, ModelSource, ModelSpec};

/// Loads ONNX models for the CPU.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// An optimized tract plan with its reusable state: spawning a state per batch would allocate
/// every intermediate tensor again.
pub struct CpuModel {
    name: String,
    inputs: usize,
    plan: Arc<TypedRunnableModel>,
    state: TypedSimpleState,
}

impl std::fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuModel")
            .field("name", &self.name)
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

impl CpuModel {
    /// Loads and optimizes `spec`'s ONNX graph, then scores one all-zero sample to check that
    /// it takes `[N, inputs]` and gives one score per sample.
    pub fn load(spec: &ModelSpec) -> Result<Self, InferenceError> {
        let load_err = |e: TractError| InferenceError::Load {
            model: spec.name.to_string(),
            backend: "cpu",
            reason: format!("{e:#}"),
        };
        let onnx = tract_onnx::onnx();
        let model = match &spec.onnx {
            ModelSource::Builtin(bytes) => onnx.model_for_read(&mut &bytes[..]),
            ModelSource::Path(path) => onnx.model_for_path(path),
        }
        .map_err(load_err)?;
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(load_err)?;
        let state = plan.spawn().map_err(load_err)?;
        let mut loaded = Self {
            name: spec.name.to_string(),
            inputs: spec.inputs,
            plan,
            state,
        };
        let mut scores = Vec::new();
        loaded
            .run(&vec![0.0; spec.inputs * 2], 2, &mut scores)
            .map_err(|e| InferenceError::Shape {
                model: spec.name.to_string(),
                reason: format!("does not score [N, {}] inputs: {e}", spec.inputs),
            })?;
        Ok(loaded)
    }

    /// The optimized plan (benchmarks compare against a bare `run`).
    pub fn plan(&self) -> &Arc<TypedRunnableModel> {
        &self.plan
    }
}

impl Model for CpuModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn inputs(&self) -> usize {
        self.inputs
    }

    fn run(
        &mut self,
        features: &[f32],
        rows: usize,
        scores: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        check_batch(&self.name, self.inputs, features, rows)?;
        let run_err = |e: TractError| InferenceError::Run {
            model: self.name.clone(),
            backend: "cpu",
            reason: format!("{e:#}"),
        };
        let input = Tensor::from_shape(&[rows, self.inputs], features).map_err(run_err)?;
        let outputs = self
            .state
            .run(tvec![input.into_tvalue()])
            .map_err(run_err)?;
        let out = outputs.first().ok_or_else(|| InferenceError::Shape {
            model: self.name.clone(),
            reason: "the model has no output".into(),
        })?;
        let view = out.to_plain_array_view::<f32>().map_err(run_err)?;
        if view.len() != rows {
            return Err(InferenceError::Shape {
                model: self.name.clone(),
                reason: format!(
                    "{} outputs for {rows} samples (shape {:?}); one score per sample expected",
                    view.len(),
                    view.shape()
                ),
            });
        }
        scores.extend(view.iter().copied());
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn load(&self, spec: &ModelSpec) -> Result<Box<dyn Model>, InferenceError> {
        Ok(Box::new(CpuModel::load(spec)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::features::FeatureSpec;
    use crate::inference::{BUILTIN_MODEL_NAME, BUILTIN_MODEL_ONNX};

    /// The golden file written by `operators/models/train_anomaly.py`.
    #[derive(serde::Deserialize)]
    struct Golden {
        mean: Vec<f32>,
        std: Vec<f32>,
        cases: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        raw: Vec<f64>,
        normalized: Vec<f32>,
        score: f32,
    }

    fn builtin() -> ModelSpec {
        ModelSpec {
            name: Arc::from(BUILTIN_MODEL_NAME),
            onnx: ModelSource::Builtin(BUILTIN_MODEL_ONNX),
            hef: None,
            inputs: 5,
        }
    }

    #[test]
    fn shipped_model_reproduces_the_training_scripts_scores() {
        let golden: Golden =
            serde_json::from_str(include_str!("../../models/anomaly_detector.golden.json"))
                .unwrap();
        let spec = FeatureSpec::builtin();
        assert_eq!(spec.mean, golden.mean);
        assert_eq!(spec.std, golden.std);
        let mut model = CpuModel::load(&builtin()).unwrap();
        let mut features = Vec::new();
        for case in &golden.cases {
            let before = features.len();
            spec.normalize_into(
                |n| spec.names.iter().position(|x| x == n).map(|i| case.raw[i]),
                &mut features,
            );
            assert_eq!(&features[before..], &case.normalized[..], "{}", case.name);
        }
        let mut scores = Vec::new();
        model
            .run(&features, golden.cases.len(), &mut scores)
            .unwrap();
        for (case, score) in golden.cases.iter().zip(&scores) {
            assert!(
                (score - case.score).abs() <= 1e-5,
                "{}: {score} vs {}",
                case.name,
                case.score
            );
        }
        // The same scores one at a time: batching must not change a score.
        for (i, case) in golden.cases.iter().enumerate() {
            let mut one = Vec::new();
            model
                .run(&features[i * 5..(i + 1) * 5], 1, &mut one)
                .unwrap();
            assert!((one[0] - case.score).abs() <= 1e-5, "{}", case.name);
        }
    }

    #[test]
    fn wrong_shapes_are_errors_not_panics() {
        let mut model = CpuModel::load(&builtin()).unwrap();
        let mut scores = Vec::new();
        assert!(matches!(
            model.run(&[0.0; 7], 2, &mut scores),
            Err(InferenceError::Shape { .. })
        ));
        assert!(scores.is_empty());
        let mut wrong = builtin();
        wrong.inputs = 4;
        assert!(matches!(
            CpuModel::load(&wrong),
            Err(InferenceError::Shape { .. })
        ));
        wrong.onnx = ModelSource::Builtin(b"not a model");
        assert!(matches!(
            CpuModel::load(&wrong),
            Err(InferenceError::Load { .. })
        ));
    }
}
