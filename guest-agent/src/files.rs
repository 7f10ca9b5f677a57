//! File operations on the guest's filesystem. Plain blocking functions: the RPC layer runs
//! them on the blocking pool, tests call them directly.
//!
//! Paths must be absolute. `..` is resolved lexically and cannot climb above `/`; the
//! agent runs as root inside the guest, so the guest's root is the boundary.

use hearth_protocol::files::{DirEntry, FileStat, FileType, WriteMode, WriteOptions};
use hearth_protocol::frame::MAX_CHUNK;
use hearth_protocol::Error;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;

/// Checks and normalises a client-supplied path.
pub fn guest_path(raw: &str) -> Result<PathBuf, Error> {
    if raw.contains('\0') {
        return Err(Error::invalid("path contains a NUL byte"));
    }
    if !raw.starts_with('/') {
        return Err(Error::invalid(format!("path must be absolute: {raw:?}")));
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(raw).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return Err(Error::invalid("unexpected path prefix")),
        }
    }
    Ok(out)
}

fn io_err(e: std::io::Error, p: &Path) -> Error {
    Error::from_io(&e, p.display())
}

pub fn to_stat(md: &fs::Metadata, path: &Path) -> FileStat {
    let ft = md.file_type();
    let file_type = if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    };
    let link_target = if ft.is_symlink() {
        fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    FileStat {
        file_type,
        size: md.len(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        link_target,
    }
}

pub fn stat(path: &str, follow: bool) -> Result<FileStat, Error> {
    let p = guest_path(path)?;
    let md = if follow {
        fs::metadata(&p)
    } else {
        fs::symlink_metadata(&p)
    }
    .map_err(|e| io_err(e, &p))?;
    Ok(to_stat(&md, &p))
}

/// Lists a directory, sorted by name. Entries that vanish while listing are skipped.
pub fn list_dir(path: &str) -> Result<Vec<DirEntry>, Error> {
    let p = guest_path(path)?;
    let mut out = Vec::new();
    for entry in fs::read_dir(&p).map_err(|e| io_err(e, &p))? {
        let entry = entry.map_err(|e| io_err(e, &p))?;
        let child = entry.path();
        let md = match fs::symlink_metadata(&child) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e, &child)),
        };
        out.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            stat: to_stat(&md, &child),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reads at most [`MAX_CHUNK`] bytes; bigger reads belong on a stream.
pub fn read_file(path: &str, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
    let p = guest_path(path)?;
    let mut f = File::open(&p).map_err(|e| io_err(e, &p))?;
    if f.metadata().map_err(|e| io_err(e, &p))?.is_dir() {
        return Err(Error::invalid(format!("{} is a directory", p.display())));
    }
    f.seek(SeekFrom::Start(offset)).map_err(|e| io_err(e, &p))?;
    let cap = len.min(MAX_CHUNK as u64) as usize;
    let mut buf = Vec::with_capacity(cap);
    f.take(cap as u64)
        .read_to_end(&mut buf)
        .map_err(|e| io_err(e, &p))?;
    Ok(buf)
}

/// A write in progress. `Truncate` and `CreateNew` write to a temporary file beside the
/// target and rename it into place on [`PendingWrite::commit`], so a failed or cut-off
/// write leaves the old file exactly as it was; dropping an uncommitted write removes the
/// temporary file. `Append` writes in place (it cannot be made atomic this way).
pub struct PendingWrite {
    pub file: File,
    /// The file the caller named (a final symlink resolved).
    pub path: PathBuf,
    tmp: Option<PathBuf>,
    noreplace: bool,
}

impl PendingWrite {
    /// Makes the written bytes visible under `path`.
    pub fn commit(mut self) -> Result<(), Error> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        let res = if self.noreplace {
            rename_noreplace(&tmp, &self.path)
        } else {
            fs::rename(&tmp, &self.path)
        };
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(e, &self.path));
        }
        Ok(())
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(std::io::Error::from)
}

