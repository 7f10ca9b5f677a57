//! SQLite databases the kit owns (its state lives under [`crate::kit::STATE_DIR`]): each
//! one in WAL mode has its write-ahead log checkpointed into the main file and
//! truncated, so the snapshot's copy is whole in one file and opens with nothing to
//! replay.
//!
//! Nothing is held until thaw. SQLite has no server to ask for a pause, and none is
//! needed: the snapshot is atomic, so a write that lands in the log after the checkpoint
//! is captured with it and replayed when the copy is opened, exactly as after a power
//! cut. Holding a write transaction instead would make every writer without a busy
//! timeout fail with `SQLITE_BUSY`, which a freeze must never do.

use super::{Engine, EngineFuture, Held};
use hearth_protocol::Error;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How deep under the kit's state directory databases are looked for
/// (`<service>/<instance>/<db>` and a little more).
const MAX_DEPTH: usize = 4;
/// At most this many databases are checkpointed per freeze; any more are still
/// consistent in the snapshot (see the module's comment), only not compacted.
const MAX_DATABASES: usize = 256;
/// How long a checkpoint waits for the kit's own writers to finish a transaction.
const BUSY_WAIT: Duration = Duration::from_secs(2);
const MAGIC: &[u8; 16] = b"SQLite format 3\0";

pub(super) struct KitSqlite {
    root: PathBuf,
}

impl Default for KitSqlite {
    fn default() -> Self {
        KitSqlite {
            root: PathBuf::from(crate::kit::STATE_DIR),
        }
    }
}

impl KitSqlite {
    #[cfg(test)]
    pub(super) fn at(root: &Path) -> Self {
        KitSqlite {
            root: root.to_path_buf(),
        }
    }
}

impl Engine for KitSqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    fn units(&self) -> &'static [&'static str] {
        &[]
    }
    fn instances(&self) -> Option<Vec<String>> {
        let mut found = Vec::new();
        find_wal_databases(&self.root, MAX_DEPTH, &mut found);
        Some(
            found
                .into_iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        )
    }
    fn freeze(&self, instances: Vec<String>, timeout: Duration) -> EngineFuture<'_> {
        let wait = timeout.min(BUSY_WAIT);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                for db in &instances {
                    let wal = format!("{db}-wal");
                    if std::fs::metadata(&wal).is_ok_and(|m| m.len() == 0) {
                        // Already whole in its main file: not worth opening.
                        continue;
                    }
                    match checkpoint(Path::new(db), wait) {
                        Ok(Checkpoint::Truncated) => {}
                        Ok(Checkpoint::Busy) => tracing::debug!(
                            "sqlite {db}: readers kept part of the log; it is captured with the file"
                        ),
                        // Still consistent in the snapshot (atomic, log included): worth
                        // a line in the log, not a failed snapshot.
                        Err(e) => tracing::warn!("sqlite {db}: checkpoint: {e}"),
                    }
                }
                Held::Nothing
            })
            .await
            .map_err(|e| Error::internal(format!("sqlite checkpoint worker: {e}")))
        })
    }
}

/// Databases in WAL mode under `dir`: a `<name>-wal` beside a regular file `<name>` that
/// starts with SQLite's header. Symbolic links are neither followed nor taken (they may
/// point out of the kit's directory).
fn find_wal_databases(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if out.len() >= MAX_DATABASES {
            return;
        }
        let Ok(ft) = e.file_type() else { continue };
        let path = e.path();
        if ft.is_dir() {
            if depth > 1 {
                find_wal_databases(&path, depth - 1, out);
            }
            continue;
        }
        let name = e.file_name();
        let Some(db_name) = name.to_str().and_then(|n| n.strip_suffix("-wal")) else {
            continue;
        };
        if !ft.is_file() {
            continue;
        }
        let db = dir.join(db_name);
        if is_sqlite_file(&db) {
            out.push(db);
        }
    }
}

fn is_sqlite_file(p: &Path) -> bool {
    use std::io::Read;
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return false;
    };
    if !meta.file_type().is_file() {
        return false;
    }
    let mut head = [0u8; 16];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == MAGIC
}

#[derive(Debug, PartialEq, Eq)]
enum Checkpoint {
    /// Every frame is in the main file and the log is empty.
    Truncated,
    /// A reader still needed part of the log when the wait ran out.
    Busy,
}

