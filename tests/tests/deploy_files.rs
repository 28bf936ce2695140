//! The shipped deployment files validate with the real tools: Prometheus alert rules and scrape
//! configuration with `promtool check`, and the rules' behaviour on sample series with
//! `promtool test rules` (deploy/prometheus/alerts_test.yml), the systemd unit with
//! `systemd-analyze verify`, the compose file against the compose specification, the Kubernetes
//! manifests against the API schemas, every shipped configuration with `check-config`, and the
//! declared Rust toolchain (workspace `rust-version`, the image's `FROM rust:X.Y`) against the
//! locked dependencies.

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
    assert!(rules.contains("SUCCESS: 11 rules found"), "{rules}");
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

/// A tool from the stack's Python environment (installed by `deploy/dev/stack.sh`).
fn venv_tool(name: &str) -> std::path::PathBuf {
    std::path::Path::new(&stack().python)
        .parent()
        .map(|bin| bin.join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| name.into())
}

/// Runs `tool args.. file`; returns (success, output).
fn validate(tool: &str, args: &[&str], file: &std::path::Path) -> Result<(bool, String)> {
    let out = Command::new(venv_tool(tool))
        .args(args)
        .arg(file)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success() && !text.contains("ERROR"), text))
}

#[test]
fn compose_file_follows_the_compose_specification() -> Result<()> {
    let args = ["--builtin-schema", "vendor.compose-spec"];
    let file = repo_root().join("deploy/compose/compose.yaml");
    let (ok, out) = validate("check-jsonschema", &args, &file)?;
    assert!(ok, "{out}");
    // The validator rejects what compose would: a misspelled key fails.
    let text = std::fs::read_to_string(&file)?;
    assert!(text.contains("    healthcheck:"));
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("compose.yaml");
    std::fs::write(
        &bad,
        text.replacen("    healthcheck:", "    healthchek:", 1),
    )?;
    let (ok, out) = validate("check-jsonschema", &args, &bad)?;
    assert!(!ok, "a misspelled key passed:\n{out}");
    // Every service the issue names is there, and secrets come from .env, not the file.
    for service in [
        "kafka:",
        "timescaledb:",
        "minio:",
        "primespark:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(text.contains(&format!("\n  {service}\n")), "no {service}");
    }
    assert!(!text.contains("change-me"), "a password in compose.yaml");
    Ok(())
}

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() -> Result<()> {
    let file = repo_root().join("deploy/k8s/primespark.yaml");
    let (ok, out) = validate("kubernetes-validate", &["--strict"], &file)?;
    assert!(ok, "{out}");
    for kind in [
        "configmap/",
        "service/primespark-cluster",
        "statefulset/primespark",
    ] {
        assert!(out.contains(kind), "{kind} not validated:\n{out}");
    }
    let text = std::fs::read_to_string(&file)?;
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("primespark.yaml");
    std::fs::write(
        &bad,
        text.replacen("  serviceName: primespark-cluster", "  serviceNam: x", 1),
    )?;
    let (ok, out) = validate("kubernetes-validate", &["--strict"], &bad)?;
    assert!(!ok, "an unknown field passed:\n{out}");
    Ok(())
}

