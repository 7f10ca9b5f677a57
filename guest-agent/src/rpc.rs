//! The RPC channel: read requests, run each on its own task, write replies and events
//! through one writer that batches whatever is ready into a single `write`.
//!
//! Handlers are thin: check, call the plain function that does the work, map the result.

use crate::{exec, files, info, Agent};
use hearth_protocol::frame::{FrameReader, FrameWriter, MAX_CHUNK};
use hearth_protocol::{ClientMsg, Conn, Error, ErrorKind, Event, Request, Response, ServerMsg};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

/// Messages queued for the writer. Bounded, so a client that stops reading slows down
/// the processes whose output it is not reading instead of growing the agent's memory.
const OUTBOX: usize = 256;
/// Largest batch the writer coalesces into one `write`.
const BATCH_BYTES: usize = 256 * 1024;

/// Where a request sends its events.
#[derive(Clone)]
pub struct EventSink {
    id: u64,
    tx: mpsc::Sender<ServerMsg>,
}

impl EventSink {
    /// `false` once the connection is gone.
    pub async fn send(&self, event: Event) -> bool {
        self.tx
            .send(ServerMsg::Event { id: self.id, event })
            .await
            .is_ok()
    }
}

struct InFlight {
    abort: AbortHandle,
    cancel: Option<oneshot::Sender<()>>,
}

type Table = Arc<Mutex<HashMap<u64, InFlight>>>;

pub async fn serve(
    agent: Arc<Agent>,
    mut reader: FrameReader<impl AsyncRead + Unpin>,
    writer: FrameWriter<WriteHalf<Conn>>,
) {
    let (tx, rx) = mpsc::channel(OUTBOX);
    let writer_task = tokio::spawn(write_loop(writer, rx));
    let table: Table = Arc::default();
    loop {
        let msg = match reader.read::<ClientMsg>().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("rpc connection dropped: {e}");
                break;
            }
        };
        match msg {
            ClientMsg::Call {
                id,
                req: Request::Ping,
            } => {
                // The hot path of latency measurements: no task, no table entry.
                if tx
                    .send(ServerMsg::Reply {
                        id,
                        result: Ok(Response::Done),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            ClientMsg::Call { id, req } => {
                if let Err(err) = start(&agent, &table, &tx, id, req) {
                    let _ = tx
                        .send(ServerMsg::Reply {
                            id,
                            result: Err(err),
                        })
                        .await;
                }
            }
            ClientMsg::Cancel { id } => cancel(&table, &tx, id).await,
        }
    }
    // The client is gone: abort what it started. Exec requests kill their process group
    // on abort unless they were started detached.
    let inflight: Vec<_> = lock(&table).drain().collect();
    for (_, f) in inflight {
        f.abort.abort();
    }
    drop(tx);
    let _ = writer_task.await;
}

fn lock(table: &Table) -> std::sync::MutexGuard<'_, HashMap<u64, InFlight>> {
    // Poisoning only means a handler panicked while holding the lock; the map is intact.
    table.lock().unwrap_or_else(|p| p.into_inner())
}

fn start(
    agent: &Arc<Agent>,
    table: &Table,
    tx: &mpsc::Sender<ServerMsg>,
    id: u64,
    req: Request,
) -> Result<(), Error> {
    let mut t = lock(table);
    if t.contains_key(&id) {
        return Err(Error::invalid(format!(
            "request id {id} is already in flight"
        )));
    }
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let sink = EventSink { id, tx: tx.clone() };
    let agent = agent.clone();
    let table2 = table.clone();
    let tx2 = tx.clone();
    // Hold the table lock across spawn so the task cannot finish (and remove its entry)
    // before the entry exists.
    let handle = tokio::spawn(async move {
        let result = handle(&agent, req, sink, cancel_rx).await;
        lock(&table2).remove(&id);
        let _ = tx2.send(ServerMsg::Reply { id, result }).await;
    });
    t.insert(
        id,
        InFlight {
            abort: handle.abort_handle(),
            cancel: Some(cancel_tx),
        },
    );
    Ok(())
}

