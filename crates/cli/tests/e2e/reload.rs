//! Operating signals and edges of revocation: SIGHUP reloads and never ends the server; a
//! revocation covers the very second it is made in.

use super::common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// `deploy/ordo.service` reloads with `kill -HUP` (`systemctl reload ordo`). A server started
/// without TLS and without a JWKS file installs no SIGHUP handler, so the signal's default
/// action ends the process (and systemd does not restart it: SIGHUP counts as a clean exit for
/// `Restart=on-failure`).
#[tokio::test(flavor = "multi_thread")]
async fn sighup_does_not_end_a_server_without_tls_or_jwks() {
    let server = Server::start(&[]).await;
    assert_eq!(server.admin_get("/healthz").await.status, 200);
    let rc = unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "send SIGHUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alive = server.admin().get("/healthz").await;
    assert!(
        alive.as_ref().is_ok_and(|r| r.status == 200),
        "after SIGHUP (systemctl reload) the server is gone: {alive:?}\n{}",
        server.log_tail()
    );
}

/// `POST /v1/admin/revocations` without `before` refuses every token issued up to now, one
/// issued earlier in the same second included.
#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_refuses_a_token_issued_just_before_it() {
    let server = Server::start(&[]).await;
    let r = server
        .admin_post(
            "/v1/admin/tokens",
            json!({"user": "stolen", "device": "phone", "ttl_secs": 3600}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let minted: Value = serde_json::from_str(&r.body).expect("JSON");
    let token = minted["token"].as_str().expect("token").to_string();
    let r = server
        .admin_post("/v1/admin/revocations", json!({"user": "stolen"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = try_connect(&server, &token).await;
    assert!(
        got.as_ref().is_err_and(|m| m.contains("revoked")),
        "a token minted just before the revocation still connects: {got:?}"
    );
    // A `before` in milliseconds (a common slip) is refused rather than revoking for ages.
    let r = server
        .admin_post(
            "/v1/admin/revocations",
            json!({"user": "stolen", "before": now_secs() * 1000}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
}
