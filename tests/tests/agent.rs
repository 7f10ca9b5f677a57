//! The agent served in-process over a unix socket, driven through the host's client.
//! No root needed (a few checks that switch users run only as root).

use hearth_host::agents::{AgentError, ExecEvent};
use hearth_protocol::exec::{ExecRequest, StdioMode, WinSize};
use hearth_protocol::files::WriteOptions;
use hearth_protocol::frame::encode;
use hearth_protocol::handshake::{preamble, Hello, HelloReply, Refusal, MAGIC};
use hearth_protocol::{ErrorKind, Request, Response, Secret};
use hearth_tests::TestAgent;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_echo_returns_output_and_status() {
    let t = TestAgent::start().await;
    let c = t.client();
    let out = c.run(&["echo", "hello", "world"]).await.unwrap();
    assert_eq!(out.stdout, b"hello world\n");
    assert!(out.stderr.is_empty());
    assert!(out.status.unwrap().success());

    let out = c.run(&["sh", "-c", "echo err >&2; exit 3"]).await.unwrap();
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.unwrap().code, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reports_signals_timeouts_and_cancellation() {
    let t = TestAgent::start().await;
    let c = t.client();
    let out = c.run(&["sh", "-c", "kill -TERM $$"]).await.unwrap();
    let st = out.status.unwrap();
    assert_eq!((st.code, st.signal), (None, Some(libc::SIGTERM)));

    let s = c
        .exec(ExecRequest {
            argv: argv(&["sleep", "30"]),
            stdio: StdioMode::NullStdin,
            ..Default::default()
        })
        .await
        .unwrap();
    s.signal(libc::SIGUSR1, false).await.unwrap();
    let st = s.wait().await.unwrap().status.unwrap();
    assert_eq!(st.signal, Some(libc::SIGUSR1));

    let started = std::time::Instant::now();
    let out = c
        .exec(ExecRequest {
            argv: argv(&["sleep", "30"]),
            timeout_ms: Some(200),
            stdio: StdioMode::NullStdin,
            ..Default::default()
        })
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    let st = out.status.unwrap();
    assert!(st.timed_out);
    assert_eq!(st.signal, Some(libc::SIGKILL));
    assert!(started.elapsed() < Duration::from_secs(20));

    let s = c
        .exec(ExecRequest {
            argv: argv(&["sleep", "30"]),
            stdio: StdioMode::NullStdin,
            ..Default::default()
        })
        .await
        .unwrap();
    s.cancel().await.unwrap();
    let st = s.wait().await.unwrap().status.unwrap();
    assert_eq!(st.signal, Some(libc::SIGKILL));
    assert!(!st.timed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_round_trips_10_mib_of_stdin_as_events() {
    let t = TestAgent::start().await;
    let c = t.client();
    let mut s = c
        .exec(ExecRequest {
            argv: argv(&["cat"]),
            ..Default::default()
        })
        .await
        .unwrap();
    let data: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sent = Sha256::digest(&data);
    let exec_id = s.exec_id;
    let c2 = c.clone();
    let chunks: Vec<Vec<u8>> = data.chunks(128 * 1024).map(|c| c.to_vec()).collect();
    let writer = tokio::spawn(async move {
        let rpc = c2.rpc().await.unwrap();
        for chunk in chunks {
            rpc.call(Request::ExecInput {
                exec_id,
                data: chunk,
            })
            .await
            .unwrap();
        }
        rpc.call(Request::ExecCloseStdin { exec_id }).await.unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    let mut status = None;
    while let Some(ev) = s.next().await.unwrap() {
        match ev {
            ExecEvent::Stdout(b) => got.extend_from_slice(&b),
            ExecEvent::Stderr(b) => panic!("stderr: {}", String::from_utf8_lossy(&b)),
            ExecEvent::Exit(st) => status = Some(st),
        }
    }
    writer.await.unwrap();
    assert!(status.unwrap().success());
    assert_eq!(got.len(), data.len());
    assert_eq!(Sha256::digest(&got), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_round_trips_10_mib_over_a_stdio_stream() {
    let t = TestAgent::start().await;
    let c = t.client();
    let s = c
        .exec(ExecRequest {
            argv: argv(&["cat"]),
            stdio: StdioMode::Stream,
            ..Default::default()
        })
        .await
        .unwrap();
    let stream = c.exec_stdio(s.exec_id).await.unwrap();
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&to_send).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    drop(writer.await.unwrap());
    assert_eq!(got.len(), data.len());
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
    assert!(s.wait().await.unwrap().status.unwrap().success());

    // A second attach to the same exec is refused with a typed error.
    let s = c
        .exec(ExecRequest {
            argv: argv(&["cat"]),
            stdio: StdioMode::Stream,
            ..Default::default()
        })
        .await
        .unwrap();
    let first = c.exec_stdio(s.exec_id).await.unwrap();
    let err = c.exec_stdio(s.exec_id).await.err().unwrap();
    assert_eq!(err.kind(), Some(ErrorKind::Busy));
    drop(first);
    assert!(s.wait().await.unwrap().status.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_reports_its_size_after_a_resize() {
    let t = TestAgent::start().await;
    let c = t.client();
    let mut s = c
        .exec(ExecRequest {
            argv: argv(&["sh"]),
            pty: Some(WinSize { rows: 24, cols: 80 }),
            ..Default::default()
        })
        .await
        .unwrap();
    s.resize(WinSize {
        rows: 33,
        cols: 111,
    })
    .await
    .unwrap();
    s.write_stdin(b"stty size; tty; exit 7\n".to_vec())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut status = None;
    while let Some(ev) = s.next().await.unwrap() {
        match ev {
            ExecEvent::Stdout(b) => out.extend_from_slice(&b),
            ExecEvent::Stderr(_) => panic!("a terminal has no separate stderr"),
            ExecEvent::Exit(st) => status = Some(st),
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("33 111"), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert_eq!(status.unwrap().code, Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_rpcs_share_one_connection() {
    let t = TestAgent::start().await;
    let c = t.client();
    let rpc = c.rpc().await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let rpc = rpc.clone();
        tasks.spawn(async move {
            if i % 10 == 0 {
                // Slow ones in the mix must not hold up the fast ones.
                let r = rpc
                    .call(Request::Exec(ExecRequest {
                        argv: vec!["sh".into(), "-c".into(), format!("sleep 0.2; echo {i}")],
                        stdio: StdioMode::NullStdin,
                        ..Default::default()
                    }))
                    .await
                    .unwrap();
                assert!(matches!(r, Response::Exited(st) if st.success()));
            } else if i % 2 == 0 {
                assert!(matches!(
                    rpc.call(Request::Info).await.unwrap(),
                    Response::Info(_)
                ));
            } else {
                assert_eq!(rpc.call(Request::Ping).await.unwrap(), Response::Done);
            }
            i
        });
    }
    let mut seen = Vec::new();
    while let Some(r) = tasks.join_next().await {
        seen.push(r.unwrap());
    }
    seen.sort();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
    // Still one connection: the client did not dial more.
    assert!(Arc_ptr_eq(&rpc, &c.rpc().await.unwrap()));
}

#[allow(non_snake_case)]
fn Arc_ptr_eq<T>(a: &std::sync::Arc<T>, b: &std::sync::Arc<T>) -> bool {
    std::sync::Arc::ptr_eq(a, b)
}

/// An `AsyncRead` of `len` deterministic pseudo-random bytes, hashed as they are read.
struct Source {
    left: u64,
    state: u64,
    hash: Sha256,
}

impl tokio::io::AsyncRead for Source {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize & !7;
        let n = if n == 0 {
            self.left.min(buf.remaining() as u64) as usize
        } else {
            n
        };
        let mut chunk = vec![0u8; n];
        for word in chunk.chunks_mut(8) {
            // xorshift64: cheap, and different in every 8-byte word.
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        self.hash.update(&chunk);
        buf.put_slice(&chunk);
        self.left -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Hashes everything written to it.
struct HashSink(Sha256, u64);

impl tokio::io::AsyncWrite for HashSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_through_streams_keeps_its_checksum() {
    const LEN: u64 = 1 << 30;
    let t = TestAgent::start().await;
    let c = t.client();
    let path = t.path("big.bin");
    let mut src = Source {
        left: LEN,
        state: 0x9e37_79b9_7f4a_7c15,
        hash: Sha256::new(),
    };
    let written = c
        .put(&path, &mut src, WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(written, LEN);
    let sent = src.hash.finalize();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), LEN);

    let mut sink = HashSink(Sha256::new(), 0);
    let read = c.get(&path, &mut sink).await.unwrap();
    assert_eq!((read, sink.1), (LEN, LEN));
    assert_eq!(sink.0.finalize(), sent);
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_rpcs_and_typed_errors() {
    let t = TestAgent::start().await;
    let c = t.client();
    let missing = t.path("nope/missing.txt");
    let err = c.stat(&missing, true).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
    let err = c.get(&missing, &mut tokio::io::sink()).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
    let err = c.run(&["/definitely/not/a/program"]).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
    let err = c.stat("relative/path", true).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidArgument), "{err}");

    let dir = t.path("a/b/c");
    c.mkdir(&dir, true, None).await.unwrap();
    let f = format!("{dir}/f.txt");
    c.write_small(&f, b"small".to_vec(), WriteOptions::default())
        .await
        .unwrap();
    c.chmod(&f, 0o600).await.unwrap();
    let st = c.stat(&f, false).await.unwrap();
    assert_eq!((st.size, st.mode), (5, 0o600));
    let g = format!("{dir}/g.txt");
    c.rename(&f, &g).await.unwrap();
    let names: Vec<_> = c
        .list_dir(&dir)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["g.txt"]);
    let mut back = Vec::new();
    c.get(&g, &mut back).await.unwrap();
    assert_eq!(back, b"small");
    let me = nix::unistd::getuid().as_raw();
    c.chown(&g, Some(me), None).await.unwrap();
    let err = c.remove(&t.path("a"), false).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::AlreadyExists), "{err}");
    c.remove(&t.path("a"), true).await.unwrap();
    assert!(!std::path::Path::new(&t.path("a")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_too_big_for_the_disk_fails_before_any_byte_moves() {
    let t = TestAgent::start().await;
    let c = t.client();
    let path = t.path("huge.bin");
    let opts = WriteOptions {
        expected_len: Some(1 << 60), // an exabyte: no disk here has it
        ..Default::default()
    };
    let mut src = &b"never sent"[..];
    let err = c.put(&path, &mut src, opts).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            Some(ErrorKind::ResourceExhausted | ErrorKind::InvalidArgument)
        ),
        "{err}"
    );
    // Nothing is left behind: no file, no temporary.
    assert!(!std::path::Path::new(&path).exists());
    assert_eq!(std::fs::read_dir(t.dir.path()).unwrap().count(), 1); // the socket

    let mut src = &b"exactly 24 bytes of data"[..];
    let opts = WriteOptions {
        expected_len: Some(24),
        ..Default::default()
    };
    assert_eq!(c.put(&path, &mut src, opts).await.unwrap(), 24);
    assert_eq!(std::fs::read(&path).unwrap(), b"exactly 24 bytes of data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_transfer_leaves_the_old_file_untouched() {
    let t = TestAgent::start().await;
    let c = t.client();
    let path = t.path("precious");
    std::fs::write(&path, b"the old contents").unwrap();
    // The client announces 1 MiB and vanishes after 10 bytes.
    let opts = WriteOptions {
        expected_len: Some(1 << 20),
        ..Default::default()
    };
    let mut src = &b"0123456789"[..];
    let err = c.put(&path, &mut src, opts).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidArgument), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"the old contents");
    let litter: Vec<_> = std::fs::read_dir(t.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("hearth-"))
        .collect();
    assert!(litter.is_empty(), "temporary files left: {litter:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_as_the_requested_user() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let t = TestAgent::start().await;
    let c = t.client();
    let out = c
        .exec(ExecRequest {
            argv: argv(&["sh", "-c", "id -u; id -g; echo $HOME; pwd"]),
            uid: Some(65534),
            gid: Some(65534),
            cwd: Some("/tmp".into()),
            stdio: StdioMode::NullStdin,
            ..Default::default()
        })
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines[..2], ["65534", "65534"], "{text}");
    assert_eq!(lines[3], "/tmp");
}

/// Is the process still alive (and not a zombie)?
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.contains(") Z "),
        Err(_) => false,
    }
}

async fn wait_gone(pid: u32) -> bool {
    for _ in 0..200 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_leaks_no_processes_unless_detached() {
    let t = TestAgent::start().await;
    let attached_pid = {
        let c = t.client();
        let s = c
            .exec(ExecRequest {
                // The child of the shell must die too: the whole group is killed.
                argv: argv(&["sh", "-c", "sleep 60 & echo $!; wait"]),
                stdio: StdioMode::NullStdin,
                ..Default::default()
            })
            .await
            .unwrap();
        let pid = s.pid;
        c.reset().await;
        drop(s);
        pid
    };
    assert!(
        wait_gone(attached_pid).await,
        "attached exec survived its client"
    );

    let c = t.client();
    let s = c
        .exec(ExecRequest {
            argv: argv(&["sleep", "60"]),
            stdio: StdioMode::NullStdin,
            detached: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let detached_pid = s.pid;
    let exec_id = s.exec_id;
    drop(s);
    c.reset().await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        alive(detached_pid),
        "detached exec was killed: {:?}",
        std::fs::read_to_string(format!("/proc/{detached_pid}/stat"))
    );
    // A new client can still reach it by id, and the agent reaps it.
    let c = t.client();
    c.call(Request::ExecSignal {
        exec_id,
        signal: libc::SIGKILL,
        group: true,
    })
    .await
    .unwrap();
    assert!(
        wait_gone(detached_pid).await,
        "detached exec was not reaped"
    );
    for _ in 0..100 {
        if t.agent.execs.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.agent.execs.running(), 0);
}

async fn raw_handshake(t: &TestAgent, pre: &[u8], secret: Secret) -> Option<HelloReply> {
    let mut s = UnixStream::connect(t.socket()).await.unwrap();
    let mut out = pre.to_vec();
    out.extend(
        encode(&Hello {
            features: 0,
            secret,
        })
        .unwrap(),
    );
    s.write_all(&out).await.unwrap();
    hearth_protocol::FrameReader::new(s)
        .read()
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_and_wrong_version_are_refused() {
    let t = TestAgent::start().await;
    let bad = hearth_host::agents::AgentClient::new(t.endpoint.clone(), Secret([0u8; 32]));
    match bad.ping().await.unwrap_err() {
        AgentError::Refused(Refusal::BadSecret) => {}
        other => panic!("expected BadSecret, got {other}"),
    }
    let mut pre = preamble();
    pre[4] = 0xEE;
    match raw_handshake(&t, &pre, t.secret.clone()).await {
        Some(HelloReply::Refused(Refusal::Version { agent, client })) => {
            assert_eq!(agent, hearth_protocol::PROTOCOL_VERSION);
            assert_ne!(client, agent);
        }
        other => panic!("expected a version refusal, got {other:?}"),
    }
    assert!(matches!(
        raw_handshake(&t, &preamble(), t.secret.clone()).await,
        Some(HelloReply::Accepted { .. })
    ));
    t.client().ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_cost_only_their_own_connection() {
    let t = TestAgent::start().await;
    let good = t.client();
    good.ping().await.unwrap();

    // Not our protocol at all: closed without an answer.
    let mut s = UnixStream::connect(t.socket()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("agent must close a garbage connection")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Right magic, then a hello frame claiming 4 GiB.
    let mut s = UnixStream::connect(t.socket()).await.unwrap();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&hearth_protocol::PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&out).await.unwrap();
    let reply: Option<HelloReply> = hearth_protocol::FrameReader::new(&mut s)
        .read()
        .await
        .unwrap();
    assert_eq!(reply, Some(HelloReply::Refused(Refusal::Malformed)));

    // A good RPC connection that then sends an oversized frame loses only itself.
    let victim = t.client();
    let rpc = victim.rpc().await.unwrap();
    rpc.call(Request::Ping).await.unwrap();
    let big = Request::WriteFile {
        path: t.path("x"),
        data: vec![0; hearth_protocol::MAX_FRAME_LEN + 10],
        opts: WriteOptions::default(),
    };
    assert!(
        rpc.call(big).await.is_err(),
        "client must refuse to encode it"
    );
    // Bypass the client's own check: write the oversized length raw.
    let mut raw = UnixStream::connect(t.socket()).await.unwrap();
    let mut out = preamble().to_vec();
    out.extend(
        encode(&Hello {
            features: 0,
            secret: t.secret.clone(),
        })
        .unwrap(),
    );
    out.extend(encode(&hearth_protocol::Open::Rpc).unwrap());
    out.extend_from_slice(&((hearth_protocol::MAX_FRAME_LEN + 1) as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 64]);
    raw.write_all(&out).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
        .await
        .expect("agent must close a connection that sent an oversized frame")
        .unwrap();
    // Accepted + Opened came back before the close; nothing else did.
    let mut r = hearth_protocol::FrameReader::new(&rest[..]);
    assert!(matches!(
        r.read::<HelloReply>().await.unwrap(),
        Some(HelloReply::Accepted { .. })
    ));
    assert!(r
        .read::<hearth_protocol::OpenReply>()
        .await
        .unwrap()
        .unwrap()
        .is_ok());
    assert!(r
        .read::<hearth_protocol::ServerMsg>()
        .await
        .unwrap()
        .is_none());

    // Malformed frame body on an RPC channel.
    let mut raw = UnixStream::connect(t.socket()).await.unwrap();
    let mut out = preamble().to_vec();
    out.extend(
        encode(&Hello {
            features: 0,
            secret: t.secret.clone(),
        })
        .unwrap(),
    );
    out.extend(encode(&hearth_protocol::Open::Rpc).unwrap());
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    raw.write_all(&out).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
        .await
        .expect("agent must close a connection that sent a malformed frame")
        .unwrap();

    // Everyone else is still served, on their existing connections and new ones.
    rpc.call(Request::Ping).await.unwrap();
    good.ping().await.unwrap();
    t.client().info().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_agent_restarts() {
    let mut t = TestAgent::start().await;
    let c = t.client();
    c.ping().await.unwrap();
    let path = t.path("warm");
    std::fs::write(&path, b"pooled").unwrap();
    let mut out = Vec::new();
    c.get(&path, &mut out).await.unwrap();
    // Let the pool refill with handshaken connections that the restart will kill.
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Down for a while: calls made meanwhile wait (with backoff) instead of failing.
    let restart = async {
        t.restart(Duration::from_millis(300)).await;
    };
    let call = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.ping().await
    };
    let ((), pinged) = tokio::join!(restart, call);
    pinged.unwrap();
    let mut out = Vec::new();
    c.get(&path, &mut out).await.unwrap();
    assert_eq!(out, b"pooled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_and_thaw_through_the_client() {
    let t = TestAgent::start().await;
    let c = t.client();
    let (id, _engines) = c.freeze(Duration::from_secs(30)).await.unwrap();
    assert_eq!(t.agent.freezer.frozen(), 1);
    c.thaw(id).await.unwrap();
    assert_eq!(t.agent.freezer.frozen(), 0);
    let err = c.thaw(id).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
    // A host that never thaws: the agent lets go by itself.
    c.freeze(Duration::from_millis(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.agent.freezer.frozen(), 0);
}

/// A TCP server on the guest's loopback (here: the test's own) that answers each
/// connection with `serve`.
async fn local_server<F, Fut>(serve: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    port
}

/// Echoes until the client half-closes, then says so and closes: the trailer proves the
/// EOF crossed the stream while the way back stayed open.
async fn echo_then_trailer(mut s: tokio::net::TcpStream) {
    let (mut rd, mut wr) = s.split();
    tokio::io::copy(&mut rd, &mut wr).await.unwrap();
    wr.write_all(b"<eof seen>").await.unwrap();
}

/// Live connections the agent has accepted: the kernel lists each under the socket's
/// path, like the listener itself (which is not counted).
fn live_agent_conns(t: &TestAgent) -> usize {
    let path = t.socket().to_string_lossy().into_owned();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let n = table
        .lines()
        .filter(|l| l.trim_end().ends_with(path.as_str()))
        .count();
    n - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_port_carries_bytes_both_ways_with_half_close() {
    let t = TestAgent::start().await;
    let c = t.client();
    let port = local_server(echo_then_trailer).await;
    let stream = c.open_port(port).await.unwrap();
    assert_eq!(stream.opened, hearth_protocol::Opened::Port);
    let data: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let to_send = data.clone();
    // Written while the echo is read: the echo server stops reading once its answer
    // backs up.
    let writer = tokio::spawn(async move {
        wr.write_all(&to_send).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    drop(writer.await.unwrap());
    let (echo, trailer) = got.split_at(got.len().saturating_sub(10));
    assert_eq!(trailer, b"<eof seen>");
    assert_eq!(echo.len(), data.len());
    assert_eq!(Sha256::digest(echo), Sha256::digest(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_app_on_a_guest_port_answers_a_raw_request() {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let t = TestAgent::start().await;
    let c = t.client();
    let port = local_server(|s| async move {
        let svc =
            hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = format!("app saw {} {}", req.method(), req.uri());
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                    body,
                ))))
            });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
            .await;
    })
    .await;
    let mut s = c.open_port(port).await.unwrap();
    s.write_all(b"GET /hello?x=1 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\napp saw GET /hello?x=1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nobody_listens_on_is_a_typed_error() {
    let t = TestAgent::start().await;
    let c = t.client();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = c.open_port(port).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("nothing listens on port {port} in the guest")),
        "{err}"
    );
    let err = c.open_port(0).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidArgument), "{err}");
    // A refused open costs only its own connection.
    let port = local_server(echo_then_trailer).await;
    let mut s = c.open_port(port).await.unwrap();
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"still here<eof seen>");
}

/// `GET path` over an HTTP/1.1 connection: the status and the body as JSON.
async fn get_json(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
    method: hyper::Method,
    path: &str,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "kit.test")
        .body(http_body_util::Empty::new())
        .unwrap();
    // The previous answer must be fully read before the connection takes the next.
    send.ready().await.unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["content-type"], "application/json", "{path}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_services_answer_health_over_http() {
    use hyper::Method;
    let t = TestAgent::start().await;
    let c = t.client();
    for (slug, instance) in [("files", 1), ("terminal", 3), ("n", 2)] {
        let stream = c.open_kit(slug, instance).await.unwrap();
        assert_eq!(stream.opened, hearth_protocol::Opened::Kit);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        // Several requests on one stream: it is a keep-alive HTTP connection.
        for path in ["/health".to_string(), format!("/api/v1/{slug}/health")] {
            let (status, body) = get_json(&mut send, Method::GET, &path).await;
            assert_eq!(status, 200, "{slug} {path}: {body}");
            assert_eq!(body["status"], "ok");
            assert_eq!(body["service"], slug);
            assert_eq!(body["instance"], instance);
            assert_eq!(body["version"], hearth_agent::AGENT_VERSION);
        }
        let (status, body) = get_json(&mut send, Method::GET, "/no/such/route").await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["statusCode"], 404);
        assert_eq!(body["error"], "Not Found");
        assert!(body["message"].as_str().unwrap().contains("/no/such/route"));
        let (status, body) = get_json(&mut send, Method::POST, "/health").await;
        assert_eq!(status, 405, "{body}");
        assert_eq!(body["statusCode"], 405);
        drop(send);
        conn.await.unwrap().unwrap();
    }

    let err = c.open_kit("teapot", 1).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
    let err = c.open_kit("files", 0).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidArgument), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pipelined_behind_the_open_are_not_lost() {
    // A client may send its first bytes in the same write as the handshake and `Open`;
    // the agent has then already read them with the frames.
    let t = TestAgent::start().await;
    let port = local_server(echo_then_trailer).await;
    let opens = [
        (
            hearth_protocol::StreamTarget::Kit {
                service: "logs".into(),
                instance: 7,
            },
            &b"GET /health HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n"[..],
        ),
        (
            hearth_protocol::StreamTarget::Port { port },
            &b"early bytes"[..],
        ),
    ];
    for (target, payload) in opens {
        let mut s = UnixStream::connect(t.socket()).await.unwrap();
        let mut out = preamble().to_vec();
        out.extend(
            encode(&Hello {
                features: 0,
                secret: t.secret.clone(),
            })
            .unwrap(),
        );
        out.extend(encode(&hearth_protocol::Open::Stream(target)).unwrap());
        out.extend_from_slice(payload);
        s.write_all(&out).await.unwrap();
        // Half-close right away: the answer must still come back whole.
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        let mut r = hearth_protocol::FrameReader::new(&rest[..]);
        assert!(matches!(
            r.read::<HelloReply>().await.unwrap(),
            Some(HelloReply::Accepted { .. })
        ));
        assert!(r
            .read::<hearth_protocol::OpenReply>()
            .await
            .unwrap()
            .unwrap()
            .is_ok());
        let (unread, mut after) = r.into_parts();
        after.extend_from_slice(unread);
        let text = String::from_utf8_lossy(&after);
        if payload.starts_with(b"GET") {
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.contains(r#""service":"logs","instance":7"#), "{text}");
        } else {
            assert_eq!(text, "early bytes<eof seen>");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sequential_port_streams_leave_no_connections_behind() {
    let t = TestAgent::start().await;
    let c = t.client();
    let port = local_server(echo_then_trailer).await;
    let mut most_live = 0;
    for i in 0..50 {
        let mut s = c.open_port(port).await.unwrap();
        let msg = format!("request {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, format!("{msg}<eof seen>").as_bytes());
        drop(s);
        most_live = most_live.max(live_agent_conns(&t));
    }
    // A stream uses up its connection, so the agent accepts one per stream; what must
    // stay bounded is what is alive: the idle pool, plus the odd stream or refill that
    // is still closing.
    assert!(
        most_live <= 6,
        "{most_live} agent connections alive at once"
    );
    let mut live = live_agent_conns(&t);
    for _ in 0..100 {
        if live <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        live = live_agent_conns(&t);
    }
    assert!(
        live <= 2,
        "{live} agent connections left after the streams ended"
    );
}
