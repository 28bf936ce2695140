//! A DataFusion table over a PostgreSQL table, for the query service: SQL over the live tables
//! without copying them first.
//!
//! [`PostgresTable`] is a [`TableProvider`] that hands PostgreSQL as much of the query as it can
//! answer exactly: the projected columns, the filters it can translate faithfully (comparisons
//! with literals, `AND`/`OR`/`NOT`, `IS [NOT] NULL`, `BETWEEN`, `IN` lists, `LIKE`) and, when
//! every filter went down, the `LIMIT`. Whatever it cannot translate it reports as
//! [`TableProviderFilterPushDown::Unsupported`], so DataFusion applies it above the scan and the
//! answer stays right. The generated SQL shows in `EXPLAIN` (see [`PostgresScanExec`]).
//!
//! "Faithful" means PostgreSQL selects exactly the rows DataFusion would. Three differences
//! between the two engines decide what is translated and how:
//! - Every column is read and compared through an explicit cast to the PostgreSQL type matching
//!   its Arrow type (`"x"::int8`), so `numeric` compares as the `Float64` DataFusion sees and
//!   `jsonb` as its text. PostgreSQL drops a cast to the column's own type, so indexes still
//!   serve when the Arrow schema matches the table.
//! - Text ordering uses `COLLATE "C"` (byte order, like Arrow); equality needs none.
//! - Arrow orders floats with `total_cmp` (`-0.0 < 0.0`, `NaN` equals itself), PostgreSQL with
//!   IEEE rules plus `NaN` as largest: float comparisons go down only against a finite,
//!   non-zero literal, where both agree.
//!
//! Connections come from a small [`PgPool`] shared by the tables of one database. Every
//! session runs with `TimeZone = UTC`, so `timestamp` to `timestamptz` casts mean UTC.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::array::{
    make_array, ArrayRef, BinaryBuilder, BinaryViewBuilder, BooleanBuilder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, LargeBinaryBuilder,
    LargeStringBuilder, RecordBatch, RecordBatchOptions, StringBuilder, StringViewBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    expr::{Between, BinaryExpr, Cast, InList, Like},
    Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::Host;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, NoTls, RowStream};

/// Rows per record batch a scan produces.
pub const BATCH_ROWS: usize = 8192;

/// Connections a pool made by [`PostgresTable::discover`] keeps at most.
pub const DEFAULT_POOL_SIZE: usize = 4;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from the Unix epoch to PostgreSQL's.
const PG_EPOCH_DAYS: i32 = 10_957;

/// Failures of the PostgreSQL table. At the DataFusion boundary they become
/// [`DataFusionError::External`].
#[derive(Debug, thiserror::Error)]
pub enum PgTableError {
    /// The connection URL does not parse: fix the configuration.
    #[error("invalid PostgreSQL URL: {0}")]
    InvalidUrl(String),
    /// Connecting failed: the server may be down (retry) or refuse the credentials (fix them).
    #[error("connecting to PostgreSQL at {target}: {message}")]
    Connect {
        /// `host:port/database`, never the password.
        target: String,
        /// The server's or the socket's message.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement failed (see [`PgTableError::is_transient`] for whether to retry).
    #[error("table {table}: {message}")]
    Query {
        /// The table being read.
        table: String,
        /// The server's message.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// `information_schema` knows no such table (or we may not see it).
    #[error("table {table} not found")]
    TableNotFound {
        /// The table asked for.
        table: String,
    },
    /// A column's PostgreSQL type has no Arrow mapping here.
    #[error("table {table} column {column}: PostgreSQL type {pg_type} is not supported")]
    UnsupportedPgType {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Its `udt_name`.
        pg_type: String,
    },
    /// A field of the given Arrow schema has a type this table cannot produce.
    #[error("table {table} column {column}: Arrow type {data_type} is not supported")]
    UnsupportedArrowType {
        /// The table.
        table: String,
        /// The field.
        column: String,
        /// Its type.
        data_type: DataType,
    },
    /// A value cannot be represented in Arrow (an infinite timestamp, say).
    #[error("table {table} column {column}: {message}")]
    Decode {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// What is wrong with the value.
        message: String,
    },
    /// The rows do not fit the schema (a NULL in a non-nullable field, say).
    #[error("table {table}: building a record batch: {source}")]
    Arrow {
        /// The table.
        table: String,
        /// The error.
        #[source]
        source: ArrowError,
    },
    /// The pool was closed.
    #[error("PostgreSQL connection pool closed")]
    PoolClosed,
}

impl PgTableError {
    /// Whether trying again later may succeed (connection lost, server restarting, conflict),
    /// as opposed to an error someone must fix.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Query { source, .. } => {
                source.is_closed()
                    || source.code().is_some_and(|c| {
                        // Connection exception, insufficient resources, operator intervention,
                        // transaction rollback (serialization failure, deadlock).
                        matches!(c.code().get(..2), Some("08" | "53" | "57" | "40"))
                    })
            }
            _ => false,
        }
    }

    fn query(table: &str, source: tokio_postgres::Error) -> Self {
        Self::Query {
            table: table.to_owned(),
            message: pg_message(&source),
            source,
        }
    }
}

impl From<PgTableError> for DataFusionError {
    fn from(e: PgTableError) -> Self {
        DataFusionError::External(Box::new(e))
    }
}

/// The server's message for a database error, the error and its cause otherwise (tokio-postgres
/// prints only "db error" for the former).
fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_owned();
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

// ------------------------------------------------------------------------------------- pool

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
    async fn get(&self) -> Result<PooledClient, PgTableError> {
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
struct PooledClient {
    client: Option<Client>,
    pool: Arc<PoolInner>,
    reusable: bool,
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

    fn client(&self) -> Option<&Client> {
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

// ------------------------------------------------------------------------------------- types

/// The PostgreSQL type a column is read and compared as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
}

impl PgType {
    fn name(self) -> &'static str {
        match self {
            Self::Bool => "bool",
            Self::Int2 => "int2",
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Float4 => "float4",
            Self::Float8 => "float8",
            Self::Text => "text",
            Self::Bytea => "bytea",
            Self::Date => "date",
            Self::Timestamp => "timestamp",
            Self::Timestamptz => "timestamptz",
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Self::Float4 | Self::Float8)
    }
}

/// How a column is read: the PostgreSQL type to cast to, and the Arrow array to build.
#[derive(Debug, Clone, PartialEq)]
struct ColumnKind {
    pg: PgType,
    data_type: DataType,
}

impl ColumnKind {
    fn of(data_type: &DataType) -> Option<Self> {
        let pg = match data_type {
            DataType::Boolean => PgType::Bool,
            DataType::Int16 => PgType::Int2,
            DataType::Int32 => PgType::Int4,
            DataType::Int64 => PgType::Int8,
            DataType::Float32 => PgType::Float4,
            DataType::Float64 => PgType::Float8,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => PgType::Text,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => PgType::Bytea,
            DataType::Date32 => PgType::Date,
            DataType::Timestamp(_, None) => PgType::Timestamp,
            DataType::Timestamp(_, Some(_)) => PgType::Timestamptz,
            _ => return None,
        };
        Some(Self {
            pg,
            data_type: data_type.clone(),
        })
    }

    /// Filters may compare it in PostgreSQL. Not timestamps coarser or finer than PostgreSQL's
    /// microseconds: the server would compare values DataFusion never sees.
    fn filterable(&self) -> bool {
        !matches!(self.data_type, DataType::Timestamp(unit, _) if unit != TimeUnit::Microsecond)
    }
}

/// The Arrow type `discover` gives a PostgreSQL `udt_name`.
fn arrow_type_for(udt_name: &str) -> Option<DataType> {
    Some(match udt_name {
        "bool" => DataType::Boolean,
        "int2" => DataType::Int16,
        "int4" => DataType::Int32,
        "int8" => DataType::Int64,
        "float4" => DataType::Float32,
        "float8" | "numeric" => DataType::Float64,
        "text" | "varchar" | "bpchar" | "name" | "json" | "jsonb" | "uuid" => DataType::Utf8,
        "bytea" => DataType::Binary,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamptz" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => return None,
    })
}

// ------------------------------------------------------------------------------- SQL text

/// `"name"` with embedded quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An escape-string literal (`E'...'`): means the same whatever `standard_conforming_strings`
/// is. `None` for strings PostgreSQL cannot hold (NUL).
fn quote_str(s: &str) -> Option<String> {
    if s.contains('\0') {
        return None;
    }
    Some(format!(
        "E'{}'",
        s.replace('\\', "\\\\").replace('\'', "''")
    ))
}

/// A table name, optionally schema-qualified (`schema.table`; the first dot splits).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    fn parse(s: &str) -> Self {
        match s.split_once('.') {
            Some((schema, name)) => Self {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            },
            None => Self {
                schema: None,
                name: s.to_owned(),
            },
        }
    }

    fn sql(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Where a translated value comes from: the float rules depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A column, possibly under a lossless cast.
    Column,
    /// A literal on which both engines agree (not a float zero, infinity or NaN).
    Literal,
    /// A float literal of 0, -0, ±infinity or NaN.
    SpecialFloat,
    /// A typed NULL.
    Null,
}

