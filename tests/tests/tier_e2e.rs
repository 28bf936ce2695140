//! Tiering against the stack's S3-compatible server (moto): a pipeline with `tier.after = 1s`
//! moves every Parquet file it writes to the bucket, verified, and removes it from the NAS;
//! pyarrow reads the objects from the bucket and finds every raw row exactly once.

use std::time::Duration;

use anyhow::{bail, Result};
use primespark_tests::{
    bucket_keys, bucket_rows, connect, count_files, curl, http_post, produce, stack, unique,
    wait_until, Sections, TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nas_files_move_to_the_bucket_verified_and_complete() -> Result<()> {
    let stack = stack();
    assert!(!stack.s3_endpoint.is_empty(), "the stack has no S3 server");
    let bucket = unique("tier").replace('_', "-");
    curl(&["-X", "PUT", &format!("{}/{bucket}", stack.s3_endpoint)])?;
    let s3 = format!(
        "[s3]\nenabled = true\nbucket = \"{bucket}\"\nprefix = \"archive\"\nendpoint = \"{}\"\n\
         allow_http = true\n[tier]\nafter = \"1s\"\ninterval = \"1s\"\n[inference]\nenabled = false",
        stack.s3_endpoint,
    );
    let sections = Sections {
        postgres: "flush_rows = 200\nflush_interval = \"200ms\"",
        nas: "roll_rows = 300",
        extra: &s3,
        ..Sections::default()
    };
    let run = TelemetryRun::new("tier", 2, sections).await?;
    let (url, topic, nas, http) = (&run.url, &run.topic, &run.nas, &run.http);
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
    produce(stack, topic, &records)?;
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let mut pipeline = run.start(&env)?;
    let client = connect(url).await?;

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
            && !bucket_keys(stack, &bucket, &raw_prefix)?.is_empty())
    })
    .await;
    if let Err(e) = moved {
        bail!("{e}\n{}", run.log_text());
    }
    assert!(pipeline.is_running());

    // The bucket's copies are whole: pyarrow reads them from the bucket and counts the rows.
    assert_eq!(
        bucket_rows(stack, &bucket, &raw_prefix)?,
        (1000, 1000),
        "rows and distinct (partition, offset) in the bucket"
    );

    // DataFusion reads them from the bucket too: the SQL endpoint's archive spans both tiers,
    // each row once although none of it is on the NAS any more.
    let sql = |q: &str| -> Result<serde_json::Value> {
        let (status, body) = http_post(http, "/v1/sql", &json!({ "sql": q }).to_string())?;
        if status != 200 {
            bail!("{q}: {status} {body}");
        }
        Ok(serde_json::from_str::<serde_json::Value>(&body)?["rows"].clone())
    };
    assert_eq!(
        sql(
            "SELECT count(*), count(DISTINCT kafka_partition * 1000000 + kafka_offset), \
             count(DISTINCT date || hour) FROM archive.telemetry_raw"
        )?,
        json!([[1000, 1000, 1]])
    );
    assert_eq!(
        sql("SELECT device_id, count(*) FROM archive.telemetry_raw \
             WHERE date = '2025-11-05' AND hour = '14' AND device_id = 'pi-3' GROUP BY device_id")?,
        json!([["pi-3", 143]]),
        "partition-pruned scan of the bucket"
    );

    let page = curl(&[&format!("http://{http}/metrics")])?;
    assert!(
        page.lines().any(
            |l| l.starts_with("primespark_archive_tier_reads_total{tier=\"bucket\"}")
                && !l.ends_with(" 0")
        ),
        "no archive read was served by the bucket"
    );
    assert!(
        page.lines()
            .any(|l| l.starts_with("primespark_tier_files_total{outcome=\"moved\"}")),
        "{page}"
    );
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    Ok(())
}
