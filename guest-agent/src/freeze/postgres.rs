//! PostgreSQL: a checkpoint when the WAL since the last one is long, over the server's
//! own protocol on a kept connection per cluster (no client process, no backend fork
//! per freeze).
//!
//! The snapshot is atomic, so WAL replay alone makes it consistent (PostgreSQL starts a
//! branch with recovery whatever we do: only a clean shutdown avoids that). A checkpoint
//! writes every dirty page first so a branch replays only what came after it; it costs
//! 50-150 ms of fsyncs under load, so it is taken only when the WAL since the last one is
//! more than a moment's replay.

use super::{Engine, EngineFuture, Failure, Held, Kept};
use hearth_protocol::Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// WAL since the last checkpoint beyond which the freeze takes one (about a second of
/// replay for a branch on this class of machine).
const CHECKPOINT_AFTER_WAL_BYTES: u64 = 64 << 20;

/// Where one cluster listens: its socket directory and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Cluster {
    pub socket_dir: PathBuf,
    pub port: u16,
}

impl Cluster {
    fn socket(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }
}

/// The cluster a systemd unit runs: Debian's `postgresql@<version>-<name>.service`
/// reads `/etc/postgresql/<version>/<name>/postgresql.conf`; anything else is taken
/// for the default cluster.
pub(super) fn cluster_of(unit: &str, etc: &Path) -> Cluster {
    let conf = unit
        .strip_prefix("postgresql@")
        .and_then(|u| u.strip_suffix(".service"))
        .and_then(|inst| inst.split_once('-'))
        .and_then(|(ver, name)| {
            std::fs::read_to_string(etc.join(ver).join(name).join("postgresql.conf")).ok()
        });
    parse_config(conf.as_deref().unwrap_or(""))
}

/// `port` and the first of `unix_socket_directories`, with PostgreSQL's defaults
/// (Debian's socket directory).
pub(super) fn parse_config(text: &str) -> Cluster {
    let mut c = Cluster {
        socket_dir: PathBuf::from("/var/run/postgresql"),
        port: 5432,
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('\'');
        match key.trim() {
            "port" => c.port = value.parse().unwrap_or(c.port),
            "unix_socket_directories" => {
                if let Some(dir) = value.split(',').map(str::trim).find(|d| !d.is_empty()) {
                    c.socket_dir = PathBuf::from(dir);
                }
            }
            _ => {}
        }
    }
    c
}

/// Connects as the `postgres` user, whom Debian's `pg_hba.conf` lets in by peer
/// authentication: the server takes the user from the socket's credentials, which are
/// the connecting thread's effective ids at `connect()`. A thread of its own switches
/// to them (the raw syscalls change that thread alone, unlike libc's wrappers, which
/// change every thread) and ends, taking the switched ids with it.
async fn connect_as_postgres(socket: PathBuf) -> Result<UnixStream, Error> {
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or_else(|| Error::not_found("no postgres user"))?;
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pg-connect".into())
        .spawn(move || {
            // -1: the real and saved ids stay as they are (root, to switch back to).
            let keep = libc::uid_t::MAX;
            // SAFETY: plain syscalls on this thread's own credentials.
            let switched = unsafe {
                libc::syscall(libc::SYS_setresgid, keep, gid, keep) == 0
                    && libc::syscall(libc::SYS_setresuid, keep, uid, keep) == 0
            };
            let r = if switched {
                std::os::unix::net::UnixStream::connect(&socket)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
            } else {
                Err(std::io::Error::last_os_error())
            };
            let _ = tx.send(r.map_err(|e| Error::from_io(&e, socket.display())));
        })
        .map_err(|e| Error::from_io(&e, "thread"))?;
    let s = rx
        .await
        .map_err(|_| Error::internal("postgresql connect thread died"))??;
    UnixStream::from_std(s).map_err(|e| Error::from_io(&e, "postgresql socket"))
}

