//! Template archives: export → import keeps everything a rootfs needs (owners, modes,
//! xattrs and file capabilities, links, device nodes), and import refuses a corrupt or
//! truncated archive before unpacking anything. Needs root; skipped with a message
//! otherwise.
//!
//! `HEARTH_E2E_IMAGE=1` also runs a real Debian 13 debootstrap build into a loop-file
//! pool (about a minute with a warm cache; needs `hearth-agent` built and the Debian
//! mirror reachable).

use hearth_host::pool::hearth_images::{
    self as images, manifest_path_for, read_manifest, write_manifest, ImageError,
};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipped: the image tests need root");
        false
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let name = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a live buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            cstr(path).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name:?} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Every xattr of `path` (not following symlinks), sorted by name.
fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let p = cstr(path);
    let mut names = vec![0u8; 4096];
    // SAFETY: valid path and a live buffer of the given length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", path.display());
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 4096];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(len >= 0, "getxattr {}", path.display());
        value.truncate(len as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    out.sort();
    out
}

/// `security.capability` for `cap_net_raw+ep`, as iputils-ping ships it
/// (VFS_CAP_REVISION_2 with the effective bit, permitted = 1 << CAP_NET_RAW).
fn net_raw_capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
    v.extend_from_slice(&(1u32 << 13).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// A small tree with every kind of thing a real rootfs has that a careless copy loses.
fn fake_rootfs(root: &Path) {
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    for d in [
        "etc/hearth",
        "usr/bin",
        "home/user",
        "var/lib/dpkg",
        "var/empty",
        "dev",
        "run",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("etc/hostname"), "localhost\n").unwrap();
    set_xattr(&root.join("etc/hostname"), "user.hearth", b"v1");
    fs::write(
        root.join("etc/hearth/image.json"),
        r#"{"name":"fake","created":"2025-06-01T12:00:00Z"}"#,
    )
    .unwrap();
    fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: bash\nStatus: install ok installed\nVersion: 5.2\n\n\
         Package: zsh\nStatus: deinstall ok config-files\nVersion: 5.9\n",
    )
    .unwrap();

    fs::write(root.join("usr/bin/a"), "hard-linked\n").unwrap();
    fs::hard_link(root.join("usr/bin/a"), root.join("usr/bin/b")).unwrap();
    set_xattr(&root.join("usr/bin/a"), "trusted.hearth", b"t");

    fs::write(root.join("usr/bin/suid"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(
        root.join("usr/bin/suid"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();

    fs::write(root.join("usr/bin/ping"), "ping\n").unwrap();
    fs::set_permissions(root.join("usr/bin/ping"), fs::Permissions::from_mode(0o755)).unwrap();
    set_xattr(
        &root.join("usr/bin/ping"),
        "security.capability",
        &net_raw_capability(),
    );

    // Owners that exist in the guest but not on the host: kept as numbers.
    fs::write(root.join("home/user/notes"), "mine\n").unwrap();
    fs::set_permissions(
        root.join("home/user/notes"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::lchown(root.join("home/user/notes"), Some(4321), Some(8765)).unwrap();
    std::os::unix::fs::lchown(root.join("home/user"), Some(4321), Some(8765)).unwrap();
    fs::set_permissions(root.join("home/user"), fs::Permissions::from_mode(0o750)).unwrap();

    symlink("/usr/bin/a", root.join("etc/alternative")).unwrap();
    symlink("usr/lib", root.join("lib")).unwrap(); // dangling, as in a merged-/usr tree

    nix::unistd::mkfifo(
        &root.join("run/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &root.join("dev/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();

    let f = fs::File::create(root.join("var/sparse")).unwrap();
    f.set_len(8 << 20).unwrap();
    fs::set_permissions(root.join("var/empty"), fs::Permissions::from_mode(0o555)).unwrap();
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Fails on the first difference in anything a rootfs depends on.
fn assert_same_tree(a: &Path, b: &Path) {
    let paths = walk(a);
    assert_eq!(paths, walk(b), "the same paths");
    for rel in &paths {
        let (pa, pb) = (a.join(rel), b.join(rel));
        let (ma, mb) = (
            fs::symlink_metadata(&pa).unwrap(),
            fs::symlink_metadata(&pb).unwrap(),
        );
        let what = rel.display();
        assert_eq!(ma.mode(), mb.mode(), "mode of {what}");
        assert_eq!(
            (ma.uid(), ma.gid()),
            (mb.uid(), mb.gid()),
            "owner of {what}"
        );
        assert_eq!(ma.rdev(), mb.rdev(), "device of {what}");
        assert_eq!(ma.nlink(), mb.nlink(), "links of {what}");
        assert_eq!(xattrs(&pa), xattrs(&pb), "xattrs of {what}");
        if ma.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&pa).unwrap(),
                fs::read_link(&pb).unwrap(),
                "{what}"
            );
        } else {
            assert_eq!(ma.mtime(), mb.mtime(), "mtime of {what}");
        }
        if ma.is_file() {
            assert_eq!(
                fs::read(&pa).unwrap(),
                fs::read(&pb).unwrap(),
                "content of {what}"
            );
        }
    }
}

struct Exported {
    dir: tempfile::TempDir,
    archive: PathBuf,
    source: PathBuf,
}

fn exported() -> Exported {
    let dir = tempfile::Builder::new()
        .prefix("hearth-images-test-")
        .tempdir()
        .unwrap();
    let source = dir.path().join("rootfs");
    fs::create_dir(&source).unwrap();
    fake_rootfs(&source);
    let archive = dir.path().join("fake.tar.zst");
    images::export(&source, "fake", &archive).unwrap();
    Exported {
        dir,
        archive,
        source,
    }
}

fn empty_dir(e: &Exported, name: &str) -> PathBuf {
    let p = e.dir.path().join(name);
    fs::create_dir(&p).unwrap();
    p
}

fn is_empty(p: &Path) -> bool {
    fs::read_dir(p).unwrap().next().is_none()
}

#[test]
fn export_import_round_trip_keeps_everything() {
    if !is_root() {
        return;
    }
    let e = exported();
    let manifest = read_manifest(&manifest_path_for(&e.archive)).unwrap();
    let bytes = fs::read(&e.archive).unwrap();
    assert_eq!(manifest.name, "fake");
    assert_eq!(
        manifest.created, "2025-06-01T12:00:00Z",
        "the build time, not the export's"
    );
    assert_eq!(manifest.size_bytes, bytes.len() as u64);
    assert_eq!(
        manifest.sha256.as_deref(),
        Some(hex(&Sha256::digest(&bytes)).as_str())
    );
    assert_eq!(manifest.packages, vec!["bash 5.2"]);
    assert_eq!(manifest.format, images::FORMAT);
    assert!(
        manifest.rootfs_bytes >= 8 << 20,
        "{}",
        manifest.rootfs_bytes
    );
    assert!(
        bytes.len() < 1 << 20,
        "compressed, holes and all: {}",
        bytes.len()
    );
    assert!(!e.dir.path().join("fake.tar.zst.partial").exists());

    let target = empty_dir(&e, "imported");
    let imported = images::import(&e.archive, &target).unwrap();
    assert_eq!(imported, manifest);
    assert_same_tree(&e.source, &target);
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&target.join("usr/bin/a")),
        ino(&target.join("usr/bin/b")),
        "still a hard link"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_corrupt_archive_is_refused_before_unpacking() {
    if !is_root() {
        return;
    }
    let e = exported();
    let mut bytes = fs::read(&e.archive).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&e.archive, &bytes).unwrap();

    let target = empty_dir(&e, "imported");
    let err = images::import(&e.archive, &target).unwrap_err();
    assert!(matches!(err, ImageError::ChecksumMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("corrupt") && msg.contains("fake.tar.zst"),
        "{msg}"
    );
    assert!(is_empty(&target), "nothing extracted");
}

#[test]
fn a_truncated_archive_is_refused_before_unpacking() {
    if !is_root() {
        return;
    }
    let e = exported();
    let len = fs::metadata(&e.archive).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&e.archive)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let target = empty_dir(&e, "imported");
    let err = images::import(&e.archive, &target).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert!(is_empty(&target), "nothing extracted");

    // Even with a manifest that matches the truncated file (made from a bad upload),
    // unpacking fails with an error that names the archive; the caller deletes the target.
    let manifest_path = manifest_path_for(&e.archive);
    let mut m = read_manifest(&manifest_path).unwrap();
    let bytes = fs::read(&e.archive).unwrap();
    m.size_bytes = bytes.len() as u64;
    m.sha256 = Some(hex(&Sha256::digest(&bytes)));
    write_manifest(&manifest_path, &m).unwrap();
    let target = empty_dir(&e, "imported-2");
    let err = images::import(&e.archive, &target).unwrap_err();
    assert!(matches!(err, ImageError::Extract { .. }), "{err}");
    assert!(err.to_string().contains("fake.tar.zst"), "{err}");
}

#[test]
fn import_needs_a_manifest_with_a_checksum_and_an_empty_target() {
    if !is_root() {
        return;
    }
    let e = exported();
    let manifest_path = manifest_path_for(&e.archive);

    let target = empty_dir(&e, "imported");
    fs::write(target.join("existing"), "x").unwrap();
    let err = images::import(&e.archive, &target).unwrap_err();
    assert!(matches!(err, ImageError::TargetNotEmpty { .. }), "{err}");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 1);

    let target = empty_dir(&e, "imported-2");
    let mut m = read_manifest(&manifest_path).unwrap();
    m.sha256 = None;
    write_manifest(&manifest_path, &m).unwrap();
    let err = images::import(&e.archive, &target).unwrap_err();
    assert!(matches!(err, ImageError::MissingChecksum { .. }), "{err}");

    fs::remove_file(&manifest_path).unwrap();
    let err = images::import(&e.archive, &target).unwrap_err();
    assert!(
        err.to_string().contains("fake.tar.zst.manifest.json"),
        "{err}"
    );
    assert!(is_empty(&target));
}

mod e2e {
    //! The real build. Its rootfs is what the LXC end-to-end tests boot.

    use super::*;
    use hearth_host::pool::{btrfs, build_image, export_image, import_image, loopfile};
    use hearth_host::pool::{BtrfsPool, PoolConfig, Storage};

    struct PoolGuard {
        pool: Option<BtrfsPool>,
        file: PathBuf,
        mountpoint: PathBuf,
        dir: Option<tempfile::TempDir>,
    }

    impl Drop for PoolGuard {
        fn drop(&mut self) {
            self.pool = None;
            let _ = images::mounts::unmount_below(&self.mountpoint);
            match loopfile::teardown(&self.file, &self.mountpoint) {
                Ok(()) => drop(self.dir.take()),
                Err(e) => {
                    let kept = self.dir.take().map(|d| d.keep());
                    eprintln!("could not tear down the test pool ({e}); left {kept:?}");
                }
            }
        }
    }

    /// `HEARTH_AGENT_BIN`, else the workspace's release or debug build.
    fn agent_bin() -> PathBuf {
        if let Some(p) = std::env::var_os("HEARTH_AGENT_BIN") {
            return PathBuf::from(p);
        }
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        ["release", "debug"]
            .iter()
            .map(|profile| target.join(profile).join("hearth-agent"))
            .find(|p| p.is_file())
            .expect("build the agent first: cargo build --release -p hearth-agent")
    }

    #[test]
    fn debian13_build_into_the_pool() {
        if std::env::var("HEARTH_E2E_IMAGE").as_deref() != Ok("1") {
            eprintln!("skipped: set HEARTH_E2E_IMAGE=1 to run the debootstrap build");
            return;
        }
        if !is_root() {
            return;
        }
        let dir = tempfile::Builder::new()
            .prefix("hearth-e2e-image-")
            .tempdir()
            .unwrap();
        let file = dir.path().join("pool.img");
        let mountpoint = dir.path().join("pool");
        let mut guard = PoolGuard {
            pool: None,
            file: file.clone(),
            mountpoint: mountpoint.clone(),
            dir: Some(dir),
        };
        let cfg = PoolConfig::loop_file(file, 4 << 30, mountpoint);
        guard.pool = Some(BtrfsPool::open(&cfg).unwrap());
        let pool = guard.pool.as_ref().unwrap();

        let agent = agent_bin();
        let unit = include_str!("../../guest-agent/hearth-agent.service");
        let spec = images::DebianSpec::debian13(agent.clone(), unit.to_string());
        let started = Instant::now();
        let progress = images::ConsoleProgress::new("build debian-13");
        let manifest = build_image(pool, "debian-13", &spec, &progress).unwrap();
        let build_secs = started.elapsed().as_secs_f64();

        let root = pool.image_path("debian-13");
        assert!(btrfs::is_readonly(&root).unwrap());
        assert_eq!(fs::metadata(root.join("etc/machine-id")).unwrap().len(), 0);
        assert!(!root.join("var/lib/dbus/machine-id").exists());
        assert!(!root.join("etc/resolv.conf").exists());
        assert!(!root.join("etc/apt/sources.list").exists());
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "localhost\n"
        );
        let sources =
            fs::read_to_string(root.join("etc/apt/sources.list.d/debian.sources")).unwrap();
        assert!(
            sources.contains("Suites: trixie trixie-updates"),
            "{sources}"
        );
        assert!(sources.contains("trixie-security"), "{sources}");
        assert!(
            sources.contains("Signed-By: /usr/share/keyrings/"),
            "{sources}"
        );

        let installed = root.join("usr/local/bin/hearth-agent");
        assert_eq!(fs::metadata(&installed).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(fs::read(&installed).unwrap(), fs::read(&agent).unwrap());
        assert_eq!(
            fs::read_to_string(root.join("etc/systemd/system/hearth-agent.service")).unwrap(),
            unit
        );
        assert_eq!(
            fs::read_link(
                root.join("etc/systemd/system/sysinit.target.wants/hearth-agent.service")
            )
            .unwrap(),
            Path::new("/etc/systemd/system/hearth-agent.service")
        );
        for masked in ["systemd-modules-load.service", "sys-kernel-debug.mount"] {
            let link = root.join("etc/systemd/system").join(masked);
            assert_eq!(
                fs::read_link(link).unwrap(),
                Path::new("/dev/null"),
                "{masked}"
            );
        }
        assert_eq!(
            fs::metadata(root.join("etc/hearth")).unwrap().mode() & 0o7777,
            0o700
        );
        let debs = fs::read_dir(root.join("var/cache/apt/archives"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".deb")
            })
            .count();
        assert_eq!(debs, 0);
        let info = images::read_image_info(&root).unwrap();
        assert_eq!(info.name, "debian-13");
        assert_eq!(info.created, manifest.created);
        for pkg in ["systemd ", "systemd-sysv ", "dbus ", "curl ", "iproute2 "] {
            assert!(
                manifest.packages.iter().any(|p| p.starts_with(pkg)),
                "{pkg}"
            );
        }
        assert!(manifest.sha256.is_none());
        let listed = pool.list_images().unwrap();
        assert_eq!(
            listed[0].created.as_deref(),
            Some(manifest.created.as_str())
        );

        // The template travels: export, import under another name, same tree.
        let archive = guard.dir.as_ref().unwrap().path().join("debian-13.tar.zst");
        let t = Instant::now();
        let exported = export_image(pool, "debian-13", &archive).unwrap();
        let export_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        import_image(pool, "copy", &archive).unwrap();
        let import_secs = t.elapsed().as_secs_f64();
        assert_same_tree(&root, &pool.image_path("copy"));

        eprintln!(
            "debian-13: build {build_secs:.1} s, rootfs {} MiB, {} packages; export {export_secs:.1} s \
             ({} MiB archive); import {import_secs:.1} s",
            manifest.rootfs_bytes >> 20,
            manifest.packages.len(),
            exported.size_bytes >> 20,
        );
    }
}
