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
    Stopped,
    Failed,
    Deleting,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
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
}

pub struct Store {
    conn: Connection,
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
    PRIMARY KEY (container_id, name)
);
"#;

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
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
        ("snapshots", "quiesced", "TEXT"),
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
        Ok(Store { conn })
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Store { conn })
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

    /// Deletes an empty project; one that still has containers is a conflict.
    pub fn delete_project(&self, name: &str) -> Result<(), StoreError> {
        self.project(name)?;
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM containers WHERE project = ?1",
            [name],
            |r| r.get(0),
        )?;
        if n > 0 {
            return Err(StoreError::Conflict(format!(
                "project {name} still has {n} container(s)"
            )));
        }
        self.conn
            .execute("DELETE FROM projects WHERE name = ?1", [name])?;
        Ok(())
    }

    pub fn insert_container(&self, c: &ContainerRow) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO containers (id, project, name, image, state, ip, idmap_block, secret,
                 memory_bytes, cpus, pids, autostart, created_at, error, disk_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
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
                    c.disk_bytes.map(|b| b as i64)
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

    pub fn delete_container(&self, id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM containers WHERE id = ?1", [id])?;
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
            "SELECT container_id, name, alias, created_at, expires_at, state, quiesced
             FROM snapshots
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

    /// Marks a snapshot made: `ready`, with what was quiesced for it.
    pub fn set_snapshot_ready(
        &self,
        container_id: &str,
        name: &str,
        quiesced: Option<&[String]>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE snapshots SET state = 'ready', quiesced = ?3
             WHERE container_id = ?1 AND name = ?2",
            params![container_id, name, quiesced.map(|q| q.join(","))],
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
}
