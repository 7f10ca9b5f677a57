//! Who may pass the HTTPS front door. Default deny: a request to a guest service passes
//! only because the operator made that service public, or with a cookie minted from a
//! capability link for exactly that service ([`links`]), or with an API token of the
//! container's project ([`tokens`]). The REST API takes tokens only. Repeated failures
//! from one client are refused for a while ([`limiter`]).
//!
//! [`Authorizer`] is what the proxy calls, once per request, with the parsed host
//! ([`crate::proxy::route`]) already resolved to a project and container. It works on
//! headers and the client address only, so it does not care which HTTP stack carries
//! them.

mod decisions;
mod limiter;
pub mod links;
pub mod tokens;

pub use links::{check_ttl, parse_ttl, COOKIE_NAME, LINK_PATH, TTL_MAX, TTL_MIN};
pub use tokens::NewToken;

use crate::config::{Config, ProxyConfig};
use crate::node::Node;
use crate::proxy::route::{self, Kit, Service};
use crate::store::{ApiTokenRow, Store, StoreError};
use hyper::http::{header, HeaderMap, HeaderValue, StatusCode};
use links::{Claims, KeyCell, LinkError};
use serde::Serialize;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Failed attempts a client may make per [`FAILURE_WINDOW`] before it gets 429s.
pub const MAX_FAILURES: usize = 20;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Clients the limiter remembers at most (a few hundred bytes each).
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// Access to the node's store. The proxy hands over its `Arc<Node>`; tests a bare store.
pub trait StoreAccess: Send + Sync {
    fn store(&self) -> MutexGuard<'_, Store>;
}

impl StoreAccess for Node {
    fn store(&self) -> MutexGuard<'_, Store> {
        Node::store(self)
    }
}

impl StoreAccess for Mutex<Store> {
    fn store(&self) -> MutexGuard<'_, Store> {
        // As Node::store: a panic mid-query leaves SQLite consistent.
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a guest request was let through (for logs; any grant means forward it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Public,
    /// A capability cookie, valid until `expires` (unix seconds).
    Link {
        expires: u64,
    },
    Token {
        token_id: String,
    },
}

/// The credential headers of a request, as sent (`None`: more than one `Cookie`
/// header, which is not remembered).
#[derive(PartialEq, Eq)]
struct Credentials {
    authorization: Option<header::HeaderValue>,
    cookie: Option<header::HeaderValue>,
}

impl Credentials {
    fn of(headers: &HeaderMap) -> Option<Credentials> {
        let mut cookies = headers.get_all(header::COOKIE).iter();
        let cookie = cookies.next().cloned();
        if cookies.next().is_some() {
            return None;
        }
        Some(Credentials {
            authorization: headers.get(header::AUTHORIZATION).cloned(),
            cookie,
        })
    }
}

struct Remembered {
    creds: Credentials,
    container_id: String,
    service: String,
    generation: u64,
    /// A link's cookie: unix seconds.
    expires: Option<u64>,
}

/// The grant one client connection last earned; see [`Authorizer::check_guest_on`].
#[derive(Default)]
pub struct ConnectionGrant {
    last: std::sync::Mutex<Option<Remembered>>,
}

impl ConnectionGrant {
    fn holds(
        &self,
        creds: &Option<Credentials>,
        container_id: &str,
        service: &str,
        generation: u64,
    ) -> bool {
        let Some(creds) = creds else { return false };
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().is_some_and(|r| {
            r.generation == generation
                && &r.creds == creds
                && r.container_id == container_id
                && r.service == service
                && r.expires.is_none_or(|exp| links::now_unix() < exp)
        })
    }

    fn remember(&self, r: Remembered) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }
}

/// Who is calling the REST API. A project token reaches that project's resources only;
/// see [`ApiPrincipal::may_access`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiPrincipal {
    Project(String),
}

