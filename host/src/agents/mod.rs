//! Talking to guest agents: dial and handshake, a multiplexed RPC connection that
//! reconnects with backoff, a pool of handshaken idle connections for streams, and typed
//! calls on top.

mod client;
mod conn;
mod exec;
mod rpc;
mod stream;

pub use client::{AgentClient, ClientOptions, DialFuture, Dialer, DirectDialer, CLIENT_FEATURES};
pub use conn::{dial, dial_open, AgentHello, Handshaken};
pub use exec::{ExecEvent, ExecOutput, ExecSession};
pub use rpc::RpcClient;
pub use stream::AgentStream;

use hearth_protocol::{EndpointError, ErrorKind, FrameError, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("the agent refused the connection: {0}")]
    Refused(Refusal),
    #[error("agent: {0}")]
    Remote(#[from] hearth_protocol::Error),
    #[error("protocol: {0}")]
    Frame(#[from] FrameError),
    #[error("the connection to the agent was lost")]
    Disconnected,
    #[error("unexpected reply from the agent: {0}")]
    Unexpected(String),
    #[error("i/o with the agent: {0}")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// The agent's own error kind, when the agent answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            AgentError::Remote(e) => Some(e.kind),
            _ => None,
        }
    }

    /// True when the connection (not the request) failed, so a fresh connection may help.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            AgentError::Endpoint(_)
                | AgentError::Disconnected
                | AgentError::Io(_)
                | AgentError::Frame(_)
        )
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
