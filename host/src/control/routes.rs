//! Routes of the control API. Handlers are thin: parse, call the node, wrap the answer.
//!
//! Every route is registered from its handler's `#[utoipa::path]` through `routes!`, so
//! the OpenAPI document served at `/api/v1/openapi.json` is made from the same
//! declarations as the router; a test checks that nothing is served beside it.

use super::exec::{self, RunOutput, RunRequest};
use super::files::{self, DirListing, Fetched, PutOptions};
use super::guest::{node_status, GuestError};
use super::AGENT_UPGRADE;
use crate::node::{CopyRequest, CreateRequest, Node, NodeError, SnapshotRequest, UpdateRequest};
use crate::store::{Project, SnapshotRow};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::{Arc, OnceLock};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, IntoResponses, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

type Node_ = State<Arc<Node>>;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";
/// Most containers one page lists (kit-api.md B.1).
const CONTAINERS_PAGE_CAP: usize = 100;
/// Most items one page of any other list holds.
const PAGE_CAP: usize = 200;
/// How much of a file one body chunk carries on the way out.
const FILE_CHUNK: usize = 256 * 1024;

pub fn router(node: Arc<Node>) -> Router {
    let (routes, _) = api().split_for_parts();
    routes
        .merge(super::auth_routes::router(node.clone()))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(node)
}

/// The OpenAPI 3.1 document of the routes [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api().into_openapi();
    doc.merge(super::auth_routes::openapi());
    doc
}

fn api() -> OpenApiRouter<Arc<Node>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(openapi_json))
        .routes(routes!(list_projects, create_project))
        .routes(routes!(get_project, delete_project))
        .routes(routes!(list_project_containers, create_container))
        .routes(routes!(list_containers))
        .routes(routes!(get_container, update_container, delete_container))
        .routes(routes!(container_info))
        .routes(routes!(access_log))
        .routes(routes!(list_snapshots, create_snapshot))
        .routes(routes!(restore_snapshot, delete_snapshot))
        .routes(routes!(alias_snapshot))
        .routes(routes!(copy_container))
        .routes(routes!(exec_command))
        .routes(routes!(get_file, put_file, delete_file))
        .routes(routes!(agent_upgrade))
        .routes(routes!(operation))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hearth node API",
        description = "Projects, containers, snapshots and files of one hearth node. \
            Answers are `{statusCode, message, data}`, errors `{statusCode, error, message}`; \
            lists take `page` and `limit` and carry `pagination`. Served over HTTPS and, \
            for root on the node, on hearthd's control socket (no token needed there)."
    ),
    servers((
        url = "https://api.{node}.{domain}",
        description = "The node's HTTPS front door",
        variables(
            ("node" = (default = "node", description = "The node's name")),
            ("domain" = (default = "example.com", description = "The node's domain"))
        )
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "node", description = "The node itself"),
        (name = "projects"),
        (name = "containers"),
        (name = "snapshots"),
        (name = "files", description = "Files in a running container"),
        (name = "access", description = "Who reaches guests through the HTTPS front door: \
            project API tokens, share links, public services"),
    )
)]
struct ApiDoc;

/// Tokens come from the auth module; the document only says where they go.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Errors in the shape `{statusCode, error, message}`.
pub struct ApiError(pub(super) StatusCode, pub(super) String);

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        ApiError(node_status(&e), e.to_string())
    }
}

impl From<GuestError> for ApiError {
    fn from(e: GuestError) -> Self {
        ApiError(e.status(), e.message())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        NodeError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            status_code: self.0.as_u16(),
            error: self.0.canonical_reason().unwrap_or("Error").into(),
            message: self.1,
        };
        (self.0, Json(body)).into_response()
    }
}

pub(super) type ApiResult = Result<Response, ApiError>;

/// Success: `{statusCode, message, data}`.
#[derive(Serialize, ToSchema)]
struct Envelope<T> {
    #[serde(rename = "statusCode")]
    status_code: u16,
    message: String,
    data: T,
}

/// An error: `{statusCode, error, message}`.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    #[serde(rename = "statusCode")]
    status_code: u16,
    /// The status's reason phrase.
    error: String,
    message: String,
}

pub(super) fn ok<T: Serialize>(code: StatusCode, message: &str, data: T) -> ApiResult {
    let body = Envelope {
        status_code: code.as_u16(),
        message: message.into(),
        data,
    };
    Ok((code, Json(body)).into_response())
}

pub(super) fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// `data: null`.
#[derive(Serialize)]
struct Null;

impl utoipa::PartialSchema for Null {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::Object::builder()
            .schema_type(utoipa::openapi::schema::Type::Null)
            .into()
    }
}

impl ToSchema for Null {}

/// Raw bytes (file bodies).
struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, Object, SchemaFormat, Type};
        Object::builder()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl ToSchema for Binary {}

/// The errors every route may answer.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only read by the OpenAPI derive.
enum Errors {
    /// Malformed request: bad JSON, a bad parameter, an invalid name.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Bad or missing bearer token (HTTPS only).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The name is taken, or the container is in the wrong state for this.
    #[response(status = 409)]
    Conflict(ErrorBody),
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The container's agent does not answer now (booting, restarting); retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The further errors of routes that work inside a running container.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only read by the OpenAPI derive.
enum GuestErrors {
    /// The guest refused: permissions inside the container.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The command could not be started (no such program or working directory).
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// The container's agent answered nonsense.
    #[response(status = 502)]
    BadGateway(ErrorBody),
    #[response(status = 504)]
    Timeout(ErrorBody),
    /// The container's disk is full or its quota reached.
    #[response(status = 507)]
    InsufficientStorage(ErrorBody),
}

/// A JSON body whose rejections answer in the error envelope like everything else.
struct ApiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        <Json<T> as FromRequest<S>>::from_request(req, state)
            .await
            .map(|Json(v)| ApiJson(v))
            .map_err(json_rejection)
    }
}

/// No body (or one that is not JSON) is `None`: for optional request bodies.
impl<S: Send + Sync, T: DeserializeOwned> OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        <Json<T> as OptionalFromRequest<S>>::from_request(req, state)
            .await
            .map(|o| o.map(|Json(v)| ApiJson(v)))
            .map_err(json_rejection)
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    ApiError(r.status(), r.body_text())
}