impl ApiPrincipal {
    pub fn may_access(&self, project: &str) -> bool {
        match self {
            ApiPrincipal::Project(p) => p == project,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Status 401. With `invalid_token`, credentials were sent but are wrong (RFC 6750's
    /// error code). With `clear_cookie`, the request carried a capability cookie that no
    /// longer works, so the answer deletes it rather than have the browser retry it
    /// forever.
    #[error("{message}")]
    Unauthorized {
        message: &'static str,
        invalid_token: bool,
        clear_cookie: bool,
    },
    /// Status 403: a valid token, of another project.
    #[error("{0}")]
    Forbidden(String),
    /// Status 429, with `Retry-After: retry_after` (seconds).
    #[error("too many failed attempts from this address; retry in {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// Status 400.
    #[error("{0}")]
    Invalid(String),
    /// Status 404.
    #[error("{0}")]
    NotFound(String),
    /// Status 500: the store or the key file failed; the request is refused, not let through.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => AuthError::NotFound(format!("{m} not found")),
            other => AuthError::Internal(other.to_string()),
        }
    }
}

impl AuthError {
    fn unauthorized(message: &'static str) -> AuthError {
        AuthError::Unauthorized {
            message,
            invalid_token: false,
            clear_cookie: false,
        }
    }

    fn invalid_token(message: &'static str) -> AuthError {
        AuthError::Unauthorized {
            message,
            invalid_token: true,
            clear_cookie: false,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AuthError::Invalid(_) => StatusCode::BAD_REQUEST,
            AuthError::NotFound(_) => StatusCode::NOT_FOUND,
            AuthError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Headers the error response must carry: `WWW-Authenticate` on a 401 (and the
    /// deletion of a dead cookie), `Retry-After` on a 429.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        match self {
            AuthError::Unauthorized {
                invalid_token,
                clear_cookie,
                ..
            } => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(if *invalid_token {
                        r#"Bearer realm="hearth", error="invalid_token""#
                    } else {
                        r#"Bearer realm="hearth""#
                    }),
                );
                if *clear_cookie {
                    if let Ok(v) = HeaderValue::from_str(&links::set_cookie("", 0)) {
                        h.insert(header::SET_COOKIE, v);
                    }
                }
            }
            AuthError::RateLimited { retry_after } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        h
    }
}

/// A redeemed link: answer `302 Found` with [`Redeemed::headers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    /// The `Set-Cookie` value.
    pub set_cookie: String,
    /// Where to send the browser: `/`, or the link's `next` path on the same host.
    pub location: String,
}

impl Redeemed {
    /// `Location` and `Set-Cookie`, plus `Cache-Control: no-store` and
    /// `Referrer-Policy: no-referrer`, so the link's token is neither cached nor passed
    /// on in a `Referer`.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        // Both values were checked to be visible ASCII when they were made.
        if let Ok(v) = HeaderValue::from_str(&self.location) {
            h.insert(header::LOCATION, v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.set_cookie) {
            h.insert(header::SET_COOKIE, v);
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h
    }
}

/// A capability link, as `hearth share` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Share {
    pub url: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// The canonical label of a guest service: `files-1`, `workspaces-2` (also when the
/// host said `agent-2`), `http-8000`, `https-8443`. Grants and public services are
/// recorded under it, so every spelling of a service is the same service.
pub fn service_label(service: &Service) -> String {
    match *service {
        Service::Kit { slug, instance } => format!("{}-{instance}", slug.slug()),
        Service::Port { port, tls: false } => format!("http-{port}"),
        Service::Port { port, tls: true } => format!("https-{port}"),
    }
}

/// Reads a service as users write it (`files-1`, `files` for instance 1, `agent-1`,
/// `http-8000`, `http` for port 80) with the proxy's own grammar, and returns its
/// canonical label.
pub fn parse_service(label: &str) -> Result<String, AuthError> {
    let invalid = |why: String| {
        AuthError::Invalid(format!(
            "service {label:?}: {why} (use a kit service and instance such as files-1 or \
             terminal-2, or http-<port>)"
        ))
    };
    let lower = label.to_ascii_lowercase();
    if lower.is_empty()
        || lower.len() > 20
        || !lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid("not a service name".into()));
    }
    let lower = match Kit::from_slug(&lower) {
        Some(kit) => format!("{}-1", kit.slug()),
        None => lower,
    };
    // Parsed as part of a host name, exactly as the proxy will see it.
    match route::parse(&format!("p-c-{lower}.n.d"), "n", "d") {
        Ok(route::Target::Guest { prefix, service }) if prefix == "p-c" => {
            Ok(service_label(&service))
        }
        Ok(_) => Err(invalid("not a service name".into())),
        Err(route::RouteError::UnknownService { service, .. }) => {
            Err(invalid(format!("no service {service:?}")))
        }
        Err(route::RouteError::BadNumber { what, value, .. }) => Err(invalid(format!(
            "{what} {value:?} is not a number from 1 to 65535"
        ))),
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// Removes hearth's own credentials from a request before it is forwarded to a guest:
/// our bearer tokens (which reach the whole project) and capability cookies. A guest's
/// own `Authorization` schemes and cookies pass untouched.
pub fn strip_credentials(headers: &mut HeaderMap) {
    let ours = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(tokens::is_ours);
    if ours {
        headers.remove(header::AUTHORIZATION);
    }
    let cookies: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if cookies.is_empty() {
        return;
    }
    headers.remove(header::COOKIE);
    for value in cookies {
        let Ok(text) = value.to_str() else {
            headers.append(header::COOKIE, value);
            continue;
        };
        let kept: Vec<&str> = text
            .split(';')
            .map(str::trim)
            .filter(|pair| {
                !pair.is_empty()
                    && pair
                        .split_once('=')
                        .is_none_or(|(name, _)| name.trim() != COOKIE_NAME)
            })
            .collect();
        if kept.is_empty() {
            continue;
        }
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.append(header::COOKIE, v);
        }
    }
}

