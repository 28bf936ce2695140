//! Partitions and offsets an operator changes, against the stack: a partition added to a topic
//! is read from its beginning (even with `kafka.start = "latest"`, whose rule is for a topic
//! never read before), and its dead letters go out even when `<topic>.dlq` cannot grow; a
//! stored position the broker no longer has (a topic deleted and recreated) is reported on
//! `/metrics` and `/readyz` and the partition left unread, never silently skipped elsewhere.
//!
//! On an earlier main the added partition started at `latest` (its backlog skipped), the
//! dead-letter topic kept one partition (a letter from the new one was retried forever), and a
//! position beyond the partition's end was silently reset.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use primespark_tests::{
    connect, count, create_topic, http_get, partition_count, produce, stack, wait_until, Sections,
    TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z

fn samples(partition: i32, from: i64, n: i64) -> Vec<(i32, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            (
                partition,
                json!({"device_id": format!("pi-{partition}"), "metrics": {"cpu_percent": (i % 100) as f64},
                       "timestamp": T0_MS + i * 1000})
                .to_string()
                .into_bytes(),
            )
        })
        .collect()
}

/// A telemetry-only run of `partitions` partitions without scoring, flushing often.
async fn run_of(prefix: &str, partitions: i32) -> Result<TelemetryRun> {
    TelemetryRun::new(
        prefix,
        partitions,
        Sections {
            postgres: "flush_rows = 100\nflush_interval = \"100ms\"",
            extra: "[inference]\nenabled = false\n",
            ..Sections::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_partition_is_read_from_its_beginning_and_its_letters_reach_the_dlq() -> Result<()>
{
    let run = run_of("partitions", 2).await?;
    let stack = stack();
    let client = connect(&run.url).await?;
    let raw = "SELECT count(*) FROM device_metrics";
    // The dead-letter topic as a run before the source grew made it: one partition. (Tansu
    // cannot add partitions to a topic, so the grown source is a partition nothing was ever
    // stored for, and the dead-letter topic cannot grow: its letters must still go out.)
    let dlq = format!("{}.dlq", run.topic);
    create_topic(stack, &dlq, 1).await?;

    // A first run sees records on partition 0 only: nothing is stored for partition 1.
    produce(stack, &run.topic, &samples(0, 0, 50))?;
    let first = run.start(&[])?;
    wait_until(Duration::from_secs(60), "partition 0", || async {
        Ok(count(&client, raw).await == 50)
    })
    .await?;
    first.terminate(Duration::from_secs(60))?;
    ensure!(
        count(
            &client,
            "SELECT count(*) FROM source_offsets WHERE partition = 1"
        )
        .await
            == 0,
        "partition 1 has stored positions: the test would not show the rule"
    );

    // Partition 1 gathers a backlog (one letter in it) while the pipeline is down; the restart
    // says `latest`, whose rule is for a topic never read before, not for a partition added
    // to one that was.
    let mut backlog = samples(1, 100, 30);
    backlog.push((1, b"{\"device_id\": \"pi-1\", \"metrics\": {".to_vec()));
    produce(stack, &run.topic, &backlog)?;
    let _second = run.start(&[("PRIMESPARK_KAFKA__START", "latest")])?;
    let waited = wait_until(
        Duration::from_secs(90),
        "the new partition's backlog",
        || async {
            Ok(count(&client, raw).await == 80
                && count(&client, "SELECT count(*) FROM dead_letters").await == 1)
        },
    )
    .await;
    if let Err(e) = waited {
        bail!(
            "{e}: {} raw rows (want 80), {} letters\n{}",
            count(&client, raw).await,
            count(&client, "SELECT count(*) FROM dead_letters").await,
            run.log_text()
        );
    }
    ensure!(partition_count(stack, &dlq)? >= 1, "{dlq} is gone");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_beyond_the_partition_is_reported_not_skipped() -> Result<()> {
    let run = run_of("positions", 1).await?;
    let stack = stack();
    let client = connect(&run.url).await?;
    let raw = "SELECT count(*) FROM device_metrics";
    produce(stack, &run.topic, &samples(0, 0, 40))?;
    let first = run.start(&[])?;
    wait_until(Duration::from_secs(60), "the first records", || async {
        Ok(count(&client, raw).await == 40)
    })
    .await?;
    first.terminate(Duration::from_secs(60))?;

    // What a topic deleted and recreated looks like from the stored side: every position is
    // beyond what the partition holds.
    client
        .execute(
            "UPDATE source_offsets SET next_offset = next_offset + 1000000",
            &[],
        )
        .await?;
    produce(stack, &run.topic, &samples(0, 40, 10))?;
    let _second = run.start(&[])?;
    let waited = wait_until(
        Duration::from_secs(60),
        "the lost position reported",
        || async {
            let metrics = http_get(&run.http, "/metrics").unwrap_or_default();
            let readyz = http_get(&run.http, "/readyz").unwrap_or_default();
            Ok(metrics.lines().any(|l| {
                l.starts_with("primespark_source_position_lost_total") && !l.ends_with(" 0")
            }) && readyz.starts_with("HTTP/1.1 503")
                && readyz.contains("position out of range"))
        },
    )
    .await;
    if let Err(e) = waited {
        bail!(
            "{e}: {}\n{}",
            http_get(&run.http, "/readyz").unwrap_or_default(),
            run.log_text()
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&client, raw).await,
        40,
        "nothing read from a position the operator did not choose"
    );
    Ok(())
}
