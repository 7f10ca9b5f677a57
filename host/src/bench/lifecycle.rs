//! `hearth bench lifecycle`: what a container's life costs on a running node, measured
//! through the same control API users call, beside the floor it is built on.
//!
//! Per round: a floor start (a raw btrfs snapshot of the template plus a bare liblxc start
//! of it, no agent, no network), then one container through hearthd: create (returns
//! when the agent answered), systemd reaching `running`, on a few rounds the idle memory
//! after it settled, a clean stop and a delete. Rounds alternate floor and API so drift
//! on the machine (page cache, other guests) hits both figures alike. Every guest is gone,
//! the pool's writes committed and the machine given a moment (see [`QUIESCE`]) before the
//! next timed start, so no start pays for the previous guest's teardown.
//!
//! Everything the benchmark creates is removed again, also on error and on Ctrl-C: its
//! project with all containers in it (through the API), floor containers, snapshots and
//! its private LXC directory.

use super::placement::allowed_cpus;
use super::stats::{percentile, round3, sort_samples};
use crate::agents::{AgentClient, ClientOptions};
use crate::config::Config;
use crate::control::client::{ControlClient, ControlDialer, ControlError};
use crate::pool::{btrfs, BtrfsPool, Storage};
use crate::runtime::liblxc::Container;
use crate::runtime::lxc::render_config;
use crate::runtime::{GuestSpec, Limits};
use anyhow::{anyhow, bail, ensure, Context};
use hyper::Method;
use nix::errno::Errno;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Unmeasured rounds first: the first start after a quiet spell meets cold caches (the
/// pool's loop file, hearthd's and liblxc's code), a one-time cost that would otherwise
/// be the whole p99.
const WARMUP_ROUNDS: usize = 1;

/// Pause before each timed start, after the pool's pending writes were committed, so the
/// kernel's asynchronous teardown of the previous guest (its network namespace, cgroups,
/// the btrfs cleaner dropping its deleted subvolume) is not billed to the next start.
const QUIESCE: Duration = Duration::from_millis(250);

/// Default pause between `systemctl is-system-running` polls.
const DEFAULT_SYSTEMD_POLL: Duration = Duration::from_millis(10);

/// A guest whose systemd is not up by then is broken, not slow.
const SYSTEMD_DEADLINE: Duration = Duration::from_secs(60);

/// How long an idle guest sits before its memory is read: long enough for the agent's
/// and systemd's start-up allocations to be done (settled by ~2 s here).
const DEFAULT_SETTLE: Duration = Duration::from_secs(3);

/// Idle-memory samples (each costs a settle period); their median is reported.
const DEFAULT_IDLE_SAMPLES: usize = 5;

/// A floor container's rootfs may stay mounted for a moment after its init died, while
/// the kernel tears its mount namespace down; deleting the snapshot retries that long.
const SUBVOLUME_BUSY_DEADLINE: Duration = Duration::from_secs(10);

/// Where the agent lives in hearth's images (see `images` and hearth-agent.service).
const AGENT_EXE: &str = "/usr/local/bin/hearth-agent";

#[derive(Debug, Clone)]
pub struct LifecycleOptions {
    /// Measured rounds: creates through the API and floor starts, each.
    pub n: usize,
    /// Template to create from (default: the node's default image).
    pub image: Option<String>,
    /// Rounds (spread over the run) whose idle memory is read.
    pub idle_samples: usize,
    /// How long a guest idles before its memory is read.
    pub settle: Duration,
    /// Pause between `systemctl is-system-running` polls. Each poll is a request to the
    /// guest's PID 1, which is busy booting: faster polls give a finer figure but slow
    /// down the boot they time (the report's systemd-timestamp figures show by how much).
    pub systemd_poll: Duration,
    /// The binary that implements `forkstart` (hearthd, next to this binary by default),
    /// so the floor starts containers exactly as the node does.
    pub hearthd: PathBuf,
}

impl Default for LifecycleOptions {
    fn default() -> Self {
        let hearthd = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("hearthd")))
            .unwrap_or_else(|| PathBuf::from("hearthd"));
        LifecycleOptions {
            n: 20,
            image: None,
            idle_samples: DEFAULT_IDLE_SAMPLES,
            settle: DEFAULT_SETTLE,
            systemd_poll: DEFAULT_SYSTEMD_POLL,
            hearthd,
        }
    }
}