/// Query parameters whose rejections answer in the error envelope.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|r: QueryRejection| ApiError(r.status(), r.body_text()))
    }
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no route {method} {} (see {OPENAPI_PATH})", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// `?page=&limit=` of every list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// From 1 (the default).
    page: Option<usize>,
    /// Items per page, at most 200 (the default).
    limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
struct Pagination {
    total: usize,
    page: usize,
    limit: usize,
    #[serde(rename = "totalPages")]
    total_pages: usize,
}

/// One page of `all`: pages count from 1, `limit` is clamped to 1..=`cap` and defaults
/// to `cap`.
fn paginate<T>(
    all: Vec<T>,
    page: Option<usize>,
    limit: Option<usize>,
    cap: usize,
) -> (Vec<T>, Pagination) {
    let limit = limit.unwrap_or(cap).clamp(1, cap);
    let page = page.unwrap_or(1).max(1);
    let total = all.len();
    let items = all
        .into_iter()
        .skip((page - 1).saturating_mul(limit))
        .take(limit)
        .collect();
    let total_pages = total.div_ceil(limit);
    (
        items,
        Pagination {
            total,
            page,
            limit,
            total_pages,
        },
    )
}

#[derive(Serialize, ToSchema)]
struct Health {
    version: String,
}

#[utoipa::path(get, path = "/api/v1/health", tag = "node",
    responses((status = 200, body = Envelope<Health>), Errors))]
async fn health() -> ApiResult {
    let version = env!("CARGO_PKG_VERSION").into();
    ok(StatusCode::OK, "ok", Health { version })
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "node",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
async fn openapi_json() -> ApiResult {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = match DOC.get() {
        Some(d) => d,
        None => {
            let json = openapi()
                .to_json()
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            DOC.get_or_init(|| json)
        }
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        doc.as_str(),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
struct NewProject {
    /// 1-63 of a-z, 0-9 and '-'.
    name: String,
}

#[derive(Serialize, ToSchema)]
struct ProjectView {
    name: String,
    created_at: String,
}

impl From<Project> for ProjectView {
    fn from(p: Project) -> Self {
        ProjectView {
            name: p.name,
            created_at: p.created_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct ProjectList {
    projects: Vec<ProjectView>,
    pagination: Pagination,
}

#[utoipa::path(get, path = "/api/v1/projects", tag = "projects", params(PageQuery),
    responses((status = 200, body = Envelope<ProjectList>), Errors))]
async fn list_projects(State(node): Node_, ApiQuery(q): ApiQuery<PageQuery>) -> ApiResult {
    let all = node.store().projects()?;
    let (page, pagination) = paginate(all, q.page, q.limit, PAGE_CAP);
    let projects = page.into_iter().map(ProjectView::from).collect();
    ok(
        StatusCode::OK,
        "projects",
        ProjectList {
            projects,
            pagination,
        },
    )
}

#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", request_body = NewProject,
    responses((status = 201, body = Envelope<ProjectView>), Errors))]
async fn create_project(State(node): Node_, ApiJson(p): ApiJson<NewProject>) -> ApiResult {
    if !crate::node::valid_name(&p.name) {
        return Err(NodeError::Invalid(format!(
            "project name {:?}: use 1-63 of a-z, 0-9 and '-'",
            p.name
        ))
        .into());
    }
    let project = node.store().create_project(&p.name)?;
    ok(
        StatusCode::CREATED,
        "project created",
        ProjectView::from(project),
    )
}

#[utoipa::path(get, path = "/api/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path)),
    responses((status = 200, body = Envelope<ProjectView>), Errors))]
async fn get_project(State(node): Node_, Path(project): Path<String>) -> ApiResult {
    let p = node.store().project(&project)?;
    ok(StatusCode::OK, "project", ProjectView::from(p))
}

#[utoipa::path(delete, path = "/api/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path)),
    responses((status = 200, body = Envelope<Null>), Errors))]
async fn delete_project(State(node): Node_, Path(project): Path<String>) -> ApiResult {
    node.store().delete_project(&project)?;
    ok(StatusCode::OK, "project deleted", Null)
}

/// A container as the API shows it: the shape of [`crate::node::ContainerView`], which
/// lives in node.rs and is described here (a test keeps the two equal).
#[derive(ToSchema)]
#[allow(dead_code)] // Only read by the OpenAPI derive.
struct Container {
    id: String,
    project_id: String,
    name: String,
    /// creating, running, stopped, failed or deleting.
    status: String,
    image: String,
    ip: String,
    memory_mb: u64,
    cpus: f64,
    pids: u64,
    /// Configured rootfs cap in GiB; null is unlimited.
    disk_gb: Option<u64>,
    /// Current use and cap; only on a single container's answer, and null when the
    /// node's storage has no quotas.
    disk: Option<DiskUse>,
    autostart: bool,
    created_at: String,
    error: Option<String>,
    /// Host path of the agent socket.
    agent_socket: String,
    /// The runtime's name for the guest (LXC: `lxc-attach -P <lxcpath> -n <name>` on the
    /// node). It changes when a restore boots the guest anew.
    runtime_name: String,
}

#[derive(ToSchema)]
#[allow(dead_code)] // Only read by the OpenAPI derive.
struct DiskUse {
    used_bytes: u64,
    /// Null: unlimited.
    limit_bytes: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct ContainerList {
    #[schema(value_type = Vec<Container>)]
    containers: Vec<crate::node::ContainerView>,
    pagination: Pagination,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ContainerQuery {
    /// Only this project's containers.
    project: Option<String>,
    /// From 1 (the default).
    page: Option<usize>,
    /// Items per page, at most 100 (the default).
    limit: Option<usize>,
}

fn container_page(node: &Node, project: Option<&str>, q: &ContainerQuery) -> ApiResult {
    if let Some(p) = project {
        node.store().project(p)?;
    }
    let all = node.store().containers(project)?;
    let (page, pagination) = paginate(all, q.page, q.limit, CONTAINERS_PAGE_CAP);
    let containers = page.iter().map(|c| node.view(c)).collect();
    ok(
        StatusCode::OK,
        "containers",
        ContainerList {
            containers,
            pagination,
        },
    )
}

#[utoipa::path(get, path = "/api/v1/containers", tag = "containers", params(ContainerQuery),
    responses((status = 200, body = Envelope<ContainerList>), Errors))]
async fn list_containers(State(node): Node_, ApiQuery(q): ApiQuery<ContainerQuery>) -> ApiResult {
    container_page(&node, q.project.as_deref(), &q)
}

