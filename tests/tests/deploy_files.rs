//! The shipped deployment files validate with the real tools: Prometheus alert rules and scrape
//! configuration with `promtool check`, and the rules' behaviour on sample series with
//! `promtool test rules` (deploy/prometheus/alerts_test.yml).

use std::process::Command;

use anyhow::Result;
use primespark_tests::{repo_root, stack};

fn promtool(args: &[&str]) -> Result<String> {
    let dir = repo_root().join("deploy/prometheus");
    let out = Command::new(&stack().promtool)
        .args(args)
        .current_dir(&dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn alert_rules_and_scrape_config_are_valid() -> Result<()> {
    let rules = promtool(&["check", "rules", "alerts.yml"])?;
    assert!(rules.contains("SUCCESS: 9 rules found"), "{rules}");
    promtool(&["check", "config", "prometheus.yml"])?;
    Ok(())
}

#[test]
fn alert_rules_fire_on_sample_series() -> Result<()> {
    let out = promtool(&["test", "rules", "alerts_test.yml"])?;
    assert!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

#[test]
fn systemd_unit_verifies_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/primespark.service"))?;
    // `verify` checks that ExecStart exists: point it at the binary the tests built.
    let binary = primespark_tests::pipeline_binary()?;
    let unit = unit.replace("/usr/local/bin/primespark", &binary.display().to_string());
    let path = dir.path().join("primespark.service");
    std::fs::write(&path, unit)?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and bad values are only warnings to systemd: none is allowed here.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("primespark.service"))
        .collect();
    assert!(complaints.is_empty(), "{}", complaints.join("\n"));
    Ok(())
}