/// A translated value expression.
#[derive(Debug, Clone)]
struct Val {
    sql: String,
    ty: PgType,
    origin: Origin,
}

/// Formats microseconds since the Unix epoch as PostgreSQL input, for years 1 to 9999 (where
/// chrono's and PostgreSQL's notations agree).
fn timestamp_text(micros: i64) -> Option<String> {
    use chrono::Datelike;
    let t = chrono::DateTime::from_timestamp_micros(micros)?;
    if !(1..=9999).contains(&t.year()) {
        return None;
    }
    Some(t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
}

/// A literal as SQL, or `None` if it has no exact PostgreSQL counterpart.
fn literal(value: &ScalarValue) -> Option<Val> {
    use ScalarValue as S;
    let typed = |text: String, ty: PgType| {
        Some(Val {
            sql: format!("'{text}'::{}", ty.name()),
            ty,
            origin: Origin::Literal,
        })
    };
    let null = |ty: PgType| {
        Some(Val {
            sql: format!("NULL::{}", ty.name()),
            ty,
            origin: Origin::Null,
        })
    };
    let float = |v: f64, text: String, ty: PgType| {
        let origin = if v == 0.0 || !v.is_finite() {
            Origin::SpecialFloat
        } else {
            Origin::Literal
        };
        Some(Val {
            sql: format!("'{text}'::{}", ty.name()),
            ty,
            origin,
        })
    };
    let text = |s: &str| {
        Some(Val {
            sql: quote_str(s)?,
            ty: PgType::Text,
            origin: Origin::Literal,
        })
    };
    let bytes = |b: &[u8]| {
        let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
        Some(Val {
            sql: format!("E'\\\\x{hex}'::bytea"),
            ty: PgType::Bytea,
            origin: Origin::Literal,
        })
    };
    let timestamp = |micros: Option<i64>, tz: &Option<Arc<str>>| {
        let ty = if tz.is_some() {
            PgType::Timestamptz
        } else {
            PgType::Timestamp
        };
        match micros {
            None => null(ty),
            Some(m) => {
                let text = timestamp_text(m)?;
                // The value is an instant in UTC whatever zone the type names.
                let suffix = if tz.is_some() { "+00" } else { "" };
                typed(format!("{text}{suffix}"), ty)
            }
        }
    };
    match value {
        S::Boolean(Some(b)) => Some(Val {
            sql: if *b { "TRUE" } else { "FALSE" }.to_owned(),
            ty: PgType::Bool,
            origin: Origin::Literal,
        }),
        S::Boolean(None) => null(PgType::Bool),
        S::Int16(v) => v.map_or_else(
            || null(PgType::Int2),
            |v| typed(v.to_string(), PgType::Int2),
        ),
        S::Int32(v) => v.map_or_else(
            || null(PgType::Int4),
            |v| typed(v.to_string(), PgType::Int4),
        ),
        S::Int64(v) => v.map_or_else(
            || null(PgType::Int8),
            |v| typed(v.to_string(), PgType::Int8),
        ),
        // `{:?}` is the shortest text that reads back as the same float.
        S::Float32(v) => v.map_or_else(
            || null(PgType::Float4),
            |v| float(f64::from(v), format!("{v:?}"), PgType::Float4),
        ),
        S::Float64(v) => v.map_or_else(
            || null(PgType::Float8),
            |v| float(v, format!("{v:?}"), PgType::Float8),
        ),
        S::Utf8(v) | S::LargeUtf8(v) | S::Utf8View(v) => {
            v.as_deref().map_or_else(|| null(PgType::Text), text)
        }
        S::Binary(v) | S::LargeBinary(v) | S::BinaryView(v) => {
            v.as_deref().map_or_else(|| null(PgType::Bytea), bytes)
        }
        S::Date32(v) => match v {
            None => null(PgType::Date),
            Some(days) => {
                let t = timestamp_text(i64::from(*days).checked_mul(86_400_000_000)?)?;
                typed(t.get(..10)?.to_owned(), PgType::Date)
            }
        },
        S::TimestampSecond(v, tz) => timestamp(to_micros(*v, |s| s.checked_mul(1_000_000))?, tz),
        S::TimestampMillisecond(v, tz) => timestamp(to_micros(*v, |ms| ms.checked_mul(1_000))?, tz),
        S::TimestampMicrosecond(v, tz) => timestamp(*v, tz),
        // Only whole microseconds: PostgreSQL would round the rest.
        S::TimestampNanosecond(v, tz) => timestamp(
            to_micros(*v, |ns| (ns % 1_000 == 0).then_some(ns / 1_000))?,
            tz,
        ),
        _ => None,
    }
}

/// A timestamp literal's value in microseconds: `Some(None)` for NULL, `None` when `convert`
/// finds no exact microsecond value.
fn to_micros(v: Option<i64>, convert: impl FnOnce(i64) -> Option<i64>) -> Option<Option<i64>> {
    match v {
        None => Some(None),
        Some(v) => convert(v).map(Some),
    }
}

/// Translates DataFusion filter expressions to PostgreSQL SQL over one table's columns.
struct Translator<'a> {
    schema: &'a Schema,
    kinds: &'a [ColumnKind],
}

