//! Backfill from the archive: a live run writes telemetry (with late events and anomaly scores),
//! inference and analytics events to PostgreSQL and the Parquet archive; half of the raw files
//! are then moved to the bucket. `primespark backfill --from all` into an empty database
//! reproduces every raw and aggregate table of the live run; run again it changes nothing; a
//! range backfill repairs damaged rows inside its range only; `--from nas` reads the NAS alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, Utc};
use primespark_dataflows::fleet::Fleet;
use primespark_tests::{
    connect, create_topic, curl, free_port, fresh_database, pipeline_command, produce, stack,
    unique, wait_until, Pipeline, Stack,
};
use serde_json::json;

/// 2025-11-05T14:50:00Z: the events cross the 15:00 hour.
const T0_MS: i64 = 1_762_354_200_000;
/// Windows from here on hold the sentinels (which the live run never closes).
const CUT_MS: i64 = T0_MS + 70 * 60_000; // 16:00
const PARTITIONS: i32 = 3;
/// The last minute with events (12,000 steps of 165 ms from T0).
const LAST_EVENT_MS: i64 = T0_MS + 33 * 60_000;

/// (table, key columns, numeric value columns) compared between runs.
const TABLES: &[(&str, &str, &str)] = &[
    ("device_metrics", "time, device_id, metric_name", "value"),
    ("anomaly_scores", "time, device_id, model, anomaly, backend", "score"),
    ("anomalies", "time, device_id, model, features", "score, threshold"),
    ("late_events", "partition, \"offset\", event_time", "late_by_ms"),
    ("ai_inference_results", "time, model_name, source, status, device_id, request_id, routing_strategy, fallback, input_tokens, output_tokens", "latency_ms"),
    ("analytics_events", "time, event_type, task_id, task_type, priority, agent_id, endpoint, user_id, data", "0"),
    ("device_metrics_1m", "bucket, device_id, metric_name, count", "sum, min, max, avg"),
    ("device_metrics_1h", "bucket, device_id, metric_name, count", "sum, min, max, avg"),
    ("inference_stats_1m", "bucket, model_name, source, count, errors", "latency_p50_ms, latency_p95_ms, latency_p99_ms, avg_input_tokens, avg_output_tokens, output_tokens_per_s"),
    ("inference_stats_1h", "bucket, model_name, source, count, errors", "latency_p50_ms, latency_p95_ms, latency_p99_ms, avg_input_tokens, avg_output_tokens, output_tokens_per_s"),
    ("routing_stats_1m", "bucket, routing_strategy, edge_requests, cloud_requests", "edge_share, cloud_fallback_rate, edge_success_rate, cloud_success_rate, edge_p95_ms, cloud_p95_ms"),
    ("routing_stats_1h", "bucket, routing_strategy, edge_requests, cloud_requests", "edge_share, cloud_fallback_rate, edge_success_rate, cloud_success_rate, edge_p95_ms, cloud_p95_ms"),
    ("task_stats_1m", "bucket, task_type, created, assigned, started, completed, failed, backlog", "wait_p50_ms, wait_p95_ms, run_p50_ms, run_p95_ms"),
    ("task_stats_1h", "bucket, task_type, created, assigned, started, completed, failed, backlog", "wait_p50_ms, wait_p95_ms, run_p50_ms, run_p95_ms"),
    ("agent_load_1m", "bucket, agent_id, assigned, completed, failed, active", "0"),
    ("agent_load_1h", "bucket, agent_id, assigned, completed, failed, active", "0"),
    ("api_events_1m", "bucket, event_type, endpoint, count, distinct_users, anonymous", "0"),
    ("api_events_1h", "bucket, event_type, endpoint, count, distinct_users, anonymous", "0"),
];

/// key -> the value rows under it (sorted).
type Table = BTreeMap<String, Vec<Vec<Option<f64>>>>;

