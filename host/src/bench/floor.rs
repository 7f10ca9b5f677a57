//! The floors: the same kind of work as each agent benchmark, done with bare kernel
//! primitives between two real processes. The agent can never beat these, so the ratio
//! to them says how much the protocol, the runtimes and the agent add.
//!
//! Everything here is blocking std I/O on purpose: an async runtime on either side would
//! add its own wake-up costs to the very number meant to exclude them.

use anyhow::{bail, ensure, Context};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::placement::Placement;

/// Writes to the sink peer, and its read buffer: large enough that syscall overhead is
/// not what the floor measures, and the size the agent client copies with.
const CHUNK: usize = 1 << 20;

/// Size of one ping-pong message: a counter, so a reply can be checked against its ping.
const MSG: usize = 8;

/// How long a peer gets to connect or to exit before it is considered broken.
const PEER_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    Echo,
    Sink,
}

impl PeerMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerMode::Echo => "echo",
            PeerMode::Sink => "sink",
        }
    }

    pub fn parse(mode: &str) -> anyhow::Result<PeerMode> {
        match mode {
            "echo" => Ok(PeerMode::Echo),
            "sink" => Ok(PeerMode::Sink),
            other => bail!("unknown floor peer mode {other:?}: expected echo or sink"),
        }
    }
}

/// Runs the floor peer process: connects to the unix socket `socket` and, for mode "echo",
/// echoes 8-byte messages until EOF; for mode "sink", reads and discards until EOF then
/// writes the 8-byte little-endian count of bytes received back and exits.
pub fn run_floor_peer(mode: &str, socket: &Path) -> anyhow::Result<()> {
    let mode = PeerMode::parse(mode)?;
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    match mode {
        PeerMode::Echo => {
            let mut msg = [0u8; MSG];
            loop {
                match s.read_exact(&mut msg) {
                    Ok(()) => s.write_all(&msg).context("echo")?,
                    // The benchmark closes its side when it is done.
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e).context("read a ping"),
                }
            }
        }
        PeerMode::Sink => {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("read"),
                }
            }
            s.write_all(&total.to_le_bytes())
                .context("report the byte count")
        }
    }
}

/// A peer process connected to us. Dropping it kills the process by its PID, so a failed
/// measurement never leaves a peer behind.
struct Peer {
    child: Option<Child>,
    stream: UnixStream,
}

impl Peer {
    /// Starts `peer_cmd --mode M --socket S` and waits for it to connect to `socket`.
    fn start(
        peer_cmd: &[String],
        mode: PeerMode,
        socket: &Path,
        place: &Placement,
    ) -> anyhow::Result<Peer> {
        place.pin_client()?;
        let (prog, args) = peer_cmd
            .split_first()
            .context("the floor peer command is empty")?;
        let listener =
            UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
        // Non-blocking so that a peer that dies before connecting is noticed instead of
        // leaving accept() blocked forever.
        listener
            .set_nonblocking(true)
            .context("make the floor listener non-blocking")?;
        let mut child = Command::new(prog)
            .args(args)
            .arg("--mode")
            .arg(mode.as_str())
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            // Our stdout carries the benchmark's JSON; nothing else may land there.
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start the floor peer {}", peer_cmd.join(" ")))?;
        if let Err(e) = place.pin_server(child.id()) {
            kill(&mut child);
            return Err(e);
        }
        let deadline = Instant::now() + PEER_DEADLINE;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    kill(&mut child);
                    return Err(e).context("accept the floor peer");
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "the floor peer `{} --mode {}` exited with {status} before connecting",
                    peer_cmd.join(" "),
                    mode.as_str()
                );
            }
            if Instant::now() > deadline {
                kill(&mut child);
                bail!("the floor peer did not connect within {PEER_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let _ = std::fs::remove_file(socket);
        stream
            .set_nonblocking(false)
            .context("make the floor connection blocking")?;
        Ok(Peer {
            child: Some(child),
            stream,
        })
    }

    /// Waits for the peer to exit on its own (it does once it has seen EOF) and checks
    /// that it succeeded, so a peer error is not mistaken for a fast floor.
    fn finish(mut self) -> anyhow::Result<()> {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + PEER_DEADLINE;
        let status: ExitStatus = loop {
            if let Some(st) = child.try_wait().context("wait for the floor peer")? {
                break st;
            }
            if Instant::now() > deadline {
                kill(&mut child);
                bail!("the floor peer did not exit within {PEER_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        ensure!(status.success(), "the floor peer failed: {status}");
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill(child);
        }
    }
}

/// SIGKILL by PID (what `Child::kill` does), then reap so no zombie is left.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Round trips of an 8-byte message to an echo peer, in microseconds (unsorted).
pub fn echo_rtts_us(
    peer_cmd: &[String],
    socket: &Path,
    iters: usize,
    warmup: usize,
    place: &Placement,
) -> anyhow::Result<Vec<f64>> {
    let mut peer = Peer::start(peer_cmd, PeerMode::Echo, socket, place)?;
    let mut samples = Vec::with_capacity(iters);
    let mut reply = [0u8; MSG];
    for i in 0..warmup + iters {
        let msg = (i as u64).to_le_bytes();
        let t = Instant::now();
        peer.stream.write_all(&msg).context("send a ping")?;
        peer.stream
            .read_exact(&mut reply)
            .context("read the echo")?;
        let elapsed = t.elapsed();
        ensure!(reply == msg, "the echo peer answered {reply:?} to {msg:?}");
        if i >= warmup {
            samples.push(elapsed.as_secs_f64() * 1e6);
        }
    }
    peer.finish()?;
    Ok(samples)
}

/// Time to push `bytes` to a sink peer in 1 MiB writes, until the peer confirms it
/// received them all (so data still sitting in the socket buffer is not counted as sent).
pub fn uds_throughput(
    peer_cmd: &[String],
    socket: &Path,
    bytes: u64,
    place: &Placement,
) -> anyhow::Result<Duration> {
    let mut peer = Peer::start(peer_cmd, PeerMode::Sink, socket, place)?;
    let buf = vec![0x5au8; CHUNK];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        peer.stream
            .write_all(&buf[..n])
            .context("write to the sink peer")?;
        left -= n as u64;
    }
    peer.stream
        .shutdown(std::net::Shutdown::Write)
        .context("close the sink stream")?;
    let mut count = [0u8; 8];
    peer.stream
        .read_exact(&mut count)
        .context("read the sink peer's byte count")?;
    let elapsed = t.elapsed();
    let got = u64::from_le_bytes(count);
    ensure!(
        got == bytes,
        "the sink peer received {got} of {bytes} bytes"
    );
    peer.finish()?;
    Ok(elapsed)
}

/// Time to write `bytes` into a new file at `path` with plain 1 MiB `write`s from this
/// process, on the server's CPU: the page-cache copy that every write through the agent
/// also pays, and the raw socket floor does not. The file is removed afterwards.
pub fn file_write(path: &Path, bytes: u64, place: &Placement) -> anyhow::Result<Duration> {
    Placement {
        client: place.server,
        server: place.server,
    }
    .pin_client()?;
    let buf = vec![0x5au8; CHUNK];
    let t = Instant::now();
    let mut f =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        f.write_all(&buf[..n])
            .with_context(|| format!("write {}", path.display()))?;
        left -= n as u64;
    }
    drop(f);
    let elapsed = t.elapsed();
    std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
    Ok(elapsed)
}

