//! The btrfs pool on a real (small, loop-mounted) btrfs file system. Needs root; skipped
//! with a message otherwise. Every test builds its own pool in a temp dir and a guard
//! unmounts it, detaches the loop device and removes the dir even when the test fails.

use hearth_host::pool::{
    btrfs, export_image, import_image, loopfile, BtrfsPool, PoolConfig, PoolError, Storage,
};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const POOL_SIZE: u64 = 1 << 30;

struct TestPool {
    pool: Option<BtrfsPool>,
    cfg: PoolConfig,
    file: PathBuf,
    mountpoint: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl TestPool {
    /// `None` (and a note on stderr) when not root.
    fn new() -> Option<TestPool> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the pool tests need root");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("hearth-pool-test-")
            .tempdir()
            .expect("temp dir");
        let file = dir.path().join("pool.img");
        let mountpoint = dir.path().join("pool");
        let cfg = PoolConfig::loop_file(file.clone(), POOL_SIZE, mountpoint.clone());
        // The guard exists before the pool is opened, so a half-done open is cleaned up.
        let mut t = TestPool {
            pool: None,
            cfg,
            file,
            mountpoint,
            dir: Some(dir),
        };
        t.pool = Some(BtrfsPool::open(&t.cfg).expect("open pool"));
        Some(t)
    }

    fn pool(&self) -> &BtrfsPool {
        self.pool.as_ref().expect("pool is open")
    }

    fn reopen(&mut self) {
        self.pool = None;
        self.pool = Some(BtrfsPool::open(&self.cfg).expect("reopen pool"));
    }

    fn mounts_at_mountpoint(&self) -> usize {
        let mp = self.mountpoint.canonicalize().unwrap();
        hearth_host::pool::hearth_images::mounts::mount_table()
            .unwrap()
            .iter()
            .filter(|m| m.mount_point == mp)
            .count()
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        self.pool = None;
        // Sweep anything a test mounted inside the pool, then the pool itself.
        let _ = hearth_host::pool::hearth_images::mounts::unmount_below(&self.mountpoint);
        match loopfile::teardown(&self.file, &self.mountpoint) {
            Ok(()) => drop(self.dir.take()),
            Err(e) => {
                // Removing the dir now would recurse into the still-mounted pool.
                let kept = self.dir.take().map(|d| d.keep());
                eprintln!("could not tear down the test pool ({e}); left {kept:?}");
            }
        }
    }
}

