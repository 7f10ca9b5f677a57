//! What can go wrong with container networking. Messages name the command, file or
//! setting involved: they reach operators as they are.

use ipnet::Ipv4Net;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no free address left in {cidr}")]
    Exhausted { cidr: Ipv4Net },
    #[error("network config: {0}")]
    Config(String),
    /// A command ran and failed; `stderr` is its own explanation (nft's parse errors point
    /// at the offending rule).
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NetError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> NetError {
        let path = path.into();
        move |source| NetError::Io { op, path, source }
    }
}
