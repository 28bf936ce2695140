//! The PostgreSQL wire-protocol endpoint of the query service: psql, Grafana's PostgreSQL data
//! source (pgx) and tokio-postgres connect here and run the service's DataFusion SQL.
//!
//! This module speaks the protocol and nothing else. What a user may do, limits and audit live
//! in the query service, which plugs in through [`SqlBackend`]. [`serve`] accepts connections and
//! runs each on its own tokio task, so a broken or slow client affects nobody else.
//!
//! - **Authentication**: SCRAM-SHA-256 against the verifier [`SqlBackend::credential`] gives
//!   (PostgreSQL's stored form, [`ScramVerifier`]): the password never crosses the wire and the
//!   server does no slow hashing, so a login flood costs it a few HMACs per attempt. An unknown
//!   user runs the same exchange against a decoy and fails with the same `FATAL 28P01`. With
//!   [`WireOptions::require_tls`] a client without TLS is refused (`28000`) before any
//!   authentication, as PostgreSQL's `hostssl` does; failed logins are limited per peer
//!   address; connections beyond [`WireOptions::max_connections`] are refused with `53300`.
//!   Pass a TLS acceptor to [`serve`] ([`tls_acceptor`] builds one from PEM files).
//! - **Simple query** (psql, pgx's `Ping`): the string may hold several statements; they run in
//!   order and the first error skips the rest, as in PostgreSQL.
//! - **Extended query** (tokio-postgres, pgx, JDBC): Parse plans the statement with
//!   [`SqlBackend::describe`], which gives the result columns (for Describe) and the parameter
//!   types (for ParameterDescription). A parameter's type is the one the client declares, else
//!   an explicit cast's (`$1::bigint`, `CAST($1 AS date)`), else the planner's, else text.
//!   Execute decodes each bound parameter from its text or binary format into a typed value
//!   (`params.rs`) and hands the statement, unchanged with its `$n`, and the values to
//!   [`SqlBackend::execute`], which binds them into the plan (`LogicalPlan::with_param_values`):
//!   a parameter is never SQL text, whatever it holds. The rows are encoded with the described
//!   column types in the text or binary format each client asks for. Portals with a row limit
//!   are suspended and resumed by pgwire.
//! - **Answered here, never sent to the backend**, so a session setup can never be refused:
//!   `SET`, `RESET`, `DISCARD`, `DEALLOCATE`, `SAVEPOINT`, `RELEASE` (accepted and ignored),
//!   except `SET`/`RESET` of the backend's own settings (`datafusion.*`): the backend checks
//!   them ([`SqlBackend::check_setting`]), the connection keeps them, and every statement it
//!   runs afterwards runs under them ([`SqlBackend::execute_in`]), no other connection's;
//!   `BEGIN`/`COMMIT`/`ROLLBACK` (the service is read-only, so a transaction is bookkeeping);
//!   `SHOW` of a connection setting (`server_version`, `TimeZone`, ...), `SELECT version()`,
//!   `SELECT current_setting('...')`. Inside any other statement, `current_setting('...')` of
//!   a server setting (a constant of this server) is replaced by its value as a literal, and of
//!   a connection setting the client chose (`application_name`, `session_authorization`) by a
//!   placeholder bound to its value after the client's parameters. Empty and
//!   comment-only statements (`;`, `-- ping`) answer EmptyQueryResponse. Any other `SHOW` goes to
//!   the backend (DataFusion knows `SHOW ALL` and its own options).
//! - **Cancel requests** stop the running statement with `57014`.
//!
//! Arrow types map to PostgreSQL types as [`pg_type_of`] says; results always use the
//! connection's time zone `Etc/UTC`.
//!
//! The files, one job each:
//! - `backend.rs`: what the endpoint needs from the query service ([`SqlBackend`]);
//! - `server.rs`: the accept loop, TLS and the pgwire handlers wired together;
//! - `connection.rs`: one connection: TLS negotiation, the frame check, pgwire's message loop;
//! - `frame.rs`: every frontend message framed and its fields bounds-checked before pgwire
//!   decodes it (malformed ones end the connection with `08P01`);
//! - `auth.rs`: the startup handshake: TLS requirement, SCRAM, the failed-login limit;
//! - `credential.rs`: SCRAM verifiers in PostgreSQL's stored form;
//! - `handler.rs`: the simple and extended query protocols;
//! - `session.rs`: the statements answered here (`SET`, `SHOW`, `BEGIN`, ...) and the settings;
//! - `lexer.rs`: the query string's tokens (DataFusion's sqlparser tokenizer): statements, `$n`;
//! - `params.rs`: bound parameters decoded into typed values, by type and format;
//! - `encode.rs` and `numeric.rs`: Arrow columns as PostgreSQL values.

mod auth;
mod backend;
mod connection;
mod credential;
mod encode;
mod frame;
mod handler;
mod lexer;
mod numeric;
mod params;
mod server;
mod session;
#[cfg(test)]
mod tests;

pub use backend::{BackendError, Description, SqlBackend};
pub use credential::{NotAVerifier, ScramVerifier, DEFAULT_ITERATIONS};
pub use encode::pg_type_of;
pub use server::{serve, serve_listener, tls_acceptor, PgWireError};

/// The TLS acceptor [`serve`] takes: tokio-rustls, re-exported with its `rustls`.
pub use ::pgwire::tokio::tokio_rustls;
pub use ::pgwire::tokio::TlsAcceptor;

/// How an endpoint admits clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireOptions {
    /// Refuse clients that do not start TLS (needs a TLS acceptor).
    pub require_tls: bool,
    /// Connections served at once; more are refused with `53300`.
    pub max_connections: usize,
    /// Failed logins a peer address may have per minute; beyond, it is refused before
    /// authentication until the budget refills.
    pub login_failures_per_minute: u32,
    /// The largest message an authenticated client may send (before authentication, 10,000
    /// bytes); a larger one ends the connection with `08P01` before its body is read.
    pub max_message_bytes: usize,
}

impl Default for WireOptions {
    fn default() -> Self {
        Self {
            require_tls: false,
            max_connections: 100,
            login_failures_per_minute: 10,
            max_message_bytes: 1 << 20,
        }
    }
}

/// The PostgreSQL version the endpoint reports; clients pick SQL dialect features by it.
pub const SERVER_VERSION: &str = "16.6";
/// [`SERVER_VERSION`] as `server_version_num`.
pub(crate) const SERVER_VERSION_NUM: &str = "160006";
/// PostgreSQL's limit on parameters; also bounds what a `$99999999` can make us allocate.
pub(crate) const MAX_PARAMS: usize = 65_535;
/// The session time zone: timestamps with a time zone are shown in UTC.
pub(crate) const TIME_ZONE: &str = "Etc/UTC";
/// pgwire's text encoding of dates follows this style, so it is what we report.
pub(crate) const DATE_STYLE: &str = "ISO, YMD";
