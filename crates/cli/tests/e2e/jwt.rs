//! Standard JWTs and revocation, against the real server: HS256 with the server secret, RS256
//! and ES256 with keys from a JWKS file, every refusal a 401 that says why; revoking a device
//! or a user closes its live connections with 4003, and the revocation survives a `kill -9`.

use super::common::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use ordo_protocol::{Encoding, ServerFrame};
use ordo_testkit::wire::WireClient;
use serde_json::{json, Value};

const RSA_PEM: &str = include_str!("keys/rsa-test.pem");
const RSA_JWKS: &str = include_str!("keys/rsa-test.jwks.json");
const ISSUER: &str = "https://app.test";
const AUDIENCE: &str = "ordo-test";

/// A JWKS file with the test RSA key (`rsa-1`) and a fresh P-256 key (`ec-1`); its signing key.
fn jwks_file(dir: &std::path::Path) -> (std::path::PathBuf, EncodingKey) {
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
    let raw = ec.public_key_raw();
    let mut set: Value = serde_json::from_str(RSA_JWKS).expect("test JWKS");
    set["keys"].as_array_mut().expect("keys").push(json!({
        "kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    }));
    let path = dir.join("jwks.json");
    std::fs::write(&path, set.to_string()).expect("write JWKS");
    let key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("EC signing key");
    (path, key)
}

fn claims(user: &str, device: &str) -> Value {
    let now = now_secs();
    json!({"sub": user, "device": device, "iat": now - 5, "exp": now + 3600,
        "iss": ISSUER, "aud": AUDIENCE})
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, key).expect("sign a JWT")
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

async fn connect_with(server: &Server, token: &str, user: &str, device: &str) -> Client {
    let wire = WireClient::connect(&server.ws_url(), token, Encoding::Json)
        .await
        .unwrap_or_else(|e| panic!("connect {user}/{device}: {e}"));
    let mut c = Client {
        wire,
        user: user.into(),
        device: device.into(),
    };
    assert!(matches!(c.next().await, ServerFrame::Welcome { .. }));
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn jwts_are_accepted_and_refused_by_the_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (jwks, ec_key) = jwks_file(dir.path());
    let rsa_key = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).expect("RSA key");
    let server = Server::start(&[
        "--jwks",
        jwks.to_str().expect("path"),
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ])
    .await;
    let good = claims("alice", "phone");
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().expect("object").remove(k);
        c
    };

    // Accepted: each algorithm with its own key.
    let accepted = [
        ("HS256, server secret", hs256(&good)),
        (
            "RS256, kid rsa-1",
            sign(Algorithm::RS256, Some("rsa-1"), &good, &rsa_key),
        ),
        (
            "RS256, no kid (the only RSA key)",
            sign(Algorithm::RS256, None, &good, &rsa_key),
        ),
        (
            "ES256, kid ec-1",
            sign(Algorithm::ES256, Some("ec-1"), &good, &ec_key),
        ),
        (
            "exp a few seconds ago, within the leeway",
            hs256(&with("exp", json!(now_secs() - 5))),
        ),
        // Ordo's own tokens still work beside JWTs.
        ("own token", token("alice", "phone")),
    ];
    for (what, t) in &accepted {
        assert_eq!(
            try_connect(&server, t).await,
            Ok(("alice".to_string(), "phone".to_string())),
            "{what}"
        );
    }

    // Refused, each with its reason.
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    let other_ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
    let other_ec = EncodingKey::from_ec_pem(other_ec.serialize_pem().as_bytes()).expect("key");
    let refused = [
        (
            "expired",
            hs256(&with("exp", json!(now_secs() - 120))),
            "expired",
        ),
        ("no exp", hs256(&without("exp")), "exp"),
        (
            "wrong aud",
            hs256(&with("aud", json!("someone-else"))),
            "audience",
        ),
        ("no aud", hs256(&without("aud")), "audience"),
        (
            "wrong iss",
            hs256(&with("iss", json!("https://evil.test"))),
            "issuer",
        ),
        (
            "not yet valid",
            hs256(&with("nbf", json!(now_secs() + 600))),
            "not valid before",
        ),
        ("no device", hs256(&without("device")), "device"),
        (
            "HS256, wrong secret",
            sign(
                Algorithm::HS256,
                None,
                &good,
                &EncodingKey::from_secret(b"not the secret"),
            ),
            "signature",
        ),
        (
            "ES256, a key not in the JWKS, kid ec-1",
            sign(Algorithm::ES256, Some("ec-1"), &good, &other_ec),
            "signature",
        ),
        (
            "ES256 naming the RSA key",
            sign(Algorithm::ES256, Some("rsa-1"), &good, &ec_key),
            "RS256",
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("rsa-9"), &good, &rsa_key),
            "rsa-9",
        ),
        ("alg none", unsigned, "none"),
        (
            "HS256 keyed with the public JWKS (algorithm confusion)",
            sign(
                Algorithm::HS256,
                None,
                &good,
                &EncodingKey::from_secret(&std::fs::read(&jwks).expect("read JWKS")),
            ),
            "signature",
        ),
        (
            "HS384",
            sign(
                Algorithm::HS384,
                None,
                &good,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            ),
            "HS384",
        ),
    ];
    for (what, t, why) in &refused {
        match try_connect(&server, t).await {
            Ok(who) => panic!("{what}: accepted as {who:?}"),
            Err(msg) => assert!(msg.contains(why), "{what}: {msg:?} should say {why:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_closes_live_connections_and_survives_a_kill() {
    let mut server = Server::start(&[]).await;
    let phone_token = hs256(&json!({"sub": "alice", "device": "phone",
        "iat": now_secs() - 5, "exp": now_secs() + 3600}));
    let laptop_token = token("alice", "laptop");
    let mut phone = connect_with(&server, &phone_token, "alice", "phone").await;
    let mut laptop = connect_with(&server, &laptop_token, "alice", "laptop").await;
    let mut bob = Client::connect(&server, "bob", "phone").await;

    // Bad requests are refused with a reason.
    let r = server
        .admin_post("/v1/admin/revocations", json!({"user": "not valid!"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = ordo_testkit::Admin::new(&server.http_url(), "wrong key")
        .expect("admin client")
        .post("/v1/admin/revocations", &json!({"user": "alice"}))
        .await
        .expect("POST");
    assert_eq!(r.status, 401, "{}", r.body);

    // One device: its connection is closed with 4003, the other device stays.
    let r = server
        .admin_post(
            "/v1/admin/revocations",
            json!({"user": "alice", "device": "phone"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body: Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(body["device"], "phone");
    let (code, reason) = expect_close(&mut phone).await;
    assert_eq!(code, 4003, "{reason}");
    laptop.ping(1).await;
    let refused = try_connect(&server, &phone_token).await;
    assert!(
        refused.as_ref().is_err_and(|m| m.contains("revoked")),
        "{refused:?}"
    );

    // The whole user, from a time given: the laptop's token (issued before) goes too.
    let r = server
        .admin_post(
            "/v1/admin/revocations",
            json!({"user": "alice", "before": now_secs() + 1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (code, _) = expect_close(&mut laptop).await;
    assert_eq!(code, 4003);
    bob.ping(2).await;

    // After a kill -9 the revocations hold; a token issued after them works.
    server.kill9();
    server.restart().await;
    for t in [&phone_token, &laptop_token] {
        let r = try_connect(&server, t).await;
        assert!(r.as_ref().is_err_and(|m| m.contains("revoked")), "{r:?}");
    }
    let fresh = hs256(&json!({"sub": "alice", "device": "phone",
        "iat": now_secs() + 2, "exp": now_secs() + 3600}));
    assert_eq!(
        try_connect(&server, &fresh).await,
        Ok(("alice".to_string(), "phone".to_string()))
    );
    assert!(try_connect(&server, &token("bob", "phone")).await.is_ok());
}
