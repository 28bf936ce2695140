//! Dead letters reach `<topic>.dlq` on the real broker as well as `dead_letters`: the original
//! bytes, on the record's own partition, keyed `<partition>:<offset>`, with the reason, the
//! error and the source position in headers; the good records around them are unaffected.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, produce, stack, unique, wait_until, Pipeline,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;

/// (partition, offset) -> (payload, reason, error, source topic/partition/offset headers).
type Letters = BTreeMap<(i32, i64), (Vec<u8>, BTreeMap<String, String>)>;

fn read_dlq(brokers: &str, dlq: &str, partitions: i32, want: usize) -> Result<Letters> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dlq-test")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(dlq, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut letters = Letters::new();
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < want && Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        seen += 1;
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let (p, o) = key.split_once(':').unwrap_or(("", ""));
        let mut headers = BTreeMap::new();
        if let Some(h) = msg.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        headers.insert("kafka.partition".into(), msg.partition().to_string());
        letters.insert(
            (p.parse()?, o.parse()?),
            (msg.payload().unwrap_or_default().to_vec(), headers),
        );
    }
    // Nothing beyond what was expected.
    if let Some(extra) = consumer.poll(Duration::from_millis(1500)) {
        let extra = extra?;
        bail!("unexpected extra letter {:?}", extra.key());
    }
    Ok(letters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_published_to_the_dlq_topic() -> Result<()> {
    let stack = stack();
    let db = unique("dlq");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 2).await?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 50\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            stack.brokers,
            work.path().join("nas").display(),
            free_port(),
        ),
    )?;
    let mut records = Vec::new();
    let mut bad: BTreeMap<(i32, i64), (Vec<u8>, &str)> = BTreeMap::new();
    for p in 0..2i32 {
        for i in 0..110i64 {
            let (payload, reason) = match i % 11 {
                3 => (b"{\"device_id\": ".to_vec(), Some("malformed_json")),
                7 => (
                    json!({"device_id": "pi", "metrics": {"cpu_percent": 250.0}, "timestamp": T0_MS})
                        .to_string()
                        .into_bytes(),
                    Some("out_of_range"),
                ),
                _ => (
                    json!({"device_id": format!("pi-{p}"), "metrics": {"cpu_percent": 5.0},
                           "timestamp": T0_MS + i * 100})
                    .to_string()
                    .into_bytes(),
                    None,
                ),
            };
            if let Some(reason) = reason {
                bad.insert((p, i), (payload.clone(), reason));
            }
            records.push((p, payload));
        }
    }
    produce(stack, &topic, &records)?;
    let log = work.path().join("pipeline.log");
    let mut pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    let good = records.len() - bad.len();
    let stored = wait_until(
        Duration::from_secs(120),
        "rows and dead letters",
        || async {
            let n = |sql: &'static str| {
                let client = &client;
                async move {
                    Ok::<i64, anyhow::Error>(
                        client
                            .query_one(sql, &[])
                            .await
                            .map(|r| r.get(0))
                            .unwrap_or(0),
                    )
                }
            };
            Ok(
                n("SELECT count(*) FROM device_metrics").await? == good as i64
                    && n("SELECT count(*) FROM dead_letters").await? == bad.len() as i64,
            )
        },
    )
    .await;
    if let Err(e) = stored {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(pipeline.is_running());

    let letters = read_dlq(&stack.brokers, &format!("{topic}.dlq"), 2, bad.len())?;
    assert_eq!(
        letters.keys().collect::<Vec<_>>(),
        bad.keys().collect::<Vec<_>>(),
        "one letter per bad record"
    );
    for ((p, o), (payload, headers)) in &letters {
        let (want_payload, want_reason) = &bad[&(*p, *o)];
        assert_eq!(payload, want_payload, "{p}:{o} bytes");
        assert_eq!(headers["primespark.reason"], *want_reason, "{p}:{o}");
        assert_eq!(headers["primespark.topic"], topic);
        assert_eq!(headers["primespark.partition"], p.to_string());
        assert_eq!(headers["primespark.offset"], o.to_string());
        assert_eq!(
            headers["kafka.partition"],
            p.to_string(),
            "same partition as the record"
        );
        assert!(
            headers["primespark.error"].contains(&format!("offset {o}")),
            "{headers:?}"
        );
    }
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    Ok(())
}
