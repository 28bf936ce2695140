//! The raw archive written straight to the bucket (`s3.direct = true`) on the stack's S3 server,
//! through SIGKILLs: each roll is uploaded and verified before its offsets are committed, and a
//! restart deletes objects of rolls it had not committed. Afterwards pyarrow, reading the
//! bucket, finds every valid event's row and score exactly once, and the NAS staging folder
//! holds no raw file. A planted orphan (an object named past the committed offsets, holding
//! copies of committed rows) must be removed by the restart, or the rows would count twice.

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

/// Copies the first object of partition 0 under `prefix` to a key whose name starts at
/// partition 0's committed offset: what a crash between upload and commit leaves behind.
fn plant_orphan(
    python: &str,
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    first: i64,
) -> Result<()> {
    let script = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n\
         keys = [o['Key'] for o in s3.list_objects_v2(Bucket='{bucket}', Prefix='{prefix}').get('Contents', []) if '/part-p000-' in o['Key']]\n\
         src = sorted(keys)[0]\n\
         dst = src.rsplit('/', 1)[0] + '/part-p000-o{first:020}-{last:020}.parquet'\n\
         s3.copy_object(Bucket='{bucket}', Key=dst, CopySource={{'Bucket': '{bucket}', 'Key': src}})\n\
         print(dst)\n",
        last = first + 10,
    );
    let out = std::process::Command::new(python)
        .args(["-c", &script])
        .output()?;
    if !out.status.success() {
        bail!(
            "planting the orphan: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
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
    produce(stack, &topic, &records)?;
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let log = work.path().join("pipeline.log");
    let client = connect(&url).await?;
    let raw_prefix = format!("archive/topic={topic}/");
    let mut rng = SmallRng::seed_from_u64(0x5eed_d1ec);

    // Three SIGKILLs at random moments once some rolls are committed, a restart after each.
    for kill in 0..3 {
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
        if kill == 1 {
            let p0: i64 = client
                .query_one(
                    "SELECT next_offset FROM source_offsets WHERE sink = 'parquet_raw' AND partition = 0",
                    &[],
                )
                .await?
                .get(0);
            plant_orphan(&stack.python, &stack.s3_endpoint, &bucket, &raw_prefix, p0)?;
        }
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
    // Read from the bucket: each valid event's row and score once, the orphan gone.
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
    let removed = std::fs::read_to_string(&log)?
        .lines()
        .filter(|l| l.contains("removed uncommitted object"))
        .count();
    assert!(
        removed >= 1,
        "the planted orphan was not removed by recovery"
    );
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    Ok(())
}
