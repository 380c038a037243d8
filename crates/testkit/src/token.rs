//! Client tokens signed locally with a server's secret (the harness knows the secret of every
//! server it starts), as `ordo token` would print them.

use crate::HarnessError;
use ordo_server::auth::{Claims, TokenKey};
use std::time::{SystemTime, UNIX_EPOCH};

/// A token for `user`'s `device`, signed with `secret`, valid for `ttl_secs`.
pub fn token(
    secret: &str,
    user: &str,
    device: &str,
    ttl_secs: u64,
) -> Result<String, HarnessError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    TokenKey::new(secret.as_bytes())
        .sign(&Claims {
            user: user.to_string(),
            device: device.to_string(),
            exp: now.saturating_add(ttl_secs),
            iat: Some(now),
        })
        .map_err(|e| HarnessError::Request(format!("cannot sign a token: {e}")))
}