/// Runs the benchmark against the node whose control socket `ctl` talks to; returns the
/// report as one JSON object.
pub async fn run_lifecycle_bench(
    cfg: &Config,
    ctl: &ControlClient,
    opts: &LifecycleOptions,
) -> anyhow::Result<Value> {
    ensure!(opts.n >= 1, "n must be at least 1");
    ensure!(
        opts.hearthd.is_file(),
        "no hearthd at {} (the floor starts containers with its forkstart)",
        opts.hearthd.display()
    );
    ctl.call(Method::GET, "/api/v1/health", None)
        .await
        .context("hearthd must be running for this benchmark")?;
    let image = opts.image.clone().unwrap_or(cfg.default_image.clone());
    let pool_cfg = cfg.pool.clone();
    let pool =
        blocking(move || BtrfsPool::open(&pool_cfg).context("open the storage pool")).await?;
    let image_path = pool.image_path(&image);
    ensure!(
        image_path.exists(),
        "image {image} is not in the pool (`hearth image build {image}`)"
    );

    let floor_cfg = cfg.clone();
    let hearthd = opts.hearthd.clone();
    let floor =
        Arc::new(blocking(move || FloorEnv::create(&floor_cfg, pool, image_path, hearthd)).await?);
    let project = match BenchProject::create(ctl, format!("bench-{}", std::process::id())).await {
        Ok(p) => p,
        Err(e) => {
            let _ = blocking(move || finish_floor(floor)).await;
            return Err(e);
        }
    };

    let outcome = tokio::select! {
        r = measure(&project, &floor, &image, opts) => r,
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => Err(anyhow!("interrupted; cleaning up")),
            Err(e) => Err(anyhow!("waiting for Ctrl-C failed: {e}")),
        },
    };
    // Cleanup runs whatever happened, and both halves run even if the first fails.
    let api_cleanup = project.cleanup().await;
    let floor_idmap_base = floor.idmap_base;
    let floor_cleanup = blocking(move || finish_floor(floor)).await;
    let samples = outcome?;
    api_cleanup.context("clean up the benchmark's project")?;
    floor_cleanup.context("clean up the floor's containers and snapshots")?;
    report(cfg, opts, &image, &samples, floor_idmap_base)
}

/// Everything one run observed.
#[derive(Default)]
struct Samples {
    ready_ms: Vec<f64>,
    systemd_ms: Vec<f64>,
    /// From systemd's own timestamps (see [`SystemdTimes`]); empty if unusable.
    systemd_exec_ms: Vec<f64>,
    systemd_boot_ms: Vec<f64>,
    systemd_finished_ms: Vec<f64>,
    /// `systemd-analyze blame` of the first measured guest, slowest first.
    blame: Vec<String>,
    stop_ms: Vec<f64>,
    delete_ms: Vec<f64>,
    floor_ms: Vec<f64>,
    floor_snapshot_ms: Vec<f64>,
    idle: Vec<Idle>,
    /// How `systemctl is-system-running` ended: running or degraded.
    systemd_states: BTreeMap<String, usize>,
    /// Units that failed in degraded guests (the usual reason a guest is degraded).
    failed_units: BTreeSet<String>,
}

/// One idle guest's memory.
struct Idle {
    cgroup: CgroupMemory,
    agent_rss_kb: u64,
    agent_total_rss_kb: u64,
    agent_processes: usize,
}

async fn measure(
    project: &BenchProject,
    floor: &Arc<FloorEnv>,
    image: &str,
    opts: &LifecycleOptions,
) -> anyhow::Result<Samples> {
    let mut s = Samples::default();
    let idle_samples = opts.idle_samples.min(opts.n);
    // Spread over the run; none at all when no idle samples are wanted.
    let stride = opts
        .n
        .checked_div(idle_samples)
        .map_or(usize::MAX, |k| k.max(1));
    for round in 0..WARMUP_ROUNDS + opts.n {
        let measured = round.checked_sub(WARMUP_ROUNDS);

        quiesce(floor).await?;
        let env = floor.clone();
        let f = blocking(move || env.start_once(round)).await?;
        quiesce(floor).await?;

        let read_idle = measured.is_some_and(|j| j % stride == 0 && s.idle.len() < idle_samples);
        let name = format!("c{round}");
        let plan = Plan {
            settle: read_idle.then_some(opts.settle),
            blame: measured == Some(0),
        };
        let c = lifecycle_once(project, &name, image, plan, opts.systemd_poll).await?;

        if measured.is_none() {
            continue;
        }
        s.floor_ms.push(ms(f.total));
        s.floor_snapshot_ms.push(ms(f.snapshot));
        s.ready_ms.push(ms(c.ready));
        s.systemd_ms.push(ms(c.systemd));
        if let Some(t) = c.systemd_times {
            s.systemd_exec_ms.push(t.exec_ms);
            s.systemd_boot_ms.push(t.boot_ms);
            s.systemd_finished_ms.push(t.exec_ms + t.boot_ms);
        }
        s.blame.extend(c.blame);
        s.stop_ms.push(ms(c.stop));
        s.delete_ms.push(ms(c.delete));
        *s.systemd_states.entry(c.systemd_state).or_default() += 1;
        s.failed_units.extend(c.failed_units);
        s.idle.extend(c.idle);
    }
    Ok(s)
}

