//! The connections of one database, shared by its tables.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use super::types::quote_ident;
use super::{pg_message, PgTableError};

/// A small pool of PostgreSQL connections (at most `max_size` open at once), shared by cloning.
///
/// A connection goes back to the pool only after its query ran to the end; one abandoned
/// mid-query is closed, so a late cancel can never hit the next user's query.
///
/// A scan holds its connection until its last row, so a query whose scans of this database run
/// at the same time (a sort-merge self-join, say) needs that many connections: size the pool
/// above the most such scans one query has, times the queries that run at once.
#[derive(Clone)]
pub struct PgPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: tokio_postgres::Config,
    target: String,
    max_size: usize,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

// The config holds the password: show where we connect, never how.
impl fmt::Debug for PgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgPool")
            .field("target", &self.inner.target)
            .field("max_size", &self.inner.max_size)
            .finish()
    }
}

impl PgPool {
    /// A pool for a `postgres://user:password@host:port/db` URL. Pure: nothing connects until
    /// the first query. `max_size` below 1 counts as 1.
    pub fn new(url: &str, max_size: usize) -> Result<Self, PgTableError> {
        let config = url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| PgTableError::InvalidUrl(pg_message(&e)))?;
        Ok(Self::from_config(config, max_size))
    }

    /// A pool for a parsed configuration. `max_size` below 1 counts as 1.
    pub fn from_config(config: tokio_postgres::Config, max_size: usize) -> Self {
        let max_size = max_size.max(1);
        let target = target_of(&config);
        Self {
            inner: Arc::new(PoolInner {
                config,
                target,
                max_size,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(max_size)),
            }),
        }
    }

    /// `host:port/database` (for logs and errors; no credentials).
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The oldest value of timestamp column `column` in `table`, in microseconds since the
    /// epoch; `None` when the table is empty (the hot/cold boundary of a unified table).
    pub async fn min_time_us(
        &self,
        table: &str,
        column: &str,
    ) -> Result<Option<i64>, PgTableError> {
        let mut conn = self.get().await?;
        let sql = format!(
            "SELECT (extract(epoch FROM min({c})) * 1000000)::int8 FROM {t}",
            c = quote_ident(column),
            t = table
                .split('.')
                .map(quote_ident)
                .collect::<Vec<_>>()
                .join("."),
        );
        let client = conn.client().ok_or(PgTableError::PoolClosed)?;
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(|source| PgTableError::Query {
                table: table.to_owned(),
                message: pg_message(&source),
                source,
            })?;
        conn.reusable = true;
        Ok(row.get::<_, Option<i64>>(0))
    }

    /// Waits for a free slot, then hands out an idle connection or opens one.
    pub(super) async fn get(&self) -> Result<PooledClient, PgTableError> {
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| PgTableError::PoolClosed)?;
        loop {
            let idle = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match idle {
                Some(client) if !client.is_closed() => {
                    return Ok(PooledClient::new(client, self, permit))
                }
                // The server or the network closed it while idle: drop it, try the next.
                Some(_) => continue,
                None => break,
            }
        }
        let client = self.connect().await?;
        Ok(PooledClient::new(client, self, permit))
    }

    async fn connect(&self) -> Result<Client, PgTableError> {
        let target = &self.inner.target;
        let connect_err = |source: tokio_postgres::Error| PgTableError::Connect {
            target: target.clone(),
            message: pg_message(&source),
            source,
        };
        let (client, connection) = self
            .inner
            .config
            .connect(NoTls)
            .await
            .map_err(connect_err)?;
        let log_target = target.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(target_db = %log_target, error = %e, "postgres connection closed");
            }
        });
        // Literals and casts assume UTC and ISO dates, whatever the server's defaults are.
        client
            .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'")
            .await
            .map_err(connect_err)?;
        tracing::debug!(target_db = %target, "postgres connection opened");
        Ok(client)
    }
}

/// `host:port/database` of a configuration.
fn target_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[allow(unreachable_patterns)] // only on platforms with Unix sockets
        Some(other) => format!("{other:?}"),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// A connection lent by a [`PgPool`]. It goes back on drop only if marked reusable.
pub(super) struct PooledClient {
    client: Option<Client>,
    pool: Arc<PoolInner>,
    pub(super) reusable: bool,
    _permit: OwnedSemaphorePermit,
}

impl PooledClient {
    fn new(client: Client, pool: &PgPool, permit: OwnedSemaphorePermit) -> Self {
        Self {
            client: Some(client),
            pool: Arc::clone(&pool.inner),
            reusable: false,
            _permit: permit,
        }
    }

    pub(super) fn client(&self) -> Option<&Client> {
        self.client.as_ref()
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if self.reusable && !client.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hides_the_password() {
        let pool = PgPool::new("postgres://u:secret@db.example:5433/telemetry", 2).unwrap();
        assert_eq!(pool.target(), "db.example:5433/telemetry");
        assert!(!format!("{pool:?}").contains("secret"));
        assert!(matches!(
            PgPool::new("postgres://u:secret@db:notaport/x", 2),
            Err(PgTableError::InvalidUrl(m)) if !m.contains("secret")
        ));
    }
}
