//! PostgreSQL down for 30 s mid-stream: the pipeline keeps running, reports the sink degraded
//! (metric and `/readyz`), holds its memory (the sources pause instead of buffering), and once
//! PostgreSQL is back stores every row exactly once without a restart. (One test per binary:
//! the service is shared, and tests of one binary run in parallel.)

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use primespark_tests::{
    connect, http_get, produce, stack, stack_service, wait_until, Sections, TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;
const EVENTS: usize = 60_000;

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30s_loses_nothing_and_recovers_by_itself() -> Result<()> {
    let stack = stack();
    let run = TelemetryRun::new(
        "outage",
        2,
        Sections {
            postgres: "flush_rows = 2000\nflush_interval = \"200ms\"",
            ..Sections::default()
        },
    )
    .await?;
    let (url, topic, http, log) = (&run.url, &run.topic, &run.http, &run.log);
    let records: Vec<(i32, Vec<u8>)> = (0..EVENTS)
        .map(|i| {
            (
                (i % 2) as i32,
                json!({"device_id": format!("pi-{}", i % 20), "timestamp": T0_MS + (i / 2) as i64 * 10,
                       "metrics": {"cpu_percent": (i % 100) as f64, "load_avg": 1.0}})
                .to_string()
                .into_bytes(),
            )
        })
        .collect();
    let mut pipeline = run.start(&[])?;
    let client = connect(url).await?;
    produce(stack, topic, &records[..EVENTS / 3])?;
    wait_until(Duration::from_secs(60), "first rows", || async {
        Ok(client
            .query_one("SELECT count(*) FROM device_metrics", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            > 0)
    })
    .await?;
    drop(client);

    // Down for 30 s while the rest is produced.
    stack_service("stop-service", "postgres")?;
    let down_at = Instant::now();
    produce(stack, topic, &records[EVENTS / 3..])?;
    let mut degraded_seen = false;
    let mut not_ready_seen = false;
    let mut peak_rss: f64 = 0.0;
    while down_at.elapsed() < Duration::from_secs(30) {
        assert!(
            pipeline.is_running(),
            "the pipeline exited during the outage"
        );
        peak_rss = peak_rss.max(rss_mb(pipeline.pid()));
        if let Ok(m) = http_get(http, "/metrics") {
            degraded_seen |= m
                .lines()
                .any(|l| l.starts_with("primespark_sink_degraded{") && l.ends_with(" 1"));
        }
        if let Ok(r) = http_get(http, "/readyz") {
            not_ready_seen |= r.starts_with("HTTP/1.1 503");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stack_service("start-service", "postgres")?;
    assert!(degraded_seen, "no sink reported degraded during the outage");
    assert!(not_ready_seen, "/readyz stayed ready during the outage");
    // Sources pause instead of buffering: the process stays small.
    assert!(peak_rss < 512.0, "RSS {peak_rss:.0} MB during the outage");

    let client = connect(url).await?;
    let points = (EVENTS * 2) as i64;
    let done = wait_until(
        Duration::from_secs(120),
        "every row after the outage",
        || async {
            let n = |sql: &'static str| {
                let client = &client;
                async move {
                    client
                        .query_one(sql, &[])
                        .await
                        .map(|r| r.get::<_, i64>(0))
                        .unwrap_or(0)
                }
            };
            Ok(n("SELECT count(*) FROM device_metrics").await >= points
                && n("SELECT count(*) FROM anomaly_scores").await >= EVENTS as i64)
        },
    )
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (time, device_id, metric_name)) FROM device_metrics",
            &[],
        )
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (points, points)
    );
    let scores: i64 = client
        .query_one("SELECT count(*) FROM anomaly_scores", &[])
        .await?
        .get(0);
    assert_eq!(scores, EVENTS as i64);
    assert!(pipeline.is_running(), "recovered without a restart");
    // Degraded clears once every writer succeeded again (the aggregate writer may still be in
    // its backoff, up to 10 s, when the raw rows are complete).
    let mut still: Vec<String> = Vec::new();
    let cleared = wait_until(Duration::from_secs(60), "degraded cleared", || {
        let metrics = http_get(http, "/metrics");
        still = metrics
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter(|l| l.starts_with("primespark_sink_degraded{") && l.ends_with(" 1"))
            .map(str::to_owned)
            .collect();
        let ok = metrics.is_ok() && still.is_empty();
        async move { Ok(ok) }
    })
    .await;
    assert!(cleared.is_ok(), "still degraded: {still:?}");
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}
