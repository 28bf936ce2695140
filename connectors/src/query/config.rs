//! `[query]` configuration: addresses, who may query (API keys, wire-protocol users, roles),
//! and the limits every query runs under.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secrets;
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
/// The hash is given inline (`sha256`), or read at start-up from a file (`sha256_file`, e.g. a
/// mounted Kubernetes Secret) or an environment variable (`sha256_env`): exactly one of them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds the key (audit log, rate limit).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Lower-case hex SHA-256 of the token (`primespark hash-secret`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// A file holding the hash (surrounding whitespace ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_file: Option<PathBuf>,
    /// An environment variable holding the hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_env: Option<String>,
}

/// `[[query.users]]`: a user of the PostgreSQL wire endpoint, password stored as a SCRAM-SHA-256
/// verifier in PostgreSQL's form (`primespark hash-secret --password`): inline
/// (`password_hash`), or read at start-up from a file (`password_hash_file`) or an environment
/// variable (`password_hash_env`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireUser {
    /// User name (`psql -U`).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password_hash: String,
    /// A file holding the verifier (surrounding whitespace ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash_file: Option<PathBuf>,
    /// An environment variable holding the verifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash_env: Option<String>,
}

// Hashes stay out of logs and `check-config` output.
impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("sha256", &"<redacted>")
            .field("sha256_file", &self.sha256_file)
            .field("sha256_env", &self.sha256_env)
            .finish()
    }
}

impl std::fmt::Debug for WireUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireUser")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("password_hash", &"<redacted>")
            .field("password_hash_file", &self.password_hash_file)
            .field("password_hash_env", &self.password_hash_env)
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
    /// Largest HTTP request body, in bytes; larger ones get 413. Also the largest message a
    /// wire client may send once authenticated (a Query, Parse or Bind): larger ones end the
    /// connection with `08P01`. Default 65536.
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
    /// Refuse wire clients that do not start TLS (PostgreSQL's `hostssl`). Default: on when
    /// `http_addr` or `pg_addr` is not a loopback address, which then needs `tls_cert`.
    #[serde(default)]
    pub require_tls: Option<bool>,
    /// Wire connections served at once; more are refused ("too many clients", 53300).
    /// Default 100.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Failed authentications (wire logins, wrong HTTP keys) a client address may have per
    /// minute; beyond, it is refused before authentication (wire 28000, HTTP 429) until its
    /// budget refills. Default 10.
    #[serde(default = "default_login_failures")]
    pub login_failures_per_minute: u32,
    /// An HTTP request's headers must arrive within this, and a kept-alive HTTP connection
    /// with no new request for this long is closed. Default `10s`.
    #[serde(default = "default_header_timeout", with = "crate::config::duration")]
    pub http_header_timeout: Duration,
    /// HTTP connections served at once; more are closed on arrival. Default 256.
    #[serde(default = "default_http_connections")]
    pub http_max_connections: usize,
    /// HTTP connections one client address may hold at once. Default 32.
    #[serde(default = "default_http_per_address")]
    pub http_max_connections_per_address: usize,
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_http_connections() -> usize {
    256
}
fn default_http_per_address() -> usize {
    32
}