pub struct Authorizer {
    store: Arc<dyn StoreAccess>,
    /// The store's access generation, read without its lock.
    generation: Arc<std::sync::atomic::AtomicU64>,
    decisions: decisions::Decisions,
    proxy: ProxyConfig,
    key: KeyCell,
    limiter: limiter::Limiter,
}

impl Authorizer {
    /// Cheap: the signing key is read (or made) on first use, or by
    /// [`Authorizer::load_key`] for a caller that wants to fail at start-up instead.
    pub fn new(cfg: &Config, store: Arc<dyn StoreAccess>) -> Authorizer {
        let generation = store.store().access_generation_counter();
        Authorizer {
            store,
            generation,
            decisions: decisions::Decisions::default(),
            proxy: cfg.proxy.clone(),
            key: KeyCell::new(cfg.state_dir.join(links::KEY_FILE)),
            limiter: limiter::Limiter::new(MAX_FAILURES, FAILURE_WINDOW, MAX_TRACKED_CLIENTS),
        }
    }

    pub fn load_key(&self) -> Result<(), AuthError> {
        self.signing_key().map(|_| ())
    }

    fn signing_key(&self) -> Result<&links::SigningKey, AuthError> {
        self.key.get().map_err(|e| {
            tracing::error!("link signing key: {e}");
            AuthError::Internal(format!("link signing key: {e}"))
        })
    }

    fn limit(&self, client: IpAddr) -> Result<(), AuthError> {
        self.limiter
            .check(client, Instant::now())
            .map_err(|wait| AuthError::RateLimited {
                retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            })
    }

    /// Counts a failure against `client` and passes `err` on.
    fn fail(&self, client: IpAddr, err: AuthError) -> AuthError {
        self.limiter.record_failure(client, Instant::now());
        tracing::debug!(%client, "auth failed: {err}");
        err
    }

    /// The live token `token` names, through the decision cache; its use is recorded
    /// when the store was asked anyway (throttled further by [`tokens::touch`]).
    fn token(&self, store: &Store, token: &str) -> Result<Option<ApiTokenRow>, AuthError> {
        if !tokens::well_formed(token) {
            return Ok(None);
        }
        let (row, fresh) = self.decisions.token(store, &tokens::hash(token))?;
        if let (Some(r), true) = (&row, fresh) {
            tokens::touch(store, r);
        }
        Ok(row)
    }

    /// [`Authorizer::check_guest`] once per client connection and credentials: the
    /// connection's next requests with the same `Authorization` and `Cookie` headers to
    /// the same service are let through on the remembered grant, until anything about
    /// access changes anywhere (the store's access generation moves: a revoked token
    /// stops working on open connections at once) or a link's cookie expires.
    pub fn check_guest_on(
        &self,
        conn: &ConnectionGrant,
        headers: &HeaderMap,
        client: IpAddr,
        project: &str,
        container_id: &str,
        service: &str,
    ) -> Result<(), AuthError> {
        // Read before the check: a change during it makes the grant stale at once.
        let generation = self.generation.load(std::sync::atomic::Ordering::Relaxed);
        let creds = Credentials::of(headers);
        if conn.holds(&creds, container_id, service, generation) {
            return Ok(());
        }
        let grant = self.check_guest(headers, client, project, container_id, service)?;
        if let Some(creds) = creds {
            conn.remember(Remembered {
                creds,
                container_id: container_id.to_string(),
                service: service.to_string(),
                generation,
                expires: match grant {
                    Grant::Link { expires } => Some(expires),
                    _ => None,
                },
            });
        }
        Ok(())
    }

