//! Freezing the guest's disk state for a snapshot: each running database engine is
//! asked to make its files consistent (the way that engine needs), then the file system
//! is synced. The freeze holds until the host thaws it, or until a deadline, so a host
//! that dies mid-snapshot never leaves a database locked.
//!
//! Engines are plug-ins behind [`Engine`]: the service catalog adds more without
//! touching this code.

use hearth_protocol::Error;
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// What an engine holds while frozen; [`Held::thaw`] releases it.
pub enum Held {
    /// Nothing to hold: the engine's work was done at freeze time (a checkpoint).
    Nothing,
    /// A client session that keeps a lock until told otherwise (MariaDB's
    /// `FLUSH TABLES WITH READ LOCK` lives as long as its session); `release` is written
    /// to its stdin at thaw before it is closed.
    Session {
        child: Child,
        release: &'static [u8],
    },
    /// A command that lifts what the freeze set up (Redis `CLIENT UNPAUSE`).
    Command(Vec<String>),
}

impl Held {
    async fn thaw(self) {
        match self {
            Held::Nothing => {}
            Held::Session { mut child, release } => {
                if let Some(mut stdin) = child.stdin.take() {
                    let _ = stdin.write_all(release).await;
                    drop(stdin);
                }
                // The lock goes with the release (or with the session, at the latest);
                // the client's own exit is not worth making the host wait for.
                tokio::spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(5), child.wait())
                        .await
                        .is_err()
                    {
                        let _ = child.kill().await;
                    }
                });
            }
            Held::Command(argv) => {
                if let Some((prog, args)) = argv.split_first() {
                    if let Err(e) = run(command(prog).args(args), "thaw").await {
                        tracing::warn!("thaw {prog}: {e}");
                    }
                }
            }
        }
    }
}

pub type EngineFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Held, Error>> + Send + 'a>>;

/// A database engine that can be quiesced.
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    /// systemd units whose being active means the engine runs.
    fn units(&self) -> &'static [&'static str];
    /// Makes the engine's files consistent on disk and holds them so until thawed;
    /// whatever it holds must also end by itself after `timeout`.
    fn freeze(&self, timeout: Duration) -> EngineFuture<'_>;
}

/// A command for an engine's client. The agent may run as the guest's init, before
/// anything set a PATH, and the clients live in sbin directories too.
fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", crate::exec::DEFAULT_PATH);
    c
}

async fn run(cmd: &mut Command, what: &str) -> Result<(), Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::from_io(&e, what))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

struct Postgres;
impl Engine for Postgres {
    fn name(&self) -> &'static str {
        "postgresql"
    }
    fn units(&self) -> &'static [&'static str] {
        &["postgresql.service", "postgresql@*.service"]
    }
    fn freeze(&self, _timeout: Duration) -> EngineFuture<'_> {
        // The snapshot is atomic, so WAL replay alone makes it consistent (PostgreSQL
        // starts a branch with recovery whatever we do: only a clean shutdown avoids
        // that). A checkpoint writes every dirty page first so the branch replays only
        // what came after it; it costs 50-150 ms under load, so it is taken only when
        // the WAL since the last one is more than a moment's replay.
        Box::pin(async {
            // psql as the postgres user directly (peer authentication over the socket):
            // runuser would open a PAM session, ~20-40 ms.
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| Error::not_found("no postgres user"))?;
            let mut child = command(&psql())
                .args(["-qAt", "-v", "ON_ERROR_STOP=1", "-f", "-"])
                .uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &user.dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| Error::from_io(&e, "psql"))?;
            if let Some(mut stdin) = child.stdin.take() {
                let script = format!(
                    "SELECT 'CHECKPOINT' WHERE pg_current_wal_lsn() - \
                     (SELECT redo_lsn FROM pg_control_checkpoint()) > {CHECKPOINT_AFTER_WAL_BYTES} \\gexec\n"
                );
                stdin
                    .write_all(script.as_bytes())
                    .await
                    .map_err(|e| Error::from_io(&e, "psql"))?;
            }
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| Error::from_io(&e, "psql"))?;
            if !out.status.success() {
                return Err(Error::internal(format!(
                    "postgresql CHECKPOINT: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(Held::Nothing)
        })
    }
}

