//! The two query protocols: simple (a string of statements) and extended (Parse, Bind,
//! Execute), each statement answered here or run by the backend with its parameters bound as
//! values.

use std::fmt::Debug;
use std::sync::Arc;

use ::pgwire::api::portal::{Format, Portal};
use ::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use ::pgwire::api::results::{FieldInfo, Response, Tag};
use ::pgwire::api::stmt::QueryParser;
use ::pgwire::api::store::PortalStore;
use ::pgwire::api::{ClientInfo, ClientPortalStore, Type};
use ::pgwire::error::{ErrorInfo, PgWireError as ProtocolError, PgWireResult, SEVERITY_ERROR};
use ::pgwire::messages::PgWireBackendMessage;
use async_trait::async_trait;
use datafusion::common::ScalarValue;
use futures::Sink;

use super::backend::Description;
use super::encode::{fields, pg_type_of, rows_response};
use super::lexer::split_statements;
use super::params::bind;
use super::session::{bind_connection_settings, classify, Classified, Local, Session};
use super::{BackendError, SqlBackend};

/// A statement parsed by the extended protocol.
#[derive(Debug, Clone)]
pub(super) enum Prepared {
    Local(Local),
    Backend(Arc<BackendStatement>),
}

/// A statement for the backend, described.
#[derive(Debug)]
pub(super) struct BackendStatement {
    /// The SQL with the client's `$n` placeholders still in place, server settings resolved
    /// and the connection's settings as placeholders after the client's.
    sql: String,
    /// The command tag (`SELECT`, `SHOW`, ...).
    tag: String,
    /// The type of each of the client's parameters `$1..$n`.
    params: Vec<Type>,
    /// The values of the placeholders after the client's: the connection's settings.
    settings: Vec<ScalarValue>,
    /// Name and type of each result column.
    columns: Vec<(String, Type)>,
}

/// The extended protocol's statement parser: classifies and describes at Parse time, so a bad
/// statement fails at Parse as it does in PostgreSQL.
pub(super) struct Parser {
    pub(super) backend: Arc<dyn SqlBackend>,
}

impl Parser {
    /// Describes a statement for the backend. `casts`: the type an explicit cast gives each
    /// `$n`; `declared`: the types the client gave in its Parse message.
    async fn describe(
        &self,
        session: &Session,
        sql: &str,
        tag: String,
        casts: Vec<Option<Type>>,
        declared: &[Option<Type>],
    ) -> Result<BackendStatement, BackendError> {
        let client_params = casts.len().max(declared.len());
        let (sql, settings) = bind_connection_settings(sql, session, client_params)?;
        let description = self.backend.describe(&session.user, &sql).await?;
        // The plan also numbers the connection's settings; the client sees its own only.
        let count = if settings.is_empty() {
            client_params.max(description.parameters.len())
        } else {
            client_params
        };
        let params = (0..count)
            .map(|i| param_type(i, declared, &casts, &description))
            .collect();
        let columns = description
            .schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), pg_type_of(f.data_type())))
            .collect();
        Ok(BackendStatement {
            sql,
            tag,
            params,
            settings,
            columns,
        })
    }
}

/// Like PostgreSQL: the client's declared type, else an explicit cast (`$1::bigint`), else
/// what the plan infers, else text.
fn param_type(
    i: usize,
    declared: &[Option<Type>],
    casts: &[Option<Type>],
    description: &Description,
) -> Type {
    match declared.get(i) {
        Some(Some(t)) if *t != Type::UNKNOWN => t.clone(),
        _ => casts.get(i).cloned().flatten().unwrap_or_else(|| {
            description
                .parameters
                .get(i)
                .and_then(|t| t.as_ref())
                .map_or(Type::TEXT, pg_type_of)
        }),
    }
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
                let described = self
                    .describe(&session, &sql, tag, params, types)
                    .await
                    .map_err(|e| {
                        log_backend_error(&session.user, &e);
                        into_protocol(e)
                    })?;
                Ok(Some(Prepared::Backend(Arc::new(described))))
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
pub(super) struct QueryHandler {
    pub(super) backend: Arc<dyn SqlBackend>,
    pub(super) parser: Arc<Parser>,
}

impl QueryHandler {
    /// A `SET` or `RESET` of a backend setting, applied to this connection's metadata (what
    /// [`Session::of`] reads): the backend checks the name and value first. Other local
    /// statements change nothing.
    fn apply<C: ClientInfo>(&self, local: &Local, client: &mut C) -> Result<(), BackendError> {
        match local {
            Local::Set { name, value } => {
                let name = self.backend.check_setting(name, value)?;
                client.metadata_mut().insert(name, value.clone());
            }
            Local::Reset { name: Some(name) } => {
                client.metadata_mut().remove(name);
            }
            Local::Reset { name: None } => client
                .metadata_mut()
                .retain(|k, _| !k.starts_with(super::session::BACKEND_SETTINGS)),
            _ => {}
        }
        Ok(())
    }

    /// One statement of a simple query, for the backend: rows in text, typed by the result.
    async fn run_simple(
        &self,
        session: &Session,
        sql: &str,
        tag: &str,
    ) -> Result<Response, BackendError> {
        let (sql, settings) = bind_connection_settings(sql, session, 0)?;
        match self
            .backend
            .execute_in(&session.user, &sql, settings, &session.settings)
            .await
        {
            Ok((schema, batches)) => {
                let columns: Vec<_> = schema
                    .fields()
                    .iter()
                    .map(|f| (f.name().clone(), pg_type_of(f.data_type())))
                    .collect();
                rows_response(&columns, None, tag, &batches)
            }
            Err(e) => {
                log_backend_error(&session.user, &e);
                Err(e)
            }
        }
    }
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
        let mut session = Session::of(client);
        let mut responses = Vec::new();
        let statements = split_statements(query);
        if statements.is_empty() {
            responses.push(Response::EmptyQuery);
        }
        for statement in statements {
            let response = match classify(statement, &session) {
                Ok(Classified::Empty) => Ok(Response::EmptyQuery),
                Ok(Classified::Local(local)) => match self.apply(&local, client) {
                    Ok(()) => {
                        // The next statement of the string sees a setting just made.
                        session = Session::of(client);
                        local.respond(None)
                    }
                    Err(e) => Err(e),
                },
                Ok(Classified::Backend { sql, tag, .. }) => {
                    self.run_simple(&session, &sql, &tag).await
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
                self.apply(local, client).map_err(into_protocol)?;
                return local
                    .respond(Some(&portal.result_column_format))
                    .map_err(into_protocol);
            }
            Prepared::Backend(b) => b.clone(),
        };
        let session = Session::of(client);
        // The client's values, then the connection's settings: `$1..$n`, `$n+1..`.
        let mut values = bind(
            &statement.params,
            &portal.parameter_format,
            &portal.parameters,
        )
        .map_err(into_protocol)?;
        values.extend(statement.settings.iter().cloned());
        let (_, batches) = self
            .backend
            .execute_in(&session.user, &statement.sql, values, &session.settings)
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

fn error_info(sqlstate: &str, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(
        SEVERITY_ERROR.to_owned(),
        sqlstate.to_owned(),
        message.into(),
    )
}

pub(super) fn user_error(sqlstate: &str, message: impl Into<String>) -> ProtocolError {
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
