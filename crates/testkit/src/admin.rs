//! The server's admin API, as the tools call it: create a group, mint a token, read
//! `/metrics`. One HTTP/1.1 request per connection, over hyper (already in the server's
//! dependency tree), so the `ordo` binary needs no general HTTP client for `ordo check`.

use crate::HarnessError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::time::Duration;

/// Longest wait for one admin request, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one server's admin API.
#[derive(Clone, Debug)]
pub struct Admin {
    /// `host:port`.
    authority: String,
    key: String,
}

/// An answer: its status and its body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Admin {
    /// The admin API at `base`, `http://host:port` or `ws://host:port` (a path is ignored),
    /// with `key`.
    pub fn new(base: &str, key: &str) -> Result<Self, HarnessError> {
        let rest = ["http://", "ws://"]
            .iter()
            .find_map(|p| base.strip_prefix(p))
            .ok_or_else(|| {
                HarnessError::Request(format!(
                    "{base:?} is not an http:// or ws:// address such as ws://127.0.0.1:7400 (TLS is not supported here)"
                ))
            })?;
        let authority = rest.split('/').next().unwrap_or(rest).to_string();
        if authority.is_empty() {
            return Err(HarnessError::Request(format!("{base:?} names no host")));
        }
        Ok(Admin {
            authority,
            key: key.to_string(),
        })
    }

    /// `GET path` (with the admin key).
    pub async fn get(&self, path: &str) -> Result<Reply, HarnessError> {
        self.request(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body (and the admin key).
    pub async fn patch(&self, path: &str, body: &serde_json::Value) -> Result<Reply, HarnessError> {
        self.request(Method::PATCH, path, Some(body.to_string()))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Reply, HarnessError> {
        self.request(Method::DELETE, path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Reply, HarnessError> {
        self.request(Method::POST, path, Some(body.to_string()))
            .await
    }

    /// Creates group `id` with `members`; an error unless the server answers 2xx.
    pub async fn create_group(&self, id: &str, members: &[String]) -> Result<(), HarnessError> {
        let r = self
            .post(
                "/v1/admin/groups",
                &serde_json::json!({"id": id, "members": members}),
            )
            .await?;
        r.success(&format!("create group {id}"))?;
        Ok(())
    }

    /// A token for `user`'s `device`, minted by the server.
    pub async fn token(&self, user: &str, device: &str) -> Result<String, HarnessError> {
        let r = self
            .post(
                "/v1/admin/tokens",
                &serde_json::json!({"user": user, "device": device}),
            )
            .await?;
        r.success("mint a token")?;
        let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| {
            HarnessError::Request(format!("the token endpoint answered something else: {e}"))
        })?;
        v["token"].as_str().map(str::to_string).ok_or_else(|| {
            HarnessError::Request(format!("the token endpoint returned no token: {}", r.body))
        })
    }

    /// The server's counters and gauges from `/metrics`, by their full name (labels included).
    pub async fn metrics(&self) -> Result<HashMap<String, f64>, HarnessError> {
        let r = self.get("/metrics").await?;
        r.success("read /metrics")?;
        Ok(r.body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<Reply, HarnessError> {
        let what = format!("{method} http://{}{path}", self.authority);
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, json))
            .await
            .map_err(|_| {
                HarnessError::Request(format!(
                    "{what}: no answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| HarnessError::Request(format!("{what}: {e}")))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let tcp = tokio::net::TcpStream::connect(self.authority.as_str()).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.authority.as_str())
            .header(AUTHORIZATION, format!("Bearer {}", self.key));
        if json.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok(Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

impl Reply {
    /// This reply if its status is 2xx, else an error naming `doing` and the answer.
    pub fn success(&self, doing: &str) -> Result<&Self, HarnessError> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(HarnessError::Request(format!(
                "cannot {doing}: the server answered {}: {}",
                self.status, self.body
            )))
        }
    }
}