fn default_max_connections() -> usize {
    100
}
fn default_login_failures() -> u32 {
    10
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
            require_tls: None,
            max_connections: default_max_connections(),
            login_failures_per_minute: default_login_failures(),
            http_header_timeout: default_header_timeout(),
            http_max_connections: default_http_connections(),
            http_max_connections_per_address: default_http_per_address(),
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
            let key = format!("query.api_keys[{i}]");
            let source = secrets::one_source(
                &key,
                ("sha256", &k.sha256),
                ("sha256_file", k.sha256_file.as_deref()),
                ("sha256_env", k.sha256_env.as_deref()),
            )?;
            if source == secrets::Source::Inline {
                secrets::check_token_hash(&format!("{key}.sha256"), &k.sha256)?;
            }
            if k.name.is_empty() || !names.insert(k.name.as_str()) {
                return Err(InvalidConfig::new(
                    format!("{key}.name"),
                    "must be non-empty and unique",
                ));
            }
        }
        let mut users = std::collections::BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = format!("query.users[{i}]");
            let source = secrets::one_source(
                &key,
                ("password_hash", &u.password_hash),
                ("password_hash_file", u.password_hash_file.as_deref()),
                ("password_hash_env", u.password_hash_env.as_deref()),
            )?;
            if source == secrets::Source::Inline {
                secrets::check_password_hash(&format!("{key}.password_hash"), &u.password_hash)?;
            }
            if u.name.is_empty() || !users.insert(u.name.as_str()) {
                return Err(InvalidConfig::new(
                    format!("{key}.name"),
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
        if self.max_connections == 0 || self.max_connections > 10_000 {
            return Err(InvalidConfig::new(
                "query.max_connections",
                "must be between 1 and 10000",
            ));
        }
        if self.http_header_timeout.is_zero() || self.http_header_timeout > Duration::from_secs(600)
        {
            return Err(InvalidConfig::new(
                "query.http_header_timeout",
                "must be between 1ms and 10m",
            ));
        }
        if self.http_max_connections == 0 || self.http_max_connections > 100_000 {
            return Err(InvalidConfig::new(
                "query.http_max_connections",
                "must be between 1 and 100000",
            ));
        }
        if self.http_max_connections_per_address == 0 {
            return Err(InvalidConfig::new(
                "query.http_max_connections_per_address",
                "must be at least 1",
            ));
        }
        if self.login_failures_per_minute == 0 {
            return Err(InvalidConfig::new(
                "query.login_failures_per_minute",
                "must be at least 1",
            ));
        }
        if self.require_tls(addr) && self.tls_cert.is_none() {
            let exposed = std::iter::once(addr.to_string())
                .chain(self.pg_addr.clone())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(InvalidConfig::new(
                "query.require_tls",
                format!(
                    "{exposed}: an endpoint reachable from other machines needs TLS: set \
                     query.tls_cert and query.tls_key, or bind to 127.0.0.1, or (on a network \
                     you trust, e.g. a private container network) set require_tls = false"
                ),
            ));
        }
        Ok(addr)
    }

    /// Whether wire clients must use TLS: `require_tls`, else whether an endpoint is bound
    /// beyond loopback. `http_addr` is the parsed `self.http_addr`.
    pub fn require_tls(&self, http_addr: SocketAddr) -> bool {
        self.require_tls.unwrap_or_else(|| {
            let pg_exposed = self
                .pg_addr
                .as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .is_some_and(|a| !a.ip().is_loopback());
            !http_addr.ip().is_loopback() || pg_exposed
        })
    }

    /// This configuration with every key and user hash read from its file or environment
    /// variable and checked like an inline one, and no hash the project ships as a sample (a
    /// re-hashed sample password included). Start-up runs this; `check-config` does not, so a
    /// configuration can be checked where its secrets are not.
    pub fn resolve_secrets(&self) -> Result<Self, InvalidConfig> {
        self.validate()?;
        let mut out = self.clone();
        for (i, k) in out.api_keys.iter_mut().enumerate() {
            let key = format!("query.api_keys[{i}]");
            let file = k.sha256_file.take();
            let env = k.sha256_env.take();
            let read = secrets::read_source(
                &key,
                ("sha256_file", file.as_deref()),
                ("sha256_env", env.as_deref()),
            )?;
            if let Some((hash, origin)) = read {
                secrets::check_token_hash(&origin, &hash)?;
                k.sha256 = hash;
            }
        }
        for (i, u) in out.users.iter_mut().enumerate() {
            let key = format!("query.users[{i}]");
            let file = u.password_hash_file.take();
            let env = u.password_hash_env.take();
            let read = secrets::read_source(
                &key,
                ("password_hash_file", file.as_deref()),
                ("password_hash_env", env.as_deref()),
            )?;
            let origin = match read {
                Some((hash, origin)) => {
                    secrets::check_password_hash(&origin, &hash)?;
                    u.password_hash = hash;
                    origin
                }
                None => format!("{key}.password_hash"),
            };
            secrets::refuse_sample_password(&origin, &u.password_hash)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_users_and_limits_and_names_bad_keys() {
        let hash = crate::query::hash_password("a private pass phrase").unwrap();
        let c: QueryConfig = toml::from_str(&format!(
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
            password_hash = "{hash}"
            "#
        ))
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.api_keys[0].role, Role::Reader);
        // 0.0.0.0 without a certificate: TLS is required by default, so refused.
        let m = c.validate().unwrap_err().to_string();
        assert!(
            m.contains("query.require_tls") && m.contains("0.0.0.0:8080"),
            "{m}"
        );
        let mut c = c;
        c.tls_cert = Some("cert.pem".into());
        c.tls_key = Some("key.pem".into());
        c.validate().unwrap();
        assert!(c.require_tls("0.0.0.0:8080".parse().unwrap()));
        let trusted = QueryConfig {
            require_tls: Some(false),
            tls_cert: None,
            tls_key: None,
            ..c.clone()
        };
        trusted.validate().unwrap();
        let local = QueryConfig {
            pg_addr: Some("127.0.0.1:5433".into()),
            ..QueryConfig::default()
        };
        assert!(!local.require_tls("127.0.0.1:8080".parse().unwrap()));
        let wire_exposed = QueryConfig {
            pg_addr: Some("0.0.0.0:5433".into()),
            ..QueryConfig::default()
        };
        assert!(wire_exposed.require_tls("127.0.0.1:8080".parse().unwrap()));

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
        half_tls.tls_key = None;
        assert!(half_tls
            .validate()
            .unwrap_err()
            .to_string()
            .contains("query.tls_key"));
        QueryConfig::default().validate().unwrap();
    }
}
