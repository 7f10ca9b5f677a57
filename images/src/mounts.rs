//! The host's mount table, and sweeping mounts out from under a directory. A build that
//! fails half-way can leave debootstrap's `/proc`, `/sys` and `/dev/pts` mounted inside
//! the target, and a subvolume with mounts inside it cannot be deleted.

use crate::ImageError;
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// The mount source as the kernel reports it (`/dev/loop3`, `proc`, ...).
    pub source: String,
}

/// This process's mounts in mount order (`/proc/self/mountinfo`).
pub fn mount_table() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read("/proc/self/mountinfo")?))
}

fn parse_mountinfo(bytes: &[u8]) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        // id parent dev root mount_point options [optional...] - fs_type source super_options
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if fields.len() < dash + 3 || dash < 5 {
            continue;
        }
        out.push(MountEntry {
            mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
            fs_type: String::from_utf8_lossy(&unescape(fields[dash + 1])).into_owned(),
            source: String::from_utf8_lossy(&unescape(fields[dash + 2])).into_owned(),
        });
    }
    out
}

/// The kernel writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let digits = &field[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Unmounts everything mounted strictly below `dir`, newest first, falling back to a lazy
/// unmount for a busy mount. `dir` itself stays mounted if it is a mount point. A missing
/// `dir` has nothing below it.
pub fn unmount_below(dir: &Path) -> Result<(), ImageError> {
    let dir = match dir.canonicalize() {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io("resolve", dir)(e)),
    };
    let table = mount_table().map_err(ImageError::io("read", "/proc/self/mountinfo"))?;
    for entry in table.iter().rev() {
        let p = &entry.mount_point;
        if p == &dir || !p.starts_with(&dir) {
            continue;
        }
        tracing::info!("unmounting leftover {} ({})", p.display(), entry.fs_type);
        match umount2(p, MntFlags::empty()) {
            // EINVAL: no longer a mount point (a lazy unmount of its parent took it along).
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(_) => match umount2(p, MntFlags::MNT_DETACH) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(source) => {
                    return Err(ImageError::Unmount {
                        path: p.clone(),
                        source,
                    })
                }
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let text = b"22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n\
                     90 30 7:3 / /var/lib/my\\040pool rw,noatime shared:50 master:1 - btrfs /dev/loop3 rw,compress=zstd:1\n\
                     91 30 0:5 / /x rw - tmpfs tmp\\134fs rw\n";
        let table = parse_mountinfo(text);
        assert_eq!(table.len(), 3);
        assert_eq!(table[0].mount_point, Path::new("/proc"));
        assert_eq!(table[1].mount_point, Path::new("/var/lib/my pool"));
        assert_eq!(table[1].fs_type, "btrfs");
        assert_eq!(table[1].source, "/dev/loop3");
        assert_eq!(table[2].source, "tmp\\fs");
    }

    #[test]
    fn the_live_table_has_a_root() {
        let table = mount_table().unwrap();
        assert!(table.iter().any(|m| m.mount_point == Path::new("/")));
    }

    #[test]
    fn nothing_below_a_missing_dir() {
        unmount_below(Path::new("/nonexistent/hearth/test")).unwrap();
    }
}
