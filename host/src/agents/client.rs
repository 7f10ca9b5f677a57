//! [`AgentClient`]: everything the host does with one guest's agent.

use super::conn::{dial, dial_open, Handshaken};
use super::exec::{ExecOutput, ExecSession};
use super::rpc::RpcClient;
use super::stream::AgentStream;
use super::{AgentError, Result};
use hearth_protocol::channel::WriteOutcome;
use hearth_protocol::exec::{ExecRequest, StdioMode};
use hearth_protocol::files::{DirEntry, FileStat, WriteOptions};
use hearth_protocol::frame::{FrameReader, FrameWriter};
use hearth_protocol::info::GuestInfo;
use hearth_protocol::Conn;
use hearth_protocol::{Endpoint, Open, Opened, Request, Response, Secret, StreamTarget};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Every feature this client understands.
pub const CLIENT_FEATURES: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Handshaken connections kept ready for streams.
    pub idle_streams: usize,
    /// First retry delay when the agent cannot be reached; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up reconnecting after this long.
    pub connect_deadline: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            idle_streams: 2,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(500),
            connect_deadline: Duration::from_secs(10),
        }
    }
}

/// A future a dialer returns.
pub type DialFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// How to reach an agent: directly on its endpoint, or through `hearthd`'s control
/// socket (which does the handshake with the guest's secret on the caller's behalf).
pub trait Dialer: Send + Sync + 'static {
    /// A connection that passed the handshake and awaits its `Open`.
    fn dial(&self) -> DialFuture<'_, Handshaken>;

    /// Dial and open a channel; direct dialers pipeline the two.
    fn dial_open<'a>(&'a self, open: &'a Open) -> DialFuture<'a, (Opened, Conn, Vec<u8>)> {
        Box::pin(async move { self.dial().await?.open(open).await })
    }

    /// For messages.
    fn describe(&self) -> String;
}

/// Straight to the agent's endpoint with the guest's secret.
pub struct DirectDialer {
    pub endpoint: Endpoint,
    pub secret: Secret,
}

impl Dialer for DirectDialer {
    fn dial(&self) -> DialFuture<'_, Handshaken> {
        Box::pin(dial(&self.endpoint, &self.secret, CLIENT_FEATURES))
    }

    fn dial_open<'a>(&'a self, open: &'a Open) -> DialFuture<'a, (Opened, Conn, Vec<u8>)> {
        Box::pin(async move {
            let (_, opened, conn, buffered) =
                dial_open(&self.endpoint, &self.secret, CLIENT_FEATURES, open).await?;
            Ok((opened, conn, buffered))
        })
    }

    fn describe(&self) -> String {
        self.endpoint.to_string()
    }
}

pub struct AgentClient {
    dialer: Arc<dyn Dialer>,
    opts: ClientOptions,
    rpc: tokio::sync::Mutex<Option<Arc<RpcClient>>>,
    idle: Mutex<Vec<Handshaken>>,
}

impl AgentClient {
    pub fn new(endpoint: Endpoint, secret: Secret) -> Arc<AgentClient> {
        Self::with_options(endpoint, secret, ClientOptions::default())
    }

    pub fn with_options(endpoint: Endpoint, secret: Secret, opts: ClientOptions) -> Arc<Self> {
        Self::with_dialer(Arc::new(DirectDialer { endpoint, secret }), opts)
    }

