//! Per-stream sink routing: `[routes.telemetry] raw = ["parquet"]` keeps telemetry's raw rows out
//! of PostgreSQL (the NAS holds them) while its windows stay in PostgreSQL, exact, across a
//! SIGKILL and a restart. SQL's `device_metrics` then answers raw history from the archive;
//! PostgreSQL itself (what a Grafana panel reading it directly sees) has no raw row, but still
//! every dead letter and late event, and the stream's positions; rows it kept from before the
//! route do not shadow the archive.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use primespark_tests::{
    connect, count, parquet_positions, produce, sql_first_row, stack, wait_until, Sections,
    TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const EVENTS: i64 = 6000;
const DEVICES: i64 = 4;

fn event(i: i64) -> (i32, Vec<u8>) {
    let e = json!({"device_id": format!("pi-{}", i % DEVICES), "timestamp": T0_MS + i * 100,
                   "metrics": {"cpu_percent": (i % 100) as f64, "load_avg": 1.5}});
    ((i % 2) as i32, e.to_string().into_bytes())
}

/// (device, metric, bucket ms) -> (count, sum) of the events the test sends.
fn expected_windows() -> BTreeMap<(String, String, i64), (i64, f64)> {
    let mut windows = BTreeMap::new();
    for i in 0..EVENTS {
        let bucket = (T0_MS + i * 100) / 60_000 * 60_000;
        let device = format!("pi-{}", i % DEVICES);
        for (metric, value) in [("cpu_percent", (i % 100) as f64), ("load_avg", 1.5)] {
            let w = windows
                .entry((device.clone(), metric.to_owned(), bucket))
                .or_insert((0, 0.0));
            w.0 += 1;
            w.1 += value;
        }
    }
    windows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_rows_to_the_archive_windows_to_postgres() -> Result<()> {
    let stack = stack();
    let run = TelemetryRun::new(
        "routes",
        2,
        Sections {
            extra: "[inference]\nenabled = false\n[routes.telemetry]\nraw = [\"parquet\"]",
            ..Sections::default()
        },
    )
    .await?;
    let (http, topic) = (&run.http, &run.topic);
    let archived = run.nas.join(format!("topic={topic}"));
    let client = connect(&run.url).await?;

    // The first half, and a SIGKILL once some of it is stored.
    let first: Vec<_> = (0..EVENTS / 2).map(event).collect();
    produce(stack, topic, &first)?;
    let pipeline = run.start(&[])?;
    let stored = wait_until(
        Duration::from_secs(120),
        "part of the first half stored",
        || async {
            Ok(parquet_positions(&archived).map_or(0, |p| p.len()) > 1000
                && count(&client, "SELECT count(*) FROM device_metrics_1m").await > 0)
        },
    )
    .await;
    if let Err(e) = stored {
        bail!("{e}\n{}", run.log_text());
    }
    pipeline.kill()?;

    // The rest, a malformed record, a sentinel an hour later on each partition (the watermark
    // is their minimum) that closes every window, then an event for the first minute (late:
    // its window is closed).
    let mut rest: Vec<_> = (EVENTS / 2..EVENTS).map(event).collect();
    rest.push((1, b"{not json".to_vec()));
    let sample = |t: i64, v: f64| {
        json!({"device_id": "pi-0", "timestamp": t, "metrics": {"cpu_percent": v}})
            .to_string()
            .into_bytes()
    };
    rest.push((0, sample(T0_MS + 3_600_000, 1.0)));
    rest.push((1, sample(T0_MS + 3_600_000, 1.0)));
    rest.push((0, sample(T0_MS + 5, 7.0)));
    produce(stack, topic, &rest)?;
    let pipeline = run.start(&[])?;
    let expected = expected_windows();
    // Points: two per event, the sentinels' and the late event's.
    let points = EVENTS * 2 + 3;
    let done = wait_until(Duration::from_secs(180), "every row stored", || async {
        Ok(
            parquet_positions(&archived).map_or(0, |p| p.len()) as i64 == points
                && count(&client, "SELECT count(*) FROM device_metrics_1m").await
                    == expected.len() as i64
                && count(&client, "SELECT count(*) FROM late_events").await == 1
                && count(&client, "SELECT count(*) FROM dead_letters").await == 1,
        )
    })
    .await;
    if let Err(e) = done {
        bail!(
            "{e}: {} archived points of {points}, {} windows of {}, {} late events, {} dead letters\n{}",
            parquet_positions(&archived).map_or(0, |p| p.len()),
            count(&client, "SELECT count(*) FROM device_metrics_1m").await,
            expected.len(),
            count(&client, "SELECT count(*) FROM late_events").await,
            count(&client, "SELECT count(*) FROM dead_letters").await,
            run.log_text()
        );
    }

    // The archive holds each record's points once (no duplicate from the replay after the kill).
    let positions = parquet_positions(&archived)?;
    let mut per_record: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    for p in &positions {
        *per_record.entry(*p).or_default() += 1;
    }
    ensure!(
        per_record.len() as i64 == EVENTS + 3,
        "{} records archived",
        per_record.len()
    );
    ensure!(
        per_record.values().filter(|n| **n == 2).count() as i64 == EVENTS,
        "a record archived twice or in part"
    );

    // PostgreSQL: no raw row, the windows exact.
    ensure!(
        count(&client, "SELECT count(*) FROM device_metrics").await == 0,
        "raw rows reached PostgreSQL"
    );
    let rows = client
        .query(
            "SELECT device_id, metric_name, (extract(epoch FROM bucket) * 1000)::int8, count, sum \
             FROM device_metrics_1m",
            &[],
        )
        .await?;
    let got: BTreeMap<(String, String, i64), (i64, f64)> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), (r.get(3), r.get(4))))
        .collect();
    ensure!(got.len() == expected.len(), "{} windows", got.len());
    for (key, (n, sum)) in &expected {
        let Some((got_n, got_sum)) = got.get(key) else {
            bail!("no window {key:?}");
        };
        ensure!(
            got_n == n && (got_sum - sum).abs() < 1e-6,
            "{key:?}: {got_n} {got_sum}, expected {n} {sum}"
        );
    }
    let stored_positions = count(
        &client,
        "SELECT count(*) FROM source_offsets WHERE sink = 'postgres_raw'",
    )
    .await;
    ensure!(
        stored_positions == 2,
        "{stored_positions} partitions' positions in PostgreSQL"
    );

    // Rows PostgreSQL kept from before the route (the archive has them too): event 3000's two
    // points. SQL must not take them as the start of a hot tier.
    client
        .batch_execute(
            "INSERT INTO device_metrics (time, device_id, metric_name, value) VALUES \
             ('2025-11-05T14:05:00Z', 'pi-0', 'cpu_percent', 0), \
             ('2025-11-05T14:05:00Z', 'pi-0', 'load_avg', 1.5)",
        )
        .await?;

    // SQL: raw history from the archive under PostgreSQL's name, windows from PostgreSQL.
    let reference_sum: f64 = (0..EVENTS).map(|i| (i % 100) as f64 + 1.5).sum::<f64>() + 2.0 + 7.0;
    let all = sql_first_row(
        http,
        "SELECT count(*), sum(value), min(time) FROM device_metrics",
    )?;
    ensure!(all[0].as_i64() == Some(points), "{all:?}");
    ensure!(
        (all[1].as_f64().unwrap_or(f64::NAN) - reference_sum).abs() < 1e-6,
        "{all:?} vs {reference_sum}"
    );
    ensure!(
        all[2]
            .as_str()
            .unwrap_or("")
            .starts_with("2025-11-05T14:00:00"),
        "{all:?}"
    );
    let one_device = sql_first_row(
        http,
        "SELECT count(*) FROM device_metrics WHERE device_id = 'pi-1' AND metric_name = 'load_avg' \
         AND time >= TIMESTAMPTZ '2025-11-05T14:02:00Z' AND time < TIMESTAMPTZ '2025-11-05T14:04:00Z'",
    )?;
    ensure!(one_device[0].as_i64() == Some(300), "{one_device:?}");
    let hot = sql_first_row(http, "SELECT count(*) FROM pg.device_metrics")?;
    ensure!(hot[0].as_i64() == Some(2), "{hot:?}");
    let windows = sql_first_row(http, "SELECT count(*), sum(count) FROM device_metrics_1m")?;
    ensure!(
        windows[0].as_i64() == Some(expected.len() as i64)
            && windows[1].as_i64() == Some(EVENTS * 2),
        "{windows:?}"
    );
    pipeline.terminate(Duration::from_secs(30))?;
    Ok(())
}
