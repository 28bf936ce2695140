//! The two query protocols: simple (a string of statements) and extended (Parse, Bind,
//! Execute), each statement answered here or run by the backend.

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
use futures::Sink;

use super::encode::{fields, pg_type_of, rows_response};
use super::lexer::split_statements;
use super::params::bind;
use super::session::{classify, Classified, Local, Session};
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
pub(super) struct Parser {
    pub(super) backend: Arc<dyn SqlBackend>,
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
pub(super) struct QueryHandler {
    pub(super) backend: Arc<dyn SqlBackend>,
    pub(super) parser: Arc<Parser>,
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
