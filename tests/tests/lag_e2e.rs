//! Consumer lag with a paused start, against the stack: run the pipeline over M records and stop
//! it (SIGTERM), produce N more, start it paused (`runtime.start_paused`, as `run --paused`):
//! the lag it reports per partition is exactly what was produced since its committed offsets,
//! and nothing is read. SIGUSR1 resumes it: every record lands once and the lag drains to 0.

use std::time::Duration;

use anyhow::Result;
use primespark_tests::{
    connect, create_topic, free_port, fresh_database, http_get, produce, stack, unique, wait_until,
    Pipeline,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000;

fn records(partition: i32, from: i64, n: i64) -> Vec<(i32, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            (
                partition,
                json!({"device_id": format!("pi-{partition}"), "metrics": {"cpu_percent": (i % 100) as f64},
                       "timestamp": T0_MS + i * 100})
                .to_string()
                .into_bytes(),
            )
        })
        .collect()
}

/// The value of one series in a /metrics page.
fn series(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_start_reports_the_lag_of_what_was_produced_while_stopped() -> Result<()> {
    let stack = stack();
    let db = unique("lag");
    let url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 2).await?;
    let work = tempfile::tempdir()?;
    let http = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 100\nflush_interval = \"200ms\"\n\
             [nas]\nenabled = false\n[query]\nhttp_addr = \"{http}\"\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            stack.brokers,
        ),
    )?;
    let log = work.path().join("pipeline.log");
    let client = connect(&url).await?;
    let rows = || async {
        Ok::<i64, anyhow::Error>(
            client
                .query_one("SELECT count(*) FROM device_metrics", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0),
        )
    };

    // M records, consumed and committed; a clean stop.
    let mut first = records(0, 0, 200);
    first.extend(records(1, 0, 300));
    produce(stack, &topic, &first)?;
    let pipeline = Pipeline::start(&config, &[], &log)?;
    wait_until(Duration::from_secs(120), "the first 500 rows", || async {
        Ok(rows().await? == 500)
    })
    .await?;
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "SIGTERM exit: {status}");

    // N more while stopped: 120 on partition 0, 75 on partition 1.
    let mut second = records(0, 200, 120);
    second.extend(records(1, 300, 75));
    produce(stack, &topic, &second)?;
    let mut pipeline = Pipeline::start(
        &config,
        &[("PRIMESPARK_RUNTIME__START_PAUSED", "true")],
        &log,
    )?;
    let lag = |p: i32, page: &str| {
        series(
            page,
            &format!("primespark_consumer_lag_records{{topic=\"{topic}\",partition=\"{p}\"}}"),
        )
    };
    let mut page = String::new();
    let seen = wait_until(Duration::from_secs(60), "lag of the paused start", || {
        let got = http_get(&http, "/metrics").unwrap_or_default();
        let done = lag(0, &got) == Some(120.0) && lag(1, &got) == Some(75.0);
        page = got;
        async move { Ok(done) }
    })
    .await;
    if let Err(e) = seen {
        anyhow::bail!(
            "{e}\n{page}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    // Paused means paused: nothing was read or written.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rows().await?, 500, "a paused pipeline wrote rows");
    let page = http_get(&http, "/metrics")?;
    for p in 0..2 {
        let read = series(
            &page,
            &format!("primespark_source_records_total{{topic=\"{topic}\",partition=\"{p}\"}}"),
        );
        assert!(
            read.is_none_or(|n| n == 0.0),
            "partition {p} read {read:?} while paused"
        );
    }
    assert!(pipeline.is_running());

    // SIGUSR1: every record once, and the lag drains.
    pipeline.signal("USR1")?;
    wait_until(Duration::from_secs(120), "all 695 rows", || async {
        Ok(rows().await? == 695)
    })
    .await?;
    wait_until(Duration::from_secs(60), "lag drained", || {
        let got = http_get(&http, "/metrics").unwrap_or_default();
        let done = lag(0, &got) == Some(0.0) && lag(1, &got) == Some(0.0);
        async move { Ok(done) }
    })
    .await?;
    assert_eq!(rows().await?, 695, "exactly once");
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "SIGTERM exit: {status}");
    Ok(())
}

/// Runs the binary to its end with only `args`; returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = primespark_tests::pipeline_command()?.args(args).output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The exit code says why a run ended: 2 for a configuration a restart cannot fix, 3 for a
/// dependency that is not there (here: the topic), so supervisors can tell them apart.
#[test]
fn exit_codes_say_why_a_run_ended() -> Result<()> {
    let stack = stack();
    let work = tempfile::tempdir()?;
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[windows]\nidle_timeout = \"soon\"\n")?;
    let (code, err) = run_to_exit(&["run", "--config", &bad.display().to_string()])?;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("windows.idle_timeout"), "{err}");

    let missing = work.path().join("missing.toml");
    let topic = format!("edge.telemetry.{}", unique("missing"));
    std::fs::write(
        &missing,
        format!(
            "[kafka]\nbrokers = \"{}\"\nmetadata_timeout_ms = 1500\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nenabled = false\n[nas]\npath = \"{}\"\n[query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            stack.brokers,
            work.path().join("nas").display(),
            free_port()
        ),
    )?;
    let (code, err) = run_to_exit(&["run", "--config", &missing.display().to_string()])?;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains(&topic), "{err}");
    Ok(())
}
