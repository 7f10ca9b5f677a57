//! [`Storage`] on btrfs: images are read-only subvolumes, a container's rootfs is a
//! writable snapshot of one, so creating a container copies nothing.

use super::btrfs::{self, QuotaKind};
use super::config::{PoolConfig, PoolKind, QuotaMode};
use super::loopfile;
use super::names::{is_valid, validate};
use super::{DiskUsage, ImageEntry, PoolError, Storage, StorageInfo};
use hearth_images::mounts::unmount_below;
use nix::errno::Errno;
use nix::fcntl::{renameat2, Flock, FlockArg, RenameFlags, AT_FDCWD};
use std::collections::HashMap;
use std::fs::{DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// Images being built or imported live under this prefix in `images/` until committed.
const PENDING_PREFIX: &str = ".tmp-";

#[derive(Debug)]
pub struct BtrfsPool {
    root: PathBuf,
    images: PathBuf,
    containers: PathBuf,
    /// A lock on each pending image this process is filling, so another process that
    /// opens the pool meanwhile does not take it for the leftover of a crash.
    pending: Mutex<HashMap<PathBuf, Flock<File>>>,
    /// `Some` when quotas are on, so per-container limits hold: the file system's
    /// `/sys/fs/btrfs/<uuid>/qgroups`, where every qgroup's usage and limit can be read
    /// as the kernel enforces them, without a command or a tree search.
    quotas: Option<PathBuf>,
}

impl BtrfsPool {
    /// Mounts (or creates) the pool as configured, lays out its directories, and removes
    /// what an interrupted image build left behind.
    pub fn open(cfg: &PoolConfig) -> Result<BtrfsPool, PoolError> {
        cfg.validate().map_err(PoolError::Config)?;
        let owned = matches!(cfg.kind, PoolKind::LoopFile { .. });
        let root = match &cfg.kind {
            PoolKind::LoopFile {
                file,
                size_bytes,
                mountpoint,
            } => {
                loopfile::ensure_mounted(file, *size_bytes, mountpoint)?;
                mountpoint.clone()
            }
            PoolKind::Existing { path } => {
                make_dir(path, 0o711)?;
                path.clone()
            }
        };
        if !btrfs::is_btrfs(&root)? {
            return Err(PoolError::NotBtrfs { path: root });
        }
        // Guests traverse `containers/` to reach their rootfs from inside their user
        // namespace; nobody but root needs into the others.
        let images = root.join("images");
        let containers = root.join("containers");
        make_dir(&images, 0o700)?;
        make_dir(&containers, 0o711)?;
        make_dir(&root.join("snapshots"), 0o700)?;
        let quotas = setup_quotas(&root, cfg.quotas, owned)?;
        let pool = BtrfsPool {
            root,
            images,
            containers,
            pending: Mutex::new(HashMap::new()),
            quotas,
        };
        pool.remove_leftovers()?;
        Ok(pool)
    }

    fn remove_leftovers(&self) -> Result<(), PoolError> {
        let entries = std::fs::read_dir(&self.images)
            .map_err(PoolError::io("read directory", &self.images))?;
        for entry in entries {
            let entry = entry.map_err(PoolError::io("read directory", &self.images))?;
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(PENDING_PREFIX)
            {
                continue;
            }
            let path = entry.path();
            let Some(_lock) = try_lock(&path)? else {
                tracing::debug!("{} is being built by another process", path.display());
                continue;
            };
            tracing::warn!(
                "removing {}, left over from an interrupted build",
                path.display()
            );
            unmount_below(&path)?;
            remove_tree(&path)?;
        }
        Ok(())
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<PathBuf, Flock<File>>> {
        // The map stays consistent even if a holder panicked: every operation on it is a
        // single insert or remove.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `tmp` must be a pending image of this pool: anything else passed to commit or
    /// abort is a caller bug that must not turn into renaming or deleting a random path.
    fn check_pending(&self, tmp: &Path) -> Result<(), PoolError> {
        let ok = tmp.parent() == Some(self.images.as_path())
            && tmp
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(PENDING_PREFIX));
        if ok {
            Ok(())
        } else {
            Err(PoolError::NotPending {
                path: tmp.to_path_buf(),
            })
        }
    }
}

impl Storage for BtrfsPool {
    fn info(&self) -> StorageInfo {
        StorageInfo {
            driver: "btrfs",
            instant_snapshots: true,
            quotas: self.quotas.is_some(),
        }
    }

    fn root(&self) -> &Path {
        &self.root
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.images.join(name)
    }

    fn list_images(&self) -> Result<Vec<ImageEntry>, PoolError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.images)
            .map_err(PoolError::io("read directory", &self.images))?;
        for entry in entries {
            let entry = entry.map_err(PoolError::io("read directory", &self.images))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !is_valid(&name) || !btrfs::is_subvolume(&path)? {
                continue;
            }
            out.push(ImageEntry {
                read_only: btrfs::is_readonly(&path)?,
                created: hearth_images::read_image_info(&path).map(|i| i.created),
                name,
                path,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn begin_image(&self, name: &str) -> Result<PathBuf, PoolError> {
        validate("image name", name)?;
        let tmp = self.images.join(format!(
            "{PENDING_PREFIX}{name}-{:08x}",
            rand::random::<u32>()
        ));
        btrfs::create_subvolume(&tmp)?;
        match try_lock(&tmp) {
            Ok(Some(lock)) => {
                self.pending().insert(tmp.clone(), lock);
                Ok(tmp)
            }
            other => {
                let _ = btrfs::delete_subvolume(&tmp);
                match other {
                    Err(e) => Err(e),
                    // Nobody else knows the random name yet, so nobody else can hold it.
                    _ => Err(PoolError::Io {
                        op: "lock",
                        path: tmp,
                        source: std::io::ErrorKind::WouldBlock.into(),
                    }),
                }
            }
        }
    }

    fn commit_image(&self, tmp: &Path, name: &str) -> Result<(), PoolError> {
        validate("image name", name)?;
        self.check_pending(tmp)?;
        btrfs::require_subvolume(tmp)?;
        // The store will say this image exists from now on: make that true after a power
        // cut too.
        sync_fs(&self.images)?;
        btrfs::set_readonly(tmp, true)?;
        let dst = self.images.join(name);
        let replacing = std::fs::symlink_metadata(&dst).is_ok();
        let flags = if replacing {
            RenameFlags::RENAME_EXCHANGE
        } else {
            RenameFlags::RENAME_NOREPLACE
        };
        // One atomic step either way: readers see the old image or the new one, never no
        // image. After an exchange the old image sits at `tmp`.
        renameat2(AT_FDCWD, tmp, AT_FDCWD, &dst, flags).map_err(|e| match e {
            Errno::EEXIST => PoolError::AlreadyExists {
                what: "image",
                name: name.to_string(),
            },
            other => PoolError::Io {
                op: "rename into place",
                path: dst.clone(),
                source: other.into(),
            },
        })?;
        self.pending().remove(tmp);
        if replacing {
            // The new image is in place; an old one that cannot be deleted now is a
            // leftover the next open removes.
            if let Err(e) = btrfs::delete_subvolume(tmp) {
                tracing::warn!("replaced image {name}, but the old copy stays for now: {e}");
            }
        }
        Ok(())
    }

    fn abort_image(&self, tmp: &Path) -> Result<(), PoolError> {
        self.check_pending(tmp)?;
        let result = unmount_below(tmp)
            .map_err(PoolError::from)
            .and_then(|()| remove_tree(tmp));
        self.pending().remove(tmp);
        result
    }

    fn delete_image(&self, name: &str) -> Result<(), PoolError> {
        validate("image name", name)?;
        let path = self.images.join(name);
        if !btrfs::is_subvolume(&path)? {
            return Err(PoolError::NotFound {
                what: "image",
                name: name.to_string(),
            });
        }
        btrfs::delete_subvolume(&path)?;
        Ok(())
    }

    fn create_rootfs(&self, image: &str, id: &str) -> Result<PathBuf, PoolError> {
        validate("image name", image)?;
        let src = self.images.join(image);
        if !btrfs::is_subvolume(&src)? {
            return Err(PoolError::NotFound {
                what: "image",
                name: image.to_string(),
            });
        }
        self.create_rootfs_from(&src, id)
    }

    fn rootfs(&self, id: &str) -> PathBuf {
        self.containers.join(id).join("rootfs")
    }

    fn delete_container(&self, id: &str) -> Result<(), PoolError> {
        validate("container id", id)?;
        // Its snapshots go with it (a branch made from one is its own subvolume).
        remove_tree(&self.root.join("snapshots").join(id))?;
        let dir = self.containers.join(id);
        match std::fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PoolError::io("stat", &dir)(e)),
            Ok(_) => remove_tree(&dir),
        }
    }

    fn container_ids(&self) -> Result<Vec<String>, PoolError> {
        let entries = std::fs::read_dir(&self.containers)
            .map_err(PoolError::io("read directory", &self.containers))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(PoolError::io("read directory", &self.containers))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_valid(&name) && entry.path().is_dir() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn raw_snapshot(&self, src: &Path, dst: &Path, readonly: bool) -> Result<(), PoolError> {
        Ok(btrfs::snapshot(src, dst, readonly)?)
    }

    fn snapshot_path(&self, id: &str, name: &str) -> PathBuf {
        self.root.join("snapshots").join(id).join(name)
    }

    fn snapshot_container(&self, id: &str, name: &str) -> Result<PathBuf, PoolError> {
        validate("container id", id)?;
        validate("snapshot name", name)?;
        let src = self.rootfs(id);
        if !btrfs::is_subvolume(&src)? {
            return Err(PoolError::NotFound {
                what: "container",
                name: id.to_string(),
            });
        }
        let dir = self.root.join("snapshots").join(id);
        make_dir(&dir, 0o700)?;
        let dst = dir.join(name);
        if std::fs::symlink_metadata(&dst).is_ok() {
            return Err(PoolError::AlreadyExists {
                what: "snapshot",
                name: name.to_string(),
            });
        }
        btrfs::snapshot(&src, &dst, true)?;
        Ok(dst)
    }

    fn list_snapshots(&self, id: &str) -> Result<Vec<String>, PoolError> {
        validate("container id", id)?;
        let dir = self.root.join("snapshots").join(id);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PoolError::io("read directory", &dir)(e)),
        };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_valid(n))
            .collect();
        names.sort();
        Ok(names)
    }

    fn delete_snapshot(&self, id: &str, name: &str) -> Result<(), PoolError> {
        validate("container id", id)?;
        validate("snapshot name", name)?;
        remove_tree(&self.snapshot_path(id, name))
    }

    fn stage_restore(&self, id: &str, name: &str) -> Result<(), PoolError> {
        validate("container id", id)?;
        validate("snapshot name", name)?;
        let snap = self.snapshot_path(id, name);
        if !btrfs::is_subvolume(&snap)? {
            return Err(PoolError::NotFound {
                what: "snapshot",
                name: name.to_string(),
            });
        }
        let incoming = self.rootfs(id).with_file_name("rootfs.incoming");
        remove_tree(&incoming)?;
        btrfs::snapshot(&snap, &incoming, false)?;
        Ok(())
    }

    fn swap_restored(&self, id: &str) -> Result<(), PoolError> {
        validate("container id", id)?;
        let rootfs = self.rootfs(id);
        let incoming = rootfs.with_file_name("rootfs.incoming");
        btrfs::require_subvolume(&incoming)?;
        // The restored tree becomes `rootfs`, the old one `rootfs.incoming`.
        renameat2(
            AT_FDCWD,
            &incoming,
            AT_FDCWD,
            &rootfs,
            RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| PoolError::Io {
            op: "swap in the restored rootfs",
            path: rootfs.clone(),
            source: e.into(),
        })
    }

    fn create_rootfs_from(&self, src: &Path, id: &str) -> Result<PathBuf, PoolError> {
        validate("container id", id)?;
        if !btrfs::is_subvolume(src)? {
            return Err(PoolError::NotFound {
                what: "source",
                name: src.display().to_string(),
            });
        }
        let dir = self.containers.join(id);
        DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => PoolError::AlreadyExists {
                    what: "container",
                    name: id.to_string(),
                },
                _ => PoolError::io("create directory", &dir)(e),
            })?;
        let rootfs = dir.join("rootfs");
        if let Err(e) = btrfs::snapshot(src, &rootfs, false) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e.into());
        }
        Ok(rootfs)
    }

    fn recover_container(&self, id: &str) -> Result<(), PoolError> {
        validate("container id", id)?;
        remove_tree(&self.containers.join(id).join("rootfs.incoming"))
    }

    fn set_quota(&self, id: &str, bytes: Option<u64>) -> Result<(), PoolError> {
        validate("container id", id)?;
        if self.quotas.is_none() {
            return Err(PoolError::Unsupported("disk quotas"));
        }
        let rootfs = self.rootfs(id);
        btrfs::require_subvolume(&rootfs)?;
        // The subvolume's own qgroup (0/<subvolume id>), on referenced bytes: the one
        // figure both accounting modes keep meaningful (simple quotas count referenced
        // and exclusive alike).
        btrfs::set_qgroup_limit(&rootfs, bytes)?;
        Ok(())
    }

    fn usage(&self, id: &str) -> Result<DiskUsage, PoolError> {
        validate("container id", id)?;
        let Some(qgroups) = &self.quotas else {
            return Err(PoolError::Unsupported("disk quotas"));
        };
        let rootfs = self.rootfs(id);
        btrfs::require_subvolume(&rootfs)?;
        let dir = qgroups.join(format!("0_{}", btrfs::subvolume_id(&rootfs)?));
        read_qgroup(&dir)
    }
}

