//! The CLI's side of the control socket.

use super::AGENT_UPGRADE;
use crate::agents::{AgentError, AgentHello, DialFuture, Dialer, Handshaken};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach hearthd at {path}: {source} (is it running? `hearth up` starts it)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("control protocol: {0}")]
    Http(String),
}

impl ControlError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ControlError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct ControlClient {
    socket: PathBuf,
}

impl ControlClient {
    pub fn new(socket: impl Into<PathBuf>) -> ControlClient {
        ControlClient {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ControlError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ControlError::Connect {
                    path: self.socket.display().to_string(),
                    source,
                })?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(send)
    }

    /// One API call; returns the envelope's `data`, or the error's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ControlError> {
        let mut send = self.connect().await?;
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "hearthd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ControlError::Http(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            ControlError::Http(format!(
                "{status}: not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        })?;
        if status.is_success() {
            Ok(v.get("data").cloned().unwrap_or(Value::Null))
        } else {
            Err(ControlError::Api {
                status: status.as_u16(),
                message: v
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_string(),
            })
        }
    }

    /// An agent connection through hearthd, handshake already done.
    pub async fn agent(&self, container: &str) -> Result<Handshaken, ControlError> {
        let mut send = self.connect().await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("/api/v1/containers/{container}/agent"))
            .header("host", "hearthd")
            .header("connection", "upgrade")
            .header("upgrade", AGENT_UPGRADE)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ControlError::Http(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(String::from))
                .unwrap_or_else(|| format!("HTTP {status}"));
            return Err(ControlError::Api { status, message });
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let hello = AgentHello {
            agent_version: header("x-hearth-agent-version").unwrap_or_default(),
            features: header("x-hearth-agent-features")
                .and_then(|f| f.parse().ok())
                .unwrap_or(0),
        };
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ControlError::Http(e.to_string()))?;
        let parts = upgraded
            .downcast::<TokioIo<UnixStream>>()
            .map_err(|_| ControlError::Http("upgraded connection is not a unix socket".into()))?;
        let conn = hearth_protocol::Conn::Unix(parts.io.into_inner());
        Ok(Handshaken::adopt(conn, parts.read_buf.to_vec(), hello))
    }
}

/// Reaches a container's agent through hearthd.
pub struct ControlDialer {
    pub client: ControlClient,
    pub container: String,
}

impl Dialer for ControlDialer {
    fn dial(&self) -> DialFuture<'_, Handshaken> {
        Box::pin(async move {
            self.client
                .agent(&self.container)
                .await
                .map_err(|e| match e {
                    ControlError::Connect { source, .. } => AgentError::Io(source),
                    other => AgentError::Unexpected(other.to_string()),
                })
        })
    }

    fn describe(&self) -> String {
        format!("{} via {}", self.container, self.client.socket.display())
    }
}
