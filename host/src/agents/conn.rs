//! Dialing an agent and completing the handshake.

use super::{AgentError, Result};
use hearth_protocol::frame::{encode_into, FrameReader};
use hearth_protocol::handshake::{preamble, Hello, HelloReply};
use hearth_protocol::{Conn, Endpoint, Open, OpenReply, Opened, Secret};
use tokio::io::AsyncWriteExt;

/// What the agent said about itself in the handshake.
#[derive(Debug, Clone)]
pub struct AgentHello {
    pub features: u64,
    pub agent_version: String,
}

/// A connection that passed the handshake and has not chosen a channel yet: what the
/// stream pool keeps warm.
pub struct Handshaken {
    reader: FrameReader<Conn>,
    pub hello: AgentHello,
}

/// Connects and completes the handshake; the connection is ready for one `Open`.
pub async fn dial(endpoint: &Endpoint, secret: &Secret, features: u64) -> Result<Handshaken> {
    handshake(endpoint, secret, features, None).await
}

/// Connects and opens a channel, with `Open` pipelined behind the handshake so that a
/// fresh channel costs one round trip.
pub async fn dial_open(
    endpoint: &Endpoint,
    secret: &Secret,
    features: u64,
    open: &Open,
) -> Result<(AgentHello, Opened, Conn, Vec<u8>)> {
    let h = handshake(endpoint, secret, features, Some(open)).await?;
    let hello = h.hello.clone();
    let (opened, conn, buffered) = h.read_opened().await?;
    Ok((hello, opened, conn, buffered))
}

async fn handshake(
    endpoint: &Endpoint,
    secret: &Secret,
    features: u64,
    open: Option<&Open>,
) -> Result<Handshaken> {
    let mut conn = endpoint.connect().await?;
    let mut out = preamble().to_vec();
    encode_into(
        &mut out,
        &Hello {
            features,
            secret: secret.clone(),
        },
    )?;
    if let Some(open) = open {
        encode_into(&mut out, open)?;
    }
    conn.write_all(&out).await?;
    let mut reader = FrameReader::new(conn);
    match reader.read::<HelloReply>().await? {
        Some(HelloReply::Accepted {
            features,
            agent_version,
            ..
        }) => Ok(Handshaken {
            reader,
            hello: AgentHello {
                features,
                agent_version,
            },
        }),
        Some(HelloReply::Refused(r)) => Err(AgentError::Refused(r)),
        None => Err(AgentError::Disconnected),
    }
}

impl Handshaken {
    /// Takes over a connection whose handshake someone else did (`hearthd` proxying an
    /// agent connection to the CLI), with any bytes already read from it.
    pub fn adopt(conn: Conn, buffered: Vec<u8>, hello: AgentHello) -> Handshaken {
        Handshaken {
            reader: FrameReader::from_parts(conn, buffered),
            hello,
        }
    }

    /// Gives the connection back (for proxying it elsewhere).
    pub fn into_parts(self) -> (Conn, Vec<u8>) {
        self.reader.into_parts()
    }

    /// Sends `Open` and waits for the agent's answer.
    pub async fn open(mut self, open: &Open) -> Result<(Opened, Conn, Vec<u8>)> {
        let frame = hearth_protocol::frame::encode(open)?;
        self.reader.get_mut().write_all(&frame).await?;
        self.read_opened().await
    }

    async fn read_opened(mut self) -> Result<(Opened, Conn, Vec<u8>)> {
        match self.reader.read::<OpenReply>().await? {
            Some(Ok(opened)) => {
                let (conn, buffered) = self.reader.into_parts();
                Ok((opened, conn, buffered))
            }
            Some(Err(e)) => Err(AgentError::Remote(e)),
            None => Err(AgentError::Disconnected),
        }
    }
}
