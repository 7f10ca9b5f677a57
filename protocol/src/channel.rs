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

/// What a raw stream connects to. Append-only.
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
    /// A TCP port of the guest's own apps. The agent connects on loopback (127.0.0.1,
    /// then ::1), so apps that bind only to localhost are reachable too; then the stream
    /// carries the connection's bytes both ways, each direction half-closed on its own.
    /// A port nobody listens on fails the open with `NotFound`.
    Port { port: u16 },
    /// Instance `instance` (from 1) of the kit service `service` (a slug such as
    /// `terminal`). The stream then carries HTTP/1.1, upgrades included, served by the
    /// agent itself. An unknown slug fails the open with `NotFound`.
    Kit { service: String, instance: u16 },
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
    Port,
    Kit,
}

/// The trailer of a [`StreamTarget::FileWrite`] stream.
pub type WriteOutcome = Result<u64, Error>;