/// One container's life through the API.
struct Lifecycle {
    ready: Duration,
    systemd: Duration,
    systemd_state: String,
    failed_units: Vec<String>,
    systemd_times: Option<SystemdTimes>,
    blame: Vec<String>,
    stop: Duration,
    delete: Duration,
    idle: Option<Idle>,
}

/// What a round does besides the timed lifecycle.
struct Plan {
    /// Idle this long, then read the guest's memory.
    settle: Option<Duration>,
    /// Record `systemd-analyze blame`.
    blame: bool,
}

async fn lifecycle_once(
    project: &BenchProject,
    name: &str,
    image: &str,
    plan: Plan,
    poll: Duration,
) -> anyhow::Result<Lifecycle> {
    let ctl = &project.ctl;
    let t0_mono_us = monotonic_us()?;
    let t0 = Instant::now();
    let v = ctl
        .call(
            Method::POST,
            &format!("/api/v1/projects/{}/containers", project.name),
            Some(json!({ "name": name, "image": image })),
        )
        .await
        .with_context(|| format!("create container {name}"))?;
    let ready = t0.elapsed();
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .with_context(|| format!("the create answer has no id: {v}"))?
        .to_string();

    let agent = control_agent(ctl, &id);
    let systemd_state = wait_for_systemd(&agent, &id, poll).await?;
    let systemd = t0.elapsed();
    let failed_units = if systemd_state == "degraded" {
        failed_units(&agent).await.unwrap_or_default()
    } else {
        Vec::new()
    };

    let systemd_times = systemd_times(&agent, t0_mono_us, systemd).await;
    let blame = if plan.blame {
        blame(&agent).await.unwrap_or_default()
    } else {
        Vec::new()
    };

    let idle = match plan.settle {
        Some(d) => {
            tokio::time::sleep(d).await;
            // The cgroup first: the exec that reads the agent's RSS adds a process.
            // A container just created runs in its first slot.
            let lxc_name = crate::node::Node::lxc_name(&id, 0);
            let cgroup = blocking(move || CgroupMemory::read(&lxc_name)).await?;
            let (agent_rss_kb, agent_total_rss_kb, agent_processes) = agent_rss(&agent)
                .await
                .with_context(|| format!("agent RSS in {id}"))?;
            Some(Idle {
                cgroup,
                agent_rss_kb,
                agent_total_rss_kb,
                agent_processes,
            })
        }
        None => None,
    };
    drop(agent);

    let t = Instant::now();
    ctl.call(Method::POST, &format!("/api/v1/containers/{id}/stop"), None)
        .await
        .with_context(|| format!("stop container {id}"))?;
    let stop = t.elapsed();
    let t = Instant::now();
    ctl.call(Method::DELETE, &format!("/api/v1/containers/{id}"), None)
        .await
        .with_context(|| format!("delete container {id}"))?;
    let delete = t.elapsed();
    Ok(Lifecycle {
        ready,
        systemd,
        systemd_state,
        failed_units,
        systemd_times,
        blame,
        stop,
        delete,
        idle,
    })
}

