//! The container's /etc/resolv.conf.
//!
//! Containers use the same upstream resolvers as the host, reached through the NAT like
//! any other egress. A resolver the host runs for itself cannot serve them: a loopback
//! one (systemd-resolved's 127.0.0.53, a local dnsmasq) is the container's own loopback,
//! and one on any other host address is blocked by the firewall's input chain. So those
//! are skipped, systemd-resolved's list of real upstreams is tried when /etc/resolv.conf
//! only has loopback ones, and an operator whose host has nothing usable sets `dns`.

use super::{NetConfig, NetError};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};

const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's list of upstream servers, for hosts whose /etc/resolv.conf points
/// at its 127.0.0.53 stub.
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";
/// glibc reads at most this many `nameserver` lines; more would be silently ignored.
const MAX_NAMESERVERS: usize = 3;

/// The text of a container's /etc/resolv.conf: `dns` from the config, or else the host's
/// own upstream IPv4 nameservers (containers have no IPv6). Errors when neither gives a
/// nameserver a container can reach, naming the files read, so the operator knows to set
/// `dns` in `[network]`.
pub fn resolv_conf(cfg: &NetConfig) -> Result<String, NetError> {
    if !cfg.dns.is_empty() {
        return Ok(render(&cfg.dns));
    }
    let host = std::fs::read_to_string(HOST_RESOLV_CONF)
        .map_err(NetError::io("read", HOST_RESOLV_CONF))?;
    let usable = usable_nameservers(&host, is_host_address);
    if !usable.is_empty() {
        return Ok(render(&usable));
    }
    let mut tried = HOST_RESOLV_CONF.to_owned();
    // Only loopback resolvers suggest a local stub such as systemd-resolved in front of
    // the real ones; otherwise its file, even if present, is not what the host uses.
    if nameservers(&host).iter().any(IpAddr::is_loopback) {
        match std::fs::read_to_string(RESOLVED_UPSTREAMS) {
            Ok(text) => {
                let usable = usable_nameservers(&text, is_host_address);
                if !usable.is_empty() {
                    return Ok(render(&usable));
                }
                tried.push_str(" or ");
                tried.push_str(RESOLVED_UPSTREAMS);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NetError::io("read", RESOLVED_UPSTREAMS)(e)),
        }
    }
    Err(NetError::Config(format!(
        "no nameserver in {tried} that containers can reach (loopback and the host's own \
         addresses are not reachable from a container); set dns in [network]"
    )))
}

fn render(servers: &[Ipv4Addr]) -> String {
    let mut out = String::from("# Written by hearth.\n");
    for s in servers.iter().take(MAX_NAMESERVERS) {
        out.push_str(&format!("nameserver {s}\n"));
    }
    out
}

/// Every `nameserver` address in resolv.conf text, in order. Lines that do not parse
/// (scoped IPv6 addresses, typos) are skipped as the resolver would skip them.
fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// The IPv4 nameservers a container can use: not loopback, not unspecified, and not one
/// of the host's own addresses (`is_local`).
fn usable_nameservers(text: &str, is_local: impl Fn(Ipv4Addr) -> bool) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = Vec::new();
    for addr in nameservers(text) {
        if let IpAddr::V4(a) = addr {
            if !a.is_loopback() && !a.is_unspecified() && !is_local(a) && !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// Whether `addr` is assigned to this host. Binding succeeds only for local addresses
/// (unless net.ipv4.ip_nonlocal_bind is set, in which case the address is kept and
/// containers may not be able to use it), which avoids listing interfaces.
fn is_host_address(addr: Ipv4Addr) -> bool {
    UdpSocket::bind((addr, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# comment
search example.org
nameserver 127.0.0.53
nameserver 10.255.255.53
nameserver fd00::53
nameserver 192.0.2.2
nameserver 10.255.255.53
nameserver bogus
options edns0
nameserver 9.9.9.9
nameserver 1.1.1.1
";

    #[test]
    fn parses_nameservers_in_order() {
        let all = nameservers(TEXT);
        assert_eq!(all.len(), 7);
        assert!(all[0].is_loopback());
    }

    #[test]
    fn keeps_only_what_containers_can_reach() {
        let local = |a: Ipv4Addr| a == Ipv4Addr::new(192, 0, 2, 2);
        assert_eq!(
            usable_nameservers(TEXT, local),
            [
                Ipv4Addr::new(10, 255, 255, 53),
                Ipv4Addr::new(9, 9, 9, 9),
                Ipv4Addr::new(1, 1, 1, 1)
            ]
        );
        assert!(usable_nameservers("nameserver 127.0.0.53\n", |_| false).is_empty());
    }

    #[test]
    fn renders_at_most_three() {
        let servers: Vec<_> = (1..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let text = render(&servers);
        assert_eq!(text.matches("nameserver ").count(), 3);
        assert!(text.ends_with("nameserver 10.0.0.3\n"));
    }

    #[test]
    fn configured_dns_wins() {
        let cfg = NetConfig {
            dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
            ..NetConfig::default()
        };
        let text = resolv_conf(&cfg).unwrap();
        assert!(text.contains("nameserver 9.9.9.9\n"));
        assert_eq!(text.matches("nameserver").count(), 1);
    }

    #[test]
    fn detects_host_addresses() {
        // 203.0.113.0/24 is reserved for documentation, so never assigned here.
        assert!(is_host_address(Ipv4Addr::LOCALHOST));
        assert!(!is_host_address(Ipv4Addr::new(203, 0, 113, 254)));
    }
}
