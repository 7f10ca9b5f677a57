//! Loading the guest's secret. The agent refuses to start without one, or with one that
//! anybody but its owner could read: a readable secret is a shell for everyone.

use hearth_protocol::Secret;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("secret file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("secret file {path} is accessible to group or others (mode {mode:o}); chmod 600 it")]
    TooOpen { path: String, mode: u32 },
    #[error("secret file {path}: {source}")]
    Format {
        path: String,
        source: hearth_protocol::handshake::SecretError,
    },
}

pub fn load(path: &Path) -> Result<Secret, SecretFileError> {
    let shown = path.display().to_string();
    let md = std::fs::metadata(path).map_err(|source| SecretFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let mode = md.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen { path: shown, mode });
    }
    let bytes = std::fs::read(path).map_err(|source| SecretFileError::Read {
        path: shown.clone(),
        source,
    })?;
    Secret::parse(&bytes).map_err(|source| SecretFileError::Format {
        path: shown,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn refuses_missing_open_and_malformed_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        assert!(matches!(load(&p), Err(SecretFileError::Read { .. })));
        std::fs::write(&p, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&p), Err(SecretFileError::TooOpen { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&p).unwrap().0, [0xab; 32]);
        std::fs::write(&p, "not a secret").unwrap();
        assert!(matches!(load(&p), Err(SecretFileError::Format { .. })));
    }
}
