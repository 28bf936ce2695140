//! The README's first command: `primespark demo` runs on its embedded broker with no external
//! service, every stream gets raw Parquet files within seconds (rolled at the clean stop), and
//! its bad records are dead letters; its status line is not buried under per-batch logs.

use anyhow::Result;
use primespark_tests::{count_files, free_port, pipeline_command};

#[test]
fn demo_runs_every_stream_without_services() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = pipeline_command()?
        .current_dir(dir.path())
        .args([
            "demo",
            "--duration-secs",
            "12",
            "--bad-share",
            "0.05",
            "--rate",
            "400",
        ])
        .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stderr}",
        out.status
    );
    let data = dir.path().join("data");
    for topic in ["edge.telemetry", "edge.ai.inference", "analytics.events"] {
        let files = count_files(&data.join(format!("topic={topic}")), "parquet");
        assert!(files > 0, "no Parquet file for {topic}:\n{stderr}");
    }
    let dead = std::fs::read_to_string(data.join("dead_letters.jsonl"))?;
    assert!(dead.lines().count() > 10, "{dead}");
    // The status line is what a user watches: it says how many injected failures were flagged,
    // and per-batch chatter does not bury it.
    let status: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("anomalies flagged"))
        .collect();
    assert!(status.len() >= 5, "few status lines:\n{stderr}");
    let per_batch = stderr
        .lines()
        .filter(|l| l.contains("dead letters stored") || l.contains("removed uncommitted"))
        .count();
    assert_eq!(
        per_batch, 0,
        "per-batch logs at the default level:\n{stderr}"
    );
    Ok(())
}
