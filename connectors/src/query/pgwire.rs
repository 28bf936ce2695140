//! The PostgreSQL wire-protocol endpoint of the query service: psql, Grafana's PostgreSQL data
//! source (pgx) and tokio-postgres connect here and run the service's DataFusion SQL.
//!
//! This module speaks the protocol and nothing else. What a user may do, limits and audit live
//! in the query service, which plugs in through [`SqlBackend`]. [`serve`] accepts connections and
//! runs each on its own tokio task, so a broken or slow client affects nobody else.
//!
//! - **Authentication**: a cleartext password message, checked by [`SqlBackend::authenticate`]
//!   on tokio's blocking pool (password hashes are slow on purpose). A refusal is `FATAL 28P01`
//!   and closes the connection. SCRAM is not offered: it needs the password or a SCRAM verifier
//!   on the server, and the backend keeps its own hashes. Pass a TLS acceptor to [`serve`]
//!   ([`tls_acceptor`] builds one from PEM files) so passwords never cross the network in clear;
//!   clients that ask for TLS when none is configured are told no and go on in plain text, like
//!   PostgreSQL without `ssl = on`.
//! - **Simple query** (psql, pgx's `Ping`): the string may hold several statements; they run in
//!   order and the first error skips the rest, as in PostgreSQL.
//! - **Extended query** (tokio-postgres, pgx, JDBC): Parse plans the statement with
//!   [`SqlBackend::describe`], which gives the result columns (for Describe) and the parameter
//!   types (for ParameterDescription). A parameter's type is the one the client declares, else
//!   an explicit cast's (`$1::bigint`, `CAST($1 AS date)`), else the planner's, else text.
//!   Execute substitutes the bound parameters into the SQL text as literals DataFusion reads back
//!   to the same typed value (strings quoted, numbers validated, never spliced raw) and runs it
//!   with [`SqlBackend::execute`]; the rows
//!   are encoded with the described column types in the text or binary format each client asks
//!   for. Portals with a row limit are suspended and resumed by pgwire.
//! - **Answered here, never sent to the backend**, so a session setup can never be refused:
//!   `SET`, `RESET`, `DISCARD`, `DEALLOCATE`, `SAVEPOINT`, `RELEASE` (accepted and ignored: the
//!   backend's session is shared, so per-connection settings could not be honoured anyway);
//!   `BEGIN`/`COMMIT`/`ROLLBACK` (the service is read-only, so a transaction is bookkeeping);
//!   `SHOW` of a connection setting (`server_version`, `TimeZone`, ...), `SELECT version()`,
//!   `SELECT current_setting('...')`; and `current_setting('...')` inside any other statement
//!   is replaced by the setting's value before the statement reaches the backend. Empty and
//!   comment-only statements (`;`, `-- ping`) answer EmptyQueryResponse. Any other `SHOW` goes to
//!   the backend (DataFusion knows `SHOW ALL` and its own options).
//! - **Cancel requests** stop the running statement with `57014`.
//!
//! Arrow types map to PostgreSQL types as [`pg_type_of`] says; results always use the
//! connection's time zone `Etc/UTC`.

use std::fmt::{self, Debug};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ::pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use ::pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use ::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use ::pgwire::api::portal::{Format, Portal};
use ::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use ::pgwire::api::results::{
    DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag,
};
use ::pgwire::api::stmt::QueryParser;
use ::pgwire::api::store::PortalStore;
use ::pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, PgWireServerHandlers, Type,
    METADATA_APPLICATION_NAME, METADATA_USER,
};
use ::pgwire::error::{
    ErrorInfo, PgWireError as ProtocolError, PgWireResult, SEVERITY_ERROR, SEVERITY_FATAL,
};
use ::pgwire::messages::data::DataRow;
use ::pgwire::messages::PgWireBackendMessage;
use ::pgwire::types::format::FormatOptions as PgFormatOptions;
use ::pgwire::types::ToSqlText;
use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, SchemaRef,
    Time64MicrosecondType, TimeUnit, TimestampMicrosecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions as ArrowFormatOptions};
use datafusion::logical_expr::LogicalPlan;
use futures::Sink;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql};

/// The TLS acceptor [`serve`] takes: tokio-rustls, re-exported with its `rustls`.
pub use ::pgwire::tokio::tokio_rustls;
pub use ::pgwire::tokio::TlsAcceptor;

/// The PostgreSQL version the endpoint reports; clients pick SQL dialect features by it.
pub const SERVER_VERSION: &str = "16.6";
/// [`SERVER_VERSION`] as `server_version_num`.
const SERVER_VERSION_NUM: &str = "160006";
/// PostgreSQL's limit on parameters; also bounds what a `$99999999` can make us allocate.
const MAX_PARAMS: usize = 65_535;
/// The session time zone: timestamps with a time zone are shown in UTC.
const TIME_ZONE: &str = "Etc/UTC";
/// pgwire's text encoding of dates follows this style, so it is what we report.
const DATE_STYLE: &str = "ISO, YMD";

/// What the wire endpoint needs from the query service.
#[async_trait]
pub trait SqlBackend: Send + Sync + 'static {
    /// Checks a user's password; Ok(()) or an error message for the client.
    ///
    /// Called on tokio's blocking pool, so it may hash.
    fn authenticate(&self, user: &str, password: &str) -> Result<(), String>;

    /// Runs one SQL statement for `user`; the result schema and batches, or an error with a
    /// SQLSTATE (e.g. "42501" insufficient_privilege, "57014" query_canceled,
    /// "42601"/"42P01"/"XX000").
    async fn execute(
        &self,
        user: &str,
        sql: &str,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), BackendError>;

    /// Plans one statement without running it: its result columns and the types of its `$n`
    /// parameters, for the extended protocol's Describe.
    ///
    /// The default probes with [`execute`](Self::execute): the parameters replaced by `NULL`, a
    /// query wrapped in `SELECT * FROM (...) LIMIT 0` (when DataFusion refuses the wrapping, as
    /// for a join with two columns of one name, the query runs once in full), and every
    /// parameter reported as text. So each prepared statement costs a second, audited
    /// execution, and clients must send parameters as text or declare their types. A backend
    /// holding a `SessionContext` should instead plan the statement under its own checks and
    /// return [`Description::from_plan`]: that infers parameter types from the columns they
    /// meet, as PostgreSQL does.
    async fn describe(&self, user: &str, sql: &str) -> Result<Description, BackendError> {
        describe_by_probe(self, user, sql).await
    }
}

/// An error from [`SqlBackend`], sent to the client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The five-character SQLSTATE, e.g. "42501".
    pub sqlstate: String,
    /// The message for the client.
    pub message: String,
}

impl BackendError {
    /// An error with this SQLSTATE and message.
    pub fn new(sqlstate: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            sqlstate: sqlstate.into(),
            message: message.into(),
        }
    }
}

/// The shape of a planned statement, from [`SqlBackend::describe`].
#[derive(Debug, Clone)]
pub struct Description {
    /// The result columns; no fields for a statement that returns no rows.
    pub schema: SchemaRef,
    /// The type of each parameter `$1..$n` by position; `None` where the plan leaves it open
    /// (the client then sends it as text).
    pub parameters: Vec<Option<DataType>>,
}

impl Description {
    /// The description of a DataFusion logical plan, placeholders and all.
    ///
    /// Plan the statement with `SessionState::create_logical_plan` (or `statement_to_plan`)
    /// before binding parameters: DataFusion infers a placeholder's type from the column it is
    /// compared with, and leaves it open elsewhere (`SELECT $1`).
    pub fn from_plan(plan: &LogicalPlan) -> Result<Self, BackendError> {
        let types = plan.get_parameter_types().map_err(|e| {
            // The only failure is one placeholder used with two types.
            BackendError::new("42P08", e.to_string())
        })?;
        let mut parameters = Vec::new();
        for (id, data_type) in types {
            // DataFusion also names placeholders `$name`; PostgreSQL clients only send `$n`.
            let Some(n) = id.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) else {
                return Err(BackendError::new(
                    "42P02",
                    format!("parameter {id} is not numbered like $1"),
                ));
            };
            if n == 0 || n > MAX_PARAMS {
                return Err(BackendError::new(
                    "42P02",
                    format!("there is no parameter {id}"),
                ));
            }
            if parameters.len() < n {
                parameters.resize(n, None);
            }
            parameters[n - 1] = data_type;
        }
        Ok(Self {
            schema: Arc::new(plan.schema().as_arrow().clone()),
            parameters,
        })
    }
}

/// Why the endpoint could not serve.
#[derive(Debug, thiserror::Error)]
pub enum PgWireError {
    /// The listening socket could not be bound (address in use, no permission).
    #[error("cannot listen on {addr} for the PostgreSQL wire endpoint")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be read or does not make a TLS configuration.
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

/// A TLS acceptor for [`serve`] from PEM files: the certificate chain (leaf first) and its
/// private key (PKCS#8, PKCS#1 or SEC1), offering the `postgresql` ALPN protocol that
/// PostgreSQL 17 clients send (see [`super::tls::acceptor`]).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, PgWireError> {
    Ok(super::tls::acceptor(cert, key, &[b"postgresql"])?)
}

/// Serves the PostgreSQL wire protocol on `addr` until `shutdown` completes.
///
/// `tls`: when set, clients that ask for TLS (`sslmode=require`, psql's default `prefer`) get
/// it; see [`tls_acceptor`]. On shutdown the endpoint stops
/// accepting and closes open connections, cancelling their running statements: Grafana keeps
/// connections open indefinitely, so waiting for them would never end.
pub async fn serve(
    addr: SocketAddr,
    backend: Arc<dyn SqlBackend>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PgWireError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| PgWireError::Bind { addr, source })?;
    serve_listener(listener, backend, tls, shutdown).await
}

