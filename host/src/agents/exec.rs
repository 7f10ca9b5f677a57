//! A running process in the guest, seen from the host.

use super::rpc::{wait_reply, Call, RpcClient};
use super::{AgentError, Result};
use hearth_protocol::exec::{ExitStatus, WinSize};
use hearth_protocol::{Event, Request, Response};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: Option<ExitStatus>,
}

impl ExecOutput {
    pub fn code(&self) -> i32 {
        self.status.map_or(255, |s| s.shell_code())
    }
}

pub struct ExecSession {
    pub exec_id: u64,
    pub pid: u32,
    call: Call,
    rpc: Arc<RpcClient>,
    done: bool,
}

impl ExecSession {
    /// Sends the request and waits until the process is running (or failed to start).
    pub(crate) async fn start(rpc: Arc<RpcClient>, req: Request) -> Result<ExecSession> {
        let mut call = rpc.call_streaming(req).await?;
        match call.events.recv().await {
            Some(Event::Started { exec_id, pid }) => Ok(ExecSession {
                exec_id,
                pid,
                call,
                rpc,
                done: false,
            }),
            Some(other) => Err(AgentError::Unexpected(format!(
                "exec sent {other:?} before Started"
            ))),
            // No events: the reply says why it did not start.
            None => {
                let other = wait_reply(call.reply).await?;
                Err(AgentError::Unexpected(format!(
                    "exec ended without starting: {other:?}"
                )))
            }
        }
    }

    /// The next output chunk, then the exit status, then `None`.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>> {
        if self.done {
            return Ok(None);
        }
        if let Some(ev) = self.call.events.recv().await {
            return Ok(Some(match ev {
                Event::Stdout(b) => ExecEvent::Stdout(b),
                Event::Stderr(b) => ExecEvent::Stderr(b),
                Event::Started { .. } => {
                    return Err(AgentError::Unexpected("a second Started".into()))
                }
            }));
        }
        // The events channel closes when the reply arrives, after the last event.
        self.done = true;
        let reply = std::mem::replace(&mut self.call.reply, tokio::sync::oneshot::channel().1);
        match wait_reply(reply).await? {
            Response::Exited(st) => Ok(Some(ExecEvent::Exit(st))),
            other => Err(AgentError::Unexpected(format!("exec replied {other:?}"))),
        }
    }

    /// Collects all output until the process exits.
    pub async fn wait(mut self) -> Result<ExecOutput> {
        let mut out = ExecOutput::default();
        while let Some(ev) = self.next().await? {
            match ev {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit(st) => out.status = Some(st),
            }
        }
        Ok(out)
    }

    pub async fn write_stdin(&self, data: Vec<u8>) -> Result<()> {
        self.simple(Request::ExecInput {
            exec_id: self.exec_id,
            data,
        })
        .await
    }

    pub async fn close_stdin(&self) -> Result<()> {
        self.simple(Request::ExecCloseStdin {
            exec_id: self.exec_id,
        })
        .await
    }

    pub async fn signal(&self, signal: i32, group: bool) -> Result<()> {
        self.simple(Request::ExecSignal {
            exec_id: self.exec_id,
            signal,
            group,
        })
        .await
    }

    pub async fn resize(&self, size: WinSize) -> Result<()> {
        self.simple(Request::ExecResize {
            exec_id: self.exec_id,
            size,
        })
        .await
    }

    /// Asks the agent to kill the process; its exit status still arrives through `next`.
    pub async fn cancel(&self) -> Result<()> {
        self.rpc.cancel(self.call.id).await
    }

    async fn simple(&self, req: Request) -> Result<()> {
        match self.rpc.call(req).await? {
            Response::Done => Ok(()),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }
}
