//! The shipped deployment files validate with the real tools: Prometheus alert rules and scrape
//! configuration with `promtool check`, and the rules' behaviour on sample series with
//! `promtool test rules` (deploy/prometheus/alerts_test.yml).

use std::process::Command;

use anyhow::{Context, Result};
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

/// The names the pipeline registers, from the sources that register them.
fn exported_metric_names() -> Result<std::collections::BTreeSet<String>> {
    let mut names = std::collections::BTreeSet::new();
    for file in [
        "connectors/src/metrics.rs",
        "operators/src/metrics.rs",
        "dataflows/src/ops.rs",
    ] {
        let text =
            std::fs::read_to_string(repo_root().join(file)).with_context(|| file.to_owned())?;
        for piece in text.split('"').skip(1).step_by(2) {
            if piece.starts_with("primespark_")
                && piece.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                names.insert(piece.to_owned());
            }
        }
    }
    Ok(names)
}

#[test]
fn grafana_pipeline_dashboard_queries_parse_and_use_exported_series() -> Result<()> {
    let path = repo_root().join("deploy/grafana/dashboards/pipeline-health.json");
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| path.display().to_string())?)?;
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    // Every query parses as PromQL: promtool checks them as recording rules (JSON is YAML).
    let rules = serde_json::json!({"groups": [{"name": "dashboard", "rules": exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:panel_{i}"), "expr": e}))
        .collect::<Vec<_>>()}]});
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, rules.to_string())?;
    let out = Command::new(&stack().promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And uses only series the pipeline exports.
    let exported = exported_metric_names()?;
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("primespark_").map(|_| word) {
                let base = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    exported.contains(base),
                    "{name} in {expr:?} is not exported ({exported:?})"
                );
            }
        }
    }
    Ok(())
}