    pub fn with_dialer(dialer: Arc<dyn Dialer>, opts: ClientOptions) -> Arc<Self> {
        Arc::new(AgentClient {
            dialer,
            opts,
            rpc: tokio::sync::Mutex::new(None),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Where this client connects, for messages.
    pub fn describe(&self) -> String {
        self.dialer.describe()
    }

    /// The shared RPC connection, reconnecting (with backoff) if it was lost.
    pub async fn rpc(&self) -> Result<Arc<RpcClient>> {
        let mut slot = self.rpc.lock().await;
        if let Some(rpc) = slot.as_ref().filter(|r| !r.is_closed()) {
            return Ok(rpc.clone());
        }
        let (opened, conn, buffered) = self
            .with_backoff(|| self.dialer.dial_open(&Open::Rpc))
            .await?;
        if opened != Opened::Rpc {
            return Err(AgentError::Unexpected(format!("{opened:?}")));
        }
        let (rd, wr) = tokio::io::split(conn);
        let rpc = Arc::new(RpcClient::new(
            FrameReader::from_parts(rd, buffered),
            FrameWriter::new(wr),
        ));
        *slot = Some(rpc.clone());
        Ok(rpc)
    }

    /// Retries connection failures (the agent restarting, the guest booting) until the
    /// deadline; an answer from the agent, even a refusal, ends the retries.
    async fn with_backoff<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.opts.connect_deadline;
        let mut delay = self.opts.initial_backoff;
        loop {
            match f().await {
                Err(e) if e.is_connection() && tokio::time::Instant::now() + delay < deadline => {
                    tracing::debug!("agent at {} not reachable yet: {e}", self.describe());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.opts.max_backoff);
                }
                other => return other,
            }
        }
    }

    /// Opens a stream channel, on a pooled handshaken connection when one is ready.
    pub async fn open_stream(self: &Arc<Self>, target: StreamTarget) -> Result<AgentStream> {
        let open = Open::Stream(target);
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        self.refill();
        if let Some(h) = pooled {
            match h.open(&open).await {
                Ok((opened, conn, buffered)) => {
                    return Ok(AgentStream::new(opened, conn, buffered))
                }
                // A pooled connection may have died with an agent restart: dial afresh.
                Err(e) if e.is_connection() => {}
                Err(e) => return Err(e),
            }
        }
        let (opened, conn, buffered) = self.with_backoff(|| self.dialer.dial_open(&open)).await?;
        Ok(AgentStream::new(opened, conn, buffered))
    }

    /// Tops the idle pool up in the background.
    fn refill(self: &Arc<Self>) {
        let have = self.idle.lock().unwrap_or_else(|p| p.into_inner()).len();
        if have >= self.opts.idle_streams {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(h) = this.dialer.dial().await {
                let mut idle = this.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < this.opts.idle_streams {
                    idle.push(h);
                }
            }
        });
    }

    /// Drops pooled connections and the RPC connection (for example after the guest was
    /// restored from a snapshot).
    pub async fn reset(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.rpc.lock().await = None;
    }

    pub async fn call(&self, req: Request) -> Result<Response> {
        self.rpc().await?.call(req).await
    }

