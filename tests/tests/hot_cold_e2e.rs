//! One SQL over hot and cold data: `device_metrics` and `device_metrics_1m` on the SQL endpoint
//! read recent rows from PostgreSQL and older ones from the Parquet archive. Rows leave
//! PostgreSQL (as retention deletes them) between queries, and every query still counts each
//! row exactly once, with the same sums; `pg.*` and `archive.*` show the two copies apart.

use std::time::Duration;

use anyhow::{bail, Result};
use primespark_tests::{
    connect, produce, sql_first_row, stack, wait_until, Sections, TelemetryRun,
};
use serde_json::{json, Value};

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const EVENTS: i64 = 6000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_moving_out_of_postgres_are_counted_once() -> Result<()> {
    let stack = stack();
    let run = TelemetryRun::new(
        "hotcold",
        1,
        Sections {
            extra: "[inference]\nenabled = false",
            ..Sections::default()
        },
    )
    .await?;
    let (url, topic, http, log) = (&run.url, &run.topic, &run.http, &run.log);
    // One event per 100 ms over 10 minutes, two metrics each; a sentinel an hour later closes
    // every window.
    let mut records: Vec<(i32, Vec<u8>)> = (0..EVENTS)
        .map(|i| {
            let e = json!({"device_id": format!("pi-{}", i % 4), "timestamp": T0_MS + i * 100,
                           "metrics": {"cpu_percent": (i % 100) as f64, "load_avg": 1.5}});
            (0, e.to_string().into_bytes())
        })
        .collect();
    records.push((
        0,
        json!({"device_id": "sentinel", "timestamp": T0_MS + 3_600_000, "metrics": {"up": 1.0}})
            .to_string()
            .into_bytes(),
    ));
    produce(stack, topic, &records)?;
    let pipeline = run.start(&[])?;
    let points = EVENTS * 2 + 1;
    let client = connect(url).await?;
    let done = wait_until(Duration::from_secs(120), "rows in both tiers", || async {
        let pg: i64 = client
            .query_one("SELECT count(*) FROM device_metrics", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        let archived = sql_first_row(http, "SELECT count(*) FROM archive.telemetry_raw")
            .ok()
            .and_then(|r| r.first().and_then(Value::as_i64))
            .unwrap_or(0);
        let windows = sql_first_row(http, "SELECT count(*) FROM archive.device_metrics_1m")
            .ok()
            .and_then(|r| r.first().and_then(Value::as_i64))
            .unwrap_or(0);
        Ok(pg == points && archived == points && windows == 10 * 4 * 2)
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    let reference_sum: f64 = client
        .query_one("SELECT sum(value) FROM device_metrics", &[])
        .await?
        .get(0);
    let unified = "SELECT count(*), sum(value), min(time) FROM device_metrics";
    let windows = "SELECT count(*), sum(count) FROM device_metrics_1m";
    // Before, and after each of three retention steps of 3 minutes: the rows move, the
    // totals do not.
    for minutes in [0i64, 3, 6, 11] {
        if minutes > 0 {
            let cutoff = format!("to_timestamp({})", (T0_MS + minutes * 60_000) / 1000);
            client
                .batch_execute(&format!(
                    "DELETE FROM device_metrics WHERE time < {cutoff}; \
                     DELETE FROM device_metrics_1m WHERE bucket < {cutoff};"
                ))
                .await?;
        }
        let hot: i64 = sql_first_row(http, "SELECT count(*) FROM pg.device_metrics")?[0]
            .as_i64()
            .unwrap_or(-1);
        let row = sql_first_row(http, unified)?;
        assert_eq!(
            row[0].as_i64(),
            Some(points),
            "after {minutes} min moved ({hot} hot rows)"
        );
        let sum = row[1].as_f64().unwrap_or(f64::NAN);
        assert!(
            (sum - reference_sum).abs() < 1e-6,
            "sum {sum} vs {reference_sum}"
        );
        assert!(
            row[2]
                .as_str()
                .unwrap_or("")
                .starts_with("2025-11-05T14:00:00"),
            "{row:?}"
        );
        let w = sql_first_row(http, windows)?;
        assert_eq!(
            (w[0].as_i64(), w[1].as_i64()),
            (Some(80), Some(points - 1)),
            "windows after {minutes} min moved"
        );
        // A filter over the boundary is answered by both tiers.
        let r = sql_first_row(
            http,
            "SELECT count(*) FROM device_metrics WHERE time >= TIMESTAMPTZ '2025-11-05T14:02:00Z' AND time < TIMESTAMPTZ '2025-11-05T14:08:00Z'",
        )?;
        assert_eq!(
            r[0].as_i64(),
            Some(6 * 600 * 2),
            "after {minutes} min moved"
        );
        if minutes == 11 {
            assert_eq!(hot, 1, "only the sentinel is still hot");
        }
    }
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// The boundary is the oldest time in PostgreSQL, but never before the retention horizon: rows
/// retention removed from PostgreSQL are still read from the archive after one late event dated
/// ten days back lands in PostgreSQL (on a main where the boundary was `min(time)` alone, that
/// event moved it back and the removed rows vanished from SQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_old_late_row_does_not_hide_rows_retention_removed() -> Result<()> {
    let stack = stack();
    let run = TelemetryRun::new(
        "hotcold_late",
        1,
        Sections {
            postgres: "flush_rows = 100\nflush_interval = \"100ms\"\n\
                       [postgres.retention]\nenabled = true\nraw_telemetry = \"2d\"\ninterval = \"1h\"",
            extra: "[inference]\nenabled = false",
            ..Sections::default()
        },
    )
    .await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let sample = |t: i64, v: f64| {
        json!({"device_id": "pi", "metrics": {"cpu_percent": v}, "timestamp": t})
            .to_string()
            .into_bytes()
    };
    // History three days old, then the last hour, in order; then one event ten days old (late).
    let old_start = now_ms - 3 * 86_400_000;
    let recent_start = now_ms - 3_600_000;
    let mut records: Vec<(i32, Vec<u8>)> = (0..100)
        .map(|i| (0, sample(old_start + i * 1000, 1.0)))
        .chain((0..100).map(|i| (0, sample(recent_start + i * 1000, 2.0))))
        .collect();
    records.push((0, sample(now_ms - 10 * 86_400_000, 4.0)));
    produce(stack, &run.topic, &records)?;
    // The suites' command turns retention off; this test is about its horizon.
    let _pipeline = run.start(&[("PRIMESPARK_POSTGRES__RETENTION__ENABLED", "true")])?;
    let client = connect(&run.url).await?;
    let archived = run.nas.join(format!("topic={}", run.topic));
    let waited = wait_until(Duration::from_secs(120), "every row stored", || async {
        Ok(
            primespark_tests::count(&client, "SELECT count(*) FROM late_events").await == 1
                && primespark_tests::parquet_rows(&archived).unwrap_or(0) == 201,
        )
    })
    .await;
    if let Err(e) = waited {
        bail!("{e}\n{}", run.log_text());
    }
    // What retention does to the history (whether or not its pass ran yet); the late event is
    // younger than the cutoff's first pass and stays.
    client
        .execute(
            "DELETE FROM device_metrics WHERE time < now() - interval '2 days' AND time > now() - interval '5 days'",
            &[],
        )
        .await?;
    let got = sql_first_row(
        &run.http,
        "SELECT count(*) AS n, sum(value) AS s FROM device_metrics",
    )?;
    assert_eq!(
        (got[0].as_i64(), got[1].as_f64()),
        (Some(201), Some(100.0 + 200.0 + 4.0)),
        "every row once: the history from the archive, the last hour from PostgreSQL"
    );
    Ok(())
}
