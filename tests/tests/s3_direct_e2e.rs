//! The raw archive written straight to the bucket (`s3.direct = true`) on the stack's S3 server,
//! through SIGKILLs: each roll is uploaded and verified before its offsets are committed. One
//! run crashes at exactly the delicate point (a failpoint ends it right after an upload, before
//! the commit): the restart keeps that roll, uploads the rest of it, and resumes after it
//! instead of writing it twice. Afterwards pyarrow, reading the bucket, finds every valid
//! event's row and score exactly once, and the NAS staging folder holds no raw file.

use std::time::Duration;

use anyhow::{bail, Result};
use primespark_tests::{
    bucket_rows, connect, count_files, create_topic, curl, free_port, fresh_database, produce,
    stack, unique, wait_until, Pipeline,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;
const EVENTS: i64 = 20_000;
const PARTITIONS: i32 = 2;

async fn committed(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = 'parquet_raw'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_reach_the_bucket_exactly_once_through_crashes() -> Result<()> {
    let stack = stack();
    assert!(!stack.s3_endpoint.is_empty(), "the stack has no S3 server");
    let db = unique("direct");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, PARTITIONS).await?;
    let bucket = db.replace('_', "-");
    curl(&["-X", "PUT", &format!("{}/{bucket}", stack.s3_endpoint)])?;

    let work = tempfile::tempdir()?;
    let nas = work.path().join("nas");
    let config = work.path().join("pipeline.toml");
    // tier.after is long: only the direct path may move raw files.
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 1000\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_rows = 700\nroll_interval = \"500ms\"\n\
             [query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             [s3]\nenabled = true\ndirect = true\nbucket = \"{bucket}\"\nprefix = \"archive\"\nendpoint = \"{}\"\nallow_http = true\n\
             [tier]\nafter = \"1h\"\ninterval = \"1s\"\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            stack.brokers,
            nas.display(),
            free_port(),
            stack.s3_endpoint,
        ),
    )?;
    let mut valid = 0;
    let records: Vec<(i32, Vec<u8>)> = (0..EVENTS)
        .map(|i| {
            let payload = if i % 101 == 7 {
                b"{\"device_id\": 1".to_vec()
            } else {
                valid += 1;
                json!({"device_id": format!("pi-{}", i % 9), "metrics": {"cpu_percent": (i % 100) as f64},
                       "timestamp": T0_MS + i * 20})
                .to_string()
                .into_bytes()
            };
            ((i % i64::from(PARTITIONS)) as i32, payload)
        })
        .collect();
    // A third of the records before each crash, so every run has rolls to write.
    let chunks: Vec<&[(i32, Vec<u8>)]> = records.chunks(records.len() / 3 + 1).collect();
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let log = work.path().join("pipeline.log");
    let client = connect(&url).await?;
    let raw_prefix = format!("archive/topic={topic}/");
    let mut rng = SmallRng::seed_from_u64(0x5eed_d1ec);

    // Three crashes once some rolls are committed, a restart after each: two SIGKILLs at
    // random moments, and between them one at the failpoint after an upload.
    for kill in 0..3 {
        produce(stack, &topic, chunks.get(kill).copied().unwrap_or_default())?;
        if kill == 1 {
            let mut at_upload = env.to_vec();
            at_upload.push(("PRIMESPARK_FAILPOINTS", "s3.uploaded=abort@3"));
            let mut pipeline = Pipeline::start(&config, &at_upload, &log)?;
            let started = std::time::Instant::now();
            while pipeline.is_running() {
                if started.elapsed() > Duration::from_secs(120) {
                    bail!(
                        "the failpoint after an upload never fired\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let pipeline = Pipeline::start(&config, &env, &log)?;
        let before = committed(&client).await;
        let target = before + rng.random_range(500..3000);
        let progressed = wait_until(Duration::from_secs(120), "rolls committed", || async {
            Ok(committed(&client).await >= target.min(EVENTS))
        })
        .await;
        if let Err(e) = progressed {
            bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        pipeline.kill()?;
    }

    let mut pipeline = Pipeline::start(&config, &env, &log)?;
    let done = wait_until(Duration::from_secs(180), "every roll committed", || async {
        Ok(committed(&client).await >= EVENTS)
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(pipeline.is_running());
    // Read from the bucket: each valid event's row and score once.
    assert_eq!(
        bucket_rows(stack, &bucket, &raw_prefix)?,
        (valid, valid),
        "raw rows and distinct (partition, offset) in the bucket"
    );
    assert_eq!(
        bucket_rows(stack, &bucket, "archive/table=anomaly_scores/")?,
        (valid, valid),
        "scores and distinct (partition, offset) in the bucket"
    );
    // Staging keeps nothing of the raw archive once committed.
    assert_eq!(
        count_files(&nas.join(format!("topic={topic}")), "parquet"),
        0
    );
    assert_eq!(count_files(&nas.join("table=anomaly_scores"), "parquet"), 0);
    let kept = std::fs::read_to_string(&log)?
        .lines()
        .filter(|l| l.contains("resuming after its last roll"))
        .count();
    assert!(
        kept >= 1,
        "no restart resumed after the roll uploaded before the crash"
    );
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    Ok(())
}
