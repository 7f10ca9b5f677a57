//! `hearth projects|containers ...`: the node's API over hearthd's control socket.

use crate::session;
use anyhow::{bail, Context};
use clap::Subcommand;
use hearth_host::agents::{AgentClient, ClientOptions};
use hearth_host::control::client::{ControlClient, ControlDialer};
use hearth_host::control::exec::auto_snapshot_alias;
use hearth_protocol::exec::{ExecRequest, StdioMode};
use hearth_protocol::files::WriteOptions;
use hyper::Method;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum ProjectCmd {
    Create { name: String },
    List,
    Get { name: String },
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum ContainerCmd {
    /// Create a container from an image and start it.
    Create {
        #[arg(long, default_value = "default")]
        project: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        image: Option<String>,
        /// Memory limit in MB.
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        cpus: Option<f64>,
        #[arg(long)]
        pids: Option<u64>,
        /// Disk size (rootfs cap) in GB (GiB), 1-10000; default from the node's config.
        #[arg(long)]
        disk: Option<u64>,
        /// Do not start it again after a node reboot.
        #[arg(long)]
        no_autostart: bool,
    },
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// ID, project/name, or a name unique on the node.
    Get {
        id: String,
    },
    /// Change a container's settings, also while it runs.
    Update {
        id: String,
        /// New disk size (rootfs cap) in GB (GiB), 1-10000.
        #[arg(long)]
        disk: u64,
    },
    Start {
        id: String,
    },
    Stop {
        id: String,
        /// Kill instead of shutting down cleanly.
        #[arg(long)]
        force: bool,
    },
    Restart {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Hostname, OS, kernel, memory and load, from the guest's agent.
    Info {
        id: String,
    },
    /// Run a command; exits with its exit code.
    Exec {
        id: String,
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(short = 'i', long)]
        interactive: bool,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// Take a snapshot (alias `auto-<timestamp>`) first, so the change can be undone
        /// with `hearth snapshots restore`.
        #[arg(long)]
        snapshot_before: bool,
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// An interactive login shell.
    Shell {
        id: String,
    },
    /// Copy files: `hearth containers cp ./f ID:/root/f` or `cp ID:/etc/hostname ./h`.
    Cp {
        src: String,
        dst: String,
    },
    /// A new container from this one's current state, or from one of its snapshots.
    Copy {
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        from_snapshot: Option<String>,
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a container (running or stopped).
    Create {
        container: String,
        #[arg(long)]
        alias: Option<String>,
        /// Delete it automatically after this many days.
        #[arg(long)]
        expiry: Option<u32>,
        /// Don't flush and hold the guest's databases first (a crash-consistent
        /// snapshot, for a guest whose agent does not answer).
        #[arg(long)]
        no_quiesce: bool,
    },
    List {
        container: String,
    },
    /// Put the container back to the snapshot (it restarts if it was running).
    Restore {
        container: String,
        name: String,
    },
    Delete {
        container: String,
        name: String,
    },
    /// Set (or with no ALIAS, clear) a snapshot's alias.
    Alias {
        container: String,
        name: String,
        alias: Option<String>,
    },
}

pub async fn snapshots(ctl: &ControlClient, cmd: SnapshotCmd, json: bool) -> anyhow::Result<i32> {
    match cmd {
        SnapshotCmd::Create {
            container,
            alias,
            expiry,
            no_quiesce,
        } => {
            let body = json!({ "alias": alias, "expiry": expiry, "quiesce": !no_quiesce });
            let v = ctl
                .call(
                    Method::POST,
                    &format!("/api/v1/containers/{container}/snapshots"),
                    Some(body),
                )
                .await?;
            print(json, &v, |v| {
                let sn = &v["snapshot"];
                match sn["quiesced"].as_array() {
                    Some(e) if !e.is_empty() => {
                        let e: Vec<&str> = e.iter().filter_map(|x| x.as_str()).collect();
                        println!(
                            "snapshot {} of {container} (flushed: {})",
                            s(sn, "name"),
                            e.join(", ")
                        )
                    }
                    _ => println!("snapshot {} of {container}", s(sn, "name")),
                }
            });
        }
        SnapshotCmd::List { container } => {
            let v = ctl
                .call(
                    Method::GET,
                    &format!("/api/v1/containers/{container}/snapshots"),
                    None,
                )
                .await?;
            print(json, &v, |v| {
                println!(
                    "{:<20} {:<20} {:<31} {:<10} EXPIRES",
                    "NAME", "ALIAS", "CREATED", "SIZE"
                );
                for sn in v["snapshots"].as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<20} {:<31} {:<10} {}",
                        s(sn, "name"),
                        s(sn, "alias"),
                        s(sn, "created_at"),
                        sn["size"]
                            .as_u64()
                            .map(human_bytes)
                            .unwrap_or_else(|| "-".into()),
                        s(sn, "expires_at")
                    );
                }
            });
        }
        SnapshotCmd::Restore { container, name } => {
            let v = ctl
                .call(
                    Method::PUT,
                    &format!("/api/v1/containers/{container}/snapshots/{name}"),
                    None,
                )
                .await?;
            print(json, &v, |v| {
                println!("{container} restored to {name}: {}", s(v, "status"))
            });
        }
        SnapshotCmd::Delete { container, name } => {
            ctl.call(
                Method::DELETE,
                &format!("/api/v1/containers/{container}/snapshots/{name}"),
                None,
            )
            .await?;
            if !json {
                println!("snapshot {name} deleted");
            }
        }
        SnapshotCmd::Alias {
            container,
            name,
            alias,
        } => {
            let v = ctl
                .call(
                    Method::PUT,
                    &format!("/api/v1/containers/{container}/snapshots/{name}/alias"),
                    Some(json!({ "alias": alias })),
                )
                .await?;
            print(json, &v, |_| println!("ok"));
        }
    }
    Ok(0)
}

