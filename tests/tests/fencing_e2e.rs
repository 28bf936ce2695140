//! Two instances on one configuration against the stack (a rolling update, a second `run` to
//! debug, a pod slow to die): the second waits as a standby (`/readyz` 503 with the holder, the
//! lease metric), takes over within the lease's time to live when the first freezes, and the
//! frozen one, thawed, finds itself fenced and stops without writing. Every raw row, Parquet
//! row and window is there once.
//!
//! On a main without fencing both instances read every partition and wrote: raw rows doubled.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use primespark_tests::{
    connect, count, free_port, http_get, parquet_positions, produce, stack, wait_until, Pipeline,
    Sections, TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const PARTITIONS: i32 = 2;
const PER_BATCH: i64 = 600;

/// Batch `b`: `PER_BATCH` samples, 250 ms apart, alternating partitions.
fn batch(b: i64) -> Vec<(i32, Vec<u8>)> {
    (0..PER_BATCH)
        .map(|i| {
            let n = b * PER_BATCH + i;
            let t = T0_MS + n * 250;
            (
                (n % i64::from(PARTITIONS)) as i32,
                json!({"device_id": format!("pi-{}", n % 4), "metrics": {"cpu_percent": (n % 100) as f64}, "timestamp": t})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect()
}

fn readyz(addr: &str) -> String {
    http_get(addr, "/readyz").unwrap_or_default()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_is_a_standby_and_a_thawed_zombie_is_fenced() -> Result<()> {
    let run = TelemetryRun::new(
        "fencing",
        PARTITIONS,
        Sections {
            postgres: "flush_rows = 200\nflush_interval = \"100ms\"\nlease_ttl = \"3s\"",
            extra: "[windows]\nidle_timeout = \"10m\"\n[inference]\nenabled = false\n",
            ..Sections::default()
        },
    )
    .await?;
    let stack = stack();
    let client = connect(&run.url).await?;
    let raw = "SELECT count(*) FROM device_metrics";

    produce(stack, &run.topic, &batch(0))?;
    let mut first = run.start(&[])?;
    wait_until(Duration::from_secs(90), "the first batch", || async {
        Ok(count(&client, raw).await == PER_BATCH)
    })
    .await?;

    // The second instance: same configuration, its own HTTP port and log.
    let http_b = format!("127.0.0.1:{}", free_port());
    let log_b = run.work.path().join("second.log");
    let second = Pipeline::start(
        &run.config,
        &[("PRIMESPARK_QUERY__HTTP_ADDR", http_b.as_str())],
        &log_b,
    )?;
    let waited = wait_until(
        Duration::from_secs(60),
        "the second instance's standby",
        || async {
            let r = readyz(&http_b);
            Ok(r.starts_with("HTTP/1.1 503") && r.contains("standby"))
        },
    )
    .await;
    if let Err(e) = waited {
        anyhow::bail!("{e}: {}\n{}", readyz(&http_b), log_of(&log_b));
    }
    let metrics_b = http_get(&http_b, "/metrics")?;
    ensure!(
        metrics_b.contains("primespark_writer_lease{state=\"standby\"} 1"),
        "the standby's metric:\n{}",
        metrics_b
            .lines()
            .filter(|l| l.contains("writer_lease"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        readyz(&run.http).starts_with("HTTP/1.1 200"),
        "the writer is ready: {}",
        readyz(&run.http)
    );

    // While both run, only the writer writes.
    produce(stack, &run.topic, &batch(1))?;
    wait_until(Duration::from_secs(60), "the second batch", || async {
        Ok(count(&client, raw).await == 2 * PER_BATCH)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&client, raw).await,
        2 * PER_BATCH,
        "the standby wrote"
    );

    // The writer freezes (a pod slow to die, a long pause): the standby takes over.
    first.signal("STOP")?;
    let frozen = Instant::now();
    let waited = wait_until(Duration::from_secs(60), "the takeover", || async {
        Ok(readyz(&http_b).starts_with("HTTP/1.1 200"))
    })
    .await;
    let takeover = frozen.elapsed();
    if let Err(e) = waited {
        first.signal("CONT")?;
        anyhow::bail!("{e}: {}\n{}", readyz(&http_b), log_of(&log_b));
    }
    eprintln!(
        "takeover {:.1}s after the writer froze (lease_ttl 3s)",
        takeover.as_secs_f64()
    );
    produce(stack, &run.topic, &batch(2))?;
    let waited = wait_until(Duration::from_secs(90), "the third batch", || async {
        Ok(count(&client, raw).await >= 3 * PER_BATCH)
    })
    .await;
    if let Err(e) = waited {
        first.signal("CONT")?;
        anyhow::bail!(
            "{e}: {} rows\n{}",
            count(&client, raw).await,
            log_of(&log_b)
        );
    }

    // Thawed, the old writer learns it is fenced and stops without writing.
    first.signal("CONT")?;
    let thawed = Instant::now();
    while first.is_running() {
        ensure!(
            thawed.elapsed() < Duration::from_secs(30),
            "the fenced writer still runs 30 s after it thawed\n{}",
            run.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = first.exit_status();
    ensure!(
        status.and_then(|s| s.code()) == Some(3),
        "the fenced writer exits with 3 (restart: it becomes a standby), got {status:?}"
    );
    ensure!(
        run.log_text().contains("fenced"),
        "the fenced writer says why:\n{}",
        run.log_text()
    );

    // A sentinel two hours on closes every window; then everything is checked once.
    produce(
        stack,
        &run.topic,
        &(0..PARTITIONS)
            .map(|p| {
                (
                    p,
                    json!({"device_id": format!("sentinel-{p}"), "metrics": {"up": 1.0}, "timestamp": T0_MS + 7_200_000})
                        .to_string()
                        .into_bytes(),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    let total = 3 * PER_BATCH + i64::from(PARTITIONS);
    let archive = run.nas.join(format!("topic={}", run.topic));
    let mut expected: BTreeMap<(String, i64), (i64, f64)> = BTreeMap::new();
    for b in 0..3 {
        for i in 0..PER_BATCH {
            let n = b * PER_BATCH + i;
            let e = expected
                .entry((
                    format!("pi-{}", n % 4),
                    (T0_MS + n * 250).div_euclid(60_000) * 60_000,
                ))
                .or_default();
            e.0 += 1;
            e.1 += (n % 100) as f64;
        }
    }
    let windows = "SELECT count(*) FROM device_metrics_1m WHERE device_id NOT LIKE 'sentinel%'";
    let want_windows = expected.len() as i64;
    let waited = wait_until(Duration::from_secs(120), "every row and window", || async {
        Ok(count(&client, raw).await == total
            && count(&client, windows).await == want_windows
            && parquet_positions(&archive)
                .map(|p| p.len() as i64)
                .unwrap_or(0)
                == total)
    })
    .await;
    if let Err(e) = waited {
        anyhow::bail!(
            "{e}: raw {} of {total}, windows {} of {want_windows}, parquet {:?} of {total}\n{}",
            count(&client, raw).await,
            count(&client, windows).await,
            parquet_positions(&archive).map(|p| p.len()),
            log_of(&log_b)
        );
    }
    assert_eq!(
        count(
            &client,
            // Every sample has its own time.
            "SELECT count(*) FROM (SELECT DISTINCT time, device_id, metric_name FROM device_metrics) d"
        )
        .await,
        total,
        "raw rows once"
    );
    let positions = parquet_positions(&archive)?;
    let mut unique = positions.clone();
    unique.dedup();
    assert_eq!(unique.len(), positions.len(), "Parquet rows once");
    let rows = client
        .query(
            "SELECT device_id, (extract(epoch FROM bucket) * 1000)::int8, count, sum \
             FROM device_metrics_1m WHERE device_id NOT LIKE 'sentinel%'",
            &[],
        )
        .await?;
    let got: BTreeMap<(String, i64), (i64, f64)> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    assert_eq!(got, expected, "every window as an uninterrupted run");

    // A clean stop of the writer releases the lease at once.
    let status = second.terminate(Duration::from_secs(60))?;
    ensure!(status.success(), "the new writer stops cleanly: {status:?}");
    let released: String = client
        .query_one(
            "SELECT holder FROM writer_leases WHERE dataflow = 'telemetry' AND process_id = 0",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(released, "", "released at a clean shutdown");
    Ok(())
}
