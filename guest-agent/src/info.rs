//! `info`: what the guest is and how it is doing, read from /proc and /etc.

use hearth_protocol::info::GuestInfo;
use std::fs;

pub fn guest_info(features: u64) -> GuestInfo {
    let os_release = fs::read_to_string("/etc/os-release")
        .or_else(|_| fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let field = |key: &str| os_release_field(&os_release, key).unwrap_or_default();
    let uname = nix::sys::utsname::uname().ok();
    let (mem_total_kb, mem_available_kb) = meminfo();
    GuestInfo {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        os: field("PRETTY_NAME"),
        os_id: field("ID"),
        os_version: field("VERSION_ID"),
        kernel: uname
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        uptime_secs: first_float(&fs::read_to_string("/proc/uptime").unwrap_or_default()),
        mem_total_kb,
        mem_available_kb,
        load: loadavg(),
        agent_version: crate::AGENT_VERSION.to_string(),
        features,
    }
}

fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

fn first_float(s: &str) -> f64 {
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn meminfo() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (kb("MemTotal:"), kb("MemAvailable:"))
}

fn loadavg() -> [f64; 3] {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let i = guest_info(3);
        assert!(!i.hostname.is_empty());
        assert!(!i.kernel.is_empty());
        assert!(i.mem_total_kb > 0 && i.mem_available_kb <= i.mem_total_kb);
        assert!(i.uptime_secs > 0.0);
        assert_eq!(i.features, 3);
    }

    #[test]
    fn parses_os_release_quoting() {
        let t = "NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"13\"\nID=debian\n";
        assert_eq!(os_release_field(t, "VERSION_ID").as_deref(), Some("13"));
        assert_eq!(os_release_field(t, "ID").as_deref(), Some("debian"));
        assert_eq!(os_release_field(t, "NOPE"), None);
    }
}
