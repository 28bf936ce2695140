//! Anomaly scoring end to end: the training script's golden samples, published as telemetry
//! through the real broker, come out of the pipeline with the scores the script printed
//! (within 1e-5) in `anomaly_scores` (PostgreSQL and Parquet), the anomalies among them in
//! `anomalies` with the metrics the model saw, anomaly counts in the per-device windows, and
//! the inference series on `/metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, http_get, http_post, produce, repo_root,
    stack, unique, wait_until, Pipeline,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const FEATURES: [&str; 5] = [
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "temperature",
    "load_avg",
];

#[derive(serde::Deserialize)]
struct Golden {
    threshold: f32,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    raw: Vec<f64>,
    score: f32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_samples_get_the_training_scripts_scores() -> Result<()> {
    let golden: Golden = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("operators/models/anomaly_detector.golden.json"),
    )?)?;
    let stack = stack();
    let db = unique("anomaly");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 2).await?;
    let work = tempfile::tempdir()?;
    let nas = work.path().join("nas");
    let http = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("pipeline.toml");
    // Batches of 3 on 2 workers: the golden samples are spread over several batches.
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 20\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"{http}\"\n\
             [dataflows]\ninference = false\nanalytics = false\n\
             [inference]\nbackend = \"cpu\"\nbatch_size = 3\nmax_wait = \"5ms\"\nqueue = 2\n",
            stack.brokers,
            nas.display(),
        ),
    )?;

    // Golden case i: device gold-i, at T0 + i s, on partition i % 2. Then a sample without
    // temperature (scored with the mean in its place), a malformed record (a dead letter,
    // never scored), and per partition a sentinel two hours later that closes the windows.
    let mut records: Vec<(i32, Vec<u8>)> = Vec::new();
    for (i, case) in golden.cases.iter().enumerate() {
        let metrics: serde_json::Map<String, serde_json::Value> = FEATURES
            .iter()
            .zip(&case.raw)
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        records.push((
            (i % 2) as i32,
            json!({"device_id": format!("gold-{i:02}"), "metrics": metrics,
                   "timestamp": T0_MS + i as i64 * 1000})
            .to_string()
            .into_bytes(),
        ));
    }
    records.push((
        0,
        json!({"device_id": "no-sensor", "metrics": {"cpu_percent": 30.0, "memory_percent": 50.0,
               "disk_percent": 40.0, "temperature": null, "load_avg": 1.2}, "timestamp": T0_MS + 30_000})
        .to_string()
        .into_bytes(),
    ));
    records.push((1, b"{\"device_id\": \"broken\", \"metrics\": {".to_vec()));
    for p in 0..2 {
        records.push((
            p,
            json!({"device_id": format!("sentinel-{p}"), "metrics": {"up": 1.0},
                   "timestamp": T0_MS + 7_200_000})
            .to_string()
            .into_bytes(),
        ));
    }
    let scored = golden.cases.len() + 1 + 2;
    produce(stack, &topic, &records)?;

    let log = work.path().join("pipeline.log");
    let mut pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    let n = |sql: String| {
        let client = &client;
        // Before the pipeline's migrations the tables do not exist yet: count 0.
        async move {
            Ok::<i64, anyhow::Error>(
                client
                    .query_one(&sql, &[])
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or(0),
            )
        }
    };
    let done = wait_until(Duration::from_secs(120), "scores and windows", || async {
        Ok(
            n("SELECT count(*) FROM anomaly_scores".into()).await? >= scored as i64
                && n(format!(
                    "SELECT count(*) FROM device_metrics_1m WHERE metric_name = 'anomalies' \
                 AND bucket < to_timestamp({} / 1000.0)",
                    T0_MS + 7_200_000
                ))
                .await?
                    >= 1,
        )
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(pipeline.is_running());

    // Every sample scored exactly once; the golden ones as the training script scored them.
    let rows = client
        .query(
            "SELECT device_id, score, anomaly, model, backend FROM anomaly_scores ORDER BY device_id",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), scored, "one score per valid sample");
    let scores: BTreeMap<String, (f32, bool, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect();
    assert_eq!(scores.len(), scored, "no sample scored twice");
    let mut expected_anomalies = Vec::new();
    for (i, case) in golden.cases.iter().enumerate() {
        let device = format!("gold-{i:02}");
        let (score, anomaly, model, backend) = &scores[&device];
        assert!(
            (score - case.score).abs() <= 1e-5,
            "{}: pipeline {score} vs training script {}",
            case.name,
            case.score
        );
        assert_eq!(*anomaly, case.score >= golden.threshold, "{}", case.name);
        assert_eq!(
            (model.as_str(), backend.as_str()),
            ("telemetry-anomaly", "cpu")
        );
        if case.score >= golden.threshold {
            expected_anomalies.push(device);
        }
    }
    assert!(
        expected_anomalies.len() >= 5,
        "the golden set has anomalies"
    );
    let (no_sensor, ..) = scores["no-sensor"];
    assert!((0.0..=1.0).contains(&no_sensor));

    // `anomalies`: exactly those, with the inputs the model saw.
    let rows = client
        .query(
            "SELECT device_id, score, threshold, features FROM anomalies ORDER BY device_id",
            &[],
        )
        .await?;
    let devices: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let mut want = expected_anomalies.clone();
    // The sentinels have none of the model's metrics: scored as an all-mean sample.
    for p in 0..2 {
        let d = format!("sentinel-{p}");
        if scores[&d].1 {
            want.push(d);
        }
    }
    want.sort();
    assert_eq!(devices, want);
    for r in &rows {
        let device: String = r.get(0);
        let Some(i) = device
            .strip_prefix("gold-")
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        let features: serde_json::Value = r.get(3);
        for (k, v) in FEATURES.iter().zip(&golden.cases[i].raw) {
            assert_eq!(features[k].as_f64(), Some(*v), "{device} {k}");
        }
        assert_eq!(r.get::<_, f32>(2), golden.threshold);
    }

    // Per-device windows: `anomalies` sums to the anomaly count, `anomaly_score` counts the
    // samples and carries the score.
    let rows = client
        .query(
            "SELECT device_id, metric_name, count, sum, max FROM device_metrics_1m \
             WHERE metric_name IN ('anomalies', 'anomaly_score') AND device_id LIKE 'gold-%'",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 2 * golden.cases.len());
    for r in &rows {
        let device: String = r.get(0);
        let metric: String = r.get(1);
        let (count, sum, max): (i64, f64, f64) = (r.get(2), r.get(3), r.get(4));
        assert_eq!(count, 1);
        let (score, anomaly, ..) = &scores[&device];
        match metric.as_str() {
            "anomalies" => assert_eq!(sum, f64::from(u8::from(*anomaly)), "{device}"),
            _ => assert!((max - f64::from(*score)).abs() < 1e-6, "{device}"),
        }
    }

    // Parquet: the same scores under table=anomaly_scores, served by the SQL endpoint once
    // the rolls are renamed into place.
    let mut parquet = serde_json::Value::Null;
    for _ in 0..60 {
        let (status, body) = http_post(
            &http,
            "/v1/sql",
            r#"{"sql": "SELECT count(*) AS n, count(DISTINCT device_id) AS d, sum(CASE WHEN anomaly THEN 1 ELSE 0 END) AS a FROM anomaly_scores"}"#,
        )?;
        assert_eq!(status, 200, "{body}");
        parquet = serde_json::from_str(&body)?;
        if parquet["rows"][0][0] == json!(scored) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let anomalies_total = i64::try_from(want.len())?;
    assert_eq!(
        parquet["rows"][0],
        json!([scored, scored, anomalies_total]),
        "{parquet}"
    );

    // Metrics: samples by backend and model, the backend in use, anomalies, batch sizes.
    let metrics = http_get(&http, "/metrics")?;
    for series in [
        format!(
            "primespark_inference_samples_total{{backend=\"cpu\",model=\"telemetry-anomaly\"}} {scored}"
        ),
        format!(
            "primespark_anomalies_total{{backend=\"cpu\",model=\"telemetry-anomaly\"}} {anomalies_total}"
        ),
        "primespark_inference_backend{worker=\"0\",backend=\"cpu\"} 1".to_owned(),
        "primespark_inference_seconds_count{backend=\"cpu\",model=\"telemetry-anomaly\"}".to_owned(),
        "primespark_inference_batch_size_bucket{".to_owned(),
        "primespark_inference_queue_depth{worker=\"0\"}".to_owned(),
    ] {
        assert!(metrics.contains(&series), "missing {series:?} in\n{metrics}");
    }
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// A model file that does not exist, or a model asked for that is not configured, stops
/// start-up with exit code 2 and a message naming it.
#[test]
fn bad_model_config_fails_start_up_with_the_key() -> Result<()> {
    let work = tempfile::tempdir()?;
    for (inference, needle) in [
        (
            "[inference]\nmodel = \"other\"\n[inference.models.other]\npath = \"/nonexistent/m.onnx\"\n",
            "other",
        ),
        ("[inference]\nmodel = \"nope\"\n", "inference.model"),
        ("[inference]\nbatch_size = 0\n", "inference.batch_size"),
        ("[inference]\nbackend = \"hailo\"\n", "Hailo"),
    ] {
        let config = work.path().join("pipeline.toml");
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"127.0.0.1:1\"\n[postgres]\nenabled = false\n[nas]\npath = \"{}\"\n\
                 [query]\nhttp_addr = \"127.0.0.1:{}\"\n{inference}",
                work.path().join("nas").display(),
                free_port()
            ),
        )?;
        let out = primespark_tests::pipeline_command()?
            .arg("run")
            .arg("--config")
            .arg(&config)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        assert!(
            matches!(code, Some(2) | Some(3)),
            "{inference}: exit {code:?}\n{stderr}"
        );
        assert!(stderr.contains(needle), "{inference}: {stderr}");
    }
    Ok(())
}
