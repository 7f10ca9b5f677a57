//! `hearthd`'s configuration: embedded defaults, optionally overridden by a TOML file
//! (`/etc/hearth/hearthd.toml`). Every field has a default so an empty file is valid.

use crate::net::NetConfig;
use crate::pool::PoolConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Everything persistent: the store, the pool's loop file, certificates.
    pub state_dir: PathBuf,
    /// Runtime files: the control socket.
    pub run_dir: PathBuf,
    pub pool: PoolConfig,
    pub network: NetConfig,
    pub defaults: DefaultLimits,
    pub idmap: IdmapConfig,
    /// The image a container gets when the request names none.
    pub default_image: String,
    /// The agent binary installed into images built on this node (default: next to
    /// hearthd).
    pub agent_bin: Option<PathBuf>,
    pub proxy: ProxyConfig,
}

/// The HTTPS front door: every guest service at
/// `https://{project}-{container}-{service}-{n}.{node}.{domain}`, the REST API at
/// `https://api.{node}.{domain}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where the HTTPS listener binds (443 in production).
    pub listen: std::net::SocketAddr,
    /// `localhost` works with no DNS: browsers and curl resolve `*.localhost` to
    /// loopback.
    pub domain: String,
    /// This node's label in host names (default: the machine's short host name).
    pub node: String,
    /// The port URLs name, when a port forward or load balancer puts the listener
    /// behind another one (default: the listener's).
    pub public_port: Option<u16>,
    /// An operator's certificate chain and key (PEM), replacing the generated ones;
    /// reloaded when the files change.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Threads serving HTTPS, each with its own listening socket and guest connections
    /// (0: one per CPU).
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 8443)),
            domain: "localhost".into(),
            node: default_node_name(),
            public_port: None,
            cert: None,
            key: None,
            workers: 0,
        }
    }
}

/// The machine's short host name as a DNS label (lower case, a-z0-9 and '-'), or
/// `node` when it has none usable.
fn default_node_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let label: String = host
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() || label.len() > 63 {
        "node".into()
    } else {
        label.to_string()
    }
}

impl ProxyConfig {
    /// The port that URLs carry (`None` for 443, which URLs leave out).
    pub fn url_port(&self) -> Option<u16> {
        let p = self.public_port.unwrap_or(self.listen.port());
        (p != 443).then_some(p)
    }

    /// `https://{label}.{node}.{domain}[:port]`.
    pub fn url_for(&self, label: &str) -> String {
        match self.url_port() {
            Some(p) => format!("https://{label}.{}.{}:{p}", self.node, self.domain),
            None => format!("https://{label}.{}.{}", self.node, self.domain),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultLimits {
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: u64,
    /// Disk cap of a new container's rootfs, in GiB (enforced when the pool has quotas).
    pub disk_gb: u64,
    /// Seconds a clean shutdown may take before the container is killed.
    pub stop_timeout_secs: i32,
    /// Snapshots a container may keep.
    pub max_snapshots: usize,
}

impl Default for DefaultLimits {
    fn default() -> Self {
        DefaultLimits {
            memory_mb: 2048,
            cpus: 2.0,
            pids: 4096,
            disk_gb: 10,
            stop_timeout_secs: 10,
            max_snapshots: 50,
        }
    }
}

/// Each container gets its own `size`-wide block of host uids/gids out of root's range
/// in /etc/subuid and /etc/subgid, so two guests' root users are different host users.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdmapConfig {
    pub base: u32,
    pub size: u32,
    /// How many blocks the range holds.
    pub blocks: u32,
}

impl Default for IdmapConfig {
    fn default() -> Self {
        IdmapConfig {
            base: 1_000_000,
            size: 65_536,
            blocks: 15_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: "/var/lib/hearth".into(),
            run_dir: "/run/hearth".into(),
            pool: PoolConfig::default(),
            network: NetConfig::default(),
            defaults: DefaultLimits::default(),
            idmap: IdmapConfig::default(),
            default_image: "debian-13".into(),
            agent_bin: None,
            proxy: ProxyConfig::default(),
        }
    }
}

impl Config {
    /// Reads `path` if it exists; a missing file means the defaults.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("hearth.db")
    }

    pub fn lxc_dir(&self) -> PathBuf {
        self.state_dir.join("lxc")
    }

    /// The node's CA and server certificate.
    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }

    /// Per-container directories that appear as /run/hearth inside the guest.
    pub fn agents_dir(&self) -> PathBuf {
        self.state_dir.join("agents")
    }
}
