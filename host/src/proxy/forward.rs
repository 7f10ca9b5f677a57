//! Forwarding a request to a guest: HTTP/1.1 over an agent stream (to a kit service in
//! the agent, or to a port on the guest's loopback), or for an app listening on all of
//! the guest's addresses straight over the host's route to it (an agent hop costs ~25 µs
//! of CPU per request), through hyper's pooling client. The
//! client keeps each stream's HTTP connection alive between requests, keyed by
//! container and target, so the hot path opens no stream and makes no handshake; a
//! connection the guest closed is replaced by a fresh stream (itself taken from the
//! agent client's pool of already-handshaken connections).

use super::peer::Peer;
use crate::agents::AgentStream;
use crate::node::Node;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::http::uri::{Authority, Scheme};
use hyper::{header, HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long a direct connection to a guest's app may take before the agent is asked
/// (the guest is on this machine: a refusal is immediate, silence means a firewall).
const DIRECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long opening a stream to a guest may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a stream connects to inside a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Kit { slug: String, instance: u16 },
    Port(u16),
}

impl Backend {
    /// The pool key's host part: `{container}.{target}.guest` (a valid authority that
    /// names exactly one stream target).
    fn authority(&self, container_id: &str) -> String {
        match self {
            Backend::Kit { slug, instance } => {
                format!("{container_id}.kit-{slug}-{instance}.guest")
            }
            Backend::Port(p) => format!("{container_id}.port-{p}.guest"),
        }
    }

    fn from_authority(host: &str) -> Option<(String, Backend)> {
        let mut parts = host.split('.');
        let (id, target, tail) = (parts.next()?, parts.next()?, parts.next()?);
        if tail != "guest" || parts.next().is_some() {
            return None;
        }
        let backend = if let Some(p) = target.strip_prefix("port-") {
            Backend::Port(p.parse().ok()?)
        } else {
            let rest = target.strip_prefix("kit-")?;
            let (slug, n) = rest.rsplit_once('-')?;
            Backend::Kit {
                slug: slug.to_string(),
                instance: n.parse().ok()?,
            }
        };
        Some((id.to_string(), backend))
    }
}

/// A connection of hyper's client to a guest: straight to the guest's address for an
/// app listening on all addresses (what nginx would do; no agent in the path), or an
/// agent stream (kit services, and apps bound to the guest's loopback only).
pub enum GuestIo {
    Direct(TokioIo<tokio::net::TcpStream>),
    Agent(TokioIo<AgentStream>),
}