/// A guest's agent reached through hearthd, which holds the guest's secret; the
/// connection is made once and then carries every call.
pub(super) fn control_agent(ctl: &ControlClient, id: &str) -> Arc<AgentClient> {
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

/// Polls `systemctl is-system-running` until systemd says the boot is over: `running`,
/// or `degraded` (booted, with a failed unit). Returns which of the two.
pub(super) async fn wait_for_systemd(
    agent: &AgentClient,
    id: &str,
    poll: Duration,
) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let last = match agent.run(&["systemctl", "is-system-running"]).await {
            Ok(out) => {
                let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if state == "running" || state == "degraded" {
                    return Ok(state);
                }
                if state.is_empty() {
                    String::from_utf8_lossy(&out.stderr).trim().to_string()
                } else {
                    state
                }
            }
            // Not fatal at once: a guest this young may still be setting things up.
            Err(e) => format!("exec failed: {e}"),
        };
        if start.elapsed() > SYSTEMD_DEADLINE {
            bail!(
                "systemd in {id} did not finish booting within {SYSTEMD_DEADLINE:?} (last: {last})"
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// Where the time to a booted systemd went, by systemd's own clock: the guest's
/// `CLOCK_MONOTONIC` is the host's (LXC gives it no time namespace), so its timestamps
/// can be set against the moment the create call started. Unlike the polled figure,
/// these have no poll granularity.
#[derive(Debug, Clone, Copy)]
struct SystemdTimes {
    /// From the start of the create call until the guest's init exec'd systemd.
    exec_ms: f64,
    /// From there until systemd finished booting (what `systemd-analyze time` prints).
    boot_ms: f64,
}

/// `None` when the timestamps are missing or do not fit between the start of the create
/// and the moment the poll saw the boot finished (a time namespace would do that).
async fn systemd_times(
    agent: &AgentClient,
    t0_mono_us: u64,
    polled: Duration,
) -> Option<SystemdTimes> {
    let out = agent
        .run(&[
            "systemctl",
            "show",
            "-p",
            "UserspaceTimestampMonotonic",
            "-p",
            "FinishTimestampMonotonic",
        ])
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('=')?.trim().parse().ok())
    };
    let exec = field("UserspaceTimestampMonotonic")?;
    let finish = field("FinishTimestampMonotonic")?;
    let polled_us = u64::try_from(polled.as_micros()).ok()?;
    let fits = t0_mono_us < exec && exec < finish && finish - t0_mono_us <= polled_us;
    fits.then(|| SystemdTimes {
        exec_ms: (exec - t0_mono_us) as f64 / 1e3,
        boot_ms: (finish - exec) as f64 / 1e3,
    })
}

/// The host's `CLOCK_MONOTONIC`, in microseconds.
fn monotonic_us() -> anyhow::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ensure!(
        rc == 0,
        "clock_gettime: {}",
        std::io::Error::last_os_error()
    );
    let secs = u64::try_from(ts.tv_sec).context("negative monotonic time")?;
    let nanos = u64::try_from(ts.tv_nsec).context("negative monotonic time")?;
    Ok(secs * 1_000_000 + nanos / 1_000)
}

/// The slowest units of the boot, as `systemd-analyze blame` prints them.
async fn blame(agent: &AgentClient) -> anyhow::Result<Vec<String>> {
    let out = agent
        .run(&["systemd-analyze", "blame", "--no-pager"])
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .take(8)
        .collect())
}

async fn failed_units(agent: &AgentClient) -> anyhow::Result<Vec<String>> {
    let out = agent
        .run(&["systemctl", "--failed", "--plain", "--no-legend"])
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect())
}

/// VmRSS of the early agent (pid in /run/hearth/agent.pid), of all agent processes
/// together, and how many there are: the systemd unit's agent waits beside the early one
/// (see guest-agent/src/init.rs), and that costs memory too.
async fn agent_rss(agent: &AgentClient) -> anyhow::Result<(u64, u64, usize)> {
    let script = format!(
        "echo early $(cat /run/hearth/agent.pid); \
         for d in /proc/[0-9]*; do \
           [ \"$(readlink \"$d/exe\" 2>/dev/null)\" = {AGENT_EXE} ] || continue; \
           echo \"${{d#/proc/}} $(grep '^VmRSS:' \"$d/status\")\"; \
         done"
    );
    let out = agent.run(&["/bin/sh", "-c", &script]).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.code() == 0,
        "reading /proc in the guest failed ({}): {}{}",
        out.code(),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_agent_rss(&text)
}

/// Parses `early PID` and `PID VmRSS: N kB` lines (see [`agent_rss`]).
fn parse_agent_rss(text: &str) -> anyhow::Result<(u64, u64, usize)> {
    let mut early = None;
    let mut rss: BTreeMap<u32, u64> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("early"), Some(pid), None) => early = pid.parse::<u32>().ok(),
            (Some(pid), Some("VmRSS:"), Some(kb)) => {
                if let (Ok(pid), Ok(kb)) = (pid.parse(), kb.parse()) {
                    rss.insert(pid, kb);
                }
            }
            _ => {}
        }
    }
    let early = early.context("no pid in /run/hearth/agent.pid")?;
    let early_rss = *rss
        .get(&early)
        .with_context(|| format!("the early agent (pid {early}) is not running: {text}"))?;
    Ok((early_rss, rss.values().sum(), rss.len()))
}

/// A container's cgroup memory, read on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CgroupMemory {
    /// v1 `memory.usage_in_bytes` / v2 `memory.current`: everything charged, page cache
    /// included.
    usage: u64,
    /// Anonymous memory (v1 `total_rss`, v2 `anon`): what the guest's processes hold.
    anon: u64,
    /// Page cache (v1 `total_cache`, v2 `file`), tmpfs included.
    file: u64,
    /// tmpfs and shared memory (part of `file`).
    shmem: u64,
}

