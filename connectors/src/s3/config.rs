//! `[s3]` and `[tier]` configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::InvalidConfig;

/// `[s3]`: the bucket. Credentials are not configuration: they come from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or from
/// `credentials_file`, and are never logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Tier the archive to the bucket. Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Write the raw archive straight to the bucket: each roll is written in `nas.path` (then
    /// a local staging folder), uploaded and verified, and removed there before its offsets
    /// are committed. Aggregate files stay in `nas.path` and are tiered after `tier.after`
    /// (they are rewritten while late events can still change them). Default false.
    #[serde(default)]
    pub direct: bool,
    /// Bucket name (required when enabled).
    #[serde(default)]
    pub bucket: String,
    /// Key prefix inside the bucket. Default `primespark`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Region. Default `us-east-1`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Endpoint of an S3-compatible server (MinIO: `http://minio:9000`); AWS when unset.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Allow a plain-http endpoint. Default false.
    #[serde(default)]
    pub allow_http: bool,
    /// A file with `aws_access_key_id = ...` and `aws_secret_access_key = ...` lines (the AWS
    /// shared-credentials format), instead of the environment.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    "primespark".into()
}
fn default_region() -> String {
    "us-east-1".into()
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            enabled: false,
            direct: false,
            bucket: String::new(),
            prefix: default_prefix(),
            region: default_region(),
            endpoint: None,
            allow_http: false,
            credentials_file: None,
        }
    }
}

impl S3Config {
    /// Pure validation.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if !self.enabled {
            if self.direct {
                return Err(InvalidConfig::new(
                    "s3.direct",
                    "writing to the bucket needs s3.enabled = true and a bucket",
                ));
            }
            return Ok(());
        }
        if self.bucket.is_empty() {
            return Err(InvalidConfig::new(
                "s3.bucket",
                "required when s3.enabled = true",
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(InvalidConfig::new(
                "s3.prefix",
                "must not start or end with '/'",
            ));
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(InvalidConfig::new(
                    "s3.endpoint",
                    "must start with http:// or https://",
                ));
            }
            if e.starts_with("http://") && !self.allow_http {
                return Err(InvalidConfig::new(
                    "s3.allow_http",
                    "the endpoint is plain http: set allow_http = true to use it",
                ));
            }
        }
        Ok(())
    }
}

/// `[tier]`: when NAS files move to the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Files older than this (by modification time) move. Default `7d`. Keep it above
    /// `windows.allowed_lateness`: an aggregate file is rewritten while its bucket can change.
    #[serde(default = "default_after", with = "crate::config::duration")]
    pub after: Duration,
    /// How often the NAS is scanned. Default `5m`.
    #[serde(default = "default_interval", with = "crate::config::duration")]
    pub interval: Duration,
}

fn default_after() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_interval() -> Duration {
    Duration::from_secs(300)
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            after: default_after(),
            interval: default_interval(),
        }
    }
}

impl TierConfig {
    /// Pure validation.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.interval.is_zero() {
            return Err(InvalidConfig::new("tier.interval", "must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key() {
        let mut c = S3Config {
            enabled: true,
            ..S3Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("s3.bucket"));
        c.bucket = "b".into();
        c.endpoint = Some("http://127.0.0.1:9000".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("s3.allow_http"));
        c.allow_http = true;
        c.validate().unwrap();
        c.endpoint = Some("minio:9000".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("s3.endpoint"));
        assert!(S3Config::default().validate().is_ok());
        let direct_without_bucket = S3Config {
            direct: true,
            ..S3Config::default()
        };
        assert!(direct_without_bucket
            .validate()
            .unwrap_err()
            .to_string()
            .contains("s3.direct"));
    }
}
