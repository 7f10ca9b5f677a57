//! A database workload inside a guest, for the snapshot benchmark and the consistency
//! test: PostgreSQL, MariaDB and Redis from Debian's packages, and a SQLite database in
//! WAL mode where the kit keeps its own (`/var/lib/hearth-kit/`), each fed by its own
//! writer that inserts numbered rows 1, 2, 3, … and records the last number the
//! database acknowledged in `/var/lib/hearth-load/<db>` (written atomically after each
//! acknowledgement). A consistent snapshot therefore holds, for every database, the rows
//! 1..=max with no gap, and max is at least the acknowledged number the snapshot itself
//! holds (and at least what the host read before asking for the snapshot).
//!
//! The scripts run with `sh -c` as root inside the guest.

/// The databases, as named in the acknowledgement files and in [`check`]'s output.
pub const DATABASES: [&str; 4] = ["postgresql", "mariadb", "redis", "sqlite"];

/// Installs and starts the three servers (Debian 13 packages) and the `sqlite3` shell,
/// and makes the tables.
pub const INSTALL: &str = r#"set -e
export DEBIAN_FRONTEND=noninteractive
if ! command -v psql >/dev/null || ! command -v mariadb >/dev/null || ! command -v redis-cli >/dev/null || ! command -v sqlite3 >/dev/null; then
  apt-get update -q >/var/log/hearth-load-install.log 2>&1 || { tail -30 /var/log/hearth-load-install.log; exit 1; }
  apt-get install -y -q --no-install-recommends postgresql mariadb-server redis-server sqlite3 \
    >>/var/log/hearth-load-install.log 2>&1 || { tail -30 /var/log/hearth-load-install.log; exit 1; }
fi
systemctl enable --now -q postgresql mariadb redis-server
ready=0
for _ in $(seq 600); do
  if runuser -u postgres -- psql -qAtc 'SELECT 1' >/dev/null 2>&1 \
     && mariadb -e 'SELECT 1' >/dev/null 2>&1 && [ "$(redis-cli PING 2>/dev/null)" = PONG ]; then
    ready=1; break
  fi
  sleep 0.2
done
[ "$ready" = 1 ] || { echo "databases did not come up"; systemctl --no-pager status postgresql@\* mariadb redis-server; exit 1; }
runuser -u postgres -- psql -qAtc 'SET client_min_messages = warning; DROP TABLE IF EXISTS rows; CREATE TABLE rows (i int PRIMARY KEY)'
mariadb -e 'CREATE DATABASE IF NOT EXISTS hearth; DROP TABLE IF EXISTS hearth.rows; CREATE TABLE hearth.rows (i int PRIMARY KEY) ENGINE=InnoDB'
redis-cli DEL rows >/dev/null
rm -rf /var/lib/hearth-kit/load
install -d /var/lib/hearth-kit/load
sqlite3 /var/lib/hearth-kit/load/load.db 'PRAGMA journal_mode=WAL; CREATE TABLE rows (i INTEGER PRIMARY KEY)' >/dev/null
rm -rf /var/lib/hearth-load
install -d -m 1777 /var/lib/hearth-load
echo installed
"#;

/// Starts the writers as transient systemd services (they do not survive into a branch,
/// which boots without them). Each SQLite insert is its own `sqlite3` process, as a
/// script's would be, with a busy timeout as any writer sharing a database needs; a
/// reader holding the database open keeps the last writer's close from checkpointing
/// and removing the log, as a long-running service's connection would.
pub const START_WRITERS: &str = r#"set -e
ack='echo $i > /var/lib/hearth-load/$db.tmp && mv /var/lib/hearth-load/$db.tmp /var/lib/hearth-load/$db'
systemd-run -q --unit=hearth-load-postgresql -p User=postgres sh -c "db=postgresql; i=0; while :; do i=\$((i+1)); psql -qAtc \"INSERT INTO rows VALUES (\$i)\" >/dev/null || exit 1; $ack; done"
systemd-run -q --unit=hearth-load-mariadb sh -c "db=mariadb; i=0; while :; do i=\$((i+1)); mariadb -e \"INSERT INTO hearth.rows VALUES (\$i)\" || exit 1; $ack; done"
systemd-run -q --unit=hearth-load-redis sh -c "db=redis; i=0; while :; do i=\$((i+1)); [ \"\$(redis-cli RPUSH rows \$i)\" = \"\$i\" ] || exit 1; $ack; done"
systemd-run -q --unit=hearth-load-sqlite-reader sh -c "{ echo 'SELECT count(*) FROM rows;'; exec sleep infinity; } | sqlite3 /var/lib/hearth-kit/load/load.db >/dev/null"
systemd-run -q --unit=hearth-load-sqlite sh -c "db=sqlite; i=0; while :; do i=\$((i+1)); sqlite3 -cmd '.timeout 10000' /var/lib/hearth-kit/load/load.db \"INSERT INTO rows VALUES (\$i)\" || exit 1; $ack; done"
echo started
"#;

