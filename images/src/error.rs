//! The one error type of the crate. Every variant names the file or program involved,
//! because these errors end up in front of an operator who has to act on them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
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
    #[error("{program} failed ({status}){}", output_suffix(.output))]
    Command {
        program: String,
        status: std::process::ExitStatus,
        /// The last lines the program printed: usually where it says what went wrong.
        output: String,
    },
    #[error("invalid image spec: {0}")]
    InvalidSpec(String),
    #[error("{path} must be an empty directory")]
    TargetNotEmpty { path: PathBuf },
    #[error("manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest {path} has format {found}, this build reads format {supported}")]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("manifest {path} has no sha256, so its archive cannot be verified")]
    MissingChecksum { path: PathBuf },
    #[error(
        "archive {archive} is {actual} bytes but its manifest says {expected}: truncated or \
         not the archive the manifest describes"
    )]
    SizeMismatch {
        archive: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "archive {archive} is corrupt: sha256 {actual}, manifest says {expected}; nothing was \
         extracted"
    )]
    ChecksumMismatch {
        archive: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("could not unpack {archive} (corrupt or truncated archive?){}", output_suffix(.output))]
    Extract { archive: PathBuf, output: String },
    #[error("could not unmount {path} (left mounted by the build): {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

fn output_suffix(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", output.trim())
    }
}

impl ImageError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ImageError::Io { op, path, source }
    }
}
