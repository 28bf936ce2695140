//! Allowed lateness against the stack: an event later than the watermark but within
//! `windows.allowed_lateness` updates the already-written window (upsert); a later one is kept
//! raw and listed in `late_events` with how late it was, never aggregated. A kill and restart
//! after the update changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, minute_windows, produce, stack, unique,
    wait_until, Pipeline,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z

fn sample(t_ms: i64, value: f64) -> Vec<u8> {
    json!({"device_id": "d", "metrics": {"cpu_percent": value}, "timestamp": t_ms})
        .to_string()
        .into_bytes()
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> Result<i64> {
    Ok(client
        .query_one(sql, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0))
}

/// Writes the pipeline's configuration into `dir`: telemetry only, 5 s out-of-orderness,
/// `lateness` allowed, on `workers` workers.
fn write_config(
    dir: &std::path::Path,
    topic: &str,
    url: &str,
    lateness: &str,
    workers: usize,
) -> Result<std::path::PathBuf> {
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 100\nflush_interval = \"100ms\"\n\
             [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             [runtime]\nworkers = {workers}\n\
             [windows]\nmax_out_of_orderness = \"5s\"\nallowed_lateness = \"{lateness}\"\nidle_timeout = \"10m\"\n\
             [dataflows]\ninference = false\nanalytics = false\n[inference]\nenabled = false\n",
            stack().brokers,
            dir.join("nas").display(),
            free_port()
        ),
    )?;
    Ok(config)
}

