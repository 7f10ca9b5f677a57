//! What the API's guest operations (exec, files) share: finding a container whose agent
//! can answer now, and what the agent's errors mean to an API caller.

use crate::agents::{AgentClient, AgentError};
use crate::node::{Node, NodeError};
use crate::store::{ContainerRow, State};
use axum::http::StatusCode;
use hearth_protocol::ErrorKind;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The request itself is wrong (a relative path, an empty command).
    #[error("{0}")]
    Invalid(String),
    /// The guest could not start the command: no such program, no such working
    /// directory, not executable. The caller's mistake, not the node's.
    #[error("could not start the command: {0}")]
    Start(String),
    /// A request body without a length, where an upload is only atomic with one.
    #[error("{0}")]
    LengthRequired(String),
    /// The agent did not finish in time, past its own deadline.
    #[error("{0}")]
    TimedOut(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl GuestError {
    /// The HTTP status (kit-api.md B.1) a caller gets for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            GuestError::Node(e) => node_status(e),
            GuestError::Invalid(_) => StatusCode::BAD_REQUEST,
            GuestError::Start(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GuestError::LengthRequired(_) => StatusCode::LENGTH_REQUIRED,
            GuestError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            GuestError::Agent(AgentError::Remote(r)) => match r.kind {
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::AlreadyExists | ErrorKind::Busy => StatusCode::CONFLICT,
                ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
                ErrorKind::Unsupported => StatusCode::UNPROCESSABLE_ENTITY,
                ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
                // Disk full or quota reached in the guest, too many processes.
                ErrorKind::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
                ErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
                ErrorKind::Cancelled | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
            // The agent answered something that makes no sense.
            GuestError::Agent(AgentError::Unexpected(_)) => StatusCode::BAD_GATEWAY,
            // The agent does not answer: the guest is booting, restarting or hung.
            GuestError::Agent(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The message for the caller: the agent's own words for its errors (they name the
    /// path and the OS error), without the transport's prefixes.
    pub fn message(&self) -> String {
        match self {
            GuestError::Agent(AgentError::Remote(r)) => r.message.clone(),
            GuestError::Agent(e) if self.status() == StatusCode::SERVICE_UNAVAILABLE => {
                format!("the container's agent does not answer: {e}")
            }
            other => other.to_string(),
        }
    }
}

/// The status the API answers a node error with; the one mapping for every route.
pub fn node_status(e: &NodeError) -> StatusCode {
    match e {
        NodeError::NotFound(_) => StatusCode::NOT_FOUND,
        NodeError::Conflict(_) => StatusCode::CONFLICT,
        NodeError::Invalid(_) => StatusCode::BAD_REQUEST,
        NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        NodeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The container and its agent client, if the container runs. A stopped guest is
/// refused at once: the agent client would otherwise retry its socket for half a minute.
pub fn running_agent(
    node: &Node,
    key: &str,
) -> Result<(ContainerRow, Arc<AgentClient>), GuestError> {
    let c = node.get(key)?;
    if c.state != State::Running {
        return Err(NodeError::Conflict(format!(
            "container {} is {}; start it first",
            c.name,
            c.state.as_str()
        ))
        .into());
    }
    let agent = node.agent(&c)?;
    Ok((c, agent))
}

/// Guest paths as the API takes them: absolute, no NUL (the agent resolves `..` itself,
/// inside the guest's root).
pub fn check_path<'a>(what: &str, path: &'a str) -> Result<&'a str, GuestError> {
    if path.contains('\0') {
        return Err(GuestError::Invalid(format!("{what} contains a NUL byte")));
    }
    if !path.starts_with('/') {
        return Err(GuestError::Invalid(format!(
            "{what} must be an absolute path in the container, got {path:?}"
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_without_nul() {
        assert!(check_path("path", "/etc/hostname").is_ok());
        assert!(check_path("path", "/").is_ok());
        for bad in ["etc/hostname", "", "./x", "/a\0b"] {
            let e = check_path("path", bad).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn agent_errors_keep_their_meaning() {
        let remote = |kind| {
            GuestError::Agent(AgentError::Remote(hearth_protocol::Error::new(
                kind,
                "/x: No such file or directory (os error 2)",
            )))
        };
        assert_eq!(remote(ErrorKind::NotFound).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            remote(ErrorKind::NotFound).message(),
            "/x: No such file or directory (os error 2)"
        );
        assert_eq!(
            remote(ErrorKind::PermissionDenied).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            remote(ErrorKind::ResourceExhausted).status(),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            remote(ErrorKind::AlreadyExists).status(),
            StatusCode::CONFLICT
        );
        let gone = GuestError::Agent(AgentError::Disconnected);
        assert_eq!(gone.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(gone.message().contains("does not answer"));
        let missing = GuestError::Node(NodeError::NotFound("container x not found".into()));
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }
}
