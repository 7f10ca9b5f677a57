//! File operations in the guest. Paths are absolute guest paths.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// For symlinks, where they point.
    pub link_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteMode {
    /// Create or truncate.
    #[default]
    Truncate,
    /// Create or append.
    Append,
    /// Fail with `AlreadyExists` if the file exists.
    CreateNew,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOptions {
    pub mode: WriteMode,
    /// Permission bits for a new file; default `0o644`.
    pub perm: Option<u32>,
    /// Create missing parent directories.
    pub create_parents: bool,
    /// How many bytes the client is about to send. On a stream, a cut connection looks
    /// like the end of the data; with this set, the write takes effect only if exactly
    /// this many bytes arrived, so a killed client never leaves a truncated file in place
    /// of a good one. The agent also reserves the space before the first byte moves: a
    /// full disk or quota fails the open with `ResourceExhausted`, not half-way through.
    pub expected_len: Option<u64>,
}
