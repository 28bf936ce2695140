//! Crash tests: while a producer publishes telemetry events, the pipeline is SIGKILLed at
//! random moments ten times, or crashed at each of the exactly-once protocol's delicate points
//! (failpoints that end the process there, with `windows.allowed_lateness` above zero and late
//! events that update written windows), and restarted each time. Afterwards the raw table holds
//! exactly the valid events' points (no loss, no duplicates), every valid event has exactly one
//! anomaly score, the aggregates equal those of an uninterrupted run over the same topic, and
//! the Parquet archive holds exactly the valid points and scores.

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
    workload_of(EVENTS, 10, None)
}

/// `events` events, `step_ms` of event time per round of the partitions; with `late_every`,
/// every that many events one comes 20 s late (beyond the 5 s out-of-orderness, within a 30 s
/// allowed lateness: it updates a written window).
fn workload_of(events: usize, step_ms: i64, late_every: Option<usize>) -> Workload {
    let mut w = Workload {
        records: Vec::with_capacity(events),
        sentinels: Vec::new(),
        valid_events: 0,
        dead: 0,
        windows: BTreeSet::new(),
    };
    for i in 0..events {
        let p = (i % PARTITIONS as usize) as i32;
        if i % 97 == 13 {
            w.records
                .push((p, b"{\"device_id\": \"broken\", \"metrics\": {".to_vec()));
            w.dead += 1;
            continue;
        }
        // `step_ms` of event time per step of three (10 ms: ~11 minutes of 200k events).
        let mut t = T0_MS + (i / PARTITIONS as usize) as i64 * step_ms;
        if late_every.is_some_and(|n| i % n == n - 1) && t >= T0_MS + 60_000 {
            // Off the grid of event times: no other event of the device has this time.
            t -= 20_033;
        }
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
    config_with(dir, brokers, topic, url, "")
}

/// The crash tests' configuration with `extra` sections at the end.
fn config_with(
    dir: &Path,
    brokers: &str,
    topic: &str,
    url: &str,
    extra: &str,
) -> Result<std::path::PathBuf> {
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 5000\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_rows = 50000\nroll_interval = \"1s\"\n\
             [query]\nhttp_addr = \"127.0.0.1:{}\"\n[runtime]\nworkers = 2\n\
             [dataflows]\ninference = false\nanalytics = false\n{extra}\n",
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

    let clean_pipeline = same_as_a_clean_run(&crash, &w, &root, &db, &topic, "").await?;
    pipeline.terminate(Duration::from_secs(30))?;
    clean_pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// Runs the same topic uninterrupted (configuration `extra`) into its own database and NAS
/// under `root`, and checks the crashed run's tables (`crash`) against it: every raw row and
/// score once, every window equal. Returns the clean pipeline, still running.
async fn same_as_a_clean_run(
    crash: &tokio_postgres::Client,
    w: &Workload,
    root: &Path,
    db: &str,
    topic: &str,
    extra: &str,
) -> Result<Pipeline> {
    let stack = stack();
    // The uninterrupted run over the same topic, into its own database and NAS.
    let clean_url = fresh_database(stack, &format!("{db}_clean")).await?;
    let clean_dir = root.join("clean");
    std::fs::create_dir_all(&clean_dir)?;
    let clean_log = clean_dir.join("pipeline.log");
    let clean_pipeline = Pipeline::start(
        &config_with(&clean_dir, &stack.brokers, topic, &clean_url, extra)?,
        &[],
        &clean_log,
    )?;
    let clean = connect(&clean_url).await?;
    wait_complete(&clean, w, &clean_dir.join("nas"), topic, &clean_log).await?;

    // Raw rows: every point once.
    let distinct = count(
        crash,
        "SELECT count(*) FROM (SELECT DISTINCT time, device_id, metric_name FROM device_metrics) d",
    )
    .await;
    let points = count(crash, "SELECT count(*) FROM device_metrics").await;
    // Sentinels share (time, device, metric) across partitions.
    assert_eq!(
        distinct,
        points - i64::from(PARTITIONS) + 1,
        "duplicate raw rows"
    );
    let scored = count(
        crash,
        "SELECT count(*) FROM (SELECT DISTINCT time, device_id FROM anomaly_scores) d",
    )
    .await;
    assert_eq!(scored, w.valid_events + 1, "duplicate or missing scores");

    // Aggregates: equal to the uninterrupted run's (sums to rounding: partial aggregates
    // merge in another order after a restart).
    for table in ["device_metrics_1m", "device_metrics_1h"] {
        let (a, b) = (windows(crash, table).await?, windows(&clean, table).await?);
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
    Ok(clean_pipeline)
}

/// Starts the pipeline with the failpoint `point` armed to end the process at its `nth` hit and
/// waits until it has: the crash happened exactly there (a point never hit fails the test).
fn crash_at(config: &Path, log: &Path, point: &str, nth: u32) -> Result<()> {
    let armed = format!("{point}=abort@{nth}");
    let mut pipeline = Pipeline::start(config, &[("PRIMESPARK_FAILPOINTS", armed.as_str())], log)?;
    let started = std::time::Instant::now();
    while pipeline.is_running() {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "failpoint {point} was not hit {nth} times within 120 s\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if !text.contains(&format!("failpoint=\"{point}\""))
        && !text.contains(&format!("failpoint={point}"))
    {
        bail!("the pipeline stopped, but not at {point}\n{text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_the_delicate_points_with_lateness_lose_and_double_nothing() -> Result<()> {
    let stack = stack();
    // 100 ms a round: about 17 minutes of event time, a window closing every few seconds.
    let w = workload_of(30_000, 100, Some(97 * 5));
    let db = unique("fixedcrash");
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, PARTITIONS).await?;
    let crash_url = fresh_database(stack, &db).await?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    let crash_dir = root.join("crash");
    std::fs::create_dir_all(&crash_dir)?;
    let lateness = "[windows]\nallowed_lateness = \"30s\"\n";
    let crash_config = config_with(&crash_dir, &stack.brokers, &topic, &crash_url, lateness)?;
    // Each run crashes at one point, then the next chunk of records arrives.
    let points = [
        ("archive.roll_published", 2),
        ("archive.roll_half_renamed", 2),
        ("postgres.raw_before_commit", 3),
        ("aggregates.files_written", 1),
        ("kafka.dlq_published", 2),
    ];
    let chunks: Vec<&[(i32, Vec<u8>)]> = w
        .records
        .chunks(w.records.len() / points.len() + 1)
        .collect();
    for (i, (point, nth)) in points.iter().enumerate() {
        let log = crash_dir.join(format!("crash-{i}.log"));
        produce(stack, &topic, chunks.get(i).copied().unwrap_or_default())?;
        crash_at(&crash_config, &log, point, *nth)?;
    }
    // The sentinels make the first hour final: the compaction publishes its file, and the
    // crash comes before the minute files are removed.
    produce(stack, &topic, &w.sentinels)?;
    let log = crash_dir.join("pipeline.log");
    crash_at(&crash_config, &log, "compact.published", 1)?;
    let mut pipeline = Pipeline::start(&crash_config, &[], &log)?;
    let crash = connect(&crash_url).await?;
    wait_complete(&crash, &w, &crash_dir.join("nas"), &topic, &log).await?;
    assert!(pipeline.is_running());
    let clean_pipeline = same_as_a_clean_run(&crash, &w, &root, &db, &topic, lateness).await?;
    pipeline.terminate(Duration::from_secs(30))?;
    clean_pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}
