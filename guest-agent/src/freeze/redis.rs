//! Redis and Valkey: writes paused, then `SAVE`, over the server's own protocol (RESP)
//! on one kept connection, so a freeze spawns no client process.

use super::{Engine, EngineFuture, Held, Kept};
use hearth_protocol::Error;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Where the server listens and how to log in, from its configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    pub unix: Option<String>,
    pub port: u16,
    pub password: Option<String>,
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint {
            unix: None,
            port: 6379,
            password: None,
        }
    }
}

/// Reads the directives that say how to reach the server (`unixsocket`, `port`,
/// `requirepass`); everything else keeps Redis's defaults.
pub(super) fn parse_config(text: &str) -> Endpoint {
    let mut ep = Endpoint::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let value = value.trim_matches('"');
        match key.to_ascii_lowercase().as_str() {
            "unixsocket" => ep.unix = Some(value.to_string()),
            "port" => ep.port = value.parse().unwrap_or(ep.port),
            "requirepass" => ep.password = Some(value.to_string()),
            _ => {}
        }
    }
    ep
}

fn endpoint() -> Endpoint {
    [
        "/etc/valkey/valkey.conf",
        "/etc/redis/redis.conf",
        "/etc/redis.conf",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .map(|t| parse_config(&t))
    .unwrap_or_default()
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// One connection speaking RESP.
pub(super) struct Conn {
    io: BufReader<Box<dyn Stream>>,
}

/// A server's answer, as far as the freeze needs to tell them apart.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Ok(String),
    Err(String),
}

impl Conn {
    async fn open(ep: &Endpoint) -> std::io::Result<Conn> {
        let io: Box<dyn Stream> = match &ep.unix {
            Some(path) if Path::new(path).exists() => {
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
            _ => {
                let s = tokio::net::TcpStream::connect(("127.0.0.1", ep.port)).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        };
        let mut c = Conn {
            io: BufReader::new(io),
        };
        if let Some(pw) = &ep.password {
            if let Reply::Err(e) = c.call(&["AUTH", pw]).await? {
                return Err(std::io::Error::other(format!("AUTH: {e}")));
            }
        }
        Ok(c)
    }

    /// Sends one command and reads its reply.
    pub(super) async fn call(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&out).await?;
        read_reply(&mut self.io).await
    }
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Reads one reply; aggregates (arrays, bulk strings) are read whole and summarised, so
/// the stream stays in step whatever the server answers.
pub(super) async fn read_reply<R: tokio::io::AsyncBufRead + Unpin + Send>(
    r: &mut R,
) -> std::io::Result<Reply> {
    // Nested arrays are walked with a count of the replies still owed, not recursion.
    let mut owed = 1u64;
    let mut first = None;
    while owed > 0 {
        owed -= 1;
        let line = read_line(r).await?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let reply = match kind {
            "+" | ":" => Reply::Ok(rest.to_string()),
            "-" => Reply::Err(rest.to_string()),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad(format!("bulk {rest:?}")))?;
                if n >= 0 {
                    let mut data = vec![0; n as usize + 2];
                    r.read_exact(&mut data).await?;
                    data.truncate(n as usize);
                    Reply::Ok(String::from_utf8_lossy(&data).into_owned())
                } else {
                    Reply::Ok(String::new())
                }
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad(format!("array {rest:?}")))?;
                owed += n.max(0) as u64;
                Reply::Ok(format!("{n} elements"))
            }
            _ => return Err(bad(format!("unexpected reply {line:?}"))),
        };
        first.get_or_insert(reply);
    }
    first.ok_or_else(|| bad("no reply"))
}

pub(super) struct Redis {
    kept: Kept<Conn>,
}

impl Redis {
    pub fn new() -> Self {
        Redis { kept: Kept::new() }
    }
}

/// Pauses writes (ending by itself after `ms`, so a vanished host cannot leave the
/// server read-only) and saves the dataset synchronously.
async fn pause_and_save(c: &mut Conn, ms: &str) -> std::io::Result<Result<(), String>> {
    if let Reply::Err(e) = c.call(&["CLIENT", "PAUSE", ms, "WRITE"]).await? {
        return Ok(Err(format!("CLIENT PAUSE: {e}")));
    }
    if let Reply::Err(e) = c.call(&["SAVE"]).await? {
        // The pause lifts now rather than at its deadline.
        let _ = c.call(&["CLIENT", "UNPAUSE"]).await;
        return Ok(Err(format!("SAVE: {e}")));
    }
    Ok(Ok(()))
}

