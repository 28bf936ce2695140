//! Every sink of the registry through the compliance suite (`primespark_tests::compliance`),
//! against the real service it writes to: PostgreSQL's raw rows and the dead-letter topic on
//! the stack's broker, the archive on a NAS folder and straight to the stack's S3 server.
//! The aggregate sinks have a suite of their own below: resume after commit, idempotent
//! rewrites, shutdown.
//!
//! The suites arm process-wide failpoints, so they run one at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use primespark_connectors::kafka::KafkaConfig;
use primespark_connectors::nas::NasConfig;
use primespark_connectors::postgres::PostgresConfig;
use primespark_connectors::s3::S3Config;
use primespark_connectors::sink::registry::{self, SinkContext, SinkSettings};
use primespark_connectors::sink::Flush;
use primespark_schemas::flow::AggCommit;
use primespark_schemas::rows::{Agg, AggRow, MetricAggRow, PartitionOffset, Rollup};
use primespark_schemas::streams::StreamKind;
use primespark_tests::compliance::{
    run_sink_compliance, Guarantee, ReadBack, SinkUnderTest, Takes,
};
use primespark_tests::{connect, create_topic, curl, fresh_database, stack, unique};

/// One suite at a time: failpoints are process-wide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Settings with a fresh, migrated database and NAS folder; rolls only at shutdown.
async fn settings(name: &str, nas: &Path) -> Result<SinkSettings> {
    let stack = stack();
    let url = fresh_database(stack, name).await?;
    let mut client = primespark_connectors::postgres::connect(&url).await?;
    primespark_connectors::postgres::migrate(&mut client).await?;
    Ok(SinkSettings {
        postgres: Some(PostgresConfig {
            url,
            ..PostgresConfig::default()
        }),
        nas: Some(NasConfig {
            path: nas.to_owned(),
            roll_interval: std::time::Duration::from_secs(3600),
            ..NasConfig::default()
        }),
        s3: None,
        tier_after: std::time::Duration::from_secs(3600),
        kafka: KafkaConfig {
            brokers: stack.brokers.clone(),
            dead_letter_topics: false,
            ..KafkaConfig::default()
        },
        allowed_lateness_us: 0,
        routes: Vec::new(),
    })
}

/// Rows in `device_metrics` (their position from device and value, see below) and letters of
/// `topic`.
fn postgres_rows(url: String, topic: String) -> ReadBack {
    Box::new(move || {
        let (url, topic) = (url.clone(), topic.clone());
        Box::pin(async move {
            let client = connect(&url).await?;
            let mut out = Vec::new();
            for row in client
                .query("SELECT device_id, value FROM device_metrics", &[])
                .await?
            {
                let device: String = row.get(0);
                let value: f64 = row.get(1);
                // `pi-<partition>` with value = offset, or (the backpressure step, whose
                // values must be valid percentages) `pi-<partition>-<offset / 100>` with
                // value = offset % 100.
                let id = device.trim_start_matches("pi-");
                let (partition, hundreds) = match id.split_once('-') {
                    Some((p, h)) => (p.parse()?, h.parse::<i64>()?),
                    None => (id.parse()?, 0),
                };
                out.push((partition, hundreds * 100 + value as i64));
            }
            for row in client
                .query(
                    "SELECT partition, \"offset\" FROM dead_letters WHERE topic = $1",
                    &[&topic],
                )
                .await?
            {
                out.push((row.get(0), row.get(1)));
            }
            Ok(out)
        })
    })
}

/// The positions of the raw rows in Parquet `bytes`.
fn positions(bytes: bytes::Bytes, location: &str) -> Result<Vec<(i32, i64)>> {
    Ok(
        primespark_connectors::archive::rows_from_parquet(bytes, location)?
            .iter()
            .map(|r| r.position())
            .collect(),
    )
}

/// Rows of every finished Parquet file under `dir`.
fn nas_rows(dir: PathBuf) -> ReadBack {
    Box::new(move || {
        let dir = dir.clone();
        Box::pin(async move {
            let mut out = Vec::new();
            let mut stack = vec![dir];
            while let Some(d) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&d) else {
                    continue;
                };
                for e in entries.flatten() {
                    let path = e.path();
                    let name = e.file_name().to_string_lossy().into_owned();
                    if path.is_dir() {
                        stack.push(path);
                    } else if name.ends_with(".parquet") && !name.starts_with('.') {
                        let bytes = bytes::Bytes::from(std::fs::read(&path)?);
                        out.extend(positions(bytes, &path.display().to_string())?);
                    }
                }
            }
            Ok(out)
        })
    })
}

