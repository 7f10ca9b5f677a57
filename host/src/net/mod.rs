//! Container networking: addresses, LXC's network keys, the container's resolv.conf, the
//! host's nftables table and the clean-up of what a crashed container leaves behind.
//!
//! Every container gets a veth pair in LXC's "router" mode: a /32 address, a default
//! route through a link-local gateway the host answers ARP for (a proxy neighbour entry
//! LXC adds), and a host route to its address. There is no bridge, so containers share no
//! L2; everything between them goes through the host's routing and so through the
//! [`firewall`], which NATs egress and drops container-to-container and
//! container-to-host traffic.
//!
//! ```toml
//! [network]                 # every key optional
//! cidr = "10.88.0.0/16"     # container addresses (the first host address is reserved)
//! gateway = "169.254.0.1"   # what containers see as their router; must be outside cidr
//! dns = ["10.255.255.53"]   # default: the host's own non-loopback nameservers
//! table = "hearth"          # nftables table (family inet) owned by hearth
//! veth_prefix = "hv"        # host-side veth names; 1 to 4 of a-z, 0-9
//! ```

mod command;
mod error;
pub mod firewall;
pub mod ipam;
pub mod links;
mod resolv;

pub use error::NetError;
pub use resolv::resolv_conf;

use ipnet::Ipv4Net;
use serde::Deserialize;
use std::net::Ipv4Addr;

/// Longest interface name the kernel takes (IFNAMSIZ minus the terminating NUL).
pub const IFNAME_MAX: usize = 15;
/// Leaves 11 characters of a 15-character interface name for the container id, so a whole
/// 10-character id always fits and names cannot collide.
pub const VETH_PREFIX_MAX: usize = 4;

/// The `[network]` section of hearth's config.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Container addresses come from here; also what the firewall masquerades.
    #[serde(default = "default_cidr")]
    pub cidr: Ipv4Net,
    /// The containers' default gateway. Never assigned to anything: the host answers ARP
    /// for it on each veth (proxy neighbour), so it only has to be an address containers
    /// do not need to reach, which is why a link-local one is the default.
    #[serde(default = "default_gateway")]
    pub gateway: Ipv4Addr,
    /// Nameservers for the containers. Empty means the host's own (see [`resolv_conf`]).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// The nftables table (family `inet`) hearth owns and replaces as a whole.
    #[serde(default = "default_table")]
    pub table: String,
    /// Host-side veth names start with this; the firewall matches on it, so no other
    /// interface on the host may start with it.
    #[serde(default = "default_veth_prefix")]
    pub veth_prefix: String,
}

fn default_cidr() -> Ipv4Net {
    // Invariant: a constant, valid prefix length.
    Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).expect("16 is a valid prefix length")
}

fn default_gateway() -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 0, 1)
}

fn default_table() -> String {
    "hearth".to_owned()
}

fn default_veth_prefix() -> String {
    "hv".to_owned()
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            cidr: default_cidr(),
            gateway: default_gateway(),
            dns: Vec::new(),
            table: default_table(),
            veth_prefix: default_veth_prefix(),
        }
    }
}

impl NetConfig {
    /// Checks what serde cannot. The table name and prefix end up inside nft's input and
    /// interface names, so they are restricted to characters that need no quoting.
    pub fn validate(&self) -> Result<(), NetError> {
        let p = &self.veth_prefix;
        if p.is_empty()
            || p.len() > VETH_PREFIX_MAX
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(NetError::Config(format!(
                "veth_prefix {p:?}: use 1 to {VETH_PREFIX_MAX} of a-z and 0-9"
            )));
        }
        let t = &self.table;
        let table_ok = t.len() <= 64
            && t.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !table_ok {
            return Err(NetError::Config(format!(
                "table {t:?}: use up to 64 of a-z, A-Z, 0-9, '_' and '-', starting with a letter"
            )));
        }
        if self.cidr.prefix_len() > 30 {
            return Err(NetError::Config(format!(
                "cidr {}: needs a prefix length of at most 30 to leave room for containers",
                self.cidr
            )));
        }
        if self.cidr.contains(&self.gateway) {
            return Err(NetError::Config(format!(
                "gateway {} is inside cidr {}: it would collide with container addresses",
                self.gateway, self.cidr
            )));
        }
        if self.gateway.is_unspecified()
            || self.gateway.is_broadcast()
            || self.gateway.is_multicast()
            || self.gateway.is_loopback()
        {
            return Err(NetError::Config(format!(
                "gateway {} is not a usable unicast address",
                self.gateway
            )));
        }
        if let Some(bad) = self
            .dns
            .iter()
            .find(|a| a.is_loopback() || a.is_unspecified() || a.is_broadcast() || a.is_multicast())
        {
            return Err(NetError::Config(format!(
                "dns {bad}: containers need a nameserver they can reach over the network \
                 (a loopback one would be the container's own)"
            )));
        }
        Ok(())
    }
}

