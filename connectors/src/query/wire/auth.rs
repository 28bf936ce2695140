//! The startup handshake: a cleartext password, checked by [`SqlBackend::authenticate`] on
//! tokio's blocking pool (password hashes are slow on purpose). A refusal is `FATAL 28P01`.

use std::fmt::{self, Debug};
use std::sync::Arc;

use ::pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use ::pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password};
use ::pgwire::error::{ErrorInfo, PgWireError as ProtocolError, PgWireResult, SEVERITY_FATAL};
use async_trait::async_trait;

use super::SqlBackend;

/// The startup handler of an endpoint: cleartext password through [`BackendAuth`].
pub(super) type Startup =
    CleartextPasswordAuthStartupHandler<BackendAuth, DefaultServerParameterProvider>;

/// Password checks through the backend.
pub(super) struct BackendAuth {
    pub(super) backend: Arc<dyn SqlBackend>,
}

impl Debug for BackendAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendAuth")
    }
}

#[async_trait]
impl AuthSource for BackendAuth {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        // Unused: `verify_password` asks the backend instead. Refuse rather than compare
        // against an empty password.
        Err(ProtocolError::InvalidPassword(
            login.user().unwrap_or_default().to_owned(),
        ))
    }

    async fn verify_password(
        &self,
        login: &LoginInfo,
        presented_password: &[u8],
    ) -> PgWireResult<Option<()>> {
        let user = login.user().unwrap_or_default().to_owned();
        let host = login.host().to_owned();
        let refused = |message: String| {
            tracing::warn!(user = %user, host = %host, "wire authentication failed");
            ProtocolError::UserError(Box::new(ErrorInfo::new(
                SEVERITY_FATAL.to_owned(),
                "28P01".to_owned(),
                message,
            )))
        };
        let Ok(password) = String::from_utf8(presented_password.to_vec()) else {
            return Err(refused(format!(
                "password authentication failed for user \"{user}\""
            )));
        };
        let backend = self.backend.clone();
        let name = user.clone();
        match tokio::task::spawn_blocking(move || backend.authenticate(&name, &password)).await {
            Ok(Ok(())) => {
                tracing::debug!(user = %user, host = %host, "wire client authenticated");
                Ok(None)
            }
            Ok(Err(message)) => Err(refused(message)),
            Err(e) => {
                tracing::error!(user = %user, error = %e, "wire password check panicked");
                Err(ProtocolError::UserError(Box::new(ErrorInfo::new(
                    SEVERITY_FATAL.to_owned(),
                    "XX000".to_owned(),
                    "internal error while checking the password".to_owned(),
                ))))
            }
        }
    }
}