/// Brings the pool's quota accounting to what `mode` asks for (see
/// [`QuotaMode`]); `owned` is true for a loop-file pool, whose file system is hearth's
/// alone. Returns the sysfs `qgroups` directory when quotas are on, `None` when
/// containers go unlimited.
fn setup_quotas(root: &Path, mode: QuotaMode, owned: bool) -> Result<Option<PathBuf>, PoolError> {
    if mode == QuotaMode::Off {
        tracing::info!("disk quotas off by configuration (pool.quotas = \"off\")");
        return Ok(None);
    }
    let sysfs = PathBuf::from("/sys/fs/btrfs")
        .join(btrfs::fs_uuid(root)?)
        .join("qgroups");
    if let Some(kind) = quota_kind(&sysfs)? {
        let asked = match mode {
            QuotaMode::Simple => Some(QuotaKind::Simple),
            QuotaMode::Full => Some(QuotaKind::Full),
            _ => None,
        };
        if asked.is_some_and(|a| a != kind) {
            // Switching modes means disabling quotas, which drops every limit.
            tracing::warn!(
                "{} already has {kind:?} quotas; keeping them (pool.quotas asks for {asked:?})",
                root.display()
            );
        }
        clear_stale_qgroups(root);
        tracing::info!("disk quotas: btrfs {kind:?} quotas on {}", root.display());
        return Ok(Some(sysfs));
    }
    let wanted = match mode {
        QuotaMode::Auto if !owned => {
            tracing::info!(
                "disk quotas off: {} has none and is not hearth's own file system \
                 (set pool.quotas = \"simple\" to switch them on)",
                root.display()
            );
            return Ok(None);
        }
        QuotaMode::Full => QuotaKind::Full,
        _ => QuotaKind::Simple,
    };
    let mut result = btrfs::enable_quota(root, wanted);
    if let Err(e) = &result {
        if mode == QuotaMode::Auto && e.errno() == Some(Errno::EINVAL) {
            // Kernels before 6.7 know only full qgroups: slower creates, but limits hold.
            tracing::warn!(
                "this kernel has no btrfs simple quotas ({e}); using full qgroups, which \
                 cost some speed on every commit"
            );
            result = btrfs::enable_quota(root, QuotaKind::Full);
        }
    }
    if let Err(e) = result {
        if mode == QuotaMode::Auto {
            // Unlimited containers rather than none at all.
            tracing::warn!("disk quotas off: could not switch them on: {e}");
            return Ok(None);
        }
        return Err(e.into());
    }
    let Some(kind) = quota_kind(&sysfs)? else {
        return Err(PoolError::BadOutput {
            program: "btrfs quota enable".into(),
            detail: format!("quotas still off ({} missing)", sysfs.display()),
        });
    };
    tracing::info!(
        "disk quotas: switched on btrfs {kind:?} quotas on {}",
        root.display()
    );
    Ok(Some(sysfs))
}

