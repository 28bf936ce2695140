//! The startup handshake, done like PostgreSQL does it: SCRAM-SHA-256 against the user's stored
//! verifier (the password never crosses the wire, and the server does no slow hashing: the
//! client runs the PBKDF2), TLS required when the endpoint says so, and a limit on failed
//! logins per peer address. An unknown user gets a decoy verifier, so the exchange, its timing
//! and its failure are those of a wrong password. A refusal is a `FATAL` error and closes the
//! connection.

use std::fmt::{self, Debug};
use std::sync::Arc;

use ::pgwire::api::auth::mechanism::AuthMechanismFactory;
use ::pgwire::api::auth::sasl::scram::{ScramAuth, ScramSecret};
use ::pgwire::api::auth::{
    protocol_negotiation, save_startup_parameters_to_metadata, AuthDriver, AuthOutcome, AuthSource,
    DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use ::pgwire::api::{ClientInfo, ConnectionManager};
use ::pgwire::error::{ErrorInfo, PgWireError as ProtocolError, PgWireResult, SEVERITY_FATAL};
use ::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use async_trait::async_trait;
use futures::Sink;

use super::credential::ScramVerifier;
use super::{SqlBackend, WireOptions};
use crate::metrics::WireLoginRefused;
use crate::query::limiter::LoginLimiter;

/// A `FATAL` error with a SQLSTATE: the client shows the message, the connection closes.
fn fatal(sqlstate: &str, message: String) -> ProtocolError {
    ProtocolError::UserError(Box::new(ErrorInfo::new(
        SEVERITY_FATAL.to_owned(),
        sqlstate.to_owned(),
        message,
    )))
}

/// Verifiers through the backend; decoys for names it does not know.
struct BackendAuth {
    backend: Arc<dyn SqlBackend>,
    /// Per-process secret the decoys derive from: stable salts per name, unguessable keys.
    decoy_secret: [u8; 32],
}

impl Debug for BackendAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendAuth")
    }
}

#[async_trait]
impl AuthSource for BackendAuth {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        // Unused: SCRAM asks for `get_scram_secret`. Refuse rather than compare against an
        // empty password.
        Err(ProtocolError::InvalidPassword(
            login.user().unwrap_or_default().to_owned(),
        ))
    }

    async fn get_scram_secret(&self, login: &LoginInfo) -> PgWireResult<(ScramSecret, Option<()>)> {
        let user = login.user().unwrap_or_default();
        let verifier = self
            .backend
            .credential(user)
            .unwrap_or_else(|| ScramVerifier::decoy(&self.decoy_secret, user));
        Ok((verifier.secret(), None))
    }
}

/// The startup handler of an endpoint.
pub(super) struct Startup {
    driver: AuthDriver<DefaultServerParameterProvider>,
    scram: ScramAuth,
    require_tls: bool,
    limiter: LoginLimiter,
}

impl Startup {
    pub(super) fn new(
        backend: Arc<dyn SqlBackend>,
        parameters: DefaultServerParameterProvider,
        connections: Arc<ConnectionManager>,
        options: &WireOptions,
    ) -> Self {
        let source = BackendAuth {
            backend,
            decoy_secret: rand::random(),
        };
        Self {
            driver: AuthDriver::new(parameters).with_connection_manager(connections),
            scram: ScramAuth::new(Arc::new(source)),
            require_tls: options.require_tls,
            limiter: LoginLimiter::new(options.login_failures_per_minute),
        }
    }

    fn refused(&self, client: &impl ClientInfo, reason: &'static str) {
        WireLoginRefused {
            user: client
                .metadata()
                .get("user")
                .map(String::as_str)
                .unwrap_or_default(),
            peer: client.socket_addr(),
            reason,
        }
        .emit();
    }
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        ProtocolError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.require_tls && !client.is_secure() {
                    self.refused(client, "tls_required");
                    return Err(fatal(
                        "28000",
                        "this endpoint accepts TLS connections only: connect with sslmode=require \
                         (or verify-full)"
                            .to_owned(),
                    ));
                }
                let peer = client.socket_addr().ip();
                if let Err(wait) = self.limiter.check(peer) {
                    self.refused(client, "too_many_failures");
                    return Err(fatal(
                        "28000",
                        format!("too many failed logins from {peer}: retry in {wait} s"),
                    ));
                }
                match self
                    .driver
                    .begin_authentication(client, self.scram.create())
                    .await?
                {
                    AuthOutcome::InProgress => Ok(()),
                    AuthOutcome::Authenticated { final_message, .. } => {
                        self.driver
                            .complete_authentication(client, final_message)
                            .await
                    }
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                match self.driver.advance_authentication(client, message).await {
                    Ok(AuthOutcome::InProgress) => Ok(()),
                    Ok(AuthOutcome::Authenticated { final_message, .. }) => {
                        tracing::debug!(
                            user = client.metadata().get("user").map(String::as_str).unwrap_or_default(),
                            peer = %client.socket_addr(),
                            tls = client.is_secure(),
                            method = "scram-sha-256",
                            "wire client authenticated"
                        );
                        self.driver
                            .complete_authentication(client, final_message)
                            .await
                    }
                    Err(e) => {
                        self.limiter.failed(client.socket_addr().ip());
                        self.refused(client, "bad_password");
                        tracing::debug!(error = %e, "scram exchange failed");
                        let user = client.metadata().get("user").cloned().unwrap_or_default();
                        // PostgreSQL's words for every failure: no hint whether the name exists.
                        Err(fatal(
                            "28P01",
                            format!("password authentication failed for user \"{user}\""),
                        ))
                    }
                }
            }
            _ => Ok(()),
        }
    }
}