impl Connection for GuestIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for GuestIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GuestIo::Direct(s) => Pin::new(s).poll_read(cx, buf),
            GuestIo::Agent(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for GuestIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            GuestIo::Direct(s) => Pin::new(s).poll_write(cx, buf),
            GuestIo::Agent(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GuestIo::Direct(s) => Pin::new(s).poll_flush(cx),
            GuestIo::Agent(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GuestIo::Direct(s) => Pin::new(s).poll_shutdown(cx),
            GuestIo::Agent(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Connects straight to an app on the guest's address. `None` when nothing answers
/// there (refused: the app listens on the guest's loopback only, or not at all), so the
/// agent is asked instead.
async fn direct(ip: std::net::Ipv4Addr, port: u16) -> Option<tokio::net::TcpStream> {
    let connect = tokio::net::TcpStream::connect((ip, port));
    match tokio::time::timeout(DIRECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        _ => None,
    }
}

/// Opens agent streams for hyper's client: the URI's authority says which.
#[derive(Clone)]
pub struct AgentConnector {
    node: Arc<Node>,
}

/// Why a stream could not be opened; the proxy answers 502 with it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad backend address {0}")]
    Address(String),
    #[error("{0}")]
    Node(#[from] crate::node::NodeError),
    #[error("{0:#}")]
    Agent(crate::agents::AgentError),
    #[error("the guest's agent did not open the stream within {OPEN_TIMEOUT:?}")]
    Timeout,
}

impl tower::Service<Uri> for AgentConnector {
    type Response = GuestIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<GuestIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let node = self.node.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let (id, backend) = Backend::from_authority(host)
                .ok_or_else(|| ConnectError::Address(host.to_string()))?;
            let c = node.get(&id)?;
            if let Backend::Port(p) = backend {
                if let Some(s) = direct(c.ip, p).await {
                    return Ok(GuestIo::Direct(TokioIo::new(s)));
                }
            }
            let agent = node.agent(&c)?;
            let open = async {
                match backend {
                    Backend::Port(p) => agent.open_port(p).await,
                    Backend::Kit { slug, instance } => agent.open_kit(&slug, instance).await,
                }
            };
            // The agent client retries a guest that is still booting for longer than
            // a browser should wait.
            let stream = tokio::time::timeout(OPEN_TIMEOUT, open)
                .await
                .map_err(|_| ConnectError::Timeout)?
                .map_err(ConnectError::Agent)?;
            Ok(GuestIo::Agent(TokioIo::new(stream)))
        })
    }
}

pub type GuestClient = Client<AgentConnector, Body>;

pub fn client(node: Arc<Node>) -> GuestClient {
    Client::builder(TokioExecutor::new())
        // The guest sees the Host the browser asked for, as behind nginx's
        // `proxy_set_header Host $host`.
        .set_host(false)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build(AgentConnector { node })
}

/// Hop-by-hop headers (RFC 9110 7.6.1): meaningful for one connection only.
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<header::HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| header::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        if keep_upgrade && n == header::CONNECTION {
            continue;
        }
        h.remove(n);
    }
    h.remove("keep-alive");
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// The connection to a guest's app that a client's HTTPS connection used last, kept
/// for its next request. Over HTTP/1.1 keep-alive a client's requests come one after
/// another, so each finds the same guest connection idle and takes it without a pool
/// (no key to build and hash, no shared lock, no checkout), the way nginx's worker keeps
/// an upstream connection per request; requests that find it in use (HTTP/2's
/// concurrent streams) go through the pool.
pub(super) enum Pinned {
    Vacant,
    InUse,
    Direct {
        container: String,
        port: u16,
        tx: http1::SendRequest<Body>,
    },
    /// The app refused a direct connection (it listens on the guest's loopback only):
    /// this target goes through the agent, pooled.
    Refused {
        container: String,
        port: u16,
    },
}

/// A request sent on the pinned connection, or handed back unsent for the pool.
enum PinnedOutcome {
    Answered(Result<Response<Incoming>, String>),
    NotSent(Request<Body>),
}

async fn send_pinned(
    peer: &Peer,
    container: &str,
    guest_ip: Ipv4Addr,
    port: u16,
    mut req: Request<Body>,
) -> PinnedOutcome {
    let reuse = {
        let mut slot = peer.pinned();
        match std::mem::replace(&mut *slot, Pinned::InUse) {
            Pinned::InUse => return PinnedOutcome::NotSent(req),
            Pinned::Refused {
                container: c,
                port: p,
            } if c == container && p == port => {
                *slot = Pinned::Refused {
                    container: c,
                    port: p,
                };
                return PinnedOutcome::NotSent(req);
            }
            Pinned::Direct {
                container: c,
                port: p,
                tx,
            } if c == container && p == port && tx.is_ready() => Some(tx),
            // Another target, or a connection closed or still busy: replaced (a
            // dropped sender lets its connection end once idle).
            _ => None,
        }
    };
    let pin = |tx| {
        *peer.pinned() = Pinned::Direct {
            container: container.to_string(),
            port,
            tx,
        }
    };
    if let Some(mut tx) = reuse {
        match tx.try_send_request(req).await {
            Ok(resp) => {
                pin(tx);
                return PinnedOutcome::Answered(Ok(resp));
            }
            // Closed by the app between requests, before this one was written: a new
            // connection takes it.
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => {
                    *peer.pinned() = Pinned::Vacant;
                    return PinnedOutcome::Answered(Err(e.into_error().to_string()));
                }
            },
        }
    }
    let Some(stream) = direct(guest_ip, port).await else {
        *peer.pinned() = Pinned::Refused {
            container: container.to_string(),
            port,
        };
        return PinnedOutcome::NotSent(req);
    };
    let (mut tx, conn) = match http1::handshake(TokioIo::new(stream)).await {
        Ok(h) => h,
        Err(e) => {
            *peer.pinned() = Pinned::Vacant;
            return PinnedOutcome::Answered(Err(e.to_string()));
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("guest app connection: {e}");
        }
    });
    match tx.try_send_request(req).await {
        Ok(resp) => {
            pin(tx);
            PinnedOutcome::Answered(Ok(resp))
        }
        Err(mut e) => {
            *peer.pinned() = Pinned::Vacant;
            match e.take_message() {
                Some(r) => PinnedOutcome::NotSent(r),
                None => PinnedOutcome::Answered(Err(e.into_error().to_string())),
            }
        }
    }
}

