//! A kit service that exists in name only, for every slug whose real module is not
//! written yet: it answers its health checks so that the host's routing, auth and
//! readiness polling can be built and tested against every slug today.

use super::{Health, KitContext};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

pub fn router(ctx: KitContext) -> Router {
    // Kits differ in where their health lives (`/health` for cron, under
    // `/api/v1/<slug>/` for most); a placeholder answers on both.
    let prefixed = format!("/api/v1/{}/health", ctx.slug);
    Router::new()
        .route("/health", get(health))
        .route(&prefixed, get(health))
        .with_state(ctx)
}

async fn health(State(ctx): State<KitContext>) -> Json<Health> {
    Json(Health::ok(&ctx))
}
