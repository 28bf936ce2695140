//! `[nas]` configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::InvalidConfig;

/// `[nas]`: where raw Parquet files go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NasConfig {
    /// Root folder (the NAS mount). Default `./data`.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Write Parquet at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Roll a file when a partition's buffer holds this many rows. Default 200000.
    #[serde(default = "default_roll_rows")]
    pub roll_rows: usize,
    /// Roll at least this often. Default `60s`.
    #[serde(default = "default_roll_interval", with = "crate::config::duration")]
    pub roll_interval: Duration,
    /// Rows per Parquet row group (sized for scans). Default 131072.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
}

fn default_path() -> PathBuf {
    PathBuf::from("./data")
}
fn default_true() -> bool {
    true
}
fn default_roll_rows() -> usize {
    200_000
}
fn default_roll_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_row_group_rows() -> usize {
    128 * 1024
}

impl Default for NasConfig {
    fn default() -> Self {
        Self {
            path: default_path(),
            enabled: true,
            roll_rows: default_roll_rows(),
            roll_interval: default_roll_interval(),
            row_group_rows: default_row_group_rows(),
        }
    }
}

impl NasConfig {
    /// Pure validation.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.path.as_os_str().is_empty() {
            return Err(InvalidConfig::new("nas.path", "must not be empty"));
        }
        if self.roll_rows == 0 {
            return Err(InvalidConfig::new("nas.roll_rows", "must be positive"));
        }
        if self.roll_interval.is_zero() {
            return Err(InvalidConfig::new("nas.roll_interval", "must be positive"));
        }
        if self.row_group_rows == 0 {
            return Err(InvalidConfig::new("nas.row_group_rows", "must be positive"));
        }
        Ok(())
    }
}
