//! Small safe wrappers over the btrfs ioctls the pool needs. Written against
//! `linux/btrfs.h` directly: the ioctls are stable kernel ABI, and this avoids libbtrfsutil,
//! its bindgen/libclang build dependency and its current-directory path bug.

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::{lstat, Mode};
use nix::sys::statfs::{statfs, BTRFS_SUPER_MAGIC};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The root directory of every subvolume has this inode number
/// (BTRFS_FIRST_FREE_OBJECTID).
const SUBVOLUME_ROOT_INO: u64 = 256;
/// BTRFS_SUBVOL_RDONLY: the subvolume flag that makes a subvolume read-only.
const SUBVOL_RDONLY: u64 = 1 << 1;
/// The longest name a subvolume can have (BTRFS_VOL_NAME_MAX).
const VOL_NAME_MAX: usize = 255;

mod sys {
    //! The ioctl argument layouts and request numbers, per `linux/btrfs.h`.

    /// BTRFS_PATH_NAME_MAX + 1.
    const PATH_NAME_LEN: usize = 4088;
    /// BTRFS_SUBVOL_NAME_MAX + 1.
    const SUBVOL_NAME_LEN: usize = 4040;

    /// `struct btrfs_ioctl_vol_args`.
    #[repr(C)]
    pub struct VolArgs {
        pub fd: i64,
        pub name: [u8; PATH_NAME_LEN],
    }

    /// `struct btrfs_ioctl_vol_args_v2`; the unions are represented by the member used
    /// here (`unused[4]` and `name`).
    #[repr(C)]
    pub struct VolArgsV2 {
        pub fd: i64,
        pub transid: u64,
        pub flags: u64,
        pub unused: [u64; 4],
        pub name: [u8; SUBVOL_NAME_LEN],
    }

    // The kernel encodes the argument size in the request number: a layout mistake would
    // make every call fail with ENOTTY, so pin the sizes here.
    const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
    const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);

    impl VolArgs {
        pub fn zeroed() -> Box<Self> {
            Box::new(VolArgs {
                fd: 0,
                name: [0; PATH_NAME_LEN],
            })
        }
    }

    impl VolArgsV2 {
        pub fn zeroed() -> Box<Self> {
            Box::new(VolArgsV2 {
                fd: 0,
                transid: 0,
                flags: 0,
                unused: [0; 4],
                name: [0; SUBVOL_NAME_LEN],
            })
        }
    }

    /// `struct btrfs_ioctl_ino_lookup_args`.
    #[repr(C)]
    pub struct InoLookupArgs {
        pub treeid: u64,
        pub objectid: u64,
        pub name: [u8; 4080],
    }

    /// `struct btrfs_ioctl_fs_info_args`; only the fields before `fsid` and `fsid` are
    /// read, the rest is kept as the kernel's padding.
    #[repr(C)]
    pub struct FsInfoArgs {
        pub max_id: u64,
        pub num_devices: u64,
        pub fsid: [u8; 16],
        pub rest: [u8; 992],
    }

    /// `struct btrfs_ioctl_quota_ctl_args`.
    #[repr(C)]
    pub struct QuotaCtlArgs {
        pub cmd: u64,
        pub status: u64,
    }

    /// `struct btrfs_ioctl_qgroup_limit_args` with its `struct btrfs_qgroup_limit`
    /// inlined.
    #[repr(C)]
    pub struct QgroupLimitArgs {
        pub qgroupid: u64,
        pub flags: u64,
        pub max_rfer: u64,
        pub max_excl: u64,
        pub rsv_rfer: u64,
        pub rsv_excl: u64,
    }

    const _: () = assert!(std::mem::size_of::<InoLookupArgs>() == 4096);
    const _: () = assert!(std::mem::size_of::<FsInfoArgs>() == 1024);
    const _: () = assert!(std::mem::size_of::<QuotaCtlArgs>() == 16);
    const _: () = assert!(std::mem::size_of::<QgroupLimitArgs>() == 48);

    /// BTRFS_QUOTA_CTL_ENABLE: full qgroup accounting (with a rescan of what exists).
    pub const QUOTA_CTL_ENABLE: u64 = 1;
    /// BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA (Linux 6.7+).
    pub const QUOTA_CTL_ENABLE_SIMPLE: u64 = 4;
    /// BTRFS_QGROUP_LIMIT_MAX_RFER.
    pub const LIMIT_MAX_RFER: u64 = 1 << 0;
    /// The value that lifts a limit (the kernel's CLEAR_VALUE).
    pub const LIMIT_CLEAR: u64 = u64::MAX;

    const MAGIC: u8 = 0x94;
    nix::ioctl_readwrite!(ino_lookup, MAGIC, 18, InoLookupArgs);
    nix::ioctl_read!(fs_info, MAGIC, 31, FsInfoArgs);
    nix::ioctl_readwrite!(quota_ctl, MAGIC, 40, QuotaCtlArgs);
    // The kernel declares it _IOR although it only reads the argument.
    nix::ioctl_read!(qgroup_limit, MAGIC, 43, QgroupLimitArgs);
    nix::ioctl_write_ptr!(subvol_create, MAGIC, 14, VolArgs);
    nix::ioctl_write_ptr!(snap_destroy, MAGIC, 15, VolArgs);
    nix::ioctl_write_ptr!(snap_create_v2, MAGIC, 23, VolArgsV2);
    nix::ioctl_read!(subvol_getflags, MAGIC, 25, u64);
    nix::ioctl_write_ptr!(subvol_setflags, MAGIC, 26, u64);
}

