//! Running processes: spawn, stream output, feed stdin, signal, resize, reap.
//!
//! Every process leads its own process group (its own session with a PTY), so a signal,
//! a timeout or a vanished client reaches everything it started. A process whose client
//! disconnects is killed unless it was started `detached`; either way it is reaped.

use crate::pty::{self, PtyMaster};
use crate::rpc::EventSink;
use hearth_protocol::exec::{ExecRequest, ExitStatus, StdioMode, WinSize};
use hearth_protocol::{Conn, Error, ErrorKind, Event};
use std::collections::HashMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{oneshot, watch};
use tokio::time::{timeout, Instant};

const OUTPUT_CHUNK: usize = 64 * 1024;
/// After the process exits, output still in the pipe is read until the pipe stays quiet
/// this long. A background process that inherited the pipe would otherwise hold the
/// exec open forever (kata#1160).
const DRAIN_QUIET: Duration = Duration::from_millis(25);
/// How long a `StdioMode::Stream` exec waits for its stream to be attached.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The processes this agent is running, by exec id.
#[derive(Default)]
pub struct Execs {
    next_id: AtomicU64,
    table: Mutex<HashMap<u64, Arc<Entry>>>,
}

struct Entry {
    pid: i32,
    stdin: tokio::sync::Mutex<Option<StdinSink>>,
    pty: Option<Arc<PtyMaster>>,
    attach: Mutex<Option<oneshot::Sender<Attached>>>,
}

enum StdinSink {
    Pipe(ChildStdin),
    Pty(Arc<PtyMaster>),
}

/// A raw stream handed to a `StdioMode::Stream` exec, with any bytes already read ahead.
pub struct Attached {
    pub conn: Conn,
    pub leftover: Vec<u8>,
}

impl Execs {
    fn get(&self, exec_id: u64) -> Result<Arc<Entry>, Error> {
        // A poisoned lock only means another handler panicked; the map is still valid.
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(&exec_id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no running exec {exec_id}")))
    }

    fn insert(&self, entry: Entry) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.insert(id, Arc::new(entry));
        id
    }

    fn remove(&self, exec_id: u64) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.remove(&exec_id);
    }

    pub fn running(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub async fn input(&self, exec_id: u64, data: &[u8]) -> Result<(), Error> {
        let entry = self.get(exec_id)?;
        let mut stdin = entry.stdin.lock().await;
        let res = match stdin.as_mut() {
            Some(StdinSink::Pipe(p)) => p.write_all(data).await,
            Some(StdinSink::Pty(m)) => m.write_all(data).await,
            None => return Err(Error::invalid(format!("stdin of exec {exec_id} is closed"))),
        };
        res.map_err(|e| Error::from_io(&e, format!("stdin of exec {exec_id}")))
    }

    pub async fn close_stdin(&self, exec_id: u64) -> Result<(), Error> {
        let entry = self.get(exec_id)?;
        let mut stdin = entry.stdin.lock().await;
        match stdin.take() {
            // A terminal has no half-close: end-of-file is the VEOF character.
            Some(StdinSink::Pty(m)) => m
                .write_all(&[0x04])
                .await
                .map_err(|e| Error::from_io(&e, format!("stdin of exec {exec_id}"))),
            Some(StdinSink::Pipe(_)) | None => Ok(()),
        }
    }

    pub fn signal(&self, exec_id: u64, signal: i32, group: bool) -> Result<(), Error> {
        let entry = self.get(exec_id)?;
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| Error::invalid(format!("unknown signal {signal}")))?;
        let target = nix::unistd::Pid::from_raw(if group { -entry.pid } else { entry.pid });
        nix::sys::signal::kill(target, sig)
            .map_err(|e| Error::from_io(&e.into(), format!("signal exec {exec_id}")))
    }

    pub fn resize(&self, exec_id: u64, size: WinSize) -> Result<(), Error> {
        let entry = self.get(exec_id)?;
        let pty = entry
            .pty
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("exec {exec_id} has no terminal")))?;
        pty.resize(size)
            .map_err(|e| Error::from_io(&e, format!("resize exec {exec_id}")))
    }

    /// Hands a raw stream to a `StdioMode::Stream` exec.
    pub fn attach(&self, exec_id: u64, attached: Attached) -> Result<(), Error> {
        let entry = self.get(exec_id)?;
        let tx = entry
            .attach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Busy,
                    format!("exec {exec_id} has no stdio stream waiting to be attached"),
                )
            })?;
        tx.send(attached)
            .map_err(|_| Error::not_found(format!("exec {exec_id} has finished")))
    }

    /// Checks that `exec_id` can take a stream, before the server answers `Opened`.
    pub fn can_attach(&self, exec_id: u64) -> Result<(), Error> {
        let entry = self.get(exec_id)?;
        let waiting = entry
            .attach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if waiting {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Busy,
                format!("exec {exec_id} has no stdio stream waiting to be attached"),
            ))
        }
    }
}

