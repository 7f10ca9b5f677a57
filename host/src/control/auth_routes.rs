//! Routes for access to guests: project API tokens, share links and public services.
//!
//! On the control socket the caller is root and may do anything. When the HTTPS front
//! door serves these routes it puts the caller's [`ApiPrincipal`] in the request's
//! extensions, and a project token then reaches its own project only (403 otherwise).

use super::routes::{ok, to_value, ApiError, ApiResult};
use crate::auth::{self, ApiPrincipal, AuthError, Authorizer};
use crate::node::Node;
use crate::store::ContainerRow;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// How long a link lasts when the request does not say.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

#[derive(Clone)]
struct AuthState {
    node: Arc<Node>,
    auth: Arc<Authorizer>,
}

type Principal = Option<Extension<ApiPrincipal>>;

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError(e.status(), e.to_string())
    }
}

/// Generic in the outer router's state so that it merges before that router's
/// `with_state`; it carries its own.
pub fn router<S: Clone + Send + Sync + 'static>(node: Arc<Node>) -> Router<S> {
    let auth = Arc::new(Authorizer::new(&node.cfg, node.clone()));
    let (routes, _) = api().split_for_parts();
    routes.with_state(AuthState { node, auth })
}

/// The OpenAPI description of these routes, merged into the node API's document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

fn api() -> OpenApiRouter<AuthState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(share))
        .routes(routes!(list_public))
        .routes(routes!(make_public, make_private))
}

/// 403 when a project token reaches for another project.
fn scope(principal: &Principal, project: &str) -> Result<(), ApiError> {
    match principal {
        Some(Extension(p)) if !p.may_access(project) => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("this API token does not grant access to project {project}"),
        )),
        _ => Ok(()),
    }
}

fn container(st: &AuthState, principal: &Principal, id: &str) -> Result<ContainerRow, ApiError> {
    let c = st.node.get(id)?;
    scope(principal, &c.project)?;
    Ok(c)
}

#[derive(Deserialize)]
struct NewToken {
    name: String,
}

/// A project API token (`Authorization: Bearer`); the token is in this answer only.
#[utoipa::path(post, path = "/api/v1/projects/{project}/tokens", tag = "access",
    params(("project" = String, Path)), request_body = Object,
    responses((status = 201, body = Object, description = "`data`: id, project, name, token, created_at")))]
async fn create_token(
    State(st): State<AuthState>,
    principal: Principal,
    Path(project): Path<String>,
    Json(req): Json<NewToken>,
) -> ApiResult {
    scope(&principal, &project)?;
    let token = auth::tokens::create(&st.node.store(), &project, &req.name)?;
    ok(
        StatusCode::CREATED,
        "token created; it is shown only once",
        to_value(token)?,
    )
}

/// A project's tokens, without the tokens themselves.
#[utoipa::path(get, path = "/api/v1/projects/{project}/tokens", tag = "access",
    params(("project" = String, Path)),
    responses((status = 200, body = Object)))]
async fn list_tokens(
    State(st): State<AuthState>,
    principal: Principal,
    Path(project): Path<String>,
) -> ApiResult {
    scope(&principal, &project)?;
    let tokens = st.node.store().api_tokens(&project)?;
    ok(
        StatusCode::OK,
        "tokens",
        json!({ "project": project, "tokens": to_value(tokens)? }),
    )
}

/// Revokes a token; it stops working at once.
#[utoipa::path(delete, path = "/api/v1/projects/{project}/tokens/{id}", tag = "access",
    params(("project" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Object)))]
async fn revoke_token(
    State(st): State<AuthState>,
    principal: Principal,
    Path((project, id)): Path<(String, String)>,
) -> ApiResult {
    scope(&principal, &project)?;
    let t = st.node.store().revoke_api_token(&project, &id)?;
    tracing::info!(project, id, "API token revoked");
    ok(
        StatusCode::OK,
        "token revoked",
        json!({ "id": t.id, "name": t.name, "revoked_at": t.revoked_at }),
    )
}

/// `"1h"`-style text, or seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum Ttl {
    Secs(u64),
    Text(String),
}

#[derive(Deserialize)]
struct ShareRequest {
    service: String,
    ttl: Option<Ttl>,
}

/// A signed, expiring link to one service (`{service, ttl}`, ttl as `"1h"` or seconds).
#[utoipa::path(post, path = "/api/v1/containers/{id}/share", tag = "access",
    params(("id" = String, Path)), request_body = Object,
    responses((status = 201, body = Object, description = "`data`: url, expires_at")))]
