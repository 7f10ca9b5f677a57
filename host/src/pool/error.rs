//! What can go wrong with the pool. Names and paths are in every message: these errors
//! reach operators and API clients as they are.

use super::btrfs::BtrfsError;
use hearth_images::ImageError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "invalid {what} {name:?}: use 1 to 63 of a-z, 0-9 and '-', starting with a letter or \
         digit"
    )]
    InvalidName { what: &'static str, name: String },
    #[error("{what} {name} not found")]
    NotFound { what: &'static str, name: String },
    #[error("{what} {name} already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("{path} is not on btrfs: the pool needs a btrfs file system")]
    NotBtrfs { path: PathBuf },
    #[error("{path} is not a pending image of this pool")]
    NotPending { path: PathBuf },
    #[error("{mountpoint} already has {fs_type} from {device} mounted on it; not mounting the pool over it")]
    MountpointBusy {
        mountpoint: PathBuf,
        fs_type: String,
        device: String,
    },
    #[error("pool file {file} is already mounted at {at}")]
    AlreadyMounted { file: PathBuf, at: PathBuf },
    #[error("{0} is not supported by this storage pool")]
    Unsupported(&'static str),
    #[error("unexpected output from {program}: {detail}")]
    BadOutput { program: String, detail: String },
    #[error("pool config: {0}")]
    Config(String),
    #[error(transparent)]
    Btrfs(#[from] BtrfsError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not run {program} (is it installed?): {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Command {
        program: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

impl PoolError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> PoolError {
        let path = path.into();
        move |source| PoolError::Io { op, path, source }
    }

    /// True when the thing asked for does not exist (a missing image or container).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PoolError::NotFound { .. })
    }
}
