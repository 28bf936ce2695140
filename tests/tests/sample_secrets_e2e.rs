//! No default secret opens the door: the shipped compose configuration, run as shipped but with
//! the sample token hash and the sample Grafana password (the one earlier deploy files printed
//! beside their hashes, and the same password hashed again) in its secret files, exits with
//! code 2 and a message that names the key and says how to make a secret. With real secrets in
//! the same files it starts, and the token it was given is the only one that works.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use primespark_connectors::query::{hash_password, sha256_hex};
use primespark_tests::{
    create_topic, free_port, http_request, pipeline_command, repo_root, stack, unique, wait_until,
    Pipeline,
};

/// The token and password the old deploy files printed in a comment beside their hashes.
const SAMPLE_TOKEN: &str = "replace-me-with-openssl-rand-hex-32";
const SAMPLE_PASSWORD: &str = "replace-me-grafana-password";
/// The exact Argon2 string they shipped.
const SHIPPED_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$HLscjzzThqUkHrty382DRQ$4m/m3SAh7oCCt9HBqZgFOb1DoMwVBMbhekP2ivdMrfI";

/// The compose configuration with its `/run/secrets` files under `secrets`, and the stack's
/// services in place of the compose ones (no MinIO or TimescaleDB of its own here).
fn compose_config(dir: &Path, secrets: &Path) -> Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(repo_root().join("deploy/compose/primespark.toml"))?;
    assert!(
        text.contains("/run/secrets/analyst_token_sha256")
            && text.contains("/run/secrets/grafana_password_hash"),
        "the compose file should read both hashes from compose secrets:\n{text}"
    );
    let path = dir.join("primespark.toml");
    std::fs::write(
        &path,
        text.replace("/run/secrets/", &format!("{}/", secrets.display())),
    )?;
    Ok(path)
}

fn write_secrets(dir: &Path, token_hash: &str, password_hash: &str) -> Result<()> {
    std::fs::write(dir.join("analyst_token_sha256"), format!("{token_hash}\n"))?;
    std::fs::write(
        dir.join("prometheus_token_sha256"),
        sha256_hex("prometheus-token-of-the-sample-secrets-test-81c3"),
    )?;
    std::fs::write(
        dir.join("grafana_password_hash"),
        format!("{password_hash}\n"),
    )?;
    Ok(())
}

/// Everything the compose file points at, replaced by this machine's: the stack's broker, no
/// bucket, no database, a temporary NAS and loopback ports.
fn overrides(nas: &Path, topic: &str, http: &str, pg: &str) -> Vec<(String, String)> {
    [
        ("PRIMESPARK_KAFKA__BROKERS", stack().brokers.as_str()),
        ("PRIMESPARK_KAFKA__TOPICS__TELEMETRY", topic),
        ("PRIMESPARK_POSTGRES__ENABLED", "false"),
        ("PRIMESPARK_S3__ENABLED", "false"),
        ("PRIMESPARK_DATAFLOWS__INFERENCE", "false"),
        ("PRIMESPARK_DATAFLOWS__ANALYTICS", "false"),
        ("PRIMESPARK_INFERENCE__ENABLED", "false"),
        ("PRIMESPARK_NAS__PATH", &nas.display().to_string()),
        ("PRIMESPARK_QUERY__HTTP_ADDR", http),
        ("PRIMESPARK_QUERY__PG_ADDR", pg),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Runs the pipeline to its end; its exit code and stderr.
fn run_to_exit(config: &Path, env: &[(String, String)]) -> Result<(Option<i32>, String)> {
    let out = pipeline_command()?
        .arg("run")
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_sample_secrets_are_refused_at_start_up() -> Result<()> {
    let work = tempfile::tempdir()?;
    let secrets = work.path().join("secrets");
    let nas = work.path().join("nas");
    std::fs::create_dir_all(&secrets)?;
    std::fs::create_dir_all(&nas)?;
    let config = compose_config(work.path(), &secrets)?;
    let topic = format!("edge.telemetry.{}", unique("secrets"));
    create_topic(stack(), &topic, 1).await?;
    let (http, pg) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let env = overrides(&nas, &topic, &http, &pg);
    let good_password = "a private pass phrase for grafana 7c41";
    let good_hash = hash_password(good_password)?;
    let good_token = "9a4c1e7f0b3d6a2c8e5f1b4d7a0c3e6f9b2d5a8c1e4f7b0d3a6c9e2f5b8d1a4c";

    // Without the secret files the start-up says which key's file is missing.
    let (code, err) = run_to_exit(&config, &env)?;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("query.api_keys[0].sha256_file") && err.contains("analyst_token_sha256"),
        "{err}"
    );

    // The sample token's hash.
    write_secrets(&secrets, &sha256_hex(SAMPLE_TOKEN), &good_hash)?;
    let (code, err) = run_to_exit(&config, &env)?;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("query.api_keys[0].sha256_file"), "{err}");
    assert!(err.contains("openssl rand -hex 32"), "{err}");
    assert!(
        !err.contains(&sha256_hex(SAMPLE_TOKEN)),
        "a hash in the log: {err}"
    );

    // The shipped Argon2 string, and the sample password hashed again with a fresh salt.
    for hash in [SHIPPED_HASH.to_owned(), hash_password(SAMPLE_PASSWORD)?] {
        write_secrets(&secrets, &sha256_hex(good_token), &hash)?;
        let (code, err) = run_to_exit(&config, &env)?;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("query.users[0].password_hash_file"), "{err}");
        assert!(err.contains("hash-secret --password"), "{err}");
    }

    // The same sample inline, as the old files had it, with an environment variable instead of
    // a file for the password hash: refused by the same rules.
    let inline = work.path().join("inline.toml");
    std::fs::write(
        &inline,
        std::fs::read_to_string(&config)?
            .replace(
                &format!(
                    "sha256_file = \"{}/analyst_token_sha256\"",
                    secrets.display()
                ),
                &format!("sha256 = \"{}\"", sha256_hex(SAMPLE_TOKEN)),
            )
            .replace(
                &format!(
                    "password_hash_file = \"{}/grafana_password_hash\"",
                    secrets.display()
                ),
                "password_hash_env = \"PRIMESPARK_TEST_GRAFANA_HASH\"",
            ),
    )?;
    let mut inline_env = env.clone();
    inline_env.push(("PRIMESPARK_TEST_GRAFANA_HASH".into(), good_hash.clone()));
    let (code, err) = run_to_exit(&inline, &inline_env)?;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("query.api_keys[0].sha256"), "{err}");

    // Real secrets: it starts, the given token works and the sample does not.
    write_secrets(&secrets, &sha256_hex(good_token), &good_hash)?;
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let log = work.path().join("pipeline.log");
    let pipeline = Pipeline::start(&config, &env_refs, &log)?;
    let sql = |token: &str| {
        let auth = format!("Bearer {token}");
        http_request(
            &http,
            "POST",
            "/v1/sql",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", auth.as_str()),
            ],
            br#"{"sql": "SELECT 1 AS one"}"#,
        )
    };
    let answered = wait_until(Duration::from_secs(60), "the SQL endpoint", || async {
        Ok(sql(good_token).map(|(s, _, _)| s == 200).unwrap_or(false))
    })
    .await;
    if answered.is_err() {
        let _ = pipeline.kill();
        anyhow::bail!(
            "no answer with a real token:\n{}",
            std::fs::read_to_string(&log)?
        );
    }
    let (status, _, _) = sql(SAMPLE_TOKEN)?;
    assert_eq!(status, 401, "the sample token was let in");
    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "SIGTERM exit: {status}");
    Ok(())
}
