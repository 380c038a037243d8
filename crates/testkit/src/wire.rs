//! A thin WebSocket client that speaks Ordo frames and nothing more: connect with a token,
//! send frames, receive frames. No retries, no state: it shows the raw protocol, which is what
//! the benchmarks and the end-to-end tests need. (Apps use the client SDK.)

use futures_util::{SinkExt, StreamExt};
use ordo_protocol::{decode_server, encode, ClientFrame, Encoded, Encoding, ServerFrame};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("cannot decode a server frame: {0}")]
    Decode(#[from] ordo_protocol::DecodeError),
    #[error("connection closed{}", .0.as_ref().map(|(c, r)| format!(" with {c}: {r}")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
    #[error("timed out waiting for a frame")]
    Timeout,
    #[error("bad request: {0}")]
    Request(String),
}

pub struct WireClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub encoding: Encoding,
}

impl WireClient {
    /// Connects to `base` (e.g. `ws://127.0.0.1:7400`) with the token in the Authorization
    /// header. The first frame, `welcome`, is left for the caller to read.
    pub async fn connect(base: &str, token: &str, encoding: Encoding) -> Result<Self, WireError> {
        Self::connect_from(base, token, encoding, None).await
    }

    /// Like [`connect`](Self::connect), from the local address `from` (so that more connections
    /// than one address has ports can be opened, over several 127.0.0.x addresses).
    pub async fn connect_from(
        base: &str,
        token: &str,
        encoding: Encoding,
        from: Option<std::net::IpAddr>,
    ) -> Result<Self, WireError> {
        let enc = match encoding {
            Encoding::Json => "json",
            Encoding::MsgPack => "msgpack",
        };
        let url = format!("{}/v1/ws?encoding={enc}", base.trim_end_matches('/'));
        let mut req = url.into_client_request()?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| WireError::Request(e.to_string()))?;
        req.headers_mut().insert("authorization", auth);
        let mut cfg = WebSocketConfig::default();
        cfg.max_message_size = Some(64 << 20);
        cfg.max_frame_size = Some(64 << 20);
        // The default (128 KiB) is zero-filled before every read: costly with many connections.
        cfg.read_buffer_size = 4 << 10;
        let ws = match from {
            None => {
                tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
                    .await?
                    .0
            }
            Some(ip) => {
                let host = req.uri().host().unwrap_or("127.0.0.1").to_string();
                let port = req.uri().port_u16().unwrap_or(80);
                let target = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| WireError::Request(format!("cannot resolve {host}: {e}")))?
                    .next()
                    .ok_or_else(|| WireError::Request(format!("{host} has no address")))?;
                let sock = match ip {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                }
                .and_then(|s| s.bind(std::net::SocketAddr::new(ip, 0)).map(|_| s))
                .map_err(|e| WireError::Request(format!("cannot bind to {ip}: {e}")))?;
                let tcp = sock
                    .connect(target)
                    .await
                    .map_err(|e| WireError::Request(format!("cannot connect to {target}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                tokio_tungstenite::client_async_with_config(
                    req,
                    MaybeTlsStream::Plain(tcp),
                    Some(cfg),
                )
                .await?
                .0
            }
        };
        Ok(WireClient { ws, encoding })
    }

    /// Queues a frame without flushing it (follow with [`flush`](Self::flush)): many frames,
    /// one write.
    pub async fn feed(&mut self, frame: &ClientFrame) -> Result<(), WireError> {
        let msg = match encode(frame, self.encoding) {
            Encoded::Text(s) => WsMessage::Text(s.into()),
            Encoded::Binary(b) => WsMessage::Binary(b.into()),
        };
        self.ws.feed(msg).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        self.ws.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), WireError> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// Sends a raw WebSocket message (for tests of malformed input).
    pub async fn send_raw(&mut self, msg: WsMessage) -> Result<(), WireError> {
        self.ws.send(msg).await?;
        Ok(())
    }

    /// Next server frame, skipping WebSocket pings.
    pub async fn recv(&mut self) -> Result<ServerFrame, WireError> {
        loop {
            let msg = match self.ws.next().await {
                None => return Err(WireError::Closed(None)),
                Some(m) => m?,
            };
            return Ok(match msg {
                WsMessage::Text(t) => decode_server(t.as_bytes(), Encoding::Json)?,
                WsMessage::Binary(b) => decode_server(&b, Encoding::MsgPack)?,
                WsMessage::Close(c) => {
                    return Err(WireError::Closed(
                        c.map(|f| (u16::from(f.code), f.reason.to_string())),
                    ))
                }
                _ => continue,
            });
        }
    }

    /// Like [`recv`](Self::recv) with a deadline.
    pub async fn recv_timeout(&mut self, d: Duration) -> Result<ServerFrame, WireError> {
        tokio::time::timeout(d, self.recv())
            .await
            .map_err(|_| WireError::Timeout)?
    }

    /// The raw next WebSocket message (frames and closes alike), for protocol tests.
    pub async fn recv_raw(&mut self, d: Duration) -> Result<Option<WsMessage>, WireError> {
        match tokio::time::timeout(d, self.ws.next()).await {
            Err(_) => Err(WireError::Timeout),
            Ok(None) => Ok(None),
            Ok(Some(m)) => Ok(Some(m?)),
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}