async fn table(
    client: &tokio_postgres::Client,
    name: &str,
    keys: &str,
    values: &str,
) -> Result<Table> {
    let key_expr = keys
        .split(", ")
        .map(|k| format!("coalesce({k}::text, '∅')"))
        .collect::<Vec<_>>()
        .join(", ");
    // Aggregates: only windows the live run closed (the sentinels' are still open there).
    let filter = if keys.starts_with("bucket") {
        // Task backlog and agent activity are sampled at every minute's end while the
        // watermark moves; after the archive's last event a backfill's watermark jumps to the
        // end, so samples of minutes without events are compared up to the last event only
        // (ARCHITECTURE.md, backfill limits).
        let cut = if name.starts_with("task_stats") || name.starts_with("agent_load") {
            if name.ends_with("_1h") {
                T0_MS + 10 * 60_000
            } else {
                LAST_EVENT_MS
            }
        } else {
            CUT_MS
        };
        format!("WHERE bucket < to_timestamp({})", cut / 1000)
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT concat_ws('|', {key_expr}), ARRAY[{values}]::float8[] FROM {name} {filter}"
    );
    let mut out = Table::new();
    for row in client
        .query(sql.as_str(), &[])
        .await
        .with_context(|| sql.clone())?
    {
        out.entry(row.get(0)).or_default().push(row.get(1));
    }
    for rows in out.values_mut() {
        rows.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    }
    Ok(out)
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        (None, None) => true,
        _ => false,
    }
}

/// Every table of `b` equals `a`'s (floats to 1e-9: sums are added in another order).
async fn same_tables(
    a: &tokio_postgres::Client,
    b: &tokio_postgres::Client,
    what: &str,
) -> Result<()> {
    for (name, keys, values) in TABLES {
        let (ta, tb) = (
            table(a, name, keys, values).await?,
            table(b, name, keys, values).await?,
        );
        let rows = |t: &Table| t.values().map(Vec::len).sum::<usize>();
        ensure!(
            rows(&ta) == rows(&tb),
            "{what}: {name} has {} rows, the live run {}",
            rows(&tb),
            rows(&ta)
        );
        for (key, va) in &ta {
            let vb = tb
                .get(key)
                .with_context(|| format!("{what}: {name} lacks {key}"))?;
            ensure!(
                va.len() == vb.len(),
                "{what}: {name} {key}: {} rows vs {}",
                vb.len(),
                va.len()
            );
            for (ra, rb) in va.iter().zip(vb) {
                ensure!(
                    ra.len() == rb.len() && ra.iter().zip(rb).all(|(x, y)| close(*x, *y)),
                    "{what}: {name} {key}: {rb:?}, the live run {ra:?}"
                );
            }
        }
    }
    Ok(())
}

fn partition_of(key: &str) -> i32 {
    (key.bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % PARTITIONS as u32) as i32
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

/// (partition, payload) of one topic, in produce order.
type Records = Vec<(i32, Vec<u8>)>;

struct Topics {
    telemetry: String,
    inference: String,
    events: String,
}

/// About 33 minutes of each stream; every 40th telemetry event 3 minutes behind (late), a few
/// malformed; one sentinel per partition two hours ahead closes every window.
fn workload(topics: &Topics) -> Vec<(String, Records)> {
    let mut fleet = Fleet::new(40, 0.01, 42);
    let (mut telemetry, mut inference, mut events) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..12_000i64 {
        let t = T0_MS + i * 165;
        let behind = if i % 40 == 7 { 180_000 } else { 0 };
        let (key, payload) = fleet.next_event(at(t - behind));
        telemetry.push((partition_of(&key), payload));
        if i % 4 == 0 {
            let (key, payload) = fleet.next_inference(at(t));
            inference.push((partition_of(&key), payload));
            let (key, payload) = fleet.next_analytics(at(t));
            events.push((partition_of(&key), payload));
        }
    }
    let sentinel = T0_MS + 2 * 3_600_000;
    for p in 0..PARTITIONS {
        telemetry.push((
            p,
            json!({"device_id": "sentinel", "metrics": {"up": 1.0}, "timestamp": sentinel})
                .to_string()
                .into_bytes(),
        ));
        inference.push((p, json!({"model": "sentinel", "prompt_length": 1, "response_length": 1, "latency_ms": 1.0,
            "source": "edge", "status": "ok", "timestamp": sentinel}).to_string().into_bytes()));
        events.push((
            p,
            json!({"event_type": "sentinel", "endpoint": "/", "timestamp": sentinel})
                .to_string()
                .into_bytes(),
        ));
    }
    vec![
        (topics.telemetry.clone(), telemetry),
        (topics.inference.clone(), inference),
        (topics.events.clone(), events),
    ]
}

fn write_config(
    path: &Path,
    stack: &Stack,
    topics: &Topics,
    url: &str,
    nas: &Path,
    bucket: &str,
) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{}\"\ninference = \"{}\"\nevents = \"{}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 2000\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_rows = 1500\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             [windows]\nmax_out_of_orderness = \"30s\"\n[runtime]\nworkers = 2\n\
             [s3]\nenabled = true\nbucket = \"{bucket}\"\nprefix = \"archive\"\nendpoint = \"{}\"\nallow_http = true\n\
             [tier]\nafter = \"365d\"\n",
            stack.brokers,
            topics.telemetry,
            topics.inference,
            topics.events,
            nas.display(),
            free_port(),
            stack.s3_endpoint,
        ),
    )?;
    Ok(())
}

