//! `[query]` configuration: addresses, who may query (API keys, wire-protocol users, roles),
//! and the limits every query runs under.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::InvalidConfig;

/// What a principal may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Queries only: `SELECT`, `EXPLAIN`, `SHOW`, `DESCRIBE`.
    Reader,
    /// Also `CREATE VIEW`, `DROP VIEW` and `SET`. Never DML, `COPY` or external tables.
    Admin,
}

impl Role {
    /// The role's name as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }
}

/// `[[query.api_keys]]`: a bearer token for the HTTP endpoint, stored as its SHA-256. Tokens
/// must be long random strings (`openssl rand -hex 32`), which is why a fast hash suffices.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds the key (audit log, rate limit).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Lower-case hex SHA-256 of the token (`primespark hash-secret`).
    pub sha256: String,
}

/// `[[query.users]]`: a user of the PostgreSQL wire endpoint, password stored as an Argon2 PHC
/// string (`primespark hash-secret --password`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireUser {
    /// User name (`psql -U`).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// `$argon2id$...` PHC string.
    pub password_hash: String,
}

// Hashes stay out of logs and `check-config` output.
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("sha256", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for WireUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireUser")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("password_hash", &"<redacted>")
            .finish()
    }
}

/// `[query]`: the SQL endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// Address of the HTTP endpoint. Default `127.0.0.1:8080`.
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// Address of the PostgreSQL wire-protocol endpoint; off when unset. Needs `users`.
    #[serde(default)]
    pub pg_addr: Option<String>,
    /// Largest result returned, in rows; larger results are cut and flagged. Default 100000.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// A query running longer is cancelled. Default `30s`.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Threads that run queries (and DataFusion's partitions per query). Default 0: half the
    /// cores, at least one, so a query never takes every core from ingestion; the threads
    /// also run at a lower priority (nice 10) than the pipeline's.
    #[serde(default)]
    pub threads: usize,
    /// Largest result returned, in bytes of Arrow data; a larger result is cut there and
    /// flagged, like one over `max_rows`. Default 67108864 (64 MiB).
    #[serde(default = "default_max_result_bytes")]
    pub max_result_bytes: usize,
    /// Largest value a query's function may build, in bytes (`repeat`, `lpad`/`rpad`
    /// characters, `array_repeat`/`range` elements): those allocate outside the memory pool,
    /// so a bigger one is refused with an error. Default 16777216 (16 MiB).
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// Memory all running queries may hold together, in MiB (DataFusion's memory pool); a
    /// query needing more fails with "resources exhausted". Default 512.
    #[serde(default = "default_memory_mb")]
    pub memory_limit_mb: usize,
    /// Largest HTTP request body, in bytes; larger ones get 413. Default 65536.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Queries per second each key or user may run, sustained; more get HTTP 429 (wire:
    /// SQLSTATE 53400). Default 20.
    #[serde(default = "default_rate")]
    pub rate_limit_per_second: u32,
    /// Queries a key or user may run in a burst above the rate. Default 40.
    #[serde(default = "default_burst")]
    pub rate_limit_burst: u32,
    /// HTTP bearer tokens. With none, the HTTP endpoint is open to anyone who can reach it as
    /// `reader`, which is allowed on a loopback `http_addr` only.
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// Wire-protocol users (required with `pg_addr`).
    #[serde(default)]
    pub users: Vec<WireUser>,
    /// PEM certificate chain: serve both endpoints over TLS (with `tls_key`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

fn default_http_addr() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_result_bytes() -> usize {
    64 << 20
}

fn default_max_value_bytes() -> usize {
    super::functions::DEFAULT_MAX_VALUE_BYTES
}

