//! `hearth tokens|share|public`: who may reach guests through the HTTPS front door.
//!
//! What a script wants to capture (a new token, a share URL) goes alone to stdout, the
//! rest to stderr, so `TOKEN=$(hearth tokens create p --name ci)` just works.

use clap::{Args, Subcommand};
use hearth_host::control::client::ControlClient;
use hyper::Method;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a project API token (`Authorization: Bearer`); it is printed once only.
    Create {
        project: String,
        /// What it is for, to recognise it later.
        #[arg(long)]
        name: String,
    },
    /// A project's tokens (never the tokens themselves).
    List { project: String },
    /// Revoke a token; it stops working at once.
    Revoke { project: String, id: String },
}

#[derive(Args)]
pub struct ShareArgs {
    /// ID, project/name, or a name unique on the node.
    pub container: String,
    /// files-1, terminal-2, http-8000 (a bare kit name means instance 1).
    pub service: String,
    /// How long the link works: 90s, 15m, 1h, 7d (1 minute to 30 days).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
}

#[derive(Args)]
pub struct PublicArgs {
    /// ID, project/name, or a name unique on the node.
    pub container: String,
    /// files-1, http-8000...; without it, lists the container's public services.
    pub service: Option<String>,
    /// Make it private again.
    #[arg(long, requires = "service")]
    pub off: bool,
}

/// A path segment as typed (`project/name` included) in percent-encoding.
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn tokens(ctl: &ControlClient, cmd: TokenCmd, json: bool) -> anyhow::Result<i32> {
    match cmd {
        TokenCmd::Create { project, name } => {
            let v = ctl
                .call(
                    Method::POST,
                    &format!("/api/v1/projects/{}/tokens", seg(&project)),
                    Some(json!({ "name": name })),
                )
                .await?;
            if json {
                print_json(&v);
            } else {
                println!("{}", s(&v, "token"));
                eprintln!(
                    "token {} of project {project} created; it is shown only this once",
                    s(&v, "id")
                );
            }
        }
        TokenCmd::List { project } => {
            let v = ctl
                .call(
                    Method::GET,
                    &format!("/api/v1/projects/{}/tokens", seg(&project)),
                    None,
                )
                .await?;
            if json {
                print_json(&v);
                return Ok(0);
            }
            println!(
                "{:<17} {:<20} {:<26} {:<26} STATUS",
                "ID", "NAME", "CREATED", "LAST USED"
            );
            for t in v["tokens"].as_array().into_iter().flatten() {
                let status = match t["revoked_at"].as_str() {
                    Some(at) => format!("revoked {at}"),
                    None => "active".into(),
                };
                println!(
                    "{:<17} {:<20} {:<26} {:<26} {status}",
                    s(t, "id"),
                    s(t, "name"),
                    s(t, "created_at"),
                    t["last_used_at"].as_str().unwrap_or("never"),
                );
            }
        }
        TokenCmd::Revoke { project, id } => {
            let v = ctl
                .call(
                    Method::DELETE,
                    &format!("/api/v1/projects/{}/tokens/{}", seg(&project), seg(&id)),
                    None,
                )
                .await?;
            if json {
                print_json(&v);
            } else {
                println!("token {id} revoked");
            }
        }
    }
    Ok(0)
}

pub async fn share(ctl: &ControlClient, a: ShareArgs, json: bool) -> anyhow::Result<i32> {
    let v = ctl
        .call(
            Method::POST,
            &format!("/api/v1/containers/{}/share", seg(&a.container)),
            Some(json!({ "service": a.service, "ttl": a.ttl })),
        )
        .await?;
    if json {
        print_json(&v);
    } else {
        println!("{}", s(&v, "url"));
        eprintln!(
            "anyone with this link can use {} of {} until {}",
            a.service,
            a.container,
            s(&v, "expires_at")
        );
    }
    Ok(0)
}

pub async fn public(ctl: &ControlClient, a: PublicArgs, json: bool) -> anyhow::Result<i32> {
    let container = seg(&a.container);
    let Some(service) = a.service else {
        let v = ctl
            .call(
                Method::GET,
                &format!("/api/v1/containers/{container}/public"),
                None,
            )
            .await?;
        if json {
            print_json(&v);
        } else {
            for p in v["services"].as_array().into_iter().flatten() {
                println!("{:<16} {}", s(p, "service"), s(p, "url"));
            }
        }
        return Ok(0);
    };
    let method = if a.off { Method::DELETE } else { Method::PUT };
    let v = ctl
        .call(
            method,
            &format!("/api/v1/containers/{container}/public/{}", seg(&service)),
            None,
        )
        .await?;
    if json {
        print_json(&v);
    } else if a.off {
        println!("{} of {} is private again", s(&v, "service"), a.container);
    } else {
        println!(
            "{} of {} is public, without credentials: {}",
            s(&v, "service"),
            a.container,
            s(&v, "url")
        );
    }
    Ok(0)
}
