//! Standard JSON Web Tokens (RFC 7519), beside Ordo's own tokens ([`crate::auth`]).
//!
//! An app's backend mints them with any JWT library: HS256 keyed with the server's token
//! secret, or RS256 / ES256 with a private key whose public half is in the JWKS file given
//! with `--jwks` (several keys, told apart by `kid`, so that keys can be rotated: add the new
//! key, mint with it, drop the old one once its tokens have expired; the file is read again on
//! SIGHUP).
//!
//! Claims: `sub` is the user id, `device` the device id, `exp` is required, `nbf` and `iat`
//! are optional, and `iss` / `aud` must match when the server is given an issuer / audience.
//! Times are checked with `jwt_leeway_secs` of clock skew either way. Every other algorithm is
//! refused, `none` included, and each algorithm takes only its own kind of key: an HS256
//! token is checked only with the server secret, never with a public key read as a secret.
//!
//! Signatures are checked by the `jsonwebtoken` crate (on `ring`, the crypto provider the TLS
//! side uses too); the choice of key and the claims are checked here, so that every refusal
//! says what was wrong.

use crate::auth::{AuthError, Claims};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ordo_protocol::{validate_id, IdKind};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// What a JWT must carry besides a good signature.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtRules {
    /// `iss` must equal this when set.
    pub issuer: Option<String>,
    /// `aud` (a string or a list) must hold this when set.
    pub audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read the JWKS file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the JWKS file {path} is not a JSON Web Key Set ({{\"keys\": [...]}}): {reason}")]
    Parse { path: String, reason: String },
    #[error("the JWKS file {path}: key {index} ({kid}) cannot be used: {reason}")]
    Key {
        path: String,
        index: usize,
        kid: String,
        reason: String,
    },
}

/// One public key of the JWKS file.
struct PublicKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys JWTs are checked with.
pub struct JwtVerifier {
    secret: DecodingKey,
    jwks_path: Option<PathBuf>,
    keys: RwLock<Arc<Vec<PublicKey>>>,
    rules: JwtRules,
}

/// The header fields the key is chosen by.
struct Header {
    alg: String,
    kid: Option<String>,
}

impl JwtVerifier {
    /// Checks HS256 tokens with `secret`, and RS256 / ES256 tokens with the keys of
    /// `jwks_path`, if given (read now: a bad file stops the start).
    pub fn new(
        secret: &[u8],
        jwks_path: Option<&Path>,
        rules: JwtRules,
    ) -> Result<JwtVerifier, JwksError> {
        let keys = match jwks_path {
            Some(p) => read_jwks(p)?,
            None => Vec::new(),
        };
        Ok(JwtVerifier {
            secret: DecodingKey::from_secret(secret),
            jwks_path: jwks_path.map(Path::to_path_buf),
            keys: RwLock::new(Arc::new(keys)),
            rules,
        })
    }

