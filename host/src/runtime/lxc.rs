//! LXC system containers: unprivileged (a private uid/gid range per guest), an idmapped
//! rootfs (the template is never chowned), LXC's default seccomp policy, cgroup limits,
//! and the agent started as init for a fast first answer.

use super::liblxc::Container;
use super::{GuestSpec, RunState, Runtime, RuntimeError, RuntimeInfo};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The agent is the container's init: it forks itself off and execs systemd (see
/// guest-agent/src/init.rs), so the host can reach it ~30 ms after start.
const INIT_CMD: &str = "/usr/local/bin/hearth-agent --init /sbin/init";

pub struct LxcRuntime {
    /// LXC's "lxcpath": one directory per container holding its config and log.
    lxcpath: PathBuf,
    /// The binary that implements `forkstart` (hearthd itself).
    forkstart: PathBuf,
}

impl LxcRuntime {
    pub fn new(lxcpath: PathBuf, forkstart: PathBuf) -> Result<LxcRuntime, RuntimeError> {
        std::fs::create_dir_all(&lxcpath).map_err(|source| RuntimeError::Io {
            path: lxcpath.display().to_string(),
            source,
        })?;
        Ok(LxcRuntime { lxcpath, forkstart })
    }

    pub fn lxcpath(&self) -> &Path {
        &self.lxcpath
    }

    fn open(&self, name: &str) -> Result<Container, RuntimeError> {
        Ok(Container::open(name, &self.lxcpath)?)
    }

    fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.lxcpath.join(name).join("lxc.log")).unwrap_or_default();
        // liblxc repeats harmless cgroup teardown warnings; the cause is elsewhere.
        let lines: Vec<_> = text
            .lines()
            .filter(|l| !l.contains("cgfsng_monitor_destroy"))
            .rev()
            .take(8)
            .collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// Which cgroup hierarchy holds the controllers: keys differ between v1 and v2.
fn cgroup_v2() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
}

/// The LXC config for a guest, as text.
pub fn render_config(spec: &GuestSpec, lxcpath: &Path, v2: bool) -> String {
    let mut c = String::new();
    let mut kv = |k: &str, v: &str| {
        let _ = writeln!(c, "{k} = {v}");
    };
    kv("lxc.include", "/usr/share/lxc/config/common.conf");
    kv("lxc.include", "/usr/share/lxc/config/userns.conf");
    kv("lxc.arch", "linux64");
    kv("lxc.uts.name", &spec.hostname);
    kv("lxc.rootfs.path", &format!("dir:{}", spec.rootfs.display()));
    kv("lxc.rootfs.options", "idmap=container");
    let map = format!("0 {} {}", spec.idmap_base, spec.idmap_size);
    kv("lxc.idmap", &format!("u {map}"));
    kv("lxc.idmap", &format!("g {map}"));
    kv("lxc.mount.auto", "proc:mixed sys:mixed cgroup:mixed");
    // systemd would mount a fresh tmpfs over /run, hiding the agent's bind mount; an
    // existing /run mount makes it keep this one.
    kv(
        "lxc.mount.entry",
        "tmpfs run tmpfs rw,nosuid,nodev,mode=755,create=dir 0 0",
    );
    kv(
        "lxc.mount.entry",
        &format!(
            "{} run/hearth none bind,create=dir,idmap=container 0 0",
            spec.agent_dir.display()
        ),
    );
    kv("lxc.init.cmd", INIT_CMD);
    let l = &spec.limits;
    let period = 100_000u64;
    let quota = (l.cpus * period as f64).round().max(1000.0) as u64;
    if v2 {
        kv("lxc.cgroup2.memory.max", &l.memory_bytes.to_string());
        kv("lxc.cgroup2.cpu.max", &format!("{quota} {period}"));
        kv("lxc.cgroup2.pids.max", &l.pids.to_string());
    } else {
        kv(
            "lxc.cgroup.memory.limit_in_bytes",
            &l.memory_bytes.to_string(),
        );
        kv("lxc.cgroup.cpu.cfs_period_us", &period.to_string());
        kv("lxc.cgroup.cpu.cfs_quota_us", &quota.to_string());
        kv("lxc.cgroup.pids.max", &l.pids.to_string());
    }
    for (k, v) in &spec.net {
        kv(k, v);
    }
    kv(
        "lxc.log.file",
        &lxcpath
            .join(&spec.name)
            .join("lxc.log")
            .display()
            .to_string(),
    );
    kv("lxc.log.level", "WARN");
    c
}

