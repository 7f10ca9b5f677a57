//! The HTTPS listener: TLS (rustls, HTTP/1.1 and HTTP/2 by ALPN), then per request:
//! host name → guest and service ([`super::route`]), authorisation (default deny,
//! [`crate::auth`]), state (a stopped guest is 503 with `Retry-After`), and forwarding
//! over the guest's agent channel ([`super::forward`]); `api.{node}.{domain}` serves the
//! REST API with a project token.

use super::access_log::{self, AccessLog, Logged};
use super::forward::{self, Backend, Forwarded, GuestClient};
use super::peer::Peer;
use super::route::{self, RouteError, Service, Target};
use crate::auth::{self, ApiPrincipal, AuthError, Authorizer};
use crate::node::Node;
use crate::store::{ContainerRow, State};
use axum::body::Body;
use hyper::body::Incoming;
use hyper::{header, HeaderMap, Method, Request, Response, StatusCode};
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// Ports inside a guest that belong to the kit's own servers (display, code, browser
/// debugging), never to `http-<port>`: a user's URL must not reach them around the
/// kit's own routes.
pub const KIT_PORTS: std::ops::RangeInclusive<u16> = 7600..=7699;

/// How long a resolved host name is trusted before the store is asked again: a
/// stopped guest turns 503 within this.
const RESOLVE_TTL: Duration = Duration::from_secs(1);

/// A TLS handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A refusal: status and message.
type Denied = (StatusCode, String);

pub struct Proxy {
    node: Arc<Node>,
    auth: Arc<Authorizer>,
    api: axum::Router,
    /// The daemon's main runtime: REST API requests run there, beside the node's own
    /// work, not on a proxy worker.
    main: tokio::runtime::Handle,
    resolved: Mutex<HashMap<String, (Arc<ContainerRow>, Instant)>>,
}

impl Proxy {
    /// Must be called on the daemon's main runtime.
    pub fn new(node: Arc<Node>, auth: Arc<Authorizer>, api: axum::Router) -> Arc<Proxy> {
        Arc::new(Proxy {
            node,
            auth,
            api,
            main: tokio::runtime::Handle::current(),
            resolved: Mutex::default(),
        })
    }

    fn log(&self) -> &Arc<AccessLog> {
        &self.node.access_log
    }