    /// Reads the JWKS file again (SIGHUP); on an error the keys in use stay. Returns how many
    /// keys it holds.
    pub fn reload(&self) -> Result<usize, JwksError> {
        let Some(path) = &self.jwks_path else {
            return Ok(0);
        };
        let keys = read_jwks(path)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    pub fn has_jwks(&self) -> bool {
        self.jwks_path.is_some()
    }

    /// Checks a three-part token at `now_secs`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, AuthError> {
        let header = header_of(token)?;
        let alg = match header.alg.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            "none" | "None" | "NONE" => {
                return Err(AuthError::Jwt(
                    "alg \"none\" (an unsigned token) is never accepted".into(),
                ))
            }
            other => {
                return Err(AuthError::Jwt(format!(
                    "alg {other:?} is not accepted; sign with HS256 (the server secret), RS256 or ES256 (a key in --jwks)"
                )))
            }
        };
        let mut validation = Validation::new(alg);
        // The claims are checked below, with this module's messages and the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let keys;
        let key = if alg == Algorithm::HS256 {
            &self.secret
        } else {
            keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
            pick_key(&keys, alg, header.kid.as_deref(), self.has_jwks())?
        };
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Jwt(format!("cannot check the JWT: {e}")),
            })?;
        self.claims(&data.claims, now_secs)
    }

    fn claims(
        &self,
        c: &serde_json::Map<String, Value>,
        now_secs: u64,
    ) -> Result<Claims, AuthError> {
        let leeway = self.rules.leeway_secs;
        let text = |name: &str| -> Result<String, AuthError> {
            match c.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(AuthError::Jwt(format!("claim {name:?} must be a string"))),
                None => Err(AuthError::Jwt(format!(
                    "the JWT has no {name:?} claim ({})",
                    match name {
                        "sub" => "the user id",
                        _ => "the device id",
                    }
                ))),
            }
        };
        let user = text("sub")?;
        let device = text("device")?;
        let exp = numeric_date(c, "exp")?.ok_or_else(|| {
            AuthError::Jwt("the JWT has no \"exp\" claim; give it an expiry".into())
        })?;
        if exp.saturating_add(leeway) <= now_secs {
            return Err(AuthError::Expired(exp));
        }
        if let Some(nbf) = numeric_date(c, "nbf")? {
            if nbf > now_secs.saturating_add(leeway) {
                return Err(AuthError::Jwt(format!(
                    "the JWT is not valid before {nbf} (nbf, unix seconds); it is {now_secs} now"
                )));
            }
        }
        let iat = numeric_date(c, "iat")?;
        if let Some(want) = &self.rules.issuer {
            match c.get("iss") {
                Some(Value::String(iss)) if iss == want => {}
                Some(other) => {
                    return Err(AuthError::Jwt(format!(
                        "the JWT's issuer (iss) is {other}; this server takes {want:?}"
                    )))
                }
                None => {
                    return Err(AuthError::Jwt(format!(
                        "the JWT has no issuer (iss); this server takes {want:?}"
                    )))
                }
            }
        }
        if let Some(want) = &self.rules.audience {
            let ok = match c.get("aud") {
                Some(Value::String(a)) => a == want,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(want)),
                _ => false,
            };
            if !ok {
                return Err(AuthError::Jwt(format!(
                    "the JWT's audience (aud) does not name {want:?}, this server's audience"
                )));
            }
        }
        validate_id(IdKind::User, &user)?;
        validate_id(IdKind::Device, &device)?;
        Ok(Claims {
            user,
            device,
            exp: exp.saturating_add(leeway),
            iat,
        })
    }
}

/// A NumericDate claim (seconds since the Unix epoch; a fraction is cut off), if present.
fn numeric_date(c: &serde_json::Map<String, Value>, name: &str) -> Result<Option<u64>, AuthError> {
    match c.get(name) {
        None => Ok(None),
        Some(v) => match (v.as_u64(), v.as_f64()) {
            (Some(n), _) => Ok(Some(n)),
            (None, Some(f)) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
            _ => Err(AuthError::Jwt(format!(
                "claim {name:?} must be a number of seconds since the Unix epoch"
            ))),
        },
    }
}

/// Reads the JOSE header of a three-part token (only what the key is chosen by).
fn header_of(token: &str) -> Result<Header, AuthError> {
    let head = token.split('.').next().unwrap_or_default();
    let bytes = URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .map_err(|_| AuthError::Jwt("the JWT header is not base64url".into()))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Jwt("the JWT header is not a JSON object".into()))?;
    let alg = v
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::Jwt("the JWT header names no alg".into()))?
        .to_string();
    let kid = v.get("kid").and_then(Value::as_str).map(str::to_string);
    Ok(Header { alg, kid })
}

/// The public key for a token signed with `alg`: the one with its `kid`, or the only key of
/// that algorithm when the token names none.
fn pick_key<'a>(
    keys: &'a [PublicKey],
    alg: Algorithm,
    kid: Option<&str>,
    has_jwks: bool,
) -> Result<&'a DecodingKey, AuthError> {
    if !has_jwks {
        return Err(AuthError::Jwt(format!(
            "the JWT is signed with {alg:?}, which needs public keys: start the server with --jwks FILE, or sign with HS256 and the server secret"
        )));
    }
    let of_alg = || keys.iter().filter(|k| k.alg == alg);
    let found = match kid {
        Some(kid) => {
            let k = keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| {
                    AuthError::Jwt(format!("no key with kid {kid:?} in the server's JWKS file"))
                })?;
            if k.alg != alg {
                return Err(AuthError::Jwt(format!(
                    "key {kid:?} is a {:?} key; the JWT says {alg:?}",
                    k.alg
                )));
            }
            k
        }
        None => {
            let mut it = of_alg();
            match (it.next(), it.next()) {
                (Some(k), None) => k,
                (None, _) => {
                    return Err(AuthError::Jwt(format!(
                        "the server's JWKS file holds no {alg:?} key"
                    )))
                }
                (Some(_), Some(_)) => {
                    return Err(AuthError::Jwt(format!(
                        "the JWT names no kid and the JWKS file holds several {alg:?} keys; put the key's kid in the JWT header"
                    )))
                }
            }
        }
    };
    Ok(&found.key)
}

