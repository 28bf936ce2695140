//! Crash test: while a producer publishes 200k telemetry events, the pipeline is SIGKILLed at
//! random moments ten times and restarted each time. Afterwards the raw table holds exactly
//! the valid events' points (no loss, no duplicates), every valid event has exactly one anomaly
//! score, the aggregates equal those of an uninterrupted run over the same topic, and the
//! Parquet archive holds exactly the valid points and scores.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use primespark_tests::{
    connect, count, create_topic, free_port, fresh_database, parquet_rows, produce, stack, unique,
    wait_until, Pipeline,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const PARTITIONS: i32 = 3;
const EVENTS: usize = 200_000;
const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const METRICS: [&str; 3] = ["cpu_percent", "memory_percent", "load_avg"];

struct Workload {
    records: Vec<(i32, Vec<u8>)>,
    /// Per partition, one sentinel two hours ahead (closes every window), sent last.
    sentinels: Vec<(i32, Vec<u8>)>,
    valid_events: i64,
    dead: i64,
    /// Every (bucket, device, metric) window that must close, scoring metrics included.
    windows: BTreeSet<(i64, String, String)>,
}

fn workload() -> Workload {
    let mut w = Workload {
        records: Vec::with_capacity(EVENTS),
        sentinels: Vec::new(),
        valid_events: 0,
        dead: 0,
        windows: BTreeSet::new(),
    };
    for i in 0..EVENTS {
        let p = (i % PARTITIONS as usize) as i32;
        if i % 97 == 13 {
            w.records
                .push((p, b"{\"device_id\": \"broken\", \"metrics\": {".to_vec()));
            w.dead += 1;
            continue;
        }
        // 10 ms of event time per step of three: ~11 minutes, a dozen 1-minute windows.
        let t = T0_MS + (i / PARTITIONS as usize) as i64 * 10;
        let device = format!("dev-{p}-{}", i % 50);
        let cpu = (i % 100) as f64;
        w.records.push((
            p,
            json!({"device_id": device, "timestamp": t,
                   "metrics": {"cpu_percent": cpu, "memory_percent": 50.0 + (i % 7) as f64,
                               "load_avg": cpu / 25.0}})
            .to_string()
            .into_bytes(),
        ));
        w.valid_events += 1;
        let bucket = t.div_euclid(60_000) * 60_000;
        for m in METRICS.iter().chain(&["anomaly_score", "anomalies"]) {
            w.windows.insert((bucket, device.clone(), (*m).to_owned()));
        }
    }
    for p in 0..PARTITIONS {
        w.sentinels.push((
            p,
            json!({"device_id": "sentinel", "metrics": {"up": 1.0}, "timestamp": T0_MS + 7_200_000})
                .to_string()
                .into_bytes(),
        ));
    }
    w
}

fn config(dir: &Path, brokers: &str, topic: &str, url: &str) -> Result<std::path::PathBuf> {
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 5000\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_rows = 50000\nroll_interval = \"1s\"\n\
             [query]\nhttp_addr = \"127.0.0.1:{}\"\n[runtime]\nworkers = 2\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            dir.join("nas").display(),
            free_port(),
        ),
    )?;
    Ok(path)
}

