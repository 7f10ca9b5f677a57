//! Typed errors that cross the wire. Callers branch on [`ErrorKind`]; the message is for
//! humans.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What went wrong, in terms a caller can act on. Append-only (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    Unsupported,
    Busy,
    /// The request was cancelled by the client.
    Cancelled,
    TimedOut,
    /// Disk full, too many processes, too many open files.
    ResourceExhausted,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Busy => "busy",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::ResourceExhausted => "resource exhausted",
            ErrorKind::Internal => "internal error",
        }
    }
}

/// An error reported by the other side of the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Maps an OS error to the kind a caller can act on, keeping the OS text and the
    /// subject (usually a path) in the message.
    pub fn from_io(err: &std::io::Error, subject: impl fmt::Display) -> Self {
        Self::new(io_kind(err), format!("{subject}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

fn io_kind(err: &std::io::Error) -> ErrorKind {
    if let Some(errno) = err.raw_os_error() {
        return match errno {
            libc::ENOENT | libc::ESRCH => ErrorKind::NotFound,
            libc::EEXIST | libc::ENOTEMPTY => ErrorKind::AlreadyExists,
            libc::EACCES | libc::EPERM | libc::EROFS => ErrorKind::PermissionDenied,
            libc::EINVAL
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::ENAMETOOLONG
            | libc::ELOOP
            | libc::EXDEV => ErrorKind::InvalidArgument,
            libc::EBUSY | libc::ETXTBSY | libc::EAGAIN => ErrorKind::Busy,
            libc::ENOSPC
            | libc::EDQUOT
            | libc::EMFILE
            | libc::ENFILE
            | libc::ENOMEM
            | libc::EFBIG => ErrorKind::ResourceExhausted,
            libc::ENOSYS | libc::EOPNOTSUPP => ErrorKind::Unsupported,
            libc::ETIMEDOUT => ErrorKind::TimedOut,
            _ => ErrorKind::Internal,
        };
    }
    use std::io::ErrorKind as K;
    match err.kind() {
        K::NotFound => ErrorKind::NotFound,
        K::AlreadyExists => ErrorKind::AlreadyExists,
        K::PermissionDenied => ErrorKind::PermissionDenied,
        K::InvalidInput | K::InvalidData => ErrorKind::InvalidArgument,
        K::TimedOut => ErrorKind::TimedOut,
        K::Unsupported => ErrorKind::Unsupported,
        _ => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_actionable_kinds() {
        let e = Error::from_io(&std::io::Error::from_raw_os_error(libc::ENOENT), "/x");
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.starts_with("/x: "));
        let e = Error::from_io(&std::io::Error::from_raw_os_error(libc::ENOSPC), "/y");
        assert_eq!(e.kind, ErrorKind::ResourceExhausted);
        let e = Error::from_io(&std::io::Error::from_raw_os_error(libc::ENOTDIR), "/z");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }
}
