//! The connections of one database, shared by its tables: a deadpool-postgres pool whose new
//! connections are set to UTC and ISO dates, lent out so that only a connection whose query
//! ran to the end goes back.

use std::fmt;
use std::sync::Arc;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod,
};
use tokio_postgres::config::Host;
use tokio_postgres::Client;

use crate::postgres::tls::{PgTarget, PgTls};

use super::types::quote_ident;
use super::{pg_message, PgTableError};

/// A pool of PostgreSQL connections (at most `max_size` open at once), shared by cloning.
///
/// A connection goes back to the pool only after its query ran to the end; one abandoned
/// mid-query is taken out of the pool and closed, so a late cancel can never hit the next
/// user's query. A connection found closed when it is taken again is replaced.
///
/// A scan holds its connection until its last row, so a query whose scans of this database run
/// at the same time (a sort-merge self-join, say) needs that many connections: size the pool
/// above the most such scans one query has, times the queries that run at once.
#[derive(Clone)]
pub struct PgPool {
    pool: Pool,
    target: Arc<str>,
    tls: PgTls,
}

// The config holds the password: show where we connect, never how.
impl fmt::Debug for PgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgPool")
            .field("target", &self.target)
            .field("max_size", &self.pool.status().max_size)
            .field("tls", &self.tls)
            .finish()
    }
}

impl PgPool {
    /// A pool for a `postgres://user:password@host:port/db` URL (with libpq's `sslmode` and
    /// `sslrootcert`, see [`crate::postgres::tls`]). Pure but for reading certificate files:
    /// nothing connects until the first query. `max_size` below 1 counts as 1.
    pub fn new(url: &str, max_size: usize) -> Result<Self, PgTableError> {
        let target = PgTarget::parse(url).map_err(|e| PgTableError::InvalidUrl(e.to_string()))?;
        Ok(Self::from_target(target, max_size))
    }

    /// A pool for a parsed connection string. `max_size` below 1 counts as 1.
    pub fn from_target(pg: PgTarget, max_size: usize) -> Self {
        let target: Arc<str> = target_of(&pg.config).into();
        let tls = pg.tls.clone();
        let manager = Manager::from_config(
            pg.config,
            pg.tls,
            ManagerConfig {
                // `is_closed` only: a connection comes back only after a finished query.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let opened = Arc::clone(&target);
        let pool = Pool::builder(manager)
            .max_size(max_size.max(1))
            .post_create(Hook::async_fn(move |client, _| {
                let target = Arc::clone(&opened);
                Box::pin(async move {
                    // Literals and casts assume UTC and ISO dates, whatever the server's
                    // defaults are.
                    client
                        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'")
                        .await
                        .map_err(HookError::Backend)?;
                    tracing::debug!(target_db = %target, "postgres connection opened");
                    Ok(())
                })
            }))
            .build()
            // Building fails only for wait/create/recycle timeouts without a runtime: none set.
            .expect("a pool without timeouts needs no runtime");
        Self { pool, target, tls }
    }

    /// The TLS connector of this database (cancel requests need one too).
    pub(super) fn tls(&self) -> &PgTls {
        &self.tls
    }

    /// `host:port/database` (for logs and errors; no credentials).
    pub fn target(&self) -> &str {
        &self.target
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
            .map_err(|e| PgTableError::query(table, e))?;
        conn.reusable = true;
        Ok(row.get::<_, Option<i64>>(0))
    }

    /// Waits for a free slot, then lends an idle connection or opens one.
    pub(super) async fn get(&self) -> Result<PooledClient, PgTableError> {
        let object = self.pool.get().await.map_err(|e| self.pool_error(e))?;
        Ok(PooledClient {
            object: Some(object),
            reusable: false,
        })
    }

    fn pool_error(&self, e: PoolError) -> PgTableError {
        let connect = |source: tokio_postgres::Error| PgTableError::Connect {
            target: self.target.to_string(),
            message: pg_message(&source),
            source,
        };
        match e {
            PoolError::Backend(source) | PoolError::PostCreateHook(HookError::Backend(source)) => {
                connect(source)
            }
            // The rest cannot happen: no timeouts are set, and the hook fails only with the
            // server's errors. Closed is the nearest meaning.
            PoolError::Closed
            | PoolError::Timeout(_)
            | PoolError::NoRuntimeSpecified
            | PoolError::PostCreateHook(HookError::Message(_)) => PgTableError::PoolClosed,
        }
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

/// A connection lent by a [`PgPool`]. It goes back on drop only if marked reusable; otherwise
/// it leaves the pool (freeing its slot) and is closed.
pub(super) struct PooledClient {
    object: Option<Object>,
    /// Its query ran to the end: nothing of it can arrive late.
    pub(super) reusable: bool,
}

impl PooledClient {
    pub(super) fn client(&self) -> Option<&Client> {
        self.object.as_deref().map(|wrapper| &**wrapper)
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            if !self.reusable {
                // Out of the pool; dropping the client closes the connection.
                drop(Object::take(object));
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
