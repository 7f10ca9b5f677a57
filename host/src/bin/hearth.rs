//! `hearth`: the command line for a hearth node.
//!
//! For now: `hearth agent ...` talks to one guest agent directly (like Kata's agent-ctl),
//! and `hearth bench agent` measures the agent against this machine's own floors.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hearth_host::agents::{AgentClient, ExecEvent};
use hearth_protocol::exec::{ExecRequest, StdioMode, WinSize};
use hearth_protocol::files::{FileType, WriteMode, WriteOptions};
use hearth_protocol::{Endpoint, Secret};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Full Linux computers on your own server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Talk to one guest agent directly (debugging).
    Agent(AgentArgs),
    /// Measure hearth against this machine's own floors; prints JSON.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// unix:/path, vsock:CID:PORT or hvsock:/path:PORT
    #[arg(long)]
    endpoint: Endpoint,
    /// The guest's secret (32 raw bytes or 64 hex digits).
    #[arg(long)]
    secret_file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    op: AgentOp,
}

#[derive(Subcommand)]
enum AgentOp {
    /// Round trip to the agent.
    Ping,
    /// Hostname, OS, kernel, memory, load, agent version.
    Info,
    /// Run a command; exits with its exit code.
    Exec {
        /// Run on a terminal (the default when stdin is one).
        #[arg(short = 't', long)]
        tty: bool,
        /// Pass stdin through to the command.
        #[arg(short = 'i', long)]
        interactive: bool,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
        /// KEY=VALUE, repeatable.
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// Copy a local file into the guest.
    Put {
        local: PathBuf,
        remote: String,
        #[arg(long)]
        append: bool,
        /// Permission bits for a new file, octal.
        #[arg(long)]
        mode: Option<String>,
    },
    /// Copy a guest file to a local path ("-" for stdout).
    Get {
        remote: String,
        local: PathBuf,
    },
    /// Stat a guest path.
    Stat {
        path: String,
    },
    /// List a guest directory.
    Ls {
        path: String,
    },
    Mkdir {
        path: String,
        #[arg(short, long)]
        parents: bool,
    },
    Rm {
        path: String,
        #[arg(short, long)]
        recursive: bool,
    },
    Mv {
        from: String,
        to: String,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// RPC round trip, exec and file throughput through the agent, beside this machine's
    /// floors (socket ping-pong, process spawn, raw socket throughput).
    Agent {
        /// Print JSON (the only output format; accepted for scripts that pass it).
        #[arg(long)]
        json: bool,
        /// The agent binary to start (default: hearth-agent next to this binary).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        #[arg(long, default_value_t = 20_000)]
        rpc_iters: usize,
        #[arg(long, default_value_t = 300)]
        exec_iters: usize,
        /// Bytes written and read through the agent.
        #[arg(long, default_value_t = 1 << 30)]
        file_bytes: u64,
        /// Where the scratch directory (socket, secret, test file) goes.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The far end of a floor measurement (internal).
    #[command(hide = true)]
    Peer {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        socket: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The floor peer must stay a plain blocking process: no runtime threads.
    if let Cmd::Bench {
        what: BenchCmd::Peer { mode, socket },
    } = &cli.cmd
    {
        return report(hearth_host::bench::run_floor_peer(mode, socket).map(|()| 0));
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(Err(e.into())),
    };
    report(rt.block_on(run(cli)))
}

/// One line on stderr for errors, and the exit code.
fn report(res: anyhow::Result<i32>) -> std::process::ExitCode {
    match res {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("hearth: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::Agent(a) => agent(a).await,
        Cmd::Bench { what } => match what {
            BenchCmd::Agent {
                json: _,
                agent_bin,
                rpc_iters,
                exec_iters,
                file_bytes,
                dir,
            } => {
                let mut opts = hearth_host::bench::agent::AgentBenchOptions::default();
                if let Some(bin) = agent_bin {
                    opts.agent_bin = bin;
                }
                opts.rpc_iters = rpc_iters;
                opts.exec_iters = exec_iters;
                opts.file_bytes = file_bytes;
                opts.dir = dir;
                let report = hearth_host::bench::agent::run_agent_bench(&opts).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(0)
            }
            BenchCmd::Peer { .. } => unreachable!("handled before the runtime starts"),
        },
    }
}

async fn agent(a: AgentArgs) -> anyhow::Result<i32> {
    let bytes = std::fs::read(&a.secret_file)
        .with_context(|| format!("read {}", a.secret_file.display()))?;
    let secret = Secret::parse(&bytes).context("parse the secret")?;
    let c = AgentClient::new(a.endpoint, secret);
    let json = a.json;
    match a.op {
        AgentOp::Ping => {
            let t = std::time::Instant::now();
            c.ping().await?;
            let us = t.elapsed().as_micros();
            if json {
                println!("{}", serde_json::json!({ "rtt_us": us }));
            } else {
                println!("pong in {us} µs (includes connecting)");
            }
        }
        AgentOp::Info => {
            let i = c.info().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info_json(&i))?);
            } else {
                println!("hostname  {}", i.hostname);
                println!("os        {}", i.os);
                println!("kernel    {}", i.kernel);
                println!("uptime    {:.0} s", i.uptime_secs);
                println!(
                    "memory    {} MiB available of {} MiB",
                    i.mem_available_kb / 1024,
                    i.mem_total_kb / 1024
                );
                println!(
                    "load      {:.2} {:.2} {:.2}",
                    i.load[0], i.load[1], i.load[2]
                );
                println!("agent     {} (features {:#x})", i.agent_version, i.features);
            }
        }
        AgentOp::Exec {
            tty,
            interactive,
            cwd,
            uid,
            gid,
            env,
            timeout_ms,
            argv,
        } => {
            let env = env
                .into_iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => Ok((k.to_string(), v.to_string())),
                    None => bail!("--env wants KEY=VALUE, got {kv:?}"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let tty = tty && std::io::stdin().is_terminal();
            let req = ExecRequest {
                argv,
                env,
                cwd,
                uid,
                gid,
                pty: tty.then(terminal_size),
                stdio: if interactive || tty {
                    StdioMode::Events
                } else {
                    StdioMode::NullStdin
                },
                timeout_ms,
                detached: false,
            };
            return exec(&c, req, interactive || tty, tty).await;
        }
        AgentOp::Put {
            local,
            remote,
            append,
            mode,
        } => {
            let perm = mode
                .map(|m| u32::from_str_radix(&m, 8))
                .transpose()
                .context("--mode is octal, like 644")?;
            let mut f = tokio::fs::File::open(&local)
                .await
                .with_context(|| format!("open {}", local.display()))?;
            let expected_len = f.metadata().await.ok().map(|m| m.len());
            let opts = WriteOptions {
                mode: if append {
                    WriteMode::Append
                } else {
                    WriteMode::Truncate
                },
                perm,
                create_parents: false,
                expected_len,
            };
            let n = c.put(&remote, &mut f, opts).await?;
            if json {
                println!("{}", serde_json::json!({ "bytes": n }));
            } else {
                eprintln!("{n} bytes written to {remote}");
            }
        }
        AgentOp::Get { remote, local } => {
            let n = if local.as_os_str() == "-" {
                c.get(&remote, &mut tokio::io::stdout()).await?
            } else {
                let mut f = tokio::fs::File::create(&local)
                    .await
                    .with_context(|| format!("create {}", local.display()))?;
                c.get(&remote, &mut f).await?
            };
            if local.as_os_str() != "-" {
                eprintln!("{n} bytes read from {remote}");
            }
        }
        AgentOp::Stat { path } => {
            let s = c.stat(&path, false).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stat_json(&s))?);
            } else {
                println!(
                    "{} {:o} {}:{} {} bytes mtime {}{}",
                    type_name(s.file_type),
                    s.mode,
                    s.uid,
                    s.gid,
                    s.size,
                    s.mtime,
                    s.link_target
                        .map(|t| format!(" -> {t}"))
                        .unwrap_or_default()
                );
            }
        }
        AgentOp::Ls { path } => {
            let entries = c.list_dir(&path).await?;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        let mut s = stat_json(&e.stat);
                        s["name"] = e.name.clone().into();
                        s
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in entries {
                    println!(
                        "{:<7} {:>4o} {:>12} {}",
                        type_name(e.stat.file_type),
                        e.stat.mode,
                        e.stat.size,
                        e.name
                    );
                }
            }
        }
        AgentOp::Mkdir { path, parents } => c.mkdir(&path, parents, None).await?,
        AgentOp::Rm { path, recursive } => c.remove(&path, recursive).await?,
        AgentOp::Mv { from, to } => c.rename(&from, &to).await?,
    }
    Ok(0)
}

fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::File => "file",
        FileType::Dir => "dir",
        FileType::Symlink => "symlink",
        FileType::Other => "other",
    }
}

fn stat_json(s: &hearth_protocol::files::FileStat) -> serde_json::Value {
    serde_json::json!({
        "type": type_name(s.file_type),
        "size": s.size,
        "mode": format!("{:o}", s.mode),
        "uid": s.uid,
        "gid": s.gid,
        "mtime": s.mtime,
        "link_target": s.link_target,
    })
}

fn info_json(i: &hearth_protocol::info::GuestInfo) -> serde_json::Value {
    serde_json::json!({
        "hostname": i.hostname,
        "os": i.os,
        "os_id": i.os_id,
        "os_version": i.os_version,
        "kernel": i.kernel,
        "uptime_secs": i.uptime_secs,
        "mem_total_kb": i.mem_total_kb,
        "mem_available_kb": i.mem_available_kb,
        "load": i.load,
        "agent_version": i.agent_version,
        "features": i.features,
    })
}

fn terminal_size() -> WinSize {
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
struct RawMode(Option<nix::sys::termios::Termios>);

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

async fn exec(
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