#[utoipa::path(get, path = "/api/v1/projects/{project}/containers", tag = "containers",
    params(("project" = String, Path), PageQuery),
    responses((status = 200, body = Envelope<ContainerList>), Errors))]
async fn list_project_containers(
    State(node): Node_,
    Path(project): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult {
    let q = ContainerQuery {
        project: None,
        page: q.page,
        limit: q.limit,
    };
    container_page(&node, Some(&project), &q)
}

#[utoipa::path(post, path = "/api/v1/projects/{project}/containers", tag = "containers",
    params(("project" = String, Path)), request_body = CreateRequest,
    responses((status = 201, body = Envelope<Container>), Errors))]
async fn create_container(
    State(node): Node_,
    Path(project): Path<String>,
    ApiJson(req): ApiJson<CreateRequest>,
) -> ApiResult {
    let c = node.create(&project, req).await?;
    ok(StatusCode::CREATED, "container created", node.view(&c))
}

#[utoipa::path(get, path = "/api/v1/containers/{id}", tag = "containers",
    params(("id" = String, Path, description = "Id, project/name, or a name unique on the node")),
    responses((status = 200, body = Envelope<Container>), Errors))]
async fn get_container(State(node): Node_, Path(id): Path<String>) -> ApiResult {
    let c = node.get(&id)?;
    let mut view = node.view(&c);
    view.disk = node.disk_usage(&c).await;
    ok(StatusCode::OK, "container", view)
}

#[utoipa::path(put, path = "/api/v1/containers/{id}", tag = "containers",
    params(("id" = String, Path)), request_body = UpdateRequest,
    responses((status = 200, body = Envelope<Container>), Errors))]
async fn update_container(
    State(node): Node_,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateRequest>,
) -> ApiResult {
    let Some(gb) = req.disk_gb else {
        return Err(NodeError::Invalid("nothing to update (supported: disk_gb)".into()).into());
    };
    let c = node.resize_disk(&id, gb).await?;
    let mut view = node.view(&c);
    view.disk = node.disk_usage(&c).await;
    ok(StatusCode::OK, "container updated", view)
}

#[utoipa::path(delete, path = "/api/v1/containers/{id}", tag = "containers",
    params(("id" = String, Path)),
    responses((status = 200, body = Envelope<Null>), Errors))]
async fn delete_container(State(node): Node_, Path(id): Path<String>) -> ApiResult {
    node.delete(&id).await?;
    ok(StatusCode::OK, "container deleted", Null)
}

#[derive(Serialize, ToSchema)]
struct OperationDone {
    operation: String,
    container_id: String,
    status: String,
}

/// `stop` shuts the guest down cleanly, `force-stop` kills it.
#[utoipa::path(post, path = "/api/v1/containers/{id}/{operation}", tag = "containers",
    params(
        ("id" = String, Path),
        ("operation" = String, Path, description = "start, stop, force-stop or restart",
            example = "restart"),
    ),
    responses((status = 200, body = Envelope<OperationDone>), Errors))]
async fn operation(State(node): Node_, Path((id, op)): Path<(String, String)>) -> ApiResult {
    let c = match op.as_str() {
        "start" => node.start(&id).await?,
        "stop" => node.stop(&id, false).await?,
        "force-stop" => node.stop(&id, true).await?,
        "restart" => node.restart(&id).await?,
        other => {
            return Err(NodeError::NotFound(format!(
                "unknown operation {other:?} (start, stop, force-stop, restart)"
            ))
            .into())
        }
    };
    let done = OperationDone {
        operation: op.clone(),
        container_id: c.id,
        status: c.state.as_str().into(),
    };
    ok(StatusCode::OK, &format!("{op} done"), done)
}

#[derive(Serialize, ToSchema)]
struct SnapshotView {
    /// `sYYYYMMDD-HHMMSS`: what restore, delete and copy take (or the alias).
    name: String,
    alias: Option<String>,
    created_at: String,
    expires_at: Option<String>,
    /// Always false: snapshots hold the file system, not processes.
    stateful: bool,
    /// Bytes: the container's disk use (`disk.used_bytes`) when it was taken; null
    /// when the node has no disk quotas.
    size: Option<u64>,
    /// The database engines flushed and held for it; null when the guest was stopped.
    quiesced: Option<Vec<String>>,
}

impl From<&SnapshotRow> for SnapshotView {
    fn from(s: &SnapshotRow) -> Self {
        SnapshotView {
            name: s.name.clone(),
            alias: s.alias.clone(),
            created_at: s.created_at.clone(),
            expires_at: s.expires_at.clone(),
            stateful: false,
            size: s.size_bytes,
            quiesced: s.quiesced.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
struct SnapshotList {
    container_id: String,
    project_id: String,
    /// All of the container's snapshots, not just this page's.
    snapshot_count: usize,
    max_snapshots: usize,
    snapshots: Vec<SnapshotView>,
    pagination: Pagination,
}

#[utoipa::path(get, path = "/api/v1/containers/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path), PageQuery),
    responses((status = 200, body = Envelope<SnapshotList>), Errors))]
async fn list_snapshots(
    State(node): Node_,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult {
    let (c, snaps) = node.snapshots(&id)?;
    let snapshot_count = snaps.len();
    let (page, pagination) = paginate(snaps, q.page, q.limit, PAGE_CAP);
    let list = SnapshotList {
        container_id: c.id,
        project_id: c.project,
        snapshot_count,
        max_snapshots: node.cfg.defaults.max_snapshots,
        snapshots: page.iter().map(SnapshotView::from).collect(),
        pagination,
    };
    ok(StatusCode::OK, "snapshots", list)
}

#[derive(Serialize, ToSchema)]
struct SnapshotCreated {
    snapshot: SnapshotView,
}

/// A running guest's databases are flushed and held while the snapshot is taken
/// (`quiesce: false` skips that).
#[utoipa::path(post, path = "/api/v1/containers/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path)),
    request_body(content = Option<SnapshotRequest>, description = "Optional"),
    responses((status = 201, body = Envelope<SnapshotCreated>), Errors))]
async fn create_snapshot(
    State(node): Node_,
    Path(id): Path<String>,
    body: Option<ApiJson<SnapshotRequest>>,
) -> ApiResult {
    let req = body.map(|ApiJson(b)| b).unwrap_or_default();
    let s = node.snapshot(&id, req).await?;
    let snapshot = SnapshotView::from(&s);
    ok(
        StatusCode::CREATED,
        "snapshot created",
        SnapshotCreated { snapshot },
    )
}

