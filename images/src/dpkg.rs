//! Which Debian packages a rootfs holds, read straight from its dpkg database. Reading the
//! file (rather than running `dpkg-query` in a chroot) works for any rootfs, executes none
//! of its binaries, and needs no root.

use crate::ImageError;
use std::path::Path;

const STATUS_PATH: &str = "var/lib/dpkg/status";

/// `"name version"` for every installed package, sorted; empty when the rootfs has no dpkg
/// database (not a Debian tree).
pub fn installed_packages(rootfs: &Path) -> Result<Vec<String>, ImageError> {
    let path = rootfs.join(STATUS_PATH);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io("stat", &path)(e)),
    };
    // A symlinked status file in an untrusted tree could point anywhere on the host.
    if !meta.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(ImageError::io("read", &path))?;
    Ok(parse_status(&text))
}

fn parse_status(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package:") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version:") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status:") {
                // "want flag status": only the last word says whether it is on disk.
                installed = v.split_whitespace().nth(2) == Some("installed");
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.push(format!("{n} {v}"));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_installed_packages_are_listed() {
        let status = "Package: zlib1g\nStatus: install ok installed\nVersion: 1:1.3\n\
                      Description: x\n continued line\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: bash\nStatus: install ok installed\nVersion: 5.2\n";
        assert_eq!(parse_status(status), vec!["bash 5.2", "zlib1g 1:1.3"]);
    }

    #[test]
    fn a_tree_without_dpkg_has_no_packages() {
        let dir = tempfile::tempdir().unwrap();
        assert!(installed_packages(dir.path()).unwrap().is_empty());
    }
}
