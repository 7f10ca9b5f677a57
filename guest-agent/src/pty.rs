//! The master side of a pseudo-terminal, driven by the async runtime.

use hearth_protocol::exec::WinSize;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

pub struct Pty {
    pub master: PtyMaster,
    /// Handed to the child as stdin, stdout and stderr; the parent drops its copy after
    /// spawning so that reads on the master end with EIO once the child side is gone.
    pub slave: OwnedFd,
}

pub fn open(size: WinSize) -> io::Result<Pty> {
    let ws = to_winsize(size);
    let pair = nix::pty::openpty(Some(&ws), None).map_err(io::Error::from)?;
    set_nonblocking(&pair.master)?;
    // SAFETY: `OwnedFd` keeps the descriptor open and unchanged for as long as the
    // `AsyncFd` owns it.
    let master = unsafe { AsyncFd::register(pair.master) }.map_err(io::Error::from)?;
    Ok(Pty {
        master: PtyMaster(master),
        slave: pair.slave,
    })
}

fn to_winsize(size: WinSize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

pub struct PtyMaster(AsyncFd<OwnedFd>);

impl PtyMaster {
    /// Reads output. `Ok(0)` once every process holding the terminal is gone (the kernel
    /// reports that as EIO on the master).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| {
                // SAFETY: reading into a valid, exclusively borrowed buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| {
                // SAFETY: writing from a valid buffer.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, size: WinSize) -> io::Result<()> {
        let ws = to_winsize(size);
        // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer we pass.
        if unsafe { libc::ioctl(self.0.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
