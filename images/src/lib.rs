//! Rootfs templates for hearth guests: building Debian 13 with debootstrap, and moving
//! templates between nodes as verified archives.
//!
//! This crate does plain file-system work on directories it is given. Where those
//! directories live (btrfs subvolumes in the pool) is the host's business, which keeps
//! builds testable on any file system and the pool free of debootstrap details.

mod archive;
mod debian;
mod dpkg;
mod error;
mod guest;
mod manifest;
pub mod mounts;
mod process;
mod progress;

pub use archive::{export, import, import_with_manifest};
pub use debian::{build_debian, DebianSpec, DEFAULT_CACHE_DIR, DEFAULT_PACKAGES};
pub use dpkg::installed_packages;
pub use error::ImageError;
pub use manifest::{
    manifest_path_for, read_image_info, read_manifest, write_manifest, ImageInfo, Manifest, FORMAT,
    IMAGE_INFO_PATH,
};
pub use progress::{ConsoleProgress, NoProgress, Progress};
