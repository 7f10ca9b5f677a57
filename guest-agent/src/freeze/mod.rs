//! Freezing the guest's disk state for a snapshot: each running database engine is
//! asked to make its files consistent (the way that engine needs), then the file system
//! is synced where the host cannot see the guest's page cache (see [`SyncPolicy`]).
//! The freeze holds until the host thaws it, or until a deadline, so a host that dies
//! mid-snapshot never leaves a database locked.
//!
//! Engines are plug-ins behind [`Engine`]: the service catalog adds more without
//! touching this code.

mod mariadb;
mod mongodb;
mod postgres;
mod redis;
mod sqlite;
mod systemd;

use hearth_protocol::Error;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// What an engine holds while frozen; [`Held::thaw`] releases it.
pub enum Held {
    /// Nothing to hold: the engine's work was done at freeze time (a checkpoint).
    Nothing,
    /// A client process whose session keeps a lock until told otherwise (MongoDB's
    /// `fsyncLock` on a `mongosh`); `release` is written to its stdin at thaw before it
    /// is closed.
    Session {
        child: Child,
        release: &'static [u8],
    },
    /// Work that lifts what the freeze set up (on the engine's own connection), run at
    /// thaw.
    Release(Pin<Box<dyn Future<Output = ()> + Send>>),
}

impl Held {
    pub fn release(f: impl Future<Output = ()> + Send + 'static) -> Held {
        Held::Release(Box::pin(f))
    }

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
            Held::Release(f) => f.await,
        }
    }
}

pub type EngineFuture<'a> = Pin<Box<dyn Future<Output = Result<Held, Error>> + Send + 'a>>;

/// A database engine that can be quiesced.
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    /// systemd units whose being active means the engine runs.
    fn units(&self) -> &'static [&'static str];
    /// For an engine that is a library rather than a server (SQLite), there is no unit
    /// to find: it names its instances itself (database files), looked up at each
    /// freeze on a blocking thread. `None`: the instances are the active [`units`].
    ///
    /// [`units`]: Engine::units
    fn instances(&self) -> Option<Vec<String>> {
        None
    }
    /// Makes the engine's files consistent on disk and holds them so until thawed;
    /// whatever it holds must also end by itself after `timeout`. `instances` are the
    /// engine's units found active (an engine may run several) or what
    /// [`Engine::instances`] named; never empty.
    fn freeze(&self, instances: Vec<String>, timeout: Duration) -> EngineFuture<'_>;
}

/// How long a kept database connection may sit unused before it is closed: snapshots
/// come in bursts (an agent's task, a benchmark), and an idle session should not show
/// in the database's client list for ever.
const KEEP_IDLE: Duration = Duration::from_secs(120);

/// A connection an engine keeps between freezes, so a freeze costs a query and not a
/// login (for PostgreSQL, a backend process forked per session). Closed after
/// [`KEEP_IDLE`] unused.
pub struct Kept<C> {
    slot: Arc<Mutex<(Option<C>, u64)>>,
}

impl<C> Clone for Kept<C> {
    fn clone(&self) -> Self {
        Kept {
            slot: self.slot.clone(),
        }
    }
}

impl<C: Send + 'static> Kept<C> {
    pub fn new() -> Self {
        Kept {
            slot: Arc::new(Mutex::new((None, 0))),
        }
    }

    pub fn take(&self) -> Option<C> {
        let mut s = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        s.0.take()
    }

    pub fn put(&self, c: C) {
        let generation = {
            let mut s = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            s.1 += 1;
            s.0 = Some(c);
            s.1
        };
        let slot = self.slot.clone();
        tokio::spawn(async move {
            tokio::time::sleep(KEEP_IDLE).await;
            let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
            if s.1 == generation {
                s.0 = None;
            }
        });
    }
}

