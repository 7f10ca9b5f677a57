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

/// What an engine holds while frozen; dropping it (or [`Held::thaw`]) releases it.
pub enum Held {
    /// Nothing to hold: the engine's work was done at freeze time (a checkpoint).
    Nothing,
    /// A client session that keeps a lock until told otherwise (MariaDB's
    /// `FLUSH TABLES WITH READ LOCK` lives as long as its session).
    Session(Child),
}

impl Held {
    async fn thaw(self) {
        if let Held::Session(mut child) = self {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"UNLOCK TABLES;\n").await;
                drop(stdin);
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// A database engine that can be quiesced.
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    /// systemd units whose being active means the engine runs.
    fn units(&self) -> &'static [&'static str];
    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Held, Error>> + Send + '_>>;
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
    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Held, Error>> + Send + '_>> {
        // A checkpoint writes every dirty page and the WAL position: a snapshot taken
        // after it starts without crash recovery.
        Box::pin(async {
            run(
                Command::new("runuser").args([
                    "-u",
                    "postgres",
                    "--",
                    "psql",
                    "-qAtc",
                    "CHECKPOINT",
                ]),
                "postgresql CHECKPOINT",
            )
            .await
            .map(|()| Held::Nothing)
        })
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
            "redis.service",
            "valkey-server.service",
            "valkey.service",
        ]
    }
    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Held, Error>> + Send + '_>> {
        // SAVE writes the dataset synchronously; the RDB file is then complete on disk.
        Box::pin(async {
            let cli = if std::path::Path::new("/usr/bin/valkey-cli").exists() {
                "valkey-cli"
            } else {
                "redis-cli"
            };
            run(Command::new(cli).arg("SAVE"), "redis SAVE")
                .await
                .map(|()| Held::Nothing)
        })
    }
}

struct MariaDb;
impl Engine for MariaDb {
    fn name(&self) -> &'static str {
        "mariadb"
    }
    fn units(&self) -> &'static [&'static str] {
        &["mariadb.service", "mysql.service"]
    }
    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Held, Error>> + Send + '_>> {
        // The read lock holds only while its session lives: keep a client open with the
        // lock taken, and release it at thaw. `SELECT 'locked'` tells us when it holds.
        Box::pin(async {
            let mut child = Command::new("mariadb")
                .args(["--batch", "--skip-column-names"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| Error::from_io(&e, "mariadb client"))?;
            let mut stdin = child
                .stdin
                .take()
                .ok_or_else(|| Error::internal("mariadb client has no stdin"))?;
            stdin
                .write_all(b"FLUSH TABLES WITH READ LOCK;\nSELECT 'locked';\n")
                .await
                .map_err(|e| Error::from_io(&e, "mariadb client"))?;
            let mut stdout = child
                .stdout
                .take()
                .ok_or_else(|| Error::internal("mariadb client has no stdout"))?;
            let mut buf = [0u8; 64];
            use tokio::io::AsyncReadExt;
            let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut buf))
                .await
                .map_err(|_| {
                    Error::new(
                        hearth_protocol::ErrorKind::TimedOut,
                        "FLUSH TABLES WITH READ LOCK",
                    )
                })?
                .map_err(|e| Error::from_io(&e, "mariadb client"))?;
            if !String::from_utf8_lossy(&buf[..n]).contains("locked") {
                return Err(Error::internal("mariadb did not take the read lock"));
            }
            child.stdin = Some(stdin);
            Ok(Held::Session(child))
        })
    }
}

/// The built-in engines.
pub fn builtin_engines() -> Vec<Box<dyn Engine>> {
    vec![Box::new(Postgres), Box::new(MariaDb), Box::new(Redis)]
}

/// Is any of `units` active? Asks systemd (`systemctl is-active`, which speaks D-Bus to
/// PID 1); a guest without systemd has none of these running.
async fn active(units: &[&str]) -> bool {
    for unit in units {
        let ok = Command::new("systemctl")
            .args(["is-active", "--quiet", unit])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if ok {
            return true;
        }
    }
    false
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
    engines: Vec<Box<dyn Engine>>,
    next: AtomicU64,
    active: Arc<Mutex<HashMap<u64, Freeze>>>,
}

impl Default for Freezer {
    fn default() -> Self {
        Freezer::new(builtin_engines())
    }
}

impl Freezer {
    pub fn new(engines: Vec<Box<dyn Engine>>) -> Self {
        Freezer {
            engines,
            next: AtomicU64::new(1),
            active: Arc::default(),
        }
    }

    /// Quiesces every running engine, then syncs. Returns the freeze id and the engines
    /// quiesced. On any failure everything already held is released.
    pub async fn freeze(&self, timeout: Duration) -> Result<(u64, Vec<String>), Error> {
        let mut held = Vec::new();
        let mut names = Vec::new();
        for e in &self.engines {
            if !active(e.units()).await {
                continue;
            }
            match e.freeze().await {
                Ok(h) => {
                    held.push(h);
                    names.push(e.name().to_string());
                }
                Err(err) => {
                    for h in held {
                        h.thaw().await;
                    }
                    return Err(Error::internal(format!("freeze {}: {err}", e.name())));
                }
            }
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