fn print(json: bool, v: &Value, human: impl FnOnce(&Value)) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human(v);
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// A size in the largest unit that leaves at least 1 (KiB to GiB).
fn human_bytes(b: u64) -> String {
    match b {
        _ if b >= 1 << 30 => gib(b),
        _ if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        _ => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// `disk` of a container view as `1.2 GiB used of 10.0 GiB` (or `unknown` when the
/// node's pool has no quotas).
fn disk_line(d: &Value) -> String {
    match d["used_bytes"].as_u64() {
        None => "unknown (no quotas on this node)".into(),
        Some(used) => match d["limit_bytes"].as_u64() {
            Some(limit) => format!("{} used of {}", gib(used), gib(limit)),
            None => format!("{} used, unlimited", gib(used)),
        },
    }
}

fn container_line(c: &Value) {
    println!(
        "{:<12} {:<12} {:<20} {:<9} {:<15} {}",
        s(c, "id"),
        s(c, "project_id"),
        s(c, "name"),
        s(c, "status"),
        s(c, "ip"),
        s(c, "image")
    );
}

pub async fn projects(ctl: &ControlClient, cmd: ProjectCmd, json: bool) -> anyhow::Result<i32> {
    match cmd {
        ProjectCmd::Create { name } => {
            let v = ctl
                .call(
                    Method::POST,
                    "/api/v1/projects",
                    Some(json!({ "name": name })),
                )
                .await?;
            print(json, &v, |v| println!("project {} created", s(v, "name")));
        }
        ProjectCmd::List => {
            let v = ctl.call(Method::GET, "/api/v1/projects", None).await?;
            print(json, &v, |v| {
                for p in v["projects"].as_array().into_iter().flatten() {
                    println!("{:<20} {}", s(p, "name"), s(p, "created_at"));
                }
            });
        }
        ProjectCmd::Get { name } => {
            let v = ctl
                .call(Method::GET, &format!("/api/v1/projects/{name}"), None)
                .await?;
            print(json, &v, |v| {
                println!("{} {}", s(v, "name"), s(v, "created_at"))
            });
        }
        ProjectCmd::Delete { name } => {
            ctl.call(Method::DELETE, &format!("/api/v1/projects/{name}"), None)
                .await?;
            if !json {
                println!("project {name} deleted");
            }
        }
    }
    Ok(0)
}

fn agent_for(ctl: &ControlClient, id: &str) -> Arc<AgentClient> {
    AgentClient::with_dialer(
        Arc::new(ControlDialer {
            client: ctl.clone(),
            container: id.to_string(),
        }),
        ClientOptions {
            idle_streams: 0,
            ..ClientOptions::default()
        },
    )
}

/// Resolves whatever the user typed to the container's id (so one name lookup serves
/// several calls).
async fn resolve(ctl: &ControlClient, key: &str) -> anyhow::Result<String> {
    let v = ctl
        .call(Method::GET, &format!("/api/v1/containers/{key}"), None)
        .await?;
    Ok(s(&v, "id").to_string())
}

pub async fn containers(ctl: &ControlClient, cmd: ContainerCmd, json: bool) -> anyhow::Result<i32> {
    match cmd {
        ContainerCmd::Create {
            project,
            name,
            image,
            memory,
            cpus,
            pids,
            disk,
            no_autostart,
        } => {
            let body = json!({
                "name": name, "image": image, "memory_mb": memory, "cpus": cpus,
                "pids": pids, "disk_gb": disk, "autostart": !no_autostart,
            });
            let v = ctl
                .call(
                    Method::POST,
                    &format!("/api/v1/projects/{project}/containers"),
                    Some(body),
                )
                .await?;
            print(json, &v, |v| {
                println!(
                    "container {}/{} is {} (id {}, ip {})",
                    s(v, "project_id"),
                    s(v, "name"),
                    s(v, "status"),
                    s(v, "id"),
                    s(v, "ip")
                );
                println!("  shell:  hearth containers shell {}", s(v, "id"));
                println!(
                    "  exec:   hearth containers exec {} -- uname -a",
                    s(v, "id")
                );
            });
        }
        ContainerCmd::List { project } => {
            let path = match project {
                Some(p) => format!("/api/v1/projects/{p}/containers?limit=100"),
                None => "/api/v1/containers?limit=100".into(),
            };
            let v = ctl.call(Method::GET, &path, None).await?;
            print(json, &v, |v| {
                println!(
                    "{:<12} {:<12} {:<20} {:<9} {:<15} IMAGE",
                    "ID", "PROJECT", "NAME", "STATUS", "IP"
                );
                for c in v["containers"].as_array().into_iter().flatten() {
                    container_line(c);
                }
            });
        }
        ContainerCmd::Get { id } => {
            let v = ctl
                .call(Method::GET, &format!("/api/v1/containers/{id}"), None)
                .await?;
            print(json, &v, |v| {
                for (k, val) in v.as_object().into_iter().flatten() {
                    let shown = match k.as_str() {
                        "disk" => disk_line(val),
                        _ => val.as_str().map(String::from).unwrap_or(val.to_string()),
                    };
                    println!("{k:<14} {shown}");
                }
            });
        }
        ContainerCmd::Update { id, disk } => {
            let v = ctl
                .call(
                    Method::PUT,
                    &format!("/api/v1/containers/{id}"),
                    Some(json!({ "disk_gb": disk })),
                )
                .await?;
            print(json, &v, |v| {
                println!(
                    "container {} updated: disk {}",
                    s(v, "id"),
                    disk_line(&v["disk"])
                );
            });
        }
        ContainerCmd::Start { id } => op(ctl, &id, "start", json).await?,
        ContainerCmd::Stop { id, force } => {
            op(ctl, &id, if force { "force-stop" } else { "stop" }, json).await?
        }
        ContainerCmd::Restart { id } => op(ctl, &id, "restart", json).await?,
        ContainerCmd::Delete { id } => {
            ctl.call(Method::DELETE, &format!("/api/v1/containers/{id}"), None)
                .await?;
            if !json {
                println!("container {id} deleted");
            } else {
                println!("null");
            }
        }
        ContainerCmd::Info { id } => {
            let v = ctl
                .call(Method::GET, &format!("/api/v1/containers/{id}/info"), None)
                .await?;
            print(json, &v, |v| {
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!(
                        "{k:<18} {}",
                        val.as_str().map(String::from).unwrap_or(val.to_string())
                    );
                }
            });
        }
        ContainerCmd::Exec {
            id,
            tty,
            interactive,
            cwd,
            uid,
            env,
            snapshot_before,
            argv,
        } => {
            let id = resolve(ctl, &id).await?;
            if snapshot_before {
                let alias = auto_snapshot_alias(time::OffsetDateTime::now_utc());
                let v = ctl
                    .call(
                        Method::POST,
                        &format!("/api/v1/containers/{id}/snapshots"),
                        Some(json!({ "alias": alias })),
                    )
                    .await?;
                eprintln!(
                    "snapshot {} ({alias}) taken; undo with: hearth snapshots restore {id} {}",
                    s(&v["snapshot"], "name"),
                    s(&v["snapshot"], "name")
                );
            }
            let env = session::parse_env(env)?;
            let tty = tty && std::io::stdin().is_terminal();
            let req = ExecRequest {
                argv,
                env,
                cwd,
                uid,
                pty: tty.then(session::terminal_size),
                stdio: if interactive || tty {
                    StdioMode::Events
                } else {
                    StdioMode::NullStdin
                },
                ..Default::default()
            };
            return session::exec(&agent_for(ctl, &id), req, interactive || tty, tty).await;
        }
        ContainerCmd::Shell { id } => {
            let id = resolve(ctl, &id).await?;
            let tty = std::io::stdin().is_terminal();
            let req = ExecRequest {
                argv: vec!["/bin/bash".into(), "-l".into()],
                pty: tty.then(session::terminal_size),
                stdio: StdioMode::Events,
                ..Default::default()
            };
            return session::exec(&agent_for(ctl, &id), req, true, tty).await;
        }
        ContainerCmd::Cp { src, dst } => return cp(ctl, &src, &dst, json).await,
        ContainerCmd::Copy {
            id,
            name,
            from_snapshot,
            project,
        } => {
            let v = ctl
                .call(
                    Method::POST,
                    &format!("/api/v1/containers/{id}/copy"),
                    Some(json!({ "name": name, "source_snapshot": from_snapshot,
                                 "target_project_id": project })),
                )
                .await?;
            print(json, &v, |v| {
                println!(
                    "container {}/{} is {} (id {}, ip {})",
                    s(v, "project_id"),
                    s(v, "name"),
                    s(v, "status"),
                    s(v, "id"),
                    s(v, "ip")
                )
            });
        }
    }
    Ok(0)
}

async fn op(ctl: &ControlClient, id: &str, op: &str, json: bool) -> anyhow::Result<()> {
    let v = ctl
        .call(Method::POST, &format!("/api/v1/containers/{id}/{op}"), None)
        .await?;
    print(json, &v, |v| {
        println!("{}: {}", s(v, "container_id"), s(v, "status"))
    });
    Ok(())
}

/// `ID:/path` names a file in a container; anything else is local.
fn split_remote(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

async fn cp(ctl: &ControlClient, src: &str, dst: &str, json: bool) -> anyhow::Result<i32> {
    let n = match (split_remote(src), split_remote(dst)) {
        (None, Some((id, path))) => {
            let id = resolve(ctl, id).await?;
            let mut f = tokio::fs::File::open(src)
                .await
                .with_context(|| format!("open {src}"))?;
            let len = f.metadata().await.ok().map(|m| m.len());
            let mode = std::fs::metadata(src).ok().map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o7777
            });
            let opts = WriteOptions {
                perm: mode,
                expected_len: len,
                ..WriteOptions::default()
            };
            agent_for(ctl, &id).put(path, &mut f, opts).await?
        }
        (Some((id, path)), None) => {
            let id = resolve(ctl, id).await?;
            let local = PathBuf::from(dst);
            let tmp = local.with_extension("hearth-partial");
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("create {}", tmp.display()))?;
            let res = agent_for(ctl, &id).get(path, &mut f).await;
            match res {
                Ok(n) => {
                    std::fs::rename(&tmp, &local)
                        .with_context(|| format!("rename into {}", local.display()))?;
                    n
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        }
        _ => bail!("cp needs exactly one side written as ID:/absolute/path"),
    };
    if json {
        println!("{}", json!({ "bytes": n }));
    } else {
        eprintln!("{n} bytes copied");
    }
    Ok(0)
}
