//! TLS to PostgreSQL (rustls with ring), with libpq's `sslmode` and `sslrootcert`.
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require` only, and refuses
//! `sslrootcert`. [`PgTarget::parse`] takes both off the connection string (URL or
//! `key=value` form), hands the rest to tokio-postgres unchanged, and builds a connector that
//! checks what the mode asks for, as libpq does:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | when the server offers it | only when `sslrootcert` is given (chain) |
//! | `require` | always | only when `sslrootcert` is given (chain) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and the host name |
//!
//! `sslrootcert` is a PEM file of trusted certificates, or `system` for the operating system's
//! store. The two verify modes need it: libpq falls back to `~/.postgresql/root.crt`, which a
//! service has no business reading, so here its absence is an error at start-up.
//! Client certificates: `sslcert` and `sslkey` (PEM), both or neither.
//!
//! Channel binding (SCRAM-SHA-256-PLUS) is not offered: the connector reports no binding, so
//! tokio-postgres's default `channel_binding=prefer` uses SCRAM-SHA-256.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::pgwire::tokio::tokio_rustls::{self, rustls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it (the default).
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, the server's chain checked against the roots.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, PgTlsError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(PgTlsError::Mode(other.to_owned())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// A connection string whose TLS settings cannot work.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    /// `sslmode` has a value libpq does not know either.
    #[error("sslmode={0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    Mode(String),
    /// A verify mode without roots.
    #[error("sslmode={0} needs sslrootcert=<PEM file of the certificate authority> (or sslrootcert=system) to check the server's certificate against")]
    NoRoots(&'static str),
    /// A PEM file could not be read or holds nothing usable.
    #[error("{key} {path}: {reason}")]
    File {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Only one of `sslcert` and `sslkey`.
    #[error("sslcert and sslkey go together: give both or neither")]
    HalfClientCert,
    /// A setting that needs TLS with `sslmode=disable`.
    #[error("{0} is set but sslmode=disable never uses TLS")]
    Disabled(&'static str),
    /// The rest of the string is not a tokio-postgres connection string.
    #[error("not a PostgreSQL connection string: {0}")]
    Config(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// A parsed connection string: tokio-postgres's configuration and the TLS connector for it.
#[derive(Clone)]
pub struct PgTarget {
    /// Everything but the TLS keys we handle, with `ssl_mode` set to what tokio-postgres
    /// should do (`verify-*` is `require` there).
    pub config: tokio_postgres::Config,
    /// The connector; pass it wherever tokio-postgres takes one (connect, cancel, pools).
    pub tls: PgTls,
}

// The config holds the password.
impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.config.get_hosts())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Parses a connection string (`postgres://…?sslmode=verify-full&sslrootcert=ca.pem` or
    /// `host=… sslmode=verify-full sslrootcert=ca.pem`), reading the certificate files.
    pub fn parse(conn: &str) -> Result<Self, PgTlsError> {
        let s = Settings::of(conn)?;
        let tls = PgTls::build(s.mode, s.root.as_deref(), s.client.as_ref())?;
        Ok(Self {
            config: s.config,
            tls,
        })
    }

    /// Everything [`PgTarget::parse`] checks but the files: for `check-config`, which must
    /// pass where the certificates are not mounted yet.
    pub fn check(conn: &str) -> Result<(), PgTlsError> {
        Settings::of(conn).map(|_| ())
    }

    /// Connects and drives the connection on the current tokio runtime.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %error_chain(&e), "postgres connection closed");
            }
        });
        Ok(client)
    }
}

/// A connection string's settings, checked for everything but the files.
struct Settings {
    config: tokio_postgres::Config,
    mode: SslMode,
    root: Option<String>,
    /// `sslcert` and `sslkey`.
    client: Option<(String, String)>,
}

impl Settings {
    fn of(conn: &str) -> Result<Self, PgTlsError> {
        let (rest, tls_keys) = split_tls_keys(conn);
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| PgTlsError::Config(error_chain(&e)))?;
        let mut mode = SslMode::Prefer;
        let (mut root, mut cert, mut key) = (None, None, None);
        for (k, v) in tls_keys {
            match k.as_str() {
                "sslmode" => mode = SslMode::parse(&v)?,
                "sslrootcert" => root = Some(v),
                "sslcert" => cert = Some(v),
                _ => key = Some(v),
            }
        }
        if mode == SslMode::Disable {
            for (name, given) in [
                ("sslrootcert", root.is_some()),
                ("sslcert", cert.is_some()),
                ("sslkey", key.is_some()),
            ] {
                if given {
                    return Err(PgTlsError::Disabled(name));
                }
            }
        }
        if root.is_none() && matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(PgTlsError::NoRoots(mode.name()));
        }
        let client = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => return Err(PgTlsError::HalfClientCert),
        };
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        Ok(Self {
            config,
            mode,
            root,
            client,
        })
    }
}