impl CgroupMemory {
    /// LXC 5 puts a guest in `lxc.payload.<name>` directly under each hierarchy's root.
    fn read(lxc_name: &str) -> anyhow::Result<CgroupMemory> {
        let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
        let leaf = format!("lxc.payload.{lxc_name}");
        let dir = if v2 {
            Path::new("/sys/fs/cgroup").join(&leaf)
        } else {
            Path::new("/sys/fs/cgroup/memory").join(&leaf)
        };
        ensure!(
            dir.is_dir(),
            "no memory cgroup at {} (is {lxc_name} running?)",
            dir.display()
        );
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
        };
        let stat = read("memory.stat")?;
        let key = |k: &str| -> anyhow::Result<u64> {
            stat.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
                .with_context(|| format!("no {k} in {}/memory.stat", dir.display()))
        };
        let usage_file = if v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        let usage = read(usage_file)?
            .trim()
            .parse()
            .with_context(|| format!("parse {}/{usage_file}", dir.display()))?;
        Ok(if v2 {
            CgroupMemory {
                usage,
                anon: key("anon")?,
                file: key("file")?,
                shmem: key("shmem")?,
            }
        } else {
            CgroupMemory {
                usage,
                anon: key("total_rss")?,
                file: key("total_cache")?,
                shmem: key("total_shmem")?,
            }
        })
    }
}

/// One floor start.
struct FloorStart {
    snapshot: Duration,
    /// Snapshot plus start to RUNNING.
    total: Duration,
}

/// The floor's private ground: an LXC directory of its own (so hearthd never sees these
/// containers) and a snapshot directory in the pool outside `containers/` (which hearthd
/// would reconcile away as a leak).
struct FloorEnv {
    pool: BtrfsPool,
    image_path: PathBuf,
    lxcpath: PathBuf,
    /// `<pool>/bench-floor/<pid>`; the parent is shared with other runs.
    snapshots: PathBuf,
    hearthd: PathBuf,
    /// Host uid/gid block the floor guests map root to.
    idmap_base: u32,
    idmap_size: u32,
    limits: Limits,
}

