//! Dead letters reach `<topic>.dlq` on the real broker as well as `dead_letters`: the original
//! bytes, on the record's own partition, keyed `<partition>:<offset>`, with the reason, the
//! error and the source position in headers; the good records around them are unaffected.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use primespark_tests::{
    connect, count, parquet_positions, produce, stack, wait_until, Sections, TelemetryRun,
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
    let sections = Sections {
        postgres: "flush_rows = 50\nflush_interval = \"200ms\"",
        ..Sections::default()
    };
    let run = TelemetryRun::new("dlq", 2, sections).await?;
    let topic = &run.topic;
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
                // The error quotes the metric name, NUL and all: the letter must still store.
                9 => (
                    json!({"device_id": "pi", "metrics": {"cpu\u{0}percent": 1.0}, "timestamp": T0_MS})
                        .to_string()
                        .into_bytes(),
                    Some("invalid_value"),
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
    produce(stack, topic, &records)?;
    let mut pipeline = run.start(&[])?;
    let client = connect(&run.url).await?;
    let good = records.len() - bad.len();
    let stored = wait_until(
        Duration::from_secs(120),
        "rows and dead letters",
        || async {
            Ok(
                count(&client, "SELECT count(*) FROM device_metrics").await == good as i64
                    && count(&client, "SELECT count(*) FROM dead_letters").await
                        == bad.len() as i64,
            )
        },
    )
    .await;
    if let Err(e) = stored {
        bail!("{e}\n{}", run.log_text());
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
        assert_eq!(headers["primespark.topic"], *topic);
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

/// A record PostgreSQL refuses (here a CHECK constraint a DBA added: SQLSTATE class 23; a
/// data exception, class 22, is handled the same way) leaves its batch as a dead letter, in
/// `dead_letters` and on the DLQ topic, with the database's reason and its position; every
/// other record of the batch is stored, the offsets move on, the pipeline keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_postgres_refuses_become_dead_letters() -> Result<()> {
    refused_records("refused", None).await
}

/// The same, with the process crashed in the middle of the search for the refused records
/// (the third probe of the bisection): after the restart every good row, every letter and
/// every archived row is there once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_the_search_for_refused_records_loses_and_doubles_nothing() -> Result<()> {
    refused_records("refusedcrash", Some("postgres.bisect=abort@3")).await
}

/// Records a hand-added constraint refuses, stored by one run, or by a run crashed at
/// `crash` (a failpoint spec) and a second one.
async fn refused_records(prefix: &str, crash: Option<&str>) -> Result<()> {
    let stack = stack();
    let sections = Sections {
        postgres: "flush_rows = 64\nflush_interval = \"200ms\"",
        ..Sections::default()
    };
    let run = TelemetryRun::new(prefix, 2, sections).await?;
    let (topic, http) = (&run.topic, &run.http);
    // The tables first, then the constraint the pipeline does not know about.
    let migrated = primespark_tests::pipeline_command()?
        .arg("migrate")
        .arg("--config")
        .arg(&run.config)
        .output()?;
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let client = connect(&run.url).await?;
    client
        .batch_execute(
            "ALTER TABLE device_metrics ADD CONSTRAINT no_refused_devices \
             CHECK (device_id <> 'pi-refused')",
        )
        .await?;

    let mut records = Vec::new();
    let mut refused: Vec<(i32, i64)> = Vec::new();
    // Per partition 150 records 100 ms apart, then two late ones (back at T0, 15 s behind):
    // the first refused, the second not. Only the second is a late event.
    for p in 0..2i32 {
        for i in 0..152i64 {
            let device = if i % 13 == 5 || i == 150 {
                refused.push((p, i));
                "pi-refused".to_owned()
            } else {
                format!("pi-{p}")
            };
            let time = if i < 150 { T0_MS + i * 100 } else { T0_MS };
            records.push((
                p,
                json!({"device_id": device, "metrics": {"cpu_percent": 5.0, "load_avg": 0.5},
                       "timestamp": time})
                .to_string()
                .into_bytes(),
            ));
        }
    }
    produce(stack, topic, &records)?;
    if let Some(spec) = crash {
        let mut crashed = run.start(&[("PRIMESPARK_FAILPOINTS", spec)])?;
        let point = spec.split('=').next().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(120);
        while crashed.is_running() {
            if Instant::now() > deadline {
                bail!("{point} was not hit within 120 s\n{}", run.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = run.log_text();
        if !log.contains(&format!("failpoint=\"{point}\""))
            && !log.contains(&format!("failpoint={point}"))
        {
            bail!("the pipeline stopped, but not at {point}\n{log}");
        }
    }
    let mut pipeline = run.start(&[])?;
    let good = (records.len() - refused.len()) as i64;
    let stored = wait_until(Duration::from_secs(120), "rows and letters", || async {
        Ok(
            count(&client, "SELECT count(*) FROM device_metrics").await == 2 * good
                && count(&client, "SELECT count(*) FROM dead_letters").await
                    == refused.len() as i64
                && count(
                    &client,
                    "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets \
                     WHERE sink = 'postgres_raw'",
                )
                .await
                    == 304,
        )
    })
    .await;
    if let Err(e) = stored {
        bail!("{e}\n{}", run.log_text());
    }
    assert!(pipeline.is_running());
    assert_eq!(
        client
            .query_one(
                "SELECT count(*) FROM device_metrics WHERE device_id = 'pi-refused'",
                &[]
            )
            .await?
            .get::<_, i64>(0),
        0
    );
    let rows = client
        .query(
            "SELECT partition, \"offset\", reason, error, payload FROM dead_letters \
             ORDER BY partition, \"offset\"",
            &[],
        )
        .await?;
    let positions: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(positions, refused);
    // A refused record is a dead letter, not also a late event of the sink that refused it.
    let late: Vec<(i32, i64)> = client
        .query(
            "SELECT partition, \"offset\" FROM late_events ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(late, [(0, 151), (1, 151)]);
    for r in &rows {
        let (o, reason, error, payload): (i64, String, String, Vec<u8>) =
            (r.get(1), r.get(2), r.get(3), r.get(4));
        assert_eq!(reason, "sink_rejected");
        assert!(
            error.contains(&format!("offset {o}"))
                && error.contains("no_refused_devices")
                && error.contains("23514"),
            "{error}"
        );
        // The record's decoded rows: both metrics of the refused device.
        let decoded: serde_json::Value = serde_json::from_slice(&payload)?;
        let text = decoded.to_string();
        assert!(
            text.contains("pi-refused")
                && text.contains("cpu_percent")
                && text.contains("load_avg"),
            "{text}"
        );
    }
    let letters = read_dlq(&stack.brokers, &format!("{topic}.dlq"), 2, refused.len())?;
    assert_eq!(
        letters.keys().copied().collect::<Vec<_>>(),
        refused,
        "one letter per refused record on the DLQ topic"
    );
    for (_, headers) in letters.values() {
        assert_eq!(headers["primespark.reason"], "sink_rejected");
    }
    let metrics = primespark_tests::http_get(http, "/metrics")?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("primespark_dead_letters_total{") && !l.ends_with(" 0")),
        "dead letter counter did not move"
    );
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    // The archive keeps every record, refused ones too (PostgreSQL refused them, not the
    // pipeline), each once.
    let archived = parquet_positions(&run.nas.join(format!("topic={topic}")))?;
    let mut distinct = archived.clone();
    distinct.dedup();
    assert_eq!(
        (archived.len(), distinct.len()),
        (2 * 2 * 152, 2 * 152),
        "archived rows (two points per record) and distinct records"
    );
    Ok(())
}
