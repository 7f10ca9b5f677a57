//! `hearth up`: brings the node up from nothing — starts hearthd if it is not running,
//! builds the default image if it is missing — and says how to use it.

use crate::images;
use anyhow::{bail, Context};
use hearth_host::config::Config;
use hearth_host::control::client::ControlClient;
use hearth_host::pool::Storage;
use hyper::Method;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LOG: &str = "/var/log/hearth/hearthd.log";

pub async fn up(cfg: &Config, config_path: &Path, ctl: &ControlClient) -> anyhow::Result<i32> {
    if ctl.call(Method::GET, "/api/v1/health", None).await.is_ok() {
        eprintln!("hearthd is running ({})", ctl.socket().display());
    } else {
        start_daemon(config_path, ctl).await?;
    }
    let cfg2 = cfg.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let pool = images::open_pool(&cfg2)?;
        if !pool.image_path(&cfg2.default_image).exists() {
            eprintln!(
                "building image {} (once; about a minute)",
                cfg2.default_image
            );
            let bin = images::agent_bin(&cfg2, None)?;
            images::build(&pool, &cfg2.default_image, bin)?;
        }
        Ok(())
    })
    .await??;
    eprintln!(
        "node is up: image {} ready, project \"default\"",
        cfg.default_image
    );
    Ok(0)
}

async fn start_daemon(config_path: &Path, ctl: &ControlClient) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let hearthd = exe
        .parent()
        .map(|d| d.join("hearthd"))
        .filter(|p| p.is_file())
        .context("hearthd is not next to hearth")?;
    std::fs::create_dir_all("/var/log/hearth")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
        .with_context(|| format!("open {LOG}"))?;
    let mut child = Command::new(&hearthd)
        .arg("--config")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own session: it must outlive this command and its terminal.
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {}", hearthd.display()))?;
    eprintln!("started hearthd (pid {}, log {LOG})", child.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ctl.call(Method::GET, "/api/v1/health", None).await.is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            let tail = std::fs::read_to_string(LOG).unwrap_or_default();
            let tail: Vec<_> = tail.lines().rev().take(10).collect();
            let tail: Vec<_> = tail.into_iter().rev().collect();
            bail!("hearthd exited with {st}:\n{}", tail.join("\n"));
        }
        if Instant::now() > deadline {
            bail!("hearthd did not answer within a minute; see {LOG}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