/// A few files shaped like a rootfs, with an image.json like a real build writes.
fn fake_rootfs(root: &Path, marker: &str) {
    fs::create_dir_all(root.join("etc/hearth")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("etc/hostname"), "localhost\n").unwrap();
    fs::write(root.join("etc/marker"), marker).unwrap();
    fs::write(
        root.join("etc/hearth/image.json"),
        format!(r#"{{"name":"{marker}","created":"2025-06-01T12:00:00Z"}}"#),
    )
    .unwrap();
    fs::write(root.join("usr/bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("usr/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
}

fn committed_image(pool: &BtrfsPool, name: &str, marker: &str) {
    let tmp = pool.begin_image(name).unwrap();
    fake_rootfs(&tmp, marker);
    pool.commit_image(&tmp, name).unwrap();
}

fn pending_entries(pool: &BtrfsPool) -> Vec<String> {
    fs::read_dir(pool.root().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn subvolume_primitives() {
    let Some(t) = TestPool::new() else { return };
    let root = t.pool().root().to_path_buf();
    assert_eq!(t.pool().info().driver, "btrfs");
    assert!(
        btrfs::is_subvolume(&root).unwrap(),
        "the top level is a subvolume"
    );

    let a = root.join("a");
    btrfs::create_subvolume(&a).unwrap();
    assert!(btrfs::is_subvolume(&a).unwrap());
    assert!(!btrfs::is_readonly(&a).unwrap());
    fs::write(a.join("f"), "one").unwrap();
    fs::create_dir(root.join("plain")).unwrap();
    assert!(!btrfs::is_subvolume(&root.join("plain")).unwrap());
    assert!(!btrfs::is_subvolume(&a.join("f")).unwrap());

    let ro = root.join("a-ro");
    btrfs::snapshot(&a, &ro, true).unwrap();
    assert!(btrfs::is_readonly(&ro).unwrap());
    assert_eq!(fs::read_to_string(ro.join("f")).unwrap(), "one");
    let err = fs::write(ro.join("g"), "x").unwrap_err();
    assert_eq!(errno(&err), libc::EROFS);

    btrfs::set_readonly(&ro, false).unwrap();
    fs::write(ro.join("g"), "x").unwrap();
    btrfs::set_readonly(&ro, true).unwrap();

    let rw = root.join("a-rw");
    btrfs::snapshot(&ro, &rw, false).unwrap();
    assert!(!btrfs::is_readonly(&rw).unwrap());
    fs::write(rw.join("f"), "changed").unwrap();
    assert_eq!(fs::read_to_string(a.join("f")).unwrap(), "one");

    // Existing destination, missing source, non-subvolume source: errors naming paths.
    let err = btrfs::snapshot(&a, &rw, false).unwrap_err();
    assert!(err.to_string().contains("a-rw"), "{err}");
    assert!(btrfs::snapshot(&root.join("missing"), &root.join("x"), false).is_err());
    assert!(btrfs::snapshot(&root.join("plain"), &root.join("x"), false).is_err());

    // A read-only subvolume deletes directly.
    btrfs::delete_subvolume(&ro).unwrap();
    assert!(!ro.exists());

    // Nested subvolumes (systemd-tmpfiles makes /var/lib/machines one) inside a
    // read-only parent are found and deleted first.
    btrfs::create_subvolume(&rw.join("nested")).unwrap();
    fs::create_dir_all(rw.join("deep/er")).unwrap();
    btrfs::create_subvolume(&rw.join("deep/er/nested2")).unwrap();
    btrfs::create_subvolume(&rw.join("nested/inner")).unwrap();
    btrfs::set_readonly(&rw, true).unwrap();
    btrfs::delete_subvolume(&rw).unwrap();
    assert!(!rw.exists());

    btrfs::delete_subvolume(&a).unwrap();
    let err = btrfs::delete_subvolume(&a).unwrap_err();
    assert_eq!(err.errno(), Some(nix::errno::Errno::ENOENT), "{err}");
}

#[test]
fn image_begin_commit_replace_abort_delete() {
    let Some(t) = TestPool::new() else { return };
    let pool = t.pool();

    let tmp = pool.begin_image("base").unwrap();
    assert!(tmp.starts_with(pool.root().join("images")));
    assert!(tmp
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(".tmp-base-"));
    assert!(btrfs::is_subvolume(&tmp).unwrap());
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "starts empty");
    fake_rootfs(&tmp, "first");
    pool.commit_image(&tmp, "base").unwrap();
    assert!(!tmp.exists());

    let path = pool.image_path("base");
    assert!(btrfs::is_readonly(&path).unwrap());
    assert_eq!(
        fs::read_to_string(path.join("etc/marker")).unwrap(),
        "first"
    );
    let list = pool.list_images().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "base");
    assert!(list[0].read_only);
    assert_eq!(list[0].created.as_deref(), Some("2025-06-01T12:00:00Z"));

    // A container made from the old image keeps it across a replace.
    pool.create_rootfs("base", "keeps-old").unwrap();

    // Replacing swaps atomically and removes the old copy.
    committed_image(pool, "base", "second");
    assert_eq!(
        fs::read_to_string(path.join("etc/marker")).unwrap(),
        "second"
    );
    assert!(btrfs::is_readonly(&path).unwrap());
    assert!(
        pending_entries(pool).is_empty(),
        "{:?}",
        pending_entries(pool)
    );
    assert_eq!(
        fs::read_to_string(pool.rootfs("keeps-old").join("etc/marker")).unwrap(),
        "first"
    );

    // Abort removes everything, including what was written.
    let tmp = pool.begin_image("other").unwrap();
    fake_rootfs(&tmp, "x");
    pool.abort_image(&tmp).unwrap();
    assert!(!tmp.exists());
    assert!(!pool.image_path("other").exists());

    // Only pending images of this pool can be committed or aborted.
    let err = pool
        .commit_image(&pool.image_path("base"), "stolen")
        .unwrap_err();
    assert!(matches!(err, PoolError::NotPending { .. }), "{err}");
    let err = pool.abort_image(Path::new("/etc")).unwrap_err();
    assert!(matches!(err, PoolError::NotPending { .. }), "{err}");
    assert!(Path::new("/etc/hostname").exists());

    pool.delete_image("base").unwrap();
    assert!(!path.exists());
    assert!(pool.delete_image("base").unwrap_err().is_not_found());
    assert!(pool.list_images().unwrap().is_empty());
}

#[test]
fn container_rootfs_is_a_writable_copy() {
    let Some(t) = TestPool::new() else { return };
    let pool = t.pool();
    committed_image(pool, "base", "img");

    let rootfs = pool.create_rootfs("base", "c1").unwrap();
    assert_eq!(rootfs, pool.rootfs("c1"));
    assert_eq!(rootfs, pool.root().join("containers/c1/rootfs"));
    assert!(btrfs::is_subvolume(&rootfs).unwrap());
    assert!(!btrfs::is_readonly(&rootfs).unwrap());

    fs::write(rootfs.join("etc/marker"), "changed").unwrap();
    fs::write(rootfs.join("new-file"), "new").unwrap();
    fs::remove_file(rootfs.join("usr/bin/tool")).unwrap();
    let image = pool.image_path("base");
    assert_eq!(fs::read_to_string(image.join("etc/marker")).unwrap(), "img");
    assert!(!image.join("new-file").exists());
    assert!(image.join("usr/bin/tool").exists());

    let err = pool.create_rootfs("base", "c1").unwrap_err();
    assert!(matches!(err, PoolError::AlreadyExists { .. }), "{err}");
    let err = pool.create_rootfs("missing", "c2").unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(!pool.root().join("containers/c2").exists());

    pool.create_rootfs("base", "c3").unwrap();
    // As systemd-tmpfiles does on btrfs: a subvolume inside the guest's rootfs.
    btrfs::create_subvolume(&pool.rootfs("c3").join("machines")).unwrap();
    assert_eq!(pool.container_ids().unwrap(), vec!["c1", "c3"]);

    pool.delete_container("c1").unwrap();
    pool.delete_container("c1").unwrap();
    pool.delete_container("c3").unwrap();
    pool.delete_container("never-existed").unwrap();
    assert!(pool.container_ids().unwrap().is_empty());
    assert!(!pool.root().join("containers/c1").exists());

    // The floor the benchmarks measure against.
    let dst = pool.root().join("raw");
    pool.raw_snapshot(&image, &dst, true).unwrap();
    assert!(btrfs::is_readonly(&dst).unwrap());
}

#[test]
fn reopen_removes_leftovers_but_not_live_builds() {
    let Some(mut t) = TestPool::new() else { return };
    let images = t.pool().root().join("images");

    // What a killed build leaves: a subvolume with debootstrap's /proc still mounted in
    // it, and a plain directory.
    let crashed = images.join(".tmp-base-deadbeef");
    btrfs::create_subvolume(&crashed).unwrap();
    fs::create_dir_all(crashed.join("proc")).unwrap();
    fs::write(crashed.join("file"), "x").unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(crashed.join("proc"))
        .status()
        .unwrap();
    assert!(status.success());
    fs::create_dir_all(images.join(".tmp-plain-1/sub")).unwrap();

    // A build this process is running right now must survive another open.
    let live = t.pool().begin_image("live").unwrap();
    fs::write(live.join("x"), "x").unwrap();
    let second = BtrfsPool::open(&t.cfg).unwrap();
    assert_eq!(t.mounts_at_mountpoint(), 1, "open is idempotent");
    assert!(!crashed.exists());
    assert!(!images.join(".tmp-plain-1").exists());
    assert!(live.exists());
    drop(second);
    t.pool().commit_image(&live, "live").unwrap();

    // The same pending image without its live lock is a leftover.
    let orphan = t.pool().begin_image("orphan").unwrap();
    t.reopen();
    assert!(!orphan.exists());
    assert_eq!(pending_entries(t.pool()), Vec::<String>::new());
    assert_eq!(t.pool().list_images().unwrap().len(), 1);
}

#[test]
fn pool_file_is_mounted_again_after_unmount() {
    let Some(mut t) = TestPool::new() else { return };
    committed_image(t.pool(), "base", "kept");
    t.pool = None;
    loopfile::teardown(&t.file, &t.mountpoint).unwrap();
    assert_eq!(t.mounts_at_mountpoint(), 0);

    // As after a reboot: the file is there, nothing is mounted.
    t.reopen();
    assert_eq!(t.mounts_at_mountpoint(), 1);
    let image = t.pool().image_path("base");
    assert_eq!(
        fs::read_to_string(image.join("etc/marker")).unwrap(),
        "kept"
    );
    assert!(btrfs::is_readonly(&image).unwrap());
}

#[test]
fn existing_pool_must_be_btrfs() {
    let Some(t) = TestPool::new() else { return };
    let on_btrfs = t.pool().root().join("nested-pool");
    let pool = BtrfsPool::open(&PoolConfig::existing(on_btrfs.clone())).unwrap();
    assert_eq!(pool.root(), on_btrfs);
    assert!(on_btrfs.join("images").is_dir() && on_btrfs.join("containers").is_dir());
    committed_image(&pool, "x", "x");
    drop(pool);

    let elsewhere = t.dir.as_ref().unwrap().path().join("not-btrfs");
    fs::create_dir(&elsewhere).unwrap();
    if btrfs::is_btrfs(&elsewhere).unwrap() {
        eprintln!("the temp dir is on btrfs: cannot test the non-btrfs case here");
        return;
    }
    let err = BtrfsPool::open(&PoolConfig::existing(elsewhere)).unwrap_err();
    assert!(matches!(err, PoolError::NotBtrfs { .. }), "{err}");
}

#[test]
fn invalid_names_are_rejected_before_touching_the_pool() {
    let Some(t) = TestPool::new() else { return };
    let pool = t.pool();
    committed_image(pool, "base", "x");
    for bad in [
        "",
        "..",
        "../etc",
        "a/b",
        ".tmp-x",
        "Upper",
        "-x",
        "a_b",
        &"x".repeat(64),
    ] {
        let invalid = |r: Result<_, PoolError>| matches!(r, Err(PoolError::InvalidName { .. }));
        assert!(invalid(pool.begin_image(bad).map(drop)), "{bad:?}");
        assert!(invalid(pool.delete_image(bad)), "{bad:?}");
        assert!(invalid(pool.create_rootfs(bad, "c").map(drop)), "{bad:?}");
        assert!(
            invalid(pool.create_rootfs("base", bad).map(drop)),
            "{bad:?}"
        );
        assert!(invalid(pool.delete_container(bad)), "{bad:?}");
        let tmp = pool.begin_image("ok").unwrap();
        assert!(invalid(pool.commit_image(&tmp, bad)), "{bad:?}");
        pool.abort_image(&tmp).unwrap();
    }
    assert!(pool.image_path("base").exists());
    assert!(pool.container_ids().unwrap().is_empty());
    assert!(pending_entries(pool).is_empty());
}

#[test]
fn images_move_between_pools_as_verified_archives() {
    let Some(t) = TestPool::new() else { return };
    let pool = t.pool();
    committed_image(pool, "base", "travels");
    let out = t.dir.as_ref().unwrap().path().join("base.tar.zst");

    let exported = export_image(pool, "base", &out).unwrap();
    assert_eq!(exported.name, "base");
    assert!(exported.sha256.is_some());
    assert!(export_image(pool, "missing", &out)
        .unwrap_err()
        .is_not_found());

    let imported = import_image(pool, "copy", &out).unwrap();
    assert_eq!(imported, exported);
    let copy = pool.image_path("copy");
    assert!(btrfs::is_readonly(&copy).unwrap());
    assert_eq!(
        fs::read_to_string(copy.join("etc/marker")).unwrap(),
        "travels"
    );

    // A corrupt archive fails the import and leaves neither the name nor a pending image.
    let mut bytes = fs::read(&out).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&out, bytes).unwrap();
    let err = import_image(pool, "broken", &out).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(!pool.image_path("broken").exists());
    assert!(pending_entries(pool).is_empty());
}
