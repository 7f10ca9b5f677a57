//! Accepting connections: the handshake, then the channel the client opens.

use crate::{exec, kit, port, transfer, Agent};
use hearth_protocol::channel::{Open, OpenReply, Opened, StreamTarget};
use hearth_protocol::frame::{FrameReader, FrameWriter};
use hearth_protocol::handshake::{self, Hello, HelloReply, Refusal, PREAMBLE_LEN};
use hearth_protocol::{Conn, Error, FrameError, Listener, PROTOCOL_VERSION};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// A client must finish the handshake this fast; an idle pooled connection may then wait
/// for its `Open` as long as it likes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until the listener fails for good. Each connection gets its own task, so a bad
/// client only ever loses its own connection. The tasks belong to this future: dropping
/// it closes every connection, as a real agent exit would.
pub async fn serve(listener: Listener, agent: Arc<Agent>) -> std::io::Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok(conn) => {
                let agent = agent.clone();
                conns.spawn(async move {
                    if let Err(e) = handle_conn(agent, conn).await {
                        tracing::warn!("connection closed: {e}");
                    }
                });
            }
            Err(e) if is_transient(&e) => {
                tracing::warn!("accept: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("handshake timed out")]
    Timeout,
    #[error("not a hearth client (bad magic)")]
    BadMagic,
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

async fn handle_conn(agent: Arc<Agent>, conn: Conn) -> Result<(), ConnError> {
    let mut reader = FrameReader::new(conn);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&agent, &mut reader))
        .await
        .map_err(|_| ConnError::Timeout)?;
    let reply = match hello {
        Ok(features) => HelloReply::Accepted {
            version: PROTOCOL_VERSION,
            features,
            agent_version: crate::AGENT_VERSION.to_string(),
        },
        Err(ConnError::Refused(r)) => {
            // Best effort: the client learns why; the connection ends either way.
            let _ = send(&mut reader, &HelloReply::Refused(r.clone())).await;
            return Err(ConnError::Refused(r));
        }
        Err(e) => return Err(e),
    };
    send(&mut reader, &reply).await?;

    let Some(open) = reader.read::<Open>().await? else {
        return Ok(()); // An idle pooled connection that was closed.
    };
    match open {
        Open::Rpc => {
            send(&mut reader, &OpenReply::Ok(Opened::Rpc)).await?;
            let (conn, buffered) = reader.into_parts();
            let (rd, wr) = tokio::io::split(conn);
            crate::rpc::serve(
                agent,
                FrameReader::from_parts(rd, buffered),
                FrameWriter::new(wr),
            )
            .await;
            Ok(())
        }
        Open::Stream(target) => open_stream(agent, reader, target).await,
    }
}

/// Checks the preamble and `Hello`; returns the negotiated feature bits.
async fn handshake(agent: &Agent, reader: &mut FrameReader<Conn>) -> Result<u64, ConnError> {
    let Some(pre) = reader.read_raw(PREAMBLE_LEN).await? else {
        return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    };
    let version = handshake::parse_preamble(&pre).ok_or(ConnError::BadMagic)?;
    if version != PROTOCOL_VERSION {
        return Err(ConnError::Refused(Refusal::Version {
            client: version,
            agent: PROTOCOL_VERSION,
        }));
    }
    let hello = match reader.read::<Hello>().await {
        Ok(Some(h)) => h,
        Ok(None) | Err(FrameError::Decode(_)) | Err(FrameError::TooLarge { .. }) => {
            return Err(ConnError::Refused(Refusal::Malformed))
        }
        Err(e) => return Err(e.into()),
    };
    if !hello.secret.matches(&agent.secret) {
        return Err(ConnError::Refused(Refusal::BadSecret));
    }
    Ok(hello.features & agent.features)
}

async fn send<T: serde::Serialize>(
    reader: &mut FrameReader<Conn>,
    msg: &T,
) -> Result<(), ConnError> {
    let bytes = hearth_protocol::frame::encode(msg)?;
    reader.get_mut().write_all(&bytes).await?;
    Ok(())
}

async fn open_stream(
    agent: Arc<Agent>,
    mut reader: FrameReader<Conn>,
    target: StreamTarget,
) -> Result<(), ConnError> {
    match target {
        StreamTarget::FileRead { path, offset, len } => {
            let opened = transfer::open_read(path, offset, len).await;
            let file = match opened {
                Ok(f) => f,
                Err(e) => return refuse(&mut reader, e).await,
            };
            send(
                &mut reader,
                &OpenReply::Ok(Opened::FileRead { len: file.len }),
            )
            .await?;
            let (conn, _) = reader.into_parts();
            transfer::send_file(conn, file).await?;
        }
        StreamTarget::FileWrite { path, opts } => {
            let file = match transfer::open_write(path, opts).await {
                Ok(f) => f,
                Err(e) => return refuse(&mut reader, e).await,
            };
            send(&mut reader, &OpenReply::Ok(Opened::FileWrite)).await?;
            let (conn, buffered) = reader.into_parts();
            transfer::receive_file(conn, buffered, file).await?;
        }
        StreamTarget::ExecStdio { exec_id } => {
            if let Err(e) = agent.execs.can_attach(exec_id) {
                return refuse(&mut reader, e).await;
            }
            send(&mut reader, &OpenReply::Ok(Opened::ExecStdio)).await?;
            let (conn, leftover) = reader.into_parts();
            // The exec may have ended between the check and now; then the stream just
            // closes, which the client sees as EOF.
            let _ = agent
                .execs
                .attach(exec_id, exec::Attached { conn, leftover });
        }
        StreamTarget::Port { port } => {
            let tcp = match port::connect(port).await {
                Ok(s) => s,
                Err(e) => return refuse(&mut reader, e).await,
            };
            send(&mut reader, &OpenReply::Ok(Opened::Port)).await?;
            let (conn, leftover) = reader.into_parts();
            // Resets and broken pipes are how browsers and apps end connections every
            // day: not worth a warning.
            if let Err(e) = port::relay(conn, leftover, tcp).await {
                tracing::debug!("port {port} stream: {e}");
            }
        }
        StreamTarget::Kit { service, instance } => {
            let service = match kit::resolve(&service, instance) {
                Ok(s) => s,
                Err(e) => return refuse(&mut reader, e).await,
            };
            send(&mut reader, &OpenReply::Ok(Opened::Kit)).await?;
            let (conn, leftover) = reader.into_parts();
            if let Err(e) = kit::serve(agent, service, instance, conn, leftover).await {
                tracing::debug!("kit {}-{instance} stream: {e}", service.slug);
            }
        }
    }
    Ok(())
}

async fn refuse(reader: &mut FrameReader<Conn>, err: Error) -> Result<(), ConnError> {
    send(reader, &OpenReply::Err(err)).await
}
