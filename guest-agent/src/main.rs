//! `hearth-agent`: the agent that runs inside every hearth guest.

use anyhow::Context;
use clap::Parser;
use hearth_agent::freeze;
use hearth_protocol::Endpoint;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "The hearth guest agent")]
struct Args {
    /// Where to listen: unix:/path or vsock:CID:PORT (vsock:any:PORT for every CID).
    #[arg(
        long,
        env = "HEARTH_AGENT_LISTEN",
        default_value = "unix:/run/hearth/agent.sock"
    )]
    listen: Endpoint,
    /// File holding the guest's secret (32 raw bytes or 64 hex digits, mode 0600).
    #[arg(
        long,
        env = "HEARTH_AGENT_SECRET_FILE",
        default_value = "/etc/hearth/agent.secret"
    )]
    secret_file: PathBuf,
    /// Run as the guest's PID 1: fork off the agent, then exec this init command
    /// (e.g. `--init /sbin/init`); everything after `--init` is the init's argv.
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    init: Option<Vec<String>>,
    /// Used by the systemd unit: if an agent started as init is serving, wait for it to
    /// exit (then systemd restarts this unit into a supervised agent).
    #[arg(long)]
    defer_to_early: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let socket_dir = match &args.listen {
        Endpoint::Unix(p) => p.parent().map(PathBuf::from),
        _ => None,
    }
    .unwrap_or_else(|| PathBuf::from("/run/hearth"));
    if let Some(init) = &args.init {
        // Before logging or the runtime start any thread: this forks.
        hearth_agent::init::become_early_agent(init, &socket_dir)?;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.defer_to_early && hearth_agent::init::defer_to_early_agent(&socket_dir)? {
        anyhow::bail!("the early agent exited; restarting as a supervised agent");
    }
    let secret = hearth_agent::secret::load(&args.secret_file)?;
    // One thread for the event loop keeps the agent small; file copies and other
    // blocking work go to the blocking pool.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(async {
        if let Endpoint::Unix(path) = &args.listen {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
        }
        let listener = args.listen.listen().await?;
        tracing::info!(
            "hearth-agent {} listening on {}",
            hearth_agent::AGENT_VERSION,
            args.listen
        );
        // Reached over a unix socket, the agent is in a container: the host's kernel
        // and its snapshots see this guest's page cache (see `freeze::SyncPolicy`).
        let sync = match &args.listen {
            Endpoint::Unix(_) => freeze::SyncPolicy::HostSnapshotFlushes,
            _ => freeze::SyncPolicy::Always,
        };
        let freezer = freeze::Freezer::new(freeze::builtin_engines(), sync);
        let agent = hearth_agent::Agent::with_freezer(secret, freezer);
        hearth_agent::server::serve(listener, agent)
            .await
            .context("serve")
    })
}
