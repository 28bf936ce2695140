//! `[postgres]` configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::InvalidConfig;

/// `[postgres]`: the database of raw rows, aggregates, dead letters and offsets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL `postgres://user:password@host:port/db`. Prefer leaving the password out
    /// and setting `PRIMESPARK_POSTGRES__URL` or `PGPASSWORD` in the environment. Never logged.
    #[serde(default = "default_url")]
    pub url: String,
    /// Flush the raw buffer when it holds this many rows. Default 20000.
    #[serde(default = "default_flush_rows")]
    pub flush_rows: usize,
    /// Flush the raw buffer at least this often. Default `1s`.
    #[serde(default = "default_flush_interval", with = "crate::config::duration")]
    pub flush_interval: Duration,
    /// How long rows stay (`[postgres.retention]`).
    #[serde(default)]
    pub retention: super::RetentionConfig,
    /// How long the writer lease holds without renewal: a second instance on the same
    /// configuration waits as a standby and takes over this long after the writer stopped
    /// renewing (at once after a clean shutdown). Default `10s`.
    #[serde(default = "default_lease_ttl", with = "crate::config::duration")]
    pub lease_ttl: Duration,
    /// On TimescaleDB with `timescaledb.enable_direct_compress_copy` (2.21 and later): raw
    /// rows are COPYed straight into the columnstore, compressed as they arrive, instead of
    /// into the row store for the compression policy to rewrite later. Measured faster here
    /// (see the README). Ignored on plain PostgreSQL and older TimescaleDB. Default true.
    #[serde(default = "default_true")]
    pub direct_compress_copy: bool,
}

fn default_true() -> bool {
    true
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_url() -> String {
    "postgres://primespark@127.0.0.1:5432/primespark".into()
}

fn default_flush_rows() -> usize {
    20_000
}

fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            flush_rows: default_flush_rows(),
            flush_interval: default_flush_interval(),
            retention: super::RetentionConfig::default(),
            lease_ttl: default_lease_ttl(),
            direct_compress_copy: true,
        }
    }
}

// The URL may hold a password: never print it.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact(&self.url))
            .field("flush_rows", &self.flush_rows)
            .field("flush_interval", &self.flush_interval)
            .field("retention", &self.retention)
            .field("lease_ttl", &self.lease_ttl)
            .field("direct_compress_copy", &self.direct_compress_copy)
            .finish()
    }
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl PostgresConfig {
    /// Pure validation: the URL parses, flush settings are sane.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        super::tls::PgTarget::check(&self.url)
            .map_err(|e| InvalidConfig::new("postgres.url", e.to_string()))?;
        if self.flush_rows == 0 {
            return Err(InvalidConfig::new(
                "postgres.flush_rows",
                "must be positive",
            ));
        }
        if self.flush_interval.is_zero() {
            return Err(InvalidConfig::new(
                "postgres.flush_interval",
                "must be positive",
            ));
        }
        if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&self.lease_ttl) {
            return Err(InvalidConfig::new(
                "postgres.lease_ttl",
                "must be between 2s (renewals every quarter of it must reach the database) and 5m (a standby waits that long after a crash)",
            ));
        }
        self.retention.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        let c = PostgresConfig {
            url: "postgres://u:secret@h/d".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn validates() {
        PostgresConfig::default().validate().unwrap();
        let bad = PostgresConfig {
            url: "postgres://h:notaport/d".into(),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "postgres.url");
        let c: PostgresConfig =
            toml::from_str("url = \"postgres://a@b/c\"\nflush_interval = \"250ms\"").unwrap();
        assert_eq!(c.flush_interval, Duration::from_millis(250));
    }
}
