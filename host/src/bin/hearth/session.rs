//! An exec session on the local terminal: output to stdout/stderr, stdin forwarded,
//! raw mode and window-size changes for interactive terminals. Shared by
//! `hearth agent exec` and `hearth containers exec|shell`.

use hearth_host::agents::{AgentClient, ExecEvent};
use hearth_protocol::exec::{ExecRequest, WinSize};
use std::io::Write;
use std::sync::Arc;

/// `--env KEY=VALUE` arguments as pairs.
pub fn parse_env(env: Vec<String>) -> anyhow::Result<Vec<(String, String)>> {
    env.into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => anyhow::bail!("--env wants KEY=VALUE, got {kv:?}"),
        })
        .collect()
}

pub fn terminal_size() -> WinSize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills the winsize we pass; on failure we keep a default.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 {
        WinSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        }
    } else {
        WinSize { rows: 24, cols: 80 }
    }
}

/// Puts the local terminal in raw mode for an interactive session and restores it on drop.
pub struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter(on: bool) -> RawMode {
        if !on {
            return RawMode(None);
        }
        let stdin = std::io::stdin();
        let Ok(orig) = nix::sys::termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = orig.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw);
        RawMode(Some(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                orig,
            );
        }
    }
}

pub async fn exec(
    c: &Arc<AgentClient>,
    req: ExecRequest,
    forward_stdin: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    let mut session = c.exec(req).await?;
    let _raw = RawMode::enter(tty);
    let rpc = c.rpc().await?;
    let exec_id = session.exec_id;
    let stdin_task = forward_stdin.then(|| {
        let rpc = rpc.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let req = hearth_protocol::Request::ExecInput {
                            exec_id,
                            data: buf[..n].to_vec(),
                        };
                        if rpc.call(req).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = rpc
                .call(hearth_protocol::Request::ExecCloseStdin { exec_id })
                .await;
        })
    });
    let resize_task = tty.then(|| {
        let rpc = rpc.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                let req = hearth_protocol::Request::ExecResize {
                    exec_id,
                    size: terminal_size(),
                };
                let _ = rpc.call(req).await;
            }
        })
    });
    let mut code = 255;
    while let Some(ev) = session.next().await? {
        match ev {
            ExecEvent::Stdout(b) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&b)?;
                out.flush()?;
            }
            ExecEvent::Stderr(b) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&b)?;
                err.flush()?;
            }
            ExecEvent::Exit(st) => code = st.shell_code(),
        }
    }
    for t in [stdin_task, resize_task].into_iter().flatten() {
        t.abort();
    }
    Ok(code)
}
