//! The manifest that travels with a template: what it is, when it was built, what is in
//! it, and (for an archive) the checksum that import verifies before unpacking anything.

use crate::ImageError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use time::format_description::well_known::Rfc3339;

/// Bumped when a manifest or archive changes in a way an older reader would misread.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// RFC 3339, UTC. For an archive this is when the template was built (from its
    /// `/etc/hearth/image.json`), not when it was exported, so copies of one template
    /// agree.
    pub created: String,
    /// Hex sha256 of the archive; `None` for a template that only exists as a rootfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The archive's size when `sha256` is set, otherwise the rootfs's apparent size.
    /// Import compares it first: a truncated download is caught without hashing.
    pub size_bytes: u64,
    /// Apparent size of the unpacked rootfs (hard links counted once), so a node can tell
    /// whether an import fits before it starts.
    #[serde(default)]
    pub rootfs_bytes: u64,
    /// `"name version"` of every installed Debian package, sorted.
    pub packages: Vec<String>,
    pub format: u32,
}

/// The small identity file written into every template at `/etc/hearth/image.json`, so a
/// rootfs still says what it is after it has been snapshotted, copied or imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
}

/// Where a template records its [`ImageInfo`], relative to the rootfs.
pub const IMAGE_INFO_PATH: &str = "etc/hearth/image.json";

/// The manifest that belongs to `archive`: the archive's file name plus `.manifest.json`,
/// in the same directory (`x.tar.zst` → `x.tar.zst.manifest.json`).
pub fn manifest_path_for(archive: &Path) -> PathBuf {
    let mut name = archive.as_os_str().to_os_string();
    name.push(".manifest.json");
    PathBuf::from(name)
}

pub fn read_manifest(path: &Path) -> Result<Manifest, ImageError> {
    let bytes = std::fs::read(path).map_err(ImageError::io("read", path))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest {
            path: path.to_path_buf(),
            source,
        })?;
    if manifest.format != FORMAT {
        return Err(ImageError::UnsupportedFormat {
            path: path.to_path_buf(),
            found: manifest.format,
            supported: FORMAT,
        });
    }
    Ok(manifest)
}

/// Writes through a temporary file and a rename, so a reader never sees half a manifest.
pub fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), ImageError> {
    let mut json = serde_json::to_vec_pretty(manifest).map_err(|source| ImageError::Manifest {
        path: path.to_path_buf(),
        source,
    })?;
    json.push(b'\n');
    write_atomic(path, &json)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = sibling_tmp(path);
    std::fs::write(&tmp, bytes).map_err(ImageError::io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ImageError::io("rename into place", path)(e)
    })
}

/// `<path>.partial`: the name a file has while it is being written.
pub(crate) fn sibling_tmp(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".partial");
    PathBuf::from(name)
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        // Formatting a UTC timestamp with whole seconds as RFC 3339 cannot fail for any
        // date this code will run on; the fallback only keeps this total.
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// Reads `<rootfs>/etc/hearth/image.json`, refusing to follow symlinks on the way: an
/// imported template is untrusted data and must not make the host read its own files.
pub fn read_image_info(rootfs: &Path) -> Option<ImageInfo> {
    let mut path = rootfs.to_path_buf();
    for part in Path::new(IMAGE_INFO_PATH).components() {
        path.push(part);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if meta.file_type().is_symlink() {
            return None;
        }
    }
    let bytes = std::fs::read(&path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Apparent size of a tree without following symlinks or crossing into other file
/// systems, counting each hard-linked inode once.
pub(crate) fn tree_bytes(root: &Path) -> Result<u64, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let root_dev = std::fs::symlink_metadata(root)
        .map_err(ImageError::io("stat", root))?
        .dev();
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(ImageError::io("read directory", &dir))?;
        for entry in entries {
            let entry = entry.map_err(ImageError::io("read directory", &dir))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(ImageError::io("stat", &path))?;
            if meta.is_dir() {
                if meta.dev() == root_dev {
                    stack.push(path);
                }
            } else if meta.nlink() < 2 || seen.insert((meta.dev(), meta.ino())) {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "debian-13".into(),
            created: "2025-01-02T03:04:05Z".into(),
            sha256: Some("ab".repeat(32)),
            size_bytes: 42,
            rootfs_bytes: 100,
            packages: vec!["bash 5.2.37-2".into()],
            format: FORMAT,
        }
    }

    #[test]
    fn manifest_path_appends_to_the_whole_name() {
        assert_eq!(
            manifest_path_for(Path::new("/x/debian-13.tar.zst")),
            Path::new("/x/debian-13.tar.zst.manifest.json")
        );
    }

    #[test]
    fn manifest_round_trips_and_rejects_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        write_manifest(&path, &sample()).unwrap();
        assert_eq!(read_manifest(&path).unwrap(), sample());

        let mut future = sample();
        future.format = FORMAT + 1;
        write_manifest(&path, &future).unwrap();
        let err = read_manifest(&path).unwrap_err();
        assert!(matches!(err, ImageError::UnsupportedFormat { found, .. } if found == FORMAT + 1));

        std::fs::write(&path, b"{not json").unwrap();
        let err = read_manifest(&path).unwrap_err().to_string();
        assert!(err.contains("m.json"), "{err}");
    }

    #[test]
    fn fresh_build_manifest_omits_sha256() {
        let mut m = sample();
        m.sha256 = None;
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("sha256"), "{json}");
    }

    #[test]
    fn created_is_rfc3339_utc() {
        let now = now_rfc3339();
        assert!(time::OffsetDateTime::parse(&now, &Rfc3339).is_ok(), "{now}");
        assert!(now.ends_with('Z'), "{now}");
    }

    #[test]
    fn image_info_is_not_read_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::write(
            root.join("real/image.json"),
            br#"{"name":"x","created":"2025-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("etc/hearth")).unwrap();
        assert_eq!(read_image_info(root), None);

        std::fs::remove_file(root.join("etc/hearth")).unwrap();
        std::fs::rename(root.join("real"), root.join("etc/hearth")).unwrap();
        assert_eq!(read_image_info(root).unwrap().name, "x");
    }

    #[test]
    fn tree_bytes_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/c"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("l")).unwrap();
        assert_eq!(tree_bytes(dir.path()).unwrap(), 1000 + 24 + 1);
    }
}
