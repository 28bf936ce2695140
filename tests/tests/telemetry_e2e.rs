//! End to end against the stack: telemetry with known values (some out of order within the
//! bound, some malformed) through the real broker, a killed-and-restarted pipeline, and real
//! PostgreSQL and Parquet; everything compared with what this test computes independently.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, http_get, http_post, produce, stack, unique,
    wait_until, Pipeline,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const T0_US: i64 = 1_762_351_200_000_000; // 2025-11-05T14:00:00Z
const PARTITIONS: i32 = 3;

/// (bucket_us, device, metric).
type AggKey = (i64, String, String);

struct Expected {
    /// (time_us, device, metric) -> value for every valid sample.
    raw: BTreeMap<(i64, String, String), f64>,
    /// (bucket_us, device, metric) -> (count, sum, min, max) for windows that must close.
    aggs: BTreeMap<AggKey, (i64, f64, f64, f64)>,
    /// (partition, offset) -> reason of malformed records.
    dead: BTreeMap<(i32, i64), &'static str>,
}

/// Builds the events: per partition, a stream of devices' samples 100 ms apart with neighbours
/// swapped (disorder well within the 5 s bound), ~3% malformed, and a final sentinel far ahead
/// that moves every partition's watermark past the last real window.
fn events(seed: u64, per_partition: usize) -> (Vec<Vec<Vec<u8>>>, Expected) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut expected = Expected {
        raw: BTreeMap::new(),
        aggs: BTreeMap::new(),
        dead: BTreeMap::new(),
    };
    let mut partitions = Vec::new();
    for p in 0..PARTITIONS {
        let mut times: Vec<i64> = (0..per_partition as i64)
            .map(|i| T0_US + i * 100_000 + i64::from(p) * 7)
            .collect();
        for i in (0..times.len() - 1).step_by(3) {
            times.swap(i, i + 1);
        }
        let mut payloads = Vec::new();
        for (offset, t) in times.into_iter().enumerate() {
            let offset = offset as i64;
            if rng.random_bool(0.03) {
                let (payload, reason) = match rng.random_range(0..3) {
                    0 => (b"{\"device_id\": \"pi-1\", \"metrics\": {".to_vec(), "malformed_json"),
                    1 => (
                        json!({"device_id": "pi-1", "metrics": {"cpu_percent": 170.0}, "timestamp": t / 1000}).to_string().into_bytes(),
                        "out_of_range",
                    ),
                    _ => (json!({"metrics": {"cpu_percent": 1.0}, "timestamp": t / 1000}).to_string().into_bytes(), "missing_field"),
                };
                expected.dead.insert((p, offset), reason);
                payloads.push(payload);
                continue;
            }
            let device = format!("dev-{p}-{}", rng.random_range(0..4));
            let cpu = (rng.random_range(0..10_000) as f64) / 100.0;
            let load = (rng.random_range(0..400) as f64) / 100.0;
            let with_temp = rng.random_bool(0.7);
            let time = DateTime::<Utc>::from_timestamp_micros(t).expect("valid time");
            // Alternate naive isoformat, offset RFC 3339 and epoch millis.
            let ts = match offset % 3 {
                0 => json!(time.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()),
                1 => json!(time.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)),
                _ => json!(t / 1000),
            };
            let t = if offset % 3 == 2 {
                (t / 1000) * 1000
            } else {
                t
            };
            let temp = if with_temp {
                json!(40.0 + load)
            } else {
                serde_json::Value::Null
            };
            payloads.push(
                json!({"device_id": device, "metrics": {"cpu_percent": cpu, "load_avg": load, "temperature": temp}, "timestamp": ts})
                    .to_string()
                    .into_bytes(),
            );
            let mut samples = vec![("cpu_percent", cpu), ("load_avg", load)];
            if with_temp {
                samples.push(("temperature", 40.0 + load));
            }
            for (metric, value) in samples {
                expected
                    .raw
                    .insert((t, device.clone(), metric.to_owned()), value);
                let bucket = t.div_euclid(60_000_000) * 60_000_000;
                let e = expected
                    .aggs
                    .entry((bucket, device.clone(), metric.to_owned()))
                    .or_insert((0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
                e.0 += 1;
                e.1 += value;
                e.2 = e.2.min(value);
                e.3 = e.3.max(value);
            }
        }
        // Sentinel: one hour ahead; its own window stays open.
        // Two hours ahead: past the end of the first hour too, so its 1-hour windows close.
        let t = T0_US + 7_200_000_000;
        payloads.push(
            json!({"device_id": "sentinel", "metrics": {"up": 1.0}, "timestamp": t / 1000})
                .to_string()
                .into_bytes(),
        );
        partitions.push(payloads);
    }
    (partitions, expected)
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

fn parquet_rows(dir: &std::path::Path) -> Result<Vec<(i64, String, String, f64)>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMicrosecondType};
    let mut rows = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let file = std::fs::File::open(&path)?;
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?
                        .build()?;
                for batch in reader {
                    let batch = batch?;
                    let time = batch.column(0).as_primitive::<TimestampMicrosecondType>();
                    let device = batch.column(1).as_string::<i32>();
                    let metric = batch.column(2).as_string::<i32>();
                    let value = batch.column(3).as_primitive::<Float64Type>();
                    for i in 0..batch.num_rows() {
                        assert!(!time.is_null(i));
                        rows.push((
                            time.value(i),
                            device.value(i).to_owned(),
                            metric.value(i).to_owned(),
                            value.value(i),
                        ));
                    }
                }
            }
        }
    }
    Ok(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_end_to_end_with_restart() -> Result<()> {
    let stack = stack();
    let db = unique("e2e");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, PARTITIONS).await?;
    let work = tempfile::tempdir()?;
    let nas = work.path().join("nas");
    let http = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n[postgres]\nurl = \"{url}\"\nflush_rows = 500\nflush_interval = \"200ms\"\n[nas]\npath = \"{}\"\nroll_rows = 2000\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"{http}\"\n[windows]\nmax_out_of_orderness = \"5s\"\nidle_timeout = \"10m\"\n[dataflows]\ninference = false\nanalytics = false\n",
            stack.brokers,
            nas.display()
        ),
    )?;
    let log = work.path().join("pipeline.log");
    let (partitions, expected) = events(11, 1500);
    // Every valid sample plus one sentinel row per partition.
    let valid_points = expected.raw.len() as i64 + i64::from(PARTITIONS);

    // First half through rdkafka, with the pipeline running; kill it mid-stream.
    let half: Vec<(i32, Vec<u8>)> = partitions
        .iter()
        .enumerate()
        .flat_map(|(p, evs)| {
            evs[..evs.len() / 2]
                .iter()
                .map(move |e| (p as i32, e.clone()))
        })
        .collect();
    produce(stack, &topic, &half)?;
    let pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    wait_until(Duration::from_secs(120), "some raw rows", || async {
        Ok(count(&client, "SELECT count(*) FROM device_metrics")
            .await
            .unwrap_or(0)
            > 3000)
    })
    .await?;
    pipeline.kill()?;

    // Second half through Python's confluent-kafka, as the platform's producers do.
    let rest_file = work.path().join("rest.json");
    let rest: Vec<(i32, String)> = partitions
        .iter()
        .enumerate()
        .flat_map(|(p, evs)| {
            evs[evs.len() / 2..]
                .iter()
                .map(move |e| (p as i32, String::from_utf8_lossy(e).into_owned()))
        })
        .collect();
    std::fs::write(&rest_file, serde_json::to_vec(&rest)?)?;
    let py = format!(
        "import json,sys\nfrom confluent_kafka import Producer\np=Producer({{'bootstrap.servers':'{}'}})\nfor part,payload in json.load(open(sys.argv[1])):\n    p.produce('{topic}', payload.encode(), partition=part)\n    p.poll(0)\nassert p.flush(30)==0\n",
        stack.brokers
    );
    let status = std::process::Command::new(&stack.python)
        .arg("-c")
        .arg(&py)
        .arg(&rest_file)
        .status()?;
    assert!(status.success(), "python producer failed");

    let mut pipeline = Pipeline::start(&config, &[], &log)?;
    let expected_aggs = expected.aggs.len() as i64;
    // The 1-hour rollup, from the same samples: (hour, device, metric) -> (count, sum, min, max).
    let mut expected_hourly: BTreeMap<AggKey, (i64, f64, f64, f64)> = BTreeMap::new();
    for ((t, d, m), v) in &expected.raw {
        let e = expected_hourly
            .entry((
                t.div_euclid(3_600_000_000) * 3_600_000_000,
                d.clone(),
                m.clone(),
            ))
            .or_insert((0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
        e.0 += 1;
        e.1 += v;
        e.2 = e.2.min(*v);
        e.3 = e.3.max(*v);
    }
    let expected_dead = expected.dead.len() as i64;
    // One anomaly score per valid sample (the sentinels included), whatever the kill did.
    let samples: std::collections::BTreeSet<(i64, String)> = expected
        .raw
        .keys()
        .map(|(t, d, _)| (*t, d.clone()))
        .collect();
    let expected_scores = samples.len() as i64 + i64::from(PARTITIONS);
    wait_until(
        Duration::from_secs(180),
        "all rows, aggregates and dead letters",
        || async {
            let raw = count(&client, "SELECT count(*) FROM device_metrics").await?;
            let aggs = count(&client, "SELECT count(*) FROM device_metrics_1m WHERE metric_name NOT IN ('anomaly_score', 'anomalies')").await?;
            let hourly = count(&client, "SELECT count(*) FROM device_metrics_1h WHERE metric_name NOT IN ('anomaly_score', 'anomalies')").await?;
            let dead = count(&client, "SELECT count(*) FROM dead_letters").await?;
            let scores = count(&client, "SELECT count(*) FROM anomaly_scores").await?;
            let parquet = count(
            &client,
            "SELECT coalesce(min(next_offset), 0) FROM source_offsets WHERE sink = 'parquet_raw'",
        )
        .await?;
            let last_offsets: i64 = partitions.iter().map(|p| p.len() as i64).min().unwrap_or(0);
            Ok(raw >= valid_points
                && scores >= expected_scores
                && aggs >= expected_aggs
                && hourly >= expected_hourly.len() as i64
                && dead >= expected_dead
                && parquet >= last_offsets)
        },
    )
    .await?;
    assert!(
        pipeline.is_running(),
        "pipeline keeps running with malformed input"
    );

    // Raw rows: exactly the valid samples, none doubled by the kill.
    let rows = client
        .query("SELECT (extract(epoch from time) * 1000000)::int8, device_id, metric_name, value FROM device_metrics", &[])
        .await?;
    assert_eq!(rows.len() as i64, valid_points, "raw row count");
    let mut got: HashMap<(i64, String, String), usize> = HashMap::new();
    for r in &rows {
        *got.entry((r.get(0), r.get(1), r.get(2))).or_default() += 1;
    }
    for ((t, d, m), v) in &expected.raw {
        let n = got.get(&(*t, d.clone(), m.clone())).copied().unwrap_or(0);
        assert_eq!(n, 1, "raw row ({t}, {d}, {m}) = {v}");
    }
    let sentinel = (
        T0_US + 7_200_000_000,
        "sentinel".to_owned(),
        "up".to_owned(),
    );
    assert_eq!(got.get(&sentinel).copied(), Some(PARTITIONS as usize));

    // Anomaly scores: exactly one per sample across the SIGKILL (they commit with the raw
    // rows and offsets of their records).
    let scored = client
        .query(
            "SELECT (extract(epoch from time) * 1000000)::int8, device_id, count(*) FROM anomaly_scores GROUP BY 1, 2",
            &[],
        )
        .await?;
    assert_eq!(scored.len(), samples.len() + 1, "scored samples");
    for r in &scored {
        let (t, d, n): (i64, String, i64) = (r.get(0), r.get(1), r.get(2));
        if d == "sentinel" {
            assert_eq!(n, i64::from(PARTITIONS), "sentinel scores");
        } else {
            assert!(
                samples.contains(&(t, d.clone())),
                "unexpected score ({t}, {d})"
            );
            assert_eq!(n, 1, "score of ({t}, {d}) written {n} times");
        }
    }

    // Aggregates: equal to the independent computation.
    let aggs = client
        .query(
            "SELECT (extract(epoch from bucket) * 1000000)::int8, device_id, metric_name, count, sum, min, max, avg FROM device_metrics_1m WHERE metric_name NOT IN ('anomaly_score', 'anomalies')",
            &[],
        )
        .await?;
    assert_eq!(aggs.len(), expected.aggs.len(), "aggregate row count");
    for r in &aggs {
        let key: (i64, String, String) = (r.get(0), r.get(1), r.get(2));
        let want = expected
            .aggs
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected aggregate {key:?}"));
        let (c, s, mn, mx, avg): (i64, f64, f64, f64, f64) =
            (r.get(3), r.get(4), r.get(5), r.get(6), r.get(7));
        assert_eq!(c, want.0, "count of {key:?}");
        assert!(
            (s - want.1).abs() < 1e-6,
            "sum of {key:?}: {s} vs {}",
            want.1
        );
        assert_eq!((mn, mx), (want.2, want.3), "min/max of {key:?}");
        assert!((avg - want.1 / want.0 as f64).abs() < 1e-9);
    }
    let hourly = client
        .query(
            "SELECT (extract(epoch from bucket) * 1000000)::int8, device_id, metric_name, count, sum, min, max FROM device_metrics_1h WHERE metric_name NOT IN ('anomaly_score', 'anomalies')",
            &[],
        )
        .await?;
    assert_eq!(
        hourly.len(),
        expected_hourly.len(),
        "1-hour rollup row count"
    );
    for r in &hourly {
        let key: AggKey = (r.get(0), r.get(1), r.get(2));
        let want = expected_hourly
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected hourly aggregate {key:?}"));
        assert_eq!(r.get::<_, i64>(3), want.0, "hourly count of {key:?}");
        assert!(
            (r.get::<_, f64>(4) - want.1).abs() < 1e-6,
            "hourly sum of {key:?}"
        );
        assert_eq!(
            (r.get::<_, f64>(5), r.get::<_, f64>(6)),
            (want.2, want.3),
            "hourly min/max of {key:?}"
        );
    }

    // Dead letters: every malformed record, with its reason and offset.
    let dead = client
        .query(
            "SELECT partition, \"offset\", reason, error FROM dead_letters",
            &[],
        )
        .await?;
    assert_eq!(dead.len(), expected.dead.len());
    for r in &dead {
        let key: (i32, i64) = (r.get(0), r.get(1));
        let reason: String = r.get(2);
        let error: String = r.get(3);
        assert_eq!(
            Some(&reason.as_str()),
            expected.dead.get(&key),
            "dead letter {key:?}: {error}"
        );
        assert!(error.contains(&format!("offset {}", key.1)), "{error}");
    }

    // Parquet: the same rows as PostgreSQL, none doubled.
    let topic_dir = nas.join(format!("topic={topic}"));
    let mut pq = parquet_rows(&topic_dir)?;
    assert_eq!(pq.len() as i64, valid_points, "parquet row count");
    pq.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let mut pg_rows: Vec<(i64, String, String, f64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    pg_rows.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    assert_eq!(pq, pg_rows);

    // DuckDB and pyarrow read the same files with the same row count.
    let check = format!(
        "import duckdb, pyarrow.dataset as ds\nd = duckdb.connect().execute(\"select count(*) from read_parquet('{0}/**/*.parquet', hive_partitioning=true)\").fetchall()[0][0]\na = ds.dataset('{0}', format='parquet', partitioning='hive').count_rows()\nprint(d, a)\n",
        topic_dir.display()
    );
    let out = std::process::Command::new(&stack.python)
        .arg("-c")
        .arg(&check)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{valid_points} {valid_points}")
    );

    // The SQL endpoint answers over the same files; a bad query is a 400 with the reason.
    let body = http_post(
        &http,
        "/v1/sql",
        r#"{"sql": "SELECT count(*) AS n FROM telemetry_raw"}"#,
    )?;
    let v: serde_json::Value = serde_json::from_str(&body.1)?;
    assert_eq!(body.0, 200, "{}", body.1);
    assert_eq!(v["columns"], json!(["n"]));
    assert_eq!(v["rows"][0][0], json!(valid_points));
    let bad = http_post(
        &http,
        "/v1/sql",
        r#"{"sql": "SELECT nope FROM telemetry_raw"}"#,
    )?;
    assert_eq!(bad.0, 400);
    assert!(bad.1.contains("nope"), "{}", bad.1);

    // Metrics: consumer lag from the client's statistics (every 5 s) reads 0 once everything
    // is read; the event-time watermark and its lag behind the wall clock are exported.
    let caught_up: Vec<String> = (0..PARTITIONS)
        .map(|p| {
            format!("primespark_consumer_lag_records{{topic=\"{topic}\",partition=\"{p}\"}} 0")
        })
        .collect();
    let mut metrics = String::new();
    for _ in 0..60 {
        metrics = http_get(&http, "/metrics")?;
        if caught_up.iter().all(|line| metrics.contains(line.as_str())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for line in &caught_up {
        assert!(
            metrics.contains(line.as_str()),
            "missing {line:?} in\n{metrics}"
        );
    }
    for series in [
        "primespark_watermark_seconds{dataflow=\"telemetry\"",
        "primespark_watermark_lag_seconds{dataflow=\"telemetry\"",
        "primespark_source_records_total{",
        "primespark_windows_closed_total{dataflow=\"telemetry\",operator=\"device_metrics_1m\"}",
    ] {
        assert!(metrics.contains(series), "missing {series:?} in\n{metrics}");
    }

    // Ready: every source assigned, no sink degraded.
    let ready = http_get(&http, "/readyz")?;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains(r#""telemetry":"assigned""#), "{ready}");
    assert!(ready.contains(r#""degraded_sinks":[]"#), "{ready}");

    // A real Prometheus scrapes the running pipeline and finds the key series.
    let prom_dir = work.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir)?;
    let prom_addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: primespark\n    static_configs:\n      - targets: [\"{http}\"]\n"
        ),
    )?;
    let mut prometheus = std::process::Command::new(&stack.prometheus)
        .arg(format!(
            "--config.file={}",
            prom_dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(prom_dir.join("prometheus.log"))?)
        .spawn()?;
    let query = |q: &str| -> Result<serde_json::Value> {
        let out = std::process::Command::new("curl")
            .args(["-s", "--get", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(format!("http://{prom_addr}/api/v1/query"))
            .output()?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
    };
    let mut found = false;
    for _ in 0..120 {
        let up = query("up{job=\"primespark\"}")?;
        let lag = query(&format!(
            "primespark_consumer_lag_records{{topic=\"{topic}\"}}"
        ))?;
        let wm = query("primespark_watermark_lag_seconds{dataflow=\"telemetry\"}")?;
        let consumed = query(&format!(
            "sum(primespark_source_records_total{{topic=\"{topic}\"}})"
        ))?;
        if up["data"]["result"][0]["value"][1] == json!("1")
            && lag["data"]["result"]
                .as_array()
                .is_some_and(|r| r.len() == PARTITIONS as usize)
            && wm["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            && consumed["data"]["result"][0]["value"][1]
                .as_str()
                .is_some_and(|v| v != "0")
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        found,
        "prometheus never saw the key series:\n{}",
        std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default()
    );

    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    Ok(())
}