impl Runtime for LxcRuntime {
    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: "lxc",
            shared_kernel: true,
        }
    }

    fn define(&self, spec: &GuestSpec) -> Result<(), RuntimeError> {
        let dir = self.lxcpath.join(&spec.name);
        let io = |path: &Path, source| RuntimeError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let text = render_config(spec, &self.lxcpath, cgroup_v2());
        // Write-then-rename: a crash never leaves a half-written config.
        let tmp = dir.join("config.tmp");
        std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
        let cfg = dir.join("config");
        std::fs::rename(&tmp, &cfg).map_err(|e| io(&cfg, e))
    }

    fn start(&self, name: &str) -> Result<(), RuntimeError> {
        // liblxc's start forks a monitor; doing that from a multi-threaded daemon is
        // unsafe, so a fresh single-threaded process of our own does it.
        let out = Command::new(&self.forkstart)
            .arg("forkstart")
            .arg(name)
            .arg(&self.lxcpath)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| RuntimeError::Io {
                path: self.forkstart.display().to_string(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(RuntimeError::Start(format!(
            "start {name}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            match self.log_tail(name) {
                t if t.is_empty() => String::new(),
                t => format!("\nlxc log:\n{t}"),
            }
        )))
    }

    fn stop(&self, name: &str, timeout_secs: i32) -> Result<(), RuntimeError> {
        let c = self.open(name)?;
        if !c.is_running() {
            return Ok(());
        }
        if c.shutdown(timeout_secs)? {
            return Ok(());
        }
        c.stop()?;
        Ok(())
    }

    fn kill(&self, name: &str) -> Result<(), RuntimeError> {
        let c = self.open(name)?;
        if c.is_running() {
            c.stop()?;
            c.wait("STOPPED", 10);
        }
        Ok(())
    }

    fn kill_begin(&self, name: &str) -> Result<(), RuntimeError> {
        // Not liblxc's stop(): it returns only when the monitor closes the command
        // connection, at the end of the teardown (50-110 ms for a booted systemd). The
        // init is signalled through a pidfd instead; the kernel kills the rest of the
        // pid namespace and the monitor tears down as it would after stop().
        let c = self.open(name)?;
        let Some(pid) = c.init_pid() else {
            return Ok(());
        };
        let io = |source| RuntimeError::Io {
            path: format!("init of {name} (pid {pid})"),
            source,
        };
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        // The pidfd holds a process now; it is the guest's init only if LXC still
        // says so (the pid may have been freed and reused in between).
        if c.init_pid() != Some(pid) {
            return Ok(());
        }
        match pidfd_kill(&pidfd) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(io(e)),
            _ => Ok(()),
        }
    }

    fn state(&self, name: &str) -> Result<RunState, RuntimeError> {
        if !self.lxcpath.join(name).join("config").exists() {
            return Ok(RunState::Missing);
        }
        let c = self.open(name)?;
        Ok(match c.state().as_str() {
            "RUNNING" => RunState::Running,
            "STOPPED" => RunState::Stopped,
            _ => RunState::Other,
        })
    }

    fn init_pid(&self, name: &str) -> Result<Option<i32>, RuntimeError> {
        Ok(self.open(name)?.init_pid())
    }

    fn undefine(&self, name: &str) -> Result<(), RuntimeError> {
        let dir = self.lxcpath.join(name);
        if !dir.exists() {
            remove_cgroups(name);
            return Ok(());
        }
        self.kill(name)?;
        remove_cgroups(name);
        // Not liblxc's destroy(): with a dir: rootfs it deletes the rootfs recursively,
        // and the rootfs belongs to the storage pool.
        std::fs::remove_dir_all(&dir).map_err(|source| RuntimeError::Io {
            path: dir.display().to_string(),
            source,
        })
    }

    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let rd = std::fs::read_dir(&self.lxcpath).map_err(|source| RuntimeError::Io {
            path: self.lxcpath.display().to_string(),
            source,
        })?;
        // Only definitions under this lxcpath. Cgroups are no guide: `lxc.payload.h-*`
        // names are machine-wide and say nothing of which node (a dev node, an
        // end-to-end test's node) a guest belongs to, so "unknown" ones found there
        // were another node's live guests. A guest's cgroups go with its definition
        // (`undefine`).
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("config").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// The cgroup directories liblxc made for `name` in every hierarchy. liblxc 5.0 often
/// fails to remove its monitor cgroup ("Device or resource busy" while the monitor is
/// still in it), so empty directories would pile up with every container.
pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let roots: Vec<PathBuf> = match std::fs::read_dir("/sys/fs/cgroup") {
        Ok(rd) => {
            let mut r: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            r.push("/sys/fs/cgroup".into());
            r
        }
        Err(_) => return out,
    };
    for root in roots {
        for kind in ["lxc.payload", "lxc.monitor"] {
            let d = root.join(format!("{kind}.{name}"));
            // Symlinked hierarchies (cpu -> cpu,cpuacct) would be visited twice.
            if d.is_dir() && !root.is_symlink() {
                out.push(d);
            }
        }
    }
    out
}

