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
    /// Roll a file when a partition's buffer holds this many rows. Default 50000: a catch-up
    /// holds up to this many rows per partition and raw table in memory (about 130 bytes
    /// each), so this and `roll_bytes` bound the archive's share of peak memory.
    #[serde(default = "default_roll_rows")]
    pub roll_rows: usize,
    /// Roll a file when a partition's buffer holds about this many bytes (uncompressed Arrow
    /// size of its rows; the file is smaller). Default 16777216 (16 MiB).
    #[serde(default = "default_roll_bytes")]
    pub roll_bytes: usize,
    /// Roll at least this often. Default `60s`.
    #[serde(default = "default_roll_interval", with = "crate::config::duration")]
    pub roll_interval: Duration,
    /// Rows per Parquet row group (sized for scans). Default 131072.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// How long 1-minute aggregate files stay on the NAS after compaction merged them into
    /// their hour's file (hidden from every listing meanwhile), so a query that listed them
    /// just before still reads them. Default `5m`; at least `query.timeout`.
    #[serde(default = "default_compaction_grace", with = "crate::config::duration")]
    pub compaction_grace: Duration,
}

fn default_path() -> PathBuf {
    PathBuf::from("./data")
}
fn default_true() -> bool {
    true
}
fn default_roll_rows() -> usize {
    50_000
}
fn default_roll_bytes() -> usize {
    16 << 20
}
fn default_roll_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_row_group_rows() -> usize {
    128 * 1024
}
fn default_compaction_grace() -> Duration {
    Duration::from_secs(300)
}

impl Default for NasConfig {
    fn default() -> Self {
        Self {
            path: default_path(),
            enabled: true,
            roll_rows: default_roll_rows(),
            roll_bytes: default_roll_bytes(),
            roll_interval: default_roll_interval(),
            row_group_rows: default_row_group_rows(),
            compaction_grace: default_compaction_grace(),
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
        if self.roll_bytes < 1024 {
            return Err(InvalidConfig::new(
                "nas.roll_bytes",
                "must be at least 1024 (bytes of a roll's rows)",
            ));
        }
        if self.roll_interval.is_zero() {
            return Err(InvalidConfig::new("nas.roll_interval", "must be positive"));
        }
        if self.row_group_rows == 0 {
            return Err(InvalidConfig::new("nas.row_group_rows", "must be positive"));
        }
        if self.compaction_grace > Duration::from_secs(24 * 3600) {
            return Err(InvalidConfig::new(
                "nas.compaction_grace",
                "must be at most 24h (merged minute files wait this long on the NAS)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_names_bad_keys() {
        let c: NasConfig = toml::from_str("path = \"/mnt/nas\"\nroll_bytes = 65536\n").unwrap();
        assert_eq!(c.path, PathBuf::from("/mnt/nas"));
        assert_eq!(c.roll_bytes, 65536);
        assert_eq!(c.roll_rows, 50_000);
        assert_eq!(c.roll_interval, Duration::from_secs(60));
        c.validate().unwrap();
        let tiny = NasConfig {
            roll_bytes: 10,
            ..NasConfig::default()
        };
        assert!(tiny
            .validate()
            .unwrap_err()
            .to_string()
            .contains("nas.roll_bytes"));
        assert!(toml::from_str::<NasConfig>("roll_size = 1").is_err());
    }
}
