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

/// Opens a file for writing as `opts` asks. Shared by small writes and write streams.
pub fn open_for_write(path: &str, opts: &WriteOptions) -> Result<(File, PathBuf), Error> {
    let p = guest_path(path)?;
    if opts.create_parents {
        if let Some(parent) = p.parent() {
            mkdir_all(parent, DEFAULT_DIR_MODE)?;
        }
    }
    let mut oo = OpenOptions::new();
    oo.write(true).mode(opts.perm.unwrap_or(DEFAULT_FILE_MODE));
    match opts.mode {
        WriteMode::Truncate => oo.create(true).truncate(true),
        WriteMode::Append => oo.create(true).append(true),
        WriteMode::CreateNew => oo.create_new(true),
    };
    let f = oo.open(&p).map_err(|e| io_err(e, &p))?;
    Ok((f, p))
}

pub fn write_file(path: &str, data: &[u8], opts: &WriteOptions) -> Result<u64, Error> {
    let (mut f, p) = open_for_write(path, opts)?;
    f.write_all(data).map_err(|e| io_err(e, &p))?;
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
