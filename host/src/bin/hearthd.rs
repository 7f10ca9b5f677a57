//! `hearthd`: the node daemon. Crash-only: it can be killed at any moment; guests keep
//! running, and the next start reconciles the store with the machine.
//!
//! `hearthd forkstart NAME LXCPATH` is an internal entry point: liblxc's start forks a
//! monitor process, which must not happen from the multi-threaded daemon, so the daemon
//! runs this in a fresh single-threaded process.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use hearth_host::config::Config;
use hearth_host::node::Node;
use hearth_host::pool::{BtrfsPool, Storage};
use hearth_host::runtime::lxc::LxcRuntime;
use hearth_host::store::Store;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "hearthd", version, about = "The hearth node daemon")]
struct Args {
    /// TOML configuration; missing means the built-in defaults.
    #[arg(long, default_value = "/etc/hearth/hearthd.toml")]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("forkstart") {
        // Before any thread exists.
        let (Some(name), Some(path)) = (argv.get(2), argv.get(3)) else {
            eprintln!("usage: hearthd forkstart NAME LXCPATH");
            return std::process::ExitCode::from(2);
        };
        return match hearth_host::runtime::lxc::forkstart(name, std::path::Path::new(path)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearthd: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hearthd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create {}", cfg.state_dir.display()))?;
    let _lock = lock(&cfg)?;
    let node = open_node(cfg).await?;
    let socket = node.cfg.control_socket();
    tracing::info!(
        "hearthd {} serving {}",
        env!("CARGO_PKG_VERSION"),
        socket.display()
    );
    let sweeper = node.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            match sweeper.sweep_expired().await {
                Ok(done) => {
                    for s in done {
                        tracing::info!("expired snapshot {s} deleted");
                    }
                }
                Err(e) => tracing::warn!("sweeping expired snapshots: {e}"),
            }
        }
    });
    let front = front_door(&node).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = hearth_host::control::serve(node, &socket) => r,
        r = front => r,
        _ = term.recv() => {
            tracing::info!("SIGTERM: exiting (guests keep running)");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// The HTTPS front door: certificates (generated on first start, or the operator's,
/// reloaded when they change), then the listener.
async fn front_door(
    node: &Arc<Node>,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    use hearth_host::tls::{NodeTls, OperatorCert, TlsConfig};
    let p = &node.cfg.proxy;
    let operator = match (&p.cert, &p.key) {
        (Some(cert), Some(key)) => Some(OperatorCert {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None) => None,
        _ => anyhow::bail!("[proxy] needs both cert and key, or neither"),
    };
    let tls_cfg = TlsConfig {
        node: p.node.clone(),
        domain: p.domain.clone(),
        dir: node.cfg.tls_dir(),
        operator,
    };
    let tls = tokio::task::spawn_blocking(move || NodeTls::open(tls_cfg))
        .await?
        .context("TLS certificates")?;
    // Detached (dropping a tokio JoinHandle does not stop the task): it polls the
    // operator's files and renews the generated certificate when due.
    drop(tls.spawn_reload_on_change(std::time::Duration::from_secs(5)));
    let auth = Arc::new(hearth_host::auth::Authorizer::new(&node.cfg, node.clone()));
    auth.load_key().context("the capability link key")?;
    let proxy = hearth_host::proxy::server::Proxy::new(
        node.clone(),
        auth,
        hearth_host::control::api_router(node.clone()),
    );
    let serving = proxy.spawn_workers(p.listen, tls.server_config(), p.workers)?;
    tracing::info!(
        "HTTPS on {} for *.{}.{} (CA {})",
        p.listen,
        p.node,
        p.domain,
        tls.ca_path().display()
    );
    Ok(serving)
}

/// One daemon per state directory: two would each "reconcile" the other's work away.
/// The lock dies with the process, so a `kill -9` never leaves a stale one; the pid file
/// beside it tells tools which process to signal.
fn lock(cfg: &Config) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = cfg.state_dir.join("hearthd.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("another hearthd holds {} ({e})", path.display()))?;
    std::fs::create_dir_all(&cfg.run_dir)?;
    std::fs::write(
        cfg.run_dir.join("hearthd.pid"),
        format!("{}\n", std::process::id()),
    )?;
    Ok(lock)
}

async fn open_node(cfg: Config) -> anyhow::Result<Arc<Node>> {
    let id = &cfg.idmap;
    let count = u64::from(id.size) * u64::from(id.blocks);
    for f in ["/etc/subuid", "/etc/subgid"] {
        if hearth_host::subid::ensure_root_range(f.as_ref(), id.base.into(), count)
            .with_context(|| format!("update {f}"))?
        {
            tracing::info!("added root:{}:{count} to {f}", id.base);
        }
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create {}", cfg.state_dir.display()))?;
    cfg.network.validate()?;
    hearth_host::net::firewall::ensure(&cfg.network).context("network: nftables and forwarding")?;
    let pool_cfg = cfg.pool.clone();
    let pool = tokio::task::spawn_blocking(move || BtrfsPool::open(&pool_cfg))
        .await?
        .context("open the storage pool")?;
    tracing::info!("pool at {}", pool.root().display());
    let store = Store::open(&cfg.db_path()).context("open the store")?;
    store.ensure_project("default")?;
    let exe = std::env::current_exe().context("locate hearthd")?;
    let runtime = LxcRuntime::new(cfg.lxc_dir(), exe)?;
    let node = Node::new(cfg, store, Arc::new(pool), Arc::new(runtime));
    for line in node.reconcile().await? {
        tracing::info!("reconcile: {line}");
    }
    Ok(node)
}