/// Stops the writers.
pub const STOP_WRITERS: &str = "systemctl stop hearth-load-postgresql hearth-load-mariadb \
     hearth-load-redis hearth-load-sqlite hearth-load-sqlite-reader 2>/dev/null; true";

/// Prints one line per database: `<db> acked=<n> count=<rows> max=<largest row>`, after
/// waiting (up to a minute) for all three servers to answer. `acked` is what this
/// machine's acknowledgement file says (0 when it has none yet). Fails if SQLite's
/// integrity check finds anything wrong.
pub const CHECK: &str = r#"for _ in $(seq 300); do
  if runuser -u postgres -- psql -qAtc 'SELECT 1' >/dev/null 2>&1 \
     && mariadb -e 'SELECT 1' >/dev/null 2>&1 && [ "$(redis-cli PING 2>/dev/null)" = PONG ]; then
    break
  fi
  sleep 0.2
done
acked() { cat /var/lib/hearth-load/$1 2>/dev/null || echo 0; }
pg=$(runuser -u postgres -- psql -qAtF ' ' -c 'SELECT count(*), coalesce(max(i), 0) FROM rows') || exit 1
my=$(mariadb -N -e 'SELECT count(*), coalesce(max(i), 0) FROM hearth.rows') || exit 1
rn=$(redis-cli LLEN rows) || exit 1
rm=$(redis-cli LINDEX rows -1)
echo "postgresql acked=$(acked postgresql) count=${pg% *} max=${pg#* }"
set -- $my
echo "mariadb acked=$(acked mariadb) count=$1 max=$2"
echo "redis acked=$(acked redis) count=$rn max=${rm:-0}"
ok=$(sqlite3 /var/lib/hearth-kit/load/load.db 'PRAGMA integrity_check') || exit 1
[ "$ok" = ok ] || { echo "sqlite integrity_check: $ok" >&2; exit 1; }
sq=$(sqlite3 -separator ' ' /var/lib/hearth-kit/load/load.db 'SELECT count(*), coalesce(max(i), 0) FROM rows') || exit 1
echo "sqlite acked=$(acked sqlite) count=${sq% *} max=${sq#* }"
"#;

/// Reads the writers' acknowledgement files: one number per database, in [`DATABASES`]
/// order.
pub const ACKED: &str = "for db in postgresql mariadb redis sqlite; do \
     cat /var/lib/hearth-load/$db 2>/dev/null || echo 0; done";

/// One database's state as [`CHECK`] printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbState {
    pub db: String,
    pub acked: u64,
    pub count: u64,
    pub max: u64,
}

/// Parses [`CHECK`]'s output.
pub fn parse_check(out: &str) -> Result<Vec<DbState>, String> {
    let mut v = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let db = words.next().ok_or("empty line")?.to_string();
        let mut field = |k: &str| -> Result<u64, String> {
            let w = words.next().ok_or_else(|| format!("{line:?}: no {k}"))?;
            w.strip_prefix(&format!("{k}="))
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| format!("{line:?}: bad {k}"))
        };
        let (acked, count, max) = (field("acked")?, field("count")?, field("max")?);
        v.push(DbState {
            db,
            acked,
            count,
            max,
        });
    }
    if v.len() != DATABASES.len() {
        return Err(format!("expected {} databases in {out:?}", DATABASES.len()));
    }
    Ok(v)
}

/// Parses [`ACKED`]'s output.
pub fn parse_acked(out: &str) -> Result<Vec<u64>, String> {
    let v: Vec<u64> = out
        .split_whitespace()
        .map(|w| w.parse().map_err(|_| format!("bad number {w:?}")))
        .collect::<Result<_, _>>()?;
    if v.len() != DATABASES.len() {
        return Err(format!("expected {} numbers in {out:?}", DATABASES.len()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_check_output() {
        let out = "postgresql acked=12 count=13 max=13\nmariadb acked=0 count=0 max=0\n\
                   redis acked=7 count=7 max=7\nsqlite acked=3 count=4 max=4\n";
        let v = parse_check(out).unwrap();
        assert_eq!(v[0].db, "postgresql");
        assert_eq!((v[0].acked, v[0].count, v[0].max), (12, 13, 13));
        assert_eq!(v[2].max, 7);
        assert!(parse_check("postgresql acked=1 count=x max=1\n").is_err());
        assert!(parse_check("postgresql acked=1 count=1 max=1\n").is_err());
        assert_eq!(parse_acked("3\n4\n5\n6\n").unwrap(), vec![3, 4, 5, 6]);
        assert!(parse_acked("3\n4\n").is_err());
    }
}
