//! `hearth agent ...`: talk to one guest agent directly (debugging), like Kata's
//! agent-ctl.

use crate::session;
use anyhow::Context;
use hearth_host::agents::AgentClient;
use hearth_protocol::exec::{ExecRequest, StdioMode};
use hearth_protocol::files::{FileType, WriteMode, WriteOptions};
use hearth_protocol::Secret;
use std::io::IsTerminal;

use crate::{AgentArgs, AgentOp};

pub async fn agent(a: AgentArgs, json: bool) -> anyhow::Result<i32> {
    let bytes = std::fs::read(&a.secret_file)
        .with_context(|| format!("read {}", a.secret_file.display()))?;
    let secret = Secret::parse(&bytes).context("parse the secret")?;
    let c = AgentClient::new(a.endpoint, secret);
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
            let env = session::parse_env(env)?;
            let tty = tty && std::io::stdin().is_terminal();
            let req = ExecRequest {
                argv,
                env,
                cwd,
                uid,
                gid,
                pty: tty.then(session::terminal_size),
                stdio: if interactive || tty {
                    StdioMode::Events
                } else {
                    StdioMode::NullStdin
                },
                timeout_ms,
                detached: false,
            };
            return session::exec(&c, req, interactive || tty, tty).await;
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

pub fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::File => "file",
        FileType::Dir => "dir",
        FileType::Symlink => "symlink",
        FileType::Other => "other",
    }
}

pub fn stat_json(s: &hearth_protocol::files::FileStat) -> serde_json::Value {
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

pub fn info_json(i: &hearth_protocol::info::GuestInfo) -> serde_json::Value {
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
