//! The HTTPS front door's access log, per container (what the `logs` kit service will
//! serve inside the guest later).

use crate::node::Node;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/api/v1/containers/{id}/access-log", get(access_log))
        .with_state(node)
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// `data.entries`: the newest `limit` (default 100, at most 1000) requests, oldest first.
async fn access_log(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    Query(q): Query<Limit>,
) -> Response {
    let c = match node.get(&id) {
        Ok(c) => c,
        Err(e) => {
            return (
                axum::http::StatusCode::NOT_FOUND,
                Json(json!({"statusCode": 404, "error": "Not Found", "message": e.to_string()})),
            )
                .into_response()
        }
    };
    let limit = q
        .limit
        .unwrap_or(100)
        .min(crate::proxy::access_log::PER_CONTAINER);
    let entries = node.access_log.recent(&c.id, limit);
    Json(json!({
        "statusCode": 200,
        "message": "access log",
        "data": { "container_id": c.id, "entries": entries },
    }))
    .into_response()
}
