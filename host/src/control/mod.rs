//! The control socket: the node's REST API (`/api/v1`, the envelope of kit-api.md part B)
//! over HTTP/1.1 on a unix socket that only root may use (checked with SO_PEERCRED on
//! every connection, not just by file mode). The CLI speaks it; the HTTPS front door will
//! serve the same routes.

mod auth_routes;
pub mod client;
pub mod exec;
pub mod files;
pub mod guest;
mod routes;

use crate::node::Node;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::net::UnixListener;

/// The upgrade token for a proxied agent connection.
pub const AGENT_UPGRADE: &str = "hearth-agent";

/// Every route of the REST API: the control socket serves it to root, the HTTPS front
/// door to project tokens (narrowed to their project).
pub fn api_router(node: Arc<Node>) -> axum::Router {
    routes::router(node)
}

/// Serves the control API on `path` until the task is dropped.
pub async fn serve(node: Arc<Node>, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let app = api_router(node);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Default deny: whatever the file mode says, only root gets an answer.
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 => {}
            Ok(cred) => {
                tracing::warn!("control socket: refused uid {}", cred.uid());
                continue;
            }
            Err(e) => {
                tracing::warn!("control socket: no peer credentials: {e}");
                continue;
            }
        }
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}