/// WAL since the last checkpoint beyond which the freeze takes one (about a second of
/// replay for a branch on this class of machine).
const CHECKPOINT_AFTER_WAL_BYTES: u64 = 64 << 20;

/// Debian's `psql` is a Perl wrapper choosing a version (~25 ms to start); the newest
/// installed client binary does the same job directly.
fn psql() -> String {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max();
    match newest {
        Some(v) if std::path::Path::new(&format!("/usr/lib/postgresql/{v}/bin/psql")).exists() => {
            format!("/usr/lib/postgresql/{v}/bin/psql")
        }
        _ => "psql".into(),
    }
}

struct Redis;
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
    fn freeze(&self, timeout: Duration) -> EngineFuture<'_> {
        // Writes are paused first (for at most the freeze's timeout, so a vanished host
        // cannot leave Redis read-only), then SAVE writes the dataset synchronously: the
        // RDB file holds every write acknowledged before the freeze, and none after.
        Box::pin(async move {
            let cli = if std::path::Path::new("/usr/bin/valkey-cli").exists() {
                "valkey-cli"
            } else {
                "redis-cli"
            };
            let ms = timeout.as_millis().to_string();
            run(
                command(cli).args(["CLIENT", "PAUSE", &ms, "WRITE"]),
                "redis CLIENT PAUSE",
            )
            .await?;
            let unpause = Held::Command(vec![cli.into(), "CLIENT".into(), "UNPAUSE".into()]);
            if let Err(e) = run(command(cli).arg("SAVE"), "redis SAVE").await {
                unpause.thaw().await;
                return Err(e);
            }
            Ok(unpause)
        })
    }
}

/// Starts a client whose session holds a lock: writes `lock` to its stdin and waits
/// (up to `timeout`) until its output says `ready`; the lock lasts until `release` is
/// written at thaw, or until the session ends.
async fn locked_session(
    argv: &[&str],
    lock: &[u8],
    ready: &str,
    release: &'static [u8],
    timeout: Duration,
) -> Result<Held, Error> {
    use tokio::io::AsyncBufReadExt;
    let what = argv[0];
    let mut child = command(what)
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::from_io(&e, what))?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::internal(format!("{what}: no stdio pipes")));
    };
    stdin
        .write_all(lock)
        .await
        .map_err(|e| Error::from_io(&e, what))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if line.trim() == ready {
                return Ok(true);
            }
        }
        Ok::<_, std::io::Error>(false)
    };
    match tokio::time::timeout(timeout, wait).await {
        Err(_) => Err(Error::new(
            hearth_protocol::ErrorKind::TimedOut,
            format!("{what}: lock not taken within {timeout:?}"),
        )),
        Ok(Err(e)) => Err(Error::from_io(&e, what)),
        Ok(Ok(false)) => Err(Error::internal(format!(
            "{what}: the session ended before the lock was taken"
        ))),
        Ok(Ok(true)) => {
            child.stdin = Some(stdin);
            Ok(Held::Session { child, release })
        }
    }
}

struct MariaDb;
impl Engine for MariaDb {
    fn name(&self) -> &'static str {
        "mariadb"
    }
    fn units(&self) -> &'static [&'static str] {
        &["mariadb.service", "mariadb@*.service", "mysql.service"]
    }
    fn freeze(&self, timeout: Duration) -> EngineFuture<'_> {
        // The read lock holds only while its session lives: keep a client open with the
        // lock taken (it also blocks commits, so nothing acknowledged after the freeze is
        // in the snapshot), and release it at thaw.
        Box::pin(locked_session(
            &["mariadb", "--batch", "--unbuffered", "--skip-column-names"],
            b"FLUSH TABLES WITH READ LOCK;\nSELECT 'hearth-locked';\n",
            "hearth-locked",
            b"UNLOCK TABLES;\n",
            timeout,
        ))
    }
}