#[derive(Serialize, ToSchema)]
struct Restored {
    success: bool,
    container_id: String,
    status: String,
    snapshot: String,
}

/// Rewinds the file system; a running guest is restarted from the restored disk.
#[utoipa::path(put, path = "/api/v1/containers/{id}/snapshots/{name}", tag = "snapshots",
    params(("id" = String, Path), ("name" = String, Path, description = "Name or alias")),
    responses((status = 200, body = Envelope<Restored>), Errors))]
async fn restore_snapshot(
    State(node): Node_,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    let c = node.restore(&id, &name).await?;
    let done = Restored {
        success: true,
        container_id: c.id,
        status: c.state.as_str().into(),
        snapshot: name,
    };
    ok(StatusCode::OK, "snapshot restored", done)
}

#[utoipa::path(delete, path = "/api/v1/containers/{id}/snapshots/{name}", tag = "snapshots",
    params(("id" = String, Path), ("name" = String, Path, description = "Name or alias")),
    responses((status = 200, body = Envelope<Null>), Errors))]
async fn delete_snapshot(
    State(node): Node_,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    node.delete_snapshot(&id, &name).await?;
    ok(StatusCode::OK, "snapshot deleted", Null)
}

#[derive(Serialize, Deserialize, ToSchema)]
struct AliasBody {
    /// Null clears it.
    alias: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct AliasSet {
    name: String,
    alias: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/containers/{id}/snapshots/{name}/alias", tag = "snapshots",
    params(("id" = String, Path), ("name" = String, Path, description = "Name or alias")),
    request_body = AliasBody,
    responses((status = 200, body = Envelope<AliasSet>), Errors))]
async fn alias_snapshot(
    State(node): Node_,
    Path((id, name)): Path<(String, String)>,
    ApiJson(b): ApiJson<AliasBody>,
) -> ApiResult {
    node.alias_snapshot(&id, &name, b.alias.as_deref())?;
    let set = AliasSet {
        name,
        alias: b.alias,
    };
    ok(StatusCode::OK, "alias set", set)
}

/// A new container from this one's current state, or from one of its snapshots
/// (`source_snapshot`: a branch).
#[utoipa::path(post, path = "/api/v1/containers/{id}/copy", tag = "containers",
    params(("id" = String, Path)), request_body = CopyRequest,
    responses((status = 201, body = Envelope<Container>), Errors))]
async fn copy_container(
    State(node): Node_,
    principal: Option<axum::extract::Extension<crate::auth::ApiPrincipal>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CopyRequest>,
) -> ApiResult {
    // Over HTTPS a project token copies into its own project only (the source was
    // checked by the front door).
    if let (Some(axum::extract::Extension(p)), Some(target)) = (&principal, &req.target_project_id)
    {
        if !p.may_access(target) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("this API token does not grant access to project {target}"),
            ));
        }
    }
    let c = node.copy(&id, req).await?;
    ok(StatusCode::CREATED, "container copied", node.view(&c))
}

/// Hostname, OS, kernel, memory and load, from the guest's agent.
#[utoipa::path(get, path = "/api/v1/containers/{id}/info", tag = "containers",
    params(("id" = String, Path)),
    responses((status = 200, body = Envelope<Value>), Errors))]
async fn container_info(State(node): Node_, Path(id): Path<String>) -> ApiResult {
    let c = node.get(&id)?;
    let agent = node.agent(&c)?;
    let info = agent
        .info()
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("agent: {e}")))?;
    ok(StatusCode::OK, "info", info)
}

#[derive(Deserialize, IntoParams)]
struct AccessLogQuery {
    /// How many of the newest entries (default 100, at most 1000).
    limit: Option<usize>,
}

/// The HTTPS front door's recent requests to this container, oldest first: time,
/// method, host, path, status, bytes, duration, client, service.
#[utoipa::path(get, path = "/api/v1/containers/{id}/access-log", tag = "containers",
    params(("id" = String, Path), AccessLogQuery),
    responses((status = 200, body = Envelope<Value>), Errors))]
async fn access_log(
    State(node): Node_,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<AccessLogQuery>,
) -> ApiResult {
    let c = node.get(&id)?;
    let limit = q
        .limit
        .unwrap_or(100)
        .min(crate::proxy::access_log::PER_CONTAINER);
    let entries = node.access_log.recent(&c.id, limit);
    ok(
        StatusCode::OK,
        "access log",
        serde_json::json!({ "container_id": c.id, "entries": entries }),
    )
}

/// Runs a command to completion in a running container. Stdout and stderr are kept up
/// to 16 MiB each (`truncated` says more was dropped); a non-zero exit is still a 200.
#[utoipa::path(post, path = "/api/v1/containers/{id}/exec", tag = "containers",
    params(("id" = String, Path)), request_body = RunRequest,
    responses((status = 200, body = Envelope<RunOutput>), Errors, GuestErrors))]
async fn exec_command(
    State(node): Node_,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RunRequest>,
) -> ApiResult {
    let out = exec::run(&node, &id, req).await?;
    ok(StatusCode::OK, "command finished", out)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FileQuery {
    /// Absolute path in the container.
    path: String,
}

/// A file's bytes (streamed, with `Content-Length`), or a directory's listing.
#[utoipa::path(get, path = "/api/v1/containers/{id}/files", tag = "files",
    params(("id" = String, Path), FileQuery),
    responses(
        (status = 200, description = "The file's bytes, or for a directory its listing",
            content((Binary = "application/octet-stream"), (Envelope<DirListing> = "application/json"))),
        Errors, GuestErrors
    ))]