/// A spawned process and everything that serves it. Dropping it before the process was
/// waited for (the request was aborted because its connection went away) kills the process
/// group unless it was detached, and hands the rest to a task that reaps the process,
/// keeps draining its output so it never dies of SIGPIPE, and unregisters it.
struct Running {
    child: Option<Child>,
    pgid: i32,
    detached: bool,
    pumps: tokio::task::JoinSet<()>,
    exited: watch::Sender<bool>,
    execs: Arc<Execs>,
    exec_id: u64,
}

impl Running {
    /// Marks the process exited and waits for its output to drain.
    async fn finish(&mut self) {
        let _ = self.exited.send(true);
        while self.pumps.join_next().await.is_some() {}
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            self.execs.remove(self.exec_id);
            return;
        };
        if !self.detached {
            kill_group(self.pgid);
        }
        let mut pumps = std::mem::take(&mut self.pumps);
        let exited = self.exited.clone();
        let (execs, exec_id) = (self.execs.clone(), self.exec_id);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = child.wait().await;
                    let _ = exited.send(true);
                    while pumps.join_next().await.is_some() {}
                    execs.remove(exec_id);
                });
            }
            // No runtime: the process is shutting down; nothing is left to reap for.
            Err(_) => execs.remove(exec_id),
        }
    }
}

fn kill_group(pgid: i32) {
    // ESRCH (already gone) is fine.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Who a process runs as. The agent's own identity is looked up once: most execs run as
/// the agent's user, and reading /etc/passwd and /etc/group on each would be most of the
/// cost of a short command.
#[derive(Clone)]
struct Identity {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    home: String,
    name: String,
    shell: String,
    /// The process must change user (and so cannot be started with `posix_spawn`).
    switch: bool,
}

fn identity(req: &ExecRequest) -> Result<Identity, Error> {
    static OWN: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    let me = nix::unistd::getuid().as_raw();
    if req.uid.is_none_or(|u| u == me) && req.gid.is_none() {
        if let Some(own) = OWN.get() {
            return Ok(own.clone());
        }
        let own = lookup(me, None, me)?;
        return Ok(OWN.get_or_init(|| own).clone());
    }
    lookup(req.uid.unwrap_or(me), req.gid, me)
}

fn lookup(uid: u32, gid: Option<u32>, me: u32) -> Result<Identity, Error> {
    let user = nix::unistd::User::from_uid(uid.into())
        .map_err(|e| Error::internal(format!("look up uid {uid}: {e}")))?;
    let gid = gid
        .or_else(|| user.as_ref().map(|u| u.gid.as_raw()))
        .unwrap_or(uid);
    let groups = match &user {
        Some(u) if me == 0 => {
            let name = std::ffi::CString::new(u.name.clone())
                .map_err(|_| Error::internal("user name with NUL"))?;
            nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![gid])
        }
        _ => vec![gid],
    };
    let own_gid = nix::unistd::getgid().as_raw();
    let switch = uid != me || gid != own_gid;
    Ok(match user {
        Some(u) => Identity {
            uid,
            gid,
            groups,
            home: u.dir.to_string_lossy().into_owned(),
            name: u.name,
            shell: u.shell.to_string_lossy().into_owned(),
            switch,
        },
        None => Identity {
            uid,
            gid,
            groups,
            home: "/".into(),
            name: uid.to_string(),
            shell: "/bin/sh".into(),
            switch,
        },
    })
}

/// Finds `prog` in `path` as execvp would. Resolving here (rather than in the child) lets
/// the standard library use `posix_spawn` instead of fork, and turns a missing program
/// into a clear `NotFound` naming the search path.
fn resolve_program(prog: &str, path: &str) -> Result<std::path::PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt;
    if prog.contains('/') {
        return Ok(prog.into());
    }
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = std::path::Path::new(dir).join(prog);
        if let Ok(md) = std::fs::metadata(&cand) {
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err(Error::not_found(format!(
        "{prog}: command not found in {path}"
    )))
}

