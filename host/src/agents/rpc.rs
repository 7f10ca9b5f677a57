//! One multiplexed RPC connection: callers write their request under a short lock; one
//! reader task routes replies and events back by request id.

use super::{AgentError, Result};
use hearth_protocol::frame::{FrameReader, FrameWriter};
use hearth_protocol::{ClientMsg, Conn, Error, Event, Request, Response, ServerMsg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

type Reply = std::result::Result<Response, Error>;

struct Slot {
    reply: oneshot::Sender<Reply>,
    events: Option<mpsc::UnboundedSender<Event>>,
}

#[derive(Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    closed: bool,
}

pub struct RpcClient {
    writer: tokio::sync::Mutex<FrameWriter<WriteHalf<Conn>>>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

/// A request in flight whose events the caller wants.
pub struct Call {
    pub id: u64,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub reply: oneshot::Receiver<Reply>,
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // Poisoning only means a holder panicked; the table itself is consistent.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl RpcClient {
    pub fn new(reader: FrameReader<ReadHalf<Conn>>, writer: FrameWriter<WriteHalf<Conn>>) -> Self {
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let reader = tokio::spawn(read_loop(reader, pending.clone()));
        RpcClient {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            reader,
        }
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }

    /// One request, one reply.
    pub async fn call(&self, req: Request) -> Result<Response> {
        let (id, reply) = self.register(None)?;
        self.send(&ClientMsg::Call { id, req }).await?;
        finish(reply).await
    }

    /// A request whose events (exec output) the caller reads as they come.
    pub async fn call_streaming(&self, req: Request) -> Result<Call> {
        let (tx, events) = mpsc::unbounded_channel();
        let (id, reply) = self.register(Some(tx))?;
        self.send(&ClientMsg::Call { id, req }).await?;
        Ok(Call { id, events, reply })
    }

    pub async fn cancel(&self, id: u64) -> Result<()> {
        self.send(&ClientMsg::Cancel { id }).await
    }

    fn register(
        &self,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<(u64, oneshot::Receiver<Reply>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut p = lock(&self.pending);
        if p.closed {
            return Err(AgentError::Disconnected);
        }
        p.slots.insert(id, Slot { reply: tx, events });
        Ok((id, rx))
    }

    async fn send(&self, msg: &ClientMsg) -> Result<()> {
        let mut w = self.writer.lock().await;
        if let Err(e) = w.send(msg).await {
            drop(w);
            if let ClientMsg::Call { id, .. } = msg {
                lock(&self.pending).slots.remove(id);
            }
            return Err(e.into());
        }
        Ok(())
    }
}

impl Drop for RpcClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn finish(reply: oneshot::Receiver<Reply>) -> Result<Response> {
    reply
        .await
        .map_err(|_| AgentError::Disconnected)?
        .map_err(AgentError::Remote)
}

async fn read_loop(mut reader: FrameReader<ReadHalf<Conn>>, pending: Arc<Mutex<Pending>>) {
    loop {
        match reader.read::<ServerMsg>().await {
            Ok(Some(ServerMsg::Reply { id, result })) => {
                let slot = lock(&pending).slots.remove(&id);
                if let Some(slot) = slot {
                    // The caller may have stopped waiting; that is its business.
                    let _ = slot.reply.send(result);
                }
            }
            Ok(Some(ServerMsg::Event { id, event })) => {
                let p = lock(&pending);
                if let Some(tx) = p.slots.get(&id).and_then(|s| s.events.as_ref()) {
                    let _ = tx.send(event);
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("agent rpc connection failed: {e}");
                break;
            }
        }
    }
    // Dropping the slots wakes every waiter with `Disconnected`.
    let mut p = lock(&pending);
    p.closed = true;
    p.slots.clear();
}

pub(crate) async fn wait_reply(reply: oneshot::Receiver<Reply>) -> Result<Response> {
    finish(reply).await
}
