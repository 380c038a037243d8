//! HTTP routes: the WebSocket upgrade at `/v1/ws`, `/v1/me` (what a client token says), health
//! and metrics, the admin API for groups and tokens (which needs the admin key as a bearer
//! token), and the web app ([`crate::web`]) unless it is turned off.

use crate::auth::{constant_time_eq, AuthError, Claims};
use crate::router::Command;
use crate::AppState;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ordo_core::{AdminOp, CoreError, Retention};
use ordo_protocol::{Encoding, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use tokio::sync::oneshot;

/// The server's routes; with `web`, the web app's too.
pub fn routes(state: AppState, web: bool) -> Router {
    let api = Router::new()
        .route("/v1/ws", get(ws_upgrade))
        .route("/v1/me", get(me).options(me_preflight))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/groups", post(create_group).get(list_groups))
        .route(
            "/v1/admin/groups/{id}",
            get(get_group).patch(update_group).delete(delete_group),
        )
        .route("/v1/admin/tokens", post(issue_token))
        .route("/v1/admin/revocations", post(revoke))
        .route("/v1/admin/messages", post(post_message))
        .route("/v1/admin/cluster", get(cluster_status));
    let app = match web {
        true => api.merge(crate::web::routes()),
        false => api,
    };
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such path; the HTTP API is in docs/protocol.md, section 7",
    )
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method; see docs/protocol.md, section 7",
    )
}

/// Most bytes of a plain-text error body carried into its JSON form.
const ERROR_TEXT_BYTES: usize = 4096;

/// Every error answer is JSON: one made by a layer below the handlers (the WebSocket upgrade's
/// refusals, for one) in plain text gets its text wrapped as `{"error":{"code","message"}}`,
/// with a code named after its status.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), ERROR_TEXT_BYTES).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string(),
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::TOO_MANY_REQUESTS => "too_many_connections",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "malformed",
    };
    error(status, code, text)
}

/// A JSON error response: `{"error": {"code": ..., "message": ...}}`.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// The credentials of an `Authorization: Bearer ...` header (the scheme is case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The claims of a client token, checked as the WebSocket upgrade checks them (signature,
/// expiry, revocations).
fn client_claims(state: &AppState, token: Option<&str>) -> Result<Claims, AuthError> {
    match token {
        None => Err(AuthError::Missing),
        Some(t) => state.tokens.verify(t, crate::router::now_ms() / 1000),
    }
}

/// Whom a client token names, if the server takes it: `{"user", "device", "exp"}` (`exp`: when
/// the server stops taking it, a JWT's leeway included), or 401 with the reason. A browser
/// cannot read why a WebSocket upgrade failed; this tells a refused token from a server that
/// cannot be reached.
async fn me(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut resp = match client_claims(&state, bearer(&headers)) {
        Ok(c) => Json(json!({"user": c.user, "device": c.device, "exp": c.exp})).into_response(),
        Err(e) => error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    // Any page may ask (an app served from another origin): the token is the credential.
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    resp
}

/// The CORS preflight of `GET /v1/me` with an `Authorization` header, from any origin.
async fn me_preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "authorization"),
            (header::ACCESS_CONTROL_MAX_AGE, "600"),
        ],
    )
        .into_response()
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    /// `json` (default) or `msgpack`: the encoding of frames sent before the client speaks.
    encoding: Option<String>,
}

/// Bytes read from a client socket at once (see [`ws_upgrade`]).
const READ_BUFFER: usize = 2048;

async fn ws_upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let token = bearer(&headers).or(q.token.as_deref());
    let claims = match client_claims(&state, token) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    let enc = match q.encoding.as_deref() {
        None | Some("json") => Encoding::Json,
        Some("msgpack") => Encoding::MsgPack,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("unknown encoding {other:?}; use json or msgpack"),
            )
        }
    };
    if *state.shutdown.borrow() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "server is shutting down",
        );
    }
    let Some(slot) = UserSlot::take(&state, &claims.user) else {
        metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "limit" => "max_connections_per_user")
            .increment(1);
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!(
                "user {} already has {} connections open, the most allowed (max_connections_per_user); close one",
                claims.user, state.users.max
            ),
        );
    };
    // A little above the limit, so that a frame just over it reaches our own check and gets a
    // proper 1009 close with a reason; anything larger is cut off by the WebSocket layer, which
    // also ends in 1009.
    let max = state.limits.max_frame_bytes + 1024;
    // The WebSocket layer zero-fills its read buffer up to this size before every read and keeps
    // it for the connection's life: small keeps idle connections cheap and reads fast (frames
    // larger than this are read in several steps).
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| crate::conn::run(socket, state, claims, enc, slot))
}