impl FloorEnv {
    fn create(
        cfg: &Config,
        pool: BtrfsPool,
        image_path: PathBuf,
        hearthd: PathBuf,
    ) -> anyhow::Result<FloorEnv> {
        // The block right after the last one hearthd may ever hand out, so a floor guest
        // never shares host uids with a real one.
        let base =
            u64::from(cfg.idmap.base) + u64::from(cfg.idmap.blocks) * u64::from(cfg.idmap.size);
        let idmap_base = u32::try_from(base)
            .ok()
            .filter(|b| b.checked_add(cfg.idmap.size).is_some())
            .context("no uid block is left above hearthd's range for the floor")?;
        let pid = std::process::id();
        let lxcpath = std::env::temp_dir().join(format!(
            "hearth-bench-lxc-{pid}-{:08x}",
            rand::random::<u32>()
        ));
        // 0711 like hearthd's lxcpath: parts of LXC's set-up run as the guest's root.
        DirBuilder::new()
            .mode(0o711)
            .create(&lxcpath)
            .with_context(|| format!("create {}", lxcpath.display()))?;
        let parent = pool.root().join("bench-floor");
        let snapshots = parent.join(pid.to_string());
        let made = DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&snapshots)
            .with_context(|| format!("create {}", snapshots.display()));
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&lxcpath);
            return Err(e);
        }
        let d = &cfg.defaults;
        Ok(FloorEnv {
            pool,
            image_path,
            lxcpath,
            snapshots,
            hearthd,
            idmap_base,
            idmap_size: cfg.idmap.size,
            limits: Limits {
                memory_bytes: d.memory_mb << 20,
                cpus: d.cpus,
                pids: d.pids,
            },
        })
    }

    fn name(round: usize) -> String {
        format!("hbench-floor-{}-{round}", std::process::id())
    }

    /// Snapshot + start to RUNNING of one floor guest, then remove it.
    fn start_once(&self, round: usize) -> anyhow::Result<FloorStart> {
        let name = Self::name(round);
        let rootfs = self.snapshots.join(round.to_string());
        let dir = self.lxcpath.join(&name);
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut guest = FloorGuest {
            env: self,
            name: name.clone(),
            rootfs: rootfs.clone(),
            snapshotted: false,
            started: false,
            done: false,
        };
        let config = dir.join("config");
        let spec = GuestSpec {
            name: name.clone(),
            hostname: "floor".into(),
            rootfs: rootfs.clone(),
            idmap_base: self.idmap_base,
            idmap_size: self.idmap_size,
            agent_dir: PathBuf::from("/nonexistent"),
            limits: self.limits.clone(),
            net: Vec::new(),
        };
        std::fs::write(&config, floor_config(&spec, &self.lxcpath, cgroup_v2())?)
            .with_context(|| format!("write {}", config.display()))?;

        let t = Instant::now();
        self.pool
            .raw_snapshot(&self.image_path, &rootfs, false)
            .context("snapshot the template for the floor")?;
        let snapshot = t.elapsed();
        guest.snapshotted = true;
        guest.started = true;
        // Exactly how hearthd starts a guest (LxcRuntime::start): a fresh process runs
        // liblxc's start, which returns once the container is RUNNING.
        let out = Command::new(&self.hearthd)
            .arg("forkstart")
            .arg(&name)
            .arg(&self.lxcpath)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("run {} forkstart", self.hearthd.display()))?;
        let total = t.elapsed();
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.join("lxc.log")).unwrap_or_default();
            bail!(
                "floor start of {name} failed: {}\nlxc log:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
            );
        }
        let state = Container::open(&name, &self.lxcpath)?.state();
        ensure!(
            state == "RUNNING",
            "floor guest {name} is {state} after start"
        );
        guest.remove()?;
        Ok(FloorStart { snapshot, total })
    }

    /// Removes what is left: snapshots (only if a round failed to remove its own), the
    /// run's snapshot directory, the shared parent if now empty, the LXC directory.
    fn teardown(&self) -> anyhow::Result<()> {
        let mut first_err = None;
        if let Ok(rd) = std::fs::read_dir(&self.snapshots) {
            for e in rd.flatten() {
                if let Err(err) = delete_subvolume_patiently(&e.path()) {
                    first_err.get_or_insert(err);
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.snapshots) {
            if e.kind() != std::io::ErrorKind::NotFound {
                first_err.get_or_insert(
                    anyhow::Error::new(e).context(format!("remove {}", self.snapshots.display())),
                );
            }
        }
        if let Some(parent) = self.snapshots.parent() {
            // Another run may be using it; then it is not empty and stays.
            let _ = std::fs::remove_dir(parent);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.lxcpath) {
            if e.kind() != std::io::ErrorKind::NotFound {
                first_err.get_or_insert(
                    anyhow::Error::new(e).context(format!("remove {}", self.lxcpath.display())),
                );
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for FloorEnv {
    fn drop(&mut self) {
        // Idempotent: after a successful teardown this finds nothing left to do.
        let _ = self.teardown();
    }
}

/// Tears the floor down, reporting errors (dropping it would swallow them).
fn finish_floor(env: Arc<FloorEnv>) -> anyhow::Result<()> {
    match Arc::try_unwrap(env) {
        Ok(env) => env.teardown(),
        // Still shared: a round is somehow running; its last owner's drop cleans up.
        Err(_) => Ok(()),
    }
}

/// One floor guest; dropping it kills it and deletes its snapshot, so a failed round
/// leaves nothing running.
struct FloorGuest<'a> {
    env: &'a FloorEnv,
    name: String,
    rootfs: PathBuf,
    snapshotted: bool,
    started: bool,
    done: bool,
}

impl FloorGuest<'_> {
    fn remove(mut self) -> anyhow::Result<()> {
        self.done = true;
        self.remove_now()
    }

    fn remove_now(&mut self) -> anyhow::Result<()> {
        if self.started {
            let c = Container::open(&self.name, &self.env.lxcpath)?;
            c.stop()?;
            ensure!(
                c.wait("STOPPED", 10),
                "floor guest {} did not stop",
                self.name
            );
            self.started = false;
        }
        if self.snapshotted {
            delete_subvolume_patiently(&self.rootfs)?;
            self.snapshotted = false;
        }
        let dir = self.env.lxcpath.join(&self.name);
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))
    }
}

impl Drop for FloorGuest<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.remove_now();
        }
    }
}