/// Removes a stopped container's cgroups, children first (systemd in the guest makes
/// its own). A cgroup that still has processes cannot be removed and is left alone.
fn remove_cgroups(name: &str) {
    fn rmdir_tree(d: &Path) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path());
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(d) {
            tracing::debug!("cgroup {} stays: {e}", d.display());
        }
    }
    for d in cgroup_dirs(name) {
        rmdir_tree(&d);
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_kill(pidfd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, SIGKILL, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The body of `hearthd forkstart NAME LXCPATH`: runs in a fresh, single-threaded process.
pub fn forkstart(name: &str, lxcpath: &Path) -> Result<(), RuntimeError> {
    let c = Container::open(name, lxcpath)?;
    if c.is_running() {
        return Ok(());
    }
    c.start()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Limits;

    fn spec() -> GuestSpec {
        GuestSpec {
            name: "h-abc".into(),
            hostname: "web".into(),
            rootfs: "/pool/containers/abc/rootfs".into(),
            idmap_base: 1_065_536,
            idmap_size: 65536,
            agent_dir: "/var/lib/hearth/agents/abc".into(),
            limits: Limits {
                memory_bytes: 1 << 30,
                cpus: 1.5,
                pids: 512,
            },
            net: vec![("lxc.net.0.type".into(), "veth".into())],
        }
    }

    #[test]
    fn config_maps_ids_limits_and_the_agent_dir() {
        let c = render_config(&spec(), Path::new("/var/lib/hearth/lxc"), false);
        assert!(c.contains("lxc.idmap = u 0 1065536 65536\n"));
        assert!(c.contains("lxc.idmap = g 0 1065536 65536\n"));
        assert!(c.contains("lxc.rootfs.options = idmap=container\n"));
        assert!(c.contains("lxc.cgroup.cpu.cfs_quota_us = 150000\n"));
        assert!(c.contains("lxc.cgroup.memory.limit_in_bytes = 1073741824\n"));
        assert!(c.contains("/var/lib/hearth/agents/abc run/hearth none bind"));
        assert!(c.contains("lxc.net.0.type = veth\n"));
        // The tmpfs over /run must come before the bind mount inside it.
        assert!(c.find("tmpfs run tmpfs").unwrap() < c.find("run/hearth").unwrap());
        let v2 = render_config(&spec(), Path::new("/l"), true);
        assert!(v2.contains("lxc.cgroup2.cpu.max = 150000 100000\n"));
    }
}