async fn wait_complete(
    client: &tokio_postgres::Client,
    w: &Workload,
    nas: &Path,
    topic: &str,
    log: &Path,
) -> Result<()> {
    let points = w.valid_events * METRICS.len() as i64 + i64::from(PARTITIONS);
    let scores = w.valid_events + i64::from(PARTITIONS);
    let windows = w.windows.len() as i64;
    let done = wait_until(Duration::from_secs(300), "everything stored", || async {
        Ok(
            count(client, "SELECT count(*) FROM device_metrics").await == points
                && count(client, "SELECT count(*) FROM anomaly_scores").await == scores
                && count(client, "SELECT count(*) FROM dead_letters").await == w.dead
                && count(client, "SELECT count(*) FROM device_metrics_1m").await == windows
                && parquet_rows(&nas.join(format!("topic={topic}"))).unwrap_or(0) == points
                && parquet_rows(&nas.join("table=anomaly_scores")).unwrap_or(0) == scores,
        )
    })
    .await;
    if let Err(e) = done {
        bail!(
            "{e}: raw {} of {points}, scores {} of {scores}, windows {} of {windows}, parquet {} and {}\n{}",
            count(client, "SELECT count(*) FROM device_metrics").await,
            count(client, "SELECT count(*) FROM anomaly_scores").await,
            count(client, "SELECT count(*) FROM device_metrics_1m").await,
            parquet_rows(&nas.join(format!("topic={topic}"))).unwrap_or(0),
            parquet_rows(&nas.join("table=anomaly_scores")).unwrap_or(0),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(())
}

type Windows = BTreeMap<(i64, String, String), (i64, f64, f64, f64)>;

async fn windows(client: &tokio_postgres::Client, table: &str) -> Result<Windows> {
    Ok(client
        .query(
            &format!(
                "SELECT (extract(epoch from bucket) * 1000)::int8, device_id, metric_name, count, sum, min, max FROM {table}"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), (r.get(3), r.get(4), r.get(5), r.get(6))))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_sigkills_while_producing_lose_and_double_nothing() -> Result<()> {
    let stack = stack();
    let w = workload();
    let db = unique("crash");
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, PARTITIONS).await?;
    let crash_url = fresh_database(stack, &db).await?;
    let tmp = tempfile::tempdir()?;
    // PRIMESPARK_KEEP_TEST_DIRS=1 keeps the NAS folders and logs for a post-mortem.
    let (_cleanup, root) = if std::env::var_os("PRIMESPARK_KEEP_TEST_DIRS").is_some() {
        (None, tmp.keep())
    } else {
        let root = tmp.path().to_path_buf();
        (Some(tmp), root)
    };
    let crash_dir = root.join("crash");
    std::fs::create_dir_all(&crash_dir)?;
    let crash_config = config(&crash_dir, &stack.brokers, &topic, &crash_url)?;
    let log = crash_dir.join("pipeline.log");

    // The producer publishes in chunks while the pipeline is killed and restarted.
    let producer = {
        let (records, topic) = (w.records.clone(), topic.clone());
        std::thread::spawn(move || -> Result<()> {
            for chunk in records.chunks(10_000) {
                produce(stack, &topic, chunk)?;
                std::thread::sleep(Duration::from_millis(700));
            }
            Ok(())
        })
    };
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..10 {
        let pipeline = Pipeline::start(&crash_config, &[], &log)?;
        std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
        pipeline.kill()?;
    }
    match producer.join() {
        Ok(r) => r?,
        Err(_) => bail!("producer panicked"),
    }
    produce(stack, &topic, &w.sentinels)?;
    let mut pipeline = Pipeline::start(&crash_config, &[], &log)?;
    let crash = connect(&crash_url).await?;
    wait_complete(&crash, &w, &crash_dir.join("nas"), &topic, &log).await?;
    assert!(pipeline.is_running());

    // The uninterrupted run over the same topic, into its own database and NAS.
    let clean_url = fresh_database(stack, &format!("{db}_clean")).await?;
    let clean_dir = root.join("clean");
    std::fs::create_dir_all(&clean_dir)?;
    let clean_log = clean_dir.join("pipeline.log");
    let clean_pipeline = Pipeline::start(
        &config(&clean_dir, &stack.brokers, &topic, &clean_url)?,
        &[],
        &clean_log,
    )?;
    let clean = connect(&clean_url).await?;
    wait_complete(&clean, &w, &clean_dir.join("nas"), &topic, &clean_log).await?;

    // Raw rows: every point once.
    let distinct = count(
        &crash,
        "SELECT count(*) FROM (SELECT DISTINCT time, device_id, metric_name FROM device_metrics) d",
    )
    .await;
    let points = count(&crash, "SELECT count(*) FROM device_metrics").await;
    // Sentinels share (time, device, metric) across partitions.
    assert_eq!(
        distinct,
        points - i64::from(PARTITIONS) + 1,
        "duplicate raw rows"
    );
    let scored = count(
        &crash,
        "SELECT count(*) FROM (SELECT DISTINCT time, device_id FROM anomaly_scores) d",
    )
    .await;
    assert_eq!(scored, w.valid_events + 1, "duplicate or missing scores");

    // Aggregates: equal to the uninterrupted run's (sums to rounding: partial aggregates
    // merge in another order after a restart).
    for table in ["device_metrics_1m", "device_metrics_1h"] {
        let (a, b) = (windows(&crash, table).await?, windows(&clean, table).await?);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{table} keys"
        );
        for (k, (c, s, mn, mx)) in &a {
            let (c2, s2, mn2, mx2) = b[k];
            assert_eq!((*c, *mn, *mx), (c2, mn2, mx2), "{table} {k:?}");
            assert!(
                (s - s2).abs() <= 1e-9 * s.abs().max(1.0),
                "{table} {k:?}: {s} vs {s2}"
            );
        }
    }
    pipeline.terminate(Duration::from_secs(30))?;
    clean_pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}