/// An error and its causes, `: `-joined (tokio-postgres's own text is only the outer part:
/// "error performing TLS handshake").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The TLS keys taken off `conn` (sslmode, sslrootcert, sslcert, sslkey) and the rest.
fn split_tls_keys(conn: &str) -> (String, Vec<(String, String)>) {
    const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];
    let mut taken = Vec::new();
    let trimmed = conn.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = conn.split_once('?') else {
            return (conn.to_owned(), taken);
        };
        // Segments we keep stay byte for byte as written (their escapes are tokio-postgres's).
        let mut kept = Vec::new();
        for segment in query.split('&') {
            let (k, v) = segment.split_once('=').unwrap_or((segment, ""));
            let k = percent_decode(k);
            if KEYS.contains(&k.as_str()) {
                taken.push((k, percent_decode(v)));
            } else {
                kept.push(segment);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, taken);
    }
    // key=value form: values are bare words or single-quoted with backslash escapes.
    let mut rest = String::with_capacity(conn.len());
    let mut chars = conn.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek().is_some_and(|&(_, c)| c == '=') {
            chars.next();
            while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek().is_some_and(|&(_, c)| c == '\'') {
                chars.next();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, escaped)) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '\'' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        let end = chars.peek().map_or(conn.len(), |&(i, _)| i);
        if KEYS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            rest.push_str(&conn[start..end]);
            rest.push(' ');
        }
    }
    (rest.trim_end().to_owned(), taken)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The TLS connector of one connection string: cheap to clone (the rustls configuration is
/// shared).
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    /// `None` for `sslmode=disable`.
    config: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("sslmode", &self.mode.name())
            .finish()
    }
}

impl PgTls {
    /// The `sslmode` this connector was built for.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The connector for settings [`Settings::of`] accepted.
    fn build(
        mode: SslMode,
        root: Option<&str>,
        client: Option<&(String, String)>,
    ) -> Result<Self, PgTlsError> {
        if mode == SslMode::Disable {
            return Ok(Self { mode, config: None });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = root.map(load_roots).transpose()?.map(Arc::new);
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(AnyCertificate(Arc::clone(&provider))),
            Some(roots) => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                        .build()
                        .map_err(|e| PgTlsError::Rustls(e.to_string()))?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PgTlsError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs("sslcert", cert)?;
                let private_key =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| PgTlsError::File {
                        key: "sslkey",
                        path: key.into(),
                        reason: e.to_string(),
                    })?;
                builder
                    .with_client_auth_cert(chain, private_key)
                    .map_err(|e| PgTlsError::Rustls(e.to_string()))?
            }
        };
        Ok(Self {
            mode,
            config: Some(Arc::new(config)),
        })
    }
}

fn read_certs(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, PgTlsError> {
    let fail = |reason: String| PgTlsError::File {
        key,
        path: Path::new(path).to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn load_roots(path: &str) -> Result<RootCertStore, PgTlsError> {
    let mut store = RootCertStore::empty();
    if path == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(PgTlsError::File {
                key: "sslrootcert",
                path: path.into(),
                reason: "the system certificate store is empty or unreadable".into(),
            });
        }
        return Ok(store);
    }
    for cert in read_certs("sslrootcert", path)? {
        store.add(cert).map_err(|e| PgTlsError::File {
            key: "sslrootcert",
            path: path.into(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

/// `prefer`/`require` without roots: encrypted, anyone's certificate accepted (libpq does the
/// same); the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (and `require` with roots): the chain is checked, the name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki checks the chain before the name: this error means the chain was good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One handshake (tokio-postgres makes one per host it tries).
pub struct PgTlsConnect {
    config: Option<Arc<rustls::ClientConfig>>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream<S>, io::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let Some(config) = self.config else {
                return Err(io::Error::other("sslmode=disable: no TLS"));
            };
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(self.name, stream)
                .await?;
            Ok(PgTlsStream(Box::new(stream)))
        })
    }
}

/// A TLS session to the server.
pub struct PgTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests;
