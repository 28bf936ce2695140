//! Golden files for the SQL surface, in the spirit of DataFusion's `.slt` tests: every file
//! under `tests/slt/` runs against a fresh `QueryService` (the session the pipeline serves,
//! over an empty archive, with a `reader` and an `admin` key), record by record.
//!
//! Records, separated by blank lines (`#` starts a comment line):
//! - `user reader|admin`: who runs the following records;
//! - `statement ok` + SQL: must succeed;
//! - `statement error [a|b|...]` + SQL: must fail, the message containing one of the
//!   alternatives (any error when none is given);
//! - `query` + SQL + `----` + rows: the result, one line per row, values separated by one
//!   space (`NULL` for null, floats as JSON prints them).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use primespark_connectors::query::{
    batches_to_json, session, sha256_hex, ApiKey, Principal, QueryConfig, QueryService, Role,
};
use primespark_tests::repo_root;
use serde_json::Value;

fn render(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

struct Runner {
    service: Arc<QueryService>,
    reader: Principal,
    admin: Principal,
}

impl Runner {
    fn new(root: &Path) -> Result<Self> {
        let ctx = session(
            root,
            None,
            "edge.telemetry",
            "edge.ai.inference",
            "analytics.events",
            256 << 20,
        )?;
        let cfg = QueryConfig {
            api_keys: vec![
                ApiKey {
                    name: "reader".into(),
                    role: Role::Reader,
                    sha256: sha256_hex("r"),
                    sha256_file: None,
                    sha256_env: None,
                },
                ApiKey {
                    name: "admin".into(),
                    role: Role::Admin,
                    sha256: sha256_hex("a"),
                    sha256_file: None,
                    sha256_env: None,
                },
            ],
            rate_limit_per_second: 10_000,
            rate_limit_burst: 10_000,
            ..QueryConfig::default()
        };
        let service = Arc::new(QueryService::new(ctx, &cfg)?);
        let reader = service.authenticate_token(Some("r"))?;
        let admin = service.authenticate_token(Some("a"))?;
        Ok(Self {
            service,
            reader,
            admin,
        })
    }

    async fn run_file(&self, path: &Path) -> Result<usize> {
        let text = std::fs::read_to_string(path)?;
        let lines: Vec<&str> = text.lines().collect();
        let mut who = &self.reader;
        let mut i = 0;
        let mut records = 0;
        while i < lines.len() {
            let line = lines[i].trim_end();
            if line.trim().is_empty() || line.starts_with('#') {
                i += 1;
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            i += 1;
            if let Some(name) = line.strip_prefix("user ") {
                who = match name.trim() {
                    "admin" => &self.admin,
                    "reader" => &self.reader,
                    other => bail!("{at}: unknown user {other}"),
                };
                continue;
            }
            // The SQL: up to a blank line or `----`.
            let mut sql = Vec::new();
            while i < lines.len() && !lines[i].trim().is_empty() && lines[i].trim() != "----" {
                sql.push(lines[i]);
                i += 1;
            }
            let sql = sql.join("\n");
            records += 1;
            let result = self.service.execute(who, "slt", &sql).await;
            if line == "statement ok" {
                if let Err(e) = result {
                    bail!("{at}: expected success, got: {e}\n{sql}");
                }
            } else if let Some(expected) = line.strip_prefix("statement error") {
                let expected = expected.trim();
                match result {
                    Ok(_) => bail!("{at}: expected an error, it succeeded\n{sql}"),
                    Err(e) => {
                        let message = e.to_string();
                        if !expected.is_empty()
                            && !expected.split('|').any(|alt| message.contains(alt))
                        {
                            bail!("{at}: error {message:?} contains none of {expected:?}\n{sql}");
                        }
                    }
                }
            } else if line == "query" {
                if i >= lines.len() || lines[i].trim() != "----" {
                    bail!("{at}: a query record needs ---- before its rows");
                }
                i += 1;
                let mut want = Vec::new();
                while i < lines.len() && !lines[i].trim().is_empty() {
                    want.push(lines[i].trim_end().to_owned());
                    i += 1;
                }
                let out = result.with_context(|| format!("{at}: {sql}"))?;
                let got: Vec<String> = batches_to_json(&out.batches)?
                    .iter()
                    .map(|row| {
                        row.as_array()
                            .map(|r| r.iter().map(render).collect::<Vec<_>>().join(" "))
                            .unwrap_or_default()
                    })
                    .collect();
                if got != want {
                    bail!(
                        "{at}: {sql}\nexpected:\n{}\ngot:\n{}",
                        want.join("\n"),
                        got.join("\n")
                    );
                }
            } else {
                bail!("{at}: unknown record {line:?}");
            }
        }
        Ok(records)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_files() -> Result<()> {
    let dir = repo_root().join("tests/slt");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    for file in files {
        let root = tempfile::tempdir()?;
        let runner = Runner::new(root.path())?;
        let n = runner.run_file(&file).await?;
        assert!(n > 0, "{} has no records", file.display());
    }
    Ok(())
}
