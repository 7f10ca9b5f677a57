//! The hearth guest agent: serves the host↔guest protocol inside every guest.
//!
//! The binary (`main.rs`) parses its command line and calls [`run`]; tests and benchmarks
//! embed the same server with [`Agent::new`] and [`server::serve`].

pub mod exec;
pub mod files;
pub mod freeze;
pub mod info;
pub mod init;
pub mod kit;
pub mod port;
mod pty;
pub mod rpc;
pub mod secret;
pub mod server;
pub mod transfer;

use hearth_protocol::handshake::features;
use hearth_protocol::Secret;
use std::sync::Arc;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything this agent supports.
pub const FEATURES: u64 = features::PTY | features::FILE_STREAMS | features::EXEC_STREAMS;

/// State shared by every connection.
pub struct Agent {
    pub secret: Secret,
    pub features: u64,
    pub execs: Arc<exec::Execs>,
    pub freezer: freeze::Freezer,
}

impl Agent {
    pub fn new(secret: Secret) -> Arc<Agent> {
        Self::with_freezer(secret, freeze::Freezer::default())
    }

    pub fn with_freezer(secret: Secret, freezer: freeze::Freezer) -> Arc<Agent> {
        Arc::new(Agent {
            secret,
            features: FEATURES,
            execs: Arc::default(),
            freezer,
        })
    }
}