async fn share(
    State(st): State<AuthState>,
    principal: Principal,
    Path(id): Path<String>,
    Json(req): Json<ShareRequest>,
) -> ApiResult {
    let c = container(&st, &principal, &id)?;
    let ttl = match req.ttl {
        None => DEFAULT_TTL,
        Some(Ttl::Secs(s)) => Duration::from_secs(s),
        Some(Ttl::Text(t)) => {
            auth::parse_ttl(&t).map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?
        }
    };
    let link = st
        .auth
        .share(&c.project, &c.id, &c.name, &req.service, ttl)?;
    ok(
        StatusCode::CREATED,
        "share link created",
        json!({ "url": link.url, "expires_at": link.expires_at, "container_id": c.id }),
    )
}

fn public_url(st: &AuthState, c: &ContainerRow, service: &str) -> String {
    st.node
        .cfg
        .proxy
        .url_for(&format!("{}-{}-{service}", c.project, c.name))
}

/// The container's services open to everyone.
#[utoipa::path(get, path = "/api/v1/containers/{id}/public", tag = "access",
    params(("id" = String, Path)),
    responses((status = 200, body = Object)))]
async fn list_public(
    State(st): State<AuthState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult {
    let c = container(&st, &principal, &id)?;
    let rows = st.node.store().public_services(&c.id)?;
    let services: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({ "service": r.service, "url": public_url(&st, &c, &r.service),
                    "created_at": r.created_at })
        })
        .collect();
    ok(
        StatusCode::OK,
        "public services",
        json!({ "container_id": c.id, "services": services }),
    )
}

/// Opens (`public`) or closes a service; the open answer carries the service's URL.
fn set_public(
    st: &AuthState,
    principal: &Principal,
    id: &str,
    service: &str,
    public: bool,
) -> ApiResult {
    let c = container(st, principal, id)?;
    let service = auth::parse_service(service)?;
    st.node.store().set_public(&c.id, &service, public)?;
    tracing::info!(container = %c.id, %service, public, "service access changed");
    let mut data = json!({ "container_id": c.id, "service": service, "public": public });
    if public {
        data["url"] = json!(public_url(st, &c, &service));
    }
    let message = if public {
        "service is public"
    } else {
        "service is private"
    };
    ok(StatusCode::OK, message, data)
}

/// Opens one service (`files-1`, `http-8000`) to everyone.
#[utoipa::path(put, path = "/api/v1/containers/{id}/public/{service}", tag = "access",
    params(("id" = String, Path), ("service" = String, Path)),
    responses((status = 200, body = Object)))]
async fn make_public(
    State(st): State<AuthState>,
    principal: Principal,
    Path((id, service)): Path<(String, String)>,
) -> ApiResult {
    set_public(&st, &principal, &id, &service, true)
}

/// Closes a service again.
#[utoipa::path(delete, path = "/api/v1/containers/{id}/public/{service}", tag = "access",
    params(("id" = String, Path), ("service" = String, Path)),
    responses((status = 200, body = Object)))]
async fn make_private(
    State(st): State<AuthState>,
    principal: Principal,
    Path((id, service)): Path<(String, String)>,
) -> ApiResult {
    set_public(&st, &principal, &id, &service, false)
}

#[cfg(test)]
mod tests {
    use crate::auth::ApiPrincipal;
    use crate::config::Config;
    use crate::node::Node;
    use crate::pool::{DiskUsage, ImageEntry, PoolError, Storage, StorageInfo};
    use crate::runtime::{GuestSpec, RunState, Runtime, RuntimeError, RuntimeInfo};
    use crate::store::{ContainerRow, State, Store};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::service::Service as _;
    use hyper::{Method, Request};
    use serde_json::{json, Value};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    /// These routes touch only the store; the machine side must never be reached.
    struct Inert;

    const UNUSED: &str = "auth routes do not touch the pool or the runtime";

