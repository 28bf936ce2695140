//! Where the query service's key and password hashes come from (inline, a file, an environment
//! variable) and the check that none of them is a secret the project ships as a sample: sample
//! tokens and passwords are printed beside their hashes in old deploy files and docs, so a
//! deployment that kept one is open to anyone who read them.

use std::path::Path;

use super::pgwire::ScramVerifier;
use crate::InvalidConfig;

/// How to make a token and its hash, for the messages below.
const MAKE_TOKEN: &str = "make a token with `openssl rand -hex 32 | tee token.txt | primespark \
                          hash-secret` and give the printed hash";
/// How to make a password hash.
const MAKE_PASSWORD: &str = "choose a password and give the hash that `primespark hash-secret \
                             --password` prints for it";

/// Tokens that are samples or guesses; their SHA-256 is refused.
const SAMPLE_TOKENS: &[&str] = &[
    "replace-me-with-openssl-rand-hex-32",
    "",
    "changeme",
    "secret",
    "password",
    "token",
    "admin",
    "reader",
    "primespark",
];

/// Passwords that are samples or guesses; a user whose hash verifies one of them is refused.
const SAMPLE_PASSWORDS: &[&str] = &[
    "replace-me-grafana-password",
    "changeme",
    "password",
    "grafana",
    "admin",
    "primespark",
    "",
];

/// The Argon2 strings earlier releases shipped in their deploy files (checked without hashing).
const SHIPPED_PASSWORD_HASHES: &[&str] = &[
    "$argon2id$v=19$m=19456,t=2,p=1$HLscjzzThqUkHrty382DRQ$4m/m3SAh7oCCt9HBqZgFOb1DoMwVBMbhekP2ivdMrfI",
];

/// Which of a secret's three sources a configuration uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The hash itself in the TOML.
    Inline,
    /// `*_file`.
    File,
    /// `*_env`.
    Env,
}

