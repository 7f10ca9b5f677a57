//! The storage pool: a btrfs file system holding image templates, container root file
//! systems and (later) their snapshots.
//!
//! ```text
//! <pool>/images/<name>             read-only template subvolumes
//! <pool>/images/.tmp-<name>-<rand> an image being built or imported (removed on open)
//! <pool>/containers/<id>/rootfs    writable snapshot of an image
//! <pool>/snapshots/<id>/<name>     read-only snapshots of a container (later)
//! ```
//!
//! Callers use the [`Storage`] trait, so a second driver (plain directories for hosts
//! without btrfs, or another copy-on-write file system) can be added without touching
//! them; [`StorageInfo`] tells them what the driver can do.

pub mod btrfs;
mod btrfs_pool;
mod config;
mod error;
mod images;
pub mod loopfile;
mod names;

pub use btrfs::BtrfsError;
pub use btrfs_pool::BtrfsPool;
pub use config::{
    parse_size, PoolConfig, PoolKind, QuotaMode, DEFAULT_LOOP_FILE, DEFAULT_MOUNTPOINT,
    DEFAULT_SIZE,
};
pub use error::PoolError;
/// Re-exported so users of the pool can name specs, manifests and progress reporters
/// without a dependency of their own on the images crate.
pub use hearth_images;
pub use images::{build_image, export_image, import_image};
pub use names::validate as validate_name;

use std::path::{Path, PathBuf};

/// What a storage driver can do, so callers pick a strategy (snapshot vs copy, quota or
/// not) instead of matching on the driver's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageInfo {
    pub driver: &'static str,
    /// Copy-on-write snapshots in constant time, whatever the rootfs size.
    pub instant_snapshots: bool,
    /// Per-container disk limits are enforced.
    pub quotas: bool,
}

/// A container's disk use as the quota sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskUsage {
    /// The bytes the limit counts. With simple quotas (the default) that is what the
    /// rootfs wrote since it was made (created, copied or restored): the image's files
    /// it shares are charged to the image, and data a snapshot still holds stays charged
    /// after the guest deletes it. With full qgroups it is everything the rootfs
    /// references, shared extents included.
    pub used_bytes: u64,
    /// `None`: unlimited.
    pub limit_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// From the template's `/etc/hearth/image.json`, when it has one.
    pub created: Option<String>,
}

/// Names and ids passed in are validated (`[a-z0-9][a-z0-9-]{0,62}`) by every method that
/// takes one, except the path getters, which only compute paths.
pub trait Storage: Send + Sync {
    fn info(&self) -> StorageInfo;
    fn root(&self) -> &Path;
    fn image_path(&self, name: &str) -> PathBuf;
    fn list_images(&self) -> Result<Vec<ImageEntry>, PoolError>;
    /// A fresh, empty, writable directory to fill with image `name`; it becomes the
    /// image through [`Storage::commit_image`] or goes away through
    /// [`Storage::abort_image`].
    fn begin_image(&self, name: &str) -> Result<PathBuf, PoolError>;
    /// Makes the pending image read-only and gives it its name, atomically replacing an
    /// image of that name if there is one.
    fn commit_image(&self, tmp: &Path, name: &str) -> Result<(), PoolError>;
    fn abort_image(&self, tmp: &Path) -> Result<(), PoolError>;
    /// Fails with `NotFound` if there is no such image. Containers made from it are
    /// independent copies and stay.
    fn delete_image(&self, name: &str) -> Result<(), PoolError>;
    /// A writable copy of image `image` as container `id`'s rootfs. Fails with
    /// `NotFound` if the image does not exist and `AlreadyExists` if the container does.
    fn create_rootfs(&self, image: &str, id: &str) -> Result<PathBuf, PoolError>;
    fn rootfs(&self, id: &str) -> PathBuf;
    /// Removes everything the pool holds for container `id`; a missing container is not
    /// an error, so a crashed delete can simply be repeated.
    fn delete_container(&self, id: &str) -> Result<(), PoolError>;
    /// Every container with storage in the pool, sorted, for reconciling with the store
    /// after a crash.
    fn container_ids(&self) -> Result<Vec<String>, PoolError>;
    /// A bare snapshot between arbitrary paths in the pool, for benchmarks that measure
    /// the storage floor under hearth's own operations.
    fn raw_snapshot(&self, src: &Path, dst: &Path, readonly: bool) -> Result<(), PoolError>;

    /// Where snapshot `name` of container `id` lives.
    fn snapshot_path(&self, id: &str, name: &str) -> PathBuf;
    /// A read-only snapshot of the container's rootfs as `snapshots/<id>/<name>`.
    fn snapshot_container(&self, id: &str, name: &str) -> Result<PathBuf, PoolError>;
    fn list_snapshots(&self, id: &str) -> Result<Vec<String>, PoolError>;
    /// Missing is Ok (idempotent, for crash recovery).
    fn delete_snapshot(&self, id: &str, name: &str) -> Result<(), PoolError>;
    /// The first half of a restore, which leaves the live rootfs alone (so it can run
    /// while the guest is still being stopped): a writable copy of snapshot `name` is
    /// made beside the rootfs. Fails with `NotFound` if there is no such snapshot.
    fn stage_restore(&self, id: &str, name: &str) -> Result<(), PoolError>;
    /// The second half: the staged copy becomes the rootfs in one atomic rename (a crash
    /// leaves the old rootfs or the new one, never none), and the old tree takes the
    /// staged copy's place until [`Storage::recover_container`] removes it.
    fn swap_restored(&self, id: &str) -> Result<(), PoolError>;
    /// A new container's rootfs as a writable snapshot of `src` (a snapshot or another
    /// container's rootfs): branch and copy.
    fn create_rootfs_from(&self, src: &Path, id: &str) -> Result<PathBuf, PoolError>;
    /// Removes what a restore left next to the rootfs: the old tree after a swap, or a
    /// staged copy a failed or interrupted restore never swapped in.
    fn recover_container(&self, id: &str) -> Result<(), PoolError>;

    /// Caps the container's rootfs at `bytes` (`None` lifts the cap). The cap belongs to
    /// the rootfs subvolume, so after [`Storage::swap_restored`] or
    /// [`Storage::create_rootfs_from`] made a new one it must be set again. Fails with
    /// `Unsupported` when [`StorageInfo::quotas`] is false.
    fn set_quota(&self, id: &str, bytes: Option<u64>) -> Result<(), PoolError>;
    /// The rootfs's disk use and cap. Fails with `Unsupported` when
    /// [`StorageInfo::quotas`] is false.
    fn usage(&self, id: &str) -> Result<DiskUsage, PoolError>;
}