    impl Storage for Inert {
        fn info(&self) -> StorageInfo {
            unreachable!("{UNUSED}")
        }
        fn root(&self) -> &Path {
            unreachable!("{UNUSED}")
        }
        fn image_path(&self, _: &str) -> PathBuf {
            unreachable!("{UNUSED}")
        }
        fn list_images(&self) -> Result<Vec<ImageEntry>, PoolError> {
            unreachable!("{UNUSED}")
        }
        fn begin_image(&self, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!("{UNUSED}")
        }
        fn commit_image(&self, _: &Path, _: &str) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn abort_image(&self, _: &Path) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn delete_image(&self, _: &str) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn create_rootfs(&self, _: &str, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!("{UNUSED}")
        }
        fn rootfs(&self, _: &str) -> PathBuf {
            unreachable!("{UNUSED}")
        }
        fn delete_container(&self, _: &str) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn container_ids(&self) -> Result<Vec<String>, PoolError> {
            unreachable!("{UNUSED}")
        }
        fn raw_snapshot(&self, _: &Path, _: &Path, _: bool) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn snapshot_path(&self, _: &str, _: &str) -> PathBuf {
            unreachable!("{UNUSED}")
        }
        fn snapshot_container(&self, _: &str, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!("{UNUSED}")
        }
        fn list_snapshots(&self, _: &str) -> Result<Vec<String>, PoolError> {
            unreachable!("{UNUSED}")
        }
        fn delete_snapshot(&self, _: &str, _: &str) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn stage_restore(&self, _: &str, _: &str) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn swap_restored(&self, _: &str) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn create_rootfs_from(&self, _: &Path, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!("{UNUSED}")
        }
        fn recover_container(&self, _: &str) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn set_quota(&self, _: &str, _: Option<u64>) -> Result<(), PoolError> {
            unreachable!("{UNUSED}")
        }
        fn usage(&self, _: &str) -> Result<DiskUsage, PoolError> {
            unreachable!("{UNUSED}")
        }
    }

    impl Runtime for Inert {
        fn info(&self) -> RuntimeInfo {
            unreachable!("{UNUSED}")
        }
        fn define(&self, _: &GuestSpec) -> Result<(), RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn start(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn stop(&self, _: &str, _: i32) -> Result<(), RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn kill(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn kill_begin(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn state(&self, _: &str) -> Result<RunState, RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn init_pid(&self, _: &str) -> Result<Option<i32>, RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn undefine(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!("{UNUSED}")
        }
        fn list(&self) -> Result<Vec<String>, RuntimeError> {
            unreachable!("{UNUSED}")
        }
    }

    struct Api {
        _dir: tempfile::TempDir,
        node: Arc<Node>,
        app: axum::Router,
    }

    fn api() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            state_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        cfg.proxy.node = "n1".into();
        cfg.proxy.domain = "localhost".into();
        cfg.proxy.public_port = Some(443);
        let store = Store::open_in_memory().unwrap();
        store.create_project("p").unwrap();
        store.create_project("q").unwrap();
        store
            .insert_container(&ContainerRow {
                id: "c1".into(),
                project: "p".into(),
                name: "box".into(),
                image: "debian-13".into(),
                state: State::Running,
                ip: std::net::Ipv4Addr::new(10, 88, 0, 2),
                idmap_block: 1,
                secret_hex: "00".repeat(32),
                memory_bytes: 1 << 30,
                cpus: 1.0,
                pids: 100,
                disk_bytes: None,
                autostart: true,
                created_at: "2025-01-01T00:00:00Z".into(),
                error: None,
                slot: 0,
            })
            .unwrap();
        let node = Node::new(cfg, store, Arc::new(Inert), Arc::new(Inert));
        // The whole control router: also checks that these routes merge into it.
        let app = super::super::routes::router(node.clone());
        Api {
            _dir: dir,
            node,
            app,
        }
    }

    impl Api {
        async fn call(
            &self,
            method: Method,
            path: &str,
            body: Option<Value>,
            principal: Option<&str>,
        ) -> (u16, Value) {
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    body.map(|b| b.to_string()).unwrap_or_default(),
                )))
                .unwrap();
            if let Some(p) = principal {
                req.extensions_mut()
                    .insert(ApiPrincipal::Project(p.to_string()));
            }
            let svc = hyper_util::service::TowerToHyperService::new(self.app.clone());
            let resp = svc.call(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
    }

