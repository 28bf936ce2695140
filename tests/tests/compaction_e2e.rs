//! Compaction of the 1-minute aggregate files through a running pipeline: once an hour of
//! windows is final its sixty per-window files become one hour file, which tiers to the bucket
//! (minute files never do); SQL over the archive then reads the hour file from the bucket and
//! finds exactly the windows PostgreSQL holds, while the open hour's minute files are read
//! beside it.

use std::time::Duration;

use anyhow::{bail, Result};
use primespark_connectors::nas::compact::{hour_file_name, minute_file_bucket};
use primespark_tests::{
    bucket_keys, connect, count_files, curl, http_post, produce, stack, unique, wait_until,
    Sections, TelemetryRun,
};
use serde_json::{json, Value};

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z

fn sql(http: &str, q: &str) -> Result<Value> {
    let (status, body) = http_post(http, "/v1/sql", &json!({ "sql": q }).to_string())?;
    if status != 200 {
        bail!("{q}: {status} {body}");
    }
    Ok(serde_json::from_str::<Value>(&body)?["rows"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_hours_are_compacted_tiered_and_read_once() -> Result<()> {
    let stack = stack();
    let bucket = unique("compact").replace('_', "-");
    // 14:00-14:40, one event per second per partition, three devices and two metrics; then
    // 15:10-15:13, so hour 14 is final (watermark past 15:00) and the windows 15:10 and 15:11
    // are closed but their hour is not final.
    let mut records: Vec<(i32, Vec<u8>)> = Vec::new();
    let seconds = (0..2400).chain(4200..4380);
    for s in seconds {
        for p in 0..2i32 {
            let e = json!({"device_id": format!("pi-{}", (s + i64::from(p)) % 3),
                           "metrics": {"cpu_percent": (s % 100) as f64, "load_avg": 0.25},
                           "timestamp": T0_MS + s * 1000});
            records.push((p, e.to_string().into_bytes()));
        }
    }
    let run = TelemetryRun::new(
        "compact",
        2,
        Sections {
            // Merged minute files wait out a short grace (a query's timeout) before removal.
            nas: "compaction_grace = \"3s\"",
            query: "timeout = \"3s\"",
            extra: &format!(
            "[s3]\nenabled = true\nbucket = \"{bucket}\"\nprefix = \"archive\"\nendpoint = \"{}\"\n\
             allow_http = true\n[tier]\nafter = \"1s\"\ninterval = \"1s\"\n[inference]\nenabled = false\n",
                stack.s3_endpoint
            ),
            ..Sections::default()
        },
    )
    .await?;
    let (nas, http) = (&run.nas, &run.http);
    curl(&["-X", "PUT", &format!("{}/{bucket}", stack.s3_endpoint)])?;
    produce(stack, &run.topic, &records)?;
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let mut pipeline = run.start(&env)?;
    let client = connect(&run.url).await?;
    // A reader querying the archive over and over while the hour is compacted and tiered
    // under it: no query may fail because a file it listed went away.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, http) = (stop.clone(), http.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut answered = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body =
                    json!({ "sql": "SELECT count(*), sum(sum) FROM archive.device_metrics_1m" })
                        .to_string();
                match http_post(&http, "/v1/sql", &body) {
                    Ok((200, _)) => answered += 1,
                    // Not up yet.
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    Ok((status, body)) => failures.push(format!("{status} {body}")),
                }
            }
            (answered, failures)
        })
    };

    // Hour 14 as one file in the bucket, none of its minute files left anywhere.
    let minute_dir = nas.join("table=device_metrics_1m");
    let prefix = "archive/table=device_metrics_1m/";
    let hour_key = format!("{prefix}date=2025-11-05/{}", hour_file_name(T0_MS * 1000));
    let compacted = wait_until(
        Duration::from_secs(120),
        "hour 14 compacted and tiered",
        || async {
            let keys = bucket_keys(stack, &bucket, prefix)?;
            let hour14_minutes = std::fs::read_dir(minute_dir.join("date=2025-11-05"))
                .map(|d| {
                    d.flatten()
                        .filter(|f| {
                            minute_file_bucket(&f.file_name().to_string_lossy())
                                .is_some_and(|b| b < (T0_MS + 3_600_000) * 1000)
                        })
                        .count()
                })
                .unwrap_or(usize::MAX);
            Ok(keys.contains(&hour_key) && hour14_minutes == 0)
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failures) = reader.join().expect("the reader thread ends");
    if let Err(e) = compacted {
        bail!("{e}\n{}", run.log_text());
    }
    assert!(answered > 0, "the reader got no answer");
    assert!(
        failures.is_empty(),
        "{} of {} queries failed while the hour was compacted, first: {}",
        failures.len(),
        failures.len() as u32 + answered,
        failures[0]
    );
    let keys = bucket_keys(stack, &bucket, prefix)?;
    assert!(
        keys.iter().all(|k| !k.contains("/part-b")),
        "a minute file was tiered: {keys:?}"
    );
    // The open hour's closed windows are minute files on the NAS.
    wait_until(
        Duration::from_secs(60),
        "15:10 windows on the NAS",
        || async { Ok(count_files(&minute_dir, "parquet") >= 2) },
    )
    .await?;

    // Every window PostgreSQL holds, once, from the hour file in the bucket and the minute files
    // on the NAS: compared row by row.
    let ours = sql(
        http,
        "SELECT CAST(bucket AS BIGINT), device_id, metric_name, count, sum \
         FROM archive.device_metrics_1m ORDER BY 1, 2, 3",
    )?;
    let ours = ours.as_array().cloned().unwrap_or_default();
    let theirs: Vec<Value> = client
        .query(
            "SELECT (extract(epoch FROM bucket) * 1000000)::int8, device_id, metric_name, count, \
             sum FROM device_metrics_1m ORDER BY 1, 2, 3",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!([
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, i64>(3),
                r.get::<_, f64>(4)
            ])
        })
        .collect();
    // 40 windows of hour 14 and 2 closed ones after, 3 devices x 2 metrics each.
    assert_eq!(theirs.len(), 42 * 6, "windows in PostgreSQL");
    assert_eq!(ours, theirs, "archive windows differ from PostgreSQL's");
    // The unified table (recent rows from PostgreSQL) agrees too.
    assert_eq!(
        sql(http, "SELECT count(*), sum(count) FROM device_metrics_1m")?,
        json!([[42 * 6, (2400 + 120) * 2 * 2]])
    );

    let page = curl(&[&format!("http://{http}/metrics")])?;
    assert!(
        page.lines()
            .any(|l| l
                == "primespark_aggregate_files_compacted_total{table=\"device_metrics_1m\"} 40"),
        "{}",
        page.lines()
            .filter(|l| l.contains("compacted"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(pipeline.is_running());
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    Ok(())
}
