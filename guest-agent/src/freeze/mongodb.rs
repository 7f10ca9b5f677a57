//! MongoDB: `fsyncLock` held on a `mongosh` session until thaw. MongoDB is not in
//! Debian's archive, so this engine is exercised only where an operator installed it;
//! it follows MongoDB's documented snapshot procedure.

use super::{command, Engine, EngineFuture, Held};
use hearth_protocol::Error;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub(super) struct MongoDb;
impl Engine for MongoDb {
    fn name(&self) -> &'static str {
        "mongodb"
    }
    fn units(&self) -> &'static [&'static str] {
        &["mongod.service", "mongodb.service"]
    }
    fn freeze(&self, _units: Vec<String>, timeout: Duration) -> EngineFuture<'_> {
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