    #[tokio::test]
    async fn tokens_over_the_api() {
        let api = api();
        let (code, v) = api
            .call(
                Method::POST,
                "/api/v1/projects/p/tokens",
                Some(json!({ "name": "ci" })),
                None,
            )
            .await;
        assert_eq!(code, 201, "{v}");
        let token = v["data"]["token"].as_str().unwrap().to_string();
        let id = v["data"]["id"].as_str().unwrap().to_string();
        assert!(token.starts_with("hth_"));

        let (code, v) = api
            .call(Method::GET, "/api/v1/projects/p/tokens", None, None)
            .await;
        assert_eq!(code, 200);
        let listed = &v["data"]["tokens"][0];
        assert_eq!(listed["id"], id.as_str());
        assert_eq!(listed["name"], "ci");
        assert!(listed.get("token").is_none() && listed.get("hash").is_none());
        assert!(!v.to_string().contains(&token[4..]));

        let (code, v) = api
            .call(
                Method::DELETE,
                &format!("/api/v1/projects/p/tokens/{id}"),
                None,
                None,
            )
            .await;
        assert_eq!(code, 200, "{v}");
        assert!(v["data"]["revoked_at"].is_string());
        let (code, _) = api
            .call(Method::DELETE, "/api/v1/projects/p/tokens/nope", None, None)
            .await;
        assert_eq!(code, 404);
        let (code, _) = api
            .call(
                Method::POST,
                "/api/v1/projects/zz/tokens",
                Some(json!({ "name": "ci" })),
                None,
            )
            .await;
        assert_eq!(code, 404);
        let (code, v) = api
            .call(
                Method::POST,
                "/api/v1/projects/p/tokens",
                Some(json!({ "name": "" })),
                None,
            )
            .await;
        assert_eq!((code, v["statusCode"].as_u64()), (400, Some(400)));

        // Deleting the project takes its tokens along.
        api.node.store().delete_project("q").unwrap();
        assert!(api.node.store().api_tokens("q").is_err());
    }

    #[tokio::test]
    async fn share_and_public_over_the_api() {
        let api = api();
        let (code, v) = api
            .call(
                Method::POST,
                "/api/v1/containers/c1/share",
                Some(json!({ "service": "files", "ttl": "15m" })),
                None,
            )
            .await;
        assert_eq!(code, 201, "{v}");
        let url = v["data"]["url"].as_str().unwrap();
        assert!(
            url.starts_with("https://p-box-files-1.n1.localhost/.hearth/auth?token="),
            "{url}"
        );
        for body in [
            json!({ "service": "files-1", "ttl": "31d" }),
            json!({ "service": "files-1", "ttl": 30 }),
            json!({ "service": "ssh-1" }),
        ] {
            let (code, _) = api
                .call(
                    Method::POST,
                    "/api/v1/containers/c1/share",
                    Some(body),
                    None,
                )
                .await;
            assert_eq!(code, 400);
        }
        let (code, _) = api
            .call(
                Method::POST,
                "/api/v1/containers/nope/share",
                Some(json!({ "service": "files-1" })),
                None,
            )
            .await;
        assert_eq!(code, 404);

        let (code, v) = api
            .call(
                Method::PUT,
                "/api/v1/containers/c1/public/http-8000",
                None,
                None,
            )
            .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["data"]["url"], "https://p-box-http-8000.n1.localhost");
        let (_, v) = api
            .call(Method::GET, "/api/v1/containers/c1/public", None, None)
            .await;
        assert_eq!(v["data"]["services"][0]["service"], "http-8000");
        assert!(api.node.store().is_public("c1", "http-8000").unwrap());
        let (code, _) = api
            .call(
                Method::DELETE,
                "/api/v1/containers/c1/public/http-8000",
                None,
                None,
            )
            .await;
        assert_eq!(code, 200);
        let (_, v) = api
            .call(Method::GET, "/api/v1/containers/c1/public", None, None)
            .await;
        assert_eq!(v["data"]["services"], json!([]));
        let (code, _) = api
            .call(
                Method::PUT,
                "/api/v1/containers/c1/public/web-1",
                None,
                None,
            )
            .await;
        assert_eq!(code, 400);

        // The other routes still answer beside these.
        let (code, _) = api.call(Method::GET, "/api/v1/health", None, None).await;
        assert_eq!(code, 200);
    }

    #[tokio::test]
    async fn a_project_token_reaches_its_own_project_only() {
        let api = api();
        for (method, path) in [
            (Method::GET, "/api/v1/projects/p/tokens"),
            (Method::GET, "/api/v1/containers/c1/public"),
            (Method::PUT, "/api/v1/containers/c1/public/files-1"),
        ] {
            let (code, _) = api.call(method.clone(), path, None, Some("q")).await;
            assert_eq!(code, 403, "{path}");
            let (code, _) = api.call(method, path, None, Some("p")).await;
            assert_eq!(code, 200, "{path}");
        }
        let share = json!({ "service": "files-1" });
        let (code, _) = api
            .call(
                Method::POST,
                "/api/v1/containers/c1/share",
                Some(share.clone()),
                Some("q"),
            )
            .await;
        assert_eq!(code, 403);
        let (code, _) = api
            .call(
                Method::POST,
                "/api/v1/containers/c1/share",
                Some(share),
                Some("p"),
            )
            .await;
        assert_eq!(code, 201);
    }
}