fn build_command(
    req: &ExecRequest,
    id: &Identity,
    pty_slave: Option<&std::os::fd::OwnedFd>,
) -> Result<std::process::Command, Error> {
    let path = req
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let mut cmd = std::process::Command::new(resolve_program(&req.argv[0], path)?);
    cmd.arg0(&req.argv[0]).args(&req.argv[1..]).env_clear();
    cmd.env("PATH", DEFAULT_PATH)
        .env("HOME", &id.home)
        .env("USER", &id.name)
        .env("LOGNAME", &id.name)
        .env("SHELL", &id.shell)
        .env("LANG", "C.UTF-8");
    if pty_slave.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));

    let cwd = req.cwd.clone().unwrap_or_else(|| id.home.clone());
    let cwd = crate::files::guest_path(&cwd)?;
    if !cwd.is_dir() {
        return Err(Error::not_found(format!(
            "working directory {} does not exist",
            cwd.display()
        )));
    }
    cmd.current_dir(cwd);

    match pty_slave {
        Some(slave) => {
            let dup = |fd: &std::os::fd::OwnedFd| {
                fd.try_clone()
                    .map(Stdio::from)
                    .map_err(|e| Error::from_io(&e, "pty"))
            };
            cmd.stdin(dup(slave)?)
                .stdout(dup(slave)?)
                .stderr(dup(slave)?);
        }
        None => {
            cmd.stdin(match req.stdio {
                StdioMode::NullStdin => Stdio::null(),
                StdioMode::Events | StdioMode::Stream => Stdio::piped(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        }
    }

    let with_pty = pty_slave.is_some();
    if !with_pty && !id.switch {
        // The common case: no closure, so std can use posix_spawn (a vfork-style clone)
        // instead of copying the agent's page tables with fork.
        return Ok(cmd);
    }
    let switch = id.switch;
    let (uid, gid, groups) = (id.uid, id.gid, id.groups.clone());
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls on values captured before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if with_pty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0) {
                return Err(std::io::Error::last_os_error());
            }
            if switch
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs one exec request to completion. Dropping the future (the client went away) kills
/// the process group unless the request was `detached`.
pub async fn run(
    execs: &Arc<Execs>,
    req: ExecRequest,
    events: EventSink,
    mut cancel: oneshot::Receiver<()>,
) -> Result<ExitStatus, Error> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(Error::invalid("exec needs a program to run"));
    }
    if req.pty.is_some() && req.stdio == StdioMode::Stream {
        return Err(Error::invalid("a terminal exec cannot use stdio streams"));
    }
    let id = identity(&req)?;
    let pty = req
        .pty
        .map(pty::open)
        .transpose()
        .map_err(|e| Error::from_io(&e, "open pty"))?;
    let mut cmd = build_command(&req, &id, pty.as_ref().map(|p| &p.slave))?;
    let mut child =
        tokio::process::Command::from(std::mem::replace(&mut cmd, std::process::Command::new("/")))
            .spawn()
            .map_err(|e| Error::from_io(&e, &req.argv[0]))?;
    // A spawned child always has a pid until it is waited for.
    let pid = child.id().unwrap_or(0) as i32;

    let master = pty.map(|p| {
        drop(p.slave);
        Arc::new(p.master)
    });
    let (stdin_pipe, stdout, stderr) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let (stdin_sink, stream_stdin) = match (&master, req.stdio) {
        (Some(m), _) => (Some(StdinSink::Pty(m.clone())), None),
        (None, StdioMode::Events) => (stdin_pipe.map(StdinSink::Pipe), None),
        // Stream mode hands the pipe to the attached stream.
        (None, StdioMode::Stream) => (None, stdin_pipe),
        (None, StdioMode::NullStdin) => (None, None),
    };
    let (attach_tx, attach_rx) = oneshot::channel();
    let exec_id = execs.insert(Entry {
        pid,
        stdin: tokio::sync::Mutex::new(stdin_sink),
        pty: master.clone(),
        attach: Mutex::new((req.stdio == StdioMode::Stream).then_some(attach_tx)),
    });
    let (exited_tx, exited_rx) = watch::channel(false);
    let mut running = Running {
        child: Some(child),
        pgid: pid,
        detached: req.detached,
        pumps: tokio::task::JoinSet::new(),
        exited: exited_tx,
        execs: execs.clone(),
        exec_id,
    };
    // Started goes out before any output can.
    events
        .send(Event::Started {
            exec_id,
            pid: pid as u32,
        })
        .await;
    let pumps = &mut running.pumps;
    let spawn_pump = |pumps: &mut tokio::task::JoinSet<()>, src, make| {
        let mut sink = Sink::Events(events.clone(), make);
        let exited = exited_rx.clone();
        pumps.spawn(async move { pump(src, &mut sink, exited).await });
    };
    if let Some(m) = &master {
        spawn_pump(pumps, Source::Pty(m.clone()), Event::Stdout);
    }
    if let Some(err) = stderr {
        spawn_pump(pumps, Source::Pipe(Box::new(err)), Event::Stderr);
    }
    match (req.stdio, stdout) {
        (StdioMode::Stream, out) => {
            pumps.spawn(pipe_stream(attach_rx, stream_stdin, out, exited_rx.clone()));
        }
        (_, Some(out)) => spawn_pump(pumps, Source::Pipe(Box::new(out)), Event::Stdout),
        (_, None) => {}
    }

    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut cancelled = false;
    let status = loop {
        // `running` owns the child so that dropping this future still reaps it.
        let Some(child) = running.child.as_mut() else {
            return Err(Error::internal("child vanished"));
        };
        tokio::select! {
            st = child.wait() => break st,
            // Only a real Cancel counts: a dropped sender means the connection is going
            // away, and whether that kills the process is the detached flag's business.
            res = &mut cancel, if !cancelled => {
                cancelled = true;
                if res.is_ok() {
                    kill_group(pid);
                }
            }
            _ = sleep_until_opt(deadline), if deadline.is_some() && !timed_out => {
                timed_out = true;
                kill_group(pid);
            }
        }
    };
    running.child = None;
    let status = status.map_err(|e| Error::from_io(&e, "wait"))?;
    running.finish().await;
    Ok(ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out,
    })
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

