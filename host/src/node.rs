//! The node's container operations, crash-safe.
//!
//! Every state-changing operation first records its intent in the store (`creating`,
//! `deleting`), then acts. If `hearthd` dies half-way, [`Node::reconcile`] sees the state
//! on the next start and finishes (delete) or rolls back (create) through the same
//! idempotent [`Node::purge`], which also removes anything found on the machine that
//! the store does not know (LXC definitions, rootfs subvolumes, veths).

use crate::agents::{AgentClient, ClientOptions};
use crate::config::Config;
use crate::net;
use crate::pool::{DiskUsage, Storage};
use crate::runtime::{GuestSpec, Limits, RunState, Runtime};
use crate::store::{ContainerRow, State, Store, StoreError};
use hearth_protocol::Secret;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The state of a snapshot while a container is being restored from it: the restore's
/// intent, written before the guest is touched (see [`Node::restore`]).
const RESTORING: &str = "restoring";

/// How long a started guest gets to answer on its agent socket.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest's databases may stay frozen for a snapshot before the agent thaws
/// them by itself (the host died or hung between freeze and thaw).
const FREEZE_HOLD: Duration = Duration::from_secs(30);
/// How long quiescing may take: a checkpoint under heavy write load, or FLUSH TABLES
/// waiting out a long query.
const FREEZE_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long reconcile waits for a guest's agent to end the freezes of an interrupted
/// snapshot before it leaves them to the agent's own timeout.
const THAW_ON_RECONCILE: Duration = Duration::from_secs(5);

/// Disk sizes users may ask for, in GiB.
const DISK_GB_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The guest cannot do it now (its agent does not answer); worth retrying.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => NodeError::NotFound(format!("{m} not found")),
            StoreError::Conflict(m) => NodeError::Conflict(m),
            other => NodeError::Internal(other.into()),
        }
    }
}

fn internal(e: impl Into<anyhow::Error>) -> NodeError {
    NodeError::Internal(e.into())
}

/// What a new container's rootfs is made from.
enum Source {
    Image(String),
    /// A snapshot or another container's rootfs (copy, branch).
    Path(PathBuf),
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct CopyRequest {
    pub name: String,
    /// Defaults to the source's project.
    pub target_project_id: Option<String>,
    /// Branch from this snapshot (name or alias) instead of the current state.
    pub source_snapshot: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct SnapshotRequest {
    pub alias: Option<String>,
    /// Days until the snapshot is swept (1-3650).
    pub expiry: Option<u32>,
    /// Flush and hold the guest's databases while the snapshot is taken (default true
    /// for a running guest). `false` takes a crash-consistent snapshot, for a guest
    /// whose agent does not answer.
    pub quiesce: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct CreateRequest {
    pub name: String,
    pub image: Option<String>,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Rootfs size cap in GiB (default `defaults.disk_gb`).
    pub disk_gb: Option<u64>,
    pub autostart: Option<bool>,
}

/// What `PUT /containers/{id}` may change on an existing container.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct UpdateRequest {
    /// New rootfs size cap in GiB, applied at once, also to a running guest.
    pub disk_gb: Option<u64>,
}

/// A container as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerView {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub status: String,
    pub image: String,
    pub ip: String,
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: u64,
    /// Configured rootfs cap in GiB; `None` is unlimited.
    pub disk_gb: Option<u64>,
    /// Current use and enforced cap. Only filled in for a single container (it costs a
    /// query of the file system); `None` there too when the pool has no quotas.
    #[serde(default)]
    pub disk: Option<DiskUsage>,
    pub autostart: bool,
    pub created_at: String,
    pub error: Option<String>,
    /// Host path of the agent socket (root on the node can use it directly).
    pub agent_socket: String,
    /// The runtime's name for the guest (LXC: `lxc-attach -P <lxcpath> -n <name>`). It
    /// changes when a restore boots the guest anew (see [`Node::lxc_name`]).
    pub runtime_name: String,
}

/// Names users give: 1-63 chars of `[a-z0-9-]`, not starting or ending with `-` (they
/// end up in host names and URLs).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub struct Node {
    pub cfg: Config,
    store: Mutex<Store>,
    pub pool: Arc<dyn Storage>,
    pub runtime: Arc<dyn Runtime>,
    agents: Mutex<HashMap<String, Arc<AgentClient>>>,
    /// One operation at a time per container.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Recent requests the HTTPS front door forwarded, per container.
    pub access_log: Arc<crate::proxy::access_log::AccessLog>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(anyhow::anyhow!("worker failed: {e}")))?
}

impl Node {
    pub fn new(
        cfg: Config,
        store: Store,
        pool: Arc<dyn Storage>,
        runtime: Arc<dyn Runtime>,
    ) -> Arc<Node> {
        Arc::new(Node {
            cfg,
            store: Mutex::new(store),
            pool,
            runtime,
            agents: Mutex::default(),
            locks: Mutex::default(),
            access_log: Arc::default(),
        })
    }

    /// The store, for short synchronous queries. Poisoning means a panic mid-query;
    /// SQLite itself stays consistent, so carry on.
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    /// The container under its lock, read again once the lock is held; refused while it
    /// is being created or deleted.
    async fn lock_usable(
        &self,
        key: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, ContainerRow), NodeError> {
        let id = self.get(key)?.id;
        let guard = self.lock_for(&id).lock_owned().await;
        let c = self.get(&id)?;
        if matches!(c.state, State::Creating | State::Deleting) {
            return Err(NodeError::Conflict(format!(
                "container is {}",
                c.state.as_str()
            )));
        }
        Ok((guard, c))
    }

    /// The runtime's name for a container in one of its two slots. A restore boots the
    /// restored rootfs under the other name: LXC's teardown of a killed guest (its
    /// processes reaped, its veth deleted, a few dozen cgroups removed, 80-130 ms for a
    /// booted systemd) holds on to the old name until it is done, and waiting for it
    /// was most of a restore's time.
    pub fn lxc_name(id: &str, slot: u8) -> String {
        if slot == 0 {
            format!("h-{id}")
        } else {
            format!("h-{id}-1")
        }
    }