/// The host-side veth name of a container in one of its two runtime slots (see
/// [`crate::node::Node::lxc_name`]): the prefix, as much of the id as fits in an
/// interface name, and `1` for the second slot. Ids are 10 characters and the prefix at
/// most 4, so in practice the whole id is used and names are unique. The slots need
/// different names because LXC tears a guest's veth down by name: a stopping guest in
/// one slot must not find (and delete) the veth of the guest now running in the other.
pub fn veth_name(cfg: &NetConfig, container_id: &str, slot: u8) -> String {
    let mut name = cfg.veth_prefix.clone();
    let suffix = if slot == 0 { "" } else { "1" };
    name.extend(
        container_id
            .chars()
            .take(IFNAME_MAX.saturating_sub(name.chars().count() + suffix.len())),
    );
    name.push_str(suffix);
    name
}

/// The LXC config keys for a container's network, in the order they go in the config.
/// LXC creates the veth pair, the host route to `ip` and the proxy neighbour entry for
/// the gateway itself, and removes them when the container stops.
pub fn lxc_config(cfg: &NetConfig, ip: Ipv4Addr, veth: &str) -> Vec<(String, String)> {
    [
        ("type", "veth".to_owned()),
        ("veth.mode", "router".to_owned()),
        ("veth.pair", veth.to_owned()),
        ("name", "eth0".to_owned()),
        ("flags", "up".to_owned()),
        ("ipv4.address", format!("{ip}/32")),
        ("ipv4.gateway", cfg.gateway.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("lxc.net.0.{k}"), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_an_empty_section() {
        let cfg = NetConfig::default();
        cfg.validate().unwrap();
        let parsed: NetConfig = toml::from_str("").unwrap();
        assert_eq!(parsed, cfg);
        assert_eq!(cfg.cidr.to_string(), "10.88.0.0/16");
        assert_eq!(cfg.gateway, Ipv4Addr::new(169, 254, 0, 1));
    }

    #[test]
    fn parses_every_key_and_rejects_unknown_ones() {
        let cfg: NetConfig = toml::from_str(
            r#"
            cidr = "10.5.0.0/24"
            gateway = "169.254.1.1"
            dns = ["9.9.9.9", "1.1.1.1"]
            table = "hearth2"
            veth_prefix = "hx"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.cidr.to_string(), "10.5.0.0/24");
        assert_eq!(cfg.dns.len(), 2);
        assert_eq!(cfg.table, "hearth2");
        cfg.validate().unwrap();
        assert!(toml::from_str::<NetConfig>("cdir = \"10.5.0.0/24\"").is_err());
    }

    #[test]
    fn validation() {
        let bad = |f: fn(&mut NetConfig)| {
            let mut cfg = NetConfig::default();
            f(&mut cfg);
            assert!(
                matches!(cfg.validate(), Err(NetError::Config(_))),
                "{cfg:?} should be rejected"
            );
        };
        bad(|c| c.veth_prefix = "hearth".into());
        bad(|c| c.veth_prefix = String::new());
        bad(|c| c.veth_prefix = "h*".into());
        bad(|c| c.veth_prefix = "HV".into());
        bad(|c| c.table = "a b".into());
        bad(|c| c.table = "1abc".into());
        bad(|c| c.table = String::new());
        bad(|c| c.cidr = "10.0.0.0/31".parse().unwrap());
        bad(|c| c.gateway = Ipv4Addr::new(10, 88, 0, 1));
        bad(|c| c.gateway = Ipv4Addr::UNSPECIFIED);
        bad(|c| c.dns = vec![Ipv4Addr::new(127, 0, 0, 53)]);

        let ok = NetConfig {
            veth_prefix: "hv01".into(),
            cidr: "10.0.0.0/30".parse().unwrap(),
            table: "hearth-test_1".into(),
            dns: vec![Ipv4Addr::new(10, 255, 255, 53)],
            ..NetConfig::default()
        };
        ok.validate().unwrap();
    }

    #[test]
    fn veth_names_fit_in_an_interface_name() {
        let mut cfg = NetConfig::default();
        assert_eq!(veth_name(&cfg, "abcdefghij", 0), "hvabcdefghij");
        assert_eq!(veth_name(&cfg, "abcdefghij", 1), "hvabcdefghij1");
        cfg.veth_prefix = "hvxy".into();
        assert_eq!(veth_name(&cfg, "abcdefghij", 0), "hvxyabcdefghij");
        assert_eq!(veth_name(&cfg, "abcdefghij", 1), "hvxyabcdefghij1");
        let long = veth_name(&cfg, "abcdefghijklmnopqrstuvwxyz", 0);
        assert_eq!(long, "hvxyabcdefghijk");
        assert_eq!(long.len(), IFNAME_MAX);
        let long = veth_name(&cfg, "abcdefghijklmnopqrstuvwxyz", 1);
        assert_eq!(long, "hvxyabcdefghij1");
        assert_eq!(long.len(), IFNAME_MAX);
    }

    #[test]
    fn lxc_keys_in_order() {
        let cfg = NetConfig::default();
        let keys = lxc_config(&cfg, Ipv4Addr::new(10, 88, 0, 2), "hvabcdefghij");
        let want = [
            ("lxc.net.0.type", "veth"),
            ("lxc.net.0.veth.mode", "router"),
            ("lxc.net.0.veth.pair", "hvabcdefghij"),
            ("lxc.net.0.name", "eth0"),
            ("lxc.net.0.flags", "up"),
            ("lxc.net.0.ipv4.address", "10.88.0.2/32"),
            ("lxc.net.0.ipv4.gateway", "169.254.0.1"),
        ];
        let got: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(got, want);
    }
}