/// Opens a write as `opts` asks. Shared by small writes and write streams.
pub fn open_for_write(path: &str, opts: &WriteOptions) -> Result<PendingWrite, Error> {
    let mut p = guest_path(path)?;
    if opts.create_parents {
        if let Some(parent) = p.parent() {
            mkdir_all(parent, DEFAULT_DIR_MODE)?;
        }
    }
    let existing = match fs::symlink_metadata(&p) {
        Ok(md) if md.file_type().is_symlink() => {
            // Write through a final symlink (think /etc/resolv.conf), as `>` would.
            p = fs::canonicalize(&p).map_err(|e| io_err(e, &p))?;
            fs::metadata(&p).ok()
        }
        Ok(md) => Some(md),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e, &p)),
    };
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Error::invalid(format!("{} is a directory", p.display())));
    }
    if opts.mode == WriteMode::Append {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(opts.perm.unwrap_or(DEFAULT_FILE_MODE))
            .open(&p)
            .map_err(|e| io_err(e, &p))?;
        return Ok(PendingWrite {
            file: f,
            path: p,
            tmp: None,
            noreplace: false,
        });
    }
    let noreplace = opts.mode == WriteMode::CreateNew;
    if noreplace && existing.is_some() {
        return Err(Error::new(
            hearth_protocol::ErrorKind::AlreadyExists,
            format!("{} already exists", p.display()),
        ));
    }
    // A replaced file keeps its permissions and owner unless the caller says otherwise.
    let perm = opts
        .perm
        .or(existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(DEFAULT_FILE_MODE);
    let (file, tmp) = create_temp_beside(&p, perm)?;
    let pending = PendingWrite {
        file,
        path: p,
        tmp: Some(tmp),
        noreplace,
    };
    if let Some(m) = &existing {
        let _ = std::os::unix::fs::fchown(&pending.file, Some(m.uid()), Some(m.gid()));
        // fchown may clear set-id bits; put the mode back.
        let _ = pending
            .file
            .set_permissions(fs::Permissions::from_mode(perm));
    }
    Ok(pending)
}

fn create_temp_beside(target: &Path, perm: u32) -> Result<(File, PathBuf), Error> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for attempt in 0u32..16 {
        let nonce: u64 = (std::process::id() as u64) << 32
            ^ u64::from(attempt)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64);
        let tmp = dir.join(format!(".{name}.hearth-{nonce:x}"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(perm)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(e, target)),
        }
    }
    Err(Error::internal(format!(
        "no free temporary name beside {}",
        target.display()
    )))
}

pub fn write_file(path: &str, data: &[u8], opts: &WriteOptions) -> Result<u64, Error> {
    let mut w = open_for_write(path, opts)?;
    w.file.write_all(data).map_err(|e| io_err(e, &w.path))?;
    w.commit()?;
    Ok(data.len() as u64)
}

fn mkdir_all(p: &Path, mode: u32) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .map_err(|e| io_err(e, p))
}