/// MongoDB is not in Debian's archive, so this engine is exercised only where an
/// operator installed it; it follows MongoDB's documented snapshot procedure.
struct MongoDb;
impl Engine for MongoDb {
    fn name(&self) -> &'static str {
        "mongodb"
    }
    fn units(&self) -> &'static [&'static str] {
        &["mongod.service", "mongodb.service"]
    }
    fn freeze(&self, timeout: Duration) -> EngineFuture<'_> {
        // fsyncLock flushes and blocks writes until fsyncUnlock on the same session.
        Box::pin(locked_session(
            &["mongosh", "--quiet", "--norc"],
            b"db.fsyncLock(); print('hearth-locked')\n",
            "hearth-locked",
            b"db.fsyncUnlock()\n",
            timeout,
        ))
    }
}

/// The built-in engines.
pub fn builtin_engines() -> Vec<Arc<dyn Engine>> {
    vec![
        Arc::new(Postgres),
        Arc::new(MariaDb),
        Arc::new(Redis),
        Arc::new(MongoDb),
    ]
}

/// The names of the active units matching `patterns`, from systemd over the D-Bus
/// system bus, else through `systemctl` (a guest whose bus is not up yet). A guest
/// without systemd has none. (systemd's private peer-to-peer socket would not need the
/// bus daemon, but zbus 5.19 panics on the sender field of its replies.)
async fn active_units(patterns: &[&str]) -> Vec<String> {
    match dbus_active_units(patterns).await {
        Ok(units) => units,
        Err(e) => {
            tracing::debug!("systemd over D-Bus: {e}; asking systemctl");
            systemctl_active_units().await
        }
    }
}

type UnitStatus = (
    String,
    String,
    String,
    String,
    String,
    String,
    zbus::zvariant::OwnedObjectPath,
    u32,
    String,
    zbus::zvariant::OwnedObjectPath,
);

async fn dbus_active_units(patterns: &[&str]) -> zbus::Result<Vec<String>> {
    let conn = zbus::Connection::system().await?;
    let reply = conn
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "ListUnitsByPatterns",
            &(["active"].as_slice(), patterns),
        )
        .await?;
    let units: Vec<UnitStatus> = reply.body().deserialize()?;
    Ok(units.into_iter().map(|u| u.0).collect())
}

