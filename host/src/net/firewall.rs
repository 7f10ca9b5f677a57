//! hearth's nftables table: the isolation and NAT for every container.
//!
//! The table is hearth's alone and always written whole, in one `nft -f` transaction
//! that adds it (so the delete cannot fail), deletes it and recreates it. The kernel
//! applies a transaction atomically, so rules are never duplicated by a second `ensure`
//! and never briefly missing while they are replaced.
//!
//! What the rules enforce (container = traffic on a `<veth_prefix>*` interface):
//! - **input**: a container reaches no service on the host, at any of its addresses
//!   (the host's LAN address, other interfaces, IPv6 link-local on the veth — the table
//!   is `inet`, so IPv6 too). Only replies to connections the host opened are let in,
//!   which is how the host's own proxy talks to containers. Whatever a prerouting DNAT
//!   on the host does, a packet delivered locally still arrives with the container's
//!   input interface, so this cannot be routed around.
//! - **forward**: nothing between two containers, even via a DNAT hairpin. No
//!   link-local destinations: routers must not forward them (RFC 3927), and on clouds
//!   169.254.169.254 is the instance metadata service whose credentials are the host's.
//!   Nothing unsolicited into a container from outside (a LAN neighbour routing the
//!   container range at this host): only replies, and connections an operator's own
//!   DNAT rule sends there.
//! - **postrouting**: egress from the container range is masqueraded behind the host.
//!
//! Traffic the host itself sends to containers takes the output path and is not
//! filtered here.

use super::command::run;
use super::{NetConfig, NetError};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The complete `nft -f` input that replaces the table with the current rules.
pub fn ruleset(cfg: &NetConfig) -> String {
    let t = &cfg.table;
    let hv = format!("\"{}*\"", cfg.veth_prefix);
    let cidr = cfg.cidr.trunc();
    format!(
        "add table inet {t}
delete table inet {t}
table inet {t} {{
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname {hv} oifname {hv} drop
\t\tiifname {hv} ip daddr 169.254.0.0/16 drop
\t\toifname {hv} ct state established,related accept
\t\toifname {hv} ct status dnat accept
\t\toifname {hv} drop
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {hv} ct state established,related accept
\t\tiifname {hv} drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {cidr} oifname != {hv} masquerade
\t}}
}}
"
    )
}

/// Installs or replaces hearth's table and turns on IPv4 forwarding. Idempotent; safe to
/// call on every daemon start and after a config change. The rules go in first so the
/// host never forwards for containers without them.
pub fn ensure(cfg: &NetConfig) -> Result<(), NetError> {
    cfg.validate()?;
    run("nft", &["-f", "-"], Some(&ruleset(cfg)))?;
    enable_ip_forward()
}

/// Removes hearth's table; a table that is not there is fine. Forwarding is left on: other
/// software on the host may rely on it, and without the table nothing routes to
/// containers that are not running anyway.
pub fn remove(cfg: &NetConfig) -> Result<(), NetError> {
    cfg.validate()?;
    let t = &cfg.table;
    // Adding first makes the delete succeed whether or not the table existed, without
    // having to recognise nft's "No such file or directory" message.
    run(
        "nft",
        &["-f", "-"],
        Some(&format!("add table inet {t}\ndelete table inet {t}\n")),
    )?;
    Ok(())
}

/// Sets net.ipv4.ip_forward, which LXC's router mode needs (it only turns forwarding on
/// for each veth). Skips the write when already on, since writing it resets every
/// interface's forwarding flag.
fn enable_ip_forward() -> Result<(), NetError> {
    let now = std::fs::read_to_string(IP_FORWARD).map_err(NetError::io("read", IP_FORWARD))?;
    if now.trim() != "1" {
        std::fs::write(IP_FORWARD, "1\n").map_err(NetError::io("write", IP_FORWARD))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_uses_the_config() {
        let cfg = NetConfig {
            cidr: "10.9.8.7/24".parse().unwrap(),
            table: "hearth-x".into(),
            veth_prefix: "hx".into(),
            ..NetConfig::default()
        };
        let text = ruleset(&cfg);
        assert!(text.starts_with("add table inet hearth-x\ndelete table inet hearth-x\n"));
        assert!(text.contains("\t\tiifname \"hx*\" oifname \"hx*\" drop\n"));
        assert!(text.contains("\t\tiifname \"hx*\" drop\n"));
        // Host bits in the configured range are dropped: nft rejects them.
        assert!(text.contains("ip saddr 10.9.8.0/24 oifname != \"hx*\" masquerade"));
        assert_eq!(text.matches("chain ").count(), 3);
        assert!(!text.contains("hv*"));
    }
}
