//! The web app and `GET /v1/me`, against the real `ordo serve`: the page and its files are
//! served at `/` with their content types (and not at all with `--no-web`: `/` is then the
//! API's JSON 404), and `/v1/me` names the user and device of a token the server takes, and
//! refuses a missing, malformed, wrongly signed, expired or revoked one with 401 and the reason.

use ordo_server::auth::{Claims, TokenKey};
use ordo_testkit::{Admin, ServerOptions, ServerProcess};
use serde_json::{json, Value};

const SECRET: &str = "web-test-secret";

async fn start(extra: &[&str]) -> ServerProcess {
    let mut opts = ServerOptions::new(env!("CARGO_BIN_EXE_ordo"));
    opts.secret = Some(SECRET.into());
    opts.extra = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::block_in_place(|| ServerProcess::start(opts))
        .unwrap_or_else(|e| panic!("start ordo: {e}"))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `GET path` without credentials: status, content type, cache-control, body.
async fn get(server: &ServerProcess, path: &str) -> (u16, String, String, String) {
    let resp = reqwest::get(format!("{}{path}", server.http_url()))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (ctype, cache) = (header("content-type"), header("cache-control"));
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("read the body");
    (status, ctype, cache, body)
}

/// `GET /v1/me` with `authorization` as the whole header value (none: no header).
async fn me(server: &ServerProcess, authorization: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{}/v1/me", server.http_url()));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.expect("GET /v1/me");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("a JSON body");
    (status, body)
}

fn assert_unauthorized(got: (u16, Value), what: &str, reason: &str) {
    let (status, body) = got;
    assert_eq!(status, 401, "{what}: {body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(reason),
        "{what}: the message should say {reason:?}: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_app_is_served_at_the_root() {
    let server = start(&[]).await;
    for path in ["/", "/index.html"] {
        let (status, ctype, cache, body) = get(&server, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(ctype, "text/html; charset=utf-8", "{path}");
        assert_eq!(cache, "no-cache", "{path}");
        assert!(body.contains(r#"src="/assets/app.js""#), "{path}: {body}");
        assert!(body.contains(r#"href="/assets/app.css""#), "{path}: {body}");
    }
    for (path, want) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/sw.js", "text/javascript; charset=utf-8"),
    ] {
        let (status, ctype, cache, body) = get(&server, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(ctype, want, "{path}");
        assert_eq!(cache, "no-cache", "{path}");
        assert!(!body.is_empty(), "{path} is empty");
    }
    // No other site may frame the page, and it runs only this server's code.
    let resp = reqwest::get(format!("{}/", server.http_url()))
        .await
        .expect("GET /");
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .expect("ASCII");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    // The rest of the API is as it was: an unknown path is a JSON 404.
    let (status, ctype, _, body) = get(&server, "/assets/other.js").await;
    assert_eq!(status, 404, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_web_serves_no_app() {
    let server = start(&["--no-web"]).await;
    for path in [
        "/",
        "/index.html",
        "/assets/app.js",
        "/assets/app.css",
        "/sw.js",
    ] {
        let (status, ctype, _, body) = get(&server, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(ctype.starts_with("application/json"), "{path}: {ctype}");
        let v: Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(v["error"]["code"], "not_found", "{path}: {body}");
    }
    // The API still answers.
    let token = ordo_testkit::token(SECRET, "alice", "laptop", 3600).expect("token");
    let (status, body) = me(&server, Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn me_names_the_token_or_says_why_it_is_refused() {
    let server = start(&[]).await;

    // An Ordo token, with the scheme in any case.
    let token = ordo_testkit::token(SECRET, "alice", "laptop", 3600).expect("token");
    let exp = now_secs() + 3600;
    for scheme in ["Bearer", "bearer"] {
        let (status, body) = me(&server, Some(&format!("{scheme} {token}"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user"], "alice", "{body}");
        assert_eq!(body["device"], "laptop", "{body}");
        let got = body["exp"].as_u64().expect("exp is a number");
        assert!(got.abs_diff(exp) <= 5, "exp {got}, expected about {exp}");
    }

    // A JWT (HS256, keyed with the same secret): its `exp` as the server applies it, with the
    // leeway for clock skew (30 s by default).
    let claims = json!({"sub": "bob", "device": "phone", "iat": now_secs(), "exp": exp});
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign a JWT");
    let (status, body) = me(&server, Some(&format!("Bearer {jwt}"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["user"], &body["device"], body["exp"].as_u64()),
        (&json!("bob"), &json!("phone"), Some(exp + 30)),
        "{body}"
    );

    // Refused: no token, not a token, signed with another secret, expired.
    assert_unauthorized(me(&server, None).await, "no header", "no token");
    assert_unauthorized(
        me(&server, Some(&format!("Basic {token}"))).await,
        "another scheme",
        "no token",
    );
    assert_unauthorized(
        me(&server, Some("Bearer not-a-token")).await,
        "garbage",
        "malformed",
    );
    let forged = ordo_testkit::token("another-secret", "alice", "laptop", 3600).expect("token");
    assert_unauthorized(
        me(&server, Some(&format!("Bearer {forged}"))).await,
        "another secret",
        "signature",
    );
    let expired = TokenKey::new(SECRET.as_bytes())
        .sign(&Claims {
            user: "alice".into(),
            device: "laptop".into(),
            exp: now_secs() - 600,
            iat: Some(now_secs() - 3600),
        })
        .expect("sign");
    assert_unauthorized(
        me(&server, Some(&format!("Bearer {expired}"))).await,
        "expired",
        "expired",
    );

    // Revoked: every token carol had is refused from then on; alice's still works.
    let carol = ordo_testkit::token(SECRET, "carol", "tablet", 3600).expect("token");
    let (status, _) = me(&server, Some(&format!("Bearer {carol}"))).await;
    assert_eq!(status, 200);
    let admin = Admin::new(&server.http_url(), server.admin_key()).expect("admin client");
    let r = admin
        .post("/v1/admin/revocations", &json!({"user": "carol"}))
        .await
        .expect("revoke");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_unauthorized(
        me(&server, Some(&format!("Bearer {carol}"))).await,
        "revoked",
        "revoked",
    );
    let (status, body) = me(&server, Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 200, "{body}");
}

/// A page of any origin may ask `/v1/me` (the token is the credential, no cookie is involved):
/// the browser's preflight allows the `Authorization` header, and both answers allow any
/// origin, so an app served elsewhere tells a refused token from a server that is down.
#[tokio::test(flavor = "multi_thread")]
async fn me_may_be_asked_from_any_origin() {
    let server = start(&[]).await;
    let http = reqwest::Client::new();
    let pre = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/me", server.http_url()),
        )
        .header("origin", "https://chat.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("preflight");
    assert_eq!(pre.status(), 204);
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["access-control-allow-methods"], "GET");
    assert_eq!(h["access-control-allow-headers"], "authorization");
    for auth in [None, Some("Bearer nonsense")] {
        let mut req = http
            .get(format!("{}/v1/me", server.http_url()))
            .header("origin", "https://chat.example.com");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("GET /v1/me");
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    }
}