/// hearth's own LXC config for a guest (so limits, idmap and mounts stay in step with
/// it), minus the agent (plain systemd as init, no agent directory) and with an isolated
/// network namespace holding only `lo` (`empty`; `none` would share the host's).
fn floor_config(spec: &GuestSpec, lxcpath: &Path, v2: bool) -> anyhow::Result<String> {
    let spec = GuestSpec {
        net: vec![("lxc.net.0.type".into(), "empty".into())],
        ..spec.clone()
    };
    let full = render_config(&spec, lxcpath, v2);
    let mut out = String::new();
    let (mut init, mut agent_dir) = (false, false);
    for line in full.lines() {
        if line.starts_with("lxc.init.cmd") {
            out.push_str("lxc.init.cmd = /sbin/init\n");
            init = true;
        } else if line.contains(" run/hearth ") {
            agent_dir = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    // If hearth's config changes shape, the floor must be looked at again rather than
    // silently keep the agent.
    ensure!(
        init && agent_dir,
        "hearth's LXC config no longer has the expected init and agent lines:\n{full}"
    );
    Ok(out)
}

/// Commits the pool's pending writes and lets the machine settle (see [`QUIESCE`]). A
/// btrfs snapshot commits the running transaction, so without this the floor and the
/// API's create would each pay for whatever the other left dirty.
async fn quiesce(floor: &Arc<FloorEnv>) -> anyhow::Result<()> {
    let root = floor.pool.root().to_path_buf();
    blocking(move || {
        let dir = std::fs::File::open(&root).with_context(|| format!("open {}", root.display()))?;
        // SAFETY: syncfs takes an open descriptor, which `dir` keeps alive for the call.
        let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
        ensure!(
            rc == 0,
            "syncfs {}: {}",
            root.display(),
            std::io::Error::last_os_error()
        );
        Ok(())
    })
    .await?;
    tokio::time::sleep(QUIESCE).await;
    Ok(())
}

fn delete_subvolume_patiently(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + SUBVOLUME_BUSY_DEADLINE;
    loop {
        match btrfs::delete_subvolume(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.errno() == Some(Errno::ENOENT) => return Ok(()),
            Err(e) if e.errno() == Some(Errno::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("delete {}", path.display())),
        }
    }
}

fn cgroup_v2() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
}

/// The benchmark's project. [`BenchProject::cleanup`] deletes it with every container in
/// it; if that is never reached (a panic, a dropped future), dropping it does the same
/// on a thread of its own, since a drop cannot await.
pub(super) struct BenchProject {
    ctl: ControlClient,
    name: String,
    cleaned: bool,
}

impl BenchProject {
    pub(super) async fn create(ctl: &ControlClient, name: String) -> anyhow::Result<BenchProject> {
        ctl.call(
            Method::POST,
            "/api/v1/projects",
            Some(json!({ "name": name })),
        )
        .await
        .with_context(|| format!("create project {name}"))?;
        Ok(BenchProject {
            ctl: ctl.clone(),
            name,
            cleaned: false,
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) async fn cleanup(mut self) -> anyhow::Result<()> {
        self.cleaned = true;
        delete_project(&self.ctl, &self.name).await
    }
}

impl Drop for BenchProject {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (ctl, name) = (self.ctl.clone(), self.name.clone());
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(delete_project(&ctl, &name))
        });
        if let Ok(Err(e)) = worker.join() {
            eprintln!("hearth: cleaning up the benchmark's project failed: {e:#}");
        }
    }
}

