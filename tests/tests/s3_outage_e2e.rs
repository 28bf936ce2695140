//! The S3 server down for 30 s while the pipeline runs: raw rows keep flowing, tiering fails
//! and counts it, every file stays on the NAS; once the server is back every file moves and the
//! bucket holds every row exactly once. (moto keeps its buckets in memory, so the outage covers
//! the time before the first move, and the bucket is created again when the server returns.)

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use primespark_tests::{
    bucket_rows, connect, count_files, create_topic, curl, free_port, fresh_database, http_get,
    produce, stack, stack_service, unique, wait_until, Pipeline,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_for_30s_keeps_files_on_the_nas_then_moves_them_all() -> Result<()> {
    let stack = stack();
    let db = unique("s3outage");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 2).await?;
    let bucket = db.replace('_', "-");
    let work = tempfile::tempdir()?;
    let nas = work.path().join("nas");
    let http = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 200\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_rows = 300\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"{http}\"\n\
             [s3]\nenabled = true\nbucket = \"{bucket}\"\nprefix = \"archive\"\nendpoint = \"{}\"\nallow_http = true\n\
             [tier]\nafter = \"1s\"\ninterval = \"1s\"\n\
             [dataflows]\ninference = false\nanalytics = false\n[inference]\nenabled = false\n",
            stack.brokers,
            nas.display(),
            stack.s3_endpoint,
        ),
    )?;
    let records: Vec<(i32, Vec<u8>)> = (0..2000i64)
        .map(|i| {
            (
                (i % 2) as i32,
                json!({"device_id": format!("pi-{}", i % 7), "metrics": {"cpu_percent": (i % 100) as f64},
                       "timestamp": T0_MS + i * 50})
                .to_string()
                .into_bytes(),
            )
        })
        .collect();
    stack_service("stop-service", "s3")?;
    let down_at = Instant::now();
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let log = work.path().join("pipeline.log");
    let mut pipeline = Pipeline::start(&config, &env, &log)?;
    produce(stack, &topic, &records[..1000])?;
    let client = connect(&url).await?;
    let raw_dir = nas.join(format!("topic={topic}"));
    let mut failures_seen = false;
    while down_at.elapsed() < Duration::from_secs(30) {
        assert!(
            pipeline.is_running(),
            "the pipeline exited during the outage"
        );
        if let Ok(m) = http_get(&http, "/metrics") {
            failures_seen |= m
                .lines()
                .any(|l| l.starts_with("primespark_tier_files_total{outcome=\"failed\"}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    produce(stack, &topic, &records[1000..])?;
    // The raw path never waited for the object store.
    let rows: i64 = client
        .query_one("SELECT count(*) FROM device_metrics", &[])
        .await?
        .get(0);
    assert!(rows >= 1000, "{rows} raw rows during the outage");
    assert!(failures_seen, "no failed move counted during the outage");
    assert!(
        count_files(&raw_dir, "parquet") > 0,
        "files stay on the NAS"
    );

    stack_service("start-service", "s3")?;
    curl(&["-X", "PUT", &format!("{}/{bucket}", stack.s3_endpoint)])?;
    let raw_prefix = format!("archive/topic={topic}/");
    let moved = wait_until(Duration::from_secs(120), "every file moved", || async {
        let committed: i64 = client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = 'parquet_raw'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        Ok(committed >= 2000 && count_files(&raw_dir, "parquet") == 0)
    })
    .await;
    if let Err(e) = moved {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert_eq!(bucket_rows(stack, &bucket, &raw_prefix)?, (2000, 2000));
    assert!(pipeline.is_running(), "recovered without a restart");
    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}