/// Fork+exec+wait of `/bin/true` from this process, in milliseconds (unsorted): the least
/// any exec through the agent can cost.
pub fn spawn_true_ms(iters: usize, warmup: usize, place: &Placement) -> anyhow::Result<Vec<f64>> {
    place.pin_client()?;
    let mut samples = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t = Instant::now();
        let status = Command::new("/bin/true")
            .status()
            .context("run /bin/true")?;
        let elapsed = t.elapsed();
        ensure!(status.success(), "/bin/true failed: {status}");
        if i >= warmup {
            samples.push(elapsed.as_secs_f64() * 1e3);
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(name: &str) -> (std::path::PathBuf, UnixListener) {
        let path = std::env::temp_dir().join(format!(
            "hearth-floor-test-{}-{name}-{:08x}.sock",
            std::process::id(),
            rand::random::<u32>()
        ));
        let l = UnixListener::bind(&path).unwrap();
        (path, l)
    }

    #[test]
    fn echo_peer_echoes_until_eof() {
        let (path, l) = listen("echo");
        let p = path.clone();
        let peer = std::thread::spawn(move || run_floor_peer("echo", &p));
        let (mut s, _) = l.accept().unwrap();
        for i in 0u64..100 {
            s.write_all(&i.to_le_bytes()).unwrap();
            let mut r = [0u8; 8];
            s.read_exact(&mut r).unwrap();
            assert_eq!(u64::from_le_bytes(r), i);
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        peer.join().unwrap().unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn sink_peer_reports_its_byte_count() {
        let (path, l) = listen("sink");
        let p = path.clone();
        let peer = std::thread::spawn(move || run_floor_peer("sink", &p));
        let (mut s, _) = l.accept().unwrap();
        let data = vec![1u8; 3 * CHUNK + 17];
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut r = [0u8; 8];
        s.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_le_bytes(r), data.len() as u64);
        peer.join().unwrap().unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn rejects_unknown_modes() {
        assert!(run_floor_peer("flood", Path::new("/nonexistent")).is_err());
    }

    #[test]
    fn a_peer_that_never_connects_is_an_error() {
        let sock = std::env::temp_dir().join(format!(
            "hearth-floor-test-{}-false-{:08x}.sock",
            std::process::id(),
            rand::random::<u32>()
        ));
        let place = Placement::same_core().unwrap();
        let err = echo_rtts_us(&["/bin/false".into()], &sock, 1, 1, &place).unwrap_err();
        assert!(err.to_string().contains("before connecting"), "{err:#}");
        let _ = std::fs::remove_file(sock);
    }

    #[test]
    fn spawn_floor_runs() {
        let s = spawn_true_ms(3, 1, &Placement::same_core().unwrap()).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|&x| x > 0.0));
    }
}
