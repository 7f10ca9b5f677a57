//! One-shot commands for the API (`POST /containers/{id}/exec`): run to completion with
//! the output collected up to a cap, optionally after an automatic snapshot. Interactive
//! sessions go through the `/agent` upgrade instead (the CLI's `exec` and `shell`).

use super::guest::{check_path, running_agent, GuestError};
use crate::agents::{AgentClient, ExecEvent, ExecSession};
use crate::node::{Node, SnapshotRequest};
use hearth_protocol::exec::{ExecRequest, ExitStatus, StdioMode};
use hearth_protocol::{Request, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Per stream: a command that prints more (a runaway `yes`, a `cat` of a disk image)
/// must not be able to make hearthd hold gigabytes for it.
pub const OUTPUT_CAP: usize = 16 << 20;
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
pub const MAX_TIMEOUT_SECS: u64 = 3600;
/// The agent kills the command at its deadline and reports `timed_out`; this much longer
/// hearthd waits for that report before it stops trusting the agent.
const AGENT_GRACE: Duration = Duration::from_secs(10);
/// Stdin goes to the agent in pieces well under its frame cap.
const STDIN_CHUNK: usize = 256 * 1024;
/// Looking up a user name in the guest.
const LOOKUP_TIMEOUT_MS: u64 = 10_000;

/// What to run: an argv, or a string for `sh -c`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Command {
    /// `argv[0]` is looked up in `PATH` when it has no slash.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`.
    Shell(String),
}

/// Whom to run as: a uid, or a user name looked up in the guest's passwd database.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum User {
    Uid(u32),
    Name(String),
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub command: Command,
    /// Added to (and overriding) the defaults: `PATH`, `HOME`, `USER`, `LANG`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute; defaults to the user's home directory.
    pub cwd: Option<String>,
    /// Defaults to root.
    pub user: Option<User>,
    /// Fed to the command's stdin, which is then closed. Without it stdin is
    /// `/dev/null`.
    pub stdin: Option<String>,
    /// 1-3600, default 60. At the deadline the command's process group is killed and
    /// `timed_out` is set.
    pub timeout_secs: Option<u64>,
    /// Take a snapshot (alias `auto-<UTC timestamp>`) first; its name comes back in
    /// `snapshot`, ready for a restore.
    #[serde(default)]
    pub snapshot_before: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunOutput {
    /// The exit code, if the command exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Killed because `timeout_secs` passed.
    pub timed_out: bool,
    /// As UTF-8; invalid sequences become U+FFFD.
    pub stdout: String,
    pub stderr: String,
    /// Stdout or stderr went over 16 MiB; the rest of it was dropped.
    pub truncated: bool,
    pub duration_ms: u64,
    /// The snapshot `snapshot_before` took.
    pub snapshot: Option<String>,
}

/// The alias of the snapshot `--snapshot-before` (CLI) and `snapshot_before` (API) take:
/// `auto-20261123T041512.345Z`. To the millisecond, because an alias must be unique per
/// container and two runs in one second are ordinary.
pub fn auto_snapshot_alias(now: time::OffsetDateTime) -> String {
    let t = now.to_offset(time::UtcOffset::UTC);
    format!(
        "auto-{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Runs a command in a running container and collects what it printed.
pub async fn run(node: &Node, key: &str, req: RunRequest) -> Result<RunOutput, GuestError> {
    let argv = argv_of(req.command)?;
    let env = env_of(req.env)?;
    if let Some(cwd) = &req.cwd {
        check_path("cwd", cwd)?;
    }
    let timeout = timeout_of(req.timeout_secs)?;
    let (c, agent) = running_agent(node, key)?;
    let uid = match req.user {
        None => None,
        Some(User::Uid(u)) => Some(u),
        Some(User::Name(n)) => Some(uid_of(&agent, &n).await?),
    };
    // After everything that can refuse the request: a refused run leaves no snapshot.
    let snapshot = if req.snapshot_before {
        let snap = SnapshotRequest {
            alias: Some(auto_snapshot_alias(time::OffsetDateTime::now_utc())),
            ..SnapshotRequest::default()
        };
        Some(node.snapshot(&c.id, snap).await?.name)
    } else {
        None
    };
    let exec = ExecRequest {
        argv,
        env,
        cwd: req.cwd,
        uid,
        stdio: if req.stdin.is_some() {
            StdioMode::Events
        } else {
            StdioMode::NullStdin
        },
        timeout_ms: Some(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
        ..ExecRequest::default()
    };
    let started = Instant::now();
    let session = agent.exec(exec).await.map_err(start_error)?;
    if let Some(data) = req.stdin {
        // Its own task: the output must be drained while stdin is written, or a command
        // that answers as it reads would stall both sides.
        tokio::spawn(feed_stdin(
            agent.clone(),
            session.exec_id,
            data.into_bytes(),
        ));
    }
    // Dropping `_caller` (the HTTP client went away and the handler was dropped) tells
    // the drain task to kill the command rather than let it run to its timeout.
    let (_caller, gone) = oneshot::channel::<()>();
    let deadline = started + timeout + AGENT_GRACE;
    let out = tokio::spawn(drain(session, gone, deadline))
        .await
        .map_err(|e| GuestError::Node(crate::node::NodeError::Internal(e.into())))??;
    Ok(RunOutput {
        exit_code: out.status.and_then(|s| s.code),
        signal: out.status.and_then(|s| s.signal),
        timed_out: out.status.is_some_and(|s| s.timed_out),
        truncated: out.stdout.truncated || out.stderr.truncated,
        stdout: text(out.stdout.buf),
        stderr: text(out.stderr.buf),
        duration_ms: started.elapsed().as_millis().try_into().unwrap_or(u64::MAX),
        snapshot,
    })
}

/// Output as a string without copying it when it is valid UTF-8 (most is).
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn argv_of(command: Command) -> Result<Vec<String>, GuestError> {
    let argv = match command {
        Command::Shell(s) if s.trim().is_empty() => {
            return Err(GuestError::Invalid("command is empty".into()))
        }
        Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s],
        Command::Argv(v) if v.first().is_none_or(|a| a.is_empty()) => {
            return Err(GuestError::Invalid(
                "command needs a program: [\"prog\", \"arg\", ...]".into(),
            ))
        }
        Command::Argv(v) => v,
    };
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(GuestError::Invalid("command contains a NUL byte".into()));
    }
    Ok(argv)
}

fn env_of(env: BTreeMap<String, String>) -> Result<Vec<(String, String)>, GuestError> {
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(GuestError::Invalid(format!(
                "env {k:?}: names are non-empty without '=' and NUL, values without NUL"
            )));
        }
    }
    Ok(env.into_iter().collect())
}

