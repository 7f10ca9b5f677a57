//! `hearth bench snapshots`: snapshot, restore and branch through the node's API, beside
//! a raw read-only btrfs snapshot of the same rootfs and a plain create, measured in the
//! same run.

use super::lifecycle::{blocking, ms, pct, BenchProject};
use crate::config::Config;
use crate::control::client::ControlClient;
use crate::pool::{btrfs, BtrfsPool, Storage};
use anyhow::{ensure, Context};
use hyper::Method;
use serde_json::{json, Value};
use std::time::Instant;

pub struct SnapshotBenchOptions {
    /// Snapshots taken (and raw floors), and rounds of one restore, one branch and one
    /// create each (a p50 of 10 moved by 10-20% between runs on a 2-core machine).
    pub n: usize,
    /// Also measure snapshots of a guest running PostgreSQL, MariaDB and Redis under
    /// write load (installs them from Debian's archive in the guest: ~40 s).
    pub with_dbs: bool,
}

impl Default for SnapshotBenchOptions {
    fn default() -> Self {
        SnapshotBenchOptions {
            n: 20,
            with_dbs: true,
        }
    }
}

/// How often a settling guest is asked whether systemd finished booting.
const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

pub async fn run_snapshot_bench(
    cfg: &Config,
    ctl: &ControlClient,
    opts: &SnapshotBenchOptions,
) -> anyhow::Result<Value> {
    ensure!(opts.n >= 1, "n must be at least 1");
    ctl.call(Method::GET, "/api/v1/health", None)
        .await
        .context("hearthd must be running for this benchmark")?;
    let pool_cfg = cfg.pool.clone();
    let pool = blocking(move || BtrfsPool::open(&pool_cfg).context("open the pool")).await?;
    let project = BenchProject::create(ctl, format!("benchsnap-{}", std::process::id())).await?;
    let floor_dir = pool
        .root()
        .join(format!("bench-snapfloor-{}", std::process::id()));
    let outcome = measure(ctl, &pool, &floor_dir, &project_name(&project), opts).await;
    let cleanup = project.cleanup().await;
    let fd = floor_dir.clone();
    let _ = blocking(move || {
        if let Ok(rd) = std::fs::read_dir(&fd) {
            for e in rd.flatten() {
                let _ = btrfs::delete_subvolume(&e.path());
            }
        }
        let _ = std::fs::remove_dir(&fd);
        Ok(())
    })
    .await;
    let v = outcome?;
    cleanup.context("clean up the benchmark's project")?;
    Ok(v)
}

/// One snapshot through the API: its answer and how long it took (ms).
async fn api_snapshot(ctl: &ControlClient, id: &str) -> anyhow::Result<(Value, f64)> {
    let t = Instant::now();
    let v = ctl
        .call(
            Method::POST,
            &format!("/api/v1/containers/{id}/snapshots"),
            Some(json!({})),
        )
        .await
        .context("snapshot")?;
    Ok((v, ms(t.elapsed())))
}

/// The floor: a raw read-only btrfs snapshot of `src` at `dst` (ms), removed again.
async fn raw_snapshot_ms(src: &std::path::Path, dst: &std::path::Path) -> anyhow::Result<f64> {
    let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
    blocking(move || {
        let t = Instant::now();
        btrfs::snapshot(&src, &dst, true)?;
        let d = ms(t.elapsed());
        btrfs::delete_subvolume(&dst)?;
        Ok(d)
    })
    .await
}

fn project_name(p: &BenchProject) -> String {
    p.name().to_string()
}

