//! Client tokens and the admin key.
//!
//! The server takes two kinds of token, told apart by their number of dot-separated parts:
//!
//! - Ordo's own, `<payload>.<signature>` (from `ordo token` and `POST /v1/admin/tokens`): the
//!   payload is base64url (no padding) of the JSON `{"u": user, "d": device, "exp": unix
//!   seconds, "iat": unix seconds}`, the signature is base64url of HMAC-SHA256(secret, payload
//!   text). `iat` is optional (tokens made before it was added lack it).
//! - Standard JWTs, `<header>.<claims>.<signature>`, minted by the app's backend: see
//!   [`crate::jwt`].
//!
//! [`Authenticator`] checks either and then the revocations ([`crate::revocation`]). The
//! secret and the admin key come from a flag, an environment variable, or a file in the data
//! directory that is generated on first use.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use ordo_protocol::{validate_id, IdError, IdKind};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "d")]
    pub device: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// When the token was issued, seconds since the Unix epoch (what revocations compare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <token>` or `?token=<token>`")]
    Missing,
    #[error("token is malformed: expected <payload>.<signature> as printed by `ordo token`, or a JWT (<header>.<claims>.<signature>), all base64url")]
    Malformed,
    #[error("token signature does not match this server's secret")]
    BadSignature,
    #[error("token expired at {0} (unix seconds); ask for a new one")]
    Expired(u64),
    #[error("token names an invalid id: {0}")]
    BadId(#[from] IdError),
    #[error("JWT refused: {0}")]
    Jwt(String),
    #[error("the token was revoked (tokens of user {user}{} issued before {before}, unix seconds, are refused); get a new one", .device.as_deref().map(|d| format!(" on device {d}")).unwrap_or_default())]
    Revoked {
        user: String,
        device: Option<String>,
        before: u64,
    },
}

/// Longest token taken (a JWT with an RSA-4096 signature and a few claims is under 2 KiB).
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Checks client tokens of both kinds, then the revocations.
pub struct Authenticator {
    pub own: TokenKey,
    pub jwt: crate::jwt::JwtVerifier,
    pub revocations: crate::revocation::Revocations,
}

impl Authenticator {
    /// The claims of `token` at `now_secs`, if it is good and not revoked.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let claims = match token.bytes().filter(|b| *b == b'.').count() {
            2 => self.jwt.verify(token, now_secs)?,
            _ => self.own.verify(token, now_secs)?,
        };
        self.check_revoked(&claims)?;
        Ok(claims)
    }

    /// Refuses claims a revocation covers.
    pub fn check_revoked(&self, claims: &Claims) -> Result<(), AuthError> {
        match self
            .revocations
            .refuses(&claims.user, &claims.device, claims.iat)
        {
            None => Ok(()),
            Some(r) => Err(AuthError::Revoked {
                user: r.user,
                device: r.device,
                before: r.before,
            }),
        }
    }
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> Self {
        TokenKey {
            secret: secret.to_vec(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length")
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        validate_id(IdKind::User, &claims.user)?;
        validate_id(IdKind::Device, &claims.device)?;
        let json = serde_json::to_vec(claims).map_err(|_| AuthError::Malformed)?;
        let payload = URL_SAFE_NO_PAD.encode(json);
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{payload}.{sig}"))
    }

    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, AuthError> {
        let (payload, sig) = token.split_once('.').ok_or(AuthError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| AuthError::Malformed)?;
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| AuthError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
        if claims.exp <= now_secs {
            return Err(AuthError::Expired(claims.exp));
        }
        validate_id(IdKind::User, &claims.user)?;
        validate_id(IdKind::Device, &claims.device)?;
        Ok(claims)
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Returns `given` if set, else the content of `dir/name`, creating that file with 32 random
/// bytes (hex) on first use, readable by the owner only, if `may_create` (else a missing file is
/// a `NotFound` error).
pub fn load_or_create_secret(
    given: Option<&str>,
    dir: &Path,
    name: &str,
    may_create: bool,
) -> std::io::Result<String> {
    if let Some(s) = given.filter(|s| !s.is_empty()) {
        return Ok(s.to_string());
    }
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if !may_create {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is missing", path.display()),
        ));
    }
    std::fs::create_dir_all(dir)?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let k = TokenKey::new(b"secret");
        let c = Claims {
            user: "alice".into(),
            device: "phone".into(),
            exp: 100,
            iat: Some(1),
        };
        let t = k.sign(&c).unwrap();
        assert_eq!(k.verify(&t, 99).unwrap(), c);
        assert_eq!(k.verify(&t, 100), Err(AuthError::Expired(100)));
        assert_eq!(
            TokenKey::new(b"other").verify(&t, 1),
            Err(AuthError::BadSignature)
        );
        let (p, s) = t.split_once('.').unwrap();
        let forged = format!(
            "{}.{s}",
            URL_SAFE_NO_PAD.encode(br#"{"u":"bob","d":"x","exp":100}"#)
        );
        assert_eq!(k.verify(&forged, 1), Err(AuthError::BadSignature));
        assert_eq!(k.verify(p, 1), Err(AuthError::Malformed));
    }

    #[test]
    fn secret_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_secret(None, dir.path(), "secret", true).unwrap();
        let b = load_or_create_secret(None, dir.path(), "secret", true).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(
            load_or_create_secret(Some("given"), dir.path(), "secret", true).unwrap(),
            "given"
        );
    }
}