    /// The container id and slot an LXC name of ours stands for.
    pub fn parse_lxc_name(name: &str) -> Option<(&str, u8)> {
        let rest = name.strip_prefix("h-")?;
        Some(match rest.strip_suffix("-1") {
            Some(id) => (id, 1),
            None => (rest, 0),
        })
    }

    pub fn agent_dir(&self, id: &str) -> PathBuf {
        self.cfg.agents_dir().join(id)
    }

    pub fn agent_socket(&self, id: &str) -> PathBuf {
        self.agent_dir(id).join("agent.sock")
    }

    pub fn view(&self, c: &ContainerRow) -> ContainerView {
        ContainerView {
            id: c.id.clone(),
            project_id: c.project.clone(),
            name: c.name.clone(),
            status: c.state.as_str().into(),
            image: c.image.clone(),
            ip: c.ip.to_string(),
            memory_mb: c.memory_bytes >> 20,
            cpus: c.cpus,
            pids: c.pids,
            disk_gb: c.disk_bytes.map(|b| b >> 30),
            disk: None,
            autostart: c.autostart,
            created_at: c.created_at.clone(),
            error: c.error.clone(),
            agent_socket: self.agent_socket(&c.id).display().to_string(),
            runtime_name: Self::lxc_name(&c.id, c.slot),
        }
    }

