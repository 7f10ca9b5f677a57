//! Turning a fresh debootstrap tree into a hearth template: a neutral identity, apt
//! sources, the agent, units that cannot work in an unprivileged container masked, and
//! no caches. Everything here is plain file work inside the rootfs.

use crate::manifest::{write_atomic, ImageInfo, IMAGE_INFO_PATH};
use crate::ImageError;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub(crate) const AGENT_BIN: &str = "usr/local/bin/hearth-agent";
pub(crate) const AGENT_UNIT_NAME: &str = "hearth-agent.service";

/// Units masked in every template. Each one fails or has nothing to do in an
/// unprivileged LXC guest; a failed unit leaves systemd "degraded", which hides real
/// failures from anyone checking `systemctl is-system-running`.
pub(crate) const MASKED_UNITS: &[&str] = &[
    // Fails: no kmod in minbase, and no CAP_SYS_MODULE for the guest anyway (measured).
    "systemd-modules-load.service",
    // Fails: /sys/kernel/debug is visible but cannot be mounted from a user namespace
    // (measured on the reference host).
    "sys-kernel-debug.mount",
    // Same story wherever the host has configfs loaded.
    "sys-kernel-config.mount",
    "sys-kernel-tracing.mount",
    // A console wizard that waits for input at boot: never right for a headless guest.
    // It only runs on a "first boot", which an empty machine-id is not, but a template
    // that someone edits must not be one file away from hanging at boot.
    "systemd-firstboot.service",
    // Loads kernel modules on demand: a guest cannot, and minbase has no kmod.
    "modprobe@.service",
];

/// Every copy of the template must get its own machine-id, and its hostname and hosts
/// file must not be the build host's (debootstrap copies /etc/hostname and
/// /etc/resolv.conf from the host).
pub(crate) fn reset_identity(root: &Path) -> Result<(), ImageError> {
    // Empty (rather than missing): systemd generates an id at boot and commits it, without
    // treating the boot as a "first boot" that applies presets and runs the wizard.
    replace_file(&root.join("etc/machine-id"), b"", 0o444)?;
    remove_if_present(&root.join("var/lib/dbus/machine-id"))?;
    replace_file(&root.join("etc/hostname"), b"localhost\n", 0o644)?;
    replace_file(
        &root.join("etc/hosts"),
        b"127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n\
          ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
        0o644,
    )?;
    // The build host's resolver is meaningless on another node or behind a container's
    // own network; the runtime provides the guest's DNS configuration.
    remove_if_present(&root.join("etc/resolv.conf"))
}

/// deb822 sources for the suite, its updates and its security archive.
pub(crate) fn write_apt_sources(
    root: &Path,
    suite: &str,
    mirror: &str,
    security_mirror: &str,
) -> Result<(), ImageError> {
    let keyring = ["debian-archive-keyring.pgp", "debian-archive-keyring.gpg"]
        .iter()
        .map(|k| format!("/usr/share/keyrings/{k}"))
        .find(|k| root.join(k.trim_start_matches('/')).is_file());
    let signed_by = keyring
        .map(|k| format!("Signed-By: {k}\n"))
        .unwrap_or_default();
    let text = format!(
        "Types: deb\nURIs: {mirror}\nSuites: {suite} {suite}-updates\nComponents: main\n\
         {signed_by}\n\
         Types: deb\nURIs: {security_mirror}\nSuites: {suite}-security\nComponents: main\n\
         {signed_by}"
    );
    let dir = root.join("etc/apt/sources.list.d");
    make_dir(&dir, 0o755)?;
    replace_file(&dir.join("debian.sources"), text.as_bytes(), 0o644)?;
    remove_if_present(&root.join("etc/apt/sources.list"))
}

