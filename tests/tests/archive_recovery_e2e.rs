//! Recovery that keeps the archive, against the stack: the documented recovery path (a new
//! database, `backfill`, then `run`) and a lost `source_offsets` row leave every Parquet roll
//! in place and every raw row once, in PostgreSQL and in the archive.
//!
//! On a main where start-up treated a missing stored position as 0, both deleted every roll
//! and rewrote what Kafka still held (the rest of the archive was gone), and `run` after
//! `backfill` stored every raw row a second time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use primespark_tests::{
    connect, count, fresh_database, parquet_files, parquet_positions, pipeline_command, produce,
    stack, unique, wait_until, Sections, TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const PARTITIONS: i32 = 2;

/// Samples `from..to`, 500 ms apart, alternating partitions, each at its own time.
fn samples(from: i64, to: i64) -> Vec<(i32, Vec<u8>)> {
    (from..to)
        .map(|n| {
            (
                (n % i64::from(PARTITIONS)) as i32,
                json!({"device_id": format!("pi-{}", n % 3), "metrics": {"cpu_percent": (n % 100) as f64},
                       "timestamp": T0_MS + n * 500})
                .to_string()
                .into_bytes(),
            )
        })
        .collect()
}

fn rolls(archive: &Path) -> Result<BTreeSet<PathBuf>> {
    Ok(parquet_files(archive)?.into_iter().collect())
}

/// Waits until PostgreSQL and the archive hold `n` raw rows.
async fn holds(run: &TelemetryRun, url: &str, archive: &Path, n: i64, what: &str) -> Result<()> {
    let client = connect(url).await?;
    let waited = wait_until(Duration::from_secs(120), what, || async {
        Ok(
            count(&client, "SELECT count(*) FROM device_metrics").await >= n
                && parquet_positions(archive).map_or(0, |p| p.len() as i64) >= n,
        )
    })
    .await;
    if let Err(e) = waited {
        anyhow::bail!(
            "{e}: postgres {}, parquet {:?} of {n}\n{}",
            count(&client, "SELECT count(*) FROM device_metrics").await,
            parquet_positions(archive).map(|p| p.len()),
            run.log_text()
        );
    }
    Ok(())
}

/// Every raw row once in PostgreSQL and in the archive: `n` rows, `n` distinct.
async fn once(url: &str, archive: &Path, n: i64, what: &str) -> Result<()> {
    let client = connect(url).await?;
    let rows = count(&client, "SELECT count(*) FROM device_metrics").await;
    let distinct = count(
        &client,
        "SELECT count(*) FROM (SELECT DISTINCT time, device_id FROM device_metrics) d",
    )
    .await;
    ensure!(
        (rows, distinct) == (n, n),
        "{what}: PostgreSQL holds {rows} raw rows ({distinct} distinct), want {n}"
    );
    let positions = parquet_positions(archive)?;
    let distinct: BTreeSet<_> = positions.iter().collect();
    ensure!(
        (positions.len(), distinct.len()) == (n as usize, n as usize),
        "{what}: the archive holds {} raw rows ({} distinct), want {n}",
        positions.len(),
        distinct.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_database_and_a_lost_offset_keep_every_roll_and_double_nothing() -> Result<()> {
    let run = TelemetryRun::new(
        "archrec",
        PARTITIONS,
        Sections {
            postgres: "flush_rows = 200\nflush_interval = \"100ms\"",
            extra: "[windows]\nidle_timeout = \"10m\"\n[inference]\nenabled = false\n",
            ..Sections::default()
        },
    )
    .await?;
    let stack = stack();
    let archive = run.nas.join(format!("topic={}", run.topic));

    // 1. A run archives the first 400 samples.
    produce(stack, &run.topic, &samples(0, 400))?;
    let first = run.start(&[])?;
    holds(&run, &run.url, &archive, 400, "the first run").await?;
    let status = first.terminate(Duration::from_secs(60))?;
    ensure!(status.success(), "the first run stops cleanly: {status:?}");
    let before = rolls(&archive)?;
    ensure!(!before.is_empty(), "no rolls archived");

    // 2. The Parquet sink's stored positions are lost (a restore, a hand-edited table).
    connect(&run.url)
        .await?
        .execute("DELETE FROM source_offsets WHERE sink = 'parquet_raw'", &[])
        .await?;
    produce(stack, &run.topic, &samples(400, 600))?;
    let second = run.start(&[])?;
    holds(&run, &run.url, &archive, 600, "after the lost offsets").await?;
    let status = second.terminate(Duration::from_secs(60))?;
    ensure!(status.success(), "the second run stops cleanly: {status:?}");
    let after_loss = rolls(&archive)?;
    let gone: Vec<_> = before.difference(&after_loss).collect();
    ensure!(
        gone.is_empty(),
        "rolls deleted after a lost offset: {gone:?}"
    );
    once(&run.url, &archive, 600, "after the lost offsets").await?;

    // 3. The database is lost: a new one, rebuilt with `backfill`, then `run`.
    let rebuilt = fresh_database(stack, &unique("archrec_new")).await?;
    let env = [("PRIMESPARK_POSTGRES__URL", rebuilt.as_str())];
    let out = pipeline_command()?
        .arg("backfill")
        .arg("--config")
        .arg(&run.config)
        .args(["--from", "nas"])
        .envs(env)
        .output()?;
    ensure!(
        out.status.success(),
        "backfill failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rebuilt_rows = count(
        &connect(&rebuilt).await?,
        "SELECT count(*) FROM device_metrics",
    )
    .await;
    ensure!(
        rebuilt_rows == 600,
        "the backfill rebuilt {rebuilt_rows} raw rows"
    );
    let backfilled = rolls(&archive)?;
    produce(stack, &run.topic, &samples(600, 700))?;
    let third = run.start(&env)?;
    holds(&run, &rebuilt, &archive, 700, "run after backfill").await?;
    let status = third.terminate(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "the run after the backfill stops cleanly: {status:?}"
    );
    let after_rebuild = rolls(&archive)?;
    let gone: Vec<_> = backfilled.difference(&after_rebuild).collect();
    ensure!(
        gone.is_empty(),
        "rolls deleted by the run after backfill: {gone:?}"
    );
    once(&rebuilt, &archive, 700, "run after backfill").await?;
    Ok(())
}