impl Engine for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }
    fn units(&self) -> &'static [&'static str] {
        &[
            "redis-server.service",
            "redis-server@*.service",
            "redis.service",
            "valkey-server.service",
            "valkey-server@*.service",
            "valkey.service",
        ]
    }
    fn freeze(&self, _units: Vec<String>, timeout: Duration) -> EngineFuture<'_> {
        // The RDB file then holds every write acknowledged before the freeze, and none
        // after it.
        Box::pin(async move {
            let ms = timeout.as_millis().to_string();
            let ep = endpoint();
            let io = |e: std::io::Error| Error::from_io(&e, "redis");
            // A kept connection the server has since closed fails at once; one new
            // connection is then tried (the commands are safe to repeat).
            let mut conn = match self.kept.take() {
                Some(mut c) => match pause_and_save(&mut c, &ms).await {
                    Ok(r) => Some((c, r)),
                    Err(e) => {
                        tracing::debug!("kept redis connection: {e}; reconnecting");
                        None
                    }
                },
                None => None,
            };
            if conn.is_none() {
                let mut c = Conn::open(&ep).await.map_err(io)?;
                let r = pause_and_save(&mut c, &ms).await.map_err(io)?;
                conn = Some((c, r));
            }
            let Some((c, r)) = conn else {
                return Err(Error::internal("redis: no connection"));
            };
            if let Err(e) = r {
                self.kept.put(c);
                return Err(Error::internal(format!("redis {e}")));
            }
            let kept = self.kept.clone();
            Ok(Held::release(async move {
                let mut c = c;
                match c.call(&["CLIENT", "UNPAUSE"]).await {
                    Ok(Reply::Ok(_)) => kept.put(c),
                    Ok(Reply::Err(e)) => tracing::warn!("redis CLIENT UNPAUSE: {e}"),
                    // The pause ends at its deadline anyway.
                    Err(e) => tracing::warn!("redis CLIENT UNPAUSE: {e}"),
                }
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_how_to_reach_the_server_from_its_config() {
        let ep = parse_config(
            "# port 1\nbind 127.0.0.1 -::1\nport 6380\n  unixsocket /run/redis/redis.sock\n\
             requirepass \"s3cret\"\nsave 900 1\n",
        );
        assert_eq!(ep.port, 6380);
        assert_eq!(ep.unix.as_deref(), Some("/run/redis/redis.sock"));
        assert_eq!(ep.password.as_deref(), Some("s3cret"));
        assert_eq!(parse_config("port nonsense\n"), Endpoint::default());
    }

    #[tokio::test]
    async fn reads_each_kind_of_reply_and_stays_in_step() {
        let wire: &[u8] = b"+OK\r\n-ERR paused\r\n:42\r\n$5\r\nhello\r\n$-1\r\n\
                           *2\r\n$1\r\na\r\n*1\r\n:1\r\n+after\r\n";
        let mut r = BufReader::new(wire);
        assert_eq!(read_reply(&mut r).await.unwrap(), Reply::Ok("OK".into()));
        assert_eq!(
            read_reply(&mut r).await.unwrap(),
            Reply::Err("ERR paused".into())
        );
        assert_eq!(read_reply(&mut r).await.unwrap(), Reply::Ok("42".into()));
        assert_eq!(read_reply(&mut r).await.unwrap(), Reply::Ok("hello".into()));
        assert_eq!(read_reply(&mut r).await.unwrap(), Reply::Ok(String::new()));
        assert_eq!(
            read_reply(&mut r).await.unwrap(),
            Reply::Ok("2 elements".into())
        );
        assert_eq!(read_reply(&mut r).await.unwrap(), Reply::Ok("after".into()));
        assert!(read_reply(&mut r).await.is_err(), "end of stream");
        let mut r = BufReader::new(&b"?what\r\n"[..]);
        assert!(read_reply(&mut r).await.is_err());
    }
}
