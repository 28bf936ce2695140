//! The shipped anomaly model is reproducible: `operators/models/train_anomaly.py` run again
//! (in the stack's Python, with the pinned numpy and onnx) writes a model whose scores, as the
//! pipeline's CPU backend computes them, equal the committed golden scores.

use std::sync::Arc;

use anyhow::Result;
use primespark_tests::{repo_root, stack};

#[derive(serde::Deserialize, PartialEq, Debug)]
struct Golden {
    mean: Vec<f32>,
    std: Vec<f32>,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize, PartialEq, Debug)]
struct Case {
    name: String,
    normalized: Vec<f32>,
    score: f32,
}

#[test]
fn training_script_reproduces_the_shipped_model() -> Result<()> {
    use primespark_operators::inference::cpu::CpuModel;
    use primespark_operators::inference::{Model, ModelSource, ModelSpec};
    let stack = stack();
    let out = tempfile::tempdir()?;
    let models = repo_root().join("operators/models");
    let status = std::process::Command::new(&stack.python)
        .arg(models.join("train_anomaly.py"))
        .arg("--out")
        .arg(out.path())
        .stdout(std::process::Stdio::null())
        .status()?;
    assert!(status.success(), "training script failed");
    let committed: Golden = serde_json::from_str(&std::fs::read_to_string(
        models.join("anomaly_detector.golden.json"),
    )?)?;
    let fresh: Golden = serde_json::from_str(&std::fs::read_to_string(
        out.path().join("anomaly_detector.golden.json"),
    )?)?;
    assert_eq!(fresh.mean, committed.mean);
    assert_eq!(fresh.std, committed.std);
    assert_eq!(fresh.cases.len(), committed.cases.len());
    let mut model = CpuModel::load(&ModelSpec {
        name: Arc::from("fresh"),
        onnx: ModelSource::Path(out.path().join("anomaly_detector.onnx")),
        hef: None,
        inputs: 5,
    })?;
    let features: Vec<f32> = committed
        .cases
        .iter()
        .flat_map(|c| c.normalized.clone())
        .collect();
    let mut scores = Vec::new();
    model.run(&features, committed.cases.len(), &mut scores)?;
    for ((case, fresh), score) in committed.cases.iter().zip(&fresh.cases).zip(&scores) {
        assert_eq!(case.name, fresh.name);
        assert!(
            (score - case.score).abs() <= 1e-5,
            "{}: retrained model scores {score}, committed {}",
            case.name,
            case.score
        );
        assert!((fresh.score - case.score).abs() <= 1e-5, "{}", case.name);
    }
    Ok(())
}