impl Translator<'_> {
    /// A value (column, lossless cast of a column, literal).
    fn value(&self, e: &Expr) -> Option<Val> {
        match e {
            Expr::Column(c) => {
                let idx = self.schema.index_of(&c.name).ok()?;
                let kind = self.kinds.get(idx)?;
                if !kind.filterable() {
                    return None;
                }
                Some(Val {
                    sql: format!("({}::{})", quote_ident(&c.name), kind.pg.name()),
                    ty: kind.pg,
                    origin: Origin::Column,
                })
            }
            Expr::Literal(v, _) => literal(v),
            Expr::Cast(Cast { expr, field }) => {
                let inner = self.value(expr)?;
                if inner.origin != Origin::Column {
                    return None;
                }
                let target = ColumnKind::of(field.data_type())?;
                if !target.filterable() || !lossless_cast(inner.ty, target.pg) {
                    return None;
                }
                Some(Val {
                    sql: format!("({}::{})", inner.sql, target.pg.name()),
                    ty: target.pg,
                    origin: Origin::Column,
                })
            }
            _ => None,
        }
    }

    /// A boolean expression, or `None` if PostgreSQL would not answer it exactly as DataFusion.
    fn predicate(&self, e: &Expr) -> Option<String> {
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::And | Operator::Or => {
                    let word = if *op == Operator::And { "AND" } else { "OR" };
                    Some(format!(
                        "({} {word} {})",
                        self.predicate(left)?,
                        self.predicate(right)?
                    ))
                }
                _ => self.comparison(left, *op, right),
            },
            Expr::Not(inner) => Some(format!("(NOT {})", self.predicate(inner)?)),
            Expr::IsNull(inner) => Some(format!("({} IS NULL)", self.operand(inner)?)),
            Expr::IsNotNull(inner) => Some(format!("({} IS NOT NULL)", self.operand(inner)?)),
            Expr::IsTrue(inner) => Some(format!("({} IS TRUE)", self.predicate(inner)?)),
            Expr::IsFalse(inner) => Some(format!("({} IS FALSE)", self.predicate(inner)?)),
            Expr::IsUnknown(inner) => Some(format!("({} IS UNKNOWN)", self.predicate(inner)?)),
            Expr::IsNotTrue(inner) => Some(format!("({} IS NOT TRUE)", self.predicate(inner)?)),
            Expr::IsNotFalse(inner) => Some(format!("({} IS NOT FALSE)", self.predicate(inner)?)),
            Expr::IsNotUnknown(inner) => {
                Some(format!("({} IS NOT UNKNOWN)", self.predicate(inner)?))
            }
            Expr::Between(Between {
                expr,
                negated,
                low,
                high,
            }) => {
                let v = self.value(expr)?;
                let lo = self.value(low)?;
                let hi = self.value(high)?;
                if !comparable(&v, &lo) || !comparable(&v, &hi) {
                    return None;
                }
                let not = if *negated { "NOT " } else { "" };
                Some(format!(
                    "({}{} {not}BETWEEN {} AND {})",
                    v.sql,
                    collate(v.ty),
                    lo.sql,
                    hi.sql
                ))
            }
            Expr::InList(InList {
                expr,
                list,
                negated,
            }) => {
                let v = self.value(expr)?;
                if list.is_empty() {
                    return None;
                }
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let item = self.value(item)?;
                    if item.origin == Origin::Column || !comparable(&v, &item) {
                        return None;
                    }
                    items.push(item.sql);
                }
                let not = if *negated { "NOT " } else { "" };
                Some(format!("({} {not}IN ({}))", v.sql, items.join(", ")))
            }
            Expr::Like(Like {
                negated,
                expr,
                pattern,
                escape_char,
                case_insensitive,
            }) => {
                // ILIKE folds case by locale in PostgreSQL, by Unicode in Arrow.
                if *case_insensitive || !matches!(escape_char, None | Some('\\')) {
                    return None;
                }
                let v = self.value(expr)?;
                let Expr::Literal(p, _) = pattern.as_ref() else {
                    return None;
                };
                let p = match p {
                    ScalarValue::Utf8(Some(p))
                    | ScalarValue::LargeUtf8(Some(p))
                    | ScalarValue::Utf8View(Some(p)) => p,
                    _ => return None,
                };
                // PostgreSQL rejects a trailing escape, Arrow matches a backslash.
                if v.ty != PgType::Text || ends_with_escape(p) {
                    return None;
                }
                let not = if *negated { "NOT " } else { "" };
                Some(format!("({} {not}LIKE {})", v.sql, quote_str(p)?))
            }
            Expr::Column(_) | Expr::Literal(..) => {
                let v = self.value(e)?;
                (v.ty == PgType::Bool).then_some(v.sql)
            }
            _ => None,
        }
    }

    /// The operand of `IS [NOT] NULL`: a value or a predicate.
    fn operand(&self, e: &Expr) -> Option<String> {
        self.value(e).map(|v| v.sql).or_else(|| self.predicate(e))
    }

    fn comparison(&self, left: &Expr, op: Operator, right: &Expr) -> Option<String> {
        let sql_op = match op {
            Operator::Eq => "=",
            Operator::NotEq => "<>",
            Operator::Lt => "<",
            Operator::LtEq => "<=",
            Operator::Gt => ">",
            Operator::GtEq => ">=",
            Operator::IsDistinctFrom => "IS DISTINCT FROM",
            Operator::IsNotDistinctFrom => "IS NOT DISTINCT FROM",
            _ => return None,
        };
        let l = self.value(left)?;
        let r = self.value(right)?;
        if !comparable(&l, &r) {
            return None;
        }
        let ordering = matches!(
            op,
            Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
        );
        let collation = if ordering { collate(l.ty) } else { "" };
        Some(format!("({}{collation} {sql_op} {})", l.sql, r.sql))
    }
}

/// Byte order for text, as Arrow compares; nothing for other types.
fn collate(ty: PgType) -> &'static str {
    if ty == PgType::Text {
        " COLLATE \"C\""
    } else {
        ""
    }
}

/// Both sides have the same type, and for floats one is a column and the other a literal both
/// engines order the same way against any value (see the module docs).
fn comparable(a: &Val, b: &Val) -> bool {
    if a.ty != b.ty {
        return false;
    }
    if !a.ty.is_float() {
        return true;
    }
    let safe_literal = |o: Origin| matches!(o, Origin::Literal | Origin::Null);
    (a.origin == Origin::Column && safe_literal(b.origin))
        || (b.origin == Origin::Column && safe_literal(a.origin))
}

/// Casts DataFusion and PostgreSQL compute identically for every value.
fn lossless_cast(from: PgType, to: PgType) -> bool {
    use PgType::*;
    from == to
        || matches!(
            (from, to),
            (Int2, Int4)
                | (Int2, Int8)
                | (Int4, Int8)
                | (Int2, Float8)
                | (Int4, Float8)
                | (Float4, Float8)
        )
}

/// Whether a LIKE pattern ends in an unescaped backslash.
fn ends_with_escape(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.next().is_none() {
            return true;
        }
    }
    false
}

// ------------------------------------------------------------------------------- provider

/// A PostgreSQL table as a DataFusion table, pushing projections, filters and limits into the
/// SQL it sends (see the module docs).
#[derive(Debug, Clone)]
pub struct PostgresTable {
    pool: PgPool,
    table: TableName,
    schema: SchemaRef,
    kinds: Vec<ColumnKind>,
}

