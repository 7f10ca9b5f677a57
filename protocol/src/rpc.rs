//! The RPC channel: many requests in flight on one connection, matched by id.
//!
//! A request gets exactly one [`ServerMsg::Reply`]; long-running ones (exec) first send
//! any number of [`ServerMsg::Event`]s with the same id. [`ClientMsg::Cancel`] ends a
//! request early; its reply is then `Err(Cancelled)` (or, for exec, the exit status of the
//! killed process).

use crate::error::Error;
use crate::exec::{ExecRequest, ExitStatus, WinSize};
use crate::files::{DirEntry, FileStat, WriteOptions};
use crate::info::GuestInfo;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    Call { id: u64, req: Request },
    Cancel { id: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    Reply {
        id: u64,
        result: Result<Response, Error>,
    },
    Event {
        id: u64,
        event: Event,
    },
}

/// Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Does nothing; measures the round trip.
    Ping,
    Info,
    Exec(ExecRequest),
    /// Feed stdin of an exec started with [`StdioMode::Events`](crate::exec::StdioMode).
    ExecInput {
        exec_id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    ExecCloseStdin {
        exec_id: u64,
    },
    /// Send a signal to the process (or, with `group`, its whole process group).
    ExecSignal {
        exec_id: u64,
        signal: i32,
        group: bool,
    },
    ExecResize {
        exec_id: u64,
        size: WinSize,
    },
    Stat {
        path: String,
        /// Follow a final symlink.
        follow: bool,
    },
    ListDir {
        path: String,
    },
    /// Small reads; larger ones belong on a [`StreamTarget::FileRead`](crate::StreamTarget).
    /// At most [`MAX_CHUNK`](crate::frame::MAX_CHUNK) bytes come back.
    ReadFile {
        path: String,
        offset: u64,
        len: u64,
    },
    WriteFile {
        path: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        opts: WriteOptions,
    },
    Mkdir {
        path: String,
        parents: bool,
        mode: Option<u32>,
    },
    Remove {
        path: String,
        recursive: bool,
    },
    Rename {
        from: String,
        to: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// Makes the guest's disk consistent for a snapshot: each running database engine
    /// quiesced the way it needs, then `syncfs` where the host cannot see the guest's
    /// page cache (a VM). Held until [`Request::Thaw`] or until `timeout_ms` passes
    /// (the agent thaws by itself if the host disappears).
    Freeze {
        timeout_ms: u64,
    },
    Thaw {
        freeze_id: u64,
    },
    /// Ends every freeze in effect: a host restarted in the middle of a snapshot has
    /// lost its freeze's id, and releases the guest's databases at once rather than
    /// leaving their writes blocked until the timeout.
    ThawAll,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The request succeeded and has nothing to return.
    Done,
    Info(GuestInfo),
    Exited(ExitStatus),
    Stat(FileStat),
    Dir(Vec<DirEntry>),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Written(u64),
    /// The guest is frozen; `engines` names what was quiesced.
    Frozen {
        freeze_id: u64,
        engines: Vec<String>,
    },
}

/// Streamed progress of a request. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The process is running; `exec_id` names it in later requests.
    Started {
        exec_id: u64,
        pid: u32,
    },
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
}
