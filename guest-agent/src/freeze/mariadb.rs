//! MariaDB and MySQL: `FLUSH TABLES WITH READ LOCK` held on a session until thaw, over
//! the server's own client protocol on a kept connection (no client process per
//! freeze). The read lock lives as long as its session and also blocks commits, so
//! nothing acknowledged after the freeze is in the snapshot.

use super::{Engine, EngineFuture, Failure, Held, Kept};
use hearth_protocol::Error;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where Debian's packages put the server's socket (MariaDB, then MySQL's older name).
const SOCKETS: [&str; 2] = ["/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock"];

const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// An ERR packet's message, with its error code.
pub(super) fn error_message(p: &[u8]) -> String {
    let code = p.get(1..3).map(|c| u16::from_le_bytes([c[0], c[1]]));
    let mut text = p.get(3..).unwrap_or_default();
    // Protocol 4.1 puts '#' and a five-character SQL state before the message.
    if text.first() == Some(&b'#') && text.len() >= 6 {
        text = &text[6..];
    }
    let text = String::from_utf8_lossy(text);
    match code {
        Some(c) => format!("{text} (error {c})"),
        None => text.into_owned(),
    }
}

/// The client's half of the handshake: protocol 4.1, user `root` with no password, and
/// `unix_socket` as the authentication method (Debian's root account is identified by
/// the socket's peer: the agent runs as root).
pub(super) fn handshake_response(server_caps: u32) -> Vec<u8> {
    let caps = (CLIENT_LONG_PASSWORD
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_PLUGIN_AUTH)
        & (server_caps | CLIENT_LONG_PASSWORD);
    let mut p = caps.to_le_bytes().to_vec();
    p.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet
    p.push(45); // utf8mb4_general_ci
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(b"root\0");
    p.push(0); // no auth data
    if caps & CLIENT_PLUGIN_AUTH != 0 {
        p.extend_from_slice(b"unix_socket\0");
    }
    p
}

/// The server's capability flags from its initial handshake (protocol 10).
pub(super) fn server_caps(p: &[u8]) -> Result<u32, std::io::Error> {
    if p.first() != Some(&10) {
        return Err(bad(format!("handshake protocol {:?}", p.first())));
    }
    let version_end = p[1..]
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| bad("handshake without a version"))?
        + 1;
    // version NUL, connection id (4), scramble part 1 (8), filler (1), caps low (2),
    // charset (1), status (2), caps high (2).
    let at = version_end + 1 + 4 + 8 + 1;
    let low = p.get(at..at + 2).ok_or_else(|| bad("short handshake"))?;
    let high = p.get(at + 5..at + 7).unwrap_or(&[0, 0]);
    Ok(u32::from(u16::from_le_bytes([low[0], low[1]]))
        | u32::from(u16::from_le_bytes([high[0], high[1]])) << 16)
}

pub(super) struct Conn {
    io: UnixStream,
    seq: u8,
}

impl Conn {
    async fn read_packet(&mut self) -> std::io::Result<Vec<u8>> {
        let mut head = [0u8; 4];
        self.io.read_exact(&mut head).await?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
        self.seq = head[3].wrapping_add(1);
        let mut p = vec![0; len];
        self.io.read_exact(&mut p).await?;
        Ok(p)
    }

    async fn write_packet(&mut self, p: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(p.len())
            .ok()
            .filter(|&l| l < 1 << 24)
            .ok_or_else(|| bad("packet too long"))?;
        let mut out = len.to_le_bytes()[..3].to_vec();
        out.push(self.seq);
        out.extend_from_slice(p);
        self.seq = self.seq.wrapping_add(1);
        self.io.write_all(&out).await
    }

    async fn open(socket: &Path) -> Result<Conn, Failure> {
        let io = UnixStream::connect(socket).await?;
        let mut c = Conn { io, seq: 0 };
        let hello = c.read_packet().await?;
        if hello.first() == Some(&0xff) {
            return Err(Failure::Server(error_message(&hello)));
        }
        let caps = server_caps(&hello)?;
        c.write_packet(&handshake_response(caps)).await?;
        // The server may switch methods (root is often `mysql_native_password USING
        // 'invalid' OR unix_socket`): each is answered with no secret until the socket
        // method lets us in.
        for _ in 0..4 {
            let p = c.read_packet().await?;
            match p.first() {
                Some(0x00) => return Ok(c),
                Some(0xff) => return Err(Failure::Server(error_message(&p))),
                Some(0xfe) => c.write_packet(&[]).await?,
                _ => {
                    return Err(Failure::Server(
                        "the server wants a password for root; the agent logs in by \
                         unix_socket authentication"
                            .into(),
                    ))
                }
            }
        }
        Err(Failure::Server("authentication did not finish".into()))
    }