impl PostgresTable {
    /// A table read through `pool`, seen by DataFusion with `schema`. `table` may be
    /// schema-qualified (`schema.table`); the schema's field names are the column names. Fails
    /// if a field's type cannot be produced: booleans, `Int16/32/64`, `Float32/64`, strings,
    /// binaries, `Date32` and timestamps (any unit, with or without zone) can.
    pub fn new(pool: PgPool, table: &str, schema: SchemaRef) -> Result<Self, PgTableError> {
        let kinds = schema
            .fields()
            .iter()
            .map(|f| {
                ColumnKind::of(f.data_type()).ok_or_else(|| PgTableError::UnsupportedArrowType {
                    table: table.to_owned(),
                    column: f.name().clone(),
                    data_type: f.data_type().clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            pool,
            table: TableName::parse(table),
            schema,
            kinds,
        })
    }

    /// Connects to `url` and builds the schema from `information_schema.columns` (in column
    /// order; `numeric` as `Float64`, `json`/`jsonb` as `Utf8`, `timestamptz` as
    /// `Timestamp(µs, "UTC")`). Uses a pool of [`DEFAULT_POOL_SIZE`].
    pub async fn discover(url: &str, table: &str) -> Result<Self, PgTableError> {
        Self::discover_with_pool(PgPool::new(url, DEFAULT_POOL_SIZE)?, table).await
    }

    /// [`Self::discover`] through an existing pool.
    pub async fn discover_with_pool(pool: PgPool, table: &str) -> Result<Self, PgTableError> {
        let name = TableName::parse(table);
        let mut conn = pool.get().await?;
        let client = conn.client().ok_or(PgTableError::PoolClosed)?;
        let rows = client
            .query(
                "SELECT column_name::text, udt_name::text, is_nullable::text \
                 FROM information_schema.columns \
                 WHERE table_schema::text = COALESCE($1::text, current_schema()::text) \
                   AND table_name::text = $2::text \
                 ORDER BY ordinal_position",
                &[&name.schema, &name.name],
            )
            .await
            .map_err(|e| PgTableError::query(table, e))?;
        conn.reusable = true;
        drop(conn);
        if rows.is_empty() {
            return Err(PgTableError::TableNotFound {
                table: table.to_owned(),
            });
        }
        let mut fields = Vec::with_capacity(rows.len());
        for row in &rows {
            let column: String = row.try_get(0).map_err(|e| PgTableError::query(table, e))?;
            let udt: String = row.try_get(1).map_err(|e| PgTableError::query(table, e))?;
            let nullable: String = row.try_get(2).map_err(|e| PgTableError::query(table, e))?;
            let data_type =
                arrow_type_for(&udt).ok_or_else(|| PgTableError::UnsupportedPgType {
                    table: table.to_owned(),
                    column: column.clone(),
                    pg_type: udt.clone(),
                })?;
            fields.push(Field::new(column, data_type, nullable == "YES"));
        }
        tracing::debug!(table, columns = fields.len(), "discovered postgres table");
        Self::new(pool, table, Arc::new(Schema::new(fields)))
    }

    /// The table's name as given.
    pub fn table_name(&self) -> String {
        self.table.to_string()
    }

    /// The pool it reads through.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn translator(&self) -> Translator<'_> {
        Translator {
            schema: &self.schema,
            kinds: &self.kinds,
        }
    }

    /// The statement a scan sends.
    fn scan_sql(
        &self,
        projection: &[usize],
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<(String, ScanMode)> {
        let translator = self.translator();
        let mut conditions = Vec::with_capacity(filters.len());
        for f in filters {
            // DataFusion passes only filters we called Exact; dropping one would be wrong rows.
            let sql = translator.predicate(f).ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "filter {f} was not accepted for pushdown into {}",
                    self.table
                ))
            })?;
            conditions.push(sql);
        }
        let from = self.table.sql();
        let where_clause = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let limit_clause = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
        if projection.is_empty() {
            // No columns wanted (`count(*)`): let the server count.
            let sql = if limit.is_some() {
                format!(
                    "SELECT count(*) FROM (SELECT FROM {from}{where_clause}{limit_clause}) AS s"
                )
            } else {
                format!("SELECT count(*) FROM {from}{where_clause}")
            };
            return Ok((sql, ScanMode::Count));
        }
        let columns = projection
            .iter()
            .map(|&i| {
                let field = self.schema.field(i);
                format!("{}::{}", quote_ident(field.name()), self.kinds[i].pg.name())
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok((
            format!("SELECT {columns} FROM {from}{where_clause}{limit_clause}"),
            ScanMode::Rows,
        ))
    }
}

#[async_trait]
impl TableProvider for PostgresTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        let translator = self.translator();
        Ok(filters
            .iter()
            .map(|f| match translator.predicate(f) {
                Some(_) => TableProviderFilterPushDown::Exact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&projection)?);
        let (sql, mode) = self.scan_sql(&projection, filters, limit)?;
        let kinds = projection.iter().map(|&i| self.kinds[i].clone()).collect();
        Ok(Arc::new(PostgresScanExec::new(ScanSpec {
            pool: self.pool.clone(),
            table: self.table.to_string(),
            sql,
            mode,
            schema,
            kinds,
        })))
    }
}

// ---------------------------------------------------------------------------------- scan

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanMode {
    /// The statement returns the projected columns.
    Rows,
    /// The statement returns one `count(*)`; the scan yields that many column-less rows.
    Count,
}

#[derive(Debug)]
struct ScanSpec {
    pool: PgPool,
    table: String,
    sql: String,
    mode: ScanMode,
    schema: SchemaRef,
    kinds: Vec<ColumnKind>,
}

/// The physical scan of a [`PostgresTable`]: one partition that runs its SQL when executed
/// and streams batches of [`BATCH_ROWS`] rows as rows arrive. `EXPLAIN` shows the SQL.
#[derive(Debug)]
pub struct PostgresScanExec {
    spec: Arc<ScanSpec>,
    properties: Arc<PlanProperties>,
}

impl PostgresScanExec {
    fn new(spec: ScanSpec) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&spec.schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            spec: Arc::new(spec),
            properties: Arc::new(properties),
        }
    }

    /// The statement the scan sends.
    pub fn sql(&self) -> &str {
        &self.spec.sql
    }
}

impl DisplayAs for PostgresScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => write!(
                f,
                "PostgresScanExec: table={}, sql={}",
                self.spec.table, self.spec.sql
            ),
            DisplayFormatType::TreeRender => write!(f, "sql={}", self.spec.sql),
        }
    }
}

impl ExecutionPlan for PostgresScanExec {
    fn name(&self) -> &str {
        "PostgresScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "PostgresScanExec has no children".to_owned(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "PostgresScanExec has one partition, asked for {partition}"
            )));
        }
        let stream = scan_stream(Arc::clone(&self.spec)).map_err(DataFusionError::from);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.spec.schema),
            stream,
        )))
    }
}

/// Where a scan's stream is.
enum ScanState {
    Start(Arc<ScanSpec>),
    Rows(Box<RowScan>),
    Count {
        spec: Arc<ScanSpec>,
        remaining: usize,
    },
    Done,
}

/// Runs the scan lazily on first poll; one batch per step.
fn scan_stream(spec: Arc<ScanSpec>) -> impl Stream<Item = Result<RecordBatch, PgTableError>> {
    futures::stream::try_unfold(ScanState::Start(spec), |state| async move {
        match state {
            ScanState::Start(spec) => start(spec).await,
            ScanState::Rows(scan) => scan.next_batch().await,
            ScanState::Count { spec, remaining } => Ok(count_batch(spec, remaining)?),
            ScanState::Done => Ok(None),
        }
    })
}

type Step = Option<(RecordBatch, ScanState)>;

async fn start(spec: Arc<ScanSpec>) -> Result<Step, PgTableError> {
    let started = Instant::now();
    let mut conn = spec.pool.get().await?;
    let client = conn.client().ok_or(PgTableError::PoolClosed)?;
    match spec.mode {
        ScanMode::Count => {
            let row = client
                .query_one(spec.sql.as_str(), &[])
                .await
                .map_err(|e| PgTableError::query(&spec.table, e))?;
            let count: i64 = row
                .try_get(0)
                .map_err(|e| PgTableError::query(&spec.table, e))?;
            conn.reusable = true;
            drop(conn);
            let rows = usize::try_from(count).unwrap_or(0);
            log_scan(&spec.table, rows, started);
            count_batch(spec, rows)
        }
        ScanMode::Rows => {
            let rows = client
                .query_raw(spec.sql.as_str(), std::iter::empty::<&(dyn ToSql + Sync)>())
                .await
                .map_err(|e| PgTableError::query(&spec.table, e))?;
            let builders = BatchBuilder::new(&spec.kinds);
            let scan = RowScan {
                spec,
                conn,
                rows: Box::pin(rows),
                builders,
                started,
                total: 0,
                finished: false,
            };
            Box::new(scan).next_batch().await
        }
    }
}

fn log_scan(table: &str, rows: usize, started: Instant) {
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::debug!(table, rows, duration_ms, "postgres scan finished");
}

/// Up to [`BATCH_ROWS`] column-less rows of a counted scan.
fn count_batch(spec: Arc<ScanSpec>, remaining: usize) -> Result<Step, PgTableError> {
    if remaining == 0 {
        return Ok(None);
    }
    let n = remaining.min(BATCH_ROWS);
    let batch = RecordBatch::try_new_with_options(
        Arc::clone(&spec.schema),
        Vec::new(),
        &RecordBatchOptions::new().with_row_count(Some(n)),
    )
    .map_err(|source| PgTableError::Arrow {
        table: spec.table.clone(),
        source,
    })?;
    Ok(Some((
        batch,
        ScanState::Count {
            spec,
            remaining: remaining - n,
        },
    )))
}

/// A running row query and the batch being filled.
struct RowScan {
    spec: Arc<ScanSpec>,
    conn: PooledClient,
    rows: Pin<Box<RowStream>>,
    builders: BatchBuilder,
    started: Instant,
    total: usize,
    finished: bool,
}

