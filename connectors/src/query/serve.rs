//! The HTTP endpoint's accept loop, hardened against clients that hold connections: a cap on
//! connections in all and per client address (beyond it a connection is closed at once and
//! counted), a deadline for a request's headers that also bounds how long a kept-alive
//! connection may sit idle (hyper starts it whenever it waits for a request), TLS handshakes
//! in the connection's own task with a deadline, a deadline for each whole request (so a body
//! trickled in holds nothing for long), and the client's address on every request
//! (`ConnectInfo`) for the failed-authentication limit.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::tls::{TlsAcceptor, HANDSHAKE_TIMEOUT};
use super::QueryError;
use crate::metrics::{HttpConnectionRefused, TlsHandshakeFailed};

/// How the HTTP endpoint admits and times its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// A request's headers must arrive within this; a kept-alive connection with no new
    /// request for this long is closed.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections one client address may hold at once.
    pub max_connections_per_address: usize,
    /// A request must be answered within this, its body's arrival included (a client that
    /// trickles its body is cut off here): the query timeout plus the header deadline.
    pub request_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_connections_per_address: 32,
            request_timeout: Duration::from_secs(40),
        }
    }
}

/// Open connections, in all and per address; a [`Slot`] gives its place back when dropped.
struct Admission {
    max: usize,
    per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let Ok(mut open) = self.open.lock() else {
            return Err("poisoned");
        };
        let (total, per) = &mut *open;
        if *total >= self.max {
            return Err("too_many_connections");
        }
        let mine = per.entry(ip).or_insert(0);
        if *mine >= self.per_address {
            return Err("too_many_from_address");
        }
        *mine += 1;
        *total += 1;
        Ok(Slot {
            admission: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.admission.open.lock() {
            let (total, per) = &mut *open;
            *total = total.saturating_sub(1);
            if let Some(n) = per.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per.remove(&self.ip);
                }
            }
        }
    }
}

/// Serves `router` on `addr` until `shutdown` resolves; over TLS with `tls` (see
/// [`super::tls::http_acceptor`]), plain HTTP otherwise. On shutdown it stops accepting and
/// lets requests in flight finish (at most 30 s).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    tls: Option<TlsAcceptor>,
    options: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), QueryError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| QueryError::Serve { addr, source })?;
    serve_listener(listener, router, tls, options, shutdown).await
}

/// [`serve`] on a socket that is already listening.
pub async fn serve_listener(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    options: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), QueryError> {
    let local = listener.local_addr().ok();
    tracing::info!(
        addr = ?local,
        tls = tls.is_some(),
        max_connections = options.max_connections,
        header_timeout = ?options.header_timeout,
        "sql endpoint listening"
    );
    let admission = Arc::new(Admission {
        max: options.max_connections.max(1),
        per_address: options.max_connections_per_address.max(1),
        open: Mutex::new((0, HashMap::new())),
    });
    let limit = options.request_timeout;
    let router = router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(limit, next.run(request)).await {
                Ok(response) => response,
                Err(_) => {
                    use axum::response::IntoResponse;
                    (
                        axum::http::StatusCode::REQUEST_TIMEOUT,
                        "the request took too long to arrive and be answered\n",
                    )
                        .into_response()
                }
            }
        },
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_buf_size(64 * 1024);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(reason) => {
                HttpConnectionRefused {
                    peer: peer.ip(),
                    reason,
                }
                .emit();
                drop(tcp);
                continue;
            }
        };
        let app = router.clone().layer(Extension(ConnectInfo(peer)));
        let http = http.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(&http, watcher, tcp, app, peer).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection(&http, watcher, stream, app, peer).await,
                        Ok(Err(e)) => TlsHandshakeFailed {
                            endpoint: "http",
                            peer,
                            error: &e,
                        }
                        .emit(),
                        Err(_) => TlsHandshakeFailed {
                            endpoint: "http",
                            peer,
                            error: &"timed out",
                        }
                        .emit(),
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(addr = ?local, "connections still open 30 s after shutdown; dropping them");
    }
    tracing::info!(addr = ?local, "sql endpoint stopped");
    Ok(())
}

/// One connection's requests, until the client closes, a deadline passes or shutdown.
async fn connection<S>(
    http: &hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
    app: Router,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served =
        watcher.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app)));
    if let Err(e) = served.await {
        // Header deadlines, resets and the like: the client's doing, worth a debug line.
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_caps_in_all_and_per_address_and_gives_back() {
        let admission = Arc::new(Admission {
            max: 3,
            per_address: 2,
            open: Mutex::new((0, HashMap::new())),
        });
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let a1 = admission.admit(a).unwrap();
        let _a2 = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).err(), Some("too_many_from_address"));
        let _b1 = admission.admit(b).unwrap();
        assert_eq!(admission.admit(c).err(), Some("too_many_connections"));
        drop(a1);
        let _c1 = admission.admit(c).unwrap();
        assert_eq!(admission.admit(a).err(), Some("too_many_connections"));
    }
}
