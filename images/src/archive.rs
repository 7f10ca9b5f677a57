//! Templates as files: a zstd-compressed GNU tar of the rootfs plus a JSON manifest beside
//! it, for nodes that cannot run debootstrap or should not wait for it. Import checks
//! the archive against the manifest before a single byte is unpacked.

use crate::manifest::{
    manifest_path_for, now_rfc3339, read_image_info, read_manifest, sibling_tmp, tree_bytes,
    write_manifest, FORMAT,
};
use crate::{debian::require_empty_dir, dpkg, process, ImageError, Manifest};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

const CHUNK: usize = 1 << 20;

/// Options both directions share: owners as numbers (the guest's uids mean nothing on
/// the host), and every xattr (file capabilities such as ping's `cap_net_raw` live in
/// `security.*`, which tar leaves out on extraction unless told) and ACL.
const TAR_METADATA: &[&str] = &[
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
];

/// Writes `rootfs` as a `.tar.zst` archive at `out` and its manifest at
/// `<out>.manifest.json`. The archive is written under a temporary name and renamed, so
/// `out` is either complete or absent.
pub fn export(rootfs: &Path, name: &str, out: &Path) -> Result<Manifest, ImageError> {
    // Fail on a missing or unreadable rootfs here, with its own path in the message,
    // rather than through tar's stderr.
    std::fs::read_dir(rootfs).map_err(ImageError::io("open directory", rootfs))?;
    let tmp = sibling_tmp(out);
    let written = write_archive(rootfs, &tmp);
    let (sha256, size_bytes) = match written {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ImageError::io("rename into place", out)(e)
    })?;

    let created = read_image_info(rootfs)
        .map(|i| i.created)
        .unwrap_or_else(now_rfc3339);
    let manifest = Manifest {
        name: name.to_string(),
        created,
        sha256: Some(sha256),
        size_bytes,
        rootfs_bytes: tree_bytes(rootfs)?,
        packages: dpkg::installed_packages(rootfs)?,
        format: FORMAT,
    };
    write_manifest(&manifest_path_for(out), &manifest)?;
    Ok(manifest)
}

/// Streams tar's compressed output into `dest`, hashing it on the way: the archive is
/// read once, never twice.
fn write_archive(rootfs: &Path, dest: &Path) -> Result<(String, u64), ImageError> {
    let mut file = File::create(dest).map_err(ImageError::io("create", dest))?;
    let mut cmd = Command::new("tar");
    cmd.arg("--create")
        .arg("--file=-")
        .arg("--directory")
        .arg(rootfs)
        .args(TAR_METADATA)
        .arg("--sparse")
        .arg("--use-compress-program=zstd -T0 -3 -q")
        .arg(".")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = process::spawn(&mut cmd)?;
    let stderr = child
        .stderr
        .take()
        .map(|s| process::collect_lines("tar", s));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let copied = (|| -> Result<(), ImageError> {
        let Some(mut out) = child.stdout.take() else {
            return Ok(());
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ImageError::io("read tar output for", dest)(e)),
            };
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(ImageError::io("write", dest))?;
            size += n as u64;
        }
    })();
    if copied.is_err() {
        // Stop tar rather than leave it blocked on a pipe nobody reads.
        let _ = child.kill();
    }
    let status = child.wait().map_err(|source| ImageError::Spawn {
        program: "tar".into(),
        source,
    })?;
    let lines = process::join(stderr);
    copied?;
    process::check("tar", status, &lines)?;
    file.sync_all().map_err(ImageError::io("sync", dest))?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// Imports `archive` into `target` (an existing empty directory), reading the manifest
/// from `<archive>.manifest.json`. See [`import_with_manifest`].
pub fn import(archive: &Path, target: &Path) -> Result<Manifest, ImageError> {
    import_with_manifest(archive, &manifest_path_for(archive), target)
}

/// Verifies `archive` against the size and sha256 in `manifest` and only then unpacks it
/// into `target`. A wrong size or checksum fails with nothing extracted. If unpacking
/// itself fails, `target` may hold part of the tree: the caller deletes it.
pub fn import_with_manifest(
    archive: &Path,
    manifest: &Path,
    target: &Path,
) -> Result<Manifest, ImageError> {
    let m = read_manifest(manifest)?;
    let expected = m
        .sha256
        .clone()
        .ok_or_else(|| ImageError::MissingChecksum {
            path: manifest.to_path_buf(),
        })?;
    require_empty_dir(target)?;

    let mut file = File::open(archive).map_err(ImageError::io("open", archive))?;
    let actual_size = file
        .metadata()
        .map_err(ImageError::io("stat", archive))?
        .len();
    if actual_size != m.size_bytes {
        return Err(ImageError::SizeMismatch {
            archive: archive.to_path_buf(),
            expected: m.size_bytes,
            actual: actual_size,
        });
    }
    let actual = sha256_of(&mut file, archive)?;
    if !actual.eq_ignore_ascii_case(&expected) {
        return Err(ImageError::ChecksumMismatch {
            archive: archive.to_path_buf(),
            expected,
            actual,
        });
    }
    // tar reads the very file descriptor that was hashed, so swapping the file at
    // `archive` between the check and the unpacking changes nothing.
    file.seek(SeekFrom::Start(0))
        .map_err(ImageError::io("seek", archive))?;
    unpack(file, archive, target)?;
    Ok(m)
}

fn sha256_of(file: &mut File, path: &Path) -> Result<String, ImageError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImageError::io("read", path)(e)),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

fn unpack(file: File, archive: &Path, target: &Path) -> Result<(), ImageError> {
    let mut cmd = Command::new("tar");
    cmd.arg("--extract")
        .arg("--file=-")
        .arg("--directory")
        .arg(target)
        .args(TAR_METADATA)
        .arg("--same-permissions")
        .arg("--same-owner")
        .arg("--zstd")
        .env("LC_ALL", "C")
        .stdin(Stdio::from(file))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = process::spawn(&mut cmd)?;
    let stderr = child
        .stderr
        .take()
        .map(|s| process::collect_lines("tar", s));
    let status = child.wait().map_err(|source| ImageError::Spawn {
        program: "tar".into(),
        source,
    })?;
    let lines = process::join(stderr);
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::Extract {
            archive: archive.to_path_buf(),
            output: process::tail(&lines),
        })
    }
}