    /// Serves HTTPS on `listen` with `workers` threads (0: one per CPU), the way nginx
    /// runs its workers: each thread has a runtime of its own, a listening socket of its
    /// own (`SO_REUSEPORT`, so the kernel spreads connections over them) and its own
    /// pool of connections to guests, so a request and its guest connection never
    /// cross threads (on a work-stealing runtime they did, ~a fifth of the proxy's CPU
    /// in wake-ups). The sockets are bound before this returns, so a taken port is
    /// reported at start; the returned future ends only if a worker does.
    pub fn spawn_workers(
        self: Arc<Self>,
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        workers: usize,
    ) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
        use anyhow::Context;
        let workers = match workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<String>(workers);
        for i in 0..workers {
            let socket = if listen.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .context("socket")?;
            socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
            socket.set_reuseport(true).context("SO_REUSEPORT")?;
            socket
                .bind(listen)
                .with_context(|| format!("bind the HTTPS listener on {listen}"))?;
            let (me, tls, done) = (self.clone(), tls.clone(), done_tx.clone());
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    let why = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(me.worker(socket, tls)),
                        Err(e) => format!("runtime: {e}"),
                    };
                    let _ = done.blocking_send(format!("proxy worker {i}: {why}"));
                })
                .context("start a proxy worker")?;
        }
        Ok(async move {
            let why = done_rx.recv().await.unwrap_or_default();
            anyhow::bail!("{why}")
        })
    }

    /// One worker's accept loop; returns why it ended.
    async fn worker(
        self: Arc<Self>,
        socket: tokio::net::TcpSocket,
        tls: Arc<rustls::ServerConfig>,
    ) -> String {
        let listener = match socket.listen(1024) {
            Ok(l) => l,
            Err(e) => return format!("listen: {e}"),
        };
        let pool = Arc::new(forward::client(self.node.clone()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: back off rather than spin.
                    tracing::warn!("proxy accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, me, pool) = (acceptor.clone(), self.clone(), pool.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                me.serve_connection(tls, peer, pool).await;
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        peer: SocketAddr,
        pool: Arc<GuestClient>,
    ) {
        let conn = Arc::new(Peer::new(peer.ip()));
        let svc = hyper::service::service_fn(move |req| {
            let (me, pool, conn) = (self.clone(), pool.clone(), conn.clone());
            async move { Ok::<_, Infallible>(me.handle(req, &conn, &pool).await) }
        });
        // A current-thread runtime per worker: tasks hyper spawns (HTTP/2 streams)
        // stay on it.
        let builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        if let Err(e) = builder
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), svc)
            .await
        {
            tracing::debug!(%peer, "proxy connection: {e}");
        }
    }

    /// One request, start to end: never fails, every outcome is an HTTP answer.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        pool: &GuestClient,
    ) -> Response<Body> {
        let client = peer.ip;
        let Some(host) = host_of(&req) else {
            return error(StatusCode::BAD_REQUEST, "the request names no host");
        };
        let cfg = &self.node.cfg.proxy;
        match route::parse(&host, &cfg.node, &cfg.domain) {
            Ok(Target::Api) => self.api(req, client).await,
            Ok(Target::Guest { prefix, service }) => {
                self.guest(req, peer, &host, &prefix, service, pool).await
            }
            Err(e @ RouteError::NotOurDomain { .. }) => {
                error(StatusCode::MISDIRECTED_REQUEST, &e.to_string())
            }
            Err(e @ RouteError::UnknownService { .. }) => {
                error(StatusCode::NOT_FOUND, &e.to_string())
            }
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        }
    }

    /// The container a host name's `{project}-{container}` names, through a short cache
    /// (the connection's own first, then the worker-shared one).
    fn resolve(&self, prefix: &str, peer: &Peer) -> Option<Arc<ContainerRow>> {
        if let Some(c) = peer.resolved(prefix, RESOLVE_TTL) {
            return Some(c);
        }
        {
            let cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((c, at)) = cache.get(prefix) {
                if at.elapsed() < RESOLVE_TTL {
                    peer.remember_resolved(prefix, c.clone(), *at);
                    return Some(c.clone());
                }
            }
        }
        let found = route::splits(prefix)
            .find_map(|(project, name)| self.node.get(&format!("{project}/{name}")).ok())
            .map(Arc::new)?;
        let now = Instant::now();
        peer.remember_resolved(prefix, found.clone(), now);
        let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(prefix.to_string(), (found.clone(), now));
        Some(found)
    }

    async fn guest(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
        host: &str,
        prefix: &str,
        service: Service,
        pool: &GuestClient,
    ) -> Response<Body> {
        let client = peer.ip;
        let started = Instant::now();
        let label = auth::service_label(&service);
        let backend = match service {
            Service::Port { tls: true, port } => {
                return error(
                    StatusCode::NOT_IMPLEMENTED,
                    &format!(
                    "https-{port}: TLS to the guest's own port is not supported; use http-{port}"
                ),
                )
            }
            Service::Port { port, .. } if KIT_PORTS.contains(&port) => {
                return error(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "port {port} is reserved for the kit's own services ({}-{})",
                        KIT_PORTS.start(),
                        KIT_PORTS.end()
                    ),
                )
            }
            Service::Port { port, .. } => Backend::Port(port),
            Service::Kit { slug, instance } => Backend::Kit {
                slug: slug.slug().to_string(),
                instance,
            },
        };
        let Some(c) = self.resolve(prefix, peer) else {
            // Say nothing about which names exist to someone without credentials.
            return match self.auth.check_api(req.headers(), client) {
                Err(e) => auth_error(e),
                Ok(_) => error(StatusCode::NOT_FOUND, &format!("no container {prefix}")),
            };
        };
        if req.uri().path() == auth::LINK_PATH {
            let query = req.uri().query();
            return match self
                .auth
                .redeem_link(client, &c.project, &c.id, &label, query)
            {
                Ok(r) => {
                    let mut resp = Response::new(Body::empty());
                    *resp.status_mut() = StatusCode::FOUND;
                    *resp.headers_mut() = r.headers();
                    resp
                }
                Err(e) => auth_error(e),
            };
        }
        if let Err(e) = self.auth.check_guest_on(
            &peer.grant,
            req.headers(),
            client,
            &c.project,
            &c.id,
            &label,
        ) {
            return auth_error(e);
        }
        if c.state != State::Running {
            return stopped(&c);
        }
        auth::strip_credentials(req.headers_mut());
        let entry = access_log::Entry {
            time: std::time::SystemTime::now(),
            method: req.method().clone(),
            host: host.to_string(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            status: 0,
            bytes: 0,
            duration_ms: 0.0,
            client,
            service: label,
        };
        let resp = match forward::forward(pool, &c.id, c.ip, &backend, req, host, peer).await {
            Forwarded::Response(r) => r,
            Forwarded::Failed(why) => {
                // The cached row may be a second old: a guest that has just stopped
                // is 503, not a broken gateway.
                self.resolved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(prefix);
                peer.forget_resolved();
                match self.node.get(&c.id) {
                    Ok(now) if now.state != State::Running => stopped(&now),
                    _ => error(
                        StatusCode::BAD_GATEWAY,
                        &format!("the guest did not answer: {why}"),
                    ),
                }
            }
        };
        let (parts, body) = resp.into_parts();
        let mut entry = entry;
        entry.status = parts.status.as_u16();
        let logged = Logged::new(
            body,
            access_log::Pending {
                log: self.log().clone(),
                container_id: c.id.clone(),
                started,
                entry,
            },
        );
        Response::from_parts(parts, Body::new(logged))
    }

    /// The REST API over HTTPS: the control API's routes, for a project token's own
    /// project only.
    async fn api(&self, req: Request<Incoming>, client: IpAddr) -> Response<Body> {
        let principal = match self.auth.check_api(req.headers(), client) {
            Ok(p) => p,
            Err(e) => return auth_error(e),
        };
        let (mut parts, body) = req.into_parts();
        let body = match self.scope(&principal, &mut parts) {
            Ok(()) => Body::new(body),
            Err((status, why)) => return error(status, &why),
        };
        // The routes that check ownership themselves (tokens, share) read it here.
        parts.extensions.insert(principal);
        let req = Request::from_parts(parts, body);
        let api = self.api.clone();
        match self.main.spawn(api.oneshot(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(never)) => match never {},
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("the API request failed: {e}"),
            ),
        }
    }

    /// What a project token may reach: its project, its project's containers, and the
    /// node's health and API description. Listing every container is narrowed to the
    /// project's; the raw agent channel stays on the control socket.
    fn scope(
        &self,
        who: &ApiPrincipal,
        parts: &mut hyper::http::request::Parts,
    ) -> Result<(), Denied> {
        let ApiPrincipal::Project(project) = who;
        let path = parts.uri.path().to_string();
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let forbidden = |what: &str| {
            Err((
                StatusCode::FORBIDDEN,
                format!("this token is for project {project}; {what}"),
            ))
        };
        match segs.as_slice() {
            ["", "api", "v1", "health"] | ["", "api", "v1", "openapi.json"] => Ok(()),
            ["", "api", "v1", "projects"] => {
                forbidden("list or create projects on the control socket")
            }
            ["", "api", "v1", "projects", p, ..] if p == project => Ok(()),
            ["", "api", "v1", "projects", ..] => forbidden("it cannot reach other projects"),
            ["", "api", "v1", "containers"] if parts.method == Method::GET => {
                let q = parts
                    .uri
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                let narrowed = format!("/api/v1/projects/{project}/containers{q}");
                parts.uri = narrowed
                    .parse()
                    .map_err(|_| (StatusCode::BAD_REQUEST, "bad query string".to_string()))?;
                Ok(())
            }
            ["", "api", "v1", "containers", _, "agent"] => {
                forbidden("the raw agent channel is only on the control socket")
            }
            ["", "api", "v1", "containers", id, ..] => self.owned(project, id),
            _ => Ok(()),
        }
    }

    fn owned(&self, project: &str, id: &str) -> Result<(), Denied> {
        match self.node.get(id) {
            Ok(c) if c.project == project => Ok(()),
            Ok(_) => Err((
                StatusCode::FORBIDDEN,
                format!("container {id} is not in project {project}"),
            )),
            Err(_) => Err((StatusCode::NOT_FOUND, format!("container {id} not found"))),
        }
    }
}

/// 503 with `Retry-After`: the guest exists but is not running.
fn stopped(c: &ContainerRow) -> Response<Body> {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("container {} is {}", c.name, c.state.as_str()),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    r
}

fn host_of(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// An error in the API's shape, `{statusCode, error, message}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = json!({
        "statusCode": status.as_u16(),
        "error": status.canonical_reason().unwrap_or("Error"),
        "message": message,
    });
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn auth_error(e: AuthError) -> Response<Body> {
    let mut r = error(e.status(), &e.to_string());
    let extra: HeaderMap = e.headers();
    for (k, v) in extra.iter() {
        r.headers_mut().append(k, v.clone());
    }
    r
}
