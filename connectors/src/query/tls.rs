//! TLS for both SQL endpoints (rustls with ring): the server configuration from PEM files.
//!
//! HTTP handshakes run in each connection's own task with a deadline (`serve.rs`), so a client
//! that connects and says nothing (or speaks plain HTTP to the TLS port) holds up neither the
//! accept loop nor anyone else; its failure is counted in
//! `primespark_tls_handshake_failures_total`. (The wire endpoint's handshakes are pgwire's.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::pgwire::tokio::tokio_rustls::rustls;
pub use ::pgwire::tokio::TlsAcceptor;

/// How long a client has to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