    async fn call_done(&self, req: Request) -> Result<()> {
        match self.call(req).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn ping(&self) -> Result<()> {
        self.call_done(Request::Ping).await
    }

    pub async fn info(&self) -> Result<GuestInfo> {
        match self.call(Request::Info).await? {
            Response::Info(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    /// Freezes the guest's disk state for a snapshot (databases quiesced, then syncfs).
    /// The agent thaws by itself after `timeout` if [`Self::thaw`] never comes.
    pub async fn freeze(&self, timeout: Duration) -> Result<(u64, Vec<String>)> {
        let timeout_ms = timeout.as_millis().min(u128::from(u64::MAX)) as u64;
        match self.call(Request::Freeze { timeout_ms }).await? {
            Response::Frozen { freeze_id, engines } => Ok((freeze_id, engines)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn thaw(&self, freeze_id: u64) -> Result<()> {
        self.call_done(Request::Thaw { freeze_id }).await
    }

    pub async fn thaw_all(&self) -> Result<()> {
        self.call_done(Request::ThawAll).await
    }

    pub async fn exec(&self, req: ExecRequest) -> Result<ExecSession> {
        ExecSession::start(self.rpc().await?, Request::Exec(req)).await
    }

    /// Runs a command with no stdin and collects its output.
    pub async fn run(&self, argv: &[&str]) -> Result<ExecOutput> {
        let req = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdio: StdioMode::NullStdin,
            ..Default::default()
        };
        self.exec(req).await?.wait().await
    }

    /// Attaches the raw stdio stream of an exec started with `StdioMode::Stream`.
    pub async fn exec_stdio(self: &Arc<Self>, exec_id: u64) -> Result<AgentStream> {
        self.open_stream(StreamTarget::ExecStdio { exec_id }).await
    }

    /// A byte stream to `port` on the guest's loopback, for the proxy to splice an
    /// `http-<port>` request onto. Shutting down the write side (the request is complete)
    /// still lets the rest of the app's answer arrive. Fails with `NotFound` when nothing
    /// listens there.
    pub async fn open_port(self: &Arc<Self>, port: u16) -> Result<AgentStream> {
        self.open_expecting(StreamTarget::Port { port }, Opened::Port)
            .await
    }

    /// An HTTP/1.1 connection (upgrades included) to instance `instance` of the kit
    /// service `service`, served by the agent. Fails with `NotFound` for an unknown
    /// service and `InvalidArgument` for instance 0.
    pub async fn open_kit(self: &Arc<Self>, service: &str, instance: u16) -> Result<AgentStream> {
        let target = StreamTarget::Kit {
            service: service.into(),
            instance,
        };
        self.open_expecting(target, Opened::Kit).await
    }

    /// Opens a stream and checks that the agent opened what was asked: an agent that
    /// answered something else is confused, and its bytes must not reach a caller.
    async fn open_expecting(
        self: &Arc<Self>,
        target: StreamTarget,
        want: Opened,
    ) -> Result<AgentStream> {
        let s = self.open_stream(target).await?;
        if s.opened != want {
            return Err(AgentError::Unexpected(format!("{:?}", s.opened)));
        }
        Ok(s)
    }

    pub async fn stat(&self, path: &str, follow: bool) -> Result<FileStat> {
        match self
            .call(Request::Stat {
                path: path.into(),
                follow,
            })
            .await?
        {
            Response::Stat(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        match self.call(Request::ListDir { path: path.into() }).await? {
            Response::Dir(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    pub async fn mkdir(&self, path: &str, parents: bool, mode: Option<u32>) -> Result<()> {
        self.call_done(Request::Mkdir {
            path: path.into(),
            parents,
            mode,
        })
        .await
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.call_done(Request::Remove {
            path: path.into(),
            recursive,
        })
        .await
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.call_done(Request::Rename {
            from: from.into(),
            to: to.into(),
        })
        .await
    }

    pub async fn chmod(&self, path: &str, mode: u32) -> Result<()> {
        self.call_done(Request::Chmod {
            path: path.into(),
            mode,
        })
        .await
    }

    pub async fn chown(&self, path: &str, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        self.call_done(Request::Chown {
            path: path.into(),
            uid,
            gid,
        })
        .await
    }

    /// Small whole-file write in one RPC (up to the frame cap); use [`Self::put`] for more.
    pub async fn write_small(&self, path: &str, data: Vec<u8>, opts: WriteOptions) -> Result<u64> {
        match self
            .call(Request::WriteFile {
                path: path.into(),
                data,
                opts,
            })
            .await?
        {
            Response::Written(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// Streams `src` into a guest file; returns the bytes the agent wrote. Set
    /// `opts.expected_len` when the length is known: the agent then reserves the space first.
    pub async fn put(
        self: &Arc<Self>,
        path: &str,
        src: &mut (impl AsyncRead + Unpin),
        opts: WriteOptions,
    ) -> Result<u64> {
        let mut s = self
            .open_stream(StreamTarget::FileWrite {
                path: path.into(),
                opts,
            })
            .await?;
        s.set_bulk_send_buffer();
        let copied = copy_big(src, &mut s).await;
        s.shutdown_write()?;
        // The agent's verdict is authoritative even if our copy broke off (it may have
        // stopped reading because the disk filled up).
        let mut reader = FrameReader::new(&mut s);
        let outcome = match reader.read::<WriteOutcome>().await? {
            Some(o) => o,
            None => {
                copied?;
                return Err(AgentError::Disconnected);
            }
        };
        let written = outcome?;
        let sent = copied?;
        if written != sent {
            return Err(AgentError::Unexpected(format!(
                "sent {sent} bytes, agent wrote {written}"
            )));
        }
        Ok(written)
    }

    /// Streams a guest file into `dst`; returns the byte count, checked against the size
    /// the agent announced.
    pub async fn get(
        self: &Arc<Self>,
        path: &str,
        dst: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64> {
        let mut s = self
            .open_stream(StreamTarget::FileRead {
                path: path.into(),
                offset: 0,
                len: None,
            })
            .await?;
        let Opened::FileRead { len } = s.opened else {
            return Err(AgentError::Unexpected(format!("{:?}", s.opened)));
        };
        let got = copy_big(&mut s, dst).await?;
        dst.flush().await?;
        if got != len {
            return Err(AgentError::Unexpected(format!(
                "stream ended after {got} of {len} bytes"
            )));
        }
        Ok(got)
    }
}

fn unexpected(r: Response) -> AgentError {
    AgentError::Unexpected(format!("{r:?}"))
}

/// Copies with a large buffer: tokio's default 8 KiB costs a syscall per 8 KiB.
pub(crate) async fn copy_big<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}
