//! A raw stream channel to the agent.

use hearth_protocol::{Conn, Opened};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Raw bytes both ways after `Opened`. Bytes the handshake reader had already buffered
/// come first, so nothing the agent sent is lost.
pub struct AgentStream {
    pub opened: Opened,
    conn: Conn,
    buffered: Vec<u8>,
    pos: usize,
}

impl AgentStream {
    pub(crate) fn new(opened: Opened, conn: Conn, buffered: Vec<u8>) -> Self {
        AgentStream {
            opened,
            conn,
            buffered,
            pos: 0,
        }
    }

    /// See [`Conn::set_bulk_send_buffer`].
    pub fn set_bulk_send_buffer(&self) {
        self.conn.set_bulk_send_buffer();
    }

    /// Half-close: the agent reads EOF; we can still read its answer.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.conn.shutdown_write()
    }
}

impl std::fmt::Debug for AgentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStream")
            .field("opened", &self.opened)
            .field("buffered", &(self.buffered.len() - self.pos))
            .finish_non_exhaustive()
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.buffered.len() {
            let n = (this.buffered.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.buffered[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buffered.len() {
                this.buffered = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.conn).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().conn).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_shutdown(cx)
    }
}