impl<C: Send + 'static> Default for Kept<C> {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a statement on a kept connection failed: the connection (worth one new
/// connection, the statements being safe to repeat), or the server's answer.
#[derive(Debug)]
pub(crate) enum Failure {
    Io(std::io::Error),
    Server(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Io(e) => e.to_string(),
            Failure::Server(m) => m.clone(),
        }
    }
}

/// A command for an engine's client. The agent may run as the guest's init, before
/// anything set a PATH, and the clients live in sbin directories too.
fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", crate::exec::DEFAULT_PATH);
    c
}

/// The built-in engines.
pub fn builtin_engines() -> Vec<Arc<dyn Engine>> {
    vec![
        Arc::new(postgres::Postgres::new()),
        Arc::new(mariadb::MariaDb::new()),
        Arc::new(redis::Redis::new()),
        Arc::new(mongodb::MongoDb),
        Arc::new(sqlite::KitSqlite::default()),
    ]
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

impl Freeze {
    /// Releases everything held, and the deadline that would have.
    async fn end(self) {
        self.auto_thaw.abort();
        for h in self.held {
            h.thaw().await;
        }
    }
}

/// Whether a freeze ends with `syncfs` of the guest's root file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// The guest has its own kernel (a VM): what the engines wrote may sit in its page
    /// cache, where a snapshot of its disk taken by the host cannot see it.
    Always,
    /// The guest shares the host's kernel (a container, reached over a unix socket):
    /// the host's btrfs snapshot writes the subvolume's dirty pages back itself before
    /// it is taken (`btrfs_start_delalloc_snapshot`), so it holds every write made
    /// before it, synced or not. A `syncfs` would only flush the whole pool, every
    /// other guest's dirty data included, and commit a transaction the snapshot commits
    /// again: measured at 22-35 ms of a 45 ms snapshot of a guest with four databases
    /// under write load.
    HostSnapshotFlushes,
}

/// The freezes in effect, by id.
pub struct Freezer {
    inner: Arc<Inner>,
}

struct Inner {
    engines: Vec<Arc<dyn Engine>>,
    sync: SyncPolicy,
    next: AtomicU64,
    active: Arc<Mutex<HashMap<u64, Freeze>>>,
    /// Held by a freeze from its start until it is registered in `active`, and by
    /// [`Freezer::thaw_all`]: a thaw-all never misses a freeze under way.
    gate: tokio::sync::Mutex<()>,
}

impl Default for Freezer {
    fn default() -> Self {
        Freezer::new(builtin_engines(), SyncPolicy::Always)
    }
}