    /// May this request reach `service` (a canonical label, see [`service_label`]) of
    /// container `container_id` in `project`?
    pub fn check_guest(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
        project: &str,
        container_id: &str,
        service: &str,
    ) -> Result<Grant, AuthError> {
        let store = self.store.store();
        if self.decisions.is_public(&store, container_id, service)? {
            return Ok(Grant::Public);
        }
        self.limit(client)?;

        let mut dead_cookie = false;
        let mut cookies = links::cookies(headers).peekable();
        if cookies.peek().is_some() {
            let key = self.signing_key()?;
            let now = links::now_unix();
            for value in cookies {
                match key.verify(value, now) {
                    Ok(c) if c.names(project, container_id, service) => {
                        return Ok(Grant::Link { expires: c.exp });
                    }
                    _ => dead_cookie = true,
                }
            }
        }

        match tokens::bearer(headers) {
            Some(Some(token)) => match self.token(&store, token)? {
                Some(row) if row.project == project => {
                    return Ok(Grant::Token { token_id: row.id });
                }
                Some(row) => {
                    return Err(AuthError::Forbidden(format!(
                        "this API token belongs to project {}, not {project}",
                        row.project
                    )));
                }
                None => {
                    return Err(self.fail(
                        client,
                        AuthError::Unauthorized {
                            message: "invalid or revoked API token",
                            invalid_token: true,
                            clear_cookie: dead_cookie,
                        },
                    ));
                }
            },
            Some(None) => {
                return Err(self.fail(
                    client,
                    AuthError::Unauthorized {
                        message: "the Authorization header must be `Bearer <token>`",
                        invalid_token: true,
                        clear_cookie: dead_cookie,
                    },
                ));
            }
            None => {}
        }
        if dead_cookie {
            return Err(self.fail(
                client,
                AuthError::Unauthorized {
                    message: "this share link has expired or was revoked; ask for a new one",
                    invalid_token: false,
                    clear_cookie: true,
                },
            ));
        }
        Err(AuthError::unauthorized(
            "credentials required: a project API token (Authorization: Bearer) or a share link",
        ))
    }