/// WebSocket connections per user, capped at `max_connections_per_user`.
pub(crate) struct UserConnections {
    pub max: usize,
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl UserConnections {
    pub fn new(max: usize) -> Self {
        UserConnections {
            max,
            open: Default::default(),
        }
    }
}

/// One of a user's connections; given back when dropped (the connection ended, or its upgrade
/// never happened).
pub(crate) struct UserSlot(std::sync::Arc<UserConnections>, String);

impl UserSlot {
    fn take(state: &AppState, user: &str) -> Option<UserSlot> {
        let users = &state.users;
        let mut open = users.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user.to_string()).or_insert(0);
        if *n >= users.max {
            return None;
        }
        *n += 1;
        Some(UserSlot(users.clone(), user.to_string()))
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics() -> Response {
    match crate::metrics::handle() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "another metrics recorder is installed in this process",
        ),
    }
}

/// Extractor that admits a request only with the admin key as its bearer token.
struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        match bearer(&parts.headers) {
            Some(k) if constant_time_eq(k.as_bytes(), state.admin_key.as_bytes()) => Ok(Admin),
            Some(_) => Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the admin key does not match this server's (--admin-key, ORDO_ADMIN_KEY or <data>/admin.key)",
            )),
            None => Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the admin API needs `Authorization: Bearer <admin key>` (see <data>/admin.key)",
            )),
        }
    }
}

/// A JSON request body whose errors are answered in the API's error format.
struct Body<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let value = match Json::<serde_json::Value>::from_request(req, state).await {
            Ok(Json(v)) => v,
            // A body past the limit keeps its 413; every other fault of the body is a 400.
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(error(e.status(), "too_large", e.body_text()))
            }
            Err(e) => return Err(error(StatusCode::BAD_REQUEST, "malformed", e.body_text())),
        };
        // serde reads a struct from an array of its fields too; the API takes objects only,
        // and arrays only of ids (strings).
        if !value.is_object() || !objects_and_string_lists(&value) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "malformed",
                "the body must be a JSON object, its lists lists of strings; see docs/protocol.md, section 7",
            ));
        }
        serde_json::from_value(value)
            .map(Body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, "malformed", e.to_string()))
    }
}

/// Whether every array in `v` holds only strings.
fn objects_and_string_lists(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Array(items) => items.iter().all(Value::is_string),
        Value::Object(map) => map.values().all(objects_and_string_lists),
        _ => true,
    }
}

/// A conversation's retention as the admin API takes it (unknown fields refused).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionBody {
    max_age_ms: Option<u64>,
    max_count: Option<u64>,
}

impl From<RetentionBody> for Retention {
    fn from(r: RetentionBody) -> Retention {
        Retention {
            max_age_ms: r.max_age_ms,
            max_count: r.max_count,
        }
    }
}

fn core_error(e: CoreError) -> Response {
    let status = match e {
        CoreError::NoSuchConversation(_) => StatusCode::NOT_FOUND,
        CoreError::AlreadyExists(_) => StatusCode::CONFLICT,
        CoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    let code = match e {
        CoreError::AlreadyExists(_) => "exists",
        _ => e.code().as_str(),
    };
    error(status, code, e.to_string())
}

/// How long an admin request waits for the router's answer.
const ADMIN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Hands the router a request made with a reply channel and waits for its answer; an error
/// response if the router is gone (shutting down), dropped the request (`lost` says what to
/// do), or refused it.
async fn ask_router<T>(
    state: &AppState,
    command: impl FnOnce(oneshot::Sender<Result<T, CoreError>>) -> Command,
    lost: &str,
) -> Result<T, Response> {
    let (reply, rx) = oneshot::channel();
    if state.router.send(command(reply)).await.is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown.as_str(),
            "server is shutting down",
        ));
    }
    match tokio::time::timeout(ADMIN_WAIT, rx).await {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(core_error(e)),
        Ok(Err(_)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable.as_str(),
            lost,
        )),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable.as_str(),
            format!(
                "no answer within {} s (the server is busy); the request may still take effect: {lost}",
                ADMIN_WAIT.as_secs()
            ),
        )),
    }
}