/// Deletes every container of `project` (listing again until none is left, so one that
/// was still being created when the benchmark stopped goes too), then the project.
async fn delete_project(ctl: &ControlClient, project: &str) -> anyhow::Result<()> {
    let mut first_err: Option<anyhow::Error> = None;
    for _pass in 0..5 {
        let list = match ctl
            .call(
                Method::GET,
                &format!("/api/v1/projects/{project}/containers?limit=100"),
                None,
            )
            .await
        {
            Ok(v) => v,
            Err(e) if e.status() == Some(404) => return Ok(()),
            Err(e) => return Err(e).context(format!("list the containers of {project}")),
        };
        let ids: Vec<String> = list["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("id").and_then(Value::as_str).map(String::from))
            .collect();
        if ids.is_empty() {
            break;
        }
        for id in ids {
            match ctl
                .call(Method::DELETE, &format!("/api/v1/containers/{id}"), None)
                .await
            {
                Ok(_) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => {
                    first_err.get_or_insert(anyhow!(e).context(format!("delete container {id}")));
                }
            }
        }
    }
    match ctl
        .call(Method::DELETE, &format!("/api/v1/projects/{project}"), None)
        .await
    {
        Ok(_) => {}
        Err(ControlError::Api { status: 404, .. }) => {}
        Err(e) => {
            first_err.get_or_insert(anyhow!(e).context(format!("delete project {project}")));
        }
    }
    first_err.map_or(Ok(()), Err)
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking benchmark step panicked")?
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(super) fn pct(samples: &[f64], p: f64) -> anyhow::Result<f64> {
    let mut v = samples.to_vec();
    sort_samples(&mut v);
    percentile(&v, p).map(round3).context("no samples")
}

fn mb(bytes: u64) -> f64 {
    round3(bytes as f64 / f64::from(1u32 << 20))
}

fn report(
    cfg: &Config,
    opts: &LifecycleOptions,
    image: &str,
    s: &Samples,
    floor_idmap_base: u32,
) -> anyhow::Result<Value> {
    let create_p50 = pct(&s.ready_ms, 50.0)?;
    let floor_p50 = pct(&s.floor_ms, 50.0)?;
    let idle = |f: &dyn Fn(&Idle) -> f64| -> Option<f64> {
        let v: Vec<f64> = s.idle.iter().map(f).collect();
        pct(&v, 50.0).ok()
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    Ok(json!({
        "create_to_agent_ready_ms_p50": create_p50,
        "create_to_agent_ready_ms_p99": pct(&s.ready_ms, 99.0)?,
        "create_to_systemd_running_ms_p50": pct(&s.systemd_ms, 50.0)?,
        "create_to_systemd_running_ms_p99": pct(&s.systemd_ms, 99.0)?,
        "create_to_systemd_exec_ms_p50": pct(&s.systemd_exec_ms, 50.0).ok(),
        "systemd_boot_ms_p50": pct(&s.systemd_boot_ms, 50.0).ok(),
        "systemd_boot_ms_p99": pct(&s.systemd_boot_ms, 99.0).ok(),
        "create_to_systemd_finished_ms_p50": pct(&s.systemd_finished_ms, 50.0).ok(),
        "systemd_blame_top": s.blame,
        "stop_ms_p50": pct(&s.stop_ms, 50.0)?,
        "stop_ms_p99": pct(&s.stop_ms, 99.0)?,
        "delete_ms_p50": pct(&s.delete_ms, 50.0)?,
        "delete_ms_p99": pct(&s.delete_ms, 99.0)?,
        "floor_start_ms_p50": floor_p50,
        "floor_start_ms_p99": pct(&s.floor_ms, 99.0)?,
        "floor_snapshot_ms_p50": pct(&s.floor_snapshot_ms, 50.0)?,
        "create_vs_floor": round3(create_p50 / floor_p50),
        "agent_rss_kb": idle(&|i| i.agent_rss_kb as f64).map(|kb| kb as u64),
        "agent_rss_all_agents_kb": idle(&|i| i.agent_total_rss_kb as f64).map(|kb| kb as u64),
        "agent_processes": s.idle.iter().map(|i| i.agent_processes).max(),
        "container_idle_memory_mb": idle(&|i| mb(i.cgroup.usage)),
        "container_idle_anon_mb": idle(&|i| mb(i.cgroup.anon)),
        "container_idle_file_mb": idle(&|i| mb(i.cgroup.file)),
        "container_idle_shmem_mb": idle(&|i| mb(i.cgroup.shmem)),
        "systemd_states": s.systemd_states,
        "failed_units": s.failed_units,
        "n": opts.n,
        "warmup_rounds": WARMUP_ROUNDS,
        "idle_samples": s.idle.len(),
        "idle_settle_ms": opts.settle.as_millis() as u64,
        "systemd_poll_ms": opts.systemd_poll.as_millis() as u64,
        "quiesce_ms": QUIESCE.as_millis() as u64,
        "image": image,
        "memory_limit_mb": cfg.defaults.memory_mb,
        "cgroup": if cgroup_v2() { "v2" } else { "v1" },
        "floor_net": "empty",
        "floor_idmap_base": floor_idmap_base,
        "cpus": allowed_cpus().map(|c| c.len()).unwrap_or(0),
        "kernel": kernel,
        "placement": "unpinned",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_rss_lines() {
        let text = "early 42\n42 VmRSS:\t    5120 kB\n77 VmRSS:\t    1024 kB\n";
        assert_eq!(parse_agent_rss(text).unwrap(), (5120, 6144, 2));
        // A dead early agent is an error, not a zero.
        assert!(parse_agent_rss("early 9\n77 VmRSS: 1 kB\n").is_err());
        assert!(parse_agent_rss("42 VmRSS: 1 kB\n").is_err());
    }

    #[test]
    fn floor_config_drops_the_agent_and_the_network() {
        let spec = GuestSpec {
            name: "f".into(),
            hostname: "floor".into(),
            rootfs: "/pool/bench-floor/1/0".into(),
            idmap_base: 984_040_000,
            idmap_size: 65536,
            agent_dir: "/nonexistent".into(),
            limits: Limits {
                memory_bytes: 1 << 30,
                cpus: 1.0,
                pids: 100,
            },
            net: Vec::new(),
        };
        let c = floor_config(&spec, Path::new("/tmp/l"), false).unwrap();
        assert!(c.contains("lxc.init.cmd = /sbin/init\n"));
        assert!(!c.contains("hearth-agent"));
        assert!(!c.contains("run/hearth"));
        assert!(c.contains("lxc.net.0.type = empty\n"));
        assert!(c.contains("lxc.idmap = u 0 984040000 65536\n"));
        assert!(c.contains("lxc.rootfs.options = idmap=container\n"));
    }
}
