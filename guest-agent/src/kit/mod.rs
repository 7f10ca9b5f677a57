//! The kit: the 18 HTTP services every guest carries. The host reaches one at
//! `https://…-{service}-{n}.…` by opening a [`StreamTarget::Kit`] stream per request, and
//! the agent serves HTTP/1.1 on that stream itself, so a kit service costs neither a
//! listening port in the guest nor a process of its own.
//!
//! A service is an axum [`Router`] built by its entry in [`SERVICES`]. Until a service
//! has its own module it is a [`placeholder`] that only answers its health check; giving
//! it a real API means writing that module and pointing its entry at it. The dispatch,
//! the JSON error answers and upgrades stay here, shared.
//!
//! [`StreamTarget::Kit`]: hearth_protocol::StreamTarget::Kit

mod placeholder;

use crate::Agent;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hearth_protocol::{Conn, Error};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// Where kit services keep their state in the guest, one directory per service
/// (`<service>/…`). SQLite databases kept here are checkpointed by every snapshot's
/// freeze ([`crate::freeze`]), so a service's database belongs under it.
pub const STATE_DIR: &str = "/var/lib/hearth-kit";

/// One kit service: its URL slug and how to build its HTTP API.
pub struct Service {
    pub slug: &'static str,
    /// Called once per stream. Long-lived state belongs in [`Agent`], reached through the
    /// context, so that building a router stays cheap.
    pub router: fn(KitContext) -> Router,
}

/// What a service's router is built from.
#[derive(Clone)]
pub struct KitContext {
    pub agent: Arc<Agent>,
    pub slug: &'static str,
    /// Which instance the URL named (`files-2` is instance 2); from 1.
    pub instance: u16,
}

/// Every kit service, by the slug the URLs use.
pub static SERVICES: [Service; 18] = [
    Service {
        slug: "terminal",
        router: placeholder::router,
    },
    Service {
        slug: "display",
        router: placeholder::router,
    },
    Service {
        slug: "files",
        router: placeholder::router,
    },
    Service {
        slug: "sqlite",
        router: placeholder::router,
    },
    Service {
        slug: "exec",
        router: placeholder::router,
    },
    Service {
        slug: "browser",
        router: placeholder::router,
    },
    Service {
        slug: "workspaces",
        router: placeholder::router,
    },
    Service {
        slug: "code",
        router: placeholder::router,
    },
    Service {
        slug: "curl",
        router: placeholder::router,
    },
    // Notifications.
    Service {
        slug: "n",
        router: placeholder::router,
    },
    Service {
        slug: "daemon",
        router: placeholder::router,
    },
    Service {
        slug: "cron",
        router: placeholder::router,
    },
    Service {
        slug: "pipe",
        router: placeholder::router,
    },
    Service {
        slug: "notes",
        router: placeholder::router,
    },
    Service {
        slug: "watch",
        router: placeholder::router,
    },
    Service {
        slug: "run",
        router: placeholder::router,
    },
    Service {
        slug: "tunnel",
        router: placeholder::router,
    },
    Service {
        slug: "logs",
        router: placeholder::router,
    },
];

/// Checks a stream's target before the agent answers `Opened`, so that a bad URL fails
/// the open with a typed error instead of an HTTP answer the host would have to parse.
pub fn resolve(service: &str, instance: u16) -> Result<&'static Service, Error> {
    let found = SERVICES
        .iter()
        .find(|s| s.slug == service)
        .ok_or_else(|| Error::not_found(format!("no kit service {service:?}")))?;
    if instance == 0 {
        return Err(Error::invalid(format!(
            "kit service instances count from 1; {service}-0 does not exist"
        )));
    }
    Ok(found)
}

/// Serves HTTP/1.1 on the stream until the host closes it. `leftover` is whatever the
/// host sent right behind its `Open`: the start of the first request.
pub async fn serve(
    agent: Arc<Agent>,
    service: &'static Service,
    instance: u16,
    conn: Conn,
    leftover: Vec<u8>,
) -> Result<(), hyper::Error> {
    let ctx = KitContext {
        agent,
        slug: service.slug,
        instance,
    };
    let slug = service.slug;
    let router = (service.router)(ctx)
        .fallback(move |method: Method, uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("the {slug} service has no route {method} {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(move |method: Method, uri: Uri| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("the {slug} service does not allow {method} {}", uri.path()),
            )
        });
    let (rd, wr) = tokio::io::split(conn);
    let io = tokio::io::join(std::io::Cursor::new(leftover).chain(rd), wr);
    hyper::server::conn::http1::Builder::new()
        // The host may shut down its write side once the request is sent; the answer
        // must still go out.
        .half_close(true)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        .with_upgrades()
        .await
}

/// The body of every kit service's `GET …/health`.
#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub service: &'static str,
    pub instance: u16,
    pub version: &'static str,
}

impl Health {
    pub fn ok(ctx: &KitContext) -> Health {
        Health {
            status: "ok",
            service: ctx.slug,
            instance: ctx.instance,
            version: crate::AGENT_VERSION,
        }
    }
}

/// The error shape of the kit API reference: `{statusCode, error, message}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    status_code: u16,
    error: &'static str,
    message: String,
}

/// An error answer in the kit's JSON shape, for services to share.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        status_code: status.as_u16(),
        error: status.canonical_reason().unwrap_or("Error"),
        message: message.into(),
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_protocol::ErrorKind;

    #[test]
    fn slugs_are_unique_and_resolve() {
        let mut slugs: Vec<_> = SERVICES.iter().map(|s| s.slug).collect();
        slugs.sort_unstable();
        slugs.dedup();
        assert_eq!(slugs.len(), SERVICES.len());
        for s in &SERVICES {
            assert_eq!(resolve(s.slug, 1).unwrap().slug, s.slug);
        }
        assert_eq!(resolve("nope", 1).err().unwrap().kind, ErrorKind::NotFound);
        assert_eq!(
            resolve("files", 0).err().unwrap().kind,
            ErrorKind::InvalidArgument
        );
        // Slugs are exact: no case folding, no `http-<port>` (that is a port stream).
        assert!(resolve("Files", 1).is_err());
        assert!(resolve("http-8080", 1).is_err());
    }
}