async fn sum(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// `primespark backfill --config <config> <args>`; its exit status and log. A backfill still
/// running after four minutes is ended with SIGINT (it stops as interrupted and says so in its
/// log) so that a stuck one fails the test instead of hanging the suite.
fn backfill(config: &Path, args: &[&str]) -> Result<(bool, String)> {
    let child = pipeline_command()?
        .arg("backfill")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        // Disconnected means it exited: only a timeout sends the signal.
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            done_rx.recv_timeout(Duration::from_secs(240))
        {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
    });
    let out = child.wait_with_output()?;
    drop(done_tx);
    let _ = watchdog.join();
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Moves every other raw file of the archive to the bucket (as tiering would).
fn move_half_to_bucket(stack: &Stack, nas: &Path, bucket: &str) -> Result<usize> {
    let mut files = Vec::new();
    let mut dirs = vec![nas.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet")
                && path.to_string_lossy().contains("topic=")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    let half: Vec<String> = files
        .iter()
        .step_by(2)
        .map(|p| Ok(p.strip_prefix(nas)?.to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    // boto3 signs the uploads (moto refuses unsigned PUTs with a body).
    let script = "import boto3, sys\n\
        s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n\
        for rel in sys.argv[4:]:\n    s3.upload_file(sys.argv[3] + '/' + rel, sys.argv[2], 'archive/' + rel)\n";
    let out = std::process::Command::new(&stack.python)
        .arg("-c")
        .arg(script)
        .arg(&stack.s3_endpoint)
        .arg(bucket)
        .arg(nas)
        .args(&half)
        .output()?;
    ensure!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rel in &half {
        std::fs::remove_file(nas.join(rel))?;
    }
    let moved = half.len();
    Ok(moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_from_the_archive_reproduces_the_live_tables() -> Result<()> {
    let stack = stack();
    let db = unique("backfill");
    let live_url = fresh_database(stack, &db).await?;
    let topics = Topics {
        telemetry: format!("edge.telemetry.{db}"),
        inference: format!("edge.ai.inference.{db}"),
        events: format!("analytics.events.{db}"),
    };
    for t in [&topics.telemetry, &topics.inference, &topics.events] {
        create_topic(stack, t, PARTITIONS).await?;
    }
    let bucket = db.replace('_', "-");
    curl(&["-X", "PUT", &format!("{}/{bucket}", stack.s3_endpoint)])?;
    let work = tempfile::tempdir()?;
    let nas = work.path().join("nas");
    let live_config = work.path().join("live.toml");
    write_config(&live_config, stack, &topics, &live_url, &nas, &bucket)?;

    let log = work.path().join("live.log");
    let pipeline = Pipeline::start(&live_config, &[], &log)?;
    let workload = workload(&topics);
    let total: i64 = workload.iter().map(|(_, r)| r.len() as i64).sum();
    for (topic, records) in &workload {
        produce(stack, topic, records)?;
    }
    let live = connect(&live_url).await?;
    let done = wait_until(Duration::from_secs(240), "the live run stored everything", || async {
        let stored = |sink: &str| {
            format!("SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = '{sink}'")
        };
        let committed = sum(
            &live,
            &format!("SELECT count(*) FROM dataflow_state WHERE committed_watermark_us >= {}", CUT_MS * 1000),
        )
        .await;
        Ok(sum(&live, &stored("postgres_raw")).await == total
            && sum(&live, &stored("parquet_raw")).await == total
            && committed == 3)
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    pipeline.terminate(Duration::from_secs(60))?;
    let late = sum(&live, "SELECT count(*) FROM late_events").await;
    ensure!(late > 50, "the workload has late events ({late})");
    ensure!(
        sum(&live, "SELECT count(*) FROM anomaly_scores").await > 10_000,
        "scores stored"
    );

    let moved = move_half_to_bucket(stack, &nas, &bucket)?;
    ensure!(moved > 5, "only {moved} files moved to the bucket");

    // Into an empty database, from both copies of the archive.
    let rebuilt_url = fresh_database(stack, &unique("backfilled")).await?;
    let rebuilt_config = work.path().join("rebuilt.toml");
    write_config(&rebuilt_config, stack, &topics, &rebuilt_url, &nas, &bucket)?;
    let (ok, out) = backfill(&rebuilt_config, &["--from", "all"])?;
    ensure!(ok, "backfill failed:\n{out}");
    let rebuilt = connect(&rebuilt_url).await?;
    same_tables(&live, &rebuilt, "backfill --from all").await?;
    // Only where a streaming run's raw rows start on this new database: the archive's end.
    ensure!(
        sum(
            &rebuilt,
            "SELECT count(*) FROM source_offsets WHERE sink <> 'postgres_raw'"
        )
        .await
            == 0
            && sum(&rebuilt, "SELECT count(*) FROM dataflow_state").await == 0,
        "a backfill stores no resume offsets but the raw positions it reached"
    );
    ensure!(
        sum(
            &rebuilt,
            "SELECT count(*) FROM source_offsets WHERE sink = 'postgres_raw'"
        )
        .await
            > 0,
        "a backfill into a new database seeds the raw positions"
    );

    // Again: idempotent.
    let (ok, out) = backfill(&rebuilt_config, &["--from", "all"])?;
    ensure!(ok, "second backfill failed:\n{out}");
    same_tables(&live, &rebuilt, "second backfill").await?;

    // Damage inside 15:00..15:10 and outside it; a range backfill repairs the inside only.
    rebuilt
        .batch_execute(
            "DELETE FROM device_metrics WHERE time >= '2025-11-05T15:00:00Z' AND time < '2025-11-05T15:10:00Z' AND metric_name = 'cpu_percent';
             UPDATE device_metrics_1m SET sum = -1 WHERE bucket >= '2025-11-05T15:00:00Z' AND bucket < '2025-11-05T15:10:00Z';
             DELETE FROM ai_inference_results WHERE time >= '2025-11-05T15:02:00Z' AND time < '2025-11-05T15:03:00Z';
             UPDATE device_metrics_1m SET sum = -2 WHERE bucket = '2025-11-05T14:55:00Z';",
        )
        .await?;
    let (ok, out) = backfill(
        &rebuilt_config,
        &[
            "--from",
            "all",
            "--since",
            "2025-11-05T15:00:00Z",
            "--until",
            "2025-11-05T15:10:00Z",
        ],
    )?;
    ensure!(ok, "range backfill failed:\n{out}");
    let outside = sum(
        &rebuilt,
        "SELECT count(*) FROM device_metrics_1m WHERE sum = -2",
    )
    .await;
    ensure!(
        outside > 0,
        "the range backfill touched a window outside its range"
    );
    // Put the outside window back from the live run, then everything must match again.
    for row in live
            .query("SELECT device_id, metric_name, sum FROM device_metrics_1m WHERE bucket = '2025-11-05T14:55:00Z'", &[])
            .await?
        {
            let (d, m, s): (String, String, f64) = (row.get(0), row.get(1), row.get(2));
            rebuilt
                .execute(
                    "UPDATE device_metrics_1m SET sum = $3 WHERE bucket = '2025-11-05T14:55:00Z' AND device_id = $1 AND metric_name = $2",
                    &[&d, &m, &s],
                )
                .await?;
        }
    same_tables(&live, &rebuilt, "range backfill").await?;

    // The NAS alone holds about half of the raw rows.
    let nas_url = fresh_database(stack, &unique("backfillnas")).await?;
    let nas_config = work.path().join("nas.toml");
    write_config(&nas_config, stack, &topics, &nas_url, &nas, &bucket)?;
    let (ok, out) = backfill(&nas_config, &["--from", "nas"])?;
    ensure!(ok, "backfill --from nas failed:\n{out}");
    let nas_db = connect(&nas_url).await?;
    let (all_rows, nas_rows) = (
        sum(&live, "SELECT count(*) FROM device_metrics").await,
        sum(&nas_db, "SELECT count(*) FROM device_metrics").await,
    );
    ensure!(
        nas_rows > 0 && nas_rows < all_rows,
        "--from nas rebuilt {nas_rows} of {all_rows} rows"
    );

    // Bad arguments are refused with the key or flag named.
    let (ok, out) = backfill(&nas_config, &["--since", "yesterday"])?;
    ensure!(!ok && out.contains("RFC 3339"), "{out}");
    Ok(())
}
