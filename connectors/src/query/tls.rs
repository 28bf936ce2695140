//! TLS for both SQL endpoints (rustls with ring): the server configuration from PEM files, and
//! for HTTP a listener that hands axum connections whose handshake has finished.
//!
//! HTTP handshakes run in their own tasks with a deadline, at most [`MAX_HANDSHAKES`] at a
//! time, so a client that connects and says nothing (or speaks plain HTTP to the TLS port)
//! holds up neither the accept loop nor anyone else; its failure is counted in
//! `primespark_tls_handshake_failures_total`. (The wire endpoint's handshakes are pgwire's.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::pgwire::tokio::tokio_rustls::rustls;
use ::pgwire::tokio::tokio_rustls::server::TlsStream;
pub use ::pgwire::tokio::TlsAcceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::metrics::TlsHandshakeFailed;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them.
const READY_CONNECTIONS: usize = 64;
/// Handshakes in progress at once; further connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;

/// The certificate or key could not be read or do not make a TLS configuration.
#[derive(Debug, thiserror::Error)]
#[error("TLS certificate {cert} with key {key} is unusable")]
pub struct TlsError {
    /// The certificate chain file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    /// What was wrong.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// A TLS acceptor from PEM files: the certificate chain (leaf first) and its private key
/// (PKCS#8, PKCS#1 or SEC1), offering the ALPN protocols `alpn`. Uses ring, so it works
/// whatever crypto provider other crates install.
pub fn acceptor(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |source: Box<dyn std::error::Error + Send + Sync>| TlsError {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(e.into()))?;
    if chain.is_empty() {
        return Err(fail("no certificate in the file".into()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(e.into()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| fail(e.into()))?
    .with_no_client_auth()
    .with_single_cert(chain, private_key)
    .map_err(|e| fail(e.into()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The HTTP endpoint's acceptor (ALPN `http/1.1`: the router speaks HTTP/1).
pub fn http_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    acceptor(cert, key, &[b"http/1.1"])
}

/// An [`axum::serve::Listener`] of TLS connections.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Takes TCP connections from `listener` and hands out those whose handshake with
    /// `acceptor` succeeds.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_CONNECTIONS);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                // The semaphore is never closed; a failed acquire would end the loop anyway.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(slot);
                    match handshake {
                        Ok(Ok(tls)) => {
                            // The server is gone when this fails; the connection goes with it.
                            let _ = tx.send((tls, peer)).await;
                        }
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
                });
            }
        });
        Ok(Self {
            local,
            ready,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task only ends when aborted, which happens when this is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
