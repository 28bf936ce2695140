//! The README's first command: `primespark demo` runs on its embedded broker with no external
//! service, every stream gets raw Parquet files within seconds (rolled at the clean stop), and
//! its bad records are dead letters.

use anyhow::Result;
use primespark_tests::{free_port, pipeline_binary};

#[test]
fn demo_runs_every_stream_without_services() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new(pipeline_binary()?);
    for (k, _) in std::env::vars() {
        if k.starts_with("PRIMESPARK_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
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
    for sub in [
        "topic=edge.telemetry",
        "topic=edge.ai.inference",
        "topic=analytics.events",
        "table=device_metrics_1m",
        "table=inference_stats_1m",
        "table=api_events_1m",
    ] {
        assert!(
            data.join(sub).is_dir(),
            "no {sub} in {:?}",
            std::fs::read_dir(&data)?.collect::<Vec<_>>()
        );
    }
    let dead = std::fs::read_to_string(data.join("dead_letters.jsonl"))?;
    assert!(dead.lines().count() > 10, "{dead}");
    Ok(())
}
