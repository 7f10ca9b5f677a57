//! Files in a container for the API (`/containers/{id}/files?path=`). File bodies are
//! streamed between the HTTP connection and the agent's file streams, never held whole
//! in hearthd's memory; writes are atomic in the agent (a temporary file renamed into
//! place once every announced byte arrived).

use super::guest::{check_path, running_agent, GuestError};
use crate::agents::{AgentError, AgentStream};
use crate::node::Node;
use hearth_protocol::files::{DirEntry, FileType, WriteMode, WriteOptions};
use hearth_protocol::{Opened, StreamTarget};
use serde::Serialize;
use std::path::{Component, Path};
use tokio::io::AsyncRead;

/// What a path names: a directory's listing, or a file's bytes to stream.
pub enum Fetched {
    Dir(DirListing),
    File { len: u64, body: AgentStream },
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DirListing {
    pub path: String,
    /// Sorted by name.
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits in octal, as `PUT ...?mode=` takes them: `"0644"`.
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Where a symlink points.
    pub link_target: Option<String>,
}

impl From<DirEntry> for Entry {
    fn from(e: DirEntry) -> Self {
        Entry {
            name: e.name,
            kind: match e.stat.file_type {
                FileType::File => "file",
                FileType::Dir => "dir",
                FileType::Symlink => "symlink",
                FileType::Other => "other",
            }
            .into(),
            size: e.stat.size,
            mode: format!("{:04o}", e.stat.mode),
            uid: e.stat.uid,
            gid: e.stat.gid,
            mtime: e.stat.mtime,
            link_target: e.stat.link_target,
        }
    }
}

/// Opens a file for streaming, or lists a directory (symlinks followed).
pub async fn fetch(node: &Node, key: &str, path: &str) -> Result<Fetched, GuestError> {
    let path = check_path("path", path)?;
    let (_, agent) = running_agent(node, key)?;
    let st = agent.stat(path, true).await?;
    match st.file_type {
        FileType::Dir => {
            let mut entries: Vec<Entry> = agent
                .list_dir(path)
                .await?
                .into_iter()
                .map(Entry::from)
                .collect();
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Fetched::Dir(DirListing {
                path: path.into(),
                entries,
            }))
        }
        FileType::File => {
            let target = StreamTarget::FileRead {
                path: path.into(),
                offset: 0,
                len: None,
            };
            let body = agent.open_stream(target).await?;
            let Opened::FileRead { len } = body.opened else {
                return Err(AgentError::Unexpected(format!("{:?}", body.opened)).into());
            };
            Ok(Fetched::File { len, body })
        }
        // Opening a FIFO would block the agent until a writer came; a device is no file
        // to download.
        FileType::Symlink | FileType::Other => Err(GuestError::Invalid(format!(
            "{path} is not a regular file or a directory"
        ))),
    }
}

/// How `PUT` writes a file.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Permission bits for the file; by default a replaced file keeps its own and a new
    /// one gets 0644.
    pub mode: Option<u32>,
    pub create_parents: bool,
    /// The body's length (`Content-Length`).
    pub len: Option<u64>,
}

/// Streams `body` into a file, replacing it atomically; returns the bytes written.
pub async fn put(
    node: &Node,
    key: &str,
    path: &str,
    opts: PutOptions,
    body: &mut (impl AsyncRead + Unpin),
) -> Result<u64, GuestError> {
    let path = check_path("path", path)?;
    // The agent commits a write when the stream ends; only with the length announced
    // can it tell a complete upload from one cut off half-way.
    let Some(len) = opts.len else {
        return Err(GuestError::LengthRequired(
            "uploads need a Content-Length, so that a cut-off upload never replaces the file"
                .into(),
        ));
    };
    if opts.mode.is_some_and(|m| m > 0o7777) {
        return Err(GuestError::Invalid("mode is 0000-7777 (octal)".into()));
    }
    let (_, agent) = running_agent(node, key)?;
    let wopts = WriteOptions {
        mode: WriteMode::Truncate,
        perm: opts.mode,
        create_parents: opts.create_parents,
        expected_len: Some(len),
    };
    Ok(agent.put(path, body, wopts).await?)
}

/// Removes a file, or a directory (with `recursive`, its contents too).
pub async fn remove(node: &Node, key: &str, path: &str, recursive: bool) -> Result<(), GuestError> {
    let path = check_path("path", path)?;
    if is_root(path) {
        return Err(GuestError::Invalid(
            "refusing to remove the container's root directory".into(),
        ));
    }
    let (_, agent) = running_agent(node, key)?;
    Ok(agent.remove(path, recursive).await?)
}

/// `0644`, `644` or `0o644`.
pub fn parse_mode(s: &str) -> Result<u32, GuestError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o7777 => Ok(m),
        _ => Err(GuestError::Invalid(format!(
            "mode {s:?}: octal permission bits, 0000-7777"
        ))),
    }
}

/// Whether `path` resolves to `/` the way the agent resolves it (`..` stops at the root).
fn is_root(path: &str) -> bool {
    let mut depth = 0usize;
    for c in Path::new(path).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth = depth.saturating_sub(1),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    depth == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_protocol::files::FileStat;

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert_eq!(parse_mode("0o4755").unwrap(), 0o4755);
        for bad in ["", "0o", "888", "rw-r--r--", "17777", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn root_is_recognised_however_written() {
        for root in ["/", "//", "/.", "/tmp/..", "/a/b/../../..", "/./"] {
            assert!(is_root(root), "{root}");
        }
        for not in ["/tmp", "/a/b/..", "/.."] {
            assert_eq!(is_root(not), not == "/..", "{not}");
        }
    }

    #[test]
    fn entries_show_octal_modes_and_types() {
        let e = Entry::from(DirEntry {
            name: "x".into(),
            stat: FileStat {
                file_type: FileType::Symlink,
                size: 3,
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 1,
                link_target: Some("/y".into()),
            },
        });
        let v = serde_json::to_value(e).unwrap();
        assert_eq!(v["type"], "symlink");
        assert_eq!(v["mode"], "0777");
        assert_eq!(v["link_target"], "/y");
    }
}
