//! The node's state in SQLite: projects and containers, with everything needed to
//! reconcile after a crash (allocated IP, uid range, agent secret, state).
//!
//! Writes are single statements or transactions, so a `kill -9` at any moment leaves a
//! consistent database; the daemon's reconcile then finishes or rolls back the operation
//! a row's state says was in flight.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Creating,
    Running,
    /// A stop was asked for and may still be in flight (liblxc's kill is asynchronous);
    /// reconcile finishes it.
    Stopping,
    Stopped,
    Failed,
    Deleting,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
            State::Deleting => "deleting",
        }
    }
}

impl FromStr for State {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "creating" => State::Creating,
            "running" => State::Running,
            "stopping" => State::Stopping,
            "stopped" => State::Stopped,
            "failed" => State::Failed,
            "deleting" => State::Deleting,
            other => return Err(StoreError::Corrupt(format!("state {other:?}"))),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Project {
    pub name: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerRow {
    pub id: String,
    pub project: String,
    pub name: String,
    pub image: String,
    pub state: State,
    pub ip: Ipv4Addr,
    pub idmap_block: u32,
    #[serde(skip)]
    pub secret_hex: String,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub pids: u64,
    /// Cap on the rootfs's referenced bytes; `None` is unlimited.
    pub disk_bytes: Option<u64>,
    pub autostart: bool,
    pub created_at: String,
    pub error: Option<String>,
    /// Which of the guest's two runtime definitions is current (0 or 1): a restore boots
    /// the restored rootfs in the other one while the old guest's teardown finishes.
    #[serde(skip)]
    pub slot: u8,
}

/// A snapshot as recorded. `state` is `creating`, `ready` or `deleting`: the intent is
/// written before the subvolume is made or removed, so reconcile can finish the job.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    pub container_id: String,
    pub name: String,
    pub alias: Option<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub state: String,
    /// The database engines flushed and held for it (`Some(empty)`: the guest ran no
    /// database); `None` when the guest was not running, so its disk was at rest.
    pub quiesced: Option<Vec<String>>,
    /// The container's disk use (as its `disk.used_bytes` shows it) when the snapshot
    /// was taken; `None` without quotas. Read at snapshot time because what a btrfs
    /// snapshot's own qgroup counts under simple quotas (the default) is only what it
    /// wrote itself: nothing.
    pub size_bytes: Option<u64>,
}

/// A project API token as stored: never the token itself, only its SHA-256, so a copy
/// of the database grants nothing.
#[derive(Debug, Clone, Serialize)]
pub struct ApiTokenRow {
    pub id: String,
    pub project: String,
    pub name: String,
    #[serde(skip)]
    pub hash: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// A guest service the operator opened to everyone (`service` is a canonical label such
/// as `files-1` or `http-8000`).
#[derive(Debug, Clone, Serialize)]
pub struct PublicServiceRow {
    pub container_id: String,
    pub service: String,
    pub created_at: String,
}

pub struct Store {
    conn: Connection,
    /// Bumped by every change to who may reach a guest (tokens, public services,
    /// projects and containers going away), so caches of those answers know when to
    /// ask again.
    access_generation: Arc<std::sync::atomic::AtomicU64>,
}

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL REFERENCES projects(name),
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    state TEXT NOT NULL,
    ip TEXT NOT NULL UNIQUE,
    idmap_block INTEGER NOT NULL UNIQUE,
    secret TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    cpus REAL NOT NULL,
    pids INTEGER NOT NULL,
    disk_bytes INTEGER,
    autostart INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    error TEXT,
    slot INTEGER NOT NULL DEFAULT 0,
    UNIQUE (project, name)
);
CREATE TABLE IF NOT EXISTS snapshots (
    container_id TEXT NOT NULL,
    name TEXT NOT NULL,
    alias TEXT,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    state TEXT NOT NULL,
    quiesced TEXT,
    size_bytes INTEGER,
    PRIMARY KEY (container_id, name)
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL REFERENCES projects(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at TEXT
);
CREATE INDEX IF NOT EXISTS api_tokens_project ON api_tokens(project);
CREATE TABLE IF NOT EXISTS public_services (
    container_id TEXT NOT NULL,
    service TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (container_id, service)
);
"#;

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn row_to_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiTokenRow> {
    Ok(ApiTokenRow {
        id: r.get("id")?,
        project: r.get("project")?,
        name: r.get("name")?,
        hash: r.get("hash")?,
        created_at: r.get("created_at")?,
        last_used_at: r.get("last_used_at")?,
        revoked_at: r.get("revoked_at")?,
    })
}

fn row_to_container(r: &rusqlite::Row<'_>) -> rusqlite::Result<ContainerRow> {
    let state: String = r.get("state")?;
    let ip: String = r.get("ip")?;
    let conv = |e: StoreError| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    };
    Ok(ContainerRow {
        id: r.get("id")?,
        project: r.get("project")?,
        name: r.get("name")?,
        image: r.get("image")?,
        state: state.parse().map_err(conv)?,
        ip: ip
            .parse()
            .map_err(|_| conv(StoreError::Corrupt(format!("ip {ip:?}"))))?,
        idmap_block: r.get("idmap_block")?,
        secret_hex: r.get("secret")?,
        memory_bytes: r.get::<_, i64>("memory_bytes")? as u64,
        cpus: r.get("cpus")?,
        pids: r.get::<_, i64>("pids")? as u64,
        disk_bytes: r.get::<_, Option<i64>>("disk_bytes")?.map(|b| b as u64),
        autostart: r.get("autostart")?,
        created_at: r.get("created_at")?,
        error: r.get("error")?,
        slot: u8::from(r.get::<_, i64>("slot")? != 0),
    })
}

/// Maps SQLite's uniqueness failures to a `Conflict` naming what clashed.
fn conflict(e: rusqlite::Error, what: &str) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(what.to_string())
        }
        _ => StoreError::Db(e),
    }
}