    /// Runs one statement that returns no rows.
    pub(super) async fn execute(&mut self, sql: &str) -> Result<(), Failure> {
        self.seq = 0;
        let mut p = vec![0x03]; // COM_QUERY
        p.extend_from_slice(sql.as_bytes());
        self.write_packet(&p).await?;
        let r = self.read_packet().await?;
        match r.first() {
            Some(0x00) => Ok(()),
            Some(0xff) => Err(Failure::Server(error_message(&r))),
            _ => Err(Failure::Io(bad(format!(
                "{sql}: a result set was not expected"
            )))),
        }
    }
}

async fn lock(c: &mut Conn, timeout: Duration) -> Result<(), Failure> {
    // A long query holding a table makes the lock wait, and every writer queues behind
    // the waiting lock: bounded by the freeze's own timeout.
    c.execute(&format!(
        "SET SESSION lock_wait_timeout = {}",
        timeout.as_secs().max(1)
    ))
    .await?;
    c.execute("FLUSH TABLES WITH READ LOCK").await
}

pub(super) struct MariaDb {
    kept: Kept<Conn>,
}

impl MariaDb {
    pub fn new() -> Self {
        MariaDb { kept: Kept::new() }
    }
}

impl Engine for MariaDb {
    fn name(&self) -> &'static str {
        "mariadb"
    }
    fn units(&self) -> &'static [&'static str] {
        &["mariadb.service", "mariadb@*.service", "mysql.service"]
    }
    fn freeze(&self, _units: Vec<String>, timeout: Duration) -> EngineFuture<'_> {
        Box::pin(async move {
            let fail = |e: Failure| Error::internal(format!("mariadb: {}", e.describe()));
            let locked = async {
                // A kept session the server has since closed fails at once; one new
                // session is then tried (a dead session holds no lock).
                if let Some(mut c) = self.kept.take() {
                    match lock(&mut c, timeout).await {
                        Ok(()) => return Ok(c),
                        Err(Failure::Server(m)) => return Err(Failure::Server(m)),
                        Err(Failure::Io(e)) => tracing::debug!("kept mariadb session: {e}"),
                    }
                }
                let socket = SOCKETS
                    .iter()
                    .map(Path::new)
                    .find(|p| p.exists())
                    .unwrap_or(Path::new(SOCKETS[0]));
                let mut c = Conn::open(socket).await?;
                lock(&mut c, timeout).await?;
                Ok(c)
            };
            let c = match tokio::time::timeout(timeout, locked).await {
                Ok(r) => r.map_err(fail)?,
                Err(_) => {
                    return Err(Error::new(
                        hearth_protocol::ErrorKind::TimedOut,
                        format!("mariadb: read lock not taken within {timeout:?}"),
                    ))
                }
            };
            let kept = self.kept.clone();
            Ok(Held::release(async move {
                let mut c = c;
                match c.execute("UNLOCK TABLES").await {
                    Ok(()) => kept.put(c),
                    // Dropping the session releases its lock.
                    Err(e) => tracing::warn!("mariadb UNLOCK TABLES: {}", e.describe()),
                }
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MariaDB 11.8 initial handshake, as captured from Debian 13's server.
    fn hello() -> Vec<u8> {
        let mut p = vec![10];
        p.extend_from_slice(b"11.8.3-MariaDB-0+deb13u1\0");
        p.extend_from_slice(&7u32.to_le_bytes()); // connection id
        p.extend_from_slice(b"abcdefgh\0"); // scramble 1 + filler
        p.extend_from_slice(&0xf7feu16.to_le_bytes()); // caps low
        p.push(45);
        p.extend_from_slice(&2u16.to_le_bytes()); // status
        p.extend_from_slice(&0x81bfu16.to_le_bytes()); // caps high
        p.push(21);
        p.extend_from_slice(&[0; 10]);
        p.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
        p
    }

    #[test]
    fn answers_the_handshake_as_root_over_the_socket() {
        let caps = server_caps(&hello()).unwrap();
        assert_eq!(caps, 0x81bf_f7fe);
        let r = handshake_response(caps);
        let got = u32::from_le_bytes(r[0..4].try_into().unwrap());
        assert_ne!(got & CLIENT_PROTOCOL_41, 0);
        assert_ne!(got & CLIENT_PLUGIN_AUTH, 0);
        assert!(r.ends_with(b"root\0\0unix_socket\0"));
        assert_eq!(r.len(), 4 + 4 + 1 + 23 + 5 + 1 + 12);
        assert!(server_caps(&[9, 0]).is_err());
        assert!(server_caps(&[10, b'x']).is_err());
    }

    #[test]
    fn reads_error_packets() {
        let mut p = vec![0xff];
        p.extend_from_slice(&1045u16.to_le_bytes());
        p.extend_from_slice(b"#28000Access denied");
        assert_eq!(error_message(&p), "Access denied (error 1045)");
    }
}