/// `PRAGMA wal_checkpoint(TRUNCATE)` on `db`, opened without creating anything (SQLite,
/// running as root, gives a log or shared-memory file it must create the database's
/// owner).
fn checkpoint(db: &Path, wait: Duration) -> rusqlite::Result<Checkpoint> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(wait)?;
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    Ok(if busy == 0 {
        Checkpoint::Truncated
    } else {
        Checkpoint::Busy
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAL database with `rows` rows, none of them checkpointed, and the connection
    /// that wrote them (kept open so SQLite does not checkpoint at close).
    fn wal_db(path: &Path, rows: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch("CREATE TABLE t (i INTEGER PRIMARY KEY)")
            .unwrap();
        for i in 1..=rows {
            c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        c
    }

    /// The rows a copy of the main file holds without its log (`None`: not even the
    /// table).
    fn rows_in_main_file_alone(db: &Path, scratch: &Path) -> Option<i64> {
        let copy = scratch.join("alone.db");
        std::fs::copy(db, &copy).unwrap();
        let c = Connection::open(&copy).unwrap();
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).ok()
    }

    #[tokio::test]
    async fn kit_databases_are_checkpointed_into_their_main_file() {
        let kit = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let dir = kit.path().join("sqlite/1");
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("app.db");
        let _writer = wal_db(&db, 50);
        // Not databases, and one outside the kit reached by a link: left alone.
        std::fs::write(kit.path().join("notes-wal"), b"not a log").unwrap();
        std::fs::write(kit.path().join("notes"), b"plain text").unwrap();
        let foreign = outside.path().join("foreign.db");
        let _foreign_writer = wal_db(&foreign, 5);
        std::os::unix::fs::symlink(&foreign, kit.path().join("link.db")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("foreign.db-wal"),
            kit.path().join("link.db-wal"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), kit.path().join("linked-dir")).unwrap();

        let engine = KitSqlite::at(kit.path());
        let found = engine.instances().unwrap();
        assert_eq!(found, vec![db.to_string_lossy().into_owned()]);
        assert_eq!(rows_in_main_file_alone(&db, scratch.path()), None);

        let freezer = super::super::Freezer::new(
            vec![std::sync::Arc::new(engine)],
            super::super::SyncPolicy::HostSnapshotFlushes,
        );
        let (id, engines) = freezer.freeze(Duration::from_secs(5)).await.unwrap();
        assert_eq!(engines, ["sqlite"]);
        freezer.thaw(id).await.unwrap();
        assert_eq!(std::fs::metadata(dir.join("app.db-wal")).unwrap().len(), 0);
        assert_eq!(rows_in_main_file_alone(&db, scratch.path()), Some(50));
        assert!(
            std::fs::metadata(outside.path().join("foreign.db-wal"))
                .unwrap()
                .len()
                > 0,
            "a database outside the kit's directory must not be touched"
        );

        // With the log empty the database is still one of the kit's, whole on disk.
        let (id, engines) = freezer.freeze(Duration::from_secs(5)).await.unwrap();
        assert_eq!(engines, ["sqlite"]);
        freezer.thaw(id).await.unwrap();
        // A database in rollback-journal mode is consistent in an atomic snapshot as it
        // is (a hot journal rolls back on open): nothing to do, nothing named.
        drop(_writer);
        assert!(!dir.join("app.db-wal").exists(), "closing checkpoints");
        let (id, engines) = freezer.freeze(Duration::from_secs(5)).await.unwrap();
        assert!(engines.is_empty(), "{engines:?}");
        freezer.thaw(id).await.unwrap();
    }

    #[test]
    fn a_reader_mid_transaction_leaves_the_log_consistent_not_failed() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("busy.db");
        let writer = wal_db(&db, 10);
        let reader = Connection::open(&db).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 10);
        writer.execute("INSERT INTO t VALUES (11)", []).unwrap();
        // The reader pins a snapshot that needs the log: no truncation, no error.
        assert_eq!(
            checkpoint(&db, Duration::from_millis(50)).unwrap(),
            Checkpoint::Busy
        );
        reader.execute_batch("COMMIT").unwrap();
        assert_eq!(
            checkpoint(&db, Duration::from_millis(50)).unwrap(),
            Checkpoint::Truncated
        );
    }
}