/// Reads a JWKS file: every key must be an RSA key (RS256) or a P-256 EC key (ES256), made
/// for signatures; a key that says another algorithm, or one this server cannot use, is an
/// error rather than silently left out.
fn read_jwks(path: &Path) -> Result<Vec<PublicKey>, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| JwksError::Parse {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(set.keys.len());
    for (index, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.clone();
        let bad = |reason: String| JwksError::Key {
            path: path.display().to_string(),
            index,
            kid: kid.clone().unwrap_or_else(|| "no kid".into()),
            reason,
        };
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::EllipticCurve(p) => {
                return Err(bad(format!(
                    "curve {:?} is not supported; use P-256 (ES256)",
                    p.curve
                )))
            }
            _ => {
                return Err(bad(
                    "only RSA (RS256) and EC P-256 (ES256) public keys are supported; HS256 uses the server secret, not a JWKS key".into(),
                ))
            }
        };
        match jwk.common.key_algorithm {
            None => {}
            Some(KeyAlgorithm::RS256) if alg == Algorithm::RS256 => {}
            Some(KeyAlgorithm::ES256) if alg == Algorithm::ES256 => {}
            Some(other) => {
                return Err(bad(format!(
                    "its alg is {other:?}; an {} key here must say {alg:?} or nothing",
                    if alg == Algorithm::RS256 { "RSA" } else { "EC" }
                )))
            }
        }
        if kid.is_some() && out.iter().any(|k: &PublicKey| k.kid == kid) {
            return Err(bad("another key has the same kid".into()));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
        out.push(PublicKey { kid, alg, key });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header as JwtHeader};
    use serde_json::json;

    const SECRET: &[u8] = b"server secret, long enough";

    fn hs(claims: Value) -> String {
        encode(
            &JwtHeader::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn verifier(rules: JwtRules) -> JwtVerifier {
        JwtVerifier::new(SECRET, None, rules).unwrap()
    }

    fn rules() -> JwtRules {
        JwtRules {
            issuer: None,
            audience: None,
            leeway_secs: 30,
        }
    }

    #[test]
    fn hs256_with_the_server_secret() {
        let v = verifier(rules());
        let t = hs(json!({"sub": "alice", "device": "phone", "exp": 1000, "iat": 10}));
        let c = v.verify(&t, 500).unwrap();
        assert_eq!(
            (c.user.as_str(), c.device.as_str(), c.iat),
            ("alice", "phone", Some(10))
        );
        // Leeway on exp, then expired.
        assert!(v.verify(&t, 1020).is_ok());
        assert_eq!(v.verify(&t, 1030), Err(AuthError::Expired(1000)));
        let other = encode(
            &JwtHeader::new(Algorithm::HS256),
            &json!({"sub": "alice", "device": "phone", "exp": 1000}),
            &EncodingKey::from_secret(b"another secret"),
        )
        .unwrap();
        assert_eq!(v.verify(&other, 500), Err(AuthError::BadSignature));
    }

    #[test]
    fn claims_are_checked() {
        let v = verifier(JwtRules {
            issuer: Some("https://app.example".into()),
            audience: Some("ordo".into()),
            leeway_secs: 30,
        });
        let base = json!({"sub": "alice", "device": "phone", "exp": 1000,
            "iss": "https://app.example", "aud": ["x", "ordo"]});
        assert!(v.verify(&hs(base.clone()), 500).is_ok());
        let with = |k: &str, val: Value| {
            let mut c = base.clone();
            c[k] = val;
            hs(c)
        };
        let without = |k: &str| {
            let mut c = base.clone();
            c.as_object_mut().unwrap().remove(k);
            hs(c)
        };
        for (t, want) in [
            (with("aud", json!("other")), "audience"),
            (without("aud"), "audience"),
            (with("iss", json!("https://evil.example")), "issuer"),
            (without("iss"), "issuer"),
            (without("sub"), "sub"),
            (without("device"), "device"),
            (without("exp"), "exp"),
            (with("nbf", json!(600)), "not valid before"),
            (with("sub", json!(7)), "string"),
            (with("exp", json!("soon")), "number"),
        ] {
            let e = v.verify(&t, 500).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        // nbf within the leeway is fine; a fractional exp is cut to seconds.
        assert!(v.verify(&with("nbf", json!(520)), 500).is_ok());
        assert!(v.verify(&with("exp", json!(999.9)), 500).is_ok());
        assert!(matches!(
            v.verify(&with("sub", json!("not a valid id!")), 500),
            Err(AuthError::BadId(_))
        ));
    }

    #[test]
    fn alg_none_and_others_are_refused() {
        let v = verifier(rules());
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","device":"phone","exp":1000}"#);
        let none = format!(
            "{}.{body}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
        );
        assert!(v.verify(&none, 1).unwrap_err().to_string().contains("none"));
        let hs512 = encode(
            &JwtHeader::new(Algorithm::HS512),
            &json!({"sub": "alice", "device": "phone", "exp": 1000}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(v
            .verify(&hs512, 1)
            .unwrap_err()
            .to_string()
            .contains("HS512"));
        // RS256 without a JWKS file says what is missing.
        let rs = format!(
            "{}.{body}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#)
        );
        assert!(v.verify(&rs, 1).unwrap_err().to_string().contains("--jwks"));
    }

    #[test]
    fn es256_keys_come_from_the_jwks_file_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = Vec::new();
        let mut jwks = Vec::new();
        for kid in ["k1", "k2"] {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let raw = kp.public_key_raw();
            jwks.push(json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])}));
            keys.push(EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap());
        }
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({"keys": jwks}).to_string()).unwrap();
        let v = JwtVerifier::new(SECRET, Some(&path), rules()).unwrap();
        let claims = json!({"sub": "alice", "device": "phone", "exp": 1000});
        let sign = |kid: Option<&str>, key: &EncodingKey| {
            let mut h = JwtHeader::new(Algorithm::ES256);
            h.kid = kid.map(str::to_string);
            encode(&h, &claims, key).unwrap()
        };
        assert!(v.verify(&sign(Some("k1"), &keys[0]), 1).is_ok());
        assert!(v.verify(&sign(Some("k2"), &keys[1]), 1).is_ok());
        assert_eq!(
            v.verify(&sign(Some("k1"), &keys[1]), 1),
            Err(AuthError::BadSignature)
        );
        let e = v.verify(&sign(Some("k9"), &keys[0]), 1).unwrap_err();
        assert!(e.to_string().contains("k9"), "{e}");
        let e = v.verify(&sign(None, &keys[0]), 1).unwrap_err();
        assert!(e.to_string().contains("several"), "{e}");
        // An HS256 token made with a public key's text as the secret is not taken.
        let confused = encode(
            &JwtHeader::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(std::fs::read(&path).unwrap().as_slice()),
        )
        .unwrap();
        assert_eq!(v.verify(&confused, 1), Err(AuthError::BadSignature));
        // Rotation: the file without k1 is read again; k1's tokens stop working.
        std::fs::write(&path, json!({"keys": [jwks[1]]}).to_string()).unwrap();
        assert_eq!(v.reload().unwrap(), 1);
        assert!(v.verify(&sign(Some("k1"), &keys[0]), 1).is_err());
        assert!(v.verify(&sign(None, &keys[1]), 1).is_ok());
        // A bad file is refused and the keys in use stay.
        std::fs::write(
            &path,
            "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
        )
        .unwrap();
        assert!(v.reload().is_err());
        assert!(v.verify(&sign(None, &keys[1]), 1).is_ok());
    }
}