impl Freezer {
    pub fn new(engines: Vec<Arc<dyn Engine>>, sync: SyncPolicy) -> Self {
        Freezer {
            inner: Arc::new(Inner {
                engines,
                sync,
                next: AtomicU64::new(1),
                active: Arc::default(),
                gate: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Quiesces every running engine, then syncs (see [`SyncPolicy`]). Returns the
    /// freeze id and the engines quiesced. On any failure everything already held is
    /// released.
    ///
    /// The work runs to its end even if the caller goes away (the host's connection
    /// dropped mid-freeze): an engine cut off half-way would stay paused until its own
    /// timeout with nothing left to release it, while a finished freeze is registered
    /// and ended by a thaw, a [`Freezer::thaw_all`] or its deadline.
    pub async fn freeze(&self, timeout: Duration) -> Result<(u64, Vec<String>), Error> {
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.freeze(timeout).await })
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("freeze worker: {e}"))))
    }

    pub async fn thaw(&self, id: u64) -> Result<(), Error> {
        self.inner.thaw(id).await
    }

    /// Ends every freeze in effect, after any under way has been registered; returns
    /// how many there were.
    pub async fn thaw_all(&self) -> usize {
        let _gate = self.inner.gate.lock().await;
        let all: Vec<Freeze> = self
            .inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, f)| f)
            .collect();
        let n = all.len();
        for f in all {
            f.end().await;
        }
        n
    }

    pub fn frozen(&self) -> usize {
        self.inner
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Inner {
    async fn freeze(&self, timeout: Duration) -> Result<(u64, Vec<String>), Error> {
        let _gate = self.gate.lock().await;
        let patterns: Vec<&str> = self
            .engines
            .iter()
            .flat_map(|e| e.units().iter().copied())
            .collect();
        let t0 = Instant::now();
        let engines = self.engines.clone();
        let named = tokio::task::spawn_blocking(move || {
            engines.iter().map(|e| e.instances()).collect::<Vec<_>>()
        });
        let (running, named) = tokio::join!(systemd::active_units(&patterns), named);
        let named = named.map_err(|e| Error::internal(format!("listing engine instances: {e}")))?;
        let listed = t0.elapsed();
        // Engines are independent, so they quiesce at the same time: the freeze costs
        // the slowest engine, not the sum.
        let mut set = tokio::task::JoinSet::new();
        for (i, (e, named)) in self.engines.iter().zip(named).enumerate() {
            let units: Vec<String> = named.unwrap_or_else(|| {
                running
                    .iter()
                    .filter(|u| e.units().iter().any(|p| systemd::unit_matches(p, u)))
                    .cloned()
                    .collect()
            });
            if !units.is_empty() {
                let e = e.clone();
                set.spawn(async move {
                    let t = Instant::now();
                    let r = e.freeze(units, timeout).await;
                    (i, e.name(), r, t.elapsed())
                });
            }
        }
        let mut done = Vec::new();
        let mut failed = None;
        let mut took = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok((_, name, _, t)) = &r {
                took.push(format!("{name} {:.1} ms", t.as_secs_f64() * 1e3));
            }
            match r {
                Ok((i, name, Ok(h), _)) => done.push((i, name, h)),
                Ok((_, name, Err(err), _)) => {
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
        let t = Instant::now();
        let synced = match self.sync {
            SyncPolicy::Always => tokio::task::spawn_blocking(syncfs_root)
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("syncfs worker: {e}")))),
            SyncPolicy::HostSnapshotFlushes => Ok(()),
        };
        tracing::debug!(
            "freeze: units {:.1} ms, {}, syncfs {:.1} ms",
            listed.as_secs_f64() * 1e3,
            took.join(", "),
            t.elapsed().as_secs_f64() * 1e3
        );
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
        f.end().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine that takes a while to quiesce and records its release.
    struct Slow(Arc<std::sync::atomic::AtomicBool>);
    impl Engine for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn units(&self) -> &'static [&'static str] {
            &[]
        }
        fn instances(&self) -> Option<Vec<String>> {
            Some(vec!["one".into()])
        }
        fn freeze(&self, _: Vec<String>, _: Duration) -> EngineFuture<'_> {
            let released = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(Held::release(async move {
                    released.store(true, Ordering::SeqCst);
                }))
            })
        }
    }

    #[tokio::test]
    async fn a_freeze_whose_caller_went_away_is_still_ended_by_thaw_all() {
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = Freezer::new(
            vec![Arc::new(Slow(released.clone()))],
            SyncPolicy::HostSnapshotFlushes,
        );
        // The host's connection drops while the engine is still quiescing.
        let cut =
            tokio::time::timeout(Duration::from_millis(20), f.freeze(Duration::from_secs(60)));
        assert!(cut.await.is_err());
        // A restarted host ends it: thaw-all waits for the freeze under way.
        assert_eq!(f.thaw_all().await, 1);
        assert!(
            released.load(Ordering::SeqCst),
            "the engine was not released"
        );
        assert_eq!(f.frozen(), 0);
    }

    #[tokio::test]
    async fn freeze_syncs_and_thaws_by_itself_when_the_host_vanishes() {
        let f = Freezer::new(Vec::new(), SyncPolicy::Always);
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
        // A host that lost its freeze ids ends them all.
        f.freeze(Duration::from_secs(60)).await.unwrap();
        f.freeze(Duration::from_secs(60)).await.unwrap();
        assert_eq!(f.thaw_all().await, 2);
        assert_eq!(f.frozen(), 0);
    }
}