async fn cancel(table: &Table, tx: &mpsc::Sender<ServerMsg>, id: u64) {
    let Some(cancel) = lock(table).get_mut(&id).and_then(|f| f.cancel.take()) else {
        return; // Already finished: its reply is on the way.
    };
    // The handler sees the signal and answers (an exec reports its killed process).
    if cancel.send(()).is_err() {
        let _ = tx
            .send(ServerMsg::Reply {
                id,
                result: Err(Error::new(ErrorKind::Cancelled, "cancelled")),
            })
            .await;
    }
}

async fn write_loop(mut writer: FrameWriter<WriteHalf<Conn>>, mut rx: mpsc::Receiver<ServerMsg>) {
    while let Some(msg) = rx.recv().await {
        if let Err(e) = writer.push(&msg) {
            tracing::error!("cannot encode a reply: {e}");
            continue;
        }
        while writer.pending() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(msg) => {
                    if let Err(e) = writer.push(&msg) {
                        tracing::error!("cannot encode a reply: {e}");
                    }
                }
                Err(_) => break,
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// Runs `f` on the blocking pool: file-system calls must not stall the event loop.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("worker failed: {e}"))))
}

async fn handle(
    agent: &Arc<Agent>,
    req: Request,
    events: EventSink,
    cancel: oneshot::Receiver<()>,
) -> Result<Response, Error> {
    if let Request::Exec(req) = req {
        // Exec handles cancellation itself: it kills the process and reports how it ended.
        return exec::run(&agent.execs, req, events, cancel)
            .await
            .map(Response::Exited);
    }
    tokio::select! {
        r = dispatch(agent, req) => r,
        Ok(()) = cancel => Err(Error::new(ErrorKind::Cancelled, "cancelled")),
    }
}

async fn dispatch(agent: &Arc<Agent>, req: Request) -> Result<Response, Error> {
    let execs = &agent.execs;
    match req {
        Request::Ping => Ok(Response::Done),
        Request::Info => {
            let features = agent.features;
            blocking(move || Ok(Response::Info(info::guest_info(features)))).await
        }
        Request::Exec(_) => Err(Error::internal("exec is handled before dispatch")),
        Request::ExecInput { exec_id, data } => {
            execs.input(exec_id, &data).await.map(|()| Response::Done)
        }
        Request::ExecCloseStdin { exec_id } => {
            execs.close_stdin(exec_id).await.map(|()| Response::Done)
        }
        Request::ExecSignal {
            exec_id,
            signal,
            group,
        } => execs
            .signal(exec_id, signal, group)
            .map(|()| Response::Done),
        Request::ExecResize { exec_id, size } => {
            execs.resize(exec_id, size).map(|()| Response::Done)
        }
        Request::Stat { path, follow } => {
            blocking(move || files::stat(&path, follow).map(Response::Stat)).await
        }
        Request::ListDir { path } => {
            blocking(move || files::list_dir(&path).map(Response::Dir)).await
        }
        Request::ReadFile { path, offset, len } => {
            let len = len.min(MAX_CHUNK as u64);
            blocking(move || files::read_file(&path, offset, len).map(Response::Data)).await
        }
        Request::WriteFile { path, data, opts } => {
            blocking(move || files::write_file(&path, &data, &opts).map(Response::Written)).await
        }
        Request::Mkdir {
            path,
            parents,
            mode,
        } => blocking(move || files::mkdir(&path, parents, mode).map(|()| Response::Done)).await,
        Request::Remove { path, recursive } => {
            blocking(move || files::remove(&path, recursive).map(|()| Response::Done)).await
        }
        Request::Rename { from, to } => {
            blocking(move || files::rename(&from, &to).map(|()| Response::Done)).await
        }
        Request::Chmod { path, mode } => {
            blocking(move || files::chmod(&path, mode).map(|()| Response::Done)).await
        }
        Request::Freeze { timeout_ms } => {
            let timeout = std::time::Duration::from_millis(timeout_ms.clamp(100, 600_000));
            let (freeze_id, engines) = agent.freezer.freeze(timeout).await?;
            Ok(Response::Frozen { freeze_id, engines })
        }
        Request::Thaw { freeze_id } => agent.freezer.thaw(freeze_id).await.map(|()| Response::Done),
        Request::ThawAll => {
            agent.freezer.thaw_all().await;
            Ok(Response::Done)
        }
        Request::Chown { path, uid, gid } => {
            blocking(move || files::chown(&path, uid, gid).map(|()| Response::Done)).await
        }
    }
}