/// The quota mode of a file system from its sysfs `qgroups` directory, which exists
/// only while quotas are on. Kernels before 6.7 have no `mode` file and only full
/// qgroups.
fn quota_kind(sysfs: &Path) -> Result<Option<QuotaKind>, PoolError> {
    if !sysfs.is_dir() {
        return Ok(None);
    }
    let path = sysfs.join("mode");
    match std::fs::read_to_string(&path) {
        Ok(m) => match m.trim() {
            "squota" => Ok(Some(QuotaKind::Simple)),
            "qgroup" => Ok(Some(QuotaKind::Full)),
            other => Err(PoolError::BadOutput {
                program: path.display().to_string(),
                detail: format!("unknown quota mode {other:?}"),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(QuotaKind::Full)),
        Err(e) => Err(PoolError::io("read", &path)(e)),
    }
}

/// Drops qgroups left by deleted subvolumes. Kernels since 6.7 remove a dropped
/// subvolume's qgroup themselves when it is empty; one that still had usage (simple
/// quotas charge extents that a snapshot keeps alive to the subvolume that wrote them)
/// stays until this finds it empty.
fn clear_stale_qgroups(root: &Path) {
    // Fails (EBUSY) for qgroups still in use; those go on a later open.
    if let Err(e) = btrfs_cmd(&["qgroup", "clear-stale"], root) {
        tracing::debug!("btrfs qgroup clear-stale {}: {e}", root.display());
    }
}

/// Usage and limit of one qgroup from its sysfs directory (`qgroups/0_<id>`).
fn read_qgroup(dir: &Path) -> Result<DiskUsage, PoolError> {
    let read = |name: &str| -> Result<u64, PoolError> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(PoolError::io("read", &path))?;
        text.trim().parse().map_err(|e| PoolError::BadOutput {
            program: path.display().to_string(),
            detail: format!("{text:?}: {e}"),
        })
    };
    // BTRFS_QGROUP_LIMIT_MAX_RFER in the limit flags says whether max_referenced holds.
    let limited = read("limit_flags")? & 1 != 0;
    Ok(DiskUsage {
        used_bytes: read("referenced")?,
        limit_bytes: if limited {
            Some(read("max_referenced")?)
        } else {
            None
        },
    })
}

/// Runs `btrfs <args> <path>` and returns its standard output.
fn btrfs_cmd(args: &[&str], path: &Path) -> Result<String, PoolError> {
    let program = "btrfs".to_string();
    let out = Command::new(&program)
        .args(args)
        .arg(path)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| PoolError::Spawn {
            program: program.clone(),
            source,
        })?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if output.is_empty() {
            output = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(PoolError::Command {
            program: format!("btrfs {}", args.join(" ")),
            status: out.status,
            output,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes `path` whatever it is: subvolumes are deleted whole (one ioctl, however big),
/// plain directories are walked for subvolumes inside them.
fn remove_tree(path: &Path) -> Result<(), PoolError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PoolError::io("stat", path)(e)),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path).map_err(PoolError::io("remove", path));
    }
    if btrfs::is_subvolume(path)? {
        return Ok(btrfs::delete_subvolume(path)?);
    }
    for entry in std::fs::read_dir(path).map_err(PoolError::io("read directory", path))? {
        let entry = entry.map_err(PoolError::io("read directory", path))?;
        remove_tree(&entry.path())?;
    }
    std::fs::remove_dir(path).map_err(PoolError::io("remove directory", path))
}