/// One session speaking PostgreSQL's frontend/backend protocol (version 3), simple
/// queries only.
pub(super) struct Conn {
    io: UnixStream,
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// An ErrorResponse's human message (field `M`), with its SQLSTATE (`C`).
pub(super) fn error_message(body: &[u8]) -> String {
    let mut msg = String::new();
    let mut code = String::new();
    for field in body.split(|&b| b == 0) {
        if let Some((&kind, text)) = field.split_first() {
            match kind {
                b'M' => msg = String::from_utf8_lossy(text).into_owned(),
                b'C' => code = String::from_utf8_lossy(text).into_owned(),
                _ => {}
            }
        }
    }
    if code.is_empty() {
        msg
    } else {
        format!("{msg} ({code})")
    }
}

/// The first column of a DataRow (None for NULL).
pub(super) fn first_column(body: &[u8]) -> Option<String> {
    let n = i16::from_be_bytes(body.get(0..2)?.try_into().ok()?);
    if n < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    body.get(6..6 + len)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

impl Conn {
    async fn open(cluster: &Cluster) -> Result<Conn, Error> {
        let io = connect_as_postgres(cluster.socket()).await?;
        let mut c = Conn { io };
        c.startup()
            .await
            .map_err(|e| Error::internal(format!("postgresql login: {}", e.describe())))?;
        Ok(c)
    }

    async fn read_message(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.io.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=1 << 24).contains(&len) {
            return Err(bad(format!("message of {len} bytes")));
        }
        let mut body = vec![0; len - 4];
        self.io.read_exact(&mut body).await?;
        Ok((head[0], body))
    }

    async fn startup(&mut self) -> Result<(), Failure> {
        let mut params = Vec::new();
        for (k, v) in [
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", "hearth-agent"),
        ] {
            params.extend_from_slice(k.as_bytes());
            params.push(0);
            params.extend_from_slice(v.as_bytes());
            params.push(0);
        }
        params.push(0);
        let mut msg = ((params.len() + 8) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&196608u32.to_be_bytes()); // protocol 3.0
        msg.extend_from_slice(&params);
        self.io.write_all(&msg).await?;
        loop {
            let (kind, body) = self.read_message().await?;
            match kind {
                b'R' => {
                    let code = body
                        .get(0..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    if code != Some(0) {
                        return Err(Failure::Server(format!(
                            "the server asks for a password (authentication request {code:?}); \
                             the agent logs in as postgres by peer authentication"
                        )));
                    }
                }
                b'E' => return Err(Failure::Server(error_message(&body))),
                b'Z' => return Ok(()),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    /// Runs one simple query; returns the first column of its first row, if any.
    pub(super) async fn query(&mut self, sql: &str) -> Result<Option<String>, Failure> {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.io.write_all(&msg).await?;
        let mut first = None;
        let mut error = None;
        loop {
            let (kind, body) = self.read_message().await?;
            match kind {
                b'D' if first.is_none() => first = first_column(&body),
                b'E' => error = Some(error_message(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(Failure::Server(e)),
            None => Ok(first),
        }
    }
}

/// The query deciding whether a checkpoint is worth it (never on a standby, which
/// cannot write WAL of its own).
fn needs_checkpoint_sql() -> String {
    format!(
        "SELECT NOT pg_is_in_recovery() AND \
         pg_current_wal_lsn() - (SELECT redo_lsn FROM pg_control_checkpoint()) \
         > {CHECKPOINT_AFTER_WAL_BYTES}"
    )
}

async fn quiesce(c: &mut Conn) -> Result<(), Failure> {
    if c.query(&needs_checkpoint_sql()).await?.as_deref() == Some("t") {
        c.query("CHECKPOINT").await?;
    }
    Ok(())
}

pub(super) struct Postgres {
    /// A kept session per cluster.
    kept: Mutex<HashMap<Cluster, Kept<Conn>>>,
}

impl Postgres {
    pub fn new() -> Self {
        Postgres {
            kept: Mutex::default(),
        }
    }

    fn kept(&self, cluster: &Cluster) -> Kept<Conn> {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cluster.clone())
            .or_default()
            .clone()
    }

    async fn freeze_cluster(&self, cluster: Cluster) -> Result<(), Error> {
        let kept = self.kept(&cluster);
        let fail = |e: Failure| Error::internal(format!("postgresql: {}", e.describe()));
        // A kept session the server has since closed fails at once; one new session is
        // then tried (the queries are safe to repeat).
        if let Some(mut c) = kept.take() {
            match quiesce(&mut c).await {
                Ok(()) => {
                    kept.put(c);
                    return Ok(());
                }
                Err(Failure::Server(m)) => {
                    kept.put(c);
                    return Err(fail(Failure::Server(m)));
                }
                Err(Failure::Io(e)) => tracing::debug!("kept postgresql session: {e}"),
            }
        }
        let mut c = Conn::open(&cluster).await?;
        quiesce(&mut c).await.map_err(fail)?;
        kept.put(c);
        Ok(())
    }
}

impl Engine for Postgres {
    fn name(&self) -> &'static str {
        "postgresql"
    }
    fn units(&self) -> &'static [&'static str] {
        &["postgresql.service", "postgresql@*.service"]
    }
    fn freeze(&self, units: Vec<String>, _timeout: Duration) -> EngineFuture<'_> {
        Box::pin(async move {
            // Every running cluster; Debian's umbrella `postgresql.service` alone means
            // the default one.
            let etc = Path::new("/etc/postgresql");
            let mut clusters: Vec<Cluster> = units
                .iter()
                .filter(|u| u.starts_with("postgresql@"))
                .map(|u| cluster_of(u, etc))
                .collect();
            if clusters.is_empty() {
                clusters.push(parse_config(""));
            }
            clusters.sort_by(|a, b| (a.port, &a.socket_dir).cmp(&(b.port, &b.socket_dir)));
            clusters.dedup();
            // One after another: a guest rarely runs more than one.
            for c in clusters {
                self.freeze_cluster(c).await?;
            }
            Ok(Held::Nothing)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_clusters_socket_from_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("17/main");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("postgresql.conf"),
            "#port = 1\nport = 5433\t\t# (change requires restart)\n\
             unix_socket_directories = '/run/pg, /tmp'\n",
        )
        .unwrap();
        let c = cluster_of("postgresql@17-main.service", dir.path());
        assert_eq!(c.port, 5433);
        assert_eq!(c.socket(), PathBuf::from("/run/pg/.s.PGSQL.5433"));
        // Unknown cluster or the umbrella unit: the defaults.
        let d = cluster_of("postgresql@16-other.service", dir.path());
        assert_eq!(
            d.socket(),
            PathBuf::from("/var/run/postgresql/.s.PGSQL.5432")
        );
        assert_eq!(cluster_of("postgresql.service", dir.path()), d);
    }

    #[test]
    fn decodes_rows_and_errors() {
        // One column, value "t".
        assert_eq!(
            first_column(&[0, 1, 0, 0, 0, 1, b't']).as_deref(),
            Some("t")
        );
        // NULL, no columns, truncated.
        assert_eq!(first_column(&[0, 1, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(first_column(&[0, 0]), None);
        assert_eq!(first_column(&[0, 1, 0, 0, 0, 9, b't']), None);
        let e = b"SERROR\0C42501\0Mmust be superuser\0\0";
        assert_eq!(error_message(e), "must be superuser (42501)");
    }
}