impl RowScan {
    async fn next_batch(mut self: Box<Self>) -> Result<Step, PgTableError> {
        while let Some(row) = self.rows.next().await {
            let row = row.map_err(|e| PgTableError::query(&self.spec.table, e))?;
            self.builders.push(&row, &self.spec)?;
            self.total += 1;
            if self.builders.len == BATCH_ROWS {
                let batch = self.builders.finish(&self.spec)?;
                return Ok(Some((batch, ScanState::Rows(self))));
            }
        }
        self.finished = true;
        self.conn.reusable = true;
        log_scan(&self.spec.table, self.total, self.started);
        if self.builders.len == 0 {
            return Ok(None);
        }
        let batch = self.builders.finish(&self.spec)?;
        Ok(Some((batch, ScanState::Done)))
    }
}

impl Drop for RowScan {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Abandoned mid-query (LIMIT satisfied above us, query cancelled, error): stop the
        // server's work. The connection is closed, not pooled, so this cannot cancel anyone else.
        tracing::debug!(
            table = %self.spec.table,
            rows = self.total,
            "postgres scan abandoned; cancelling"
        );
        let (Some(client), Ok(runtime)) =
            (self.conn.client(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let token = client.cancel_token();
        let table = self.spec.table.clone();
        runtime.spawn(async move {
            if let Err(e) = token.cancel_query(NoTls).await {
                tracing::debug!(table, error = %e, "postgres cancel request failed");
            }
        });
    }
}

/// A `timestamp`/`timestamptz` in microseconds since the Unix epoch.
struct PgMicros(i64);

impl<'a> FromSql<'a> for PgMicros {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw = i64::from_be_bytes(raw.try_into()?);
        if raw == i64::MAX || raw == i64::MIN {
            return Err("infinite timestamp has no Arrow value".into());
        }
        raw.checked_add(PG_EPOCH_MICROS)
            .map(PgMicros)
            .ok_or_else(|| "timestamp out of range".into())
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMP | Type::TIMESTAMPTZ)
    }
}

/// A `date` in days since the Unix epoch.
struct PgDays(i32);

impl<'a> FromSql<'a> for PgDays {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw = i32::from_be_bytes(raw.try_into()?);
        if raw == i32::MAX || raw == i32::MIN {
            return Err("infinite date has no Arrow value".into());
        }
        raw.checked_add(PG_EPOCH_DAYS)
            .map(PgDays)
            .ok_or_else(|| "date out of range".into())
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::DATE
    }
}

/// One Arrow builder per projected column.
enum ColumnBuilder {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Utf8(StringBuilder),
    LargeUtf8(LargeStringBuilder),
    Utf8View(StringViewBuilder),
    Binary(BinaryBuilder),
    LargeBinary(LargeBinaryBuilder),
    BinaryView(BinaryViewBuilder),
    /// Days since the epoch, relabelled `Date32` when finished.
    Date(Int32Builder),
    /// Values in the field's unit, relabelled with the field's type when finished.
    Timestamp(TimeUnit, Int64Builder),
}

impl ColumnBuilder {
    fn new(data_type: &DataType) -> Self {
        let n = BATCH_ROWS;
        match data_type {
            DataType::Boolean => Self::Bool(BooleanBuilder::with_capacity(n)),
            DataType::Int16 => Self::I16(Int16Builder::with_capacity(n)),
            DataType::Int32 => Self::I32(Int32Builder::with_capacity(n)),
            DataType::Float32 => Self::F32(Float32Builder::with_capacity(n)),
            DataType::Float64 => Self::F64(Float64Builder::with_capacity(n)),
            DataType::Utf8 => Self::Utf8(StringBuilder::new()),
            DataType::LargeUtf8 => Self::LargeUtf8(LargeStringBuilder::new()),
            DataType::Utf8View => Self::Utf8View(StringViewBuilder::new()),
            DataType::Binary => Self::Binary(BinaryBuilder::new()),
            DataType::LargeBinary => Self::LargeBinary(LargeBinaryBuilder::new()),
            DataType::BinaryView => Self::BinaryView(BinaryViewBuilder::new()),
            DataType::Date32 => Self::Date(Int32Builder::with_capacity(n)),
            DataType::Timestamp(unit, _) => Self::Timestamp(*unit, Int64Builder::with_capacity(n)),
            // Int64, and (never reached) whatever `ColumnKind::of` did not admit.
            _ => Self::I64(Int64Builder::with_capacity(n)),
        }
    }

    /// Appends column `idx` of `row`; the error says what is wrong with the value.
    fn push(&mut self, row: &tokio_postgres::Row, idx: usize) -> Result<(), String> {
        match self {
            Self::Bool(b) => b.append_option(get::<bool>(row, idx)?),
            Self::I16(b) => b.append_option(get::<i16>(row, idx)?),
            Self::I32(b) => b.append_option(get::<i32>(row, idx)?),
            Self::I64(b) => b.append_option(get::<i64>(row, idx)?),
            Self::F32(b) => b.append_option(get::<f32>(row, idx)?),
            Self::F64(b) => b.append_option(get::<f64>(row, idx)?),
            Self::Utf8(b) => b.append_option(get::<&str>(row, idx)?),
            Self::LargeUtf8(b) => b.append_option(get::<&str>(row, idx)?),
            Self::Utf8View(b) => b.append_option(get::<&str>(row, idx)?),
            Self::Binary(b) => b.append_option(get::<&[u8]>(row, idx)?),
            Self::LargeBinary(b) => b.append_option(get::<&[u8]>(row, idx)?),
            Self::BinaryView(b) => b.append_option(get::<&[u8]>(row, idx)?),
            Self::Date(b) => b.append_option(get::<PgDays>(row, idx)?.map(|d| d.0)),
            Self::Timestamp(unit, b) => {
                let v = match get::<PgMicros>(row, idx)? {
                    None => None,
                    Some(PgMicros(m)) => Some(match unit {
                        TimeUnit::Second => m.div_euclid(1_000_000),
                        TimeUnit::Millisecond => m.div_euclid(1_000),
                        TimeUnit::Microsecond => m,
                        TimeUnit::Nanosecond => m.checked_mul(1_000).ok_or_else(|| {
                            "timestamp outside the nanosecond range (1677 to 2262)".to_owned()
                        })?,
                    }),
                };
                b.append_option(v);
            }
        }
        Ok(())
    }

    fn finish(&mut self, data_type: &DataType) -> Result<ArrayRef, ArrowError> {
        Ok(match self {
            Self::Bool(b) => Arc::new(b.finish()),
            Self::I16(b) => Arc::new(b.finish()),
            Self::I32(b) => Arc::new(b.finish()),
            Self::I64(b) => Arc::new(b.finish()),
            Self::F32(b) => Arc::new(b.finish()),
            Self::F64(b) => Arc::new(b.finish()),
            Self::Utf8(b) => Arc::new(b.finish()),
            Self::LargeUtf8(b) => Arc::new(b.finish()),
            Self::Utf8View(b) => Arc::new(b.finish()),
            Self::Binary(b) => Arc::new(b.finish()),
            Self::LargeBinary(b) => Arc::new(b.finish()),
            Self::BinaryView(b) => Arc::new(b.finish()),
            // Same layout as the target type: only the label changes.
            Self::Date(b) => relabel(b.finish().into(), data_type)?,
            Self::Timestamp(_, b) => relabel(b.finish().into(), data_type)?,
        })
    }
}

/// Column `idx` of `row`, NULL as `None`.
fn get<'a, T: FromSql<'a>>(row: &'a tokio_postgres::Row, idx: usize) -> Result<Option<T>, String> {
    row.try_get::<_, Option<T>>(idx).map_err(|e| pg_message(&e))
}

fn relabel(
    data: datafusion::arrow::array::ArrayData,
    data_type: &DataType,
) -> Result<ArrayRef, ArrowError> {
    Ok(make_array(
        data.into_builder().data_type(data_type.clone()).build()?,
    ))
}

/// The batch being filled from rows.
struct BatchBuilder {
    columns: Vec<ColumnBuilder>,
    len: usize,
}