async fn run_admin(state: &AppState, op: AdminOp, status: StatusCode) -> Response {
    let lost = "the change could not be stored; retry";
    match ask_router(state, |reply| Command::Admin { op, reply }, lost).await {
        Ok(group) => (status, Json(group)).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroup {
    id: String,
    #[serde(default)]
    members: Vec<String>,
    retention: Option<RetentionBody>,
    name: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

async fn create_group(
    State(state): State<AppState>,
    _: Admin,
    Body(req): Body<CreateGroup>,
) -> Response {
    let op = AdminOp::CreateGroup {
        id: req.id,
        members: req.members,
        retention: req.retention.map(Retention::from).unwrap_or_default(),
        name: req.name,
        metadata: req.metadata,
    };
    run_admin(&state, op, StatusCode::CREATED).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateGroup {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
    /// Members who left on their own (recorded as `left`, not `removed`).
    #[serde(default)]
    leave: Vec<String>,
    retention: Option<RetentionBody>,
    name: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

async fn update_group(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    Body(req): Body<UpdateGroup>,
) -> Response {
    let op = AdminOp::UpdateGroup {
        id,
        add: req.add,
        remove: req.remove,
        leave: req.leave,
        retention: req.retention.map(Retention::from),
        name: req.name,
        metadata: req.metadata,
    };
    run_admin(&state, op, StatusCode::OK).await
}

async fn get_group(State(state): State<AppState>, _: Admin, Path(id): Path<String>) -> Response {
    let op = AdminOp::Get { id };
    let lost = "the group could not be read; retry";
    match ask_router(&state, |reply| Command::Admin { op, reply }, lost).await {
        Ok(g) => Json(g).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueToken {
    user: String,
    device: String,
    /// Lifetime in seconds (default 30 days).
    ttl_secs: Option<u64>,
}

/// The longest lifetime a token is issued with.
const MAX_TOKEN_TTL_SECS: u64 = 10 * 366 * 86_400;

async fn issue_token(
    State(state): State<AppState>,
    _: Admin,
    Body(req): Body<IssueToken>,
) -> Response {
    let now = crate::router::now_ms() / 1000;
    let ttl = req.ttl_secs.unwrap_or(crate::DEFAULT_TOKEN_TTL_SECS);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("ttl_secs is {ttl}; it must be 1 to {MAX_TOKEN_TTL_SECS} (10 years)"),
        );
    }
    let exp = now.saturating_add(ttl);
    let claims = Claims {
        user: req.user,
        device: req.device,
        exp,
        iat: Some(now),
    };
    match state.tokens.own.sign(&claims) {
        Ok(token) => Json(json!({"token": token, "exp": exp})).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoke {
    user: String,
    /// Only this device's tokens; every device's when absent.
    device: Option<String>,
    /// Tokens issued before this (unix seconds) are refused; now when absent.
    before: Option<u64>,
}

/// How far ahead a revocation's `before` may be.
const MAX_REVOKE_AHEAD_SECS: u64 = 366 * 86_400;

/// Stores a revocation, then answers; the connections it covers are closed with 4003.
async fn revoke(State(state): State<AppState>, _: Admin, Body(req): Body<Revoke>) -> Response {
    use ordo_protocol::{validate_id, IdKind};
    if let Err(e) = validate_id(IdKind::User, &req.user) {
        return error(StatusCode::BAD_REQUEST, "invalid", e.to_string());
    }
    if let Some(Err(e)) = req
        .device
        .as_deref()
        .map(|d| validate_id(IdKind::Device, d))
    {
        return error(StatusCode::BAD_REQUEST, "invalid", e.to_string());
    }
    let now = crate::router::now_ms() / 1000;
    // Without `before`: every token issued up to now, this second included (a token minted
    // in the same second as the revocation is refused too; mint the new one a second later).
    let before = req.before.unwrap_or(now + 1);
    if before > now + MAX_REVOKE_AHEAD_SECS {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("before is {before}, more than a year ahead: it is unix seconds (not milliseconds), and a revocation cannot be undone"),
        );
    }
    let tokens = state.tokens.clone();
    let done = tokio::task::spawn_blocking(move || {
        tokens
            .revocations
            .revoke(&req.user, req.device.as_deref(), before)
    })
    .await;
    match done {
        Ok(Ok(r)) => {
            tracing::info!(user = %r.user, device = ?r.device, before = r.before, "tokens revoked");
            Json(r).into_response()
        }
        Ok(Err(e @ crate::revocation::RevocationError::Full(_))) => {
            error(StatusCode::INSUFFICIENT_STORAGE, "full", e.to_string())
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot store a revocation");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    conv: Option<String>,
    to: Option<String>,
    /// The user it is posted as; the system when absent.
    from: Option<String>,
    cmid: String,
    body: String,
    reply_to: Option<u64>,
}

/// A message of the app's backend, answered once durable with its seq; the same `cmid` (of the
/// same `from`) again is answered with the same seq and `"duplicate": true`.
async fn post_message(
    State(state): State<AppState>,
    _: Admin,
    Body(req): Body<PostMessage>,
) -> Response {
    let post = ordo_core::AdminPost {
        conv: req.conv,
        to: req.to,
        from: req.from,
        cmid: req.cmid,
        body: req.body,
        reply_to: req.reply_to,
    };
    let lost = "the message could not be stored; post it again with the same cmid";
    match ask_router(&state, |reply| Command::Post { post, reply }, lost).await {
        Ok(p) => Json(json!({
            "conv": p.conv, "seq": p.seq, "ts": p.ts, "duplicate": p.duplicate
        }))
        .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListGroups {
    after: Option<String>,
    limit: Option<usize>,
}

/// One page of the groups, in id order: `{"groups": [...], "has_more": bool}`.
/// A cluster's node: the live nodes, and each partition's owner and epoch, as its lease keeper
/// last read them, with its counts of takeovers, handovers and lost leases.
async fn cluster_status(State(state): State<AppState>, _: Admin) -> Response {
    match &state.cluster {
        Some(s) => {
            let status = s.read().unwrap_or_else(|p| p.into_inner()).clone();
            Json(status).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this server is not a node of a cluster (started without --cluster)",
        ),
    }
}

async fn list_groups(
    State(state): State<AppState>,
    _: Admin,
    q: Result<Query<ListGroups>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed",
            "the query takes `after` (a group id) and `limit` (1 to 1000)",
        );
    };
    let limit = q.limit.unwrap_or(ordo_core::DEFAULT_GROUPS_LIMIT);
    if !(1..=ordo_core::MAX_GROUPS_LIMIT).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "limit is {limit}; it must be 1 to {}",
                ordo_core::MAX_GROUPS_LIMIT
            ),
        );
    }
    let store = state.store.clone();
    let page = tokio::task::spawn_blocking(move || store.groups(q.after.as_deref(), limit)).await;
    match page {
        Ok(Ok(p)) => Json(json!({"groups": p.groups, "has_more": p.has_more})).into_response(),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable.as_str(),
            format!("cannot read the groups: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Deletes a group: its members are removed (their connected devices told), its messages, name
/// and metadata go. `{"id": ..., "deleted": true}` once durable.
async fn delete_group(State(state): State<AppState>, _: Admin, Path(id): Path<String>) -> Response {
    let lost = "the deletion could not be stored; retry";
    let op = AdminOp::DeleteGroup { id };
    match ask_router(&state, |reply| Command::Admin { op, reply }, lost).await {
        Ok(g) => Json(json!({"id": g.id, "deleted": true})).into_response(),
        Err(r) => r,
    }
}