fn timeout_of(secs: Option<u64>) -> Result<Duration, GuestError> {
    let secs = secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if !(1..=MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(GuestError::Invalid(format!(
            "timeout_secs is 1-{MAX_TIMEOUT_SECS}, got {secs}"
        )));
    }
    Ok(Duration::from_secs(secs))
}

/// An exec that did not start was refused for the caller's reasons (no such program or
/// working directory, not executable, a bad uid), not the node's.
fn start_error(e: crate::agents::AgentError) -> GuestError {
    use hearth_protocol::ErrorKind as K;
    match e.kind() {
        Some(K::NotFound | K::InvalidArgument | K::PermissionDenied) => {
            GuestError::Start(GuestError::Agent(e).message())
        }
        _ => GuestError::Agent(e),
    }
}

/// The uid of `name` in the guest, through its NSS (`getent passwd`), so that whatever
/// the image uses for accounts is honoured.
async fn uid_of(agent: &AgentClient, name: &str) -> Result<u32, GuestError> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(uid);
    }
    let valid = !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
    if !valid {
        return Err(GuestError::Invalid(format!(
            "user {name:?}: not a user name"
        )));
    }
    let req = ExecRequest {
        argv: vec!["getent".into(), "passwd".into(), name.into()],
        stdio: StdioMode::NullStdin,
        timeout_ms: Some(LOOKUP_TIMEOUT_MS),
        ..ExecRequest::default()
    };
    let out = agent.exec(req).await?.wait().await?;
    match out.code() {
        0 => {}
        // getent's "key not found".
        2 => {
            return Err(GuestError::Invalid(format!(
                "user {name:?} does not exist in the container"
            )))
        }
        code => {
            return Err(GuestError::Start(format!(
                "looking up user {name:?} failed (getent exited {code}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
    parse_passwd_uid(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| GuestError::Start(format!("user {name:?}: unreadable passwd entry")))
}

/// The uid field of the first `name:passwd:uid:gid:...` line.
fn parse_passwd_uid(text: &str) -> Option<u32> {
    text.lines().next()?.split(':').nth(2)?.parse().ok()
}

async fn feed_stdin(agent: Arc<AgentClient>, exec_id: u64, data: Vec<u8>) {
    for chunk in data.chunks(STDIN_CHUNK) {
        let req = Request::ExecInput {
            exec_id,
            data: chunk.to_vec(),
        };
        // A command that exits (or closes stdin) without reading everything is normal,
        // as a broken pipe is for a shell.
        if let Err(e) = agent.call(req).await {
            tracing::debug!("exec {exec_id}: stdin not fully written: {e}");
            return;
        }
    }
    match agent.call(Request::ExecCloseStdin { exec_id }).await {
        Ok(Response::Done) => {}
        Ok(other) => tracing::debug!("exec {exec_id}: closing stdin: {other:?}"),
        Err(e) => tracing::debug!("exec {exec_id}: closing stdin: {e}"),
    }
}

/// Output kept up to a cap; what comes after is counted as dropped, not stored.
#[derive(Debug)]
struct Capped {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Capped {
            buf: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.buf.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&data[..data.len().min(room)]);
    }
}

struct Drained {
    stdout: Capped,
    stderr: Capped,
    status: Option<ExitStatus>,
}

/// Reads the command's events until it exits. Output past the cap is still read (and
/// dropped) so the command is never blocked on a full pipe.
async fn drain(
    mut session: ExecSession,
    mut caller_gone: oneshot::Receiver<()>,
    deadline: Instant,
) -> Result<Drained, GuestError> {
    let mut out = Drained {
        stdout: Capped::new(OUTPUT_CAP),
        stderr: Capped::new(OUTPUT_CAP),
        status: None,
    };
    loop {
        tokio::select! {
            ev = session.next() => match ev? {
                Some(ExecEvent::Stdout(b)) => out.stdout.push(&b),
                Some(ExecEvent::Stderr(b)) => out.stderr.push(&b),
                Some(ExecEvent::Exit(st)) => out.status = Some(st),
                None => return Ok(out),
            },
            _ = &mut caller_gone => {
                tracing::debug!("exec {}: the caller went away; killing it", session.exec_id);
                let _ = session.cancel().await;
                return Err(GuestError::Invalid("the caller went away".into()));
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    "exec {}: no exit status from the agent past the deadline; killing it",
                    session.exec_id
                );
                let _ = session.cancel().await;
                return Err(GuestError::TimedOut(
                    "the container's agent did not report the command's end in time".into(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_alias_is_utc_to_the_millisecond() {
        let t = time::macros::datetime!(2026-11-23 04:15:12.345 +02:00);
        assert_eq!(auto_snapshot_alias(t), "auto-20261123T021512.345Z");
        let t = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        assert_eq!(auto_snapshot_alias(t), "auto-20260102T030405.000Z");
    }

    #[test]
    fn output_is_capped_but_flagged() {
        let mut c = Capped::new(10);
        c.push(b"hello");
        c.push(b"");
        assert!(!c.truncated);
        c.push(b"world!!");
        assert_eq!(c.buf, b"helloworld");
        assert!(c.truncated);
        c.push(b"more");
        assert_eq!(c.buf.len(), 10);
        let mut exact = Capped::new(4);
        exact.push(b"abcd");
        assert!(!exact.truncated);
    }

    #[test]
    fn commands_parse_as_argv_or_shell() {
        let r: RunRequest = serde_json::from_str(r#"{"command": ["ls", "-l"]}"#).unwrap();
        assert_eq!(argv_of(r.command).unwrap(), ["ls", "-l"]);
        let r: RunRequest = serde_json::from_str(r#"{"command": "echo $HOME | wc -c"}"#).unwrap();
        assert_eq!(
            argv_of(r.command).unwrap(),
            ["/bin/sh", "-c", "echo $HOME | wc -c"]
        );
        for bad in [r#"[]"#, r#"[""]"#, r#""  ""#, r#"["a\u0000b"]"#] {
            let r: RunRequest = serde_json::from_str(&format!(r#"{{"command": {bad}}}"#)).unwrap();
            assert!(argv_of(r.command).is_err(), "{bad}");
        }
        // A typo is an error, not a silently ignored option.
        assert!(serde_json::from_str::<RunRequest>(
            r#"{"command": "true", "snapshotBefore": true}"#
        )
        .is_err());
    }

    #[test]
    fn users_are_uids_or_names() {
        let r: RunRequest =
            serde_json::from_str(r#"{"command": "id", "user": 1000, "env": {"A": "1"}}"#).unwrap();
        assert!(matches!(r.user, Some(User::Uid(1000))));
        assert_eq!(env_of(r.env).unwrap(), [("A".to_string(), "1".to_string())]);
        let r: RunRequest =
            serde_json::from_str(r#"{"command": "id", "user": "www-data"}"#).unwrap();
        assert!(matches!(r.user, Some(User::Name(ref n)) if n == "www-data"));
        assert_eq!(
            parse_passwd_uid("www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"),
            Some(33)
        );
        assert_eq!(parse_passwd_uid(""), None);
        let bad_env = BTreeMap::from([("A=B".to_string(), "1".to_string())]);
        assert!(env_of(bad_env).is_err());
    }

    #[test]
    fn output_becomes_text() {
        assert_eq!(text(b"ok\n".to_vec()), "ok\n");
        assert_eq!(text(vec![b'a', 0xff, b'b']), "a\u{fffd}b");
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(timeout_of(None).unwrap(), Duration::from_secs(60));
        assert_eq!(timeout_of(Some(3600)).unwrap(), Duration::from_secs(3600));
        assert!(timeout_of(Some(0)).is_err());
        assert!(timeout_of(Some(3601)).is_err());
    }
}