/// [`serve`] on a socket that is already listening (tests bind port 0 and read the port).
pub async fn serve_listener(
    listener: TcpListener,
    backend: Arc<dyn SqlBackend>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PgWireError> {
    let handlers = Arc::new(Handlers::new(backend));
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, tls = tls.is_some(), "postgres wire endpoint listening");
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "wire connection task panicked");
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    tracing::debug!(%peer, "wire connection accepted");
                    let handlers = handlers.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        match ::pgwire::tokio::process_socket(socket, tls, handlers).await {
                            Ok(()) => tracing::debug!(%peer, "wire connection closed"),
                            Err(e) => tracing::debug!(%peer, error = %e, "wire connection ended with an error"),
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like pass; spinning on them would not.
                    tracing::warn!(error = %e, "accepting a wire connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let open = connections.len();
    connections.shutdown().await;
    tracing::info!(addr = ?local, closed_connections = open, "postgres wire endpoint stopped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// pgwire handlers

type Startup = CleartextPasswordAuthStartupHandler<BackendAuth, DefaultServerParameterProvider>;

/// Everything one endpoint shares between its connections.
struct Handlers {
    startup: Arc<Startup>,
    queries: Arc<QueryHandler>,
    cancel: Arc<DefaultCancelHandler>,
}

impl Handlers {
    fn new(backend: Arc<dyn SqlBackend>) -> Self {
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = SERVER_VERSION.to_owned();
        parameters.time_zone = TIME_ZONE.to_owned();
        parameters.date_style = DATE_STYLE.to_owned();
        parameters.is_superuser = false;
        parameters.default_transaction_read_only = true;
        let connections = Arc::new(ConnectionManager::new());
        let auth = BackendAuth {
            backend: backend.clone(),
        };
        Self {
            startup: Arc::new(
                CleartextPasswordAuthStartupHandler::new(auth, parameters)
                    .with_connection_manager(connections.clone()),
            ),
            queries: Arc::new(QueryHandler {
                backend: backend.clone(),
                parser: Arc::new(Parser { backend }),
            }),
            cancel: Arc::new(DefaultCancelHandler::new(connections)),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }
}

/// Password checks through the backend.
struct BackendAuth {
    backend: Arc<dyn SqlBackend>,
}

impl Debug for BackendAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendAuth")
    }
}

#[async_trait]
impl AuthSource for BackendAuth {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        // Unused: `verify_password` asks the backend instead. Refuse rather than compare
        // against an empty password.
        Err(ProtocolError::InvalidPassword(
            login.user().unwrap_or_default().to_owned(),
        ))
    }

    async fn verify_password(
        &self,
        login: &LoginInfo,
        presented_password: &[u8],
    ) -> PgWireResult<Option<()>> {
        let user = login.user().unwrap_or_default().to_owned();
        let host = login.host().to_owned();
        let refused = |message: String| {
            tracing::warn!(user = %user, host = %host, "wire authentication failed");
            ProtocolError::UserError(Box::new(ErrorInfo::new(
                SEVERITY_FATAL.to_owned(),
                "28P01".to_owned(),
                message,
            )))
        };
        let Ok(password) = String::from_utf8(presented_password.to_vec()) else {
            return Err(refused(format!(
                "password authentication failed for user \"{user}\""
            )));
        };
        let backend = self.backend.clone();
        let name = user.clone();
        match tokio::task::spawn_blocking(move || backend.authenticate(&name, &password)).await {
            Ok(Ok(())) => {
                tracing::debug!(user = %user, host = %host, "wire client authenticated");
                Ok(None)
            }
            Ok(Err(message)) => Err(refused(message)),
            Err(e) => {
                tracing::error!(user = %user, error = %e, "wire password check panicked");
                Err(ProtocolError::UserError(Box::new(ErrorInfo::new(
                    SEVERITY_FATAL.to_owned(),
                    "XX000".to_owned(),
                    "internal error while checking the password".to_owned(),
                ))))
            }
        }
    }
}

/// A statement parsed by the extended protocol.
#[derive(Debug, Clone)]
enum Prepared {
    Local(Local),
    Backend(Arc<BackendStatement>),
}

/// A statement for the backend, described.
#[derive(Debug)]
struct BackendStatement {
    /// The SQL with `current_setting(...)` resolved and `$n` placeholders still in place.
    sql: String,
    /// The command tag (`SELECT`, `SHOW`, ...).
    tag: String,
    /// The type of each parameter `$1..$n`.
    params: Vec<Type>,
    /// Name and type of each result column.
    columns: Vec<(String, Type)>,
}

/// The extended protocol's statement parser: classifies and describes at Parse time, so a bad
/// statement fails at Parse as it does in PostgreSQL.
struct Parser {
    backend: Arc<dyn SqlBackend>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let session = Session::of(client);
        let statements = split_statements(sql);
        let statement = match statements.as_slice() {
            [] => return Ok(None),
            [one] => *one,
            _ => {
                return Err(user_error(
                    "42601",
                    "cannot insert multiple commands into a prepared statement",
                ))
            }
        };
        match classify(statement, &session).map_err(into_protocol)? {
            Classified::Empty => Ok(None),
            Classified::Local(local) => Ok(Some(Prepared::Local(local))),
            Classified::Backend { sql, tag, params } => {
                let description =
                    self.backend
                        .describe(&session.user, &sql)
                        .await
                        .map_err(|e| {
                            log_backend_error(&session.user, &e);
                            into_protocol(e)
                        })?;
                // Like PostgreSQL: the client's declared type, else an explicit cast
                // (`$1::bigint`), else what the plan infers, else text.
                let count = params
                    .len()
                    .max(description.parameters.len())
                    .max(types.len());
                let params = (0..count)
                    .map(|i| match types.get(i) {
                        Some(Some(t)) if *t != Type::UNKNOWN => t.clone(),
                        _ => params.get(i).cloned().flatten().unwrap_or_else(|| {
                            description
                                .parameters
                                .get(i)
                                .and_then(|t| t.as_ref())
                                .map_or(Type::TEXT, pg_type_of)
                        }),
                    })
                    .collect();
                let columns = description
                    .schema
                    .fields()
                    .iter()
                    .map(|f| (f.name().clone(), pg_type_of(f.data_type())))
                    .collect();
                Ok(Some(Prepared::Backend(Arc::new(BackendStatement {
                    sql,
                    tag,
                    params,
                    columns,
                }))))
            }
        }
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(match stmt {
            Prepared::Local(_) => Vec::new(),
            Prepared::Backend(b) => b.params.clone(),
        })
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let columns = match stmt {
            Prepared::Local(local) => local.columns(),
            Prepared::Backend(b) => b.columns.clone(),
        };
        Ok(fields(&columns, column_format))
    }
}

/// Both query protocols.
struct QueryHandler {
    backend: Arc<dyn SqlBackend>,
    parser: Arc<Parser>,
}