    /// The agent client of a container (one per container, shared).
    pub fn agent(&self, c: &ContainerRow) -> Result<Arc<AgentClient>, NodeError> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = agents.get(&c.id) {
            return Ok(a.clone());
        }
        let secret = Secret::parse(c.secret_hex.as_bytes())
            .map_err(|e| internal(anyhow::anyhow!("secret of {}: {e}", c.id)))?;
        let client = AgentClient::with_options(
            hearth_protocol::Endpoint::Unix(self.agent_socket(&c.id)),
            secret,
            ClientOptions {
                // The guest's socket is local: a failed dial costs microseconds, while a
                // doubling wait overshot a booting agent by up to half the boot (a
                // retry at 31 ms, the next at 63 ms).
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(3),
                connect_deadline: AGENT_READY_TIMEOUT,
                ..ClientOptions::default()
            },
        );
        agents.insert(c.id.clone(), client.clone());
        Ok(client)
    }

    fn forget_agent(&self, id: &str) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn get(&self, key: &str) -> Result<ContainerRow, NodeError> {
        Ok(self.store().resolve(key)?)
    }

    /// The container's disk use, or `None` when the pool has no quotas or the rootfs is
    /// not there (yet, or any more): a view must not fail over a statistic.
    pub async fn disk_usage(&self, c: &ContainerRow) -> Option<DiskUsage> {
        if !self.pool.info().quotas {
            return None;
        }
        let pool = self.pool.clone();
        let id = c.id.clone();
        match blocking(move || pool.usage(&id).map_err(internal)).await {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::debug!("disk usage of {}: {e}", c.id);
                None
            }
        }
    }

    /// Changes a container's disk cap, running or not. Lowering it below what is in use
    /// is allowed: the guest then cannot write until it frees space.
    pub async fn resize_disk(&self, key: &str, gb: u64) -> Result<ContainerRow, NodeError> {
        check_disk_gb(gb)?;
        if !self.pool.info().quotas {
            return Err(NodeError::Conflict(
                "this node's storage pool has no quotas; disk sizes cannot be enforced".into(),
            ));
        }
        let (_guard, c) = self.lock_usable(key).await?;
        let bytes = gb << 30;
        let pool = self.pool.clone();
        let id = c.id.clone();
        blocking(move || pool.set_quota(&id, Some(bytes)).map_err(internal)).await?;
        self.store().set_disk_bytes(&c.id, Some(bytes))?;
        self.get(&c.id)
    }

    pub async fn create(
        &self,
        project: &str,
        req: CreateRequest,
    ) -> Result<ContainerRow, NodeError> {
        if !valid_name(&req.name) {
            return Err(NodeError::Invalid(format!(
                "container name {:?}: use 1-63 of a-z, 0-9 and '-'",
                req.name
            )));
        }
        let image = req.image.clone().unwrap_or(self.cfg.default_image.clone());
        if !self.pool.image_path(&image).exists() {
            return Err(NodeError::NotFound(format!(
                "image {image} not found (build it with `hearth image build`)"
            )));
        }
        let d = &self.cfg.defaults;
        let memory_mb = req.memory_mb.unwrap_or(d.memory_mb);
        let cpus = req.cpus.unwrap_or(d.cpus);
        let pids = req.pids.unwrap_or(d.pids);
        let disk_gb = req.disk_gb.unwrap_or(d.disk_gb);
        check_disk_gb(disk_gb)?;
        if memory_mb < 64 || !(0.01..=1024.0).contains(&cpus) || pids < 16 {
            return Err(NodeError::Invalid(
                "limits: memory at least 64 MB, cpus 0.01-1024, pids at least 16".into(),
            ));
        }
        let row = self.allocate(
            project,
            &req.name,
            &image,
            memory_mb,
            cpus,
            pids,
            Some(disk_gb << 30),
            req.autostart,
        )?;
        self.finish_create(row, Source::Image(image)).await
    }

    /// Provisions and boots a freshly allocated container, or rolls everything back.
    async fn finish_create(
        &self,
        row: ContainerRow,
        source: Source,
    ) -> Result<ContainerRow, NodeError> {
        let lock = self.lock_for(&row.id);
        let _guard = lock.lock().await;
        match self.provision_and_start(&row, source).await {
            Ok(()) => {
                self.store().set_state(&row.id, State::Running, None)?;
                Ok(self.store().container(&row.id)?)
            }
            Err(e) => {
                tracing::warn!(
                    "create {}/{} failed, rolling back: {e}",
                    row.project,
                    row.name
                );
                if let Err(p) = self.purge(&row).await {
                    tracing::error!(
                        "rollback of {} incomplete (reconcile will retry): {p}",
                        row.id
                    );
                }
                Err(e)
            }
        }
    }

    /// Records the new container (state `creating`) with its IP, uid block and secret, in
    /// one statement: from here on a crash is rolled back by reconcile.
    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &self,
        project: &str,
        name: &str,
        image: &str,
        memory_mb: u64,
        cpus: f64,
        pids: u64,
        disk_bytes: Option<u64>,
        autostart: Option<bool>,
    ) -> Result<ContainerRow, NodeError> {
        let store = self.store();
        store.project(project)?;
        let ip = net::ipam::allocate(self.cfg.network.cidr, &store.used_ips()?)
            .map_err(|e| NodeError::Conflict(e.to_string()))?;
        let used = store.used_idmap_blocks()?;
        let block = (0..self.cfg.idmap.blocks)
            .find(|b| !used.contains(b))
            .ok_or_else(|| NodeError::Conflict("no free uid range left".into()))?;
        let row = ContainerRow {
            id: new_id(),
            project: project.into(),
            name: name.into(),
            image: image.into(),
            state: State::Creating,
            ip,
            idmap_block: block,
            secret_hex: Secret(rand::random()).to_hex(),
            memory_bytes: memory_mb << 20,
            cpus,
            pids,
            disk_bytes,
            autostart: autostart.unwrap_or(true),
            created_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            error: None,
            slot: 0,
        };
        store.insert_container(&row)?;
        Ok(row)
    }

    fn spec(&self, c: &ContainerRow) -> GuestSpec {
        let veth = net::veth_name(&self.cfg.network, &c.id, c.slot);
        GuestSpec {
            name: Self::lxc_name(&c.id, c.slot),
            hostname: c.name.clone(),
            rootfs: self.pool.rootfs(&c.id),
            idmap_base: self.cfg.idmap.base + c.idmap_block * self.cfg.idmap.size,
            idmap_size: self.cfg.idmap.size,
            agent_dir: self.agent_dir(&c.id),
            limits: Limits {
                memory_bytes: c.memory_bytes,
                cpus: c.cpus,
                pids: c.pids,
            },
            net: net::lxc_config(&self.cfg.network, c.ip, &veth),
        }
    }

    async fn provision_and_start(&self, c: &ContainerRow, source: Source) -> Result<(), NodeError> {
        let pool = self.pool.clone();
        let runtime = self.runtime.clone();
        let spec = self.spec(c);
        let resolv = net::resolv_conf(&self.cfg.network).map_err(internal)?;
        let (id, name, secret) = (c.id.clone(), c.name.clone(), c.secret_hex.clone());
        let disk_bytes = c.disk_bytes;
        blocking(move || {
            let rootfs = match source {
                Source::Image(image) => pool.create_rootfs(&image, &id),
                Source::Path(src) => pool.create_rootfs_from(&src, &id),
            }
            .map_err(internal)?;
            // Before the guest first runs, so it never sees an unlimited disk.
            apply_quota(&*pool, &id, disk_bytes)?;
            provision_rootfs(&rootfs, &name, &resolv, &secret).map_err(internal)?;
            make_agent_dir(&spec.agent_dir).map_err(internal)?;
            runtime.define(&spec).map_err(internal)
        })
        .await?;
        self.boot(c).await
    }

    /// Starts the guest and waits for its agent.
    async fn boot(&self, c: &ContainerRow) -> Result<(), NodeError> {
        let runtime = self.runtime.clone();
        let name = Self::lxc_name(&c.id, c.slot);
        let state = self.settled_state(&name).await?;
        if state != RunState::Running {
            // A stale socket from the last run would accept nothing; the agent makes a
            // new one. Never remove the socket of a guest that is up: its agent would
            // be unreachable until it restarted.
            let _ = std::fs::remove_file(self.agent_socket(&c.id));
            blocking(move || runtime.start(&name).map_err(internal)).await?;
        }
        self.forget_agent(&c.id);
        let agent = self.agent(c)?;
        agent
            .ping()
            .await
            .map_err(|e| internal(anyhow::anyhow!("the agent of {} did not answer: {e}", c.id)))
    }

    /// The guest's state once it is out of a transition (starting, stopping): a daemon
    /// restarted in the middle of a start must not decide on a half-started guest.
    async fn settled_state(&self, lxc_name: &str) -> Result<RunState, NodeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let runtime = self.runtime.clone();
            let name = lxc_name.to_string();
            let st = blocking(move || runtime.state(&name).map_err(internal)).await?;
            if st != RunState::Other || tokio::time::Instant::now() > deadline {
                return Ok(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn start(&self, key: &str) -> Result<ContainerRow, NodeError> {
        let c = self.get(key)?;
        let lock = self.lock_for(&c.id);
        let _guard = lock.lock().await;
        let c = self.get(&c.id)?;
        match c.state {
            State::Running => return Ok(c),
            State::Stopped | State::Failed => {}
            s => return Err(NodeError::Conflict(format!("container is {}", s.as_str()))),
        }
        match self.boot(&c).await {
            Ok(()) => {
                self.store().set_state(&c.id, State::Running, None)?;
            }
            Err(e) => {
                let msg = e.to_string();
                self.store().set_state(&c.id, State::Failed, Some(&msg))?;
                return Err(e);
            }
        }
        self.get(&c.id)
    }

    pub async fn stop(&self, key: &str, force: bool) -> Result<ContainerRow, NodeError> {
        let (_guard, c) = self.lock_usable(key).await?;
        // The intent first, as for a restore: liblxc's kill is asynchronous and LXC
        // reports the guest RUNNING until its init is reaped, so a daemon killed in
        // between would otherwise find it running and keep it recorded so after it died.
        // Reconcile finishes a stop it finds recorded.
        self.store().set_state(&c.id, State::Stopping, None)?;
        let runtime = self.runtime.clone();
        let name = Self::lxc_name(&c.id, c.slot);
        let timeout = self.cfg.defaults.stop_timeout_secs;
        let stopped = blocking(move || {
            if force {
                runtime.kill(&name)
            } else {
                runtime.stop(&name, timeout)
            }
            .map_err(internal)
        })
        .await;
        self.forget_agent(&c.id);
        if let Err(e) = stopped {
            // Recorded as whatever it now is.
            let now = match self.settled_state(&Self::lxc_name(&c.id, c.slot)).await {
                Ok(RunState::Running) => State::Running,
                _ => State::Stopped,
            };
            self.store().set_state(&c.id, now, None)?;
            return Err(e);
        }
        self.store().set_state(&c.id, State::Stopped, None)?;
        self.get(&c.id)
    }

    /// Finishes a stop that a crash cut off: the guest is killed (a graceful stop is not
    /// started again on the daemon's way up) and recorded stopped.
    async fn finish_stop(&self, c: &ContainerRow) -> Result<(), NodeError> {
        let name = Self::lxc_name(&c.id, c.slot);
        self.settled_state(&name).await?;
        let runtime = self.runtime.clone();
        blocking(move || runtime.kill(&name).map_err(internal)).await?;
        self.forget_agent(&c.id);
        self.store().set_state(&c.id, State::Stopped, None)?;
        Ok(())
    }

    pub async fn restart(&self, key: &str) -> Result<ContainerRow, NodeError> {
        self.stop(key, false).await?;
        self.start(key).await
    }

    pub async fn delete(&self, key: &str) -> Result<(), NodeError> {
        let c = self.get(key)?;
        let lock = self.lock_for(&c.id);
        let _guard = lock.lock().await;
        self.store().set_state(&c.id, State::Deleting, None)?;
        self.purge(&c).await
    }

    /// Takes a read-only snapshot of a container's rootfs (running or not). The row is
    /// written first (`creating`), so a crash mid-way is cleaned up by reconcile.
    pub async fn snapshot(
        &self,
        key: &str,
        req: SnapshotRequest,
    ) -> Result<crate::store::SnapshotRow, NodeError> {
        let c = self.get(key)?;
        if matches!(c.state, State::Creating | State::Deleting) {
            return Err(NodeError::Conflict(format!(
                "container is {}",
                c.state.as_str()
            )));
        }
        if let Some(days) = req.expiry {
            if !(1..=3650).contains(&days) {
                return Err(NodeError::Invalid("expiry is 1-3650 days".into()));
            }
        }
        if let Some(a) = &req.alias {
            if a.is_empty() || a.len() > 100 {
                return Err(NodeError::Invalid("alias is 1-100 characters".into()));
            }
        }
        let lock = self.lock_for(&c.id);
        let _guard = lock.lock().await;
        let row = {
            let store = self.store();
            let existing = store.snapshots(Some(&c.id))?;
            let max = self.cfg.defaults.max_snapshots;
            if existing.len() >= max {
                return Err(NodeError::Conflict(format!(
                    "container {} has {} snapshots, the limit is {max}; delete some first",
                    c.name,
                    existing.len()
                )));
            }
            if let Some(a) = &req.alias {
                if existing
                    .iter()
                    .any(|s| s.alias.as_deref() == Some(a.as_str()))
                {
                    return Err(NodeError::Conflict(format!("alias {a} is taken")));
                }
            }
            let now = time::OffsetDateTime::now_utc();
            let mut name = snapshot_name(now);
            let mut n = 1;
            while existing.iter().any(|s| s.name == name) {
                n += 1;
                name = format!("{}-{n}", snapshot_name(now));
            }
            let fmt = &time::format_description::well_known::Rfc3339;
            let row = crate::store::SnapshotRow {
                container_id: c.id.clone(),
                name,
                alias: req.alias.clone(),
                created_at: now.format(fmt).unwrap_or_default(),
                expires_at: req.expiry.map(|d| {
                    (now + time::Duration::days(d.into()))
                        .format(fmt)
                        .unwrap_or_default()
                }),
                state: "creating".into(),
                quiesced: None,
                size_bytes: None,
            };
            store.insert_snapshot(&row)?;
            row
        };
        let made = if c.state == State::Running && req.quiesce.unwrap_or(true) {
            self.snapshot_quiesced(&c, &row.name).await.map(Some)
        } else {
            self.snapshot_rootfs(&c.id, &row.name).await.map(|()| None)
        };
        match made {
            Err(e) => {
                self.store().delete_snapshot(&c.id, &row.name)?;
                Err(e)
            }
            Ok(quiesced) => {
                let size = self.disk_usage(&c).await.map(|u| u.used_bytes);
                self.store()
                    .set_snapshot_ready(&c.id, &row.name, quiesced.as_deref(), size)?;
                Ok(self.store().snapshot(&c.id, &row.name)?)
            }
        }
    }

    async fn snapshot_rootfs(&self, id: &str, name: &str) -> Result<(), NodeError> {
        let pool = self.pool.clone();
        let (id, name) = (id.to_string(), name.to_string());
        blocking(move || pool.snapshot_container(&id, &name).map_err(internal))
            .await
            .map(drop)
    }

    /// Freeze (the agent flushes and holds each running database, then syncs), the
    /// read-only snapshot, thaw. Returns the engines that were held. A thaw that does
    /// not arrive is covered by the agent's own deadline.
    async fn snapshot_quiesced(
        &self,
        c: &ContainerRow,
        name: &str,
    ) -> Result<Vec<String>, NodeError> {
        let agent = self.agent(c)?;
        let frozen = tokio::time::timeout(FREEZE_CALL_TIMEOUT, agent.freeze(FREEZE_HOLD)).await;
        let (freeze_id, engines) = match frozen {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                return Err(NodeError::Unavailable(format!(
                    "could not quiesce the guest for a consistent snapshot: {e:#} \
                     (\"quiesce\": false takes a crash-consistent one)"
                )))
            }
            Err(_) => {
                return Err(NodeError::Unavailable(format!(
                    "the guest did not quiesce within {FREEZE_CALL_TIMEOUT:?} \
                     (\"quiesce\": false takes a crash-consistent one)"
                )))
            }
        };
        let made = self.snapshot_rootfs(&c.id, name).await;
        if let Err(e) = agent.thaw(freeze_id).await {
            tracing::warn!(
                "thaw of {} failed ({e:#}); its agent thaws by itself within {FREEZE_HOLD:?}",
                c.id
            );
        }
        made.map(|()| engines)
    }

    pub fn snapshots(
        &self,
        key: &str,
    ) -> Result<(ContainerRow, Vec<crate::store::SnapshotRow>), NodeError> {
        let c = self.get(key)?;
        let snaps = self
            .store()
            .snapshots(Some(&c.id))?
            .into_iter()
            .filter(|s| s.state == "ready")
            .collect();
        Ok((c, snaps))
    }

    /// Under the container's lock: a restore from this snapshot is either done before
    /// the snapshot goes, or finds it gone.
    pub async fn delete_snapshot(&self, key: &str, snap: &str) -> Result<(), NodeError> {
        let c = self.get(key)?;
        let lock = self.lock_for(&c.id);
        let _guard = lock.lock().await;
        let s = self.store().snapshot(&c.id, snap)?;
        if s.state == RESTORING {
            return Err(NodeError::Conflict(format!(
                "snapshot {} is being restored",
                s.name
            )));
        }
        self.store()
            .set_snapshot_state(&c.id, &s.name, "deleting")?;
        let pool = self.pool.clone();
        let (id, name) = (c.id.clone(), s.name.clone());
        blocking(move || pool.delete_snapshot(&id, &name).map_err(internal)).await?;
        self.store().delete_snapshot(&c.id, &s.name)?;
        Ok(())
    }

    pub fn alias_snapshot(
        &self,
        key: &str,
        snap: &str,
        alias: Option<&str>,
    ) -> Result<(), NodeError> {
        let c = self.get(key)?;
        let s = self.store().snapshot(&c.id, snap)?;
        if let Some(a) = alias {
            let taken = self
                .store()
                .snapshots(Some(&c.id))?
                .iter()
                .any(|o| o.name != s.name && o.alias.as_deref() == Some(a));
            if taken {
                return Err(NodeError::Conflict(format!("alias {a} is taken")));
            }
        }
        self.store().set_snapshot_alias(&c.id, &s.name, alias)?;
        Ok(())
    }

    /// Stops the guest if it runs, swaps its rootfs for a writable copy of the snapshot
    /// (one atomic rename), and starts it again if it was running.
    ///
    /// The snapshot is marked [`RESTORING`] before anything happens to the guest. That
    /// record is what makes a crash safe: liblxc's kill is asynchronous, and LXC reports
    /// a killed guest RUNNING until its init has been reaped (~90 ms with a booted
    /// systemd), so a daemon restarted in between would otherwise take the dying guest
    /// for a healthy one and keep it recorded running. [`Node::reconcile`] finishes a
    /// restore it finds marked.
    pub async fn restore(&self, key: &str, snap: &str) -> Result<ContainerRow, NodeError> {
        let (_guard, c) = self.lock_usable(key).await?;
        let s = self.store().snapshot(&c.id, snap)?;
        if s.state != "ready" {
            return Err(NodeError::Conflict(format!(
                "snapshot {} is {}",
                s.name, s.state
            )));
        }
        self.store().set_snapshot_state(&c.id, &s.name, RESTORING)?;
        let result = self.restore_locked(&c, &s.name).await;
        if let Err(e) = &result {
            tracing::warn!("restore of {} from {} failed: {e}", c.id, s.name);
            // Whatever rootfs is in place stays; a half-made copy goes.
            let pool = self.pool.clone();
            let id = c.id.clone();
            if let Err(r) = blocking(move || pool.recover_container(&id).map_err(internal)).await {
                tracing::warn!("cleaning up after the restore of {}: {r}", c.id);
            }
            if c.state == State::Running {
                // Killed, and not booted again: say so rather than "running".
                let msg = format!("restore failed: {e}");
                self.store().set_state(&c.id, State::Failed, Some(&msg))?;
            }
        }
        self.store().set_snapshot_state(&c.id, &s.name, "ready")?;
        result?;
        self.get(&c.id)
    }

    /// The restore itself, under the container's lock and the snapshot's mark.
    ///
    /// A running guest is abandoned rather than waited for: its init is sent SIGKILL,
    /// the route to its address (through its veth, which LXC deletes later) is removed
    /// at once, and the restored rootfs boots in the container's other runtime slot
    /// while LXC's teardown of the old guest goes on beside it (see [`Node::lxc_name`];
    /// `boot` removes the old agent's socket before it starts the new guest).
    /// The writable copy of the snapshot is made meanwhile; the old slot's definition
    /// and the old tree are removed afterwards, under the container's lock, once the
    /// old guest is gone.
    async fn restore_locked(&self, c: &ContainerRow, snap: &str) -> Result<(), NodeError> {
        let t = std::time::Instant::now();
        if c.state != State::Running {
            return self.restore_stopped(c, snap).await;
        }
        let (old, next) = (c.slot, 1 - c.slot);
        let old_name = Self::lxc_name(&c.id, old);
        let next_name = Self::lxc_name(&c.id, next);
        let runtime = self.runtime.clone();
        let netcfg = self.cfg.network.clone();
        let old_veth = net::veth_name(&netcfg, &c.id, old);
        let ip = c.ip;
        let abandoned = blocking(move || {
            runtime.kill_begin(&old_name).map_err(internal)?;
            net::links::drop_route(&netcfg, &old_veth, ip).map_err(internal)
        });
        let runtime = self.runtime.clone();
        let pool = self.pool.clone();
        let (id, name) = (c.id.clone(), snap.to_string());
        let staged = blocking(move || {
            // The other slot is free unless an earlier restore's clean-up was cut off
            // (it runs under this lock, so it is normally long done).
            runtime.undefine(&next_name).map_err(internal)?;
            pool.stage_restore(&id, &name).map_err(internal)
        });
        let (abandoned, staged) = tokio::join!(abandoned, staged);
        abandoned?;
        staged?;
        let staged_at = t.elapsed();
        let pool = self.pool.clone();
        let id = c.id.clone();
        let disk_bytes = c.disk_bytes;
        blocking(move || {
            pool.swap_restored(&id).map_err(internal)?;
            // The restored rootfs is a new subvolume with a new, unlimited qgroup.
            apply_quota(&*pool, &id, disk_bytes)
        })
        .await?;
        // From here on the container lives in the other slot; a crash is finished there
        // by reconcile (`finish_restore`).
        self.store().set_slot(&c.id, next)?;
        let restored = ContainerRow {
            slot: next,
            ..c.clone()
        };
        self.forget_agent(&c.id);
        let runtime = self.runtime.clone();
        let spec = self.spec(&restored);
        let booted = match blocking(move || runtime.define(&spec).map_err(internal)).await {
            Ok(()) => self.boot(&restored).await,
            Err(e) => Err(e),
        };
        // The old guest goes either way: the container lives in the other slot now.
        self.retire_slot(&c.id, old);
        booted?;
        self.store().set_state(&c.id, State::Running, None)?;
        tracing::debug!(
            "restore of {}: old guest abandoned and copy staged {staged_at:?}, agent up {:?}",
            c.id,
            t.elapsed()
        );
        Ok(())
    }

    /// Restoring a stopped container: nothing runs, so the rootfs is swapped in place
    /// and the guest stays in its slot.
    async fn restore_stopped(&self, c: &ContainerRow, snap: &str) -> Result<(), NodeError> {
        let pool = self.pool.clone();
        let (id, name) = (c.id.clone(), snap.to_string());
        let disk_bytes = c.disk_bytes;
        blocking(move || {
            pool.stage_restore(&id, &name).map_err(internal)?;
            pool.swap_restored(&id).map_err(internal)?;
            apply_quota(&*pool, &id, disk_bytes)?;
            pool.recover_container(&id).map_err(internal)
        })
        .await?;
        self.store().set_state(&c.id, State::Stopped, None)?;
        Ok(())
    }

    /// Removes what a restore left in a container's old slot once the old guest is
    /// gone: its LXC definition (waiting out LXC's teardown) and the old rootfs tree.
    /// Runs in the background under the container's lock, so the next operation on the
    /// container finds the slot free; a crash before it is finished by reconcile.
    fn retire_slot(&self, id: &str, slot: u8) {
        let lock = self.lock_for(id);
        let (runtime, pool) = (self.runtime.clone(), self.pool.clone());
        let (id, name) = (id.to_string(), Self::lxc_name(id, slot));
        tokio::spawn(async move {
            let _guard = lock.lock_owned().await;
            let done = blocking(move || {
                runtime.undefine(&name).map_err(internal)?;
                pool.recover_container(&id).map_err(internal)
            })
            .await;
            if let Err(e) = done {
                tracing::warn!("removing a restore's old guest: {e}");
            }
        });
    }

    /// Finishes a restore that a crash cut off, from wherever it stopped: the guest is
    /// killed (again: a kill sent before the crash may still be in flight), the rootfs
    /// is whichever the atomic swap left in place (the old state or the restored one),
    /// its leftover twin goes, the disk cap is set again, and the guest boots if it is
    /// recorded running. Every step is idempotent, so a crash in here is finished by the
    /// next start the same way.
    async fn finish_restore(&self, c: &ContainerRow) -> Result<(), NodeError> {
        // A start cut off by the crash is let finish first, so the kill is not lost on
        // a guest still coming up.
        let name = Self::lxc_name(&c.id, c.slot);
        self.settled_state(&name).await?;
        let runtime = self.runtime.clone();
        let pool = self.pool.clone();
        let other = Self::lxc_name(&c.id, 1 - c.slot);
        let id = c.id.clone();
        let disk_bytes = c.disk_bytes;
        let spec = self.spec(c);
        blocking(move || {
            // Both slots: the guest the restore abandoned may still be going down in
            // the other one, on the tree about to be removed.
            runtime.undefine(&other).map_err(internal)?;
            runtime.kill(&name).map_err(internal)?;
            pool.recover_container(&id).map_err(internal)?;
            apply_quota(&*pool, &id, disk_bytes)?;
            runtime.define(&spec).map_err(internal)
        })
        .await?;
        self.forget_agent(&c.id);
        if c.state == State::Running {
            if let Err(e) = self.boot(c).await {
                let msg = format!("restore interrupted, then boot failed: {e}");
                self.store().set_state(&c.id, State::Failed, Some(&msg))?;
                return Err(e);
            }
        }
        Ok(())
    }

    /// A new container from a snapshot (branch) or from a container's current state
    /// (copy), with its own identity: id, IP, uid block, secret, hostname, machine-id.
    pub async fn copy(&self, key: &str, req: CopyRequest) -> Result<ContainerRow, NodeError> {
        let src = self.get(key)?;
        if !valid_name(&req.name) {
            return Err(NodeError::Invalid(format!(
                "container name {:?}: use 1-63 of a-z, 0-9 and '-'",
                req.name
            )));
        }
        let project = req.target_project_id.clone().unwrap_or(src.project.clone());
        let path = match &req.source_snapshot {
            Some(snap) => {
                let s = self.store().snapshot(&src.id, snap)?;
                self.pool.snapshot_path(&src.id, &s.name)
            }
            None => self.pool.rootfs(&src.id),
        };
        let row = self.allocate(
            &project,
            &req.name,
            &src.image,
            src.memory_bytes >> 20,
            src.cpus,
            src.pids,
            src.disk_bytes,
            Some(src.autostart),
        )?;
        self.finish_create(row, Source::Path(path)).await
    }

    /// Deletes snapshots whose expiry has passed.
    pub async fn sweep_expired(&self) -> Result<Vec<String>, NodeError> {
        let now = time::OffsetDateTime::now_utc();
        let fmt = &time::format_description::well_known::Rfc3339;
        let expired: Vec<_> = self
            .store()
            .snapshots(None)?
            .into_iter()
            .filter(|s| {
                s.expires_at
                    .as_deref()
                    .and_then(|e| time::OffsetDateTime::parse(e, fmt).ok())
                    .is_some_and(|e| e <= now)
            })
            .collect();
        let mut done = Vec::new();
        for s in expired {
            self.delete_snapshot(&s.container_id, &s.name).await?;
            done.push(format!("{}/{}", s.container_id, s.name));
        }
        Ok(done)
    }

    /// Removes every trace of a container, in an order that is safe to repeat: the guest,
    /// its network, its rootfs, its agent directory, and last its row (so a crash
    /// part-way leaves a row that reconcile purges again).
    pub async fn purge(&self, c: &ContainerRow) -> Result<(), NodeError> {
        self.forget_agent(&c.id);
        let runtime = self.runtime.clone();
        let pool = self.pool.clone();
        let netcfg = self.cfg.network.clone();
        let (id, ip) = (c.id.clone(), c.ip);
        let agent_dir = self.agent_dir(&c.id);
        blocking(move || purge_machine(&*runtime, &*pool, &netcfg, &id, ip, &agent_dir)).await?;
        self.store().delete_container(&c.id)?;
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&c.id);
        Ok(())
    }

    /// Brings the store and the machine into agreement after a start (or a crash).
    pub async fn reconcile(&self) -> Result<Vec<String>, NodeError> {
        let mut report = Vec::new();
        // Restores cut off by a crash, before anything looks at their guests' state: a
        // guest killed by the restore may still report RUNNING (see `restore`).
        let restoring: Vec<_> = self
            .store()
            .snapshots(None)?
            .into_iter()
            .filter(|s| s.state == RESTORING)
            .collect();
        for sn in restoring {
            let c = self.store().container(&sn.container_id).ok();
            // A container being created or deleted is purged below, snapshots and all.
            if let Some(c) = c.filter(|c| !matches!(c.state, State::Creating | State::Deleting)) {
                match self.finish_restore(&c).await {
                    Ok(()) => report.push(format!(
                        "{}: restore from {} was interrupted; finished",
                        c.id, sn.name
                    )),
                    Err(e) => report.push(format!(
                        "{}: restore from {} was interrupted; finishing it failed: {e}",
                        c.id, sn.name
                    )),
                }
            }
            self.store()
                .set_snapshot_state(&sn.container_id, &sn.name, "ready")?;
        }
        // Stops cut off by a crash, before the guests' state is read (a killed guest
        // may still report RUNNING).
        let stopping: Vec<_> = self
            .store()
            .containers(None)?
            .into_iter()
            .filter(|c| c.state == State::Stopping)
            .collect();
        for c in stopping {
            match self.finish_stop(&c).await {
                Ok(()) => report.push(format!("{}: stop was interrupted; finished", c.id)),
                Err(e) => {
                    self.store()
                        .set_state(&c.id, State::Failed, Some(&e.to_string()))?;
                    report.push(format!(
                        "{}: stop was interrupted; finishing it failed: {e}",
                        c.id
                    ));
                }
            }
        }
        let rows = self.store().containers(None)?;
        for c in &rows {
            match c.state {
                State::Creating | State::Deleting => {
                    report.push(format!(
                        "{}: {} was interrupted; removing it",
                        c.id,
                        c.state.as_str()
                    ));
                    self.purge(c).await?;
                }
                State::Running | State::Stopping | State::Stopped | State::Failed => {
                    // A restore's old guest in the other slot, if its clean-up was cut
                    // off: gone before anything below touches the old tree it ran on.
                    let runtime = self.runtime.clone();
                    let other = Self::lxc_name(&c.id, 1 - c.slot);
                    blocking(move || runtime.undefine(&other).map_err(internal)).await?;
                    let st = self.settled_state(&Self::lxc_name(&c.id, c.slot)).await?;
                    let rootfs_ok = self.pool.rootfs(&c.id).exists();
                    if !rootfs_ok {
                        report.push(format!("{}: rootfs missing; marked failed", c.id));
                        self.store()
                            .set_state(&c.id, State::Failed, Some("rootfs missing"))?;
                        continue;
                    }
                    // A restore cut off between swapping in the new rootfs and limiting
                    // it leaves the disk unlimited; setting the limit is idempotent.
                    let pool = self.pool.clone();
                    let (id, bytes) = (c.id.clone(), c.disk_bytes);
                    if let Err(e) = blocking(move || apply_quota(&*pool, &id, bytes)).await {
                        report.push(format!("{}: disk limit not applied: {e}", c.id));
                    }
                    if st == RunState::Missing {
                        // The definition is derived data: write it again.
                        let runtime = self.runtime.clone();
                        let spec = self.spec(c);
                        blocking(move || runtime.define(&spec).map_err(internal)).await?;
                        report.push(format!("{}: LXC definition restored", c.id));
                    }
                    let running = st == RunState::Running;
                    if running && c.state != State::Running {
                        self.store().set_state(&c.id, State::Running, None)?;
                        report.push(format!("{}: found running", c.id));
                    } else if !running && c.state == State::Running {
                        if c.autostart {
                            report.push(format!("{}: autostart", c.id));
                            self.store().set_state(&c.id, State::Stopped, None)?;
                            if let Err(e) = self.start(&c.id).await {
                                report.push(format!("{}: autostart failed: {e}", c.id));
                            }
                        } else {
                            self.store().set_state(&c.id, State::Stopped, None)?;
                            report.push(format!("{}: found stopped", c.id));
                        }
                    }
                }
            }
        }
        // Snapshot work that was interrupted (restores were finished above), and
        // restores cut off mid-swap.
        let snaps = self.store().snapshots(None)?;
        for sn in snaps.iter().filter(|s| s.state == "creating") {
            // A freeze this daemon asked for may still hold the guest's databases: end
            // it now rather than after the agent's own timeout.
            let Ok(c) = self.store().container(&sn.container_id) else {
                continue;
            };
            if c.state != State::Running {
                continue;
            }
            let thawed = match self.agent(&c) {
                Ok(agent) => tokio::time::timeout(THAW_ON_RECONCILE, agent.thaw_all())
                    .await
                    .map_err(|_| "timed out".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string())),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = thawed {
                report.push(format!(
                    "{}: could not end a freeze the crash left (the agent ends it by \
                     itself within {FREEZE_HOLD:?}): {e}",
                    c.id
                ));
            }
        }
        for sn in snaps.iter().filter(|s| s.state != "ready") {
            let pool = self.pool.clone();
            let (id, name) = (sn.container_id.clone(), sn.name.clone());
            blocking(move || pool.delete_snapshot(&id, &name).map_err(internal)).await?;
            self.store().delete_snapshot(&sn.container_id, &sn.name)?;
            report.push(format!(
                "{}/{}: interrupted snapshot removed",
                sn.container_id, sn.name
            ));
        }
        let rows = self.store().containers(None)?;
        for c in rows {
            let pool = self.pool.clone();
            blocking(move || pool.recover_container(&c.id).map_err(internal)).await?;
        }
        for s in self.sweep_expired().await? {
            report.push(format!("{s}: expired snapshot deleted"));
        }
        // Things on the machine the store does not know: leftovers of a crash between
        // creating them and recording them (or of a store that was reset).
        let known: std::collections::HashMap<String, u8> = self
            .store()
            .containers(None)?
            .into_iter()
            .map(|c| (c.id, c.slot))
            .collect();
        let runtime = self.runtime.clone();
        let pool = self.pool.clone();
        let netcfg = self.cfg.network.clone();
        let agents_dir = self.cfg.agents_dir();
        let leaks = blocking(move || {
            let mut leaks = Vec::new();
            for name in runtime.list().map_err(internal)? {
                if let Some((id, slot)) = Node::parse_lxc_name(&name) {
                    if known.get(id) != Some(&slot) {
                        runtime.undefine(&name).map_err(internal)?;
                        leaks.push(format!("{name}: unknown LXC container removed"));
                    }
                }
            }
            for id in pool.container_ids().map_err(internal)? {
                if !known.contains_key(&id) {
                    pool.delete_container(&id).map_err(internal)?;
                    leaks.push(format!("{id}: unknown rootfs removed"));
                }
            }
            let live: std::collections::HashSet<String> = known
                .iter()
                .map(|(id, slot)| net::veth_name(&netcfg, id, *slot))
                .collect();
            for link in net::links::leftover_links(&netcfg).map_err(internal)? {
                if !live.contains(&link) {
                    net::links::release(&netcfg, &link, Ipv4Addr::UNSPECIFIED).map_err(internal)?;
                    leaks.push(format!("{link}: stray veth removed"));
                }
            }
            if let Ok(rd) = std::fs::read_dir(&agents_dir) {
                for e in rd.flatten() {
                    let id = e.file_name().to_string_lossy().into_owned();
                    if !known.contains_key(&id) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            Ok(leaks)
        })
        .await?;
        report.extend(leaks);
        Ok(report)
    }
}

fn purge_machine(
    runtime: &dyn Runtime,
    pool: &dyn Storage,
    netcfg: &net::NetConfig,
    id: &str,
    ip: Ipv4Addr,
    agent_dir: &std::path::Path,
) -> Result<(), NodeError> {
    for slot in [0, 1] {
        runtime
            .undefine(&Node::lxc_name(id, slot))
            .map_err(internal)?;
        net::links::release(netcfg, &net::veth_name(netcfg, id, slot), ip).map_err(internal)?;
    }
    pool.delete_container(id).map_err(internal)?;
    match std::fs::remove_dir_all(agent_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(internal(anyhow::anyhow!("{}: {e}", agent_dir.display()))),
    }
}

/// `s20261123-041512`: sortable, and valid as a subvolume name.
fn check_disk_gb(gb: u64) -> Result<(), NodeError> {
    if DISK_GB_RANGE.contains(&gb) {
        Ok(())
    } else {
        Err(NodeError::Invalid(format!(
            "disk {gb} GB: use {}-{} GB",
            DISK_GB_RANGE.start(),
            DISK_GB_RANGE.end()
        )))
    }
}

/// Sets the container's disk cap on its (possibly new) rootfs subvolume. Without quota
/// support there is nothing to enforce, and the container runs unlimited rather than
/// not at all.
fn apply_quota(pool: &dyn Storage, id: &str, bytes: Option<u64>) -> Result<(), NodeError> {
    if !pool.info().quotas {
        return Ok(());
    }
    pool.set_quota(id, bytes).map_err(internal)
}

fn snapshot_name(t: time::OffsetDateTime) -> String {
    format!(
        "s{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Ten lowercase alphanumerics: short enough for interface names, random enough to
/// never collide on a node.
fn new_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..10)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The host directory that becomes /run/hearth in the guest. Owned by host root: with
/// the idmapped bind mount it appears as the guest's root (a directory owned by the
/// guest's mapped uid would show up as nobody). 0700: only this guest's root sees it.
fn make_agent_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        // Traversable, not listable: LXC sets up the bind mount partly as the guest's
        // mapped root, which must be able to walk to the directory.
        std::fs::DirBuilder::new().recursive(true).create(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Gives a fresh rootfs its identity: hostname, DNS, the agent's secret. Files written
/// by host root appear as the guest's root through the idmapped mount.
fn provision_rootfs(
    rootfs: &std::path::Path,
    hostname: &str,
    resolv: &str,
    secret_hex: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let etc = rootfs.join("etc");
    std::fs::write(etc.join("hostname"), format!("{hostname}\n"))?;
    std::fs::write(
        etc.join("hosts"),
        format!(
            "127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost ip6-loopback\n"
        ),
    )?;
    let resolv_path = etc.join("resolv.conf");
    let _ = std::fs::remove_file(&resolv_path); // may be a dangling symlink
    std::fs::write(&resolv_path, resolv)?;
    let hearth = etc.join("hearth");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&hearth)?;
    let secret_path = hearth.join("agent.secret");
    let _ = std::fs::remove_file(&secret_path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)?;
    f.write_all(secret_hex.as_bytes())?;
    // Each container must get its own machine-id: empty means "generate at first boot".
    std::fs::write(etc.join("machine-id"), b"")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_name("web-1"));
        assert!(!valid_name("Web"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("x-"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(!valid_name("a/b"));
        let id = new_id();
        assert_eq!(id.len(), 10);
        assert!(valid_name(&id));
    }

    #[test]
    fn runtime_names_say_container_and_slot() {
        for slot in [0, 1] {
            let name = Node::lxc_name("abcdefghij", slot);
            assert_eq!(Node::parse_lxc_name(&name), Some(("abcdefghij", slot)));
        }
        assert_eq!(Node::lxc_name("abcdefghij", 1), "h-abcdefghij-1");
        assert_eq!(Node::parse_lxc_name("web"), None);
    }
}
