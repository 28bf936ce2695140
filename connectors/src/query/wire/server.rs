//! The accept loop: one tokio task per connection, TLS when configured, and the pgwire
//! handlers of an endpoint wired together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ::pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use ::pgwire::api::auth::{DefaultServerParameterProvider, StartupHandler};
use ::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use ::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use ::pgwire::api::{ConnectionManager, PgWireServerHandlers};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::auth::{BackendAuth, Startup};
use super::handler::{Parser, QueryHandler};
use super::{SqlBackend, TlsAcceptor, DATE_STYLE, SERVER_VERSION, TIME_ZONE};

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
    Tls(#[from] crate::query::tls::TlsError),
}

/// A TLS acceptor for [`serve`] from PEM files: the certificate chain (leaf first) and its
/// private key (PKCS#8, PKCS#1 or SEC1), offering the `postgresql` ALPN protocol that
/// PostgreSQL 17 clients send (see [`crate::query::tls::acceptor`]).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, PgWireError> {
    Ok(crate::query::tls::acceptor(cert, key, &[b"postgresql"])?)
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
