//! Kafka's own tooling sees the pipeline: after the sinks commit, their positions are
//! committed to the configured consumer group, and an independent client (the stack's Python
//! confluent-kafka, listing the group's offsets as `kafka-consumer-groups --describe` does)
//! reads them: one per partition, equal to what every sink stored, moving while the pipeline
//! runs. With `kafka.commit_group_offsets = false` the group stays empty.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use primespark_tests::{connect, count, produce, stack, wait_until, Sections, TelemetryRun};

const PARTITIONS: i32 = 3;

/// Prints `partition offset` per committed partition of `topic` in `group`.
const LIST_GROUP: &str = r#"
import sys
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
brokers, group, topic, partitions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
admin = AdminClient({"bootstrap.servers": brokers})
request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(partitions)])
for _, f in admin.list_consumer_group_offsets([request]).items():
    for tp in f.result(timeout=10).topic_partitions:
        if tp.error is not None:
            sys.exit(f"{tp}: {tp.error}")
        if tp.offset >= 0:
            print(tp.partition, tp.offset)
"#;

fn group_offsets(group: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
    let stack = stack();
    let out = std::process::Command::new(&stack.python)
        .arg("-c")
        .arg(LIST_GROUP)
        .args([&stack.brokers, group, topic, &PARTITIONS.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "listing the group: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (p, o) = l.split_once(' ').context("partition offset")?;
            Ok((p.parse()?, o.parse()?))
        })
        .collect()
}

fn event(device: usize, i: usize) -> Vec<u8> {
    format!(
        r#"{{"device_id":"pi-{device}","metrics":{{"cpu_percent":{}}},"timestamp":{}}}"#,
        i % 100,
        1_762_351_200_000i64 + i as i64 * 1000
    )
    .into_bytes()
}

/// `n` records on every partition: valid ones and, every tenth, a dead letter (which must not
/// hold the position back).
fn records(n: usize, from: usize) -> Vec<(i32, Vec<u8>)> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        for i in from..from + n {
            let payload = if i % 10 == 9 {
                b"{not json".to_vec()
            } else {
                event(p as usize, i)
            };
            out.push((p, payload));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_group_shows_what_the_sinks_committed() -> Result<()> {
    let stack = stack();
    let run = TelemetryRun::new(
        "group",
        PARTITIONS,
        Sections {
            extra: "[inference]\nenabled = false\n",
            ..Default::default()
        },
    )
    .await?;
    let group = format!("{}-monitor", run.db);
    produce(stack, &run.topic, &records(200, 0))?;
    let pipeline = run.start(&[("PRIMESPARK_KAFKA__CONSUMER_GROUP", &group)])?;
    let client = connect(&run.url).await?;
    let want: BTreeMap<i32, i64> = (0..PARTITIONS).map(|p| (p, 200)).collect();
    let seen = wait_until(Duration::from_secs(90), "the group's offsets", || async {
        Ok(group_offsets(&group, &run.topic)? == want)
    })
    .await;
    if let Err(e) = seen {
        bail!(
            "{e}: group has {:?}\n{}",
            group_offsets(&group, &run.topic),
            run.log_text()
        );
    }
    // The group's position is what every raw sink stored, not more (the aggregate writer
    // replays from its own window checkpoint, so its row does not hold the group back).
    let stored: BTreeMap<i32, i64> = client
        .query(
            "SELECT partition, min(next_offset) FROM source_offsets \
             WHERE dataflow = 'telemetry' AND sink IN ('postgres_raw', 'parquet_raw') \
             GROUP BY partition",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if stored != want {
        let rows: Vec<(String, i32, i64)> = client
            .query(
                "SELECT sink, partition, next_offset FROM source_offsets ORDER BY 1, 2",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        bail!("source_offsets {stored:?} != {want:?}: {rows:?}");
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM dead_letters").await,
        3 * 20
    );

    // It moves while the pipeline runs, partition by partition.
    let more: Vec<(i32, Vec<u8>)> = (200..250).map(|i| (1, event(1, i))).collect();
    produce(stack, &run.topic, &more)?;
    let want_later = BTreeMap::from([(0, 200), (1, 250), (2, 200)]);
    let moved = wait_until(
        Duration::from_secs(60),
        "the group's offsets moving",
        || async { Ok(group_offsets(&group, &run.topic)? == want_later) },
    )
    .await;
    if let Err(e) = moved {
        bail!(
            "{e}: group has {:?}\n{}",
            group_offsets(&group, &run.topic),
            run.log_text()
        );
    }
    pipeline.terminate(Duration::from_secs(60))?;
    assert!(
        run.log_text()
            .contains("committing sink positions to the consumer group"),
        "{}",
        run.log_text()
    );

    // Turned off, another group sees nothing even as the pipeline stores new records.
    let quiet = format!("{}-off", run.db);
    let pipeline = run.start(&[
        ("PRIMESPARK_KAFKA__CONSUMER_GROUP", &quiet),
        ("PRIMESPARK_KAFKA__COMMIT_GROUP_OFFSETS", "false"),
    ])?;
    let last: Vec<(i32, Vec<u8>)> = (250..300).map(|i| (2, event(2, i))).collect();
    produce(stack, &run.topic, &last)?;
    wait_until(
        Duration::from_secs(60),
        "the new records stored",
        || async {
            Ok(count(
                &client,
                "SELECT min(next_offset) FROM source_offsets WHERE dataflow = 'telemetry' \
             AND sink IN ('postgres_raw', 'parquet_raw') AND partition = 2",
            )
            .await
                == 250)
        },
    )
    .await?;
    // Past a few of the committer's intervals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(group_offsets(&quiet, &run.topic)?, BTreeMap::new());
    // The first group kept its last positions: nobody committed for it since.
    assert_eq!(group_offsets(&group, &run.topic)?, want_later);
    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}
