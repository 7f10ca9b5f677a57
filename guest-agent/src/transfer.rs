//! Bulk file transfer over stream channels.
//!
//! The copy runs on a blocking thread with the socket in blocking mode: `sendfile` from
//! the page cache into the socket, and `splice` from the socket through a pipe into the
//! file, so the bytes are copied once in the kernel and never through user space.

use crate::files;
use hearth_protocol::channel::WriteOutcome;
use hearth_protocol::files::WriteOptions;
use hearth_protocol::{Conn, Error};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Largest single kernel copy; big enough to amortise syscalls, small enough to stay
/// responsive.
const CHUNK: usize = 1 << 20;

pub struct ReadFile {
    file: File,
    offset: u64,
    pub len: u64,
}

pub async fn open_read(path: String, offset: u64, len: Option<u64>) -> Result<ReadFile, Error> {
    blocking(move || {
        let p = files::guest_path(&path)?;
        let file = File::open(&p).map_err(|e| Error::from_io(&e, p.display()))?;
        let md = file
            .metadata()
            .map_err(|e| Error::from_io(&e, p.display()))?;
        if !md.is_file() {
            return Err(Error::invalid(format!(
                "{} is not a regular file",
                p.display()
            )));
        }
        let avail = md.len().saturating_sub(offset);
        Ok(ReadFile {
            file,
            offset,
            len: len.map_or(avail, |l| l.min(avail)),
        })
    })
    .await
}

pub struct WriteFile {
    w: files::PendingWrite,
    expected_len: Option<u64>,
}

pub async fn open_write(path: String, opts: WriteOptions) -> Result<WriteFile, Error> {
    blocking(move || {
        let w = files::open_for_write(&path, &opts)?;
        if let Some(len) = opts.expected_len.filter(|&n| n > 0) {
            reserve(&w.file, len).map_err(|e| Error::from_io(&e, w.path.display()))?;
        }
        Ok(WriteFile {
            w,
            expected_len: opts.expected_len,
        })
    })
    .await
}

/// Reserves `len` bytes after the current end of `file` without changing its size (so a
/// transfer cut short leaves the true length). Out of space is an error; a file system
/// that cannot preallocate is not.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    let start = file.metadata()?.len();
    let (Ok(start), Ok(len)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, start, len) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(()),
        _ => Err(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("worker failed: {e}"))))
}

/// Sends `file.len` bytes, then closes. A short stream tells the client something failed.
pub async fn send_file(conn: Conn, file: ReadFile) -> io::Result<()> {
    conn.set_bulk_send_buffer();
    let sock = conn.into_blocking_fd()?;
    tokio::task::spawn_blocking(move || send_file_blocking(&sock, file))
        .await
        .map_err(io::Error::other)?
}

fn send_file_blocking(sock: &OwnedFd, f: ReadFile) -> io::Result<()> {
    let mut off = f.offset as libc::off_t;
    let mut left = f.len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        // SAFETY: both descriptors are open for the duration of the call; `off` is ours.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), f.file.as_raw_fd(), &mut off, want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break; // The file shrank under us; the client sees a short stream.
        }
        left -= n as u64;
    }
    Ok(())
}

/// Writes everything the client sends until its half-close, then answers with a
/// [`WriteOutcome`] frame.
pub async fn receive_file(conn: Conn, buffered: Vec<u8>, f: WriteFile) -> io::Result<()> {
    // A `File` over the socket gives plain blocking read(2)/write(2).
    let sock = File::from(conn.into_blocking_fd()?);
    tokio::task::spawn_blocking(move || {
        let WriteFile { w, expected_len } = f;
        let outcome: WriteOutcome = receive_blocking(&sock, &buffered, &w.file)
            .map_err(|e| Error::from_io(&e, w.path.display()))
            .and_then(|n| match expected_len {
                Some(want) if want != n => Err(Error::invalid(format!(
                    "{}: expected {want} bytes, the stream ended after {n}; nothing was changed",
                    w.path.display()
                ))),
                _ => w.commit().map(|()| n),
            });
        if let Err(e) = &outcome {
            tracing::warn!("file write stream failed: {e}");
        }
        let frame = hearth_protocol::frame::encode(&outcome).map_err(io::Error::other)?;
        (&sock).write_all(&frame)
    })
    .await
    .map_err(io::Error::other)?
}

fn receive_blocking(mut sock: &File, buffered: &[u8], mut file: &File) -> io::Result<u64> {
    file.write_all(buffered)?;
    let mut total = buffered.len() as u64;
    match splice_all(sock.as_raw_fd(), file.as_raw_fd()) {
        Ok(n) => return Ok(total + n),
        // Some socket types cannot splice; copy through user space instead.
        Err(SpliceError::Unsupported) => {}
        Err(SpliceError::Io(e)) => return Err(e),
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        file.write_all(&buf[..n])?;
        total += n as u64;
    }
}

enum SpliceError {
    Unsupported,
    Io(io::Error),
}

/// socket → pipe → file, until EOF on the socket.
fn splice_all(sock: RawFd, file: RawFd) -> Result<u64, SpliceError> {
    let (rd, wr) = pipe().map_err(SpliceError::Io)?;
    // A bigger pipe means fewer round trips; failure just keeps the default size.
    // SAFETY: fcntl on a pipe we own.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    let mut total = 0u64;
    loop {
        // SAFETY: plain descriptors, null offsets (the socket and pipe have none).
        let n = unsafe {
            libc::splice(
                sock,
                std::ptr::null_mut(),
                wr.as_raw_fd(),
                std::ptr::null_mut(),
                CHUNK,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) if total == 0 => Err(SpliceError::Unsupported),
                _ => Err(SpliceError::Io(e)),
            };
        }
        if n == 0 {
            return Ok(total);
        }
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above; the file offset advances with its position.
            let m = unsafe {
                libc::splice(
                    rd.as_raw_fd(),
                    std::ptr::null_mut(),
                    file,
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(SpliceError::Io(e));
            }
            left -= m as usize;
        }
        total += n as u64;
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