fn default_max_rows() -> usize {
    100_000
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_memory_mb() -> usize {
    512
}
fn default_max_body_bytes() -> usize {
    65_536
}
fn default_rate() -> u32 {
    20
}
fn default_burst() -> u32 {
    40
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            http_addr: default_http_addr(),
            pg_addr: None,
            max_rows: default_max_rows(),
            timeout: default_timeout(),
            memory_limit_mb: default_memory_mb(),
            max_value_bytes: default_max_value_bytes(),
            max_result_bytes: default_max_result_bytes(),
            threads: 0,
            max_body_bytes: default_max_body_bytes(),
            rate_limit_per_second: default_rate(),
            rate_limit_burst: default_burst(),
            api_keys: Vec::new(),
            users: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, InvalidConfig> {
    value
        .parse()
        .map_err(|e| InvalidConfig::new(key, format!("\"{value}\" is not ip:port: {e}")))
}

impl QueryConfig {
    /// Pure validation; returns the HTTP address.
    pub fn validate(&self) -> Result<SocketAddr, InvalidConfig> {
        let addr = parse_addr("query.http_addr", &self.http_addr)?;
        if let Some(pg) = &self.pg_addr {
            parse_addr("query.pg_addr", pg)?;
            if self.users.is_empty() {
                return Err(InvalidConfig::new(
                    "query.users",
                    "the wire endpoint (query.pg_addr) needs at least one [[query.users]] entry",
                ));
            }
        }
        if self.max_rows == 0 {
            return Err(InvalidConfig::new("query.max_rows", "must be positive"));
        }
        if self.timeout.is_zero() {
            return Err(InvalidConfig::new("query.timeout", "must be positive"));
        }
        if self.threads > 256 {
            return Err(InvalidConfig::new(
                "query.threads",
                "must be at most 256 (0: half the cores)",
            ));
        }
        if self.max_result_bytes == 0 {
            return Err(InvalidConfig::new(
                "query.max_result_bytes",
                "must be positive",
            ));
        }
        if self.max_value_bytes == 0 {
            return Err(InvalidConfig::new(
                "query.max_value_bytes",
                "must be positive",
            ));
        }
        if self.memory_limit_mb == 0 {
            return Err(InvalidConfig::new(
                "query.memory_limit_mb",
                "must be positive",
            ));
        }
        if self.max_body_bytes < 64 {
            return Err(InvalidConfig::new(
                "query.max_body_bytes",
                "must be at least 64",
            ));
        }
        if self.rate_limit_per_second == 0 {
            return Err(InvalidConfig::new(
                "query.rate_limit_per_second",
                "must be at least 1",
            ));
        }
        if self.rate_limit_burst == 0 {
            return Err(InvalidConfig::new(
                "query.rate_limit_burst",
                "must be at least 1",
            ));
        }
        if self.api_keys.is_empty() && !addr.ip().is_loopback() {
            return Err(InvalidConfig::new(
                "query.api_keys",
                format!(
                    "{addr} is reachable from other machines: configure [[query.api_keys]] \
                     (or bind http_addr to 127.0.0.1)"
                ),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            let valid = k.sha256.len() == 64 && k.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                return Err(InvalidConfig::new(
                    format!("query.api_keys[{i}].sha256"),
                    "must be 64 hex digits (SHA-256 of the token; see `primespark hash-secret`)",
                ));
            }
            if k.name.is_empty() || !names.insert(k.name.as_str()) {
                return Err(InvalidConfig::new(
                    format!("query.api_keys[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
        }
        let mut users = std::collections::BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if !u.password_hash.starts_with("$argon2") {
                return Err(InvalidConfig::new(
                    format!("query.users[{i}].password_hash"),
                    "must be an Argon2 PHC string ($argon2id$...; see `primespark hash-secret --password`)",
                ));
            }
            if u.name.is_empty() || !users.insert(u.name.as_str()) {
                return Err(InvalidConfig::new(
                    format!("query.users[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(InvalidConfig::new(
                    "query.tls_key",
                    "tls_cert is set: the private key is needed too",
                ))
            }
            (None, Some(_)) => {
                return Err(InvalidConfig::new(
                    "query.tls_cert",
                    "tls_key is set: the certificate is needed too",
                ))
            }
            _ => {}
        }
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_users_and_limits_and_names_bad_keys() {
        let c: QueryConfig = toml::from_str(
            r#"
            http_addr = "0.0.0.0:8080"
            pg_addr = "127.0.0.1:5433"
            timeout = "5s"
            [[api_keys]]
            name = "grafana"
            role = "reader"
            sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
            [[users]]
            name = "analyst"
            role = "admin"
            password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA"
            "#,
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.api_keys[0].role, Role::Reader);
        c.validate().unwrap();

        let open = QueryConfig {
            http_addr: "0.0.0.0:8080".into(),
            ..QueryConfig::default()
        };
        assert!(open
            .validate()
            .unwrap_err()
            .to_string()
            .contains("query.api_keys"));
        let mut bad = c.clone();
        bad.api_keys[0].sha256 = "secret".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("query.api_keys[0].sha256"));
        let mut no_users = c.clone();
        no_users.users.clear();
        assert!(no_users
            .validate()
            .unwrap_err()
            .to_string()
            .contains("query.users"));
        let mut half_tls = c;
        half_tls.tls_cert = Some("cert.pem".into());
        assert!(half_tls
            .validate()
            .unwrap_err()
            .to_string()
            .contains("query.tls_key"));
        QueryConfig::default().validate().unwrap();
    }
}