/// Brings a database made by an older hearthd up to [`SCHEMA`]: `CREATE TABLE IF NOT
/// EXISTS` leaves existing tables as they were, so columns added since are added here.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    // Existing containers stay unlimited, as they were created; existing snapshots say
    // nothing about quiescing.
    const ADDED: &[(&str, &str, &str)] = &[
        ("containers", "disk_bytes", "INTEGER"),
        ("containers", "slot", "INTEGER NOT NULL DEFAULT 0"),
        ("snapshots", "quiesced", "TEXT"),
        ("snapshots", "size_bytes", "INTEGER"),
    ];
    for (table, column, ty) in ADDED {
        let mut st = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        let columns: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        if !columns.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
        }
    }
    Ok(())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Store {
            conn,
            access_generation: Default::default(),
        })
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Store {
            conn,
            access_generation: Default::default(),
        })
    }

    pub fn create_project(&self, name: &str) -> Result<Project, StoreError> {
        let p = Project {
            name: name.to_string(),
            created_at: now(),
        };
        self.conn
            .execute(
                "INSERT INTO projects (name, created_at) VALUES (?1, ?2)",
                params![p.name, p.created_at],
            )
            .map_err(|e| conflict(e, &format!("project {name}")))?;
        Ok(p)
    }

    pub fn ensure_project(&self, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO projects (name, created_at) VALUES (?1, ?2)",
            params![name, now()],
        )?;
        Ok(())
    }

    pub fn projects(&self) -> Result<Vec<Project>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT name, created_at FROM projects ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(Project {
                name: r.get(0)?,
                created_at: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn project(&self, name: &str) -> Result<Project, StoreError> {
        self.conn
            .query_row(
                "SELECT name, created_at FROM projects WHERE name = ?1",
                [name],
                |r| {
                    Ok(Project {
                        name: r.get(0)?,
                        created_at: r.get(1)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("project {name}")))
    }

    /// Deletes an empty project; one that still has containers is a conflict. Its API
    /// tokens go with it, so a project later made with the same name does not inherit
    /// them.
    pub fn delete_project(&self, name: &str) -> Result<(), StoreError> {
        self.access_changed();
        let tx = self.conn.unchecked_transaction()?;
        self.project(name)?;
        let n: i64 = tx.query_row(
            "SELECT COUNT(*) FROM containers WHERE project = ?1",
            [name],
            |r| r.get(0),
        )?;
        if n > 0 {
            return Err(StoreError::Conflict(format!(
                "project {name} still has {n} container(s)"
            )));
        }
        tx.execute("DELETE FROM api_tokens WHERE project = ?1", [name])?;
        tx.execute("DELETE FROM projects WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    pub fn insert_container(&self, c: &ContainerRow) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO containers (id, project, name, image, state, ip, idmap_block, secret,
                 memory_bytes, cpus, pids, autostart, created_at, error, disk_bytes, slot)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    c.id,
                    c.project,
                    c.name,
                    c.image,
                    c.state.as_str(),
                    c.ip.to_string(),
                    c.idmap_block,
                    c.secret_hex,
                    c.memory_bytes as i64,
                    c.cpus,
                    c.pids as i64,
                    c.autostart,
                    c.created_at,
                    c.error,
                    c.disk_bytes.map(|b| b as i64),
                    c.slot
                ],
            )
            .map_err(|e| conflict(e, &format!("container {}/{}", c.project, c.name)))?;
        Ok(())
    }

    pub fn containers(&self, project: Option<&str>) -> Result<Vec<ContainerRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT * FROM containers WHERE (?1 IS NULL OR project = ?1) ORDER BY project, name",
        )?;
        let rows = st.query_map([project], row_to_container)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn container(&self, id: &str) -> Result<ContainerRow, StoreError> {
        self.conn
            .query_row(
                "SELECT * FROM containers WHERE id = ?1",
                [id],
                row_to_container,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("container {id}")))
    }

    /// Finds a container by id, `project/name`, or a name that is unique on the node.
    pub fn resolve(&self, key: &str) -> Result<ContainerRow, StoreError> {
        if let Ok(c) = self.container(key) {
            return Ok(c);
        }
        let found: Vec<ContainerRow> = match key.split_once('/') {
            Some((p, n)) => self
                .containers(Some(p))?
                .into_iter()
                .filter(|c| c.name == n)
                .collect(),
            None => self
                .containers(None)?
                .into_iter()
                .filter(|c| c.name == key)
                .collect(),
        };
        match found.len() {
            1 => Ok(found
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NotFound(key.into()))?),
            0 => Err(StoreError::NotFound(format!("container {key}"))),
            n => Err(StoreError::Conflict(format!(
                "{n} containers are named {key}; use project/name or the id"
            ))),
        }
    }

    pub fn set_state(&self, id: &str, state: State, error: Option<&str>) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE containers SET state = ?2, error = ?3 WHERE id = ?1",
            params![id, state.as_str(), error],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("container {id}")));
        }
        Ok(())
    }

    pub fn set_slot(&self, id: &str, slot: u8) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE containers SET slot = ?2 WHERE id = ?1",
            params![id, slot],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("container {id}")));
        }
        Ok(())
    }

    pub fn set_disk_bytes(&self, id: &str, bytes: Option<u64>) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE containers SET disk_bytes = ?2 WHERE id = ?1",
            params![id, bytes.map(|b| b as i64)],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("container {id}")));
        }
        Ok(())
    }

    /// Removes a container's row and what hangs off it (its public services), so a
    /// later container never finds the rows of an earlier one.
    pub fn delete_container(&self, id: &str) -> Result<(), StoreError> {
        self.access_changed();
        let tx = self.conn.unchecked_transaction()?;
        tx.execute("DELETE FROM public_services WHERE container_id = ?1", [id])?;
        tx.execute("DELETE FROM containers WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    pub fn insert_snapshot(&self, s: &SnapshotRow) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO snapshots
                 (container_id, name, alias, created_at, expires_at, state, quiesced)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    s.container_id,
                    s.name,
                    s.alias,
                    s.created_at,
                    s.expires_at,
                    s.state,
                    s.quiesced.as_ref().map(|q| q.join(","))
                ],
            )
            .map_err(|e| conflict(e, &format!("snapshot {}", s.name)))?;
        Ok(())
    }

    /// Every snapshot, or one container's, oldest first.
    pub fn snapshots(&self, container_id: Option<&str>) -> Result<Vec<SnapshotRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT container_id, name, alias, created_at, expires_at, state, quiesced,
             size_bytes FROM snapshots
             WHERE (?1 IS NULL OR container_id = ?1) ORDER BY created_at, name",
        )?;
        let rows = st.query_map([container_id], |r| {
            Ok(SnapshotRow {
                container_id: r.get(0)?,
                name: r.get(1)?,
                alias: r.get(2)?,
                created_at: r.get(3)?,
                expires_at: r.get(4)?,
                state: r.get(5)?,
                quiesced: r.get::<_, Option<String>>(6)?.map(|q| {
                    q.split(',')
                        .filter(|e| !e.is_empty())
                        .map(str::to_string)
                        .collect()
                }),
                size_bytes: r.get::<_, Option<i64>>(7)?.map(|b| b as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Finds a snapshot by name or alias.
    pub fn snapshot(&self, container_id: &str, key: &str) -> Result<SnapshotRow, StoreError> {
        self.snapshots(Some(container_id))?
            .into_iter()
            .find(|s| s.name == key || s.alias.as_deref() == Some(key))
            .ok_or_else(|| StoreError::NotFound(format!("snapshot {key}")))
    }

    pub fn set_snapshot_state(
        &self,
        container_id: &str,
        name: &str,
        state: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE snapshots SET state = ?3 WHERE container_id = ?1 AND name = ?2",
            params![container_id, name, state],
        )?;
        Ok(())
    }

    /// Marks a snapshot made: `ready`, with what was quiesced for it and its size.
    pub fn set_snapshot_ready(
        &self,
        container_id: &str,
        name: &str,
        quiesced: Option<&[String]>,
        size_bytes: Option<u64>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE snapshots SET state = 'ready', quiesced = ?3, size_bytes = ?4
             WHERE container_id = ?1 AND name = ?2",
            params![
                container_id,
                name,
                quiesced.map(|q| q.join(",")),
                size_bytes.map(|b| b as i64)
            ],
        )?;
        Ok(())
    }

    pub fn set_snapshot_alias(
        &self,
        container_id: &str,
        name: &str,
        alias: Option<&str>,
    ) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE snapshots SET alias = ?3 WHERE container_id = ?1 AND name = ?2",
            params![container_id, name, alias],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("snapshot {name}")));
        }
        Ok(())
    }

    pub fn delete_snapshot(&self, container_id: &str, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM snapshots WHERE container_id = ?1 AND name = ?2",
            params![container_id, name],
        )?;
        Ok(())
    }

    /// Records a new API token of an existing project; `hash` is the SHA-256 (hex) of the
    /// token, which itself is never stored.
    pub fn insert_api_token(
        &self,
        id: &str,
        project: &str,
        name: &str,
        hash: &str,
    ) -> Result<ApiTokenRow, StoreError> {
        self.access_changed();
        self.project(project)?;
        let t = ApiTokenRow {
            id: id.to_string(),
            project: project.to_string(),
            name: name.to_string(),
            hash: hash.to_string(),
            created_at: now(),
            last_used_at: None,
            revoked_at: None,
        };
        self.conn
            .execute(
                "INSERT INTO api_tokens (id, project, name, hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![t.id, t.project, t.name, t.hash, t.created_at],
            )
            .map_err(|e| conflict(e, &format!("token {id}")))?;
        Ok(t)
    }

    /// A project's tokens, revoked ones included, oldest first.
    pub fn api_tokens(&self, project: &str) -> Result<Vec<ApiTokenRow>, StoreError> {
        self.project(project)?;
        let mut st = self
            .conn
            .prepare("SELECT * FROM api_tokens WHERE project = ?1 ORDER BY created_at, id")?;
        let rows = st.query_map([project], row_to_token)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The token with this hash, revoked or not (the caller decides); an indexed lookup,
    /// cheap enough for every request.
    pub fn api_token_by_hash(&self, hash: &str) -> Result<Option<ApiTokenRow>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT * FROM api_tokens WHERE hash = ?1")?;
        Ok(st.query_row([hash], row_to_token).optional()?)
    }

    /// Revokes a project's token. Revoking one already revoked keeps the first time.
    pub fn revoke_api_token(&self, project: &str, id: &str) -> Result<ApiTokenRow, StoreError> {
        self.access_changed();
        self.conn.execute(
            "UPDATE api_tokens SET revoked_at = ?3
             WHERE project = ?1 AND id = ?2 AND revoked_at IS NULL",
            params![project, id, now()],
        )?;
        self.conn
            .query_row(
                "SELECT * FROM api_tokens WHERE project = ?1 AND id = ?2",
                [project, id],
                row_to_token,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("token {id} of project {project}")))
    }

    /// Notes that a token was just used.
    pub fn touch_api_token(&self, id: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        Ok(())
    }

    /// Opens (`public`) or closes a container's service to requests without
    /// credentials. Idempotent: opening an open service keeps its first time.
    pub fn set_public(
        &self,
        container_id: &str,
        service: &str,
        public: bool,
    ) -> Result<(), StoreError> {
        self.access_changed();
        // One transaction, so a container deleted meanwhile leaves no row behind.
        let tx = self.conn.unchecked_transaction()?;
        self.container(container_id)?;
        if public {
            tx.execute(
                "INSERT OR IGNORE INTO public_services (container_id, service, created_at)
                 VALUES (?1, ?2, ?3)",
                params![container_id, service, now()],
            )?;
        } else {
            tx.execute(
                "DELETE FROM public_services WHERE container_id = ?1 AND service = ?2",
                params![container_id, service],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// See [`Store::access_generation`].
    fn access_changed(&self) {
        self.access_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes whenever a token, a public service, a project or a container is
    /// created, revoked or removed.
    pub fn access_generation(&self) -> u64 {
        self.access_generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The counter behind [`Store::access_generation`], for readers that must not take
    /// the store's lock on every request (the proxy's per-connection grants).
    pub fn access_generation_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.access_generation.clone()
    }

    /// Whether a container's service is public: a primary-key lookup.
    pub fn is_public(&self, container_id: &str, service: &str) -> Result<bool, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT 1 FROM public_services WHERE container_id = ?1 AND service = ?2",
        )?;
        Ok(st.exists([container_id, service])?)
    }

    pub fn public_services(&self, container_id: &str) -> Result<Vec<PublicServiceRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT container_id, service, created_at FROM public_services
             WHERE container_id = ?1 ORDER BY service",
        )?;
        let rows = st.query_map([container_id], |r| {
            Ok(PublicServiceRow {
                container_id: r.get(0)?,
                service: r.get(1)?,
                created_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn used_ips(&self) -> Result<std::collections::HashSet<Ipv4Addr>, StoreError> {
        Ok(self.containers(None)?.into_iter().map(|c| c.ip).collect())
    }

    pub fn used_idmap_blocks(&self) -> Result<std::collections::HashSet<u32>, StoreError> {
        let mut st = self.conn.prepare("SELECT idmap_block FROM containers")?;
        let rows = st.query_map([], |r| r.get::<_, u32>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, name: &str, ip: [u8; 4], block: u32) -> ContainerRow {
        ContainerRow {
            id: id.into(),
            project: "p".into(),
            name: name.into(),
            image: "debian-13".into(),
            state: State::Creating,
            ip: Ipv4Addr::from(ip),
            idmap_block: block,
            secret_hex: "00".repeat(32),
            memory_bytes: 1 << 30,
            cpus: 1.0,
            pids: 100,
            disk_bytes: Some(10 << 30),
            autostart: true,
            created_at: now(),
            error: None,
            slot: 0,
        }
    }

    #[test]
    fn adds_disk_bytes_to_old_databases() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE containers (id TEXT PRIMARY KEY, memory_bytes INTEGER NOT NULL);",
        )
        .unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        migrate(&conn).unwrap();
        migrate(&conn).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('containers') WHERE name = 'disk_bytes'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn containers_are_unique_per_project_and_resolvable() {
        let s = Store::open_in_memory().unwrap();
        s.create_project("p").unwrap();
        assert!(matches!(
            s.create_project("p"),
            Err(StoreError::Conflict(_))
        ));
        s.insert_container(&row("a1", "web", [10, 88, 0, 2], 1))
            .unwrap();
        assert!(matches!(
            s.insert_container(&row("a2", "web", [10, 88, 0, 3], 2)),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.insert_container(&row("a3", "db", [10, 88, 0, 2], 3)),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.resolve("a1").unwrap().name, "web");
        assert_eq!(s.resolve("p/web").unwrap().id, "a1");
        assert_eq!(s.resolve("web").unwrap().id, "a1");
        assert!(matches!(s.resolve("nope"), Err(StoreError::NotFound(_))));
        s.set_state("a1", State::Running, None).unwrap();
        assert_eq!(s.container("a1").unwrap().state, State::Running);
        assert_eq!(s.container("a1").unwrap().disk_bytes, Some(10 << 30));
        s.set_disk_bytes("a1", None).unwrap();
        assert_eq!(s.container("a1").unwrap().disk_bytes, None);
        assert!(matches!(
            s.delete_project("p"),
            Err(StoreError::Conflict(_))
        ));
        s.delete_container("a1").unwrap();
        s.delete_project("p").unwrap();
    }

    #[test]
    fn api_tokens_are_revoked_and_go_with_their_project() {
        let s = Store::open_in_memory().unwrap();
        assert!(matches!(
            s.insert_api_token("t0", "p", "ci", "h0"),
            Err(StoreError::NotFound(_))
        ));
        s.create_project("p").unwrap();
        s.create_project("q").unwrap();
        s.insert_api_token("t1", "p", "ci", "h1").unwrap();
        s.insert_api_token("t2", "q", "ci", "h2").unwrap();
        assert!(matches!(
            s.insert_api_token("t3", "p", "dup", "h1"),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.api_token_by_hash("h1").unwrap().unwrap().project, "p");
        assert!(s.api_token_by_hash("nope").unwrap().is_none());
        s.touch_api_token("t1").unwrap();
        assert!(s.api_tokens("p").unwrap()[0].last_used_at.is_some());

        // Only the owning project can revoke, and revoking twice keeps the first time.
        assert!(matches!(
            s.revoke_api_token("q", "t1"),
            Err(StoreError::NotFound(_))
        ));
        let first = s.revoke_api_token("p", "t1").unwrap().revoked_at.unwrap();
        let again = s.revoke_api_token("p", "t1").unwrap().revoked_at.unwrap();
        assert_eq!(first, again);
        assert!(s
            .api_token_by_hash("h1")
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some());

        s.delete_project("q").unwrap();
        assert!(s.api_token_by_hash("h2").unwrap().is_none());
        s.create_project("q").unwrap();
        assert!(s.api_tokens("q").unwrap().is_empty());
    }

    #[test]
    fn public_services_go_with_their_container() {
        let s = Store::open_in_memory().unwrap();
        s.create_project("p").unwrap();
        assert!(matches!(
            s.set_public("a1", "files-1", true),
            Err(StoreError::NotFound(_))
        ));
        s.insert_container(&row("a1", "web", [10, 88, 0, 2], 1))
            .unwrap();
        s.set_public("a1", "files-1", true).unwrap();
        s.set_public("a1", "files-1", true).unwrap();
        s.set_public("a1", "http-8000", true).unwrap();
        assert!(s.is_public("a1", "files-1").unwrap());
        assert!(!s.is_public("a1", "files-2").unwrap());
        assert_eq!(s.public_services("a1").unwrap().len(), 2);
        s.set_public("a1", "files-1", false).unwrap();
        assert!(!s.is_public("a1", "files-1").unwrap());
        s.delete_container("a1").unwrap();
        assert!(s.public_services("a1").unwrap().is_empty());
        assert!(!s.is_public("a1", "http-8000").unwrap());
    }
}