#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    #[error("btrfs {op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("btrfs snapshot {src} -> {dst}: {source}")]
    Snapshot {
        src: PathBuf,
        dst: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{path}: not on a btrfs file system")]
    NotBtrfs { path: PathBuf },
    #[error("{path}: not a subvolume")]
    NotSubvolume { path: PathBuf },
    #[error("{path}: unusable subvolume name (empty, `.`, `..`, or over {VOL_NAME_MAX} bytes)")]
    BadName { path: PathBuf },
}

impl BtrfsError {
    pub fn errno(&self) -> Option<Errno> {
        match self {
            BtrfsError::Sys { source, .. } | BtrfsError::Snapshot { source, .. } => Some(*source),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, BtrfsError>;

fn sys_err(op: &'static str, path: &Path) -> impl FnOnce(Errno) -> BtrfsError {
    let path = path.to_path_buf();
    move |source| BtrfsError::Sys { op, path, source }
}

/// Opens a directory for ioctls without following a final symlink, so a path that was
/// swapped for a link cannot redirect an operation elsewhere.
fn open_dir(path: &Path, op: &'static str) -> Result<OwnedFd> {
    open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(sys_err(op, path))
}

/// The directory an ioctl is issued on, and the name it acts on inside it.
fn parent_and_name(path: &Path) -> Result<(&Path, &OsStr)> {
    let name = path.file_name().filter(|n| {
        let b = n.as_bytes();
        !b.is_empty() && b.len() <= VOL_NAME_MAX && !b.contains(&0)
    });
    let Some(name) = name else {
        return Err(BtrfsError::BadName {
            path: path.to_path_buf(),
        });
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((parent, name))
}

/// Copies `name` into a zeroed, fixed-size name field; [`parent_and_name`] guarantees it
/// fits with room for the terminating NUL.
fn fill_name(field: &mut [u8], name: &OsStr) {
    let bytes = name.as_bytes();
    field[..bytes.len()].copy_from_slice(bytes);
}

pub fn create_subvolume(path: &Path) -> Result<()> {
    let (parent, name) = parent_and_name(path)?;
    let dir = open_dir(parent, "create subvolume in")?;
    let mut args = sys::VolArgs::zeroed();
    fill_name(&mut args.name, name);
    // SAFETY: `dir` is an open directory and `args` a live, correctly sized
    // btrfs_ioctl_vol_args with a NUL-terminated name.
    unsafe { sys::subvol_create(dir.as_raw_fd(), &*args) }
        .map(drop)
        .map_err(sys_err("create subvolume", path))
}

/// Snapshots subvolume `src` to the new path `dst` (which must not exist). A snapshot of
/// a read-only subvolume is writable unless `readonly` is set.
pub fn snapshot(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    let (parent, name) = parent_and_name(dst)?;
    let src_fd = open_dir(src, "open snapshot source")?;
    let dir = open_dir(parent, "open snapshot destination")?;
    let mut args = sys::VolArgsV2::zeroed();
    args.fd = i64::from(src_fd.as_raw_fd());
    args.flags = if readonly { SUBVOL_RDONLY } else { 0 };
    fill_name(&mut args.name, name);
    // SAFETY: both fds are open directories; `args` is a live, correctly sized
    // btrfs_ioctl_vol_args_v2 with a NUL-terminated name and no qgroup inherit pointer.
    unsafe { sys::snap_create_v2(dir.as_raw_fd(), &*args) }
        .map(drop)
        .map_err(|source| BtrfsError::Snapshot {
            src: src.to_path_buf(),
            dst: dst.to_path_buf(),
            source,
        })
}

/// Deletes subvolume `path`, read-only or not. Subvolumes nested inside it (which btrfs
/// refuses to orphan: ENOTEMPTY) are found and deleted first.
pub fn delete_subvolume(path: &Path) -> Result<()> {
    match destroy(path) {
        Err(e) if e.errno() == Some(Errno::ENOTEMPTY) => {
            // Unlinking a nested subvolume modifies this one.
            if is_readonly(path)? {
                set_readonly(path, false)?;
            }
            for child in nested_subvolumes(path)? {
                delete_subvolume(&child)?;
            }
            destroy(path)
        }
        other => other,
    }
}

fn destroy(path: &Path) -> Result<()> {
    let (parent, name) = parent_and_name(path)?;
    let dir = open_dir(parent, "delete subvolume in")?;
    let mut args = sys::VolArgs::zeroed();
    fill_name(&mut args.name, name);
    // SAFETY: `dir` is an open directory and `args` a live, correctly sized
    // btrfs_ioctl_vol_args with a NUL-terminated name.
    unsafe { sys::snap_destroy(dir.as_raw_fd(), &*args) }
        .map(drop)
        .map_err(sys_err("delete subvolume", path))
}

/// The outermost subvolumes inside subvolume `root`: directories on btrfs with the
/// subvolume root inode and a device number of their own. Only walked after btrfs said
/// there are some, so the cost of a walk is paid only then.
fn nested_subvolumes(root: &Path) -> Result<Vec<PathBuf>> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| BtrfsError::Sys {
            op: "look for nested subvolumes in",
            path,
            source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    };
    let root_dev = std::fs::symlink_metadata(root).map_err(io_err(root))?.dev();
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if !entry.file_type().map_err(io_err(&dir))?.is_dir() {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
            if meta.dev() == root_dev {
                stack.push(path);
            } else if meta.ino() == SUBVOLUME_ROOT_INO && is_btrfs(&path)? {
                found.push(path);
            }
        }
    }
    Ok(found)
}

pub fn is_readonly(path: &Path) -> Result<bool> {
    Ok(get_flags(path)? & SUBVOL_RDONLY != 0)
}

pub fn set_readonly(path: &Path, readonly: bool) -> Result<()> {
    let flags = get_flags(path)?;
    let wanted = if readonly {
        flags | SUBVOL_RDONLY
    } else {
        flags & !SUBVOL_RDONLY
    };
    if wanted == flags {
        return Ok(());
    }
    let dir = open_dir(path, "set flags of")?;
    // SAFETY: `dir` is an open directory and `wanted` a live u64.
    unsafe { sys::subvol_setflags(dir.as_raw_fd(), &wanted) }
        .map(drop)
        .map_err(sys_err("set flags of", path))
}

fn get_flags(path: &Path) -> Result<u64> {
    let dir = open_dir(path, "get flags of")?;
    let mut flags = 0u64;
    // SAFETY: `dir` is an open directory and `flags` a live u64 the kernel writes.
    unsafe { sys::subvol_getflags(dir.as_raw_fd(), &mut flags) }
        .map_err(sys_err("get flags of", path))?;
    Ok(flags)
}

/// The id of the subvolume `path` is the root of (its tree id, which is also the id of
/// its level-0 qgroup).
pub fn subvolume_id(path: &Path) -> Result<u64> {
    let dir = open_dir(path, "look up the subvolume id of")?;
    let mut args = Box::new(sys::InoLookupArgs {
        treeid: 0,
        objectid: SUBVOLUME_ROOT_INO,
        name: [0; 4080],
    });
    // SAFETY: `dir` is an open directory and `args` a live, correctly sized
    // btrfs_ioctl_ino_lookup_args; treeid 0 asks for the subvolume of `dir`.
    unsafe { sys::ino_lookup(dir.as_raw_fd(), &mut *args) }
        .map_err(sys_err("look up the subvolume id of", path))?;
    Ok(args.treeid)
}

/// The UUID of the btrfs file system holding `path`, as sysfs names it
/// (`/sys/fs/btrfs/<uuid>`).
pub fn fs_uuid(path: &Path) -> Result<String> {
    let dir = open_dir(path, "get file system info of")?;
    let mut args = Box::new(sys::FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        rest: [0; 992],
    });
    // SAFETY: `dir` is an open directory and `args` a live, zeroed (no flags asked for)
    // btrfs_ioctl_fs_info_args of the size the kernel writes.
    unsafe { sys::fs_info(dir.as_raw_fd(), &mut *args) }
        .map_err(sys_err("get file system info of", path))?;
    let h: String = args.fsid.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// Which quota accounting to switch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// Simple quotas: an extent is charged to the subvolume that wrote it, at no cost
    /// beyond a counter update (Linux 6.7+).
    Simple,
    /// Full qgroups: exact referenced/exclusive figures, paid for by back-reference
    /// walks on every commit.
    Full,
}

/// Switches quotas on for the file system holding `path`. Does nothing if they are on
/// already, in whatever mode. Fails with EINVAL for simple quotas on kernels without
/// them.
pub fn enable_quota(path: &Path, kind: QuotaKind) -> Result<()> {
    let dir = open_dir(path, "enable quotas on")?;
    let mut args = sys::QuotaCtlArgs {
        cmd: match kind {
            QuotaKind::Simple => sys::QUOTA_CTL_ENABLE_SIMPLE,
            QuotaKind::Full => sys::QUOTA_CTL_ENABLE,
        },
        status: 0,
    };
    // SAFETY: `dir` is an open directory and `args` a live btrfs_ioctl_quota_ctl_args.
    unsafe { sys::quota_ctl(dir.as_raw_fd(), &mut args) }
        .map(drop)
        .map_err(sys_err("enable quotas on", path))
}

/// Caps the referenced bytes of subvolume `path`'s own qgroup; `None` lifts the cap.
pub fn set_qgroup_limit(path: &Path, max_referenced: Option<u64>) -> Result<()> {
    let dir = open_dir(path, "limit the qgroup of")?;
    let mut args = sys::QgroupLimitArgs {
        // 0: the qgroup of the subvolume `dir` is in.
        qgroupid: 0,
        flags: sys::LIMIT_MAX_RFER,
        max_rfer: max_referenced.unwrap_or(sys::LIMIT_CLEAR),
        max_excl: 0,
        rsv_rfer: 0,
        rsv_excl: 0,
    };
    // SAFETY: `dir` is an open directory and `args` a live btrfs_ioctl_qgroup_limit_args.
    unsafe { sys::qgroup_limit(dir.as_raw_fd(), &mut args) }
        .map(drop)
        .map_err(sys_err("limit the qgroup of", path))
}

pub fn is_btrfs(path: &Path) -> Result<bool> {
    let fs = statfs(path).map_err(sys_err("statfs", path))?;
    Ok(fs.filesystem_type() == BTRFS_SUPER_MAGIC)
}

/// True for the root directory of a subvolume (including the top-level one); false for
/// anything else, including a missing path.
pub fn is_subvolume(path: &Path) -> Result<bool> {
    let st = match lstat(path) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(sys_err("stat", path)(e)),
    };
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    Ok(is_dir && st.st_ino == SUBVOLUME_ROOT_INO && is_btrfs(path)?)
}

/// Fails with [`BtrfsError::NotSubvolume`] unless `path` is a subvolume.
pub fn require_subvolume(path: &Path) -> Result<()> {
    if is_subvolume(path)? {
        Ok(())
    } else {
        Err(BtrfsError::NotSubvolume {
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_ioctl() {
        for bad in ["/", "a/..", ""] {
            assert!(matches!(
                parent_and_name(Path::new(bad)),
                Err(BtrfsError::BadName { .. })
            ));
        }
        let long = format!("/pool/{}", "x".repeat(256));
        assert!(parent_and_name(Path::new(&long)).is_err());
        let (parent, name) = parent_and_name(Path::new("/pool/images/debian-13")).unwrap();
        assert_eq!(
            (parent, name),
            (Path::new("/pool/images"), OsStr::new("debian-13"))
        );
        assert_eq!(parent_and_name(Path::new("x")).unwrap().0, Path::new("."));
    }

    #[test]
    fn non_btrfs_paths_are_not_subvolumes() {
        assert!(!is_subvolume(Path::new("/proc")).unwrap());
        assert!(!is_subvolume(Path::new("/nonexistent/hearth")).unwrap());
    }
}
