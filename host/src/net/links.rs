//! Clean-up of the host-side network state a container leaves behind.
//!
//! LXC creates the veth pair, the host route to the container's address and the proxy
//! neighbour entry for the gateway, and deletes them when the container stops. After a
//! crash (of the container's monitor or of the whole daemon) they can remain, and a
//! stale route would send a reused address to a dead veth. The daemon's reconcile lists
//! [`leftover_links`] and calls [`release`] for those that belong to no running
//! container.
//!
//! Only things on the container's own veth are touched: a route to the same address on
//! another device may belong to whichever container has the address now.

use super::command::run;
use super::{NetConfig, NetError};
use serde::Deserialize;
use std::net::Ipv4Addr;

#[derive(Deserialize)]
struct Link {
    ifname: String,
}

#[derive(Deserialize)]
struct Route {
    dst: String,
    dev: Option<String>,
}

#[derive(Deserialize)]
struct Neighbour {
    dst: String,
}

/// Host links whose name starts with the veth prefix, i.e. the host ends of container
/// veths, running or not.
pub fn leftover_links(cfg: &NetConfig) -> Result<Vec<String>, NetError> {
    cfg.validate()?;
    Ok(links()?
        .into_iter()
        .filter(|name| name.starts_with(&cfg.veth_prefix))
        .collect())
}

/// Removes the proxy neighbour entry for the gateway on `veth`, the route to `ip/32` via
/// `veth` and `veth` itself, each only if present: calling it for a container that
/// stopped cleanly, or twice, is fine. Refuses a `veth` without the prefix, so a mix-up
/// cannot delete one of the host's own interfaces.
///
/// Deleting the link would take its route and neighbour entry with it; they are removed
/// explicitly first anyway so nothing depends on that ordering inside the kernel, and so
/// the route goes even if the link was already deleted by something racing with us.
pub fn release(cfg: &NetConfig, veth: &str, ip: Ipv4Addr) -> Result<(), NetError> {
    cfg.validate()?;
    if !veth.starts_with(&cfg.veth_prefix) || veth.len() <= cfg.veth_prefix.len() {
        return Err(NetError::Config(format!(
            "refusing to release {veth:?}: not a container veth (prefix {:?})",
            cfg.veth_prefix
        )));
    }
    if !links()?.iter().any(|l| l == veth) {
        // Routes and neighbour entries cannot outlive their device.
        return Ok(());
    }
    // LXC may be tearing the same veth down right now: a device that disappears
    // half-way is the outcome we want, not an error.
    match release_present(cfg, veth, ip) {
        Err(NetError::Command { stderr, .. }) if stderr.contains("Cannot find device") => Ok(()),
        other => other,
    }
}

/// Removes the route to `ip/32` via `veth` alone, so that another veth can take the
/// address (a restore booting the container in its other slot) while LXC's teardown
/// removes `veth` itself, and its neighbour entry, in its own time. One command, no
/// listing: a route that is already gone is the outcome wanted.
pub fn drop_route(cfg: &NetConfig, veth: &str, ip: Ipv4Addr) -> Result<(), NetError> {
    cfg.validate()?;
    let dst = format!("{ip}/32");
    match run("ip", &["route", "del", &dst, "dev", veth], None) {
        Err(NetError::Command { stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("No such process") =>
        {
            Ok(())
        }
        other => other.map(drop),
    }
}

fn release_present(cfg: &NetConfig, veth: &str, ip: Ipv4Addr) -> Result<(), NetError> {
    let gateway = cfg.gateway.to_string();
    let proxies: Vec<Neighbour> = json(&run(
        "ip",
        &["-j", "neigh", "show", "proxy", "dev", veth],
        None,
    )?)?;
    if proxies.iter().any(|n| n.dst == gateway) {
        run(
            "ip",
            &["neigh", "del", "proxy", &gateway, "dev", veth],
            None,
        )?;
    }
    let dst = format!("{ip}/32");
    let routes: Vec<Route> = json(&run("ip", &["-j", "route", "show", "exact", &dst], None)?)?;
    let ip_text = ip.to_string();
    if routes
        .iter()
        .any(|r| r.dev.as_deref() == Some(veth) && (r.dst == ip_text || r.dst == dst))
    {
        run("ip", &["route", "del", &dst, "dev", veth], None)?;
    }
    run("ip", &["link", "del", "dev", veth], None)?;
    Ok(())
}

fn links() -> Result<Vec<String>, NetError> {
    let links: Vec<Link> = json(&run("ip", &["-j", "link", "show"], None)?)?;
    Ok(links.into_iter().map(|l| l.ifname).collect())
}

/// Parses `ip -j` output. Some iproute2 versions print nothing at all instead of `[]`
/// when there is nothing to show.
fn json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<Vec<T>, NetError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| NetError::Command {
        cmd: "ip -j".to_owned(),
        stderr: format!("unexpected JSON output: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_json() {
        let routes: Vec<Route> = json(
            r#"[{"dst":"10.199.0.2","dev":"htx1","scope":"link","flags":[]},
                {"type":"unreachable","dst":"10.199.0.2","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(routes[0].dev.as_deref(), Some("htx1"));
        assert!(routes[1].dev.is_none());
        let n: Vec<Neighbour> = json(r#"[{"dst":"169.254.0.1","proxy":null}]"#).unwrap();
        assert_eq!(n[0].dst, "169.254.0.1");
        assert!(json::<Link>("\n").unwrap().is_empty());
        assert!(json::<Link>("not json").is_err());
    }

    #[test]
    fn refuses_foreign_links() {
        let cfg = NetConfig::default();
        for name in ["eth0", "hv", "lo"] {
            assert!(matches!(
                release(&cfg, name, Ipv4Addr::new(10, 88, 0, 2)),
                Err(NetError::Config(_))
            ));
        }
    }
}