/// An exclusive lock on directory `path`, or `None` if another process holds it.
fn try_lock(path: &Path) -> Result<Option<Flock<File>>, PoolError> {
    let dir = File::open(path).map_err(PoolError::io("open", path))?;
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(PoolError::Io {
            op: "lock",
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

fn sync_fs(path: &Path) -> Result<(), PoolError> {
    let dir = File::open(path).map_err(PoolError::io("open", path))?;
    nix::unistd::syncfs(&dir).map_err(|e| PoolError::Io {
        op: "sync",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

fn make_dir(path: &Path, mode: u32) -> Result<(), PoolError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(PoolError::io("create directory", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qgroups_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("0_257");
        std::fs::create_dir(&q).unwrap();
        let write = |n: &str, v: &str| std::fs::write(q.join(n), v).unwrap();
        write("referenced", "196608000\n");
        write("max_referenced", "1073741824\n");
        write("limit_flags", "1\n");
        assert_eq!(
            read_qgroup(&q).unwrap(),
            DiskUsage {
                used_bytes: 196608000,
                limit_bytes: Some(1 << 30)
            }
        );
        // A lifted limit keeps its old value; the flag says it no longer holds.
        write("limit_flags", "0\n");
        assert_eq!(read_qgroup(&q).unwrap().limit_bytes, None);
        write("referenced", "lots\n");
        assert!(read_qgroup(&q).is_err());

        assert_eq!(quota_kind(&dir.path().join("missing")).unwrap(), None);
        assert_eq!(quota_kind(dir.path()).unwrap(), Some(QuotaKind::Full));
        std::fs::write(dir.path().join("mode"), "squota\n").unwrap();
        assert_eq!(quota_kind(dir.path()).unwrap(), Some(QuotaKind::Simple));
    }
}