    /// Who is calling the REST API (`api.{node}.{domain}`): project tokens only.
    pub fn check_api(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<ApiPrincipal, AuthError> {
        self.limit(client)?;
        match tokens::bearer(headers) {
            None => Err(AuthError::unauthorized(
                "a project API token is required (Authorization: Bearer)",
            )),
            Some(None) => Err(self.fail(
                client,
                AuthError::invalid_token("the Authorization header must be `Bearer <token>`"),
            )),
            Some(Some(token)) => {
                let store = self.store.store();
                match self.token(&store, token)? {
                    Some(row) => Ok(ApiPrincipal::Project(row.project)),
                    None => Err(self.fail(
                        client,
                        AuthError::invalid_token("invalid or revoked API token"),
                    )),
                }
            }
        }
    }

    /// Trades a link's token (the query of a request to [`LINK_PATH`] on the service's
    /// own host) for a cookie for that host. The link must name exactly this project,
    /// container and service: a link for one service cannot mint cookies for another.
    pub fn redeem_link(
        &self,
        client: IpAddr,
        project: &str,
        container_id: &str,
        service: &str,
        query: Option<&str>,
    ) -> Result<Redeemed, AuthError> {
        self.limit(client)?;
        let (token, next) = links::parse_query(query);
        let Some(token) = token else {
            return Err(AuthError::unauthorized("this link has no token"));
        };
        let now = links::now_unix();
        let claims = match self.signing_key()?.verify(&token, now) {
            Ok(c) => c,
            Err(LinkError::Expired) => {
                return Err(self.fail(client, AuthError::invalid_token("this link has expired")))
            }
            Err(LinkError::Malformed | LinkError::BadSignature) => {
                return Err(self.fail(client, AuthError::invalid_token("this link is not valid")))
            }
        };
        if !claims.names(project, container_id, service) {
            return Err(self.fail(
                client,
                AuthError::invalid_token("this link is for another service"),
            ));
        }
        tracing::info!(project, container_id, service, %client, "share link redeemed");
        Ok(Redeemed {
            set_cookie: links::set_cookie(&token, claims.exp - now),
            location: links::safe_next(next.as_deref()).to_string(),
        })
    }

    /// A link to `service` (any spelling [`parse_service`] reads) of a container, good
    /// for `ttl` (1 minute to 30 days).
    pub fn share(
        &self,
        project: &str,
        container_id: &str,
        container_name: &str,
        service: &str,
        ttl: Duration,
    ) -> Result<Share, AuthError> {
        let ttl = check_ttl(ttl).map_err(AuthError::Invalid)?;
        let service = parse_service(service)?;
        let label = format!("{project}-{container_name}-{service}");
        // The host must route back to this container, or the link leads nowhere.
        let host = format!("{label}.{}.{}", self.proxy.node, self.proxy.domain);
        let routes_back = matches!(
            route::parse(&host, &self.proxy.node, &self.proxy.domain),
            Ok(route::Target::Guest { prefix, .. }) if prefix == format!("{project}-{container_name}")
        );
        if !routes_back {
            return Err(AuthError::Invalid(format!(
                "{host} is not a usable host name (a label is at most 63 characters: shorten \
                 the project or container name)"
            )));
        }
        let exp = links::now_unix() + ttl.as_secs();
        let token = self.signing_key()?.sign(&Claims {
            p: project.to_string(),
            c: container_id.to_string(),
            s: service.clone(),
            exp,
        });
        let expires_at = time::OffsetDateTime::from_unix_timestamp(exp as i64)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        tracing::info!(project, container_id, %service, expires_at, "share link made");
        Ok(Share {
            url: format!("{}{LINK_PATH}?token={token}", self.proxy.url_for(&label)),
            expires_at,
        })
    }

    #[cfg(test)]
    fn sign_for_tests(&self, claims: &Claims) -> String {
        self.signing_key().unwrap().sign(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ContainerRow, State};
    use std::net::Ipv4Addr;

    const PROJECT: &str = "proj";
    const CID: &str = "c0ffee";

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<Mutex<Store>>,
        auth: Authorizer,
    }

    fn container(id: &str, project: &str, name: &str, n: u8) -> ContainerRow {
        ContainerRow {
            id: id.into(),
            project: project.into(),
            name: name.into(),
            image: "debian-13".into(),
            state: State::Running,
            ip: Ipv4Addr::new(10, 88, 0, n),
            idmap_block: u32::from(n),
            secret_hex: "00".repeat(32),
            memory_bytes: 1 << 30,
            cpus: 1.0,
            pids: 100,
            disk_bytes: None,
            autostart: true,
            created_at: "2025-01-01T00:00:00Z".into(),
            error: None,
            slot: 0,
        }
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_memory().unwrap();
        store.create_project(PROJECT).unwrap();
        store.create_project("other").unwrap();
        store
            .insert_container(&container(CID, PROJECT, "box", 2))
            .unwrap();
        let store = Arc::new(Mutex::new(store));
        let mut cfg = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        cfg.proxy.node = "node1".into();
        cfg.proxy.domain = "localhost".into();
        cfg.proxy.listen = "0.0.0.0:8443".parse().unwrap();
        let auth = Authorizer::new(&cfg, store.clone());
        Fixture {
            _dir: dir,
            store,
            auth,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn cookie(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE_NAME}={value}")).unwrap(),
        );
        h
    }

    fn status(r: Result<impl std::fmt::Debug, AuthError>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    /// The token of a share URL and the query the browser sends.
    fn link_query(url: &str) -> String {
        url.split_once('?').unwrap().1.to_string()
    }

    #[test]
    fn default_deny_with_bearer_challenge() {
        let f = fixture();
        let err = f
            .auth
            .check_guest(&HeaderMap::new(), ip(1), PROJECT, CID, "files-1")
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
        let h = err.headers();
        assert!(h[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert!(h.get(header::SET_COOKIE).is_none());
        assert_eq!(
            f.auth
                .check_api(&HeaderMap::new(), ip(1))
                .unwrap_err()
                .status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn tokens_pass_their_project_only_and_not_once_revoked() {
        let f = fixture();
        let t = tokens::create(&f.store.store(), PROJECT, "ci").unwrap();
        let other = tokens::create(&f.store.store(), "other", "ci").unwrap();

        let grant = f
            .auth
            .check_guest(&bearer(&t.token), ip(1), PROJECT, CID, "http-8000")
            .unwrap();
        assert_eq!(
            grant,
            Grant::Token {
                token_id: t.id.clone()
            }
        );
        assert_eq!(
            f.auth.check_api(&bearer(&t.token), ip(1)).unwrap(),
            ApiPrincipal::Project(PROJECT.into())
        );
        assert!(ApiPrincipal::Project(PROJECT.into()).may_access(PROJECT));
        assert!(!ApiPrincipal::Project(PROJECT.into()).may_access("other"));

        // Project A's token on project B's container: 403.
        assert_eq!(
            status(
                f.auth
                    .check_guest(&bearer(&other.token), ip(1), PROJECT, CID, "files-1")
            ),
            403
        );

        f.store.store().revoke_api_token(PROJECT, &t.id).unwrap();
        let err = f
            .auth
            .check_guest(&bearer(&t.token), ip(1), PROJECT, CID, "files-1")
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
        assert!(err.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
        assert_eq!(status(f.auth.check_api(&bearer(&t.token), ip(1))), 401);

        // Not a bearer token at all.
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpw"),
        );
        assert_eq!(
            status(f.auth.check_guest(&basic, ip(1), PROJECT, CID, "files-1")),
            401
        );
    }

    #[test]
    fn a_connections_grant_holds_for_the_same_credentials_until_access_changes() {
        let f = fixture();
        let t = tokens::create(&f.store.store(), PROJECT, "ci").unwrap();
        let other = tokens::create(&f.store.store(), PROJECT, "other").unwrap();
        let conn = ConnectionGrant::default();
        let check = |h: &HeaderMap, service: &str| {
            status(
                f.auth
                    .check_guest_on(&conn, h, ip(1), PROJECT, CID, service),
            )
        };
        assert_eq!(check(&bearer(&t.token), "http-8000"), 200);
        assert!(conn.last.lock().unwrap().is_some(), "remembered");
        // The same credentials again: let through on the grant.
        assert_eq!(check(&bearer(&t.token), "http-8000"), 200);
        // Different (or no) credentials on the same connection are checked afresh.
        assert_eq!(check(&HeaderMap::new(), "http-8000"), 401);
        assert_eq!(check(&bearer("hearth_bogus"), "http-8000"), 401);
        assert_eq!(check(&bearer(&other.token), "http-8000"), 200);
        // Revoking the token the connection used ends its grant at once, though the
        // credentials are the same.
        f.store
            .store()
            .revoke_api_token(PROJECT, &other.id)
            .unwrap();
        assert_eq!(check(&bearer(&other.token), "http-8000"), 401);
        assert_eq!(check(&bearer(&t.token), "files-1"), 200);
    }

    #[test]
    fn public_services_need_nothing() {
        let f = fixture();
        f.store.store().set_public(CID, "http-8000", true).unwrap();
        assert_eq!(
            f.auth
                .check_guest(&HeaderMap::new(), ip(1), PROJECT, CID, "http-8000")
                .unwrap(),
            Grant::Public
        );
        assert_eq!(
            status(
                f.auth
                    .check_guest(&HeaderMap::new(), ip(1), PROJECT, CID, "http-8001")
            ),
            401
        );
        f.store.store().set_public(CID, "http-8000", false).unwrap();
        assert_eq!(
            status(
                f.auth
                    .check_guest(&HeaderMap::new(), ip(1), PROJECT, CID, "http-8000")
            ),
            401
        );
    }

    #[test]
    fn share_link_redeems_to_a_host_only_cookie() {
        let f = fixture();
        let share = f
            .auth
            .share(PROJECT, CID, "box", "agent-1", Duration::from_secs(3600))
            .unwrap();
        assert!(
            share.url.starts_with(
                "https://proj-box-workspaces-1.node1.localhost:8443/.hearth/auth?token="
            ),
            "{}",
            share.url
        );
        assert!(share.expires_at.ends_with('Z'), "{}", share.expires_at);

        let query = link_query(&share.url);
        let r = f
            .auth
            .redeem_link(ip(1), PROJECT, CID, "workspaces-1", Some(&query))
            .unwrap();
        assert_eq!(r.location, "/");
        let attrs: Vec<&str> = r.set_cookie.split("; ").collect();
        let value = attrs[0].strip_prefix("hearth_cap=").unwrap();
        assert_eq!(value, query.strip_prefix("token=").unwrap());
        for a in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
            assert!(attrs.contains(&a), "{a}: {attrs:?}");
        }
        let max_age: u64 = attrs
            .iter()
            .find_map(|a| a.strip_prefix("Max-Age="))
            .unwrap()
            .parse()
            .unwrap();
        assert!((3590..=3600).contains(&max_age), "{max_age}");
        assert!(!r.set_cookie.contains("Domain"));
        let h = r.headers();
        assert_eq!(h[header::LOCATION], "/");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");

        // The cookie opens that service of that container, and nothing else.
        let grant = f
            .auth
            .check_guest(&cookie(value), ip(1), PROJECT, CID, "workspaces-1")
            .unwrap();
        assert!(matches!(grant, Grant::Link { .. }));
        for (project, cid, service) in [
            (PROJECT, CID, "workspaces-2"),
            (PROJECT, CID, "files-1"),
            (PROJECT, "deadbeef", "workspaces-1"),
            ("other", CID, "workspaces-1"),
        ] {
            let err = f
                .auth
                .check_guest(&cookie(value), ip(2), project, cid, service)
                .unwrap_err();
            assert_eq!(err.status(), StatusCode::UNAUTHORIZED, "{cid} {service}");
            assert!(err.headers()[header::SET_COOKIE]
                .to_str()
                .unwrap()
                .contains("Max-Age=0"));
        }
        // Nor can the link mint a cookie on another service's host.
        assert_eq!(
            status(
                f.auth
                    .redeem_link(ip(3), PROJECT, CID, "files-1", Some(&query))
            ),
            401
        );
    }

    #[test]
    fn a_real_cookie_is_found_beside_a_planted_one() {
        let f = fixture();
        let good = f.auth.sign_for_tests(&Claims {
            p: PROJECT.into(),
            c: CID.into(),
            s: "files-1".into(),
            exp: links::now_unix() + 60,
        });
        let planted = f.auth.sign_for_tests(&Claims {
            p: "other".into(),
            c: "evil".into(),
            s: "http-80".into(),
            exp: links::now_unix() + 60,
        });
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE_NAME}={planted}")).unwrap(),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE_NAME}={good}")).unwrap(),
        );
        assert!(f
            .auth
            .check_guest(&h, ip(1), PROJECT, CID, "files-1")
            .is_ok());
    }

    #[test]
    fn tampered_or_expired_links_and_cookies_are_refused() {
        let f = fixture();
        let claims = |exp| Claims {
            p: PROJECT.into(),
            c: CID.into(),
            s: "files-1".into(),
            exp,
        };
        let expired = f.auth.sign_for_tests(&claims(links::now_unix() - 1));
        let err = f
            .auth
            .redeem_link(
                ip(1),
                PROJECT,
                CID,
                "files-1",
                Some(&format!("token={expired}")),
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "this link has expired");
        assert_eq!(
            status(
                f.auth
                    .check_guest(&cookie(&expired), ip(1), PROJECT, CID, "files-1")
            ),
            401
        );

        let good = f.auth.sign_for_tests(&claims(links::now_unix() + 600));
        let (payload, sig) = good.split_once('.').unwrap();
        let mut forged = claims(links::now_unix() + 600);
        forged.s = "terminal-1".into();
        use base64::Engine;
        let forged = format!(
            "{}.{sig}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&forged).unwrap())
        );
        assert_eq!(
            status(
                f.auth
                    .check_guest(&cookie(&forged), ip(1), PROJECT, CID, "terminal-1")
            ),
            401
        );
        assert_eq!(
            status(f.auth.redeem_link(
                ip(1),
                PROJECT,
                CID,
                "terminal-1",
                Some(&format!("token={forged}"))
            )),
            401
        );
        let truncated = format!("{payload}.{}", &sig[1..]);
        assert_eq!(
            status(
                f.auth
                    .check_guest(&cookie(&truncated), ip(1), PROJECT, CID, "files-1")
            ),
            401
        );
        assert_eq!(
            status(f.auth.redeem_link(ip(1), PROJECT, CID, "files-1", None)),
            401
        );
        // The untampered one still works.
        assert!(f
            .auth
            .check_guest(&cookie(&good), ip(1), PROJECT, CID, "files-1")
            .is_ok());
    }

    #[test]
    fn redeem_refuses_open_redirects() {
        let f = fixture();
        let share = f
            .auth
            .share(PROJECT, CID, "box", "files-1", Duration::from_secs(60))
            .unwrap();
        let token = link_query(&share.url);
        for (next, want) in [
            ("%2Fdir%2Fa.txt", "/dir/a.txt"),
            ("%2F%2Fevil.example", "/"),
            ("https%3A%2F%2Fevil.example", "/"),
            ("%2F%5Cevil.example", "/"),
        ] {
            let r = f
                .auth
                .redeem_link(
                    ip(1),
                    PROJECT,
                    CID,
                    "files-1",
                    Some(&format!("{token}&next={next}")),
                )
                .unwrap();
            assert_eq!(r.location, want, "{next}");
        }
    }

    #[test]
    fn share_checks_ttl_service_and_host_length() {
        let f = fixture();
        let share = |service: &str, ttl: u64| {
            f.auth
                .share(PROJECT, CID, "box", service, Duration::from_secs(ttl))
        };
        assert_eq!(status(share("files-1", 59)), 400);
        assert_eq!(status(share("files-1", 31 * 86_400)), 400);
        assert_eq!(status(share("ssh-1", 3600)), 400);
        assert_eq!(status(share("http-0", 3600)), 400);
        assert!(share("http-8000", 3600)
            .unwrap()
            .url
            .contains("//proj-box-http-8000.node1."));
        let long = "x".repeat(51);
        assert_eq!(
            status(
                f.auth
                    .share(PROJECT, CID, &long, "files-1", Duration::from_secs(60))
            ),
            400
        );
    }

    #[test]
    fn failures_are_rate_limited_per_client() {
        let f = fixture();
        let bad = bearer(&format!("hth_{}", "A".repeat(43)));
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                status(f.auth.check_guest(&bad, ip(9), PROJECT, CID, "files-1")),
                401
            );
        }
        let err = f
            .auth
            .check_guest(&bad, ip(9), PROJECT, CID, "files-1")
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = err.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        // Even a good token waits: the limit is what stops guessing.
        let t = tokens::create(&f.store.store(), PROJECT, "ci").unwrap();
        assert_eq!(status(f.auth.check_api(&bearer(&t.token), ip(9))), 429);
        assert_eq!(status(f.auth.check_api(&bearer(&t.token), ip(8))), 200);
        // Having no credentials is not a failure.
        for _ in 0..(MAX_FAILURES * 2) {
            assert_eq!(
                status(
                    f.auth
                        .check_guest(&HeaderMap::new(), ip(7), PROJECT, CID, "files-1")
                ),
                401
            );
        }
        // Public services stay open to a limited client.
        f.store.store().set_public(CID, "files-1", true).unwrap();
        assert!(f
            .auth
            .check_guest(&bad, ip(9), PROJECT, CID, "files-1")
            .is_ok());
    }

    #[test]
    fn service_labels() {
        for (given, want) in [
            ("files-1", "files-1"),
            ("files", "files-1"),
            ("FILES-2", "files-2"),
            ("agent-3", "workspaces-3"),
            ("n-2", "n-2"),
            ("http-8000", "http-8000"),
            ("http", "http-80"),
            ("https-8443", "https-8443"),
        ] {
            assert_eq!(parse_service(given).unwrap(), want, "{given}");
        }
        for bad in [
            "",
            "ssh-1",
            "web",
            "files-0",
            "files-01",
            "http-65536",
            "files.1",
            "p-c-files-1x",
            "-files-1",
            "box-files-1",
            "files-1 ",
        ] {
            assert!(parse_service(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credentials_are_stripped_before_guests_see_them() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer hth_x"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; hearth_cap=x.y; b=2"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("hearth_cap=z"));
        strip_credentials(&mut h);
        assert!(h.get(header::AUTHORIZATION).is_none());
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);

        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpw"),
        );
        strip_credentials(&mut h);
        assert_eq!(h[header::AUTHORIZATION], "Basic dTpw");
    }
}
