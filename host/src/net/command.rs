//! Running `nft` and `ip`. Both are small, stable command-line interfaces that show the
//! operator exactly what hearth did (the same commands work by hand), which is worth more
//! here than avoiding a process spawn on the rare paths that use them.

use super::NetError;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `program args...`, feeding it `stdin` if given, and returns its stdout. A non-zero
/// exit becomes [`NetError::Command`] carrying stderr.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let cmd_line = || {
        let mut s = program.to_owned();
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetError::io("run (is it installed?)", program))?;
    if let Some(input) = stdin {
        // Invariant: stdin was requested as a pipe just above.
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A write error (the program exited early) shows up in its exit status and stderr,
        // which say more than EPIPE would.
        let _ = pipe.write_all(input.as_bytes());
        drop(pipe);
    }
    let out = child
        .wait_with_output()
        .map_err(NetError::io("wait for", program))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(NetError::Command {
            cmd: cmd_line(),
            stderr: if stderr.is_empty() {
                out.status.to_string()
            } else {
                stderr
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