#[async_trait]
impl SimpleQueryHandler for QueryHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        ProtocolError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = Session::of(client);
        let mut responses = Vec::new();
        let statements = split_statements(query);
        if statements.is_empty() {
            responses.push(Response::EmptyQuery);
        }
        for statement in statements {
            let response = match classify(statement, &session) {
                Ok(Classified::Empty) => Ok(Response::EmptyQuery),
                Ok(Classified::Local(local)) => local.respond(None),
                Ok(Classified::Backend { sql, tag, .. }) => {
                    match self.backend.execute(&session.user, &sql).await {
                        Ok((schema, batches)) => {
                            let columns: Vec<_> = schema
                                .fields()
                                .iter()
                                .map(|f| (f.name().clone(), pg_type_of(f.data_type())))
                                .collect();
                            rows_response(&columns, None, &tag, &batches)
                        }
                        Err(e) => {
                            log_backend_error(&session.user, &e);
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match response {
                Ok(r) => responses.push(r),
                Err(e) => {
                    // Like PostgreSQL: the first failing statement ends the query string.
                    responses.push(Response::Error(Box::new(error_info(
                        &e.sqlstate,
                        e.message,
                    ))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for QueryHandler {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        ProtocolError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement = match &portal.statement.statement {
            Prepared::Local(local) => {
                return local
                    .respond(Some(&portal.result_column_format))
                    .map_err(into_protocol)
            }
            Prepared::Backend(b) => b.clone(),
        };
        let session = Session::of(client);
        let sql = bind(
            &statement.sql,
            &statement.params,
            &portal.parameter_format,
            &portal.parameters,
        )
        .map_err(into_protocol)?;
        let (_, batches) = self
            .backend
            .execute(&session.user, &sql)
            .await
            .map_err(|e| {
                log_backend_error(&session.user, &e);
                into_protocol(e)
            })?;
        if statement.columns.is_empty() && batches.iter().all(|b| b.num_columns() == 0) {
            return Ok(Response::Execution(Tag::new(&statement.tag)));
        }
        rows_response(
            &statement.columns,
            Some(&portal.result_column_format),
            &statement.tag,
            &batches,
        )
        .map_err(into_protocol)
    }
}

/// Who is connected, from the startup message.
struct Session {
    user: String,
    application_name: String,
}

impl Session {
    fn of<C: ClientInfo + ?Sized>(client: &C) -> Self {
        let get = |key: &str| client.metadata().get(key).cloned().unwrap_or_default();
        Self {
            user: get(METADATA_USER),
            application_name: get(METADATA_APPLICATION_NAME),
        }
    }
}

fn error_info(sqlstate: &str, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(
        SEVERITY_ERROR.to_owned(),
        sqlstate.to_owned(),
        message.into(),
    )
}

fn user_error(sqlstate: &str, message: impl Into<String>) -> ProtocolError {
    ProtocolError::UserError(Box::new(error_info(sqlstate, message)))
}

fn into_protocol(e: BackendError) -> ProtocolError {
    user_error(&e.sqlstate, e.message)
}

fn log_backend_error(user: &str, e: &BackendError) {
    // Class XX is ours to fix; everything else is the client's statement or rights.
    if e.sqlstate.starts_with("XX") {
        tracing::warn!(user, sqlstate = %e.sqlstate, error = %e.message, "wire query failed");
    } else {
        tracing::info!(user, sqlstate = %e.sqlstate, error = %e.message, "wire query failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Statements answered by the wire layer

/// A statement the wire layer answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Local {
    /// Accepted and ignored; answers this command tag.
    Command(String),
    /// Opens a transaction block (bookkeeping only).
    Begin(String),
    /// Closes a transaction block.
    End(String),
    /// One row with one text column.
    Value { column: String, value: String },
}

impl Local {
    fn columns(&self) -> Vec<(String, Type)> {
        match self {
            Local::Value { column, .. } => vec![(column.clone(), Type::TEXT)],
            _ => Vec::new(),
        }
    }

    fn respond(&self, format: Option<&Format>) -> Result<Response, BackendError> {
        Ok(match self {
            Local::Command(tag) => Response::Execution(Tag::new(tag)),
            Local::Begin(tag) => Response::TransactionStart(Tag::new(tag)),
            Local::End(tag) => Response::TransactionEnd(Tag::new(tag)),
            Local::Value { column, value } => {
                let schema = Arc::new(fields(&[(column.clone(), Type::TEXT)], format));
                let mut encoder = DataRowEncoder::new(schema.clone());
                encoder
                    .encode_field(&value.as_str())
                    .map_err(|e| BackendError::new("XX000", e.to_string()))?;
                let row = encoder.take_row();
                Response::Query(QueryResponse::new(schema, futures::stream::iter([Ok(row)])))
            }
        })
    }
}

/// What to do with one statement.
#[derive(Debug, PartialEq, Eq)]
enum Classified {
    /// Only comments and white space.
    Empty,
    Local(Local),
    /// For the backend: SQL with settings resolved, its command tag, and for each `$n` up to
    /// the highest the type an explicit cast gives it.
    Backend {
        sql: String,
        tag: String,
        params: Vec<Option<Type>>,
    },
}

/// Sorts one statement (no `;` separators) into local or backend.
fn classify(sql: &str, session: &Session) -> Result<Classified, BackendError> {
    let tokens = lex(sql);
    let sig: Vec<&Token> = tokens.iter().filter(|t| t.is_significant()).collect();
    if sig.is_empty() {
        return Ok(Classified::Empty);
    }
    let word = |i: usize| -> Option<String> {
        sig.get(i)
            .filter(|t| t.kind == Tk::Word)
            .map(|t| sql[t.start..t.end].to_ascii_lowercase())
    };
    let first_word = word(0).unwrap_or_default();
    let local = |l: Local| Ok(Classified::Local(l));
    match first_word.as_str() {
        "set" | "reset" | "deallocate" | "savepoint" | "release" => {
            return local(Local::Command(first_word.to_ascii_uppercase()))
        }
        "discard" => {
            let what = word(1).unwrap_or_default().to_ascii_uppercase();
            return local(Local::Command(format!("DISCARD {what}").trim().to_owned()));
        }
        "begin" => return local(Local::Begin("BEGIN".to_owned())),
        "start" if word(1).as_deref() == Some("transaction") => {
            return local(Local::Begin("START TRANSACTION".to_owned()))
        }
        "commit" | "end" => return local(Local::End("COMMIT".to_owned())),
        "rollback" | "abort" => {
            // ROLLBACK TO SAVEPOINT stays inside the transaction block.
            if word(1).as_deref() == Some("to") {
                return local(Local::Command("ROLLBACK".to_owned()));
            }
            return local(Local::End("ROLLBACK".to_owned()));
        }
        "show" if sig.len() > 1 && sig[1..].iter().all(|t| t.kind == Tk::Word) => {
            let name = sig[1..]
                .iter()
                .map(|t| sql[t.start..t.end].to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join("_");
            if let Some((column, value)) = setting(&name, session) {
                return local(Local::Value {
                    column: column.to_owned(),
                    value,
                });
            }
        }
        "select" => {
            let punct = |i: usize, c: char| sig.get(i).is_some_and(|t| t.kind == Tk::Punct(c));
            // SELECT version()
            if sig.len() == 4
                && word(1).as_deref() == Some("version")
                && punct(2, '(')
                && punct(3, ')')
            {
                return local(Local::Value {
                    column: "version".to_owned(),
                    value: version_string(),
                });
            }
            // SELECT current_setting('name') [[AS] alias]
            if word(1).as_deref() == Some("current_setting")
                && punct(2, '(')
                && sig.get(3).is_some_and(|t| t.kind == Tk::Str)
                && punct(4, ')')
            {
                let alias = match sig.len() {
                    5 => Some("current_setting".to_owned()),
                    6 => alias_name(sql, sig[5]),
                    7 if word(5).as_deref() == Some("as") => alias_name(sql, sig[6]),
                    _ => None,
                };
                if let Some(column) = alias {
                    let name = unquote(&sql[sig[3].start..sig[3].end]);
                    let (_, value) = setting(&name.to_ascii_lowercase(), session)
                        .ok_or_else(|| unknown_setting(&name))?;
                    return local(Local::Value { column, value });
                }
            }
        }
        _ => {}
    }
    let tag = match first_word.as_str() {
        "" | "with" | "values" | "table" => "SELECT".to_owned(),
        w => w.to_ascii_uppercase(),
    };
    Ok(Classified::Backend {
        params: cast_types(sql, &tokens),
        sql: resolve_settings(sql, &tokens, session)?,
        tag,
    })
}

/// For each parameter `$1..$n`, the type of an explicit `$n::type` or `CAST($n AS type)`.
fn cast_types(sql: &str, tokens: &[Token]) -> Vec<Option<Type>> {
    let sig: Vec<&Token> = tokens.iter().filter(|t| t.is_significant()).collect();
    let word = |i: usize| {
        sig.get(i)
            .filter(|t| t.kind == Tk::Word)
            .map(|t| sql[t.start..t.end].to_ascii_lowercase())
    };
    let punct = |i: usize, c: char| sig.get(i).is_some_and(|t| t.kind == Tk::Punct(c));
    let mut types: Vec<Option<Type>> = Vec::new();
    for (k, t) in sig.iter().enumerate() {
        let Tk::Param(n) = t.kind else { continue };
        if n == 0 || n > MAX_PARAMS {
            continue;
        }
        if types.len() < n {
            types.resize(n, None);
        }
        let type_at = if punct(k + 1, ':') && punct(k + 2, ':') {
            Some(k + 3)
        } else if k >= 2 && punct(k - 1, '(') && word(k - 2).as_deref() == Some("cast") {
            (word(k + 1).as_deref() == Some("as")).then_some(k + 2)
        } else {
            None
        };
        let Some(at) = type_at else { continue };
        let with_zone = word(at + 1).as_deref() == Some("with")
            && word(at + 2).as_deref() == Some("time")
            && word(at + 3).as_deref() == Some("zone");
        let ty = match word(at).as_deref() {
            Some("int2" | "smallint") => Type::INT2,
            Some("int4" | "int" | "integer") => Type::INT4,
            Some("int8" | "bigint") => Type::INT8,
            Some("float4" | "real") => Type::FLOAT4,
            Some("float8" | "float" | "double") => Type::FLOAT8,
            Some("numeric" | "decimal") => Type::NUMERIC,
            Some("text" | "varchar" | "string" | "char" | "character") => Type::TEXT,
            Some("bool" | "boolean") => Type::BOOL,
            Some("date") => Type::DATE,
            Some("time") => Type::TIME,
            Some("timestamp") if with_zone => Type::TIMESTAMPTZ,
            Some("timestamp") => Type::TIMESTAMP,
            Some("timestamptz") => Type::TIMESTAMPTZ,
            Some("bytea") => Type::BYTEA,
            _ => continue,
        };
        types[n - 1] = Some(ty);
    }
    types
}

fn alias_name(sql: &str, token: &Token) -> Option<String> {
    match token.kind {
        Tk::Word => Some(sql[token.start..token.end].to_ascii_lowercase()),
        Tk::QuotedIdent => Some(unquote(&sql[token.start..token.end])),
        _ => None,
    }
}

fn unknown_setting(name: &str) -> BackendError {
    BackendError::new(
        "42704",
        format!("unrecognized configuration parameter \"{name}\""),
    )
}

fn version_string() -> String {
    format!(
        "PostgreSQL {SERVER_VERSION} (primespark, Apache DataFusion {})",
        datafusion::DATAFUSION_VERSION
    )
}

/// A connection setting by lower-case name (words joined by `_`): its display name and value.
fn setting(name: &str, session: &Session) -> Option<(&'static str, String)> {
    let fixed = |column: &'static str, value: &str| Some((column, value.to_owned()));
    match name {
        "server_version" => fixed("server_version", SERVER_VERSION),
        "server_version_num" => fixed("server_version_num", SERVER_VERSION_NUM),
        "timezone" | "time_zone" => fixed("TimeZone", TIME_ZONE),
        "datestyle" => fixed("DateStyle", DATE_STYLE),
        "intervalstyle" => fixed("IntervalStyle", "postgres"),
        "client_encoding" => fixed("client_encoding", "UTF8"),
        "server_encoding" => fixed("server_encoding", "UTF8"),
        "standard_conforming_strings" => fixed("standard_conforming_strings", "on"),
        "integer_datetimes" => fixed("integer_datetimes", "on"),
        "search_path" => fixed("search_path", "public"),
        "transaction_isolation" | "transaction_isolation_level" => {
            fixed("transaction_isolation", "read committed")
        }
        "default_transaction_read_only" => fixed("default_transaction_read_only", "on"),
        "transaction_read_only" => fixed("transaction_read_only", "on"),
        "is_superuser" => fixed("is_superuser", "off"),
        "max_identifier_length" => fixed("max_identifier_length", "63"),
        "extra_float_digits" => fixed("extra_float_digits", "1"),
        "bytea_output" => fixed("bytea_output", "hex"),
        "lc_messages" | "lc_collate" | "lc_ctype" => match name {
            "lc_messages" => fixed("lc_messages", "C"),
            "lc_collate" => fixed("lc_collate", "C"),
            _ => fixed("lc_ctype", "C"),
        },
        "application_name" => Some(("application_name", session.application_name.clone())),
        "session_authorization" => Some(("session_authorization", session.user.clone())),
        _ => None,
    }
}

/// Replaces `[pg_catalog.]current_setting('name')` by the setting's value as a string literal.
fn resolve_settings(
    sql: &str,
    tokens: &[Token],
    session: &Session,
) -> Result<String, BackendError> {
    let sig: Vec<(usize, &Token)> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| t.is_significant())
        .collect();
    let text = |t: &Token| &sql[t.start..t.end];
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for (k, (_, t)) in sig.iter().enumerate() {
        let is_call = t.kind == Tk::Word
            && text(t).eq_ignore_ascii_case("current_setting")
            && sig
                .get(k + 1)
                .is_some_and(|(_, t)| t.kind == Tk::Punct('('))
            && sig.get(k + 2).is_some_and(|(_, t)| t.kind == Tk::Str)
            && sig
                .get(k + 3)
                .is_some_and(|(_, t)| t.kind == Tk::Punct(')'));
        if !is_call {
            continue;
        }
        let mut start = t.start;
        // pg_catalog.current_setting(...): the qualifier goes too.
        if k >= 2
            && sig[k - 1].1.kind == Tk::Punct('.')
            && sig[k - 2].1.kind == Tk::Word
            && text(sig[k - 2].1).eq_ignore_ascii_case("pg_catalog")
        {
            start = sig[k - 2].1.start;
        } else if k >= 1 && sig[k - 1].1.kind == Tk::Punct('.') {
            continue;
        }
        if start < copied {
            continue;
        }
        let name = unquote(text(sig[k + 2].1));
        let (_, value) =
            setting(&name.to_ascii_lowercase(), session).ok_or_else(|| unknown_setting(&name))?;
        out.push_str(&sql[copied..start]);
        out.push_str(&sql_string(&value).map_err(|e| BackendError::new("22021", e))?);
        copied = sig[k + 3].1.end;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// A small SQL lexer: enough to split statements, find `$n` and spot the statements answered
// here without being fooled by strings, quoted identifiers or comments.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tk {
    Space,
    Comment,
    Word,
    QuotedIdent,
    /// A standard `'...'` string.
    Str,
    /// An escape (`E'...'`) or dollar-quoted string.
    OtherStr,
    Param(usize),
    Semi,
    Punct(char),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    kind: Tk,
    start: usize,
    end: usize,
}

impl Token {
    fn is_significant(&self) -> bool {
        !matches!(self.kind, Tk::Space | Tk::Comment)
    }
}

fn lex(sql: &str) -> Vec<Token> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(c) = sql[i..].chars().next() {
        let start = i;
        let kind = if c.is_whitespace() {
            while let Some(c) = sql[i..].chars().next().filter(|c| c.is_whitespace()) {
                i += c.len_utf8();
            }
            Tk::Space
        } else if sql[i..].starts_with("--") {
            i = sql[i..].find('\n').map_or(sql.len(), |n| i + n);
            Tk::Comment
        } else if sql[i..].starts_with("/*") {
            // PostgreSQL block comments nest.
            i += 2;
            let mut depth = 1;
            // Bytes, not str: a step of one byte may land inside a multi-byte character.
            while i < b.len() && depth > 0 {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            Tk::Comment
        } else if c == '\'' {
            i = end_of_quoted(b, i, b'\'', false);
            Tk::Str
        } else if c == '"' {
            i = end_of_quoted(b, i, b'"', false);
            Tk::QuotedIdent
        } else if c == ';' {
            i += 1;
            Tk::Semi
        } else if c == '$' {
            let digits = b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
            if digits > 0 {
                let n = sql[i + 1..i + 1 + digits].parse().unwrap_or(usize::MAX);
                i += 1 + digits;
                Tk::Param(n)
            } else if let Some(end) = end_of_dollar_quoted(sql, i) {
                i = end;
                Tk::OtherStr
            } else {
                i += 1;
                Tk::Punct('$')
            }
        } else if c.is_alphanumeric() || c == '_' {
            while let Some(c) = sql[i..]
                .chars()
                .next()
                .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
            {
                i += c.len_utf8();
            }
            if (&sql[start..i] == "e" || &sql[start..i] == "E") && b.get(i) == Some(&b'\'') {
                // E'...': backslash escapes, so \' does not end it.
                i = end_of_quoted(b, i, b'\'', true);
                Tk::OtherStr
            } else {
                Tk::Word
            }
        } else {
            i += c.len_utf8();
            Tk::Punct(c)
        };
        out.push(Token {
            kind,
            start,
            end: i,
        });
    }
    out
}

/// The end of a quoted token opening at `i`; a doubled quote is part of it. Unterminated
/// runs to the end (the backend reports the error).
fn end_of_quoted(b: &[u8], i: usize, quote: u8, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if backslash && b[j] == b'\\' {
            j += 2;
        } else if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// The end of a `$tag$...$tag$` string opening at `i`, or None if `i` opens no tag.
fn end_of_dollar_quoted(sql: &str, i: usize) -> Option<usize> {
    let b = sql.as_bytes();
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let tag = &sql[i..=j];
    Some(
        sql[j + 1..]
            .find(tag)
            .map_or(sql.len(), |n| j + 1 + n + tag.len()),
    )
}

/// The statements of a query string, without separators, comment-only ones dropped.
fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut significant = false;
    for t in lex(sql) {
        match t.kind {
            Tk::Semi => {
                if significant {
                    out.push(sql[start..t.start].trim());
                }
                start = t.end;
                significant = false;
            }
            Tk::Space | Tk::Comment => {}
            _ => significant = true,
        }
    }
    if significant {
        out.push(sql[start..].trim());
    }
    out
}

/// The value of a `'...'` string or `"..."` identifier.
fn unquote(quoted: &str) -> String {
    let Some(q) = quoted.chars().next() else {
        return String::new();
    };
    let inner = quoted
        .strip_prefix(q)
        .and_then(|s| s.strip_suffix(q))
        .unwrap_or(&quoted[q.len_utf8()..]);
    inner.replace(&format!("{q}{q}"), &q.to_string())
}

// ---------------------------------------------------------------------------------------------
// Parameters

/// Substitutes bound parameters into `sql` as SQL literals.
///
/// Each value is decoded by its type and format (text or binary) and written as a literal
/// DataFusion parses back to the same value: numbers validated and parenthesised, strings
/// quoted with `''` and with backslashes spelled `chr(92)` (so a dialect that reads `\'` as an
/// escape cannot end the string early), dates and times as `CAST('...' AS ...)`, bytea as
/// `X'..'`. `$n` inside strings, identifiers and comments is left alone.
fn bind(
    sql: &str,
    types: &[Type],
    format: &Format,
    values: &[Option<bytes::Bytes>],
) -> Result<String, BackendError> {
    if values.len() != types.len() {
        return Err(BackendError::new(
            "08P01",
            format!(
                "bind message supplies {} parameters, but prepared statement requires {}",
                values.len(),
                types.len()
            ),
        ));
    }
    if let Format::Individual(codes) = format {
        if codes.len() != values.len() {
            return Err(BackendError::new(
                "08P01",
                format!(
                    "bind message has {} parameter formats but {} parameters",
                    codes.len(),
                    values.len()
                ),
            ));
        }
    }
    let mut literals = Vec::with_capacity(values.len());
    for (i, (ty, value)) in types.iter().zip(values).enumerate() {
        let literal = param_literal(ty, format.format_for(i), value.as_deref()).map_err(|e| {
            BackendError::new(e.sqlstate, format!("parameter ${}: {}", i + 1, e.message))
        })?;
        literals.push(literal);
    }
    let mut out = String::with_capacity(sql.len() + 16 * literals.len());
    let mut copied = 0;
    for t in lex(sql) {
        if let Tk::Param(n) = t.kind {
            let literal = n
                .checked_sub(1)
                .and_then(|i| literals.get(i))
                .ok_or_else(|| BackendError::new("42P02", format!("there is no parameter ${n}")))?;
            out.push_str(&sql[copied..t.start]);
            // Spaces keep the literal from fusing with a neighbouring word.
            out.push(' ');
            out.push_str(literal);
            out.push(' ');
            copied = t.end;
        }
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// One parameter as a SQL literal.
fn param_literal(
    ty: &Type,
    format: FieldFormat,
    raw: Option<&[u8]>,
) -> Result<String, BackendError> {
    let Some(raw) = raw else {
        return Ok("NULL".to_owned());
    };
    let binary = format == FieldFormat::Binary;
    let bad_binary =
        |e: Box<dyn std::error::Error + Sync + Send>| BackendError::new("22P03", e.to_string());
    let text = || {
        std::str::from_utf8(raw)
            .map(str::trim)
            .map_err(|_| BackendError::new("22021", "invalid UTF-8"))
    };
    let bad_text =
        |what: &str, v: &str| BackendError::new("22P02", format!("invalid {what}: \"{v}\""));
    let cast_string = |value: &str, sql_type: &str| -> Result<String, BackendError> {
        Ok(format!(
            "CAST({} AS {sql_type})",
            sql_string(value).map_err(|e| BackendError::new("22021", e))?
        ))
    };
    match *ty {
        Type::BOOL => {
            let v = if binary {
                bool::from_sql(ty, raw).map_err(bad_binary)?
            } else {
                match text()?.to_ascii_lowercase().as_str() {
                    "t" | "true" | "y" | "yes" | "on" | "1" => true,
                    "f" | "false" | "n" | "no" | "off" | "0" => false,
                    other => return Err(bad_text("boolean", other)),
                }
            };
            Ok(if v { "TRUE" } else { "FALSE" }.to_owned())
        }
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            let v: i64 = if binary {
                match *ty {
                    Type::INT2 => i16::from_sql(ty, raw).map_err(bad_binary)?.into(),
                    Type::INT4 => i32::from_sql(ty, raw).map_err(bad_binary)?.into(),
                    Type::OID => u32::from_sql(ty, raw).map_err(bad_binary)?.into(),
                    _ => i64::from_sql(ty, raw).map_err(bad_binary)?,
                }
            } else {
                let t = text()?;
                t.parse().map_err(|_| bad_text("integer", t))?
            };
            Ok(format!("({v})"))
        }
        Type::FLOAT4 | Type::FLOAT8 => {
            let v: f64 = if binary {
                if *ty == Type::FLOAT4 {
                    f32::from_sql(ty, raw).map_err(bad_binary)?.into()
                } else {
                    f64::from_sql(ty, raw).map_err(bad_binary)?
                }
            } else {
                let t = text()?;
                t.parse().map_err(|_| bad_text("number", t))?
            };
            let sql_type = if *ty == Type::FLOAT4 {
                "REAL"
            } else {
                "DOUBLE"
            };
            if v.is_finite() {
                Ok(format!("CAST(({v:?}) AS {sql_type})"))
            } else {
                let name = if v.is_nan() {
                    "NaN"
                } else if v > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                };
                Ok(format!("CAST('{name}' AS {sql_type})"))
            }
        }
        Type::NUMERIC => {
            let v = if binary {
                numeric_from_binary(raw).map_err(bad_binary)?
            } else {
                text()?.to_owned()
            };
            if is_decimal(&v) {
                Ok(format!("({v})"))
            } else {
                match v.to_ascii_lowercase().as_str() {
                    "nan" => Ok("CAST('NaN' AS DOUBLE)".to_owned()),
                    "infinity" | "+infinity" | "inf" => Ok("CAST('Infinity' AS DOUBLE)".to_owned()),
                    "-infinity" | "-inf" => Ok("CAST('-Infinity' AS DOUBLE)".to_owned()),
                    _ => Err(bad_text("numeric", &v)),
                }
            }
        }
        Type::DATE => {
            if binary {
                let d = NaiveDate::from_sql(ty, raw).map_err(bad_binary)?;
                cast_string(&d.format("%Y-%m-%d").to_string(), "DATE")
            } else {
                cast_string(text()?, "DATE")
            }
        }
        Type::TIME => {
            if binary {
                let t = NaiveTime::from_sql(ty, raw).map_err(bad_binary)?;
                cast_string(&t.format("%H:%M:%S%.f").to_string(), "TIME")
            } else {
                cast_string(text()?, "TIME")
            }
        }
        Type::TIMESTAMP => {
            if binary {
                let t = NaiveDateTime::from_sql(ty, raw).map_err(bad_binary)?;
                cast_string(&t.format("%Y-%m-%dT%H:%M:%S%.f").to_string(), "TIMESTAMP")
            } else {
                cast_string(text()?, "TIMESTAMP")
            }
        }
        Type::TIMESTAMPTZ => {
            let value = if binary {
                DateTime::<Utc>::from_sql(ty, raw)
                    .map_err(bad_binary)?
                    .format("%Y-%m-%dT%H:%M:%S%.fZ")
                    .to_string()
            } else {
                text()?.to_owned()
            };
            // DataFusion parses the offset and keeps the instant; the column type follows
            // the session's time zone setting.
            cast_string(&value, "TIMESTAMP WITH TIME ZONE")
        }
        Type::BYTEA => {
            let bytes: Vec<u8> = if binary {
                raw.to_vec()
            } else {
                let t = text()?;
                let hex = t
                    .strip_prefix("\\x")
                    .ok_or_else(|| bad_text("bytea (only hex format is accepted)", t))?;
                decode_hex(hex).ok_or_else(|| bad_text("bytea", t))?
            };
            let mut hex = String::with_capacity(bytes.len() * 2 + 3);
            hex.push_str("X'");
            for b in bytes {
                hex.push_str(&format!("{b:02x}"));
            }
            hex.push('\'');
            Ok(hex)
        }
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            // Text types look the same in both formats.
            let s = std::str::from_utf8(raw)
                .map_err(|_| BackendError::new("22021", "invalid UTF-8"))?;
            sql_string(s).map_err(|e| BackendError::new("22021", e))
        }
        _ if !binary => {
            let s = std::str::from_utf8(raw)
                .map_err(|_| BackendError::new("22021", "invalid UTF-8"))?;
            sql_string(s).map_err(|e| BackendError::new("22021", e))
        }
        _ => Err(BackendError::new(
            "0A000",
            format!(
                "binary parameters of type {} are not supported; send text",
                ty.name()
            ),
        )),
    }
}

/// `s` as a SQL string literal that means the same under every DataFusion dialect.
fn sql_string(s: &str) -> Result<String, &'static str> {
    if s.contains('\0') {
        return Err("invalid byte sequence for encoding \"UTF8\": 0x00");
    }
    let parts: Vec<String> = s
        .split('\\')
        .map(|part| format!("'{}'", part.replace('\'', "''")))
        .collect();
    if parts.len() == 1 {
        Ok(parts.concat())
    } else {
        Ok(format!("({})", parts.join(" || chr(92) || ")))
    }
}

/// A plain decimal number: optional sign, digits, optional fraction and exponent.
fn is_decimal(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac);
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Results

/// The PostgreSQL type an Arrow column is sent as.
///
/// | Arrow | PostgreSQL |
/// | --- | --- |
/// | Boolean | bool |
/// | Int8, Int16, UInt8 | int2 |
/// | Int32, UInt16 | int4 |
/// | Int64, UInt32 | int8 |
/// | UInt64, Decimal32/64/128/256 | numeric |
/// | Float16, Float32 | float4 |
/// | Float64 | float8 |
/// | Utf8, LargeUtf8, Utf8View | text |
/// | Binary, LargeBinary, BinaryView, FixedSizeBinary | bytea |
/// | Date32, Date64 | date |
/// | Time32, Time64 | time |
/// | Timestamp without time zone (any unit) | timestamp |
/// | Timestamp with a time zone (any unit) | timestamptz |
/// | Dictionary | the type of its values |
/// | Null and everything else (intervals, lists, structs, ...) | text, as Arrow displays it |
///
/// Times and timestamps are sent with microsecond precision, as PostgreSQL keeps them.
pub fn pg_type_of(data_type: &DataType) -> Type {
    match data_type {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 => Type::INT8,
        DataType::UInt64
        | DataType::Decimal32(_, _)
        | DataType::Decimal64(_, _)
        | DataType::Decimal128(_, _)
        | DataType::Decimal256(_, _) => Type::NUMERIC,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Type::TEXT,
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => Type::BYTEA,
        DataType::Date32 | DataType::Date64 => Type::DATE,
        DataType::Time32(_) | DataType::Time64(_) => Type::TIME,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Dictionary(_, values) => pg_type_of(values),
        _ => Type::TEXT,
    }
}

/// Field descriptions for `columns`, each in the format the client asked for (text when it
/// did not say, as for Describe of a statement).
fn fields(columns: &[(String, Type)], format: Option<&Format>) -> Vec<FieldInfo> {
    columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            let format = match format {
                None => FieldFormat::Text,
                // A short format list would make pgwire index out of bounds.
                Some(Format::Individual(codes)) => codes
                    .get(i)
                    .map_or(FieldFormat::Text, |c| FieldFormat::from(*c)),
                Some(f) => f.format_for(i),
            };
            FieldInfo::new(name.clone(), None, None, ty.clone(), format)
        })
        .collect()
}

/// Encodes `batches` as rows of `columns` (the described types win over the batches' own,
/// so that rows always match the RowDescription the client holds).
fn rows_response(
    columns: &[(String, Type)],
    format: Option<&Format>,
    tag: &str,
    batches: &[RecordBatch],
) -> Result<Response, BackendError> {
    let schema = Arc::new(fields(columns, format));
    let mut encoder = DataRowEncoder::new(schema.clone());
    let mut rows: Vec<PgWireResult<DataRow>> = Vec::new();
    for batch in batches {
        if batch.num_columns() != columns.len() {
            return Err(BackendError::new(
                "XX000",
                format!(
                    "the statement returned {} columns but was described with {}",
                    batch.num_columns(),
                    columns.len()
                ),
            ));
        }
        let encoders = columns
            .iter()
            .zip(batch.columns())
            .map(|((name, ty), array)| {
                Column::new(ty, array).map_err(|e| {
                    BackendError::new(
                        "XX000",
                        format!("column \"{name}\" cannot be sent as {}: {e}", ty.name()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            for column in &encoders {
                column
                    .encode(&mut encoder, row)
                    .map_err(|e| BackendError::new("XX000", e.to_string()))?;
            }
            rows.push(Ok(encoder.take_row()));
        }
    }
    let mut response = QueryResponse::new(schema, futures::stream::iter(rows));
    response.set_command_tag(tag);
    Ok(Response::Query(response))
}

/// One Arrow column, converted to the Arrow type that maps one-to-one onto its PostgreSQL type.
enum Column {
    Bool(datafusion::arrow::array::BooleanArray),
    I16(datafusion::arrow::array::Int16Array),
    I32(datafusion::arrow::array::Int32Array),
    I64(datafusion::arrow::array::Int64Array),
    F32(datafusion::arrow::array::Float32Array),
    F64(datafusion::arrow::array::Float64Array),
    Text(StringArray),
    Bytes(datafusion::arrow::array::BinaryArray),
    Date(datafusion::arrow::array::Date32Array),
    Time(datafusion::arrow::array::Time64MicrosecondArray),
    Timestamp(datafusion::arrow::array::TimestampMicrosecondArray),
    TimestampTz(datafusion::arrow::array::TimestampMicrosecondArray),
    /// Decimal text, encoded as numeric.
    Numeric(StringArray),
}

impl Column {
    fn new(ty: &Type, array: &ArrayRef) -> Result<Self, ArrowError> {
        let to = |t: DataType| cast(array, &t);
        Ok(match *ty {
            Type::BOOL => Column::Bool(to(DataType::Boolean)?.as_boolean().clone()),
            Type::INT2 => Column::I16(to(DataType::Int16)?.as_primitive::<Int16Type>().clone()),
            Type::INT4 => Column::I32(to(DataType::Int32)?.as_primitive::<Int32Type>().clone()),
            Type::INT8 => Column::I64(to(DataType::Int64)?.as_primitive::<Int64Type>().clone()),
            Type::FLOAT4 => {
                Column::F32(to(DataType::Float32)?.as_primitive::<Float32Type>().clone())
            }
            Type::FLOAT8 => {
                Column::F64(to(DataType::Float64)?.as_primitive::<Float64Type>().clone())
            }
            Type::BYTEA => Column::Bytes(to(DataType::Binary)?.as_binary::<i32>().clone()),
            Type::DATE => Column::Date(to(DataType::Date32)?.as_primitive::<Date32Type>().clone()),
            Type::TIME => Column::Time(
                to(DataType::Time64(TimeUnit::Microsecond))?
                    .as_primitive::<Time64MicrosecondType>()
                    .clone(),
            ),
            Type::TIMESTAMP => Column::Timestamp(
                to(DataType::Timestamp(TimeUnit::Microsecond, None))?
                    .as_primitive::<TimestampMicrosecondType>()
                    .clone(),
            ),
            Type::TIMESTAMPTZ => {
                // Arrow keeps UTC instants whatever the zone; only the unit changes.
                let zone = match array.data_type() {
                    DataType::Timestamp(_, Some(tz)) => Some(tz.clone()),
                    _ => Some("+00:00".into()),
                };
                Column::TimestampTz(
                    to(DataType::Timestamp(TimeUnit::Microsecond, zone))?
                        .as_primitive::<TimestampMicrosecondType>()
                        .clone(),
                )
            }
            Type::NUMERIC => Column::Numeric(display_strings(array)?),
            _ => Column::Text(match array.data_type() {
                DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Dictionary(_, _)
                | DataType::Null => to(DataType::Utf8)?.as_string::<i32>().clone(),
                _ => display_strings(array)?,
            }),
        })
    }

    fn encode(&self, encoder: &mut DataRowEncoder, i: usize) -> PgWireResult<()> {
        fn get<'a, A: Array, T>(a: &'a A, i: usize, f: impl FnOnce(&'a A) -> T) -> Option<T> {
            a.is_valid(i).then(|| f(a))
        }
        let out_of_range = |what: &str| {
            user_error(
                "22008",
                format!("{what} out of the range PostgreSQL can represent"),
            )
        };
        match self {
            Column::Bool(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::I16(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::I32(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::I64(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::F32(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::F64(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::Text(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::Bytes(a) => encoder.encode_field(&get(a, i, |a| a.value(i))),
            Column::Numeric(a) => encoder.encode_field(&get(a, i, |a| Numeric(a.value(i)))),
            Column::Date(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    // Arrow counts days from 1970-01-01, chrono from 0001-01-01.
                    Some(days) => Some(
                        days.checked_add(719_163)
                            .and_then(NaiveDate::from_num_days_from_ce_opt)
                            .ok_or_else(|| out_of_range("date"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
            Column::Time(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    Some(us) => Some(
                        u32::try_from(us.div_euclid(1_000_000))
                            .ok()
                            .and_then(|s| {
                                let nanos = (us.rem_euclid(1_000_000) * 1_000) as u32;
                                NaiveTime::from_num_seconds_from_midnight_opt(s, nanos)
                            })
                            .map(Moment::Time)
                            .ok_or_else(|| out_of_range("time"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
            Column::Timestamp(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    Some(us) => Some(
                        DateTime::<Utc>::from_timestamp_micros(us)
                            .map(|t| Moment::Timestamp(t.naive_utc()))
                            .ok_or_else(|| out_of_range("timestamp"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
            Column::TimestampTz(a) => {
                let v = match get(a, i, |a| a.value(i)) {
                    Some(us) => Some(
                        DateTime::<Utc>::from_timestamp_micros(us)
                            .map(Moment::TimestampTz)
                            .ok_or_else(|| out_of_range("timestamp"))?,
                    ),
                    None => None,
                };
                encoder.encode_field(&v)
            }
        }
    }
}

/// Every value of `array` as Arrow displays it; nulls stay null.
fn display_strings(array: &ArrayRef) -> Result<StringArray, ArrowError> {
    let options = ArrowFormatOptions::default();
    let formatter = ArrayFormatter::try_new(array.as_ref(), &options)?;
    Ok((0..array.len())
        .map(|i| array.is_valid(i).then(|| formatter.value(i).to_string()))
        .collect())
}

/// A time or timestamp, in binary as postgres-types sends it and in text as PostgreSQL prints
/// it (`2024-06-01 12:30:00.5+00`: fractional seconds only when there are any, the zone as
/// an hour offset), which psql users and text-format drivers expect.
#[derive(Debug)]
enum Moment {
    Time(NaiveTime),
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
}

impl ToSql for Moment {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Moment::Time(v) => v.to_sql(ty, out),
            Moment::Timestamp(v) => v.to_sql(ty, out),
            Moment::TimestampTz(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIME | Type::TIMESTAMP | Type::TIMESTAMPTZ)
    }

    to_sql_checked!();
}

impl ToSqlText for Moment {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format_options: &PgFormatOptions,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use chrono::Timelike;
        let fraction = |nanos: u32| {
            let micros = format!(".{:06}", nanos / 1_000);
            micros.trim_end_matches(['0', '.']).to_owned()
        };
        let text = match self {
            Moment::Time(v) => format!("{}{}", v.format("%H:%M:%S"), fraction(v.nanosecond())),
            Moment::Timestamp(v) => {
                format!(
                    "{}{}",
                    v.format("%Y-%m-%d %H:%M:%S"),
                    fraction(v.nanosecond())
                )
            }
            Moment::TimestampTz(v) => format!(
                "{}{}+00",
                v.format("%Y-%m-%d %H:%M:%S"),
                fraction(v.nanosecond())
            ),
        };
        out.put_slice(text.as_bytes());
        Ok(IsNull::No)
    }
}

/// A decimal number in text (`-123.45`), sent as PostgreSQL numeric.
#[derive(Debug)]
struct Numeric<'a>(&'a str);

impl ToSql for Numeric<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        numeric_to_binary(self.0, out)?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

impl ToSqlText for Numeric<'_> {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format_options: &PgFormatOptions,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
}

/// Writes a plain decimal (`-123.45`, no exponent) in numeric's binary format: digit count,
/// weight, sign and display scale, then base-10000 digits grouped around the decimal point.
fn numeric_to_binary(
    s: &str,
    out: &mut BytesMut,
) -> Result<(), Box<dyn std::error::Error + Sync + Send>> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(format!("not a decimal number: {s:?}").into());
    }
    let scale = u16::try_from(frac.len())
        .ok()
        .filter(|s| *s <= 0x3FFF)
        .ok_or("numeric scale too large")?;
    let int = int.trim_start_matches('0');
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let mut digits_text = String::with_capacity(int_pad + int.len() + frac.len() + frac_pad);
    digits_text.extend(std::iter::repeat_n('0', int_pad));
    digits_text.push_str(int);
    digits_text.push_str(frac);
    digits_text.extend(std::iter::repeat_n('0', frac_pad));
    let groups: Vec<i16> = digits_text
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0')))
        .collect();
    let int_groups = (int_pad + int.len()) / 4;
    let mut weight = i16::try_from(int_groups).map_err(|_| "numeric too large")? - 1;
    let first = groups.iter().position(|g| *g != 0).unwrap_or(groups.len());
    let last = groups
        .iter()
        .rposition(|g| *g != 0)
        .map_or(first, |p| p + 1);
    let digits = &groups[first..last];
    weight -= i16::try_from(first).map_err(|_| "numeric too small")?;
    if digits.is_empty() {
        weight = 0;
    }
    out.put_i16(i16::try_from(digits.len()).map_err(|_| "numeric too long")?);
    out.put_i16(weight);
    out.put_u16(if negative && !digits.is_empty() {
        0x4000
    } else {
        0
    });
    out.put_u16(scale);
    for d in digits {
        out.put_i16(*d);
    }
    Ok(())
}

/// Reads numeric's binary format back into decimal text.
fn numeric_from_binary(raw: &[u8]) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> Result<u16, Box<dyn std::error::Error + Sync + Send>> {
        raw.get(2 * i..2 * i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "numeric value too short".into())
    };
    let count = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let scale = usize::from(word(3)?);
    match sign {
        0xC000 => return Ok("NaN".to_owned()),
        0xD000 => return Ok("Infinity".to_owned()),
        0xF000 => return Ok("-Infinity".to_owned()),
        0x0000 | 0x4000 => {}
        _ => return Err("invalid numeric sign".into()),
    }
    let digits = (0..count)
        .map(|k| word(4 + k).map(i64::from))
        .collect::<Result<Vec<_>, _>>()?;
    if digits.iter().any(|d| !(0..10_000).contains(d)) {
        return Err("invalid numeric digit".into());
    }
    // digits[k] counts 10000^(weight - k).
    let digit_at = |w: i64| -> i64 {
        usize::try_from(weight - w)
            .ok()
            .and_then(|k| digits.get(k).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        text.push_str(&digit_at(weight).to_string());
        for w in (0..weight).rev() {
            text.push_str(&format!("{:04}", digit_at(w)));
        }
    }
    if scale > 0 {
        let mut frac = String::with_capacity(scale + 4);
        let mut w = -1;
        while frac.len() < scale {
            frac.push_str(&format!("{:04}", digit_at(w)));
            w -= 1;
        }
        frac.truncate(scale);
        text.push('.');
        text.push_str(&frac);
    }
    Ok(text)
}

/// [`SqlBackend::describe`]'s default: run the statement with its parameters nulled, limited
/// to no rows where it is a query.
async fn describe_by_probe<B: SqlBackend + ?Sized>(
    backend: &B,
    user: &str,
    sql: &str,
) -> Result<Description, BackendError> {
    let tokens = lex(sql);
    let mut probe = String::with_capacity(sql.len());
    let mut copied = 0;
    let mut params = 0;
    for t in &tokens {
        if let Tk::Param(n) = t.kind {
            params = params.max(n);
            probe.push_str(&sql[copied..t.start]);
            probe.push_str(" NULL ");
            copied = t.end;
        }
    }
    probe.push_str(&sql[copied..]);
    if params > MAX_PARAMS {
        return Err(BackendError::new(
            "42P02",
            format!("there is no parameter ${params}"),
        ));
    }
    let first = tokens.iter().find(|t| t.is_significant());
    let is_query = first.is_some_and(|t| {
        t.kind == Tk::Punct('(')
            || (t.kind == Tk::Word
                && ["select", "with", "values", "table"]
                    .iter()
                    .any(|w| sql[t.start..t.end].eq_ignore_ascii_case(w)))
    });
    let schema = if is_query {
        let limited = format!("SELECT * FROM ({probe}\n) AS primespark_describe LIMIT 0");
        match backend.execute(user, &limited).await {
            Ok((schema, _)) => schema,
            Err(_) => backend.execute(user, &probe).await?.0,
        }
    } else {
        backend.execute(user, &probe).await?.0
    };
    Ok(Description {
        schema,
        parameters: vec![None; params],
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use datafusion::arrow::array::{
        BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array,
        TimestampMicrosecondArray, TimestampNanosecondArray, UInt64Array,
    };
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::error::DataFusionError;
    use datafusion::prelude::SessionContext;
    use tokio::sync::oneshot;
    use tokio_postgres::error::SqlState;
    use tokio_postgres::types::Type as PgType;
    use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

    use super::*;

    const USER: &str = "alice";
    const PASSWORD: &str = "s3cret";

    /// The query service in miniature: one table, DataFusion's own planner, and two ways to fail.
    struct Fake {
        ctx: SessionContext,
        /// Plan Describe with DataFusion (as the real service should) or use the default probe.
        plan_describe: bool,
        executed: Mutex<Vec<String>>,
    }

    fn df_error(e: DataFusionError) -> BackendError {
        let sqlstate = match e.find_root() {
            DataFusionError::SQL(..) => "42601",
            DataFusionError::Plan(_) | DataFusionError::SchemaError(..) => "42P01",
            _ => "XX000",
        };
        BackendError::new(sqlstate, e.to_string())
    }

    fn forbidden(sql: &str) -> Result<(), BackendError> {
        if sql.contains("secret_table") {
            return Err(BackendError::new(
                "42501",
                "permission denied for table secret_table",
            ));
        }
        Ok(())
    }

    #[async_trait]
    impl SqlBackend for Fake {
        fn authenticate(&self, user: &str, password: &str) -> Result<(), String> {
            if user == USER && password == PASSWORD {
                Ok(())
            } else {
                Err(format!(
                    "password authentication failed for user \"{user}\""
                ))
            }
        }

        async fn execute(
            &self,
            _user: &str,
            sql: &str,
        ) -> Result<(SchemaRef, Vec<RecordBatch>), BackendError> {
            self.executed.lock().unwrap().push(sql.to_owned());
            forbidden(sql)?;
            if sql.contains("pg_sleep") {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            let df = self.ctx.sql(sql).await.map_err(df_error)?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            let batches = df.collect().await.map_err(df_error)?;
            Ok((schema, batches))
        }

        async fn describe(&self, user: &str, sql: &str) -> Result<Description, BackendError> {
            if !self.plan_describe {
                return describe_by_probe(self, user, sql).await;
            }
            forbidden(sql)?;
            if sql.contains("pg_sleep") {
                return describe_by_probe(self, user, "SELECT 1 AS slept").await;
            }
            let plan = self
                .ctx
                .state()
                .create_logical_plan(sql)
                .await
                .map_err(df_error)?;
            Description::from_plan(&plan)
        }
    }

    fn micros(s: &str) -> i64 {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
            .unwrap()
            .and_utc()
            .timestamp_micros()
    }

    fn fake(plan_describe: bool) -> Fake {
        let ts = [
            "2024-01-01 00:00:00",
            "2024-06-01 12:30:00.5",
            "2024-12-31 23:59:59.999999",
        ];
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("score", DataType::Float64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("ok", DataType::Boolean, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new(
                "tstz",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                true,
            ),
            Field::new("small", DataType::Int32, true),
            Field::new("d", DataType::Date32, true),
            Field::new("amount", DataType::Decimal128(10, 2), true),
            Field::new("big", DataType::UInt64, true),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(Float64Array::from(vec![Some(1.5), Some(-2.25), None])),
            Arc::new(StringArray::from(vec![
                Some("plain"),
                Some("it's"),
                Some("back\\slash"),
            ])),
            Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
            Arc::new(TimestampMicrosecondArray::from(
                ts.iter().map(|t| micros(t)).collect::<Vec<_>>(),
            )),
            Arc::new(
                TimestampNanosecondArray::from(
                    ts.iter().map(|t| micros(t) * 1000).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(Int32Array::from(vec![10, 20, 30])),
            Arc::new(Date32Array::from(vec![19_723, 19_875, 20_088])),
            Arc::new(
                Decimal128Array::from(vec![Some(12_345), Some(-50), None])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ),
            Arc::new(UInt64Array::from(vec![u64::MAX, 0, 1])),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        Fake {
            ctx,
            plan_describe,
            executed: Mutex::new(Vec::new()),
        }
    }

    /// Serves a fake backend on a free loopback port; dropping the sender stops it.
    async fn start(plan_describe: bool) -> (u16, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve_listener(
            listener,
            Arc::new(fake(plan_describe)),
            None,
            async move {
                let _ = stopped.await;
            },
        ));
        (port, stop)
    }

    async fn connect(port: u16, password: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={port} user={USER} password={password} dbname=primespark"
            ),
            NoTls,
        )
        .await?;
        tokio::spawn(connection);
        Ok(client)
    }

    fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
        messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    fn date(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn naive(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    /// numeric in binary, read through the module's own decoder.
    #[derive(Debug, PartialEq)]
    struct Num(String);

    impl<'a> FromSql<'a> for Num {
        fn from_sql(
            _ty: &PgType,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            numeric_from_binary(raw).map(Num)
        }

        fn accepts(ty: &PgType) -> bool {
            *ty == PgType::NUMERIC
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn extended_query_returns_typed_values_with_bind_parameters() {
        let (port, _stop) = start(true).await;
        let client = connect(port, PASSWORD).await.unwrap();

        let rows = client
            .query(
                "SELECT id, score, name, ok, ts, tstz, small, d, amount, big FROM t \
                 WHERE id >= $1 ORDER BY id",
                &[&2i64],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!(r.get::<_, i64>("id"), 2);
        assert_eq!(r.get::<_, Option<f64>>("score"), Some(-2.25));
        assert_eq!(r.get::<_, String>("name"), "it's");
        assert_eq!(r.get::<_, Option<bool>>("ok"), Some(false));
        assert_eq!(
            r.get::<_, NaiveDateTime>("ts"),
            naive("2024-06-01 12:30:00.5")
        );
        assert_eq!(
            r.get::<_, DateTime<Utc>>("tstz"),
            naive("2024-06-01 12:30:00.5").and_utc()
        );
        assert_eq!(r.get::<_, i32>("small"), 20);
        assert_eq!(r.get::<_, NaiveDate>("d"), date("2024-06-01"));
        assert_eq!(r.get::<_, Num>("amount"), Num("-0.50".to_owned()));
        assert_eq!(r.get::<_, Num>("big"), Num("0".to_owned()));
        let r = &rows[1];
        assert_eq!(r.get::<_, Option<f64>>("score"), None);
        assert_eq!(r.get::<_, Option<bool>>("ok"), None);
        assert_eq!(r.get::<_, Option<Num>>("amount"), None);
        assert_eq!(
            r.get::<_, NaiveDateTime>("ts"),
            naive("2024-12-31 23:59:59.999999")
        );

        // Parameters of every common type, compared with the columns they meet.
        let ids = |rows: Vec<tokio_postgres::Row>| -> Vec<i64> {
            rows.iter().map(|r| r.get::<_, i64>(0)).collect()
        };
        let q = |sql: &'static str| sql;
        for (sql, expected) in [
            (q("SELECT id FROM t WHERE name = $1 ORDER BY id"), vec![2]),
            (
                q("SELECT id FROM t WHERE name <> $1 ORDER BY id"),
                vec![1, 3],
            ),
        ] {
            assert_eq!(ids(client.query(sql, &[&"it's"]).await.unwrap()), expected);
        }
        let by_name = "SELECT id FROM t WHERE name = $1";
        assert_eq!(
            ids(client.query(by_name, &[&"back\\slash"]).await.unwrap()),
            [3]
        );
        let injection = "x' OR '1'='1";
        assert!(client
            .query(by_name, &[&injection])
            .await
            .unwrap()
            .is_empty());
        let injection = "\\' OR 1=1 --";
        assert!(client
            .query(by_name, &[&injection])
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            ids(client
                .query("SELECT id FROM t WHERE ok = $1", &[&true])
                .await
                .unwrap()),
            [1]
        );
        assert_eq!(
            ids(client
                .query("SELECT id FROM t WHERE score > $1 ORDER BY id", &[&0.0f64])
                .await
                .unwrap()),
            [1]
        );
        assert_eq!(
            ids(client
                .query("SELECT id FROM t WHERE small = $1", &[&30i32])
                .await
                .unwrap()),
            [3]
        );
        assert_eq!(
            ids(client
                .query(
                    "SELECT id FROM t WHERE ts >= $1 ORDER BY id",
                    &[&naive("2024-06-01 12:30:00.5")]
                )
                .await
                .unwrap()),
            [2, 3]
        );
        assert_eq!(
            ids(client
                .query(
                    "SELECT id FROM t WHERE tstz > $1 ORDER BY id",
                    &[&naive("2024-06-01 12:30:00.5").and_utc()]
                )
                .await
                .unwrap()),
            [3]
        );
        assert_eq!(
            ids(client
                .query("SELECT id FROM t WHERE d = $1", &[&date("2024-12-31")])
                .await
                .unwrap()),
            [3]
        );
        // A NULL parameter matches nothing, like SQL's NULL.
        assert!(client
            .query(by_name, &[&None::<&str>])
            .await
            .unwrap()
            .is_empty());

        // Prepared once, run twice; `$n` in a string or comment is not a parameter.
        let stmt = client
            .prepare("SELECT '$1' AS lit, id /* $2 */ FROM t WHERE id = $1")
            .await
            .unwrap();
        assert_eq!(stmt.params(), &[PgType::INT8]);
        assert_eq!(stmt.columns()[0].type_(), &PgType::TEXT);
        for id in [1i64, 3] {
            let row = client.query_one(&stmt, &[&id]).await.unwrap();
            assert_eq!(row.get::<_, String>("lit"), "$1");
            assert_eq!(row.get::<_, i64>("id"), id);
        }
        // Types the client declares are kept.
        let rows = client
            .query_typed(
                "SELECT id FROM t WHERE id < $1 ORDER BY id",
                &[(&"3", PgType::TEXT)],
            )
            .await;
        // DataFusion compares an int column with a string literal by casting it.
        assert_eq!(ids(rows.unwrap()), [1, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simple_query_and_session_statements() {
        let (port, _stop) = start(true).await;
        let client = connect(port, PASSWORD).await.unwrap();

        let rows = simple_rows(
            &client
                .simple_query(
                    "SELECT id, score, name, ok, ts, tstz, d, amount, big FROM t ORDER BY id",
                )
                .await
                .unwrap(),
        );
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            rows[0],
            vec![
                some("1"),
                some("1.5"),
                some("plain"),
                some("t"),
                some("2024-01-01 00:00:00"),
                some("2024-01-01 00:00:00+00"),
                some("2024-01-01"),
                some("123.45"),
                some("18446744073709551615"),
            ]
        );
        assert_eq!(rows[1][4], some("2024-06-01 12:30:00.5"));
        assert_eq!(rows[2][1], None);
        assert_eq!(rows[2][2], some("back\\slash"));

        // What drivers and dashboards send around their queries.
        for setup in [
            "SET application_name = 'grafana'",
            "SET TIME ZONE 'UTC'",
            "set extra_float_digits = 3",
            ";",
            "-- ping",
            "/* nothing */ ;;",
            "BEGIN",
            "COMMIT",
            "DISCARD ALL",
            "RESET ALL",
        ] {
            client
                .simple_query(setup)
                .await
                .unwrap_or_else(|e| panic!("{setup}: {e}"));
        }
        client.batch_execute("SET a = 1; SET b = 2").await.unwrap();

        let one = |messages: Vec<SimpleQueryMessage>| simple_rows(&messages)[0][0].clone();
        assert_eq!(
            one(client.simple_query("SHOW server_version").await.unwrap()),
            some(SERVER_VERSION)
        );
        assert_eq!(
            one(client.simple_query("show TimeZone").await.unwrap()),
            some(TIME_ZONE)
        );
        assert_eq!(
            one(client
                .simple_query("SHOW transaction isolation level")
                .await
                .unwrap()),
            some("read committed")
        );
        assert!(one(client.simple_query("SELECT version()").await.unwrap())
            .unwrap()
            .starts_with("PostgreSQL 16.6"));
        assert_eq!(
            one(client
                .simple_query("select current_setting('server_version_num') as v")
                .await
                .unwrap()),
            some(SERVER_VERSION_NUM)
        );
        // Grafana's version probe: current_setting is resolved, the rest runs in DataFusion.
        assert_eq!(
            one(client
                .simple_query("SELECT current_setting('server_version_num')::int/100 as version")
                .await
                .unwrap()),
            some("1600")
        );
        // Several statements in one string run in order.
        let messages = client
            .simple_query("SET x = 1; SELECT 1 AS a; SELECT 'two' AS b")
            .await
            .unwrap();
        assert_eq!(
            simple_rows(&messages),
            vec![vec![some("1")], vec![some("two")]]
        );

        // The same statements through the extended protocol.
        for setup in ["SET search_path = public", "BEGIN", "ROLLBACK"] {
            client
                .execute(setup, &[])
                .await
                .unwrap_or_else(|e| panic!("{setup}: {e}"));
        }
        let row = client.query_one("SHOW server_version", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), SERVER_VERSION);
        let row = client.query_one("SELECT version()", &[]).await.unwrap();
        assert!(row.get::<_, String>("version").starts_with("PostgreSQL"));
        assert!(client.query(";", &[]).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_password_is_refused_with_28p01() {
        let (port, _stop) = start(true).await;
        let e = connect(port, "wrong").await.expect_err("refused");
        assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
        // The endpoint stays up for the next client.
        let client = connect(port, PASSWORD).await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backend_errors_keep_their_sqlstate() {
        let (port, _stop) = start(true).await;
        let client = connect(port, PASSWORD).await.unwrap();

        let e = client
            .simple_query("SELECT * FROM secret_table")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
        let e = client
            .query("SELECT * FROM secret_table WHERE a = $1", &[&1i64])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
        let e = client.query("SELEC 1", &[]).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR), "{e}");
        let e = client
            .simple_query("SELECT * FROM missing")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_TABLE), "{e}");
        let e = client.query("SELECT 1; SELECT 2", &[]).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR), "{e}");
        let e = client
            .simple_query("SELECT current_setting('no_such_setting')")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_OBJECT), "{e}");

        let e = client
            .query("SELECT $99999999999999999999", &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_PARAMETER), "{e}");

        // An error stops the rest of a simple query string.
        let e = client
            .simple_query("SELECT * FROM secret_table; SELECT 1")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");

        // The connection is still good.
        let row = client
            .query_one("SELECT $1::BIGINT + 1 AS n", &[&41i64])
            .await;
        assert_eq!(row.unwrap().get::<_, i64>("n"), 42);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn default_describe_probes_the_backend() {
        let (port, _stop) = start(false).await;
        let client = connect(port, PASSWORD).await.unwrap();

        // Parameters are text unless the client says otherwise.
        let rows = client
            .query("SELECT id, name FROM t WHERE name = $1", &[&"plain"])
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, i64>("id"), 1);
        let stmt = client
            .prepare_typed(
                "SELECT id, ts FROM t WHERE id >= $1 ORDER BY id",
                &[PgType::INT8],
            )
            .await
            .unwrap();
        let rows = client.query(&stmt, &[&2i64]).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].get::<_, NaiveDateTime>("ts"),
            naive("2024-06-01 12:30:00.5")
        );
        let e = client
            .query("SELECT $99999999999999999999", &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_PARAMETER), "{e}");
        // Two columns of one name cannot be wrapped in a subquery: the probe runs in full.
        let rows = client
            .query("SELECT a.id, b.id FROM t a JOIN t b ON a.id = b.id", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_client_does_not_disturb_others() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (port, _stop) = start(true).await;
        let good = connect(port, PASSWORD).await.unwrap();

        // One client sends garbage, another connects and says nothing.
        let mut garbage = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        garbage
            .write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
            .await
            .unwrap();
        let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read(&mut buf)).await;

        let row = good
            .query_one("SELECT count(*) AS n FROM t", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>("n"), 3);
        let other = connect(port, PASSWORD).await.unwrap();
        other.simple_query("SELECT 1").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_request_stops_the_statement() {
        let (port, _stop) = start(true).await;
        let client = connect(port, PASSWORD).await.unwrap();
        let token = client.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        let e = tokio::time::timeout(
            Duration::from_secs(20),
            client.simple_query("SELECT 1 AS pg_sleep"),
        )
        .await
        .expect("cancelled before the timeout")
        .unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
        canceller.await.unwrap().unwrap();
        client.simple_query("SELECT 1").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_stops_the_endpoint() {
        let (port, stop) = start(true).await;
        let client = connect(port, PASSWORD).await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !client.is_closed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("open connections are closed on shutdown");
        assert!(connect(port, PASSWORD).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_reports_an_address_in_use() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = serve(addr, Arc::new(fake(true)), None, async {})
            .await
            .unwrap_err();
        assert!(matches!(e, PgWireError::Bind { addr: a, .. } if a == addr));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn psql_connects_over_tls() {
        let psql = Path::new("/usr/lib/postgresql/15/bin/psql");
        if !psql.exists() || !Path::new("/usr/bin/openssl").exists() {
            eprintln!("skipping: psql or openssl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = tokio::process::Command::new("/usr/bin/openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .await
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let tls = tls_acceptor(&cert, &key).unwrap();
        assert!(matches!(tls_acceptor(&key, &key), Err(PgWireError::Tls(_))));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve_listener(
            listener,
            Arc::new(fake(true)),
            Some(tls),
            async move {
                let _ = stopped.await;
            },
        ));
        // sslmode=require fails unless the server speaks TLS.
        let output = tokio::process::Command::new(psql)
            .env_clear()
            .env("PGPASSWORD", PASSWORD)
            .env("PGSSLMODE", "require")
            .env("PGCONNECT_TIMEOUT", "10")
            .args([
                "-X",
                "-w",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args([
                "-U",
                USER,
                "-d",
                "primespark",
                "-c",
                "SELECT count(*) FROM t",
            ])
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), output)
            .await
            .unwrap()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "3");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn psql_connects_and_a_wrong_password_fails() {
        let psql = Path::new("/usr/lib/postgresql/15/bin/psql");
        if !psql.exists() {
            eprintln!("skipping: {} is not installed", psql.display());
            return;
        }
        let (port, _stop) = start(true).await;
        let run = |password: &'static str, sql: &'static str| {
            let port = port.to_string();
            async move {
                let output = tokio::process::Command::new(psql)
                    .env_clear()
                    .env("PGPASSWORD", password)
                    .env("PGCONNECT_TIMEOUT", "10")
                    .args(["-X", "-w", "-A", "-t", "-h", "127.0.0.1", "-p", &port])
                    .args(["-U", USER, "-d", "primespark", "-c", sql])
                    .output();
                tokio::time::timeout(Duration::from_secs(30), output)
                    .await
                    .expect("psql finished")
                    .expect("psql ran")
            }
        };
        let ok = run(PASSWORD, "SELECT 1").await;
        let stderr = String::from_utf8_lossy(&ok.stderr);
        assert!(ok.status.success(), "psql failed: {stderr}");
        assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "1");

        let ok = run(
            PASSWORD,
            "SET x = 1; SELECT name, amount FROM t ORDER BY id",
        )
        .await;
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&ok.stdout).trim(),
            "SET\nplain|123.45\nit's|-0.50\nback\\slash|"
        );

        let refused = run("wrong", "SELECT 1").await;
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("password authentication failed"),
            "psql said: {stderr}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Pieces

    fn session() -> Session {
        Session {
            user: USER.to_owned(),
            application_name: "psql".to_owned(),
        }
    }

    #[test]
    fn statements_split_outside_strings_and_comments() {
        assert_eq!(
            split_statements("SELECT ';' ; SELECT \"a;b\" -- x;y\n; /* ; /* ; */ */ ;$$;$$"),
            vec!["SELECT ';'", "SELECT \"a;b\" -- x;y", "$$;$$"]
        );
        assert_eq!(
            split_statements(" ;; -- only a comment"),
            Vec::<&str>::new()
        );
        assert_eq!(
            split_statements("/* größe; */ SELECT 'é;' AS \"ü\"; SELECT E'\\é;'"),
            vec!["/* größe; */ SELECT 'é;' AS \"ü\"", "SELECT E'\\é;'"]
        );
        assert_eq!(
            split_statements("SELECT E'\\';' ; x"),
            vec!["SELECT E'\\';'", "x"]
        );
        assert_eq!(
            split_statements("SELECT $tag$ ; $tag$"),
            vec!["SELECT $tag$ ; $tag$"]
        );
        assert_eq!(
            split_statements("SELECT 'unterminated ; x"),
            vec!["SELECT 'unterminated ; x"]
        );
    }

    #[test]
    fn session_statements_are_answered_locally() {
        let s = session();
        let local = |sql: &str| match classify(sql, &s).unwrap() {
            Classified::Local(l) => l,
            other => panic!("{sql}: {other:?}"),
        };
        assert_eq!(local("SET x TO 1"), Local::Command("SET".to_owned()));
        assert_eq!(
            local("begin isolation level serializable"),
            Local::Begin("BEGIN".to_owned())
        );
        assert_eq!(
            local("ROLLBACK TO SAVEPOINT a"),
            Local::Command("ROLLBACK".to_owned())
        );
        assert_eq!(
            local("SHOW application_name"),
            Local::Value {
                column: "application_name".to_owned(),
                value: "psql".to_owned()
            }
        );
        assert_eq!(
            local("SELECT current_setting('TimeZone') tz"),
            Local::Value {
                column: "tz".to_owned(),
                value: TIME_ZONE.to_owned()
            }
        );
        assert_eq!(classify("-- ping", &s).unwrap(), Classified::Empty);
        let Classified::Backend { params, .. } = classify(
            "SELECT $1::BIGINT, CAST($3 AS timestamp with time zone), $2, $4::Text",
            &s,
        )
        .unwrap() else {
            panic!("not for the backend")
        };
        assert_eq!(
            params,
            [
                Some(Type::INT8),
                None,
                Some(Type::TIMESTAMPTZ),
                Some(Type::TEXT)
            ]
        );
        assert_eq!(
            classify("SHOW datafusion.execution.batch_size", &s).unwrap(),
            Classified::Backend {
                sql: "SHOW datafusion.execution.batch_size".to_owned(),
                tag: "SHOW".to_owned(),
                params: vec![]
            }
        );
        assert_eq!(
            classify(
                "WITH x AS (SELECT pg_catalog.current_setting('server_version')) SELECT $2, '$9'",
                &s
            )
            .unwrap(),
            Classified::Backend {
                sql: "WITH x AS (SELECT '16.6') SELECT $2, '$9'".to_owned(),
                tag: "SELECT".to_owned(),
                params: vec![None, None]
            }
        );
    }

    #[test]
    fn parameters_become_literals_that_cannot_escape() {
        let text = |v: &str| Some(bytes::Bytes::copy_from_slice(v.as_bytes()));
        let bound =
            |sql: &str, ty: Type, v: &str| bind(sql, &[ty], &Format::UnifiedText, &[text(v)]);
        assert_eq!(
            bound("SELECT $1", Type::TEXT, "it's").unwrap(),
            "SELECT  'it''s' "
        );
        assert_eq!(
            bound("SELECT $1", Type::TEXT, "a\\'b").unwrap(),
            "SELECT  ('a' || chr(92) || '''b') "
        );
        assert_eq!(bound("x-$1", Type::INT8, "-5").unwrap(), "x- (-5) ");
        assert_eq!(
            bound("SELECT $1", Type::INT8, "1; DROP TABLE t")
                .unwrap_err()
                .sqlstate,
            "22P02"
        );
        assert_eq!(
            bound("SELECT $1", Type::FLOAT8, "NaN").unwrap(),
            "SELECT  CAST('NaN' AS DOUBLE) "
        );
        assert_eq!(
            bound("SELECT $1", Type::NUMERIC, "1e3 OR 1=1")
                .unwrap_err()
                .sqlstate,
            "22P02"
        );
        assert_eq!(
            bound("SELECT $1", Type::TIMESTAMP, "2024-01-01 00:00:00').x").unwrap(),
            "SELECT  CAST('2024-01-01 00:00:00'').x' AS TIMESTAMP) "
        );
        assert_eq!(
            bound("SELECT $1", Type::BYTEA, "\\xdeadBEEF").unwrap(),
            "SELECT  X'deadbeef' "
        );
        assert_eq!(
            bound("SELECT $1", Type::TEXT, "a\0b").unwrap_err().sqlstate,
            "22021"
        );
        assert_eq!(
            bind(
                "SELECT $2",
                &[Type::TEXT],
                &Format::UnifiedText,
                &[text("a")]
            )
            .unwrap_err()
            .sqlstate,
            "42P02"
        );
        assert_eq!(
            bind("SELECT $1", &[Type::TEXT], &Format::UnifiedText, &[])
                .unwrap_err()
                .sqlstate,
            "08P01"
        );
        // Binary parameters decode by type.
        let mut raw = BytesMut::new();
        naive("2024-02-29 01:02:03.25")
            .to_sql(&Type::TIMESTAMP, &mut raw)
            .unwrap();
        assert_eq!(
            bind(
                "SELECT $1",
                &[Type::TIMESTAMP],
                &Format::UnifiedBinary,
                &[Some(raw.freeze())]
            )
            .unwrap(),
            "SELECT  CAST('2024-02-29T01:02:03.250' AS TIMESTAMP) "
        );
    }

    #[test]
    fn numeric_binary_round_trips() {
        for text in [
            "0",
            "0.00",
            "123.45",
            "-0.50",
            "10000",
            "0.0001",
            "0.00001",
            "-98765432109876.54321",
            "18446744073709551615",
            "1.10",
        ] {
            let mut out = BytesMut::new();
            numeric_to_binary(text, &mut out).unwrap();
            let back = numeric_from_binary(&out).unwrap();
            let expected = text.trim_start_matches('-');
            let expected = if text.starts_with('-')
                && expected.bytes().any(|b| b.is_ascii_digit() && b != b'0')
            {
                format!("-{expected}")
            } else {
                expected.to_owned()
            };
            assert_eq!(back, expected, "{text}");
        }
        // 123.45 as PostgreSQL sends it: 2 digits, weight 0, positive, scale 2: 123, 4500.
        let mut out = BytesMut::new();
        numeric_to_binary("123.45", &mut out).unwrap();
        assert_eq!(&out[..], &[0, 2, 0, 0, 0, 0, 0, 2, 0, 123, 0x11, 0x94]);
        assert!(numeric_to_binary("1e5", &mut BytesMut::new()).is_err());
    }

    #[test]
    fn arrow_types_map_to_postgres_types() {
        assert_eq!(pg_type_of(&DataType::UInt8), Type::INT2);
        assert_eq!(pg_type_of(&DataType::UInt32), Type::INT8);
        assert_eq!(pg_type_of(&DataType::Utf8View), Type::TEXT);
        assert_eq!(
            pg_type_of(&DataType::Timestamp(
                TimeUnit::Second,
                Some("Europe/Berlin".into())
            )),
            Type::TIMESTAMPTZ
        );
        assert_eq!(
            pg_type_of(&DataType::Timestamp(TimeUnit::Nanosecond, None)),
            Type::TIMESTAMP
        );
        assert_eq!(pg_type_of(&DataType::Decimal128(38, 10)), Type::NUMERIC);
        assert_eq!(pg_type_of(&DataType::Null), Type::TEXT);
        assert_eq!(
            pg_type_of(&DataType::Dictionary(
                Box::new(DataType::Int32),
                Box::new(DataType::Utf8)
            )),
            Type::TEXT
        );
        assert_eq!(
            pg_type_of(&DataType::Interval(
                datafusion::arrow::datatypes::IntervalUnit::MonthDayNano
            )),
            Type::TEXT
        );
    }
}
