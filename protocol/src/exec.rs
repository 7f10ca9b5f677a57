//! Running processes in the guest.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// `argv[0]` is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's default environment: `PATH`, `HOME`,
    /// `USER`, `LANG` and, with a PTY, `TERM`.
    pub env: Vec<(String, String)>,
    /// Defaults to the user's home directory, or `/`.
    pub cwd: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Run on a pseudo-terminal of this size. Output then arrives as `Stdout` events only.
    pub pty: Option<WinSize>,
    pub stdio: StdioMode,
    /// Killed (the whole process group, SIGKILL) after this long.
    pub timeout_ms: Option<u64>,
    /// Keep the process running when the connection that started it goes away.
    /// Otherwise the agent kills its process group, so a vanished client leaks nothing.
    pub detached: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdioMode {
    /// Stdout and stderr come as events on the RPC channel; stdin is fed with
    /// [`Request::ExecInput`](crate::Request::ExecInput) and closed with
    /// [`Request::ExecCloseStdin`](crate::Request::ExecCloseStdin).
    #[default]
    Events,
    /// Stdin is `/dev/null`; output as events. What most one-shot commands want.
    NullStdin,
    /// Stdin and stdout go over a raw stream the client opens with
    /// [`StreamTarget::ExecStdio`](crate::StreamTarget::ExecStdio); stderr as events.
    /// For bulk pipes (`tar`, `cat`), where framing every chunk would be waste.
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The agent killed it because `timeout_ms` passed.
    pub timed_out: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The shell's convention: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}