impl BatchBuilder {
    fn new(kinds: &[ColumnKind]) -> Self {
        Self {
            columns: kinds
                .iter()
                .map(|k| ColumnBuilder::new(&k.data_type))
                .collect(),
            len: 0,
        }
    }

    fn push(&mut self, row: &tokio_postgres::Row, spec: &ScanSpec) -> Result<(), PgTableError> {
        for (idx, column) in self.columns.iter_mut().enumerate() {
            column
                .push(row, idx)
                .map_err(|message| PgTableError::Decode {
                    table: spec.table.clone(),
                    column: spec.schema.field(idx).name().clone(),
                    message,
                })?;
        }
        self.len += 1;
        Ok(())
    }

    fn finish(&mut self, spec: &ScanSpec) -> Result<RecordBatch, PgTableError> {
        let arrow = |source| PgTableError::Arrow {
            table: spec.table.clone(),
            source,
        };
        let arrays = self
            .columns
            .iter_mut()
            .zip(spec.schema.fields())
            .map(|(c, f)| c.finish(f.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow)?;
        self.len = 0;
        RecordBatch::try_new(Arc::clone(&spec.schema), arrays).map_err(arrow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::{
        Array, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array, Int16Array,
        Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };
    use datafusion::arrow::compute::concat_batches;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    // ----------------------------------------------------------- translation, no server

    fn translator_schema() -> (Schema, Vec<ColumnKind>) {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new(
                "at_ms",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
        ]);
        let kinds = schema
            .fields()
            .iter()
            .map(|f| ColumnKind::of(f.data_type()).unwrap())
            .collect();
        (schema, kinds)
    }

    fn translate(e: &Expr) -> Option<String> {
        let (schema, kinds) = translator_schema();
        Translator {
            schema: &schema,
            kinds: &kinds,
        }
        .predicate(e)
    }

    #[test]
    fn quotes_strings_and_identifiers() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_str("O'Brien").unwrap(), "E'O''Brien'");
        assert_eq!(quote_str("a\\'b").unwrap(), "E'a\\\\''b'");
        assert_eq!(quote_str("nul\0"), None);
        assert_eq!(
            TableName::parse("public.t\"x").sql(),
            "\"public\".\"t\"\"x\""
        );
    }

    #[test]
    fn translates_comparisons_and_logic() {
        let e = col("id").gt(lit(5i64)).and(col("name").eq(lit("O'Brien")));
        assert_eq!(
            translate(&e).unwrap(),
            "(((\"id\"::int8) > '5'::int8) AND ((\"name\"::text) = E'O''Brien'))"
        );
        let e = col("name").lt(lit("b"));
        assert_eq!(
            translate(&e).unwrap(),
            "((\"name\"::text) COLLATE \"C\" < E'b')"
        );
        let e = col("id").in_list(vec![lit(1i64), lit(2i64)], true);
        assert_eq!(
            translate(&e).unwrap(),
            "((\"id\"::int8) NOT IN ('1'::int8, '2'::int8))"
        );
        let e = col("name")
            .is_null()
            .or(Expr::Not(Box::new(col("id").between(lit(1i64), lit(3i64)))));
        assert!(translate(&e).is_some());
    }

    #[test]
    fn refuses_what_postgres_would_answer_differently() {
        // Float zero: Arrow orders -0.0 before 0.0, PostgreSQL calls them equal.
        assert_eq!(translate(&col("score").gt_eq(lit(0.0f64))), None);
        assert_eq!(translate(&col("score").eq(lit(f64::NAN))), None);
        assert!(translate(&col("score").gt_eq(lit(0.5f64))).is_some());
        // Mixed types (DataFusion would have cast one side).
        assert_eq!(translate(&col("id").eq(lit(5i32))), None);
        // Coarser timestamps than PostgreSQL's.
        assert_eq!(
            translate(&col("at_ms").is_null()),
            None,
            "non-microsecond timestamp columns stay in DataFusion"
        );
        // ILIKE and trailing escapes.
        assert_eq!(translate(&col("name").ilike(lit("a%"))), None);
        assert_eq!(translate(&col("name").like(lit("a\\"))), None);
        assert!(translate(&col("name").like(lit("a\\%%"))).is_some());
        // Functions.
        assert_eq!(
            translate(&datafusion::functions::expr_fn::upper(col("name")).eq(lit("X"))),
            None
        );
    }

    #[test]
    fn formats_timestamp_literals_in_utc() {
        // 2024-03-01T12:34:56.789012Z
        let micros = 1_709_296_496_789_012;
        let v = literal(&ScalarValue::TimestampMicrosecond(
            Some(micros),
            Some("Europe/Berlin".into()),
        ))
        .unwrap();
        assert_eq!(v.sql, "'2024-03-01 12:34:56.789012+00'::timestamptz");
        let v = literal(&ScalarValue::TimestampNanosecond(
            Some(micros * 1000 + 1),
            None,
        ));
        assert!(v.is_none(), "sub-microsecond literals are not exact");
        let v = literal(&ScalarValue::Date32(Some(19_783))).unwrap();
        assert_eq!(v.sql, "'2024-03-01'::date");
    }

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

    // ----------------------------------------------------------- against the dev stack

    /// The dev stack's URL, or `None` (with the reason on stderr) when it is not exported.
    fn stack_url() -> Option<String> {
        match std::env::var("PRIMESPARK_POSTGRES__URL") {
            Ok(url) => Some(url),
            Err(_) => {
                eprintln!(
                    "skipping: PRIMESPARK_POSTGRES__URL not set \
                     (run `eval \"$(deploy/dev/stack.sh env)\"`)"
                );
                None
            }
        }
    }

    /// A uniquely named table with one column of each supported type and five rows.
    struct Fixture {
        url: String,
        client: Client,
        table: String,
        dropped: bool,
    }

    impl Fixture {
        async fn new() -> Option<Self> {
            let url = stack_url()?;
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(connection);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let table = format!("pgtab_{}_{nanos}", std::process::id());
            client
                .batch_execute(&format!(
                    r#"
                    CREATE TABLE {table} (
                        id       int8 PRIMARY KEY,
                        small    int2,
                        medium   int4,
                        name     text,
                        label    varchar(20),
                        score    float8,
                        ratio    float4,
                        amount   numeric(10, 2),
                        flag     bool,
                        created  timestamptz,
                        local_ts timestamp,
                        day      date,
                        doc      jsonb,
                        payload  bytea
                    );
                    INSERT INTO {table} VALUES
                      (1, 10, 100, 'alice',   'a', 1.5,  0.25, 10.50, true,
                       '2024-03-01 12:34:56.789012+00', '2024-03-01 12:34:56.789012',
                       '2024-03-01', '{{"k": 1}}', '\x0001ff'),
                      (2, 20, 200, 'bob',     'b', 2.5,  0.5,  20.25, false,
                       '2024-03-02 00:00:00+02', '2024-03-02 00:00:00',
                       '2024-03-02', '{{"k": 2}}', '\x02'),
                      (3, 30, 300, 'O''Brien', 'c', -3.5, 0.75, 30.00, true,
                       '2024-03-03 23:59:59.999999+00', '2024-03-03 23:59:59.999999',
                       '2024-03-03', '[]', '\x'),
                      (4, NULL, NULL, 'dan',  NULL, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL, NULL),
                      (5, 50, 500, 'evelyn',  'e', 5.5,  1.0,  50.75, true,
                       '1999-12-31 23:00:00-01', '1969-07-20 20:17:40',
                       '1969-07-20', '"s"', 'hello'::bytea);
                    "#
                ))
                .await
                .unwrap();
            Some(Self {
                url,
                client,
                table,
                dropped: false,
            })
        }

        async fn context(&self) -> SessionContext {
            let provider = PostgresTable::discover(&self.url, &self.table)
                .await
                .unwrap();
            let ctx = SessionContext::new();
            ctx.register_table("t", Arc::new(provider)).unwrap();
            ctx
        }

