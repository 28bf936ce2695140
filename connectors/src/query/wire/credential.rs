//! SCRAM-SHA-256 verifiers in PostgreSQL's stored form
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64), what a wire user's
//! `password_hash` holds. The server keeps only the verifier: a client proves it knows the
//! password without sending it, and the verifier cannot log in by itself (RFC 5802, RFC 7677).

use std::fmt;

use ::pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The iteration count `primespark hash-secret --password` uses: PostgreSQL's default.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// A SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iterations the client runs.
    pub iterations: u32,
    /// The salt the client hashes with.
    pub salt: Vec<u8>,
    /// `SHA-256(ClientKey)`.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: Vec<u8>,
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// Why a text is not a verifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a SCRAM-SHA-256 verifier (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>): {0}"
)]
pub struct NotAVerifier(&'static str);

impl ScramVerifier {
    /// The verifier of `password` with a fresh random salt.
    pub fn from_password(password: &str, iterations: u32) -> Self {
        Self::with_salt(password, rand::random::<[u8; 16]>().to_vec(), iterations)
    }

    /// The verifier of `password` with `salt` (SASLprep-normalized, as clients do).
    pub fn with_salt(password: &str, salt: Vec<u8>, iterations: u32) -> Self {
        let salted = gen_salted_password(password, &salt, iterations as usize);
        match ScramSecret::verifier_from_salted_password(salt, salted, iterations as usize) {
            ScramSecret::Verifier {
                salt,
                stored_key,
                server_key,
                ..
            } => Self {
                iterations,
                salt,
                stored_key,
                server_key,
            },
            // verifier_from_salted_password only makes verifiers.
            ScramSecret::SaltedPassword { salt, .. } => Self {
                iterations,
                salt,
                stored_key: Vec::new(),
                server_key: Vec::new(),
            },
        }
    }

    /// Whether `password` is the one this verifier was made from (constant time in the keys).
    pub fn verifies(&self, password: &str) -> bool {
        let other = Self::with_salt(password, self.salt.clone(), self.iterations);
        other.stored_key.len() == self.stored_key.len()
            && other
                .stored_key
                .iter()
                .zip(&self.stored_key)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// A verifier for a user that does not exist: the same salt for the same name every time
    /// (derived from `server_secret`, random per process), and keys no password matches. A
    /// client sees the same exchange, and the same failure, as for a wrong password.
    pub fn decoy(server_secret: &[u8; 32], user: &str) -> Self {
        let derive = |what: &[u8]| {
            let mut h = Sha256::new();
            h.update(server_secret);
            h.update(what);
            h.update(user.as_bytes());
            h.finalize().to_vec()
        };
        Self {
            iterations: DEFAULT_ITERATIONS,
            salt: derive(b"salt")[..16].to_vec(),
            stored_key: derive(b"stored"),
            server_key: derive(b"server"),
        }
    }

    /// Parses PostgreSQL's stored form.
    pub fn parse(text: &str) -> Result<Self, NotAVerifier> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(NotAVerifier("it does not start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(NotAVerifier("the keys are missing"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(NotAVerifier("the salt is missing"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(NotAVerifier("the server key is missing"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| NotAVerifier("the iteration count is not a number"))?;
        if iterations < DEFAULT_ITERATIONS {
            return Err(NotAVerifier("fewer than 4096 iterations"));
        }
        let decode =
            |s: &str, what: &'static str| STANDARD.decode(s).map_err(|_| NotAVerifier(what));
        let salt = decode(salt, "the salt is not base64")?;
        let stored_key = decode(stored, "the stored key is not base64")?;
        let server_key = decode(server, "the server key is not base64")?;
        if salt.is_empty() {
            return Err(NotAVerifier("the salt is empty"));
        }
        if stored_key.len() != 32 || server_key.len() != 32 {
            return Err(NotAVerifier("the keys are not 32 bytes"));
        }
        Ok(Self {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// What pgwire's SCRAM exchange checks a client's proof with.
    pub(super) fn secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations as usize,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }
}

impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(&self.stored_key),
            STANDARD.encode(&self.server_key)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_round_trip_and_verify_only_their_password() {
        let v = ScramVerifier::from_password("pa55 phrase", DEFAULT_ITERATIONS);
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:"), "{text}");
        let parsed = ScramVerifier::parse(&text).unwrap();
        assert_eq!(parsed, v);
        assert!(parsed.verifies("pa55 phrase"));
        assert!(!parsed.verifies("pa55 phrasE"));
        assert!(!format!("{parsed:?}").contains(&STANDARD.encode(&v.stored_key)));
        // (PostgreSQL's own verifiers parse and verify too: tests/tests/wire_auth_e2e.rs.)
        for bad in [
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
            "SCRAM-SHA-256$100:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
        ] {
            assert!(ScramVerifier::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_decoy_is_stable_per_user_and_verifies_nothing() {
        let secret = [7u8; 32];
        let a = ScramVerifier::decoy(&secret, "mallory");
        assert_eq!(a, ScramVerifier::decoy(&secret, "mallory"));
        assert_ne!(a.salt, ScramVerifier::decoy(&secret, "eve").salt);
        assert_eq!(a.salt.len(), 16);
        assert!(!a.verifies(""));
        assert!(!a.verifies("mallory"));
    }
}
