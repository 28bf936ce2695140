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

/// The binary runs with mimalloc's purge-at-once options (it executes itself again with them,
/// same pid), and an operator's own value of one of them wins.
#[test]
fn the_binary_sets_its_allocator_options_unless_the_operator_did() -> Result<()> {
    for (given, purge) in [(None, "0"), (Some("7"), "7")] {
        let dir = tempfile::tempdir()?;
        let mut cmd = pipeline_command()?;
        cmd.current_dir(dir.path())
            .env_remove("MIMALLOC_ARENA_EAGER_COMMIT")
            .args(["demo", "--duration-secs", "4", "--rate", "50"])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        match given {
            Some(v) => cmd.env("MIMALLOC_PURGE_DELAY", v),
            None => cmd.env_remove("MIMALLOC_PURGE_DELAY"),
        };
        let mut child = cmd.spawn()?;
        let environ = format!("/proc/{}/environ", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let vars = loop {
            let text = std::fs::read(&environ).unwrap_or_default();
            let vars: Vec<String> = text
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .filter(|v| v.starts_with("MIMALLOC_"))
                .collect();
            if vars.len() >= 2 || std::time::Instant::now() > deadline {
                break vars;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let status = child.wait()?;
        assert!(status.success(), "{status}");
        assert!(
            vars.contains(&format!("MIMALLOC_PURGE_DELAY={purge}")),
            "{vars:?}"
        );
        assert!(
            vars.contains(&"MIMALLOC_ARENA_EAGER_COMMIT=0".to_owned()),
            "{vars:?}"
        );
    }
    Ok(())
}
