//! Routes of the control API. Handlers are thin: parse, call the node, wrap the answer.

use super::AGENT_UPGRADE;
use crate::node::{CopyRequest, CreateRequest, Node, NodeError, SnapshotRequest, UpdateRequest};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

type Node_ = State<Arc<Node>>;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/projects", get(list_projects).post(create_project))
        .route(
            "/api/v1/projects/{project}",
            get(get_project).delete(delete_project),
        )
        .route(
            "/api/v1/projects/{project}/containers",
            get(list_project_containers).post(create_container),
        )
        .route("/api/v1/containers", get(list_containers))
        .route(
            "/api/v1/containers/{id}",
            get(get_container)
                .put(update_container)
                .delete(delete_container),
        )
        .route("/api/v1/containers/{id}/info", get(container_info))
        .route(
            "/api/v1/containers/{id}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/api/v1/containers/{id}/snapshots/{name}",
            axum::routing::put(restore_snapshot).delete(delete_snapshot),
        )
        .route(
            "/api/v1/containers/{id}/snapshots/{name}/alias",
            axum::routing::put(alias_snapshot),
        )
        .route("/api/v1/containers/{id}/copy", post(copy_container))
        .route("/api/v1/containers/{id}/agent", get(agent_upgrade))
        .route("/api/v1/containers/{id}/{operation}", post(operation))
        .merge(super::auth_routes::router(node.clone()))
        .with_state(node)
}

/// Errors in the shape `{statusCode, error, message}`.
pub struct ApiError(pub(super) StatusCode, pub(super) String);

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let code = match &e {
            NodeError::NotFound(_) => StatusCode::NOT_FOUND,
            NodeError::Conflict(_) => StatusCode::CONFLICT,
            NodeError::Invalid(_) => StatusCode::BAD_REQUEST,
            NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        NodeError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "statusCode": self.0.as_u16(),
            "error": self.0.canonical_reason().unwrap_or("Error"),
            "message": self.1,
        });
        (self.0, Json(body)).into_response()
    }
}

pub(super) type ApiResult = Result<Response, ApiError>;

/// Success in the shape `{statusCode, message, data}`.
pub(super) fn ok(code: StatusCode, message: &str, data: Value) -> ApiResult {
    let body = json!({ "statusCode": code.as_u16(), "message": message, "data": data });
    Ok((code, Json(body)).into_response())
}

pub(super) fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn health() -> ApiResult {
    ok(
        StatusCode::OK,
        "ok",
        json!({ "version": env!("CARGO_PKG_VERSION") }),
    )
}

#[derive(Deserialize)]
struct NewProject {
    name: String,
}

async fn list_projects(State(node): Node_) -> ApiResult {
    let projects = node.store().projects()?;
    ok(
        StatusCode::OK,
        "projects",
        json!({ "projects": to_value(projects)? }),
    )
}

async fn create_project(State(node): Node_, Json(p): Json<NewProject>) -> ApiResult {
    if !crate::node::valid_name(&p.name) {
        return Err(NodeError::Invalid(format!(
            "project name {:?}: use 1-63 of a-z, 0-9 and '-'",
            p.name
        ))
        .into());
    }
    let project = node.store().create_project(&p.name)?;
    ok(StatusCode::CREATED, "project created", to_value(project)?)
}

async fn get_project(State(node): Node_, Path(project): Path<String>) -> ApiResult {
    let p = node.store().project(&project)?;
    ok(StatusCode::OK, "project", to_value(p)?)
}

async fn delete_project(State(node): Node_, Path(project): Path<String>) -> ApiResult {
    node.store().delete_project(&project)?;
    ok(StatusCode::OK, "project deleted", Value::Null)
}

#[derive(Deserialize)]
struct ListQuery {
    project: Option<String>,
    page: Option<usize>,
    limit: Option<usize>,
}

fn page_of(node: &Node, project: Option<&str>, q: &ListQuery) -> ApiResult {
    if let Some(p) = project {
        node.store().project(p)?;
    }
    let all = node.store().containers(project)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 100);
    let page = q.page.unwrap_or(1).max(1);
    let total = all.len();
    let items: Vec<_> = all
        .iter()
        .skip((page - 1) * limit)
        .take(limit)
        .map(|c| node.view(c))
        .collect();
    ok(
        StatusCode::OK,
        "containers",
        json!({
            "containers": to_value(items)?,
            "pagination": { "total": total, "page": page, "limit": limit,
                            "totalPages": total.div_ceil(limit) },
        }),
    )
}

