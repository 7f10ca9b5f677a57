//! `hearth image ...`: templates in the node's pool. Runs in this process (as root) on
//! the pool directly; hearthd only reads images when it creates containers.

use anyhow::Context;
use clap::Subcommand;
use hearth_host::config::Config;
use hearth_host::pool::hearth_images::{ConsoleProgress, DebianSpec};
use hearth_host::pool::{BtrfsPool, Storage};
use serde_json::json;
use std::path::PathBuf;

/// The agent's unit, installed into every template built here.
const AGENT_UNIT: &str = include_str!("../../../../guest-agent/hearth-agent.service");

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build a Debian 13 template with debootstrap (about 40 s; .debs are cached).
    Build {
        #[arg(default_value = "debian-13")]
        name: String,
        /// The agent binary to install (default: hearth-agent next to this binary).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
    },
    List,
    Delete {
        name: String,
    },
    /// Write NAME as one compressed archive plus NAME's manifest beside it.
    Export {
        name: String,
        out: PathBuf,
    },
    /// Import an exported archive (checksum verified before anything is unpacked).
    Import {
        archive: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
}

pub fn agent_bin(cfg: &Config, explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = explicit
        .or(cfg.agent_bin.clone())
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("hearth-agent")))
        })
        .context("cannot locate hearth-agent")?;
    anyhow::ensure!(bin.is_file(), "no agent binary at {}", bin.display());
    Ok(bin)
}

pub fn open_pool(cfg: &Config) -> anyhow::Result<BtrfsPool> {
    BtrfsPool::open(&cfg.pool).context("open the storage pool")
}

pub fn build(pool: &dyn Storage, name: &str, bin: PathBuf) -> anyhow::Result<()> {
    let spec = DebianSpec::debian13(bin, AGENT_UNIT.to_string());
    let progress = ConsoleProgress::new(&format!("image {name}"));
    let m = hearth_host::pool::build_image(pool, name, &spec, &progress)
        .with_context(|| format!("build image {name}"))?;
    eprintln!(
        "image {name}: {} packages, {} MiB",
        m.packages.len(),
        m.rootfs_bytes >> 20
    );
    Ok(())
}

pub fn run(cfg: &Config, cmd: ImageCmd, json: bool) -> anyhow::Result<i32> {
    let pool = open_pool(cfg)?;
    match cmd {
        ImageCmd::Build { name, agent_bin: b } => {
            let bin = agent_bin(cfg, b)?;
            build(&pool, &name, bin)?;
        }
        ImageCmd::List => {
            let images = pool.list_images()?;
            if json {
                let v: Vec<_> = images
                    .iter()
                    .map(|i| json!({ "name": i.name, "read_only": i.read_only, "created": i.created }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for i in images {
                    println!("{:<20} {}", i.name, i.created.unwrap_or_default());
                }
            }
        }
        ImageCmd::Delete { name } => {
            pool.delete_image(&name)?;
            if !json {
                println!("image {name} deleted");
            }
        }
        ImageCmd::Export { name, out } => {
            let m = hearth_host::pool::export_image(&pool, &name, &out)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!(
                    "{}: {} MiB, sha256 {}",
                    out.display(),
                    m.size_bytes >> 20,
                    m.sha256.unwrap_or_default()
                );
            }
        }
        ImageCmd::Import { archive, name } => {
            let manifest = hearth_host::pool::hearth_images::read_manifest(
                &hearth_host::pool::hearth_images::manifest_path_for(&archive),
            )?;
            let name = name.unwrap_or(manifest.name);
            hearth_host::pool::import_image(&pool, &name, &archive)?;
            if !json {
                println!("image {name} imported");
            }
        }
    }
    Ok(0)
}
