//! `[query]` configuration.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::InvalidConfig;

/// `[query]`: the SQL endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// Address of the HTTP endpoint. Default `127.0.0.1:8080`.
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// Largest result returned, in rows; larger results are cut and flagged. Default 100000.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
}

fn default_http_addr() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_rows() -> usize {
    100_000
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            http_addr: default_http_addr(),
            max_rows: default_max_rows(),
        }
    }
}

impl QueryConfig {
    /// Pure validation.
    pub fn validate(&self) -> Result<SocketAddr, InvalidConfig> {
        let addr: SocketAddr = self.http_addr.parse().map_err(|e| {
            InvalidConfig::new(
                "query.http_addr",
                format!("\"{}\" is not ip:port: {e}", self.http_addr),
            )
        })?;
        if self.max_rows == 0 {
            return Err(InvalidConfig::new("query.max_rows", "must be positive"));
        }
        Ok(addr)
    }
}