async fn get_file(
    State(node): Node_,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> ApiResult {
    match files::fetch(&node, &id, &q.path).await? {
        Fetched::Dir(listing) => ok(StatusCode::OK, "directory", listing),
        Fetched::File { len, body } => {
            let stream = tokio_util::io::ReaderStream::with_capacity(body, FILE_CHUNK);
            let headers = [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (header::CONTENT_LENGTH, HeaderValue::from(len)),
            ];
            Ok((headers, axum::body::Body::from_stream(stream)).into_response())
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PutQuery {
    /// Absolute path in the container.
    path: String,
    /// Octal permission bits, e.g. `0644`. By default a replaced file keeps its own and a
    /// new one gets 0644.
    mode: Option<String>,
    /// Create missing parent directories (default false).
    create_parents: Option<bool>,
}

#[derive(Serialize, ToSchema)]
struct FileWritten {
    path: String,
    size: u64,
}

/// Writes the raw body to a file, atomically: the file is replaced only once every byte
/// the `Content-Length` announced arrived. An existing file keeps its owner.
#[utoipa::path(put, path = "/api/v1/containers/{id}/files", tag = "files",
    params(("id" = String, Path), PutQuery),
    request_body(content = Binary, content_type = "application/octet-stream"),
    responses(
        (status = 200, body = Envelope<FileWritten>),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        Errors, GuestErrors
    ))]
async fn put_file(
    State(node): Node_,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PutQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult {
    let mode = q.mode.as_deref().map(files::parse_mode).transpose()?;
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let opts = PutOptions {
        mode,
        create_parents: q.create_parents.unwrap_or(false),
        len,
    };
    let mut reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let size = files::put(&node, &id, &q.path, opts, &mut reader).await?;
    ok(
        StatusCode::OK,
        "file written",
        FileWritten { path: q.path, size },
    )
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeleteQuery {
    /// Absolute path in the container.
    path: String,
    /// Remove a directory with everything in it (default false: only empty ones).
    recursive: Option<bool>,
}

#[utoipa::path(delete, path = "/api/v1/containers/{id}/files", tag = "files",
    params(("id" = String, Path), DeleteQuery),
    responses((status = 200, body = Envelope<Null>), Errors, GuestErrors))]
async fn delete_file(
    State(node): Node_,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult {
    files::remove(&node, &id, &q.path, q.recursive.unwrap_or(false)).await?;
    ok(StatusCode::OK, "deleted", Null)
}

/// Hands the caller a connection to the container's agent that already passed the
/// handshake (the caller never sees the guest's secret). After `101 Switching Protocols`
/// the bytes are the agent protocol from `Open` on.
#[utoipa::path(get, path = "/api/v1/containers/{id}/agent", tag = "containers",
    params(("id" = String, Path)),
    responses(
        (status = 101, description = "`Upgrade: hearth-agent`: the agent protocol follows"),
        (status = 426, description = "The request lacked `Upgrade: hearth-agent`", body = ErrorBody),
        Errors
    ))]
async fn agent_upgrade(State(node): Node_, Path(id): Path<String>, mut req: Request) -> ApiResult {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(AGENT_UPGRADE.as_bytes()));
    if !wants {
        return Err(ApiError(
            StatusCode::UPGRADE_REQUIRED,
            format!("this route needs `Upgrade: {AGENT_UPGRADE}`"),
        ));
    }
    let c = node.get(&id)?;
    let dialer = crate::agents::DirectDialer {
        endpoint: hearth_protocol::Endpoint::Unix(node.agent_socket(&c.id)),
        secret: hearth_protocol::Secret::parse(c.secret_hex.as_bytes())
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    };
    let agent = crate::agents::Dialer::dial(&dialer)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("agent: {e}")))?;
    let hello = agent.hello.clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("agent upgrade failed: {e}");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(upgraded);
        let (conn, buffered) = agent.into_parts();
        let mut conn = conn;
        use tokio::io::AsyncWriteExt;
        if !buffered.is_empty() && client.write_all(&buffered).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut conn).await;
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(AGENT_UPGRADE));
    if let Ok(v) = HeaderValue::from_str(&hello.agent_version) {
        h.insert("x-hearth-agent-version", v);
    }
    if let Ok(v) = HeaderValue::from_str(&hello.features.to_string()) {
        h.insert("x-hearth-agent-features", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::pool::{DiskUsage, ImageEntry, PoolError, Storage, StorageInfo};
    use crate::runtime::{GuestSpec, RunState, Runtime, RuntimeError, RuntimeInfo};
    use crate::store::{ContainerRow, State as RowState, Store};
    use serde_json::json;
    use std::collections::BTreeSet;
    use std::path::{Path as FsPath, PathBuf};
    use tower::ServiceExt;

    /// Routes served without an OpenAPI description yet. Each must be annotated with
    /// `#[utoipa::path]` and registered through `routes!`; then it leaves this list.
    const UNDOCUMENTED: &[(&str, &str)] = &[];

    /// The pool and runtime are never reached by these tests: every request stops at
    /// the store, at validation, or at a container that is not running.
    struct NoPool;

    impl Storage for NoPool {
        fn info(&self) -> StorageInfo {
            StorageInfo {
                driver: "none",
                instant_snapshots: false,
                quotas: false,
            }
        }
        fn root(&self) -> &FsPath {
            FsPath::new("/nonexistent")
        }
        fn image_path(&self, name: &str) -> PathBuf {
            PathBuf::from("/nonexistent").join(name)
        }
        fn list_images(&self) -> Result<Vec<ImageEntry>, PoolError> {
            unreachable!()
        }
        fn begin_image(&self, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!()
        }
        fn commit_image(&self, _: &FsPath, _: &str) -> Result<(), PoolError> {
            unreachable!()
        }
        fn abort_image(&self, _: &FsPath) -> Result<(), PoolError> {
            unreachable!()
        }
        fn delete_image(&self, _: &str) -> Result<(), PoolError> {
            unreachable!()
        }
        fn create_rootfs(&self, _: &str, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!()
        }
        fn rootfs(&self, id: &str) -> PathBuf {
            PathBuf::from("/nonexistent").join(id)
        }
        fn delete_container(&self, _: &str) -> Result<(), PoolError> {
            unreachable!()
        }
        fn container_ids(&self) -> Result<Vec<String>, PoolError> {
            unreachable!()
        }
        fn raw_snapshot(&self, _: &FsPath, _: &FsPath, _: bool) -> Result<(), PoolError> {
            unreachable!()
        }
        fn snapshot_path(&self, id: &str, name: &str) -> PathBuf {
            PathBuf::from("/nonexistent").join(id).join(name)
        }
        fn snapshot_container(&self, _: &str, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!()
        }
        fn list_snapshots(&self, _: &str) -> Result<Vec<String>, PoolError> {
            unreachable!()
        }
        fn delete_snapshot(&self, _: &str, _: &str) -> Result<(), PoolError> {
            unreachable!()
        }
        fn stage_restore(&self, _: &str, _: &str) -> Result<(), PoolError> {
            unreachable!()
        }
        fn swap_restored(&self, _: &str) -> Result<(), PoolError> {
            unreachable!()
        }
        fn create_rootfs_from(&self, _: &FsPath, _: &str) -> Result<PathBuf, PoolError> {
            unreachable!()
        }
        fn recover_container(&self, _: &str) -> Result<(), PoolError> {
            unreachable!()
        }
        fn set_quota(&self, _: &str, _: Option<u64>) -> Result<(), PoolError> {
            unreachable!()
        }
        fn usage(&self, _: &str) -> Result<DiskUsage, PoolError> {
            unreachable!()
        }
    }

    struct NoRuntime;

    impl Runtime for NoRuntime {
        fn info(&self) -> RuntimeInfo {
            RuntimeInfo {
                name: "none",
                shared_kernel: true,
            }
        }
        fn define(&self, _: &GuestSpec) -> Result<(), RuntimeError> {
            unreachable!()
        }
        fn start(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!()
        }
        fn stop(&self, _: &str, _: i32) -> Result<(), RuntimeError> {
            unreachable!()
        }
        fn kill(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!()
        }
        fn kill_begin(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!()
        }
        fn state(&self, _: &str) -> Result<RunState, RuntimeError> {
            unreachable!()
        }
        fn init_pid(&self, _: &str) -> Result<Option<i32>, RuntimeError> {
            unreachable!()
        }
        fn undefine(&self, _: &str) -> Result<(), RuntimeError> {
            unreachable!()
        }
        fn list(&self) -> Result<Vec<String>, RuntimeError> {
            unreachable!()
        }
    }

    fn test_node() -> Arc<Node> {
        let dir = std::env::temp_dir().join(format!("hearth-routes-test-{}", std::process::id()));
        let cfg = Config {
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            ..Config::default()
        };
        let store = Store::open_in_memory().unwrap();
        Node::new(cfg, store, Arc::new(NoPool), Arc::new(NoRuntime))
    }

    fn add_container(node: &Node, project: &str, name: &str, n: u8) -> ContainerRow {
        add_container_in(node, project, name, n, RowState::Stopped, "00".repeat(32))
    }

    fn add_container_in(
        node: &Node,
        project: &str,
        name: &str,
        n: u8,
        state: RowState,
        secret_hex: String,
    ) -> ContainerRow {
        let store = node.store();
        store.ensure_project(project).unwrap();
        let row = ContainerRow {
            id: format!("c{n:09}"),
            project: project.into(),
            name: name.into(),
            image: "debian-13".into(),
            state,
            ip: std::net::Ipv4Addr::new(10, 0, 3, n),
            idmap_block: n.into(),
            secret_hex,
            memory_bytes: 512 << 20,
            cpus: 1.0,
            pids: 1024,
            disk_bytes: Some(10 << 30),
            autostart: true,
            created_at: "2026-01-01T00:00:00Z".into(),
            error: None,
            slot: 0,
        };
        store.insert_container(&row).unwrap();
        row
    }

    async fn call(
        app: &Router,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                axum::body::Body::from(v.to_string())
            }
            None => axum::body::Body::empty(),
        };
        let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    /// The paths the router serves. axum lists no routes, but its `Debug` output names
    /// every path; the test fails if that ever finds none.
    fn served_paths(app: &Router) -> BTreeSet<String> {
        let dbg = format!("{app:?}");
        dbg.split('"')
            .filter(|s| s.starts_with("/api/"))
            .map(String::from)
            .collect()
    }

    /// Whether `method path` reaches a handler rather than the router's fallbacks.
    async fn served(app: &Router, method: &Method, path: &str) -> bool {
        let mut uri = String::new();
        for seg in path.split('/').skip(1) {
            uri.push('/');
            uri.push_str(if seg.starts_with('{') { "nosuch" } else { seg });
        }
        let (status, body) = call(app, method.clone(), &uri, None).await;
        let fallback = status == StatusCode::METHOD_NOT_ALLOWED
            || (status == StatusCode::NOT_FOUND
                && body["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no route")));
        !fallback
    }

    #[tokio::test]
    async fn openapi_document_describes_every_route() {
        let app = router(test_node());
        let (status, doc) = call(&app, Method::GET, OPENAPI_PATH, None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["security"], json!([{ "bearer": [] }]));

        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let paths = served_paths(&app);
        assert!(paths.len() > 10, "no routes found in {app:?}");
        let mut served_routes = BTreeSet::new();
        for path in &paths {
            for m in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
            ] {
                if served(&app, &m, path).await {
                    served_routes.insert((m.to_string(), path.clone()));
                }
            }
        }
        let undocumented: BTreeSet<(String, String)> = UNDOCUMENTED
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        let missing: Vec<_> = served_routes
            .difference(&documented)
            .filter(|r| !undocumented.contains(r))
            .collect();
        assert!(
            missing.is_empty(),
            "served but not in the OpenAPI document (annotate the handler with \
             #[utoipa::path] and register it with routes!): {missing:?}"
        );
        let phantom: Vec<_> = documented.difference(&served_routes).collect();
        assert!(phantom.is_empty(), "documented but not served: {phantom:?}");
        let stale: Vec<_> = undocumented.intersection(&documented).collect();
        assert!(
            stale.is_empty(),
            "documented now; remove from UNDOCUMENTED: {stale:?}"
        );
        for (m, p) in [
            ("POST", "/api/v1/containers/{id}/exec"),
            ("GET", "/api/v1/containers/{id}/files"),
            ("PUT", "/api/v1/containers/{id}/files"),
            ("DELETE", "/api/v1/containers/{id}/files"),
            ("GET", OPENAPI_PATH),
        ] {
            assert!(
                documented.contains(&(m.to_string(), p.to_string())),
                "{m} {p}"
            );
        }
    }

    /// The hand-written `Container` schema says what `ContainerView` serializes to.
    #[test]
    fn container_schema_matches_the_view() {
        let node = test_node();
        let row = add_container(&node, "p", "web", 1);
        let mut view = node.view(&row);
        view.disk = Some(DiskUsage {
            used_bytes: 1,
            limit_bytes: Some(2),
        });
        let v = serde_json::to_value(&view).unwrap();
        let doc = serde_json::to_value(openapi()).unwrap();
        let schema = &doc["components"]["schemas"]["Container"]["properties"];
        let keys =
            |o: &Value| -> BTreeSet<String> { o.as_object().unwrap().keys().cloned().collect() };
        assert_eq!(keys(&v), keys(schema));
        let disk = &doc["components"]["schemas"]["DiskUse"]["properties"];
        assert_eq!(keys(&v["disk"]), keys(disk));
    }

    #[test]
    fn pages_count_from_one_and_clamp() {
        let all: Vec<u32> = (1..=5).collect();
        let (items, p) = paginate(all.clone(), Some(2), Some(2), 100);
        assert_eq!(items, [3, 4]);
        assert_eq!(
            p,
            Pagination {
                total: 5,
                page: 2,
                limit: 2,
                total_pages: 3
            }
        );
        let (items, p) = paginate(all.clone(), Some(0), Some(0), 100);
        assert_eq!((items, p.page, p.limit), (vec![1], 1, 1));
        let (items, p) = paginate(all.clone(), None, Some(1000), 3);
        assert_eq!((items.len(), p.limit, p.total_pages), (3, 3, 2));
        let (items, _) = paginate(all, Some(usize::MAX), None, 3);
        assert!(items.is_empty());
        let (_, p) = paginate(Vec::<u8>::new(), None, None, 200);
        assert_eq!((p.total, p.total_pages, p.limit), (0, 0, 200));
    }

    #[tokio::test]
    async fn every_list_is_paginated() {
        let node = test_node();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            add_container(&node, "p", name, i as u8 + 1);
        }
        add_container(&node, "q", "d", 4);
        {
            let store = node.store();
            for n in 1..=3 {
                let s = SnapshotRow {
                    container_id: "c000000001".into(),
                    name: format!("s2026010{n}-000000"),
                    alias: None,
                    created_at: "2026-01-01T00:00:00Z".into(),
                    expires_at: None,
                    state: "ready".into(),
                    quiesced: None,
                    size_bytes: None,
                };
                store.insert_snapshot(&s).unwrap();
            }
        }
        let app = router(node);
        let pagination = |v: &Value| v["data"]["pagination"].clone();

        let (status, v) = call(&app, Method::GET, "/api/v1/projects?limit=1&page=2", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["data"]["projects"].as_array().unwrap().len(), 1);
        assert_eq!(
            pagination(&v),
            json!({"total": 2, "page": 2, "limit": 1, "totalPages": 2})
        );

        let (_, v) = call(&app, Method::GET, "/api/v1/containers?limit=3", None).await;
        assert_eq!(v["data"]["containers"].as_array().unwrap().len(), 3);
        assert_eq!(
            pagination(&v),
            json!({"total": 4, "page": 1, "limit": 3, "totalPages": 2})
        );
        let (_, v) = call(&app, Method::GET, "/api/v1/containers?project=q", None).await;
        assert_eq!(v["data"]["containers"][0]["name"], "d");
        assert_eq!(pagination(&v)["limit"], 100);

        let uri = "/api/v1/projects/p/containers?page=2&limit=2";
        let (_, v) = call(&app, Method::GET, uri, None).await;
        assert_eq!(v["data"]["containers"].as_array().unwrap().len(), 1);
        assert_eq!(
            pagination(&v),
            json!({"total": 3, "page": 2, "limit": 2, "totalPages": 2})
        );

        let uri = "/api/v1/containers/c000000001/snapshots?limit=2";
        let (_, v) = call(&app, Method::GET, uri, None).await;
        assert_eq!(v["data"]["snapshots"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"]["snapshot_count"], 3);
        assert_eq!(
            pagination(&v),
            json!({"total": 3, "page": 1, "limit": 2, "totalPages": 2})
        );

        let (status, v) = call(&app, Method::GET, "/api/v1/containers?page=x", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(v["statusCode"], 400);
        assert_eq!(v["error"], "Bad Request");
    }

    #[tokio::test]
    async fn errors_use_the_envelope() {
        let app = router(test_node());
        let (status, v) = call(&app, Method::GET, "/api/v1/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["error"], "Not Found");
        assert!(v["message"].as_str().unwrap().starts_with("no route GET"));

        let (status, v) = call(&app, Method::PATCH, "/api/v1/containers", None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(v["statusCode"], 405);

        let body = json!({ "name": 5 });
        let (status, v) = call(&app, Method::POST, "/api/v1/projects", Some(body)).await;
        assert!(status.is_client_error(), "{status}");
        assert_eq!(v["statusCode"], status.as_u16());

        let (status, v) = call(&app, Method::GET, "/api/v1/containers/nosuch", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["message"], "container nosuch not found");
    }

    #[tokio::test]
    async fn guest_routes_check_before_reaching_the_guest() {
        let node = test_node();
        add_container(&node, "p", "web", 1);
        let app = router(node);

        let exec = json!({ "command": ["true"] });
        let uri = "/api/v1/containers/web/exec";
        let (status, v) = call(&app, Method::POST, uri, Some(exec)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{v}");
        assert!(v["message"].as_str().unwrap().contains("stopped"));

        let bad = json!({ "command": "true", "timeout_secs": 0 });
        let (status, _) = call(&app, Method::POST, uri, Some(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let uri = "/api/v1/containers/web/files?path=etc/hostname";
        let (status, v) = call(&app, Method::GET, uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(v["message"].as_str().unwrap().contains("absolute"));

        let uri = "/api/v1/containers/web/files?path=/etc/%00x";
        let (status, _) = call(&app, Method::DELETE, uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let uri = "/api/v1/containers/web/files?path=/tmp/..&recursive=true";
        let (status, _) = call(&app, Method::DELETE, uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let uri = "/api/v1/containers/web/files?path=/root/x&mode=999";
        let (status, _) = call(&app, Method::PUT, uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        // A body without a length could be cut off unnoticed: refused.
        let req = Request::builder()
            .method(Method::PUT)
            .uri("/api/v1/containers/web/files?path=/root/x")
            .body(axum::body::Body::from_stream(
                futures_util::stream::empty::<Result<bytes::Bytes, std::io::Error>>(),
            ))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::LENGTH_REQUIRED);

        let uri = "/api/v1/containers/web/files?path=/etc/hostname";
        let (status, v) = call(&app, Method::GET, uri, None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{v}");
    }

    /// A node whose one container ("web", running) is served by a real agent in this
    /// process, working on this machine's files: the exec and files routes end to end,
    /// without root or a container.
    struct WithAgent {
        app: Router,
        dir: tempfile::TempDir,
        _agent: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl WithAgent {
        async fn start() -> WithAgent {
            let dir = tempfile::tempdir().unwrap();
            let cfg = Config {
                state_dir: dir.path().join("state"),
                run_dir: dir.path().join("run"),
                ..Config::default()
            };
            let node = Node::new(
                cfg,
                Store::open_in_memory().unwrap(),
                Arc::new(NoPool),
                Arc::new(NoRuntime),
            );
            let secret = hearth_protocol::Secret(rand::random());
            let row = add_container_in(&node, "p", "web", 1, RowState::Running, secret.to_hex());
            let sock = node.agent_socket(&row.id);
            std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
            let listener = hearth_protocol::Endpoint::Unix(sock)
                .listen()
                .await
                .unwrap();
            let agent = hearth_agent::Agent::new(secret);
            let task = tokio::spawn(hearth_agent::server::serve(listener, agent));
            WithAgent {
                app: router(node),
                dir,
                _agent: task,
            }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).to_string_lossy().into_owned()
        }

        async fn exec(&self, body: Value) -> (StatusCode, Value) {
            let uri = "/api/v1/containers/web/exec";
            call(&self.app, Method::POST, uri, Some(body)).await
        }

        async fn raw(
            &self,
            method: Method,
            uri: &str,
            body: axum::body::Body,
            len: Option<u64>,
        ) -> (StatusCode, HeaderMap, bytes::Bytes) {
            let mut req = Request::builder().method(method).uri(uri);
            if let Some(len) = len {
                req = req.header(header::CONTENT_LENGTH, len);
            }
            let resp = self
                .app
                .clone()
                .oneshot(req.body(body).unwrap())
                .await
                .unwrap();
            let (parts, body) = resp.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            (parts.status, parts.headers, bytes)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exec_runs_commands_to_completion() {
        let t = WithAgent::start().await;
        let (status, v) = t
            .exec(json!({ "command": "echo out; echo err >&2; exit 3" }))
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let d = &v["data"];
        assert_eq!(
            (&d["exit_code"], &d["stdout"], &d["stderr"]),
            (&json!(3), &json!("out\n"), &json!("err\n"))
        );
        assert_eq!(
            (
                &d["signal"],
                &d["timed_out"],
                &d["truncated"],
                &d["snapshot"]
            ),
            (&Value::Null, &json!(false), &json!(false), &Value::Null)
        );
        assert!(d["duration_ms"].is_u64());

        let cwd = t.path("");
        let (_, v) = t
            .exec(json!({ "command": ["sh", "-c", "cat; echo \" $FOO\"; pwd"],
                          "stdin": "in", "env": {"FOO": "bar"}, "cwd": cwd }))
            .await;
        let want = format!("in bar\n{}\n", cwd.trim_end_matches('/'));
        assert_eq!(v["data"]["stdout"], want, "{v}");

        let me = nix::unistd::getuid().as_raw();
        let (_, v) = t.exec(json!({ "command": "id -u", "user": me })).await;
        assert_eq!(v["data"]["stdout"], format!("{me}\n"));

        let (status, v) = t.exec(json!({ "command": ["no-such-program"] })).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(v["message"].as_str().unwrap().contains("no-such-program"));

        let (status, v) = t
            .exec(json!({ "command": "true", "user": "no-such-user-here" }))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exec_output_is_capped_and_commands_time_out() {
        let t = WithAgent::start().await;
        let cmd = format!(
            "head -c {} /dev/zero | tr '\\0' a; echo done >&2",
            OUTPUT_CAP_PLUS
        );
        let (status, v) = t.exec(json!({ "command": cmd })).await;
        assert_eq!(status, StatusCode::OK, "{}", v["message"]);
        let d = &v["data"];
        assert_eq!(d["stdout"].as_str().unwrap().len(), exec::OUTPUT_CAP);
        assert_eq!(
            (&d["truncated"], &d["stderr"]),
            (&json!(true), &json!("done\n"))
        );
        assert_eq!(d["exit_code"], 0);

        let started = std::time::Instant::now();
        let (_, v) = t
            .exec(json!({ "command": "echo before; sleep 30", "timeout_secs": 1 }))
            .await;
        let d = &v["data"];
        assert_eq!(
            (&d["timed_out"], &d["stdout"]),
            (&json!(true), &json!("before\n"))
        );
        assert_eq!(d["signal"], libc::SIGKILL);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    /// Past the cap by a little, so the test stays quick.
    const OUTPUT_CAP_PLUS: usize = exec::OUTPUT_CAP + 1000;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_stream_both_ways() {
        let t = WithAgent::start().await;
        let file = t.path("a/b/data.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let uri = format!("/api/v1/containers/web/files?path={file}");

        // No parent directory: the agent's NotFound.
        let body = axum::body::Body::from(data.clone());
        let (status, _, _) = t
            .raw(Method::PUT, &uri, body, Some(data.len() as u64))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let put = format!("{uri}&create_parents=true&mode=0600");
        let body = axum::body::Body::from(data.clone());
        let (status, _, b) = t
            .raw(Method::PUT, &put, body, Some(data.len() as u64))
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["data"]["size"], data.len());
        assert_eq!(std::fs::read(&file).unwrap(), data);

        let (status, headers, b) = t.raw(Method::GET, &uri, Default::default(), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
        assert_eq!(headers[header::CONTENT_LENGTH], data.len().to_string());
        assert_eq!(b.as_ref(), data.as_slice());

        // A body that ends before its announced length changes nothing.
        let body = axum::body::Body::from("short");
        let (status, _, _) = t.raw(Method::PUT, &uri, body, Some(100)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(std::fs::read(&file).unwrap(), data);

        let dir_uri = format!("/api/v1/containers/web/files?path={}", t.path("a/b"));
        let (status, v) = call(&t.app, Method::GET, &dir_uri, None).await;
        assert_eq!(status, StatusCode::OK);
        let entries = v["data"]["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (
                &entries[0]["name"],
                &entries[0]["type"],
                &entries[0]["mode"]
            ),
            (&json!("data.bin"), &json!("file"), &json!("0600"))
        );

        let top = format!("/api/v1/containers/web/files?path={}", t.path("a"));
        let (status, _) = call(&t.app, Method::DELETE, &top, None).await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "a non-empty directory needs recursive"
        );
        let (status, _) = call(
            &t.app,
            Method::DELETE,
            &format!("{top}&recursive=true"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = call(&t.app, Method::GET, &uri, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