enum Source {
    Pipe(Box<dyn AsyncRead + Unpin + Send>),
    Pty(Arc<PtyMaster>),
}

impl Source {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Pipe(p) => p.read(buf).await,
            Source::Pty(m) => m.read(buf).await,
        }
    }
}

enum Sink {
    Events(EventSink, fn(Vec<u8>) -> Event),
    Stream(WriteHalf<Conn>),
}

impl Sink {
    async fn write(&mut self, chunk: &[u8]) -> bool {
        match self {
            Sink::Events(events, make) => events.send(make(chunk.to_vec())).await,
            Sink::Stream(w) => w.write_all(chunk).await.is_ok(),
        }
    }
}

/// Copies output to `sink` until EOF. Once `exited` turns true, stops as soon as the
/// source stays quiet for [`DRAIN_QUIET`]: everything the process wrote is already in the
/// pipe by then, and a background process that inherited the pipe must not hold the exec
/// open forever (kata#1160).
async fn pump(mut src: Source, sink: &mut Sink, mut exited: watch::Receiver<bool>) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut draining = *exited.borrow();
    let mut discarding = false;
    loop {
        let read = if draining {
            match timeout(DRAIN_QUIET, src.read(&mut buf)).await {
                Ok(r) => r,
                Err(_quiet) => return,
            }
        } else {
            tokio::select! {
                r = src.read(&mut buf) => r,
                _ = exited.changed() => {
                    draining = true;
                    continue;
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // A gone client stops the copying, not the reading: a detached process
                // must not die of SIGPIPE because nobody listens any more.
                if !discarding && !sink.write(&buf[..n]).await {
                    discarding = true;
                }
            }
        }
    }
}

/// Connects a `StdioMode::Stream` exec to its attached stream: stream → stdin (closing
/// stdin at the client's half-close), stdout → stream (then half-close).
async fn pipe_stream(
    attach: oneshot::Receiver<Attached>,
    stdin: Option<ChildStdin>,
    stdout: Option<tokio::process::ChildStdout>,
    mut exited: watch::Receiver<bool>,
) {
    let Ok(Ok(Attached { conn, leftover })) = timeout(ATTACH_TIMEOUT, attach).await else {
        return;
    };
    let (mut rd, wr) = tokio::io::split(conn);
    let to_stdin = tokio::spawn(async move {
        if let Some(mut stdin) = stdin {
            if stdin.write_all(&leftover).await.is_ok() {
                let _ = copy_big(&mut rd, &mut stdin).await;
            }
        }
    });
    let mut sink = Sink::Stream(wr);
    if let Some(out) = stdout {
        pump(Source::Pipe(Box::new(out)), &mut sink, exited.clone()).await;
    }
    if let Sink::Stream(w) = &mut sink {
        let _ = w.shutdown().await;
    }
    // The process may still read stdin after closing stdout; stop feeding it only once
    // it has exited.
    while !*exited.borrow_and_update() {
        if exited.changed().await.is_err() {
            break;
        }
    }
    to_stdin.abort();
}

async fn copy_big<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}
