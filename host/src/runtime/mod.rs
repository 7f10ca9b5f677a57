//! Guest runtimes behind one trait: LXC system containers now, VMs later. The node's
//! services speak only this trait; capability flags say what a runtime can do.

pub mod liblxc;
pub mod lxc;

use std::path::PathBuf;

/// What a runtime can do, so generic code branches on flags rather than on types.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeInfo {
    pub name: &'static str,
    /// Guests share the host kernel (a container) rather than booting their own.
    pub shared_kernel: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time as a number of CPUs (1.5 = one and a half cores).
    pub cpus: f64,
    pub pids: u64,
}

/// Everything a runtime needs to define a guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The runtime's name for it (unique on the node).
    pub name: String,
    pub hostname: String,
    pub rootfs: PathBuf,
    /// First host uid/gid of the guest's private id range.
    pub idmap_base: u32,
    pub idmap_size: u32,
    /// Host directory that appears as /run/hearth in the guest (agent socket).
    pub agent_dir: PathBuf,
    pub limits: Limits,
    /// Runtime-specific network settings (for LXC: `lxc.net.0.*` keys).
    pub net: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Stopped,
    /// Known to the runtime but in a transition (starting, stopping, frozen...).
    Other,
    /// The runtime has no such guest.
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Lxc(#[from] liblxc::LxcError),
    #[error("{0}")]
    Start(String),
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A guest runtime. Methods block (liblxc does); call them off async worker threads.
pub trait Runtime: Send + Sync {
    fn info(&self) -> RuntimeInfo;
    /// Writes (or rewrites) the guest's definition.
    fn define(&self, spec: &GuestSpec) -> Result<(), RuntimeError>;
    /// Starts a defined guest; returns once it runs.
    fn start(&self, name: &str) -> Result<(), RuntimeError>;
    /// Clean shutdown with a deadline, then a hard stop.
    fn stop(&self, name: &str, timeout_secs: i32) -> Result<(), RuntimeError>;
    /// Hard stop; returns once the guest is stopped and torn down.
    fn kill(&self, name: &str) -> Result<(), RuntimeError>;
    /// Hard stop, sent: returns as soon as the guest's processes are being killed,
    /// without waiting for the runtime's teardown (a restore that moves on to another
    /// slot does not need the old one gone).
    fn kill_begin(&self, name: &str) -> Result<(), RuntimeError>;
    fn state(&self, name: &str) -> Result<RunState, RuntimeError>;
    fn init_pid(&self, name: &str) -> Result<Option<i32>, RuntimeError>;
    /// Stops (hard) if needed and forgets the guest. Missing is fine.
    fn undefine(&self, name: &str) -> Result<(), RuntimeError>;
    /// Every guest this runtime knows, for crash reconciliation.
    fn list(&self) -> Result<Vec<String>, RuntimeError>;
}