/// Installs the agent binary and unit and enables the unit the way `systemctl enable`
/// would: a symlink in each `<target>.wants/` its `[Install]` section names.
pub(crate) fn install_agent(root: &Path, bin: &Path, unit: &str) -> Result<(), ImageError> {
    let dest = root.join(AGENT_BIN);
    make_dir(dest.parent().unwrap_or(root), 0o755)?;
    let tmp = dest.with_extension("partial");
    fs::copy(bin, &tmp).map_err(ImageError::io("copy the agent binary to", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io("chmod", &tmp))?;
    fs::rename(&tmp, &dest).map_err(ImageError::io("rename into place", &dest))?;

    let units = root.join("etc/systemd/system");
    make_dir(&units, 0o755)?;
    replace_file(&units.join(AGENT_UNIT_NAME), unit.as_bytes(), 0o644)?;
    let link_target = format!("/etc/systemd/system/{AGENT_UNIT_NAME}");
    for target in wanted_by(unit) {
        let wants = units.join(format!("{target}.wants"));
        make_dir(&wants, 0o755)?;
        let link = wants.join(AGENT_UNIT_NAME);
        remove_if_present(&link)?;
        symlink(&link_target, &link).map_err(ImageError::io("symlink", &link))?;
    }
    make_dir(&root.join("etc/hearth"), 0o700)
}

/// The targets a unit's `[Install]` section hooks it into; `sysinit.target` when it
/// names none, because the agent must start early whatever its unit says.
fn wanted_by(unit: &str) -> Vec<String> {
    let mut section = "";
    let mut targets = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            section = line;
        } else if section == "[Install]" {
            if let Some(v) = line
                .strip_prefix("WantedBy=")
                .or_else(|| line.strip_prefix("WantedBy ="))
            {
                targets.extend(v.split_whitespace().map(str::to_string));
            }
        }
    }
    if targets.is_empty() {
        targets.push("sysinit.target".to_string());
    }
    targets
}

pub(crate) fn mask_units(root: &Path) -> Result<(), ImageError> {
    let units = root.join("etc/systemd/system");
    make_dir(&units, 0o755)?;
    for unit in MASKED_UNITS {
        let link = units.join(unit);
        remove_if_present(&link)?;
        symlink("/dev/null", &link).map_err(ImageError::io("symlink", &link))?;
    }
    Ok(())
}

/// Marks /etc and /var as up to date with /usr, as `systemd-update-done` would after a
/// first boot. Without the stamps every container's first boot runs ldconfig, the
/// journal catalog rebuild, sysusers and friends (`ConditionNeedsUpdate=`), all of which
/// debootstrap already did: measured 30-100 ms of boot and tens of MB of page cache per
/// guest.
pub(crate) fn mark_updated(root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::MetadataExt;
    let usr = root.join("usr");
    let md = std::fs::metadata(&usr).map_err(ImageError::io("stat", &usr))?;
    let nsec = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
    let mtime = md.modified().map_err(ImageError::io("stat", &usr))?;
    for dir in ["etc", "var"] {
        let stamp = root.join(dir).join(".updated");
        replace_file(
            &stamp,
            format!("# This file was created by hearth's image build.\nTIMESTAMP_NSEC={nsec}\n")
                .as_bytes(),
            0o644,
        )?;
        let f = std::fs::File::options()
            .write(true)
            .open(&stamp)
            .map_err(ImageError::io("open", &stamp))?;
        f.set_modified(mtime)
            .map_err(ImageError::io("touch", &stamp))?;
    }
    Ok(())
}

/// Drops what only the build needed: downloaded packages, apt's binary caches and the
/// package lists of debootstrap's own temporary source (stale the moment the real
/// sources are written; `apt-get update` in the guest fetches fresh ones).
pub(crate) fn clean(root: &Path) -> Result<(), ImageError> {
    remove_files_in(&root.join("var/cache/apt/archives"), |n| {
        n.ends_with(".deb")
    })?;
    remove_files_in(&root.join("var/cache/apt/archives/partial"), |_| true)?;
    remove_files_in(&root.join("var/cache/apt"), |n| n.ends_with(".bin"))?;
    remove_files_in(&root.join("var/lib/apt/lists"), |n| n != "lock")?;
    Ok(())
}

pub(crate) fn write_image_info(root: &Path, info: &ImageInfo) -> Result<(), ImageError> {
    let path = root.join(IMAGE_INFO_PATH);
    make_dir(path.parent().unwrap_or(root), 0o700)?;
    let mut json = serde_json::to_vec_pretty(info).map_err(|source| ImageError::Manifest {
        path: path.clone(),
        source,
    })?;
    json.push(b'\n');
    write_atomic(&path, &json)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
        .map_err(ImageError::io("chmod", &path))
}

/// Removes whatever is at `path` first, so a symlink planted there is replaced rather
/// than written through.
fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ImageError> {
    remove_if_present(path)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(ImageError::io("create", path))?;
    f.write_all(contents)
        .map_err(ImageError::io("write", path))?;
    // The umask may have narrowed the mode given at creation.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(ImageError::io("chmod", path))
}

fn remove_if_present(path: &Path) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ImageError::io("remove", path)(e))
        }
        _ => Ok(()),
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), ImageError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(ImageError::io("create directory", path)(e)),
    }?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(ImageError::io("chmod", path))
}