pub fn mkdir(path: &str, parents: bool, mode: Option<u32>) -> Result<(), Error> {
    let p = guest_path(path)?;
    let mode = mode.unwrap_or(DEFAULT_DIR_MODE);
    if parents {
        return mkdir_all(&p, mode);
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(&p)
        .map_err(|e| io_err(e, &p))
}

/// Removes a file, symlink or empty directory; a non-empty directory only with
/// `recursive`. Symlinks are removed, never followed.
pub fn remove(path: &str, recursive: bool) -> Result<(), Error> {
    let p = guest_path(path)?;
    if p == Path::new("/") {
        return Err(Error::new(
            hearth_protocol::ErrorKind::PermissionDenied,
            "refusing to remove /",
        ));
    }
    let md = fs::symlink_metadata(&p).map_err(|e| io_err(e, &p))?;
    let res = if md.is_dir() {
        if recursive {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_dir(&p)
        }
    } else {
        fs::remove_file(&p)
    };
    res.map_err(|e| io_err(e, &p))
}

pub fn rename(from: &str, to: &str) -> Result<(), Error> {
    let (f, t) = (guest_path(from)?, guest_path(to)?);
    fs::rename(&f, &t).map_err(|e| io_err(e, &f))
}

pub fn chmod(path: &str, mode: u32) -> Result<(), Error> {
    let p = guest_path(path)?;
    if mode & !0o7777 != 0 {
        return Err(Error::invalid(format!(
            "mode {mode:o} has bits beyond 7777"
        )));
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(|e| io_err(e, &p))
}

/// Changes owner without following a final symlink.
pub fn chown(path: &str, uid: Option<u32>, gid: Option<u32>) -> Result<(), Error> {
    let p = guest_path(path)?;
    std::os::unix::fs::lchown(&p, uid, gid).map_err(|e| io_err(e, &p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_protocol::ErrorKind;

    #[test]
    fn paths_are_absolute_and_cannot_climb_above_root() {
        assert_eq!(guest_path("/a/../../etc").unwrap(), Path::new("/etc"));
        assert_eq!(guest_path("/a/./b/").unwrap(), Path::new("/a/b"));
        assert_eq!(
            guest_path("etc/passwd").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            guest_path("/a\0b").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn write_read_list_rename_remove() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        let f = format!("{base}/sub/deep/f.txt");
        let opts = WriteOptions {
            create_parents: true,
            perm: Some(0o600),
            ..Default::default()
        };
        assert_eq!(write_file(&f, b"hello", &opts).unwrap(), 5);
        let append = WriteOptions {
            mode: WriteMode::Append,
            ..Default::default()
        };
        write_file(&f, b" world", &append).unwrap();
        assert_eq!(read_file(&f, 0, 100).unwrap(), b"hello world");
        assert_eq!(read_file(&f, 6, 3).unwrap(), b"wor");
        let st = stat(&f, true).unwrap();
        assert_eq!(
            (st.file_type, st.size, st.mode),
            (FileType::File, 11, 0o600)
        );
        let new = WriteOptions {
            mode: WriteMode::CreateNew,
            ..Default::default()
        };
        assert_eq!(
            write_file(&f, b"x", &new).unwrap_err().kind,
            ErrorKind::AlreadyExists
        );
        let names: Vec<_> = list_dir(&format!("{base}/sub/deep"))
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["f.txt"]);
        let g = format!("{base}/sub/g.txt");
        rename(&f, &g).unwrap();
        chmod(&g, 0o640).unwrap();
        assert_eq!(stat(&g, false).unwrap().mode, 0o640);
        assert_eq!(
            remove(&format!("{base}/sub"), false).unwrap_err().kind,
            ErrorKind::AlreadyExists
        );
        remove(&format!("{base}/sub"), true).unwrap();
        assert_eq!(stat(&g, false).unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn replacing_is_atomic_and_keeps_mode_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let f = format!("{}/conf", dir.path().display());
        fs::write(&f, b"old").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();

        // An uncommitted write (the transfer failed) leaves the old file and no litter.
        let mut w = open_for_write(&f, &WriteOptions::default()).unwrap();
        w.file.write_all(b"half").unwrap();
        drop(w);
        assert_eq!(fs::read(&f).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        write_file(&f, b"new", &WriteOptions::default()).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"new");
        assert_eq!(stat(&f, false).unwrap().mode, 0o640);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn writes_go_through_a_final_symlink_and_refuse_directories() {
        let dir = tempfile::tempdir().unwrap();
        let real = format!("{}/real", dir.path().display());
        let link = format!("{}/link", dir.path().display());
        fs::write(&real, b"a").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_file(&link, b"through", &WriteOptions::default()).unwrap();
        assert_eq!(fs::read(&real).unwrap(), b"through");
        assert_eq!(stat(&link, false).unwrap().file_type, FileType::Symlink);
        let d = dir.path().to_str().unwrap();
        assert_eq!(
            write_file(d, b"x", &WriteOptions::default())
                .unwrap_err()
                .kind,
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn symlinks_are_reported_and_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        let target = format!("{base}/t");
        fs::create_dir(&target).unwrap();
        fs::write(format!("{target}/keep"), b"x").unwrap();
        let link = format!("{base}/l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let st = stat(&link, false).unwrap();
        assert_eq!(st.file_type, FileType::Symlink);
        assert_eq!(st.link_target.as_deref(), Some(target.as_str()));
        remove(&link, true).unwrap();
        assert!(Path::new(&format!("{target}/keep")).exists());
    }
}
