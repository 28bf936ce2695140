//! The accept loop: one tokio task per connection, TLS when configured, and the pgwire
//! handlers of an endpoint wired together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ::pgwire::api::auth::{DefaultServerParameterProvider, StartupHandler};
use ::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use ::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use ::pgwire::api::{ConnectionManager, PgWireServerHandlers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::auth::Startup;
use super::connection::serve_connection;
use super::handler::{Parser, QueryHandler};
use super::{SqlBackend, TlsAcceptor, WireOptions, DATE_STYLE, SERVER_VERSION, TIME_ZONE};
use crate::metrics::WireLoginRefused;

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
    options: WireOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PgWireError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| PgWireError::Bind { addr, source })?;
    serve_listener(listener, backend, tls, options, shutdown).await
}

/// [`serve`] on a socket that is already listening (tests bind port 0 and read the port).
pub async fn serve_listener(
    listener: TcpListener,
    backend: Arc<dyn SqlBackend>,
    tls: Option<TlsAcceptor>,
    options: WireOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PgWireError> {
    let handlers = Arc::new(Handlers::new(backend, &options));
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    // Refusals are answered by a bounded number of tasks too; beyond, the socket just closes.
    let refusals = Arc::new(Semaphore::new(options.max_connections.clamp(1, 64)));
    let local = listener.local_addr().ok();
    tracing::info!(
        addr = ?local,
        tls = tls.is_some(),
        require_tls = options.require_tls,
        max_connections = options.max_connections,
        "postgres wire endpoint listening"
    );
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
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        WireLoginRefused { user: "", peer, reason: "too_many_connections" }.emit();
                        if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                            connections.spawn(async move {
                                let _refusal = refusal;
                                refuse_full(socket).await;
                            });
                        }
                        continue;
                    };
                    tracing::debug!(%peer, "wire connection accepted");
                    let handlers = handlers.clone();
                    let tls = tls.clone();
                    let max_message_bytes = options.max_message_bytes;
                    connections.spawn(async move {
                        let _slot = slot;
                        match serve_connection(socket, tls, handlers, max_message_bytes).await {
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

/// Answers a connection over the cap as PostgreSQL does ("sorry, too many clients already",
/// `53300`), after reading its first message so the client reads the answer rather than a
/// reset. Bounded in time and bytes: a refused client holds nothing for long.
async fn refuse_full(mut socket: TcpStream) {
    let read_first = async {
        let mut len = [0u8; 4];
        socket.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len).clamp(4, 10_000) as usize;
        let mut rest = vec![0u8; len - 4];
        socket.read_exact(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read_first)
        .await
        .is_err()
    {
        return;
    }
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "53300"),
        (b'M', "sorry, too many clients already"),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    message.extend_from_slice(&fields);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        socket.write_all(&message).await?;
        socket.shutdown().await
    })
    .await;
}

/// Everything one endpoint shares between its connections.
struct Handlers {
    startup: Arc<Startup>,
    queries: Arc<QueryHandler>,
    cancel: Arc<DefaultCancelHandler>,
}

impl Handlers {
    fn new(backend: Arc<dyn SqlBackend>, options: &WireOptions) -> Self {
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = SERVER_VERSION.to_owned();
        parameters.time_zone = TIME_ZONE.to_owned();
        parameters.date_style = DATE_STYLE.to_owned();
        parameters.is_superuser = false;
        parameters.default_transaction_read_only = true;
        let connections = Arc::new(ConnectionManager::new());
        Self {
            startup: Arc::new(Startup::new(
                backend.clone(),
                parameters,
                connections.clone(),
                options,
            )),
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