/// Runs `primespark check-config` on a configuration text.
fn check_config(text: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("primespark.toml");
    std::fs::write(&path, text)?;
    // The file alone: the stack's exports would override its addresses.
    let out = primespark_tests::pipeline_command()?
        .arg("check-config")
        .arg(&path)
        .output()?;
    assert!(
        out.status.success(),
        "check-config failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn shipped_pipeline_configs_pass_check_config() -> Result<()> {
    check_config(&std::fs::read_to_string(
        repo_root().join("deploy/compose/primespark.toml"),
    )?)?;
    check_config(&std::fs::read_to_string(
        repo_root().join("deploy/config/local.toml"),
    )?)?;
    // The ConfigMap's file: the indented block under `primespark.toml: |`.
    let manifest = std::fs::read_to_string(repo_root().join("deploy/k8s/primespark.yaml"))?;
    let block: Vec<&str> = manifest
        .lines()
        .skip_while(|l| !l.contains("primespark.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    assert!(block.len() > 10, "{block:?}");
    check_config(&block.join("\n"))?;
    // The compose Prometheus configuration loads with its rules.
    let dir = tempfile::tempdir()?;
    // Its bearer token is a compose secret: a file of the test's here.
    let token = dir.path().join("prometheus_token");
    std::fs::write(&token, "t")?;
    let scrape = std::fs::read_to_string(repo_root().join("deploy/compose/prometheus.yml"))?;
    assert!(scrape.contains("/run/secrets/prometheus_token"), "{scrape}");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        scrape.replace(
            "/run/secrets/prometheus_token",
            &token.display().to_string(),
        ),
    )?;
    std::fs::copy(
        repo_root().join("deploy/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )?;
    let out = Command::new(&stack().promtool)
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `1.94` or `1.94.1` as (major, minor, patch).
fn rust_version(text: &str) -> Option<(u64, u64, u64)> {
    let mut parts = text.trim().split('.').map(str::parse::<u64>);
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next().map_or(Some(0), Result::ok)?;
    parts.next().is_none().then_some((major, minor, patch))
}

/// The workspace's `rust-version` and the image's `FROM rust:X.Y` both reach the newest
/// `rust_version` any locked package declares (with less, `cargo build --locked` refuses that
/// package: the image would not build), and they name the same release.
#[test]
fn rust_version_and_image_cover_every_locked_package() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repo_root())
        .output()?;
    assert!(
        out.status.success(),
        "cargo metadata failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .context("no workspace_members")?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let mut newest: Option<((u64, u64, u64), String)> = None;
    let mut member_versions = Vec::new();
    for p in metadata["packages"].as_array().context("no packages")? {
        let Some(v) = p["rust_version"].as_str() else {
            continue;
        };
        let version = rust_version(v).with_context(|| format!("rust_version {v:?}"))?;
        let name = format!(
            "{} {}",
            p["name"].as_str().unwrap_or("?"),
            p["version"].as_str().unwrap_or("?")
        );
        if p["id"].as_str().is_some_and(|id| members.contains(&id)) {
            member_versions.push((version, name));
        } else if newest.as_ref().is_none_or(|(n, _)| version > *n) {
            newest = Some((version, name));
        }
    }
    let (need, who) = newest.context("no locked package declares a rust_version")?;
    let shown = format!("{}.{}.{}", need.0, need.1, need.2);

    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml"))?;
    let declared = manifest
        .split("[workspace.package]")
        .nth(1)
        .and_then(|section| section.split("\n[").next())
        .and_then(|section| {
            section
                .lines()
                .find_map(|l| l.trim().strip_prefix("rust-version"))
        })
        .and_then(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .context("no rust-version in [workspace.package]")?;
    let workspace =
        rust_version(&declared).with_context(|| format!("rust-version {declared:?}"))?;
    assert!(
        workspace >= need,
        "workspace rust-version {declared} is older than {shown}, which {who} needs"
    );
    for (v, name) in &member_versions {
        assert_eq!(
            *v, workspace,
            "{name} does not inherit the workspace rust-version"
        );
    }

    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile"))?;
    let images: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FROM rust:"))
        .collect();
    assert!(
        !images.is_empty(),
        "deploy/Dockerfile builds FROM no rust image"
    );
    for image in images {
        let tag = image.split_whitespace().next().unwrap_or(image);
        let release = tag.split('-').next().unwrap_or(tag);
        let (major, minor, _) =
            rust_version(release).with_context(|| format!("FROM rust:{tag}: no X.Y version"))?;
        assert!(
            (major, minor) >= (need.0, need.1),
            "deploy/Dockerfile builds FROM rust:{tag}, older than {shown}, which {who} needs"
        );
        assert_eq!(
            (major, minor),
            (workspace.0, workspace.1),
            "deploy/Dockerfile builds FROM rust:{tag}, the workspace says rust-version {declared}"
        );
    }
    Ok(())
}
