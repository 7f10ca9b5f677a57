//! Building a Debian template: debootstrap into the directory the caller prepared, then
//! the hearth configuration. This module knows nothing about where the directory lives
//! (the pool hands it a fresh subvolume); it only needs it empty.

use crate::manifest::{now_rfc3339, tree_bytes, ImageInfo, FORMAT};
use crate::progress::Progress;
use crate::{dpkg, guest, mounts, process, ImageError, Manifest};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages every template gets on top of debootstrap's minbase: enough for systemd as
/// PID 1 under LXC, networking tools, TLS roots and the handful of commands people
/// expect on a machine they log into.
pub const DEFAULT_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "ca-certificates",
    "procps",
    "iputils-ping",
    "less",
    "curl",
];

pub const DEFAULT_CACHE_DIR: &str = "/var/cache/hearth/debootstrap";

#[derive(Debug, Clone)]
pub struct DebianSpec {
    /// Recorded in the template's `/etc/hearth/image.json` and in the manifest.
    pub name: String,
    pub suite: String,
    pub mirror: String,
    /// Where `<suite>-security` comes from; it is not on the regular mirrors.
    pub security_mirror: String,
    /// Everything passed to debootstrap's `--include` (the defaults plus any extras).
    pub packages: Vec<String>,
    /// Host path of the `hearth-agent` binary to install.
    pub agent_bin: PathBuf,
    /// Contents of the agent's systemd unit.
    pub agent_unit: String,
    /// Host-side cache of downloaded .debs, shared by every build so a rebuild downloads
    /// only what changed.
    pub cache_dir: PathBuf,
}

impl DebianSpec {
    /// Debian 13 (trixie) from deb.debian.org with [`DEFAULT_PACKAGES`].
    pub fn debian13(agent_bin: PathBuf, agent_unit: String) -> Self {
        DebianSpec {
            name: "debian-13".into(),
            suite: "trixie".into(),
            mirror: "http://deb.debian.org/debian".into(),
            security_mirror: "http://deb.debian.org/debian-security".into(),
            packages: DEFAULT_PACKAGES.iter().map(|p| p.to_string()).collect(),
            agent_bin,
            agent_unit,
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
        }
    }

    /// Catches what would otherwise fail only after a 40-second debootstrap.
    fn validate(&self) -> Result<(), ImageError> {
        let bad = |msg: String| Err(ImageError::InvalidSpec(msg));
        for (field, value) in [
            ("suite", &self.suite),
            ("mirror", &self.mirror),
            ("security_mirror", &self.security_mirror),
            ("name", &self.name),
        ] {
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(format!("{field} {value:?} must be one non-empty word"));
            }
        }
        for p in &self.packages {
            let ok = !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if !ok {
                return bad(format!("package name {p:?}"));
            }
        }
        if !self.agent_bin.is_file() {
            return bad(format!(
                "agent binary {} is not a file (build hearth-agent first)",
                self.agent_bin.display()
            ));
        }
        if !self.agent_unit.contains("[Service]") {
            return bad("the agent unit has no [Service] section".into());
        }
        if !self.cache_dir.is_absolute() {
            return bad(format!(
                "cache_dir {} must be absolute (debootstrap requires it)",
                self.cache_dir.display()
            ));
        }
        Ok(())
    }
}

/// Builds a template into `target`, which must be an existing empty directory. On error
/// the directory is left for the caller to delete, with nothing mounted inside it.
///
/// The returned manifest has no `sha256` (there is no archive yet) and `size_bytes` is the
/// rootfs's apparent size.
pub fn build_debian(
    spec: &DebianSpec,
    target: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, ImageError> {
    spec.validate()?;
    require_empty_dir(target)?;
    let result = build_steps(spec, target, progress);
    progress.done();
    // debootstrap unmounts its /proc, /sys and /dev/pts when it succeeds, not always
    // when it fails or is killed.
    let swept = mounts::unmount_below(target);
    let manifest = result?;
    swept?;
    Ok(manifest)
}

fn build_steps(
    spec: &DebianSpec,
    target: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, ImageError> {
    progress.phase("debootstrap");
    debootstrap(spec, target)?;

    progress.phase("configure");
    guest::reset_identity(target)?;
    guest::write_apt_sources(target, &spec.suite, &spec.mirror, &spec.security_mirror)?;
    guest::mask_units(target)?;

    progress.phase("install agent");
    guest::install_agent(target, &spec.agent_bin, &spec.agent_unit)?;

    progress.phase("clean");
    guest::clean(target)?;
    guest::mark_updated(target)?;

    progress.phase("manifest");
    let created = now_rfc3339();
    guest::write_image_info(
        target,
        &ImageInfo {
            name: spec.name.clone(),
            created: created.clone(),
            suite: Some(spec.suite.clone()),
        },
    )?;
    let rootfs_bytes = tree_bytes(target)?;
    Ok(Manifest {
        name: spec.name.clone(),
        created,
        sha256: None,
        size_bytes: rootfs_bytes,
        rootfs_bytes,
        packages: dpkg::installed_packages(target)?,
        format: FORMAT,
    })
}

fn debootstrap(spec: &DebianSpec, target: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(&spec.cache_dir)
        .map_err(ImageError::io("create directory", &spec.cache_dir))?;
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--cache-dir={}", spec.cache_dir.display()))
        .arg(format!("--include={}", spec.packages.join(",")))
        .arg(&spec.suite)
        .arg(target)
        .arg(&spec.mirror)
        // Maintainer scripts run in the chroot with this environment: keep perl and
        // friends from complaining about the host's locale.
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
    process::run(&mut cmd)
}

pub(crate) fn require_empty_dir(path: &Path) -> Result<(), ImageError> {
    let mut entries = std::fs::read_dir(path).map_err(ImageError::io("open directory", path))?;
    if entries.next().is_some() {
        return Err(ImageError::TargetNotEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> DebianSpec {
        let bin = dir.join("agent");
        std::fs::write(&bin, "x").unwrap();
        DebianSpec::debian13(bin, "[Service]\nExecStart=/x\n".into())
    }

    #[test]
    fn defaults_are_debian_13() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        assert_eq!(s.suite, "trixie");
        assert!(s.packages.iter().any(|p| p == "systemd-sysv"));
        assert_eq!(s.cache_dir, Path::new("/var/cache/hearth/debootstrap"));
        s.validate().unwrap();
    }

    #[test]
    fn bad_specs_fail_before_debootstrap() {
        let dir = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        type Breaker = fn(&mut DebianSpec);
        let cases: [Breaker; 6] = [
            |s| s.packages.push("curl,wget".into()),
            |s| s.packages.push("--foo bar".into()),
            |s| s.agent_bin = PathBuf::from("/nonexistent/hearth-agent"),
            |s| s.agent_unit = String::new(),
            |s| s.suite = "trixie main".into(),
            |s| s.cache_dir = PathBuf::from("relative"),
        ];
        for break_it in cases {
            let mut s = spec(dir.path());
            break_it(&mut s);
            let err = build_debian(&s, target.path(), &crate::NoProgress).unwrap_err();
            assert!(matches!(err, ImageError::InvalidSpec(_)), "{err}");
        }
    }

    #[test]
    fn target_must_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        std::fs::write(target.path().join("x"), "").unwrap();
        let err = build_debian(&spec(dir.path()), target.path(), &crate::NoProgress).unwrap_err();
        assert!(matches!(err, ImageError::TargetNotEmpty { .. }), "{err}");
    }
}