/// Exactly one of the inline value, the file and the variable must be given.
pub fn one_source(
    key: &str,
    inline: (&str, &str),
    file: (&str, Option<&Path>),
    env: (&str, Option<&str>),
) -> Result<Source, InvalidConfig> {
    let given: Vec<(&str, Source)> = [
        (!inline.1.is_empty()).then_some((inline.0, Source::Inline)),
        file.1.map(|_| (file.0, Source::File)),
        env.1.map(|_| (env.0, Source::Env)),
    ]
    .into_iter()
    .flatten()
    .collect();
    match given.as_slice() {
        [(_, source)] => Ok(*source),
        [] => Err(InvalidConfig::new(
            key,
            format!("needs one of {}, {} or {}", inline.0, file.0, env.0),
        )),
        many => Err(InvalidConfig::new(
            key,
            format!(
                "{} are all set: give exactly one",
                many.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// A token hash: 64 hex digits, and not the hash of a sample token.
pub fn check_token_hash(key: &str, hash: &str) -> Result<(), InvalidConfig> {
    let valid = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        return Err(InvalidConfig::new(
            key,
            format!("must be 64 hex digits (the SHA-256 of the token): {MAKE_TOKEN}"),
        ));
    }
    let lower = hash.to_ascii_lowercase();
    if SAMPLE_TOKENS
        .iter()
        .any(|t| super::service::sha256_hex(t) == lower)
    {
        return Err(InvalidConfig::new(
            key,
            format!(
                "is the hash of a sample or guessable token, which anyone can send: {MAKE_TOKEN}"
            ),
        ));
    }
    Ok(())
}

/// A password hash: a SCRAM-SHA-256 verifier, and not one the project shipped. Argon2 strings
/// (what earlier releases stored) are refused with how to replace them: SCRAM needs a verifier.
pub fn check_password_hash(key: &str, hash: &str) -> Result<(), InvalidConfig> {
    if SHIPPED_PASSWORD_HASHES.contains(&hash) {
        return Err(InvalidConfig::new(
            key,
            format!(
                "is the sample hash shipped with primespark, whose password is public: {MAKE_PASSWORD}"
            ),
        ));
    }
    if hash.starts_with("$argon2") {
        return Err(InvalidConfig::new(
            key,
            format!(
                "is an Argon2 hash: the wire endpoint authenticates with SCRAM-SHA-256 now, which \
                 needs a SCRAM verifier (SCRAM-SHA-256$...): {MAKE_PASSWORD}"
            ),
        ));
    }
    ScramVerifier::parse(hash)
        .map_err(|e| InvalidConfig::new(key, format!("{e}: {MAKE_PASSWORD}")))?;
    Ok(())
}

/// Refuses a verifier of a sample password (made again with a new salt, a sample is still a
/// sample). Costs one PBKDF2 per sample: start-up only.
pub fn refuse_sample_password(key: &str, hash: &str) -> Result<(), InvalidConfig> {
    let verifier = ScramVerifier::parse(hash)
        .map_err(|e| InvalidConfig::new(key, format!("{e}: {MAKE_PASSWORD}")))?;
    if SAMPLE_PASSWORDS.iter().any(|p| verifier.verifies(p)) {
        return Err(InvalidConfig::new(
            key,
            format!(
                "hashes a sample or guessable password, which anyone can send: {MAKE_PASSWORD}"
            ),
        ));
    }
    Ok(())
}

/// The hash a `*_file` or `*_env` source holds, with the key it came from (`{key}.{field}`);
/// `None` when the hash is inline. `file_field` and `env_field` name the two sources.
pub fn read_source(
    key: &str,
    (file_field, file): (&str, Option<&Path>),
    (env_field, env): (&str, Option<&str>),
) -> Result<Option<(String, String)>, InvalidConfig> {
    if let Some(path) = file {
        let origin = format!("{key}.{file_field}");
        return Ok(Some((read_file(&origin, path)?, origin)));
    }
    if let Some(var) = env {
        let origin = format!("{key}.{env_field}");
        return Ok(Some((read_env(&origin, var)?, origin)));
    }
    Ok(None)
}

/// The hash in a file (a mounted Secret, a compose secret), whitespace trimmed. The file's
/// content is never put in a message.
fn read_file(key: &str, path: &Path) -> Result<String, InvalidConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| InvalidConfig::new(key, format!("reading {}: {e}", path.display())))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(InvalidConfig::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(text.to_owned())
}

/// The hash in an environment variable, whitespace trimmed.
fn read_env(key: &str, var: &str) -> Result<String, InvalidConfig> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        Ok(_) => Err(InvalidConfig::new(
            key,
            format!("environment variable {var} is empty"),
        )),
        Err(std::env::VarError::NotPresent) => Err(InvalidConfig::new(
            key,
            format!("environment variable {var} is not set"),
        )),
        Err(std::env::VarError::NotUnicode(_)) => Err(InvalidConfig::new(
            key,
            format!("environment variable {var} is not UTF-8"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{hash_password, sha256_hex, ApiKey, QueryConfig, Role, WireUser};

    fn config(key: ApiKey, user: WireUser) -> QueryConfig {
        QueryConfig {
            http_addr: "0.0.0.0:8080".into(),
            pg_addr: Some("0.0.0.0:5433".into()),
            api_keys: vec![key],
            users: vec![user],
            require_tls: Some(false),
            ..QueryConfig::default()
        }
    }

    fn key(sha256: &str) -> ApiKey {
        ApiKey {
            name: "analyst".into(),
            role: Role::Reader,
            sha256: sha256.into(),
            sha256_file: None,
            sha256_env: None,
        }
    }

    fn user(hash: &str) -> WireUser {
        WireUser {
            name: "grafana".into(),
            role: Role::Reader,
            password_hash: hash.into(),
            password_hash_file: None,
            password_hash_env: None,
        }
    }

    fn refusal(c: &QueryConfig) -> String {
        c.resolve_secrets().unwrap_err().to_string()
    }

    #[test]
    fn the_shipped_samples_are_refused_with_how_to_make_a_secret() {
        let good_hash = hash_password("a long and private pass phrase").unwrap();
        let good_token =
            sha256_hex("5f0c0b7a9e2d4c1f8a3b6e9d2c5f8a1b4e7d0c3f6a9b2e5d8c1f4a7b0e3d6c9f");
        // The hash the compose and k8s files shipped, printed beside its token.
        let shipped = "d782aef14cb367f3821d7fd8eb79b6d34247803c3684e93ec49f92f92b8f7125";
        assert_eq!(sha256_hex("replace-me-with-openssl-rand-hex-32"), shipped);
        let m = refusal(&config(key(shipped), user(&good_hash)));
        assert!(m.contains("query.api_keys[0].sha256"), "{m}");
        assert!(m.contains("openssl rand -hex 32"), "{m}");
        // Upper-case hex of it too.
        let m = refusal(&config(
            key(&shipped.to_ascii_uppercase()),
            user(&good_hash),
        ));
        assert!(m.contains("sample"), "{m}");

        let m = refusal(&config(key(&good_token), user(SHIPPED_PASSWORD_HASHES[0])));
        assert!(m.contains("query.users[0].password_hash"), "{m}");
        assert!(m.contains("hash-secret --password"), "{m}");
        // Any Argon2 string: SCRAM cannot use it.
        let m = refusal(&config(
            key(&good_token),
            user("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g"),
        ));
        assert!(m.contains("SCRAM-SHA-256"), "{m}");
        // The sample password hashed again, with a salt of its own.
        let rehashed = hash_password("replace-me-grafana-password").unwrap();
        let m = refusal(&config(key(&good_token), user(&rehashed)));
        assert!(m.contains("query.users[0].password_hash"), "{m}");
        assert!(m.contains("sample or guessable password"), "{m}");

        let ok = config(key(&good_token), user(&good_hash));
        assert_eq!(ok.resolve_secrets().unwrap(), ok);
    }

    #[test]
    fn hashes_come_from_a_file_or_the_environment_and_are_checked_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let good_hash = hash_password("another private pass phrase").unwrap();
        let good_token = sha256_hex("0d9f3c8b2a7e1f6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a2918");
        let token_file = dir.path().join("token.sha256");
        std::fs::write(&token_file, format!("{good_token}\n")).unwrap();
        let var = format!("PRIMESPARK_TEST_HASH_{}", std::process::id());
        std::env::set_var(&var, &good_hash);
        let mut c = config(key(""), user(""));
        c.api_keys[0].sha256_file = Some(token_file.clone());
        c.users[0].password_hash_env = Some(var.clone());
        c.validate().unwrap();
        let resolved = c.resolve_secrets().unwrap();
        assert_eq!(resolved.api_keys[0].sha256, good_token);
        assert_eq!(resolved.api_keys[0].sha256_file, None);
        assert_eq!(resolved.users[0].password_hash, good_hash);

        // A sample read from a file is a sample.
        std::fs::write(&token_file, sha256_hex("changeme")).unwrap();
        let m = refusal(&c);
        assert!(m.contains("query.api_keys[0].sha256_file"), "{m}");
        std::fs::write(&token_file, &good_token).unwrap();
        std::env::set_var(&var, SHIPPED_PASSWORD_HASHES[0]);
        let m = refusal(&c);
        assert!(m.contains("query.users[0].password_hash_env"), "{m}");
        // Missing sources name the key and the variable or file, never a value.
        std::env::remove_var(&var);
        let m = refusal(&c);
        assert!(m.contains(&var) && m.contains("not set"), "{m}");
        c.api_keys[0].sha256_file = Some(dir.path().join("absent"));
        let m = refusal(&c);
        assert!(
            m.contains("query.api_keys[0].sha256_file") && m.contains("absent"),
            "{m}"
        );

        // Two sources, or none, are refused by the pure check already.
        let mut both = config(key(&good_token), user(&good_hash));
        both.api_keys[0].sha256_env = Some("X".into());
        let m = both.validate().unwrap_err().to_string();
        assert!(m.contains("sha256, sha256_env"), "{m}");
        let none = config(key(""), user(&good_hash));
        let m = none.validate().unwrap_err().to_string();
        assert!(
            m.contains("query.api_keys[0]") && m.contains("needs one of"),
            "{m}"
        );
    }
}
