//! The broker restarted mid-stream: the stack's `kafka_durable` Tansu (its log lives in the S3
//! server, so topics, records and offsets survive) is stopped for 15 s while the pipeline is
//! working through a backlog and producers keep publishing into their client queues, then
//! started again. The pipeline must keep running, report its sources degraded (metric and
//! `/readyz`), hold its memory, and once the broker is back store every valid event exactly
//! once and every malformed one as a dead letter, without a restart of its own.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use primespark_tests::{
    connect, create_topic_on, free_port, fresh_database, http_get, produce_to, stack,
    stack_service, unique, wait_until, Pipeline,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;
const EVENTS: usize = 60_000;
const PARTITIONS: i32 = 2;

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Every 100th event is not JSON.
fn records() -> Vec<(i32, Vec<u8>)> {
    (0..EVENTS)
        .map(|i| {
            let payload = if i % 100 == 99 {
                format!("not json {i}").into_bytes()
            } else {
                json!({"device_id": format!("pi-{}", i % 20), "timestamp": T0_MS + (i / 2) as i64 * 10,
                       "metrics": {"cpu_percent": (i % 100) as f64, "load_avg": 1.0}})
                .to_string()
                .into_bytes()
            };
            ((i as i32) % PARTITIONS, payload)
        })
        .collect()
}

/// Distinct `<partition>:<offset>` keys on the dead-letter topic.
fn dlq_keys(brokers: &str, dlq: &str, want: usize) -> Result<BTreeSet<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "broker-restart-test")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(dlq, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut keys = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while keys.len() < want && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg?;
            keys.insert(String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned());
        }
    }
    Ok(keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing_and_recovers_by_itself() -> Result<()> {
    let stack = stack();
    // A fresh broker: an earlier test may have restarted the S3 server under it.
    stack_service("stop-service", "kafka_durable")?;
    stack_service("start-service", "kafka_durable")?;
    let brokers = stack.durable_brokers.clone();
    let db = unique("brokerrestart");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic_on(&brokers, &topic, PARTITIONS).await?;
    create_topic_on(&brokers, &format!("{topic}.dlq"), PARTITIONS).await?;
    let work = tempfile::tempdir()?;
    let http = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("pipeline.toml");
    // Short reconnect backoff so the test does not wait on librdkafka's 10 s default maximum.
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [kafka.properties]\n\"reconnect.backoff.max.ms\" = \"1000\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 2000\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"{http}\"\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            work.path().join("nas").display(),
        ),
    )?;
    let records = records();
    let malformed = records
        .iter()
        .filter(|(_, p)| p.starts_with(b"not json"))
        .count();
    let valid = EVENTS - malformed;

    // The first half is on the broker before the pipeline starts: a backlog it is still
    // working through when the broker goes away.
    produce_to(
        &brokers,
        &topic,
        &records[..EVENTS / 2],
        Duration::from_secs(30),
    )?;
    let log = work.path().join("pipeline.log");
    let mut pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    wait_until(Duration::from_secs(60), "first rows", || async {
        Ok(client
            .query_one("SELECT count(*) FROM device_metrics", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            > 0)
    })
    .await?;

    stack_service("stop-service", "kafka_durable")?;
    let down_at = Instant::now();
    // Producers keep publishing; their client queues the records until the broker is back.
    let rest = records[EVENTS / 2..].to_vec();
    let (b, t) = (brokers.clone(), topic.clone());
    let producer = std::thread::spawn(move || produce_to(&b, &t, &rest, Duration::from_secs(120)));
    let mut degraded_seen = false;
    let mut not_ready_seen = false;
    let mut peak_rss: f64 = 0.0;
    while down_at.elapsed() < Duration::from_secs(15) {
        assert!(
            pipeline.is_running(),
            "the pipeline exited while the broker was down"
        );
        peak_rss = peak_rss.max(rss_mb(pipeline.pid()));
        if let Ok(m) = http_get(&http, "/metrics") {
            degraded_seen |= m
                .lines()
                .any(|l| l.starts_with("primespark_source_degraded{") && l.ends_with(" 1"));
        }
        if let Ok(r) = http_get(&http, "/readyz") {
            not_ready_seen |= r.starts_with("HTTP/1.1 503") && r.contains("kafka-source");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stack_service("start-service", "kafka_durable")?;
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))?
        .context("publishing across the restart")?;
    assert!(
        degraded_seen,
        "no source reported degraded while the broker was down"
    );
    assert!(
        not_ready_seen,
        "/readyz did not name the source while the broker was down"
    );
    assert!(
        peak_rss < 512.0,
        "RSS {peak_rss:.0} MB while the broker was down"
    );

    let points = (valid * 2) as i64;
    let done = wait_until(
        Duration::from_secs(120),
        "every row after the restart",
        || async {
            let n = |sql: &'static str| {
                let client = &client;
                async move {
                    client
                        .query_one(sql, &[])
                        .await
                        .map(|r| r.get::<_, i64>(0))
                        .unwrap_or(0)
                }
            };
            Ok(n("SELECT count(*) FROM device_metrics").await >= points
                && n("SELECT count(*) FROM dead_letters").await >= malformed as i64)
        },
    )
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    // Exactly once: one row per (event, metric), nothing twice, every malformed offset once.
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (time, device_id, metric_name)) FROM device_metrics",
            &[],
        )
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (points, points)
    );
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (partition, \"offset\")) FROM dead_letters",
            &[],
        )
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (malformed as i64, malformed as i64)
    );
    // Offsets stored with the rows cover the whole topic.
    let stored: i64 = client
        .query_one("SELECT coalesce(sum(next_offset), 0)::bigint FROM source_offsets WHERE sink = 'postgres_raw'", &[])
        .await?
        .get(0);
    assert_eq!(stored, EVENTS as i64, "stored offsets");
    let keys = dlq_keys(&brokers, &format!("{topic}.dlq"), malformed)?;
    assert_eq!(keys.len(), malformed, "distinct letters on the DLQ topic");
    assert!(pipeline.is_running(), "recovered without a restart");

    let mut still: Vec<String> = Vec::new();
    let cleared = wait_until(Duration::from_secs(60), "source degraded cleared", || {
        let metrics = http_get(&http, "/metrics");
        still = metrics
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter(|l| l.contains("_degraded{") && l.ends_with(" 1"))
            .map(str::to_owned)
            .collect();
        let ok = metrics.is_ok() && still.is_empty();
        async move { Ok(ok) }
    })
    .await;
    assert!(cleared.is_ok(), "still degraded: {still:?}");
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}
