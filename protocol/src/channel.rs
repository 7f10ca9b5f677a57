//! Choosing what a connection is for, after the handshake.

use crate::error::Error;
use crate::files::WriteOptions;
use serde::{Deserialize, Serialize};

/// Sent once after [`Hello`](crate::Hello). Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Open {
    /// Multiplexed requests, responses and events; see [`crate::rpc`].
    Rpc,
    /// After [`Opened`], the connection carries raw bytes both ways, with half-close.
    /// One connection per stream keeps flow control in the kernel.
    Stream(StreamTarget),
}

/// What a raw stream connects to. Append-only: kit services and guest ports come next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamTarget {
    /// The stdin (client → agent) and stdout (agent → client) of an exec started with
    /// [`StdioMode::Stream`](crate::exec::StdioMode::Stream). Stderr still arrives as
    /// events on the RPC channel. Closing the write half closes the process's stdin.
    ExecStdio { exec_id: u64 },
    /// The agent sends the file's bytes from `offset`, up to `len` bytes (or to the end),
    /// then closes.
    FileRead {
        path: String,
        offset: u64,
        len: Option<u64>,
    },
    /// The client sends the bytes and half-closes; the agent then answers with one frame,
    /// a [`WriteOutcome`], and closes.
    FileWrite { path: String, opts: WriteOptions },
}

/// The agent's answer to [`Open`].
pub type OpenReply = Result<Opened, Error>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Opened {
    Rpc,
    /// For a file read: how many bytes will follow, so the client can tell a complete
    /// transfer from a cut one.
    FileRead {
        len: u64,
    },
    FileWrite,
    ExecStdio,
}

/// The trailer of a [`StreamTarget::FileWrite`] stream.
pub type WriteOutcome = Result<u64, Error>;
