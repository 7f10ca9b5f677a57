//! Starting as the guest's init, so the host can reach the guest within milliseconds of
//! the container starting instead of after systemd has booted far enough to start a unit
//! (measured here: ~30 ms against 185-360 ms).
//!
//! As PID 1 the agent forks: the child becomes the agent, the parent execs the real init
//! (systemd), which stays PID 1. The child records its pid so that the systemd unit,
//! when it starts later, can defer to it instead of fighting over the socket: the unit
//! waits for this early agent to exit and then exits itself, and `Restart=always` brings
//! up a systemd-supervised agent in its place. So the agent is supervised either way.

use anyhow::{bail, Context};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Where the early agent records its pid (inside the host-provided agent directory).
pub fn pid_file(socket_dir: &Path) -> std::path::PathBuf {
    socket_dir.join("agent.pid")
}

/// If this process is PID 1: fork, let the parent exec `init`, return in the child.
/// Must run before any thread exists (fork in a threaded process is unsafe).
pub fn become_early_agent(init: &[String], socket_dir: &Path) -> anyhow::Result<()> {
    if std::process::id() != 1 {
        bail!(
            "--init is only for PID 1 (this is pid {})",
            std::process::id()
        );
    }
    let init_argv: Vec<CString> = init
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .context("init argument with a NUL byte")?;
    if init_argv.is_empty() {
        bail!("--init needs the real init to exec");
    }
    let (ready_rd, ready_wr) = pipe()?;
    // SAFETY: single-threaded at this point (checked by the caller's ordering: this runs
    // before the runtime or any thread starts).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(ready_rd);
            // SAFETY: plain syscall in the child.
            unsafe { libc::setsid() };
            std::fs::create_dir_all(socket_dir).ok();
            let pid = std::process::id();
            std::fs::write(pid_file(socket_dir), format!("{pid}\n"))
                .context("write the early agent's pid file")?;
            let mut w = std::fs::File::from(ready_wr);
            let _ = w.write_all(b"1");
            Ok(())
        }
        _child => {
            drop(ready_wr);
            // Wait until the pid file exists, so the systemd unit can never miss it.
            let mut r = std::fs::File::from(ready_rd);
            let mut b = [0u8; 1];
            let _ = r.read(&mut b);
            let err = nix::unistd::execv(&init_argv[0], &init_argv);
            // exec only returns on failure; PID 1 must not exit, so say why loudly and
            // fall back to the usual init path.
            eprintln!("hearth-agent: exec {:?} failed: {err:?}", init[0]);
            let fallback = [c"/sbin/init".to_owned()];
            let err = nix::unistd::execv(&fallback[0], &fallback);
            bail!("exec /sbin/init failed too: {err:?}")
        }
    }
}

/// For the systemd unit: if an early agent is alive, wait until it exits and return
/// `true` (the unit then exits and systemd restarts it into a supervised agent).
pub fn defer_to_early_agent(socket_dir: &Path) -> anyhow::Result<bool> {
    let Ok(text) = std::fs::read_to_string(pid_file(socket_dir)) else {
        return Ok(false);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(false);
    };
    let is_agent = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .zip(std::env::current_exe().ok())
        .is_some_and(|(theirs, ours)| theirs == ours);
    if pid == std::process::id() as i32 || !is_agent {
        let _ = std::fs::remove_file(pid_file(socket_dir));
        return Ok(false);
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Ok(false); // Gone already.
    }
    // SAFETY: the descriptor was just returned to us and nobody else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    tracing::info!("an early agent (pid {pid}) serves the socket; waiting for it to exit");
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc > 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("wait for the early agent");
        }
    }
    let _ = std::fs::remove_file(pid_file(socket_dir));
    Ok(true)
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