/// The hour window from T0 as `(count, sum)`, and the same summed over `expected`'s minutes.
async fn hour_and_minutes(
    client: &tokio_postgres::Client,
    expected: &BTreeMap<i64, (i64, f64)>,
) -> Result<((i64, f64), (i64, f64))> {
    let hour: (i64, f64) = client
        .query_one(
            "SELECT count, sum FROM device_metrics_1h WHERE bucket = to_timestamp($1::float8 / 1000.0)",
            &[&(T0_MS as f64)],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))?;
    let minutes = expected
        .values()
        .fold((0, 0.0), |a, v| (a.0 + v.0, a.1 + v.1));
    Ok((hour, minutes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_update_windows_within_the_lateness_and_are_listed_beyond_it() -> Result<()> {
    let stack = stack();
    let db = unique("lateness");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 1).await?;
    let work = tempfile::tempdir()?;
    let config = write_config(work.path(), &topic, &url, "30s", 1)?;
    let log = work.path().join("pipeline.log");

    // On-time samples every 500 ms up to T0+200s: the watermark reaches T0+195s, so the
    // window [T0+120s, T0+180s) is written.
    let mut expected: BTreeMap<i64, (i64, f64)> = BTreeMap::new();
    let mut records = Vec::new();
    for i in 0..=400 {
        let t = T0_MS + i * 500;
        let v = (i % 100) as f64;
        records.push((0, sample(t, v)));
        let e = expected.entry(t.div_euclid(60_000) * 60_000).or_default();
        e.0 += 1;
        e.1 += v;
    }
    produce(stack, &topic, &records)?;
    let mut pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    let bucket_120 = T0_MS + 120_000;
    let written = format!(
        "SELECT count FROM device_metrics_1m WHERE bucket = to_timestamp({} / 1000.0)",
        bucket_120
    );
    wait_until(
        Duration::from_secs(120),
        "window [T0+120s, T0+180s)",
        || async { Ok(one(&client, &written).await? == expected[&bucket_120].0) },
    )
    .await?;

    // Late by 25 s (within 30 s): updates that written window. Late by 95 s: listed only.
    let allowed_late = T0_MS + 170_000;
    let too_late = T0_MS + 100_000;
    produce(
        stack,
        &topic,
        &[
            (0, sample(allowed_late, 99.25)),
            (0, sample(too_late, 42.5)),
            // Window updates commit when the watermark next moves (with the offsets that
            // cover them): one more on-time sample moves it.
            (0, sample(T0_MS + 206_000, 10.0)),
        ],
    )?;
    let e = expected.get_mut(&bucket_120).expect("bucket");
    e.0 += 1;
    e.1 += 99.25;
    let e = expected.entry(T0_MS + 180_000).or_default();
    e.0 += 1;
    e.1 += 10.0;
    let want_120 = expected[&bucket_120].0;
    let waited = wait_until(
        Duration::from_secs(60),
        "the late update and the late event",
        || async {
            Ok(one(&client, &written).await? == want_120
                && one(&client, "SELECT count(*) FROM late_events").await? == 1)
        },
    )
    .await;
    if let Err(e) = waited {
        anyhow::bail!(
            "{e}: window count {} (want {want_120}), late events {}, raw rows {}\n{}",
            one(&client, &written).await?,
            one(&client, "SELECT count(*) FROM late_events").await?,
            one(&client, "SELECT count(*) FROM device_metrics").await?,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    // Kill, restart, and close everything with a sentinel two hours ahead.
    pipeline.kill()?;
    produce(stack, &topic, &[(0, sample(T0_MS + 7_200_000, 1.0))])?;
    pipeline = Pipeline::start(&config, &[], &log)?;
    let expected_1m = expected.len() as i64;
    let waited = wait_until(Duration::from_secs(120), "every window", || async {
        Ok(
            one(&client, "SELECT count(*) FROM device_metrics_1m").await? >= expected_1m
                && one(&client, "SELECT count(*) FROM device_metrics_1h").await? >= 1,
        )
    })
    .await;
    if let Err(e) = waited {
        anyhow::bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(pipeline.is_running());

    let got = minute_windows(&client, "").await?;
    assert_eq!(
        got, expected,
        "1-minute windows: the allowed-late event in, the too-late one out"
    );
    let (hour, minutes) = hour_and_minutes(&client, &expected).await?;
    assert_eq!(hour, minutes, "1-hour window");

    // Raw rows: every event once, late ones included.
    assert_eq!(
        one(&client, "SELECT count(*) FROM device_metrics").await?,
        401 + 3 + 1
    );
    let late = client
        .query(
            "SELECT \"offset\", (extract(epoch FROM event_time) * 1000)::int8, late_by_ms FROM late_events",
            &[],
        )
        .await?;
    assert_eq!(late.len(), 1);
    let (offset, time, late_by): (i64, i64, f64) = (late[0].get(0), late[0].get(1), late[0].get(2));
    assert_eq!((offset, time), (402, too_late));
    // Watermark T0+195s (T0+200s minus 5 s), event at T0+100s.
    assert_eq!(late_by, 95_000.0);
    Ok(())
}

/// Two workers, one partition each. Worker A's partition is far ahead and sends a late event of
/// a window none of its on-time events fell in; worker B's partition, behind (its silence holds
/// the watermark back), sends an on-time event of that window. Both count, in the window as
/// committed past the late event's time and after a restart. (Here the combiner in front of
/// the window holds each partial until the frontier of every worker passes its time, so the
/// on-time partial reached the window first. Partials still in flight, between processes of a
/// cluster say, can arrive the other way round; `operators::window`'s tests force that order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_update_from_a_worker_ahead_and_an_on_time_event_from_one_behind_both_count(
) -> Result<()> {
    let stack = stack();
    let db = unique("lateness2w");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 2).await?;
    let work = tempfile::tempdir()?;
    let config = write_config(work.path(), &topic, &url, "120s", 2)?;
    let log = work.path().join("pipeline.log");
    let fail = |e: anyhow::Error| {
        anyhow::anyhow!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
    };
    let mut expected: BTreeMap<i64, (i64, f64)> = BTreeMap::new();
    let mut add = |t: i64, v: f64| {
        let e = expected.entry(t.div_euclid(60_000) * 60_000).or_default();
        e.0 += 1;
        e.1 += v;
    };
    // Partition 1 (worker B): one event at T0, then silence.
    // Partition 0 (worker A): every 500 ms up to T0+200s, none in [T0+60s, T0+120s).
    let mut records = vec![(1, sample(T0_MS, 1.0))];
    add(T0_MS, 1.0);
    for i in 0..=400 {
        let t = T0_MS + i * 500;
        if (T0_MS + 60_000..T0_MS + 120_000).contains(&t) {
            continue;
        }
        let v = (i % 100) as f64;
        records.push((0, sample(t, v)));
        add(t, v);
    }
    produce(stack, &topic, &records)?;
    let mut pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    let raw = |n: usize| {
        let client = &client;
        async move { Ok(one(client, "SELECT count(*) FROM device_metrics").await? == n as i64) }
    };
    let mut sent = records.len();
    wait_until(Duration::from_secs(120), "the first raw rows", || raw(sent))
        .await
        .map_err(fail)?;

    // A's watermark is at T0+195s: T0+100s is late (within the 120 s) for window
    // [T0+60s, T0+120s), which nothing of A's opened. The next event moves A's watermark past
    // the late one's time, so A's combiner hands its partial on to the window at once.
    produce(
        stack,
        &topic,
        &[
            (0, sample(T0_MS + 100_000, 99.25)),
            (0, sample(T0_MS + 206_000, 10.0)),
        ],
    )?;
    add(T0_MS + 100_000, 99.25);
    add(T0_MS + 206_000, 10.0);
    sent += 2;
    wait_until(Duration::from_secs(60), "the late raw row", || raw(sent))
        .await
        .map_err(fail)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // B, still at T0-5s, sends an on-time event of that window.
    produce(stack, &topic, &[(1, sample(T0_MS + 90_000, 7.0))])?;
    add(T0_MS + 90_000, 7.0);
    sent += 1;
    wait_until(Duration::from_secs(60), "the on-time raw row", || raw(sent))
        .await
        .map_err(fail)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // B moves on: the window closes and the update's time passes.
    produce(stack, &topic, &[(1, sample(T0_MS + 300_000, 1.0))])?;
    add(T0_MS + 300_000, 1.0);
    let bucket = T0_MS + 60_000;
    let want = expected[&bucket];
    assert_eq!(want.0, 2);
    // The commit that covers the update's time (T0+195s) writes every window row before it in
    // one transaction with the committed watermark: wait for that, then read the window (an
    // earlier commit may have shown the right count for a while).
    let committed = format!(
        "SELECT coalesce(max(committed_watermark_us), 0) FROM dataflow_state \
         WHERE committed_watermark_us >= {}",
        (T0_MS + 200_000) * 1000
    );
    wait_until(
        Duration::from_secs(60),
        "the commit past T0+200s",
        || async { Ok(one(&client, &committed).await? > 0) },
    )
    .await
    .map_err(fail)?;
    let got = minute_windows(&client, "").await?;
    assert_eq!(
        got.get(&bucket),
        Some(&want),
        "window [T0+60s, T0+120s): the late update and the on-time event"
    );

    // Close everything with a sentinel two hours ahead on both partitions, after a restart.
    pipeline.kill()?;
    produce(
        stack,
        &topic,
        &[
            (0, sample(T0_MS + 7_200_000, 1.0)),
            (1, sample(T0_MS + 7_200_000, 1.0)),
        ],
    )?;
    pipeline = Pipeline::start(&config, &[], &log)?;
    let expected_1m = expected.len() as i64;
    wait_until(Duration::from_secs(120), "every window", || async {
        Ok(
            one(&client, "SELECT count(*) FROM device_metrics_1m").await? >= expected_1m
                && one(&client, "SELECT count(*) FROM device_metrics_1h").await? >= 1,
        )
    })
    .await
    .map_err(fail)?;
    assert!(pipeline.is_running());
    assert_eq!(
        minute_windows(&client, "").await?,
        expected,
        "1-minute windows: the late update and the on-time event both in"
    );
    let (hour, minutes) = hour_and_minutes(&client, &expected).await?;
    assert_eq!(hour, minutes, "1-hour window");
    Ok(())
}