async fn measure(
    ctl: &ControlClient,
    pool: &BtrfsPool,
    floor_dir: &std::path::Path,
    project: &str,
    opts: &SnapshotBenchOptions,
) -> anyhow::Result<Value> {
    let create = |name: String| async move {
        let t = Instant::now();
        let v = ctl
            .call(
                Method::POST,
                &format!("/api/v1/projects/{project}/containers"),
                Some(json!({ "name": name })),
            )
            .await
            .with_context(|| format!("create {name}"))?;
        anyhow::Ok((id_of(&v), ms(t.elapsed())))
    };
    let (base, _) = create("base".into()).await?;
    std::fs::create_dir_all(floor_dir)?;
    let rootfs = pool.rootfs(&base);
    let agent = super::lifecycle::control_agent(ctl, &base);
    // "Idle" is a booted guest: one still booting writes its journal and units while
    // it is being snapshotted.
    let settle = || super::lifecycle::wait_for_systemd(&agent, &base, SETTLE_POLL);
    settle().await?;

    let mut snap_ms = Vec::new();
    let mut floor_ms = Vec::new();
    let mut names = Vec::new();
    for i in 0..opts.n {
        let (v, d) = api_snapshot(ctl, &base).await?;
        snap_ms.push(d);
        names.push(
            v["snapshot"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        floor_ms.push(raw_snapshot_ms(&rootfs, &floor_dir.join(format!("f{i}"))).await?);
    }
    // Restores, branches and creates are measured in rounds, one of each, in an order
    // that turns each round, each from a settled machine (the restored guest booted):
    // measured in blocks, whichever came after the others' deletes paid for btrfs's
    // cleaner and the previous boots, which flattered the first block.
    let k = opts.n;
    let (mut restore_ms, mut branch_ms, mut create_ms) = (Vec::new(), Vec::new(), Vec::new());
    for (i, name) in names.iter().take(k).enumerate() {
        for step in 0..3 {
            settle().await?;
            match (i + step) % 3 {
                0 => {
                    let t = Instant::now();
                    ctl.call(
                        Method::PUT,
                        &format!("/api/v1/containers/{base}/snapshots/{name}"),
                        None,
                    )
                    .await
                    .context("restore")?;
                    restore_ms.push(ms(t.elapsed()));
                }
                1 => {
                    let t = Instant::now();
                    let v = ctl
                        .call(
                            Method::POST,
                            &format!("/api/v1/containers/{base}/copy"),
                            Some(json!({ "name": format!("branch{i}"), "source_snapshot": name })),
                        )
                        .await
                        .context("branch")?;
                    branch_ms.push(ms(t.elapsed()));
                    ctl.call(
                        Method::DELETE,
                        &format!("/api/v1/containers/{}", id_of(&v)),
                        None,
                    )
                    .await?;
                }
                _ => {
                    let (id, d) = create(format!("plain{i}")).await?;
                    create_ms.push(d);
                    ctl.call(Method::DELETE, &format!("/api/v1/containers/{id}"), None)
                        .await?;
                }
            }
        }
    }
    let dbs = if opts.with_dbs {
        Some(
            measure_with_dbs(ctl, pool, floor_dir, project, opts.n)
                .await
                .context("snapshots with databases")?,
        )
    } else {
        None
    };
    let (snap, floor, restore, branch, created) = (
        pct(&snap_ms, 50.0)?,
        pct(&floor_ms, 50.0)?,
        pct(&restore_ms, 50.0)?,
        pct(&branch_ms, 50.0)?,
        pct(&create_ms, 50.0)?,
    );
    Ok(json!({
        "snapshot_ms_p50": snap,
        "snapshot_ms_p99": pct(&snap_ms, 99.0)?,
        "snapshot_with_dbs_ms_p50": dbs.as_ref().map(|d| d.snap_p50),
        "snapshot_with_dbs_ms_p99": dbs.as_ref().map(|d| d.snap_p99),
        // The raw snapshot of the database guest's rootfs, under the same load.
        "floor_snapshot_with_dbs_ms_p50": dbs.as_ref().map(|d| d.floor_p50),
        "snapshot_with_dbs_vs_floor": dbs.as_ref().map(|d| (d.snap_p50 / floor * 1000.0).round() / 1000.0),
        "rows_acked_during_dbs_run": dbs.as_ref().map(|d| d.rows.clone()),
        "restore_ms_p50": restore,
        "branch_to_agent_ready_ms_p50": branch,
        "floor_snapshot_ms_p50": floor,
        "create_to_agent_ready_ms_p50": created,
        "snapshot_vs_floor": (snap / floor * 1000.0).round() / 1000.0,
        "restore_vs_create": (restore / created * 1000.0).round() / 1000.0,
        "branch_vs_create": (branch / created * 1000.0).round() / 1000.0,
        "n": opts.n,
        "restores": k,
    }))
}

struct DbRun {
    snap_p50: f64,
    snap_p99: f64,
    floor_p50: f64,
    /// Rows each writer had acknowledged by the end (PostgreSQL, MariaDB, Redis).
    rows: Vec<u64>,
}

/// A guest with PostgreSQL, MariaDB and Redis (see [`super::dbload`]), writers running,
/// snapshotted `n` times through the API (each quiesces all three), beside raw snapshots
/// of the same rootfs.
async fn measure_with_dbs(
    ctl: &ControlClient,
    pool: &BtrfsPool,
    floor_dir: &std::path::Path,
    project: &str,
    n: usize,
) -> anyhow::Result<DbRun> {
    use super::dbload;
    let v = ctl
        .call(
            Method::POST,
            &format!("/api/v1/projects/{project}/containers"),
            Some(json!({ "name": "dbs", "memory_mb": 2048 })),
        )
        .await
        .context("create the database guest")?;
    let id = id_of(&v);
    let agent = super::lifecycle::control_agent(ctl, &id);
    super::lifecycle::wait_for_systemd(&agent, &id, std::time::Duration::from_millis(100)).await?;
    for (what, script) in [
        ("install the databases", dbload::INSTALL),
        ("start the writers", dbload::START_WRITERS),
    ] {
        let out = agent.run(&["sh", "-c", script]).await.context(what)?;
        ensure!(
            out.code() == 0,
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Let the writers reach a steady rate before measuring.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let rootfs = pool.rootfs(&id);
    let mut snap_ms = Vec::new();
    let mut floor_ms = Vec::new();
    for i in 0..n {
        let (v, d) = api_snapshot(ctl, &id).await?;
        snap_ms.push(d);
        let quiesced = v["snapshot"]["quiesced"].as_array().map_or(0, Vec::len);
        ensure!(
            quiesced == dbload::DATABASES.len(),
            "snapshot {i} did not quiesce every database: {v}"
        );
        let name = v["snapshot"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ctl.call(
            Method::DELETE,
            &format!("/api/v1/containers/{id}/snapshots/{name}"),
            None,
        )
        .await
        .context("delete snapshot")?;
        floor_ms.push(raw_snapshot_ms(&rootfs, &floor_dir.join(format!("db{i}"))).await?);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = agent.run(&["sh", "-c", dbload::ACKED]).await?;
    let rows = dbload::parse_acked(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| anyhow::anyhow!("acknowledged rows: {e}"))?;
    let _ = agent.run(&["sh", "-c", dbload::STOP_WRITERS]).await;
    ctl.call(Method::DELETE, &format!("/api/v1/containers/{id}"), None)
        .await
        .context("delete the database guest")?;
    Ok(DbRun {
        snap_p50: pct(&snap_ms, 50.0)?,
        snap_p99: pct(&snap_ms, 99.0)?,
        floor_p50: pct(&floor_ms, 50.0)?,
        rows,
    })
}