/// What the guest answered, or why it could not.
pub enum Forwarded {
    Response(Response<Body>),
    /// No stream could be opened or the guest broke the exchange: 502 with this.
    Failed(String),
}

/// Through hyper's pooling client (agent streams, upgrades, concurrent HTTP/2 streams).
async fn send_pooled(
    client: &GuestClient,
    container_id: &str,
    backend: &Backend,
    mut req: Request<Body>,
) -> Result<Response<Incoming>, String> {
    let authority: Authority = backend
        .authority(container_id)
        .parse()
        .map_err(|_| format!("bad container id {container_id}"))?;
    let mut uri = std::mem::take(req.uri_mut()).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    *req.uri_mut() = Uri::from_parts(uri).map_err(|e| format!("bad request path: {e}"))?;
    client.request(req).await.map_err(|e| {
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string())
    })
}

/// Sends `req` to the guest's `backend` and returns the answer. An HTTP/1.1 upgrade
/// (WebSocket) that the guest accepts is spliced through end to end after the 101.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    client: &GuestClient,
    container_id: &str,
    guest_ip: Ipv4Addr,
    backend: &Backend,
    mut req: Request<Incoming>,
    host: &str,
    peer: &Peer,
) -> Forwarded {
    let upgrade = is_upgrade(req.headers());
    let inbound_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Origin form, as the guest sees it (the parsed path is reused, not parsed again);
    // the pool's path puts the authority in front.
    let mut uri = hyper::http::uri::Parts::default();
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
    );
    parts.uri = match Uri::from_parts(uri) {
        Ok(u) => u,
        Err(_) => return Forwarded::Failed("bad request path".into()),
    };
    // HTTP/2 from the browser carries the host in :authority; the guest speaks
    // HTTP/1.1 and needs a Host header.
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Ok(v) = header::HeaderValue::from_str(host) {
        parts.headers.insert(header::HOST, v);
    }
    if let Some(v) = &peer.forwarded_for {
        parts.headers.insert("x-forwarded-for", v.clone());
    }
    parts.headers.insert(
        "x-forwarded-proto",
        header::HeaderValue::from_static("https"),
    );
    let out = Request::from_parts(parts, Body::new(body));
    let sent = match backend {
        Backend::Port(port) if !upgrade => {
            match send_pinned(peer, container_id, guest_ip, *port, out).await {
                PinnedOutcome::Answered(r) => r,
                PinnedOutcome::NotSent(out) => {
                    send_pooled(client, container_id, backend, out).await
                }
            }
        }
        _ => send_pooled(client, container_id, backend, out).await,
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(why) => return Forwarded::Failed(why),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(inbound) = inbound_upgrade {
            let outbound = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(inbound, outbound) {
                    Ok((a, b)) => {
                        let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                    Err(e) => tracing::debug!("upgrade through the proxy failed: {e}"),
                }
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, switching);
    Forwarded::Response(Response::from_parts(parts, Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_round_trip_through_the_pool_key() {
        for b in [
            Backend::Port(8000),
            Backend::Kit {
                slug: "files".into(),
                instance: 2,
            },
        ] {
            let a = b.authority("abc123");
            assert_eq!(Backend::from_authority(&a), Some(("abc123".into(), b)));
        }
        assert_eq!(Backend::from_authority("abc.port-x.guest"), None);
        assert_eq!(Backend::from_authority("abc.port-80.example"), None);
        assert_eq!(Backend::from_authority("abc.kit-files.guest"), None);
    }

    #[test]
    fn hop_by_hop_headers_go_unless_upgrading() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "upgrade, x-private".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        assert!(is_upgrade(&h));
        let mut up = h.clone();
        strip_hop_by_hop(&mut up, true);
        assert!(up.contains_key(header::UPGRADE) && up.contains_key(header::CONNECTION));
        assert!(!up.contains_key("x-private") && !up.contains_key("keep-alive"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(header::UPGRADE) && !h.contains_key(header::CONNECTION));
        assert!(h.contains_key(header::ACCEPT));
    }
}
