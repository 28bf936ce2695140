//! Tiering against the stack's S3-compatible server (moto): a pipeline with `tier.after = 1s`
//! moves every Parquet file it writes to the bucket, verified, and removes it from the NAS;
//! pyarrow reads the objects from the bucket and finds every raw row exactly once.

use std::time::Duration;

use anyhow::{bail, Result};
use primespark_tests::{
    bucket_rows, connect, count_files, create_topic, curl, free_port, fresh_database, produce,
    stack, unique, wait_until, Pipeline,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;

/// Keys under `prefix` (ListObjectsV2, every page).
fn list(endpoint: &str, bucket: &str, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("{endpoint}/{bucket}?list-type=2&prefix={prefix}");
        if let Some(t) = &token {
            url.push_str(&format!("&continuation-token={t}"));
        }
        let xml = curl(&[&url])?;
        keys.extend(
            xml.split("<Key>")
                .skip(1)
                .filter_map(|s| s.split("</Key>").next())
                .map(str::to_owned),
        );
        token = xml
            .split("<NextContinuationToken>")
            .nth(1)
            .and_then(|s| s.split("</NextContinuationToken>").next())
            .map(str::to_owned);
        if token.is_none() {
            return Ok(keys);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nas_files_move_to_the_bucket_verified_and_complete() -> Result<()> {
    let stack = stack();
    assert!(!stack.s3_endpoint.is_empty(), "the stack has no S3 server");
    let db = unique("tier");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 2).await?;
    let bucket = db.replace('_', "-");
    curl(&["-X", "PUT", &format!("{}/{bucket}", stack.s3_endpoint)])?;

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
    let log = work.path().join("pipeline.log");
    let records: Vec<(i32, Vec<u8>)> = (0..1000i64)
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
    produce(stack, &topic, &records)?;
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let mut pipeline = Pipeline::start(&config, &env, &log)?;
    let client = connect(&url).await?;

    // Every raw roll committed, then moved: none left on the NAS, all in the bucket.
    let raw_prefix = format!("archive/topic={topic}/");
    let moved = wait_until(Duration::from_secs(120), "raw files moved", || async {
        // The table appears once the pipeline has migrated.
        let committed: i64 = client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = 'parquet_raw'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        Ok(committed >= 1000
            && count_files(&nas.join(format!("topic={topic}")), "parquet") == 0
            && !list(&stack.s3_endpoint, &bucket, &raw_prefix)?.is_empty())
    })
    .await;
    if let Err(e) = moved {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(pipeline.is_running());

    // The bucket's copies are whole: pyarrow reads them from the bucket and counts the rows.
    assert_eq!(
        bucket_rows(stack, &bucket, &raw_prefix)?,
        (1000, 1000),
        "rows and distinct (partition, offset) in the bucket"
    );

    let page = curl(&[&format!("http://{http}/metrics")])?;
    assert!(
        page.lines()
            .any(|l| l.starts_with("primespark_tier_files_total{outcome=\"moved\"}")),
        "{page}"
    );
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    Ok(())
}