async fn list_containers(State(node): Node_, Query(q): Query<ListQuery>) -> ApiResult {
    page_of(&node, q.project.as_deref(), &q)
}

async fn list_project_containers(
    State(node): Node_,
    Path(project): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    page_of(&node, Some(&project), &q)
}

async fn create_container(
    State(node): Node_,
    Path(project): Path<String>,
    Json(req): Json<CreateRequest>,
) -> ApiResult {
    let c = node.create(&project, req).await?;
    ok(
        StatusCode::CREATED,
        "container created",
        to_value(node.view(&c))?,
    )
}

async fn get_container(State(node): Node_, Path(id): Path<String>) -> ApiResult {
    let c = node.get(&id)?;
    let mut view = node.view(&c);
    view.disk = node.disk_usage(&c).await;
    ok(StatusCode::OK, "container", to_value(view)?)
}

async fn update_container(
    State(node): Node_,
    Path(id): Path<String>,
    Json(req): Json<UpdateRequest>,
) -> ApiResult {
    let Some(gb) = req.disk_gb else {
        return Err(NodeError::Invalid("nothing to update (supported: disk_gb)".into()).into());
    };
    let c = node.resize_disk(&id, gb).await?;
    let mut view = node.view(&c);
    view.disk = node.disk_usage(&c).await;
    ok(StatusCode::OK, "container updated", to_value(view)?)
}

async fn delete_container(State(node): Node_, Path(id): Path<String>) -> ApiResult {
    node.delete(&id).await?;
    ok(StatusCode::OK, "container deleted", Value::Null)
}

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
    ok(
        StatusCode::OK,
        &format!("{op} done"),
        json!({ "operation": op, "container_id": c.id, "status": c.state.as_str() }),
    )
}

fn snapshot_json(s: &crate::store::SnapshotRow) -> Value {
    json!({
        "name": s.name, "alias": s.alias, "created_at": s.created_at,
        "expires_at": s.expires_at, "stateful": false, "size": null,
        "quiesced": s.quiesced,
    })
}

async fn list_snapshots(State(node): Node_, Path(id): Path<String>) -> ApiResult {
    let (c, snaps) = node.snapshots(&id)?;
    let list: Vec<Value> = snaps.iter().map(snapshot_json).collect();
    ok(
        StatusCode::OK,
        "snapshots",
        json!({
            "container_id": c.id, "project_id": c.project, "snapshot_count": list.len(),
            "max_snapshots": node.cfg.defaults.max_snapshots, "snapshots": list,
        }),
    )
}

async fn create_snapshot(
    State(node): Node_,
    Path(id): Path<String>,
    body: Option<Json<SnapshotRequest>>,
) -> ApiResult {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let s = node.snapshot(&id, req).await?;
    ok(
        StatusCode::CREATED,
        "snapshot created",
        json!({ "snapshot": snapshot_json(&s) }),
    )
}

async fn restore_snapshot(
    State(node): Node_,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    let c = node.restore(&id, &name).await?;
    ok(
        StatusCode::OK,
        "snapshot restored",
        json!({ "success": true, "container_id": c.id, "status": c.state.as_str(), "snapshot": name }),
    )
}

async fn delete_snapshot(
    State(node): Node_,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult {
    node.delete_snapshot(&id, &name).await?;
    ok(StatusCode::OK, "snapshot deleted", Value::Null)
}

#[derive(Deserialize)]
struct AliasBody {
    alias: Option<String>,
}

async fn alias_snapshot(
    State(node): Node_,
    Path((id, name)): Path<(String, String)>,
    Json(b): Json<AliasBody>,
) -> ApiResult {
    node.alias_snapshot(&id, &name, b.alias.as_deref())?;
    ok(
        StatusCode::OK,
        "alias set",
        json!({ "name": name, "alias": b.alias }),
    )
}

async fn copy_container(
    State(node): Node_,
    Path(id): Path<String>,
    Json(req): Json<CopyRequest>,
) -> ApiResult {
    let c = node.copy(&id, req).await?;
    ok(
        StatusCode::CREATED,
        "container copied",
        to_value(node.view(&c))?,
    )
}

async fn container_info(State(node): Node_, Path(id): Path<String>) -> ApiResult {
    let c = node.get(&id)?;
    let agent = node.agent(&c)?;
    let info = agent
        .info()
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("agent: {e}")))?;
    ok(StatusCode::OK, "info", to_value(info)?)
}

/// Hands the caller a connection to the container's agent that already passed the
/// handshake (the caller never sees the guest's secret). After `101 Switching Protocols`
/// the bytes are the agent protocol from `Open` on.
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