        async fn drop_table(mut self) {
            self.client
                .batch_execute(&format!("DROP TABLE {}", self.table))
                .await
                .unwrap();
            self.dropped = true;
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            if self.dropped {
                return;
            }
            // A test failed before dropping its table: clean up on a thread with a runtime of
            // its own (we may be inside the test's runtime, which cannot block on itself).
            let (url, table) = (self.url.clone(), self.table.clone());
            let cleanup = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await {
                        tokio::spawn(connection);
                        let sql = format!("DROP TABLE IF EXISTS {table}");
                        let _ = client.batch_execute(&sql).await;
                    }
                });
            });
            let _ = cleanup.join();
        }
    }

    async fn query(ctx: &SessionContext, sql: &str) -> RecordBatch {
        let df = ctx.sql(sql).await.unwrap();
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await.unwrap();
        concat_batches(&schema, &batches).unwrap()
    }

    /// The physical plan's text (`EXPLAIN`).
    async fn explain(ctx: &SessionContext, sql: &str) -> String {
        let batch = query(ctx, &format!("EXPLAIN {sql}")).await;
        pretty_format_batches(&[batch]).unwrap().to_string()
    }

    /// The SQL the scan sends, taken from `EXPLAIN`.
    async fn pushed_sql(ctx: &SessionContext, sql: &str) -> String {
        let plan = explain(ctx, sql).await;
        let start = plan
            .find("sql=")
            .unwrap_or_else(|| panic!("no PostgresScanExec in plan:\n{plan}"));
        plan[start + 4..]
            .lines()
            .next()
            .unwrap()
            .trim_end_matches([' ', '|'])
            .to_owned()
    }

    fn ids(batch: &RecordBatch) -> Vec<i64> {
        let a = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        a.iter().map(|v| v.unwrap()).collect()
    }

    #[tokio::test]
    async fn postgres_table_pushes_filters_and_projection() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        let ctx = fx.context().await;
        let sql = "SELECT id, name FROM t \
                   WHERE score > 1.2 AND flag = true AND name IN ('alice', 'evelyn', 'zed') \
                   ORDER BY id";
        let batch = query(&ctx, sql).await;
        assert_eq!(ids(&batch), vec![1, 5]);
        let pushed = pushed_sql(&ctx, sql).await;
        let (select, rest) = pushed.split_once(" FROM ").unwrap();
        assert_eq!(select, "SELECT \"id\"::int8, \"name\"::text");
        assert!(rest.contains(" WHERE "), "{pushed}");
        assert!(
            rest.contains("\"score\"::float8) > '1.2'::float8"),
            "{pushed}"
        );
        // DataFusion simplifies `flag = true` to `flag`, small IN lists to ORs.
        assert!(rest.contains("(\"flag\"::bool)"), "{pushed}");
        assert!(rest.contains("(\"name\"::text) = E'evelyn'"), "{pushed}");
        assert!(!explain(&ctx, sql).await.contains("FilterExec"));

        // The other translated forms, each checked against the expected rows.
        let cases: &[(&str, &[i64])] = &[
            ("small BETWEEN 15 AND 30", &[2, 3]),
            ("small NOT BETWEEN 15 AND 30", &[1, 5]),
            ("medium <> 200", &[1, 3, 5]),
            ("NOT (medium >= 300)", &[1, 2]),
            ("label IS NULL", &[4]),
            ("label IS NOT NULL AND (id = 1 OR id = 3)", &[1, 3]),
            ("name LIKE '%e%'", &[1, 3, 5]),
            ("name NOT LIKE 'b%'", &[1, 3, 4, 5]),
            ("name < 'c'", &[1, 2, 3]),
            ("ratio <= 0.5", &[1, 2]),
            ("amount > 20.3", &[3, 5]),
            ("flag", &[1, 3, 5]),
            ("NOT flag", &[2]),
            ("id NOT IN (1, 2)", &[3, 4, 5]),
            ("day = DATE '2024-03-02'", &[2]),
            ("day < DATE '2000-01-01'", &[5]),
            ("payload = X'02'", &[2]),
            ("doc = '[]'", &[3]),
            ("local_ts >= TIMESTAMP '2024-03-03 23:59:59.999999'", &[3]),
        ];
        for (filter, expected) in cases {
            let sql = format!("SELECT id FROM t WHERE {filter} ORDER BY id");
            let batch = query(&ctx, &sql).await;
            assert_eq!(&ids(&batch), expected, "{filter}");
            let plan = explain(&ctx, &sql).await;
            assert!(
                !plan.contains("FilterExec"),
                "{filter} was not pushed down:\n{plan}"
            );
        }
        fx.drop_table().await;
    }

    #[tokio::test]
    async fn postgres_table_pushes_limit_only_when_exact() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        let ctx = fx.context().await;
        let sql = "SELECT id FROM t WHERE id > 1 LIMIT 2";
        assert_eq!(query(&ctx, sql).await.num_rows(), 2);
        let pushed = pushed_sql(&ctx, sql).await;
        assert!(pushed.ends_with(" LIMIT 2"), "{pushed}");

        // `length` stays in DataFusion, so the LIMIT must too.
        let sql = "SELECT id FROM t WHERE length(name) > 3 AND id > 1 LIMIT 1";
        let pushed = pushed_sql(&ctx, sql).await;
        assert!(!pushed.contains("LIMIT"), "{pushed}");
        assert!(!pushed.contains("length"), "{pushed}");
        let batch = query(&ctx, sql).await;
        assert_eq!(batch.num_rows(), 1);
        assert!([3, 5].contains(&ids(&batch)[0]));
        fx.drop_table().await;
    }

    #[tokio::test]
    async fn postgres_table_leaves_untranslatable_filters_to_datafusion() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        let ctx = fx.context().await;
        let sql = "SELECT id FROM t WHERE length(name) > 3 AND id > 1 ORDER BY id";
        assert_eq!(ids(&query(&ctx, sql).await), vec![3, 5]);
        let plan = explain(&ctx, sql).await;
        assert!(plan.contains("FilterExec"), "{plan}");
        let pushed = pushed_sql(&ctx, sql).await;
        assert!(pushed.contains("\"id\"::int8) > '1'::int8"), "{pushed}");
        // The projection includes `name`, needed by the filter above the scan.
        assert!(
            pushed.starts_with("SELECT \"id\"::int8, \"name\"::text FROM"),
            "{pushed}"
        );

        // Float zero stays in DataFusion (signed zeros); the answer is still right.
        let sql = "SELECT id FROM t WHERE score >= 0.0 ORDER BY id";
        assert_eq!(ids(&query(&ctx, sql).await), vec![1, 2, 5]);
        assert!(explain(&ctx, sql).await.contains("FilterExec"));

        // ILIKE too.
        let sql = "SELECT id FROM t WHERE name ILIKE 'o''b%' ORDER BY id";
        assert_eq!(ids(&query(&ctx, sql).await), vec![3]);
        fx.drop_table().await;
    }

    #[tokio::test]
    async fn postgres_table_escapes_string_literals() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        let ctx = fx.context().await;
        let batch = query(&ctx, "SELECT id, name FROM t WHERE name = 'O''Brien'").await;
        assert_eq!(ids(&batch), vec![3]);
        let names = batch
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(names.value(0), "O'Brien");
        for attempt in [
            "x' OR '1'='1",
            "x\\' OR 1=1 --",
            "'; DROP TABLE t; --",
            "\\",
        ] {
            let literal = attempt.replace('\'', "''");
            let sql = format!("SELECT id FROM t WHERE name = '{literal}'");
            assert_eq!(query(&ctx, &sql).await.num_rows(), 0, "{attempt}");
            assert!(!explain(&ctx, &sql).await.contains("FilterExec"));
        }
        // The table survived.
        assert_eq!(query(&ctx, "SELECT id FROM t").await.num_rows(), 5);
        fx.drop_table().await;
    }

    #[tokio::test]
    async fn postgres_table_round_trips_values_and_time_zones() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        let ctx = fx.context().await;
        let batch = query(
            &ctx,
            "SELECT id, small, medium, name, label, score, ratio, amount, flag, created, \
             local_ts, day, doc, payload FROM t ORDER BY id",
        )
        .await;
        assert_eq!(batch.num_rows(), 5);
        let c = |i: usize| batch.column(i).as_any();
        let small = c(1).downcast_ref::<Int16Array>().unwrap();
        assert_eq!((small.value(0), small.is_null(3)), (10, true));
        let medium = c(2).downcast_ref::<Int32Array>().unwrap();
        assert_eq!(medium.value(4), 500);
        let label = c(4).downcast_ref::<StringArray>().unwrap();
        assert_eq!(label.value(0), "a");
        let score = c(5).downcast_ref::<Float64Array>().unwrap();
        assert_eq!(score.value(2), -3.5);
        let ratio = c(6).downcast_ref::<Float32Array>().unwrap();
        assert_eq!(ratio.value(0), 0.25);
        let amount = c(7).downcast_ref::<Float64Array>().unwrap();
        assert_eq!(amount.value(1), 20.25);
        let flag = c(8).downcast_ref::<BooleanArray>().unwrap();
        assert!(flag.value(0) && !flag.value(1) && flag.is_null(3));

        assert_eq!(
            batch.schema().field(9).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        let created = c(9).downcast_ref::<TimestampMicrosecondArray>().unwrap();
        assert_eq!(created.value(0), 1_709_296_496_789_012); // 2024-03-01T12:34:56.789012Z
        assert_eq!(created.value(1), 1_709_330_400_000_000); // 2024-03-01T22:00:00Z
        assert_eq!(created.value(4), 946_684_800_000_000); // 2000-01-01T00:00:00Z
        assert_eq!(
            batch.schema().field(10).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, None)
        );
        let local = c(10).downcast_ref::<TimestampMicrosecondArray>().unwrap();
        assert_eq!(local.value(0), 1_709_296_496_789_012);
        assert_eq!(local.value(4), -14_182_940_000_000); // before 1970
        let day = c(11).downcast_ref::<Date32Array>().unwrap();
        assert_eq!((day.value(0), day.value(4)), (19_783, -165));
        let doc = c(12).downcast_ref::<StringArray>().unwrap();
        assert_eq!((doc.value(0), doc.value(4)), ("{\"k\": 1}", "\"s\""));
        let payload = c(13).downcast_ref::<BinaryArray>().unwrap();
        assert_eq!(payload.value(0), &[0x00, 0x01, 0xff]);
        assert_eq!(payload.value(2), b"");
        assert!(payload.is_null(3));

        // Time-zone-aware filters: the same instants written in other zones reach PostgreSQL
        // in UTC.
        for (filter, literal) in [
            (
                "created = TIMESTAMPTZ '2024-03-02T00:00:00+02:00'",
                "= '2024-03-01 22:00:00.000000+00'::timestamptz",
            ),
            (
                "created = '2024-03-01T22:00:00Z'",
                "= '2024-03-01 22:00:00.000000+00'::timestamptz",
            ),
            (
                "created > '2024-03-01T14:00:00+01:00' AND created < '2024-03-02T00:00:00Z'",
                "> '2024-03-01 13:00:00.000000+00'::timestamptz",
            ),
        ] {
            let sql = format!("SELECT id FROM t WHERE {filter}");
            assert_eq!(ids(&query(&ctx, &sql).await), vec![2], "{filter}");
            let pushed = pushed_sql(&ctx, &sql).await;
            assert!(pushed.contains(literal), "{pushed}");
            assert!(
                !explain(&ctx, &sql).await.contains("FilterExec"),
                "{filter}"
            );
        }

        // A table built from a given schema, with other string and time encodings.
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8View, true),
            Field::new(
                "created",
                DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
                true,
            ),
            Field::new("payload", DataType::LargeBinary, true),
        ]));
        let pool = PgPool::new(&fx.url, 2).unwrap();
        let provider = PostgresTable::new(pool, &fx.table, schema).unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("t2", Arc::new(provider)).unwrap();
        let batch = query(
            &ctx,
            "SELECT id, name, created FROM t2 WHERE name = 'bob' OR created IS NULL ORDER BY id",
        )
        .await;
        assert_eq!(ids(&batch), vec![2, 4]);
        let created = batch
            .column(2)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()
            .unwrap();
        assert_eq!(created.value(0), 1_709_330_400_000);
        fx.drop_table().await;
    }

    #[tokio::test]
    async fn postgres_table_discovers_the_schema() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        let provider = PostgresTable::discover(&fx.url, &fx.table).await.unwrap();
        let utc = Some("UTC".into());
        let expected = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("small", DataType::Int16, true),
            Field::new("medium", DataType::Int32, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("label", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
            Field::new("ratio", DataType::Float32, true),
            Field::new("amount", DataType::Float64, true),
            Field::new("flag", DataType::Boolean, true),
            Field::new(
                "created",
                DataType::Timestamp(TimeUnit::Microsecond, utc),
                true,
            ),
            Field::new(
                "local_ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
            Field::new("day", DataType::Date32, true),
            Field::new("doc", DataType::Utf8, true),
            Field::new("payload", DataType::Binary, true),
        ]);
        assert_eq!(provider.schema().as_ref(), &expected);

        // Schema-qualified, and missing.
        let qualified = PostgresTable::discover(&fx.url, &format!("public.{}", fx.table))
            .await
            .unwrap();
        assert_eq!(qualified.schema().as_ref(), &expected);
        let missing = PostgresTable::discover(&fx.url, "pgtab_does_not_exist").await;
        assert!(matches!(missing, Err(PgTableError::TableNotFound { .. })));
        fx.drop_table().await;
    }

    #[tokio::test]
    async fn postgres_table_answers_aggregates() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        let ctx = fx.context().await;
        let batch = query(
            &ctx,
            "SELECT count(*) AS n, count(score) AS scored, avg(score) AS mean, sum(medium) AS s \
             FROM t",
        )
        .await;
        let n = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let scored = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let mean = batch
            .column(2)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        let sum = batch
            .column(3)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!((n.value(0), scored.value(0)), (5, 4));
        assert!((mean.value(0) - 1.5).abs() < 1e-12);
        assert_eq!(sum.value(0), 1100);

        let sql = "SELECT count(*) FROM t WHERE flag";
        let batch = query(&ctx, sql).await;
        let n = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(n.value(0), 3);
        let pushed = pushed_sql(&ctx, sql).await;
        assert!(pushed.starts_with("SELECT count(*) FROM"), "{pushed}");

        let sql = "SELECT flag, count(*) AS n FROM t GROUP BY flag ORDER BY flag NULLS LAST";
        let batch = query(&ctx, sql).await;
        let n = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(
            n.iter().map(|v| v.unwrap()).collect::<Vec<_>>(),
            vec![1, 3, 1]
        );
        fx.drop_table().await;
    }

    #[tokio::test]
    async fn postgres_table_streams_many_rows_in_batches() {
        let Some(fx) = Fixture::new().await else {
            return;
        };
        fx.client
            .batch_execute(&format!(
                "INSERT INTO {} (id, name) SELECT g, 'n' || g FROM generate_series(100, 20099) g",
                fx.table
            ))
            .await
            .unwrap();
        let ctx = fx.context().await;
        let df = ctx
            .sql("SELECT id, name FROM t WHERE id >= 100")
            .await
            .unwrap();
        let batches = df.collect().await.unwrap();
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 20_000);
        assert!(batches.iter().all(|b| b.num_rows() <= BATCH_ROWS));
        let batch = query(&ctx, "SELECT count(*) FROM t").await;
        let n = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(n.value(0), 20_005);
        // A LIMIT above an unpushed filter abandons the scan early; the pool must recover.
        let batch = query(&ctx, "SELECT id FROM t WHERE length(name) > 2 LIMIT 3").await;
        assert_eq!(batch.num_rows(), 3);
        assert_eq!(
            query(&ctx, "SELECT id FROM t WHERE id < 3")
                .await
                .num_rows(),
            2
        );
        fx.drop_table().await;
    }
}
