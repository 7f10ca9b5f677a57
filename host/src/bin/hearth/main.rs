//! `hearth`: the command line for a hearth node.
//!
//! For now: `hearth agent ...` talks to one guest agent directly (like Kata's agent-ctl),
//! and `hearth bench agent` measures the agent against this machine's own floors.

mod agent_cmd;
mod authcmd;
mod images;
mod nodecmd;
mod session;
mod up;
mod urls;

use clap::{Args, Parser, Subcommand};
use hearth_host::config::Config;
use hearth_host::control::client::ControlClient;
use hearth_protocol::Endpoint;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Full Linux computers on your own server"
)]
struct Cli {
    /// hearthd's configuration (the CLI reads it for the pool and socket paths).
    #[arg(long, global = true, default_value = "/etc/hearth/hearthd.toml")]
    config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring the node up: start hearthd, build the default image if it is missing.
    Up,
    /// Projects group containers.
    Projects {
        #[command(subcommand)]
        cmd: nodecmd::ProjectCmd,
    },
    /// Full Linux computers: create, start, stop, exec, shell, cp, delete...
    #[command(alias = "c")]
    Containers {
        #[command(subcommand)]
        cmd: nodecmd::ContainerCmd,
    },
    /// Point-in-time copies of a container: create, list, restore, delete, alias.
    Snapshots {
        #[command(subcommand)]
        cmd: nodecmd::SnapshotCmd,
    },
    /// Project API tokens for the HTTPS front door: create, list, revoke.
    Tokens {
        #[command(subcommand)]
        cmd: authcmd::TokenCmd,
    },
    /// Print a signed, expiring link to one service of a container.
    Share(authcmd::ShareArgs),
    /// Open a container's service to everyone (`--off` closes it again).
    Public(authcmd::PublicArgs),
    /// Where the node's CA certificate is, for clients to trust (e.g. `curl --cacert`).
    Ca,
    /// A container's HTTPS URLs: one per kit service, its apps' ports, the REST API.
    Urls {
        /// ID, project/name, or a name unique on the node.
        container: String,
    },
    /// Templates containers are made from.
    Image {
        #[command(subcommand)]
        cmd: images::ImageCmd,
    },
    /// Talk to one guest agent directly (debugging).
    Agent(AgentArgs),
    /// Measure hearth against this machine's own floors; prints JSON.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Args)]
pub struct AgentArgs {
    /// unix:/path, vsock:CID:PORT or hvsock:/path:PORT
    #[arg(long)]
    pub endpoint: Endpoint,
    /// The guest's secret (32 raw bytes or 64 hex digits).
    #[arg(long)]
    pub secret_file: PathBuf,
    #[command(subcommand)]
    pub op: AgentOp,
}

#[derive(Subcommand)]
pub enum AgentOp {
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
    /// A container's life through the running node (create to agent ready and to systemd
    /// running, stop, delete, idle memory) beside a bare snapshot + liblxc start of the
    /// same template. Creates and removes its own project `bench-<pid>`.
    Lifecycle {
        /// Measured rounds (creates, and as many floor starts); at least 20 for a p99
        /// worth reading.
        #[arg(long, default_value_t = 20)]
        n: usize,
        /// The image to create from (default: the node's default image).
        #[arg(long)]
        image: Option<String>,
        /// Milliseconds between `systemctl is-system-running` polls in the guest.
        #[arg(long, default_value_t = 10)]
        poll_ms: u64,
    },
    /// Snapshot, restore and branch through the running node, beside a raw btrfs
    /// snapshot and a plain create. Creates and removes its own project.
    Snapshots {
        #[arg(long, default_value_t = 20)]
        n: usize,
        /// Skip the guest with PostgreSQL, MariaDB and Redis under write load (it
        /// installs them from Debian's archive: needs the mirror, ~40 s).
        #[arg(long)]
        no_dbs: bool,
    },
    /// Requests per second and p99 through hearth's HTTPS front door beside nginx as a
    /// TLS-terminating reverse proxy to the same app in the same guest: HTTP/1.1
    /// keep-alive, the same load for both, alternating. Creates and removes its own
    /// project; needs nginx (and wrk for `--tool wrk`).
    Proxy {
        /// Measured time per run (e.g. 10s, 500ms).
        #[arg(long, default_value = "10s", value_parser = hearth_host::bench::proxy::parse_duration)]
        duration: std::time::Duration,
        /// Unmeasured load before each run.
        #[arg(long, default_value = "2s", value_parser = hearth_host::bench::proxy::parse_duration)]
        warmup: std::time::Duration,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Load generator threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Runs per target (hearth, nginx, hearth, nginx, ...); medians are reported.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Load generator: builtin (hyper + rustls in this binary) or wrk.
        #[arg(long, default_value = "builtin")]
        tool: hearth_host::bench::proxy::LoadTool,
        /// The app's port in the guest.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// The guest app of `bench proxy` (internal).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        port: u16,
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
    let res = rt.block_on(run(cli));
    // Do not wait for blocking tasks: tokio reads stdin on one, and it only returns when
    // the terminal sends something, which after the command has exited it never may.
    rt.shutdown_background();
    report(res)
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
    let json = cli.json;
    let cfg = Config::load(&cli.config)?;
    let ctl = ControlClient::new(cfg.control_socket());
    match cli.cmd {
        Cmd::Up => up::up(&cfg, &cli.config, &ctl).await,
        Cmd::Projects { cmd } => nodecmd::projects(&ctl, cmd, json).await,
        Cmd::Containers { cmd } => nodecmd::containers(&ctl, cmd, json).await,
        Cmd::Snapshots { cmd } => nodecmd::snapshots(&ctl, cmd, json).await,
        Cmd::Tokens { cmd } => authcmd::tokens(&ctl, cmd, json).await,
        Cmd::Share(a) => authcmd::share(&ctl, a, json).await,
        Cmd::Public(a) => authcmd::public(&ctl, a, json).await,
        Cmd::Urls { container } => urls::urls(&cfg, &ctl, &container, json).await,
        Cmd::Ca => {
            let path = hearth_host::tls::ca_path(&cfg.tls_dir());
            anyhow::ensure!(
                path.exists(),
                "{} does not exist yet: hearthd makes it on its first start",
                path.display()
            );
            if json {
                let v = serde_json::json!({
                    "path": path,
                    "node": cfg.proxy.node,
                    "domain": cfg.proxy.domain,
                    "api": cfg.proxy.url_for("api"),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", path.display());
            }
            Ok(0)
        }
        Cmd::Image { cmd } => {
            tokio::task::spawn_blocking(move || images::run(&cfg, cmd, json)).await?
        }
        Cmd::Agent(a) => agent_cmd::agent(a, json).await,
        Cmd::Bench { what } => match what {
            BenchCmd::Agent {
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
            BenchCmd::Lifecycle { n, image, poll_ms } => {
                let opts = hearth_host::bench::lifecycle::LifecycleOptions {
                    n,
                    image,
                    systemd_poll: std::time::Duration::from_millis(poll_ms),
                    ..Default::default()
                };
                let report =
                    hearth_host::bench::lifecycle::run_lifecycle_bench(&cfg, &ctl, &opts).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(0)
            }
            BenchCmd::Snapshots { n, no_dbs } => {
                let opts = hearth_host::bench::snapshots::SnapshotBenchOptions {
                    n,
                    with_dbs: !no_dbs,
                };
                let report =
                    hearth_host::bench::snapshots::run_snapshot_bench(&cfg, &ctl, &opts).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(0)
            }
            BenchCmd::Proxy {
                duration,
                warmup,
                concurrency,
                threads,
                rounds,
                tool,
                port,
            } => {
                let opts = hearth_host::bench::proxy::ProxyBenchOptions {
                    duration,
                    warmup,
                    concurrency,
                    threads,
                    rounds,
                    tool,
                    port,
                };
                let report = hearth_host::bench::proxy::run_proxy_bench(&cfg, &ctl, &opts).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(0)
            }
            BenchCmd::Serve { port } => {
                hearth_host::bench::proxy::serve(port).await?;
                Ok(0)
            }
            BenchCmd::Peer { .. } => unreachable!("handled before the runtime starts"),
        },
    }
}
