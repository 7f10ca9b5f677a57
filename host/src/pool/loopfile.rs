//! The default pool: a sparse file formatted as btrfs and loop-mounted. `ensure_mounted`
//! is idempotent and crash-safe, so `hearthd` simply calls it on every start: after a
//! reboot it mounts the existing file, on a fresh node it creates one.

use super::PoolError;
use hearth_images::mounts::{mount_table, MountEntry};
use nix::errno::Errno;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// zstd level 1 costs little CPU and roughly halves a Debian rootfs; noatime spares
/// btrfs a metadata write (and copy-on-write of shared metadata) on every read.
const MOUNT_OPTIONS: &str = "loop,compress=zstd:1,noatime";

/// Mounts the pool file at `mountpoint`, creating and formatting the file first if it
/// does not exist. Does nothing if it is already mounted there.
pub fn ensure_mounted(file: &Path, size_bytes: u64, mountpoint: &Path) -> Result<(), PoolError> {
    if !file.exists() {
        create(file, size_bytes)?;
    }
    let file = canonical(file)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(mountpoint)
        .map_err(PoolError::io("create directory", mountpoint))?;
    let mountpoint = canonical(mountpoint)?;

    let table = mount_table().map_err(PoolError::io("read", "/proc/self/mountinfo"))?;
    if let Some(m) = table.iter().rev().find(|m| m.mount_point == mountpoint) {
        if m.fs_type == "btrfs" && backing_file(&m.source).as_deref() == Some(file.as_path()) {
            return Ok(());
        }
        return Err(PoolError::MountpointBusy {
            mountpoint,
            fs_type: m.fs_type.clone(),
            device: m.source.clone(),
        });
    }
    let elsewhere = mounts_of(&table, &file)
        .next()
        .map(|m| m.mount_point.clone());
    if let Some(at) = elsewhere {
        // Mounting one btrfs image twice through two loop devices risks the file system.
        return Err(PoolError::AlreadyMounted { file, at });
    }
    run(Command::new("mount")
        .args(["-t", "btrfs", "-o", MOUNT_OPTIONS])
        .arg(&file)
        .arg(&mountpoint))?;
    tracing::info!(
        "mounted pool {} at {}",
        file.display(),
        mountpoint.display()
    );
    Ok(())
}

/// Creates the sparse file under a temporary name and renames it into place once it is
/// formatted, so a crash never leaves an unformatted file that looks like a pool.
fn create(file: &Path, size_bytes: u64) -> Result<(), PoolError> {
    if let Some(dir) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(PoolError::io("create directory", dir))?;
    }
    let mut tmp = file.as_os_str().to_os_string();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(PoolError::io("create", &tmp))?;
        f.set_len(size_bytes)
            .map_err(PoolError::io("set the size of", &tmp))?;
        drop(f);
        run(Command::new("mkfs.btrfs")
            .args(["-q", "-f", "-L", "hearth"])
            .arg(&tmp))?;
        std::fs::rename(&tmp, file).map_err(PoolError::io("rename into place", file))
    })();
    match &result {
        Ok(()) => tracing::info!("created pool file {} ({size_bytes} bytes)", file.display()),
        Err(_) => {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    result
}

/// Unmounts the pool and detaches every loop device still backed by `file`. For tests and
/// for taking a node apart; `hearthd` leaves the pool mounted when it exits, because its
/// guests keep running.
pub fn teardown(file: &Path, mountpoint: &Path) -> Result<(), PoolError> {
    let file = canonical(file)?;
    if let Ok(mountpoint) = mountpoint.canonicalize() {
        let table = mount_table().map_err(PoolError::io("read", "/proc/self/mountinfo"))?;
        if table.iter().any(|m| m.mount_point == mountpoint) {
            umount(&mountpoint)?;
        }
    }
    for dev in loop_devices_of(&file) {
        // Usually already gone: `mount -o loop` sets autoclear, which detaches the device
        // on unmount.
        let _ = Command::new("losetup").arg("-d").arg(&dev).output();
    }
    Ok(())
}

fn umount(path: &Path) -> Result<(), PoolError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| PoolError::Io {
        op: "unmount",
        path: path.to_path_buf(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let call = |flags| {
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        Errno::result(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
    };
    call(0)
        .or_else(|e| match e {
            // Something still has a file open in the pool: detach now, free it later.
            Errno::EBUSY => call(libc::MNT_DETACH),
            other => Err(other),
        })
        .map_err(|e| PoolError::Io {
            op: "unmount",
            path: path.to_path_buf(),
            source: e.into(),
        })
}

fn mounts_of<'a>(table: &'a [MountEntry], file: &'a Path) -> impl Iterator<Item = &'a MountEntry> {
    table
        .iter()
        .filter(move |m| backing_file(&m.source).as_deref() == Some(file))
}

/// The file behind loop device `dev` (`/dev/loop3`), from sysfs.
fn backing_file(dev: &str) -> Option<PathBuf> {
    let name = dev.strip_prefix("/dev/")?;
    if !name.starts_with("loop") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

fn loop_devices_of(file: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .filter(|dev| backing_file(dev).as_deref() == Some(file))
        .collect()
}

fn canonical(path: &Path) -> Result<PathBuf, PoolError> {
    path.canonicalize().map_err(PoolError::io("resolve", path))
}

fn run(cmd: &mut Command) -> Result<(), PoolError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| PoolError::Spawn {
            program: program.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if output.is_empty() {
        output = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(PoolError::Command {
        program,
        status: out.status,
        output,
    })
}