/// Rows of every raw object under the bucket's prefix.
fn bucket_rows(config: S3Config, topic: String) -> ReadBack {
    Box::new(move || {
        let (config, topic) = (config.clone(), topic.clone());
        Box::pin(async move {
            let store = primespark_connectors::s3::bucket(&config)?;
            let prefix = object_store::path::Path::from(format!("{}/topic={topic}", config.prefix));
            let listed: Vec<_> = store.list(Some(&prefix)).collect().await;
            let mut out = Vec::new();
            for meta in listed {
                let meta = meta?;
                let bytes = store.get(&meta.location).await?.bytes().await?;
                out.extend(positions(bytes, meta.location.as_ref())?);
            }
            Ok(out)
        })
    })
}

/// The letters on `<topic>.dlq`, from the beginning, by their key `<partition>:<offset>`.
fn dlq_letters(brokers: String, topic: String) -> ReadBack {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    Box::new(move || {
        let (brokers, topic) = (brokers.clone(), topic.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || -> Result<Vec<(i32, i64)>> {
                let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", unique("dlq-reader"))
                    .set("enable.auto.commit", "false")
                    .create()?;
                let mut tpl = rdkafka::TopicPartitionList::new();
                let dlq = format!("{topic}.dlq");
                for p in [0, 1] {
                    tpl.add_partition_offset(&dlq, p, rdkafka::Offset::Beginning)?;
                }
                consumer.assign(&tpl)?;
                let mut out = Vec::new();
                let mut idle = std::time::Instant::now();
                while idle.elapsed() < std::time::Duration::from_secs(3) {
                    if let Some(msg) = consumer.poll(std::time::Duration::from_millis(200)) {
                        let msg = msg?;
                        let key =
                            String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
                        let (p, o) = key.split_once(':').context("letter key")?;
                        out.push((p.parse()?, o.parse()?));
                        idle = std::time::Instant::now();
                    }
                }
                Ok(out)
            })
            .await?
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_raw_rows_comply() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let name = unique("comply_pg");
    let work = tempfile::tempdir()?;
    let settings = settings(&name, work.path()).await?;
    let url = settings
        .postgres
        .as_ref()
        .map(|p| p.url.clone())
        .unwrap_or_default();
    let topic = format!("edge.telemetry.{name}");
    run_sink_compliance(&SinkUnderTest {
        kind: &primespark_connectors::postgres::RAW_ROWS,
        settings,
        topic: topic.clone(),
        read_back: postgres_rows(url, topic),
        guarantee: Guarantee::ExactlyOnce,
        takes: Takes::RowsAndLetters,
        stores_positions: true,
        crash_point: "postgres.raw_before_commit",
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nas_archive_complies() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let name = unique("comply_nas");
    let work = tempfile::tempdir()?;
    let settings = settings(&name, work.path()).await?;
    let topic = format!("edge.telemetry.{name}");
    run_sink_compliance(&SinkUnderTest {
        kind: &primespark_connectors::nas::RAW_ROLLS,
        settings,
        topic: topic.clone(),
        read_back: nas_rows(work.path().join(format!("topic={topic}"))),
        guarantee: Guarantee::ExactlyOnce,
        takes: Takes::Rows,
        stores_positions: true,
        crash_point: "archive.roll_published",
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_bucket_archive_complies() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let stack = stack();
    let name = unique("comply_s3");
    let work = tempfile::tempdir()?;
    let mut settings = settings(&name, work.path()).await?;
    let bucket = name.replace('_', "-");
    curl(&["-X", "PUT", &format!("{}/{bucket}", stack.s3_endpoint)])?;
    let s3 = S3Config {
        enabled: true,
        direct: true,
        bucket,
        prefix: "archive".into(),
        endpoint: Some(stack.s3_endpoint.clone()),
        allow_http: true,
        ..S3Config::default()
    };
    settings.s3 = Some(s3.clone());
    let topic = format!("edge.telemetry.{name}");
    run_sink_compliance(&SinkUnderTest {
        kind: &primespark_connectors::s3::DIRECT_ROLLS,
        settings,
        topic: topic.clone(),
        read_back: bucket_rows(s3, topic),
        guarantee: Guarantee::ExactlyOnce,
        takes: Takes::Rows,
        stores_positions: true,
        crash_point: "archive.roll_published",
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topic_complies() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let stack = stack();
    let name = unique("comply_dlq");
    let work = tempfile::tempdir()?;
    let mut settings = settings(&name, work.path()).await?;
    settings.kafka.dead_letter_topics = true;
    let topic = format!("edge.telemetry.{name}");
    create_topic(stack, &topic, 2).await?;
    run_sink_compliance(&SinkUnderTest {
        kind: &primespark_connectors::kafka::DEAD_LETTER_TOPIC,
        settings,
        topic: topic.clone(),
        read_back: dlq_letters(stack.brokers.clone(), topic),
        // Published before the letters' store commits: repeats carry the same key.
        guarantee: Guarantee::AtLeastOnce,
        takes: Takes::Letters,
        // It resumes where the letters' store does, which this suite does not move.
        stores_positions: false,
        crash_point: "kafka.dlq_published",
    })
    .await
}

fn window(device: &str, bucket_us: i64, count: i64) -> AggRow {
    AggRow {
        rollup: Rollup::Minute,
        row: Agg::Metrics(MetricAggRow {
            bucket_us,
            device_id: device.into(),
            metric_name: "cpu_percent".into(),
            count,
            sum: count as f64,
            min: 1.0,
            max: 1.0,
        }),
    }
}

/// The aggregate sinks: a commit is durable with its checkpoint (a rebuilt sink resumes at its
/// positions), the same commit again changes nothing (a replay), and everything written is
/// there after the runtime's shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_sinks_comply() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let name = unique("comply_agg");
    let work = tempfile::tempdir()?;
    let settings = settings(&name, work.path()).await?;
    let url = settings
        .postgres
        .as_ref()
        .map(|p| p.url.clone())
        .unwrap_or_default();
    let stream = StreamKind::Telemetry.def();
    let topic = format!("edge.telemetry.{name}");
    let ctx = |stored| SinkContext {
        stream,
        topic: topic.clone(),
        worker: 0,
        partitions: vec![0, 1],
        topic_partitions: 2,
        stored: Arc::new(stored),
        backfill: None,
        fence: primespark_connectors::sink::fence::Fence::unfenced(),
    };
    let t0 = 1_762_351_200_000_000i64;
    let commit = AggCommit {
        rows: vec![window("pi-0", t0, 3), window("pi-1", t0, 5)],
        checkpoint: primespark_schemas::flow::Checkpoint {
            committed_watermark_us: u64::try_from(t0 + 60_000_000).unwrap_or(0),
            partitions: vec![
                PartitionOffset {
                    partition: 0,
                    next_offset: 17,
                    max_event_us: t0 + 59_000_000,
                },
                PartitionOffset {
                    partition: 1,
                    next_offset: 4,
                    max_event_us: t0 + 58_000_000,
                },
            ],
        },
    };
    let (stored, _) = registry::stored_state(&settings, stream, &topic).await?;
    let built = registry::aggregate_sinks(&settings, &ctx(stored)).await?;
    let mut names = Vec::new();
    for (mut sink, health) in built {
        health.await?;
        names.push(sink.name());
        assert!(
            sink.resume(0).is_none(),
            "{}: fresh sink resumes",
            sink.name()
        );
        // The commit, then the same commit again (a replay after a crash before the next).
        for _ in 0..2 {
            sink.write(&commit).await?;
            sink.commit(Flush::Due).await?;
        }
        sink.commit(Flush::All).await?;
    }
    assert_eq!(names, ["aggregate_files", "aggregates"]);
    let client = connect(&url).await?;
    let rows: Vec<(String, i64)> = client
        .query(
            "SELECT device_id, count FROM device_metrics_1m ORDER BY device_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        [("pi-0".to_owned(), 3), ("pi-1".to_owned(), 5)],
        "one row per window"
    );
    let files =
        primespark_tests::count_files(&work.path().join("table=device_metrics_1m"), "parquet");
    assert_eq!(files, 1, "one file per bucket, rewritten in place");
    let (stored, _) = registry::stored_state(&settings, stream, &topic).await?;
    let rebuilt = registry::aggregate_sinks(&settings, &ctx(stored)).await?;
    let resumes: HashMap<&str, Option<i64>> = rebuilt
        .iter()
        .map(|(s, _)| (s.name(), s.resume(0).map(|r| r.next_offset)))
        .collect();
    assert_eq!(
        resumes["aggregates"],
        Some(17),
        "PostgreSQL stores the windows' position"
    );
    assert_eq!(resumes["aggregate_files"], None, "the files store none");
    assert!(rebuilt.iter().any(|(s, _)| s.stores_positions()));
    Ok(())
}
