//! Event-time guards against the stack: one device whose clock says 2099 on a one-partition
//! topic must not move the watermark (it is a `future_timestamp` dead letter, every other event
//! aggregates, the committed watermark stays sane), and naive local timestamps from a Pi in
//! `Europe/Berlin` are read in that zone, not as UTC.
//!
//! On a main without the guards the 2099 event made every later event late (the committed
//! watermark became 2099) and the naive times landed two hours off.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use chrono::{TimeZone, Utc};
use primespark_tests::{
    connect, count, http_get, minute_windows, produce, stack, wait_until, Sections, TelemetryRun,
};
use serde_json::json;

/// 2025-07-10T11:00:00Z, 13:00 in Berlin (summer time, UTC+2).
const T0_MS: i64 = 1_752_145_200_000;
const BERLIN_OFFSET_MS: i64 = 2 * 3_600_000;
const EVENTS: i64 = 1_200;
const STEP_MS: i64 = 250;
/// Where the 2099 event goes.
const FUTURE_AT: i64 = 300;

/// A naive `isoformat()` of `t_ms` in Berlin local time, as `datetime.now().isoformat()` sends.
fn berlin_naive(t_ms: i64) -> String {
    Utc.timestamp_millis_opt(t_ms + BERLIN_OFFSET_MS)
        .single()
        .map(|t| t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
        .unwrap_or_default()
}

fn sample(timestamp: &str, value: f64) -> Vec<u8> {
    json!({"device_id": "pi-berlin", "metrics": {"cpu_percent": value}, "timestamp": timestamp})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_event_is_a_dead_letter_and_naive_times_are_read_in_their_zone() -> Result<()>
{
    let run = TelemetryRun::new(
        "clock",
        1,
        Sections {
            postgres: "flush_rows = 200\nflush_interval = \"100ms\"",
            extra: "[windows]\nmax_out_of_orderness = \"5s\"\nidle_timeout = \"10m\"\n\
                    max_future = \"5m\"\n[windows.naive_timezones]\ntelemetry = \"Europe/Berlin\"\n\
                    [inference]\nenabled = false\n",
            ..Sections::default()
        },
    )
    .await?;
    let stack = stack();

    let mut expected: BTreeMap<i64, (i64, f64)> = BTreeMap::new();
    let mut records = Vec::new();
    for i in 0..EVENTS {
        if i == FUTURE_AT {
            records.push((0, sample("2099-01-01T00:00:00Z", 50.0)));
        }
        if i == 481 {
            // In order (just after T0+120s); an explicit offset wins over the configured zone.
            records.push((0, sample("2025-07-10T11:02:00.125+00:00", 7.0)));
        }
        let t = T0_MS + i * STEP_MS;
        let v = (i % 100) as f64;
        records.push((0, sample(&berlin_naive(t), v)));
        let e = expected.entry(t.div_euclid(60_000) * 60_000).or_default();
        e.0 += 1;
        e.1 += v;
    }
    let e = expected.entry(T0_MS + 120_000).or_default();
    e.0 += 1;
    e.1 += 7.0;
    // Closes every window above (its own stays open).
    let sentinel = T0_MS + 600_000;
    records.push((0, sample(&berlin_naive(sentinel), 1.0)));
    produce(stack, &run.topic, &records)?;

    let pipeline = run.start(&[])?;
    let client = connect(&run.url).await?;
    let want_windows = expected.len() as i64;
    let windows = format!(
        "SELECT count(*) FROM device_metrics_1m WHERE bucket < to_timestamp({} / 1000.0)",
        sentinel
    );
    let waited = wait_until(
        Duration::from_secs(120),
        "every window and the letter",
        || async {
            Ok(count(&client, &windows).await >= want_windows
                && count(&client, "SELECT count(*) FROM dead_letters").await >= 1)
        },
    )
    .await;
    if let Err(e) = waited {
        anyhow::bail!(
            "{e}: {} windows (want {want_windows}), {} letters\n{}",
            count(&client, &windows).await,
            count(&client, "SELECT count(*) FROM dead_letters").await,
            run.log_text()
        );
    }

    let got = minute_windows(
        &client,
        &format!("WHERE bucket < to_timestamp({sentinel} / 1000.0)"),
    )
    .await?;
    assert_eq!(
        got, expected,
        "1-minute windows in UTC, every normal event in, the 2099 one out"
    );

    let letters = client
        .query(
            "SELECT partition, \"offset\", reason, error FROM dead_letters",
            &[],
        )
        .await?;
    assert_eq!(letters.len(), 1, "one dead letter");
    let (partition, offset, reason, error): (i32, i64, String, String) = (
        letters[0].get(0),
        letters[0].get(1),
        letters[0].get(2),
        letters[0].get(3),
    );
    assert_eq!((partition, offset), (0, FUTURE_AT));
    assert_eq!(reason, "future_timestamp");
    assert!(
        error.contains("2099-01-01") && error.contains("windows.max_future"),
        "the letter says why: {error}"
    );

    // Raw rows: every event except the 2099 one, at its UTC instant.
    assert_eq!(
        count(&client, "SELECT count(*) FROM device_metrics").await,
        EVENTS + 2
    );
    let first: i64 = client
        .query_one(
            "SELECT (extract(epoch FROM min(time)) * 1000)::int8 FROM device_metrics",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(first, T0_MS, "naive 13:00 Berlin is 11:00 UTC");

    // The committed watermark is the stream's, not the broken clock's.
    let committed: i64 = client
        .query_one(
            "SELECT committed_watermark_us FROM dataflow_state WHERE dataflow = 'telemetry'",
            &[],
        )
        .await?
        .get(0);
    assert!(
        (T0_MS * 1000..=sentinel * 1000).contains(&committed),
        "committed watermark {committed}us is outside the stream's own times"
    );
    let metrics = http_get(&run.http, "/metrics")?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("primespark_decode_errors_total")
                && l.contains("reason=\"future_timestamp\"")
                && l.trim_end().ends_with(" 1")),
        "the counter moved:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("decode_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A restart keeps aggregating what follows: nothing is stuck behind 2099.
    pipeline.kill()?;
    let after = sentinel + 120_000;
    produce(stack, &run.topic, &[(0, sample(&berlin_naive(after), 3.0))])?;
    let mut pipeline = run.start(&[])?;
    let sentinel_window = format!(
        "SELECT count FROM device_metrics_1m WHERE bucket = to_timestamp({} / 1000.0)",
        sentinel
    );
    let waited = wait_until(
        Duration::from_secs(120),
        "the sentinel's window",
        || async { Ok(count(&client, &sentinel_window).await == 1) },
    )
    .await;
    if let Err(e) = waited {
        anyhow::bail!("{e}\n{}", run.log_text());
    }
    assert!(pipeline.is_running());
    assert_eq!(
        count(&client, "SELECT count(*) FROM dead_letters").await,
        1,
        "the letter is not written twice on replay"
    );
    Ok(())
}