/// Removes the non-directory entries directly in `dir` whose names `remove` picks; a
/// missing `dir` is fine.
fn remove_files_in(dir: &Path, remove: impl Fn(&str) -> bool) -> Result<(), ImageError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io("read directory", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(ImageError::io("read directory", dir))?;
        let kind = entry
            .file_type()
            .map_err(ImageError::io("stat", entry.path()))?;
        let name = entry.file_name();
        if !kind.is_dir() && remove(&name.to_string_lossy()) {
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_by_reads_the_install_section_only() {
        let unit = "[Unit]\nWantedBy=nope.target\n[Service]\nExecStart=/x\n\
                    [Install]\nWantedBy=sysinit.target multi-user.target\n";
        assert_eq!(wanted_by(unit), vec!["sysinit.target", "multi-user.target"]);
        assert_eq!(
            wanted_by("[Service]\nExecStart=/x\n"),
            vec!["sysinit.target"]
        );
    }

    fn fake_debootstrap_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in [
            "etc/apt/sources.list.d",
            "var/lib/dbus",
            "var/cache/apt/archives/partial",
            "var/lib/apt/lists/partial",
            "usr/share/keyrings",
        ] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::write(
            r.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        fs::write(r.join("var/lib/dbus/machine-id"), "x").unwrap();
        fs::write(r.join("etc/hostname"), "buildhost\n").unwrap();
        fs::write(r.join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        fs::write(r.join("etc/apt/sources.list"), "deb x y z\n").unwrap();
        fs::write(r.join("usr/share/keyrings/debian-archive-keyring.gpg"), "k").unwrap();
        fs::write(r.join("var/cache/apt/archives/bash_5.deb"), "d").unwrap();
        fs::write(r.join("var/cache/apt/archives/lock"), "").unwrap();
        fs::write(r.join("var/cache/apt/pkgcache.bin"), "c").unwrap();
        fs::write(r.join("var/lib/apt/lists/x_Packages"), "p").unwrap();
        fs::write(r.join("var/lib/apt/lists/lock"), "").unwrap();
        dir
    }

    #[test]
    fn configures_a_tree_like_debootstrap_leaves_it() {
        let dir = fake_debootstrap_tree();
        let r = dir.path();
        let bin = r.join("agent-src");
        fs::write(&bin, "#!/bin/sh\n").unwrap();

        reset_identity(r).unwrap();
        write_apt_sources(r, "trixie", "http://m/debian", "http://m/debian-security").unwrap();
        mask_units(r).unwrap();
        install_agent(
            r,
            &bin,
            "[Service]\nExecStart=/x\n[Install]\nWantedBy=sysinit.target\n",
        )
        .unwrap();
        clean(r).unwrap();

        assert_eq!(fs::metadata(r.join("etc/machine-id")).unwrap().len(), 0);
        assert!(!r.join("var/lib/dbus/machine-id").exists());
        assert!(!r.join("etc/resolv.conf").exists());
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "localhost\n"
        );
        assert!(!r.join("etc/apt/sources.list").exists());
        let sources = fs::read_to_string(r.join("etc/apt/sources.list.d/debian.sources")).unwrap();
        assert!(
            sources.contains("Suites: trixie trixie-updates\n"),
            "{sources}"
        );
        assert!(sources.contains("URIs: http://m/debian-security\nSuites: trixie-security\n"));
        assert!(sources.contains("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"));

        let mode = |p: &str| fs::metadata(r.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(AGENT_BIN), 0o755);
        assert_eq!(mode("etc/hearth"), 0o700);
        assert_eq!(
            fs::read_link(r.join("etc/systemd/system/sysinit.target.wants/hearth-agent.service"))
                .unwrap(),
            Path::new("/etc/systemd/system/hearth-agent.service")
        );
        assert_eq!(
            fs::read_link(r.join("etc/systemd/system/systemd-modules-load.service")).unwrap(),
            Path::new("/dev/null")
        );

        assert!(!r.join("var/cache/apt/archives/bash_5.deb").exists());
        assert!(r.join("var/cache/apt/archives/lock").exists());
        assert!(!r.join("var/cache/apt/pkgcache.bin").exists());
        assert!(!r.join("var/lib/apt/lists/x_Packages").exists());
        assert!(r.join("var/lib/apt/lists/lock").exists());
        assert!(r.join("var/lib/apt/lists/partial").is_dir());
    }

    #[test]
    fn replacing_a_file_does_not_write_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, "keep").unwrap();
        let etc = dir.path().join("root/etc");
        fs::create_dir_all(&etc).unwrap();
        symlink(&outside, etc.join("hostname")).unwrap();
        replace_file(&etc.join("hostname"), b"localhost\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
    }
}