async fn systemctl_active_units() -> Vec<String> {
    let out = command("systemctl")
        .args([
            "list-units",
            "--type=service",
            "--state=active",
            "--plain",
            "--no-legend",
            "--no-pager",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Does `unit` match `pattern`, where a `*` in the pattern stands for any instance
/// (`postgresql@*.service` matches `postgresql@17-main.service`)?
fn unit_matches(pattern: &str, unit: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == unit,
        Some((pre, post)) => {
            unit.len() >= pre.len() + post.len() && unit.starts_with(pre) && unit.ends_with(post)
        }
    }
}

/// Flushes every dirty page of the root file system (and so every file on it).
fn syncfs_root() -> Result<(), Error> {
    let f = std::fs::File::open("/").map_err(|e| Error::from_io(&e, "/"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(Error::from_io(&std::io::Error::last_os_error(), "syncfs /"));
    }
    Ok(())
}

struct Freeze {
    held: Vec<Held>,
    auto_thaw: tokio::task::AbortHandle,
}

/// The freezes in effect, by id.
pub struct Freezer {
    engines: Vec<Arc<dyn Engine>>,
    next: AtomicU64,
    active: Arc<Mutex<HashMap<u64, Freeze>>>,
}

impl Default for Freezer {
    fn default() -> Self {
        Freezer::new(builtin_engines())
    }
}

impl Freezer {
    pub fn new(engines: Vec<Arc<dyn Engine>>) -> Self {
        Freezer {
            engines,
            next: AtomicU64::new(1),
            active: Arc::default(),
        }
    }

    /// Quiesces every running engine, then syncs. Returns the freeze id and the engines
    /// quiesced. On any failure everything already held is released.
    pub async fn freeze(&self, timeout: Duration) -> Result<(u64, Vec<String>), Error> {
        let patterns: Vec<&str> = self
            .engines
            .iter()
            .flat_map(|e| e.units().iter().copied())
            .collect();
        let running = active_units(&patterns).await;
        // Engines are independent, so they quiesce at the same time: the freeze costs
        // the slowest engine, not the sum.
        let mut set = tokio::task::JoinSet::new();
        for (i, e) in self.engines.iter().enumerate() {
            let on = e
                .units()
                .iter()
                .any(|p| running.iter().any(|u| unit_matches(p, u)));
            if on {
                let e = e.clone();
                set.spawn(async move { (i, e.name(), e.freeze(timeout).await) });
            }
        }
        let mut done = Vec::new();
        let mut failed = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok((i, name, Ok(h))) => done.push((i, name, h)),
                Ok((_, name, Err(err))) => {
                    failed.get_or_insert(Error::internal(format!("freeze {name}: {err}")));
                }
                Err(e) => {
                    failed.get_or_insert(Error::internal(format!("freeze worker: {e}")));
                }
            }
        }
        done.sort_by_key(|d| d.0);
        let names: Vec<String> = done.iter().map(|d| d.1.to_string()).collect();
        let held: Vec<Held> = done.into_iter().map(|d| d.2).collect();
        if let Some(err) = failed {
            for h in held {
                h.thaw().await;
            }
            return Err(err);
        }
        let synced = tokio::task::spawn_blocking(syncfs_root)
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("syncfs worker: {e}"))));
        if let Err(e) = synced {
            for h in held {
                h.thaw().await;
            }
            return Err(e);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let active = self.active.clone();
        let auto = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let f = active.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            if let Some(f) = f {
                tracing::warn!("freeze {id} not thawed within {timeout:?}; thawing");
                for h in f.held {
                    h.thaw().await;
                }
            }
        });
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Freeze {
                    held,
                    auto_thaw: auto.abort_handle(),
                },
            );
        Ok((id, names))
    }

    pub async fn thaw(&self, id: u64) -> Result<(), Error> {
        let f = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or_else(|| {
                Error::not_found(format!("no freeze {id} (already thawed or timed out)"))
            })?;
        f.auto_thaw.abort();
        for h in f.held {
            h.thaw().await;
        }
        Ok(())
    }

    pub fn frozen(&self) -> usize {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_patterns_match_instances() {
        assert!(unit_matches("mariadb.service", "mariadb.service"));
        assert!(!unit_matches("mariadb.service", "mariadb-backup.service"));
        assert!(unit_matches(
            "postgresql@*.service",
            "postgresql@17-main.service"
        ));
        assert!(!unit_matches("postgresql@*.service", "postgresql.service"));
        assert!(!unit_matches(
            "redis-server@*.service",
            "redis-server@.servic"
        ));
    }

    #[tokio::test]
    async fn freeze_syncs_and_thaws_by_itself_when_the_host_vanishes() {
        let f = Freezer::new(Vec::new());
        let (id, engines) = f.freeze(Duration::from_millis(100)).await.unwrap();
        assert!(engines.is_empty());
        assert_eq!(f.frozen(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(f.frozen(), 0, "the freeze must end by itself");
        assert_eq!(
            f.thaw(id).await.unwrap_err().kind,
            hearth_protocol::ErrorKind::NotFound
        );
        let (id, _) = f.freeze(Duration::from_secs(60)).await.unwrap();
        f.thaw(id).await.unwrap();
        assert_eq!(f.frozen(), 0);
    }
}
