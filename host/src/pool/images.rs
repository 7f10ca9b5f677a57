//! Filling the pool with templates: build, import and export run in a pending
//! subvolume and are committed only when complete, so a failed or interrupted job never
//! leaves a half-made image under a real name.

use super::names::validate;
use super::{PoolError, Storage};
use hearth_images::{DebianSpec, ImageError, Manifest, Progress};
use std::path::Path;

/// Builds image `name` with debootstrap (see [`hearth_images::build_debian`]) and commits
/// it, replacing an existing image of that name only once the new one is complete. The
/// spec's own `name` is overridden by `name`, so the template records what it is called.
pub fn build_image(
    pool: &dyn Storage,
    name: &str,
    spec: &DebianSpec,
    progress: &dyn Progress,
) -> Result<Manifest, PoolError> {
    let tmp = pool.begin_image(name)?;
    let spec = DebianSpec {
        name: name.to_string(),
        ..spec.clone()
    };
    let built = hearth_images::build_debian(&spec, &tmp, progress);
    finish(pool, &tmp, name, built)
}

/// Imports `archive` (with its `<archive>.manifest.json`) as image `name`, verified
/// before anything is unpacked.
pub fn import_image(pool: &dyn Storage, name: &str, archive: &Path) -> Result<Manifest, PoolError> {
    let tmp = pool.begin_image(name)?;
    let imported = hearth_images::import(archive, &tmp);
    finish(pool, &tmp, name, imported)
}

/// Writes image `name` to `out` (a `.tar.zst`) and `<out>.manifest.json`. Images are
/// read-only, so the archive is a consistent copy even while containers run.
pub fn export_image(pool: &dyn Storage, name: &str, out: &Path) -> Result<Manifest, PoolError> {
    validate("image name", name)?;
    let path = pool.image_path(name);
    if !path.is_dir() {
        return Err(PoolError::NotFound {
            what: "image",
            name: name.to_string(),
        });
    }
    Ok(hearth_images::export(&path, name, out)?)
}

fn finish(
    pool: &dyn Storage,
    tmp: &Path,
    name: &str,
    filled: Result<Manifest, ImageError>,
) -> Result<Manifest, PoolError> {
    let committed = filled
        .map_err(PoolError::from)
        .and_then(|m| pool.commit_image(tmp, name).map(|()| m));
    if committed.is_err() {
        if let Err(e) = pool.abort_image(tmp) {
            // The first error is the one to report; the pool removes this leftover the
            // next time it is opened.
            tracing::warn!("could not remove pending image {}: {e}", tmp.display());
        }
    }
    committed
}
