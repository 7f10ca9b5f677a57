//! What the guest is and how it is doing.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub hostname: String,
    /// `PRETTY_NAME` from os-release, e.g. "Debian GNU/Linux 13 (trixie)".
    pub os: String,
    pub os_id: String,
    pub os_version: String,
    pub kernel: String,
    pub uptime_secs: f64,
    pub mem_total_kb: u64,
    pub mem_available_kb: u64,
    pub load: [f64; 3],
    pub agent_version: String,
    pub features: u64,
}
