//! Container networking against the real kernel: hearth's nftables table, the clean-up of
//! leftover links, and an end-to-end isolation check that rebuilds LXC's veth "router"
//! mode by hand in network namespaces (no LXC, no images needed). Needs root; skipped
//! with a message otherwise.
//!
//! Everything is named after this process (table `hearth-test-<pid>...`, veth prefix
//! `ht`, netns `htest-*-<pid>`, an address range derived from the pid) so a hearth node
//! on the same machine is not touched, and a guard undoes every step even when an
//! assertion fails. The tests share the `ht` prefix, so they run one at a time: a table
//! one test installs would otherwise filter another test's links.

use hearth_host::net::{firewall, links, NetConfig, NetError};
use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// Long enough for a SYN and its answer between namespaces on a loaded CI machine; a
/// dropped SYN costs exactly this, and the probes run in parallel.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

fn pid() -> u32 {
    std::process::id()
}

/// The third octet of the test ranges, so two test processes rarely share addresses.
fn octet() -> u8 {
    // Invariant: `% 250 + 1` is at most 250.
    u8::try_from(pid() % 250 + 1).expect("fits in a u8")
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: the network tests need root");
    false
}

fn test_cfg(suffix: &str) -> NetConfig {
    NetConfig {
        cidr: format!("10.199.{}.0/24", octet()).parse().unwrap(),
        table: format!("hearth-test-{}{suffix}", pid()),
        veth_prefix: "ht".into(),
        ..NetConfig::default()
    }
}

/// Runs a command; `Err` carries its stderr.
fn try_run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn run(args: &[&str]) -> String {
    try_run(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Commands run on drop, last first, failures ignored: undoes whatever part of a setup
/// happened before a panic.
#[derive(Default)]
struct Undo(Vec<Vec<String>>);

impl Undo {
    fn push(&mut self, args: &[&str]) {
        self.0.push(args.iter().map(|s| s.to_string()).collect());
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for cmd in self.0.iter().rev() {
            let _ = Command::new(&cmd[0]).args(&cmd[1..]).output();
        }
    }
}

fn table_listing(table: &str) -> Option<String> {
    try_run(&["nft", "list", "table", "inet", table]).ok()
}

fn table_count(table: &str) -> usize {
    let want = format!("table inet {table}");
    run(&["nft", "list", "tables"])
        .lines()
        .filter(|l| l.trim() == want)
        .count()
}

#[test]
fn ensure_is_idempotent_and_remove_removes() {
    if !is_root() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = test_cfg("");
    let mut undo = Undo::default();
    undo.push(&["nft", "delete", "table", "inet", &cfg.table]);

    firewall::ensure(&cfg).unwrap();
    let first = table_listing(&cfg.table).expect("table exists after ensure");
    firewall::ensure(&cfg).unwrap();
    let second = table_listing(&cfg.table).expect("table exists after the second ensure");

    assert_eq!(table_count(&cfg.table), 1);
    assert_eq!(first, second, "a second ensure changed the rules");
    for chain in ["chain forward {", "chain input {", "chain postrouting {"] {
        assert_eq!(second.matches(chain).count(), 1, "{chain}\n{second}");
    }
    assert_eq!(second.matches("chain ").count(), 3, "{second}");
    assert_eq!(
        second.matches("iifname \"ht*\" drop").count(),
        1,
        "{second}"
    );
    assert!(second.contains(&format!(
        "ip saddr {} oifname != \"ht*\" masquerade",
        cfg.cidr
    )));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );

    firewall::remove(&cfg).unwrap();
    assert_eq!(table_count(&cfg.table), 0);
    firewall::remove(&cfg).unwrap();

    // A broken config never reaches nft.
    let bad = NetConfig {
        table: "no spaces".into(),
        ..cfg.clone()
    };
    assert!(matches!(firewall::ensure(&bad), Err(NetError::Config(_))));
}

#[test]
fn release_cleans_up_only_the_containers_own_things() {
    if !is_root() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = test_cfg("-rel");
    let (r, q) = (format!("htr{}", pid()), format!("htq{}", pid()));
    let ip = Ipv4Addr::new(10, 199, octet(), 250);
    let other_ip = Ipv4Addr::new(10, 199, octet(), 251);
    let mut undo = Undo::default();

    // Nothing there at all.
    links::release(&cfg, &format!("htnone{}", pid()), ip).unwrap();
    assert!(matches!(
        links::release(&cfg, "lo", ip),
        Err(NetError::Config(_))
    ));

    // What LXC leaves after a crash: the veth, a host route and the
    // gateway's proxy neighbour entry. `q` holds the route to another address, as if a
    // second container used it.
    for name in [&r, &q] {
        undo.push(&["ip", "link", "del", name]);
        // A veth pair rather than a dummy: kernels without the dummy module exist.
        run(&[
            "ip",
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{name}p"),
        ]);
        run(&["ip", "link", "set", name, "up"]);
    }
    run(&["ip", "route", "add", &format!("{ip}/32"), "dev", &r]);
    run(&[
        "ip",
        "neigh",
        "add",
        "proxy",
        &GATEWAY.to_string(),
        "dev",
        &r,
    ]);
    run(&["ip", "route", "add", &format!("{other_ip}/32"), "dev", &q]);
    run(&[
        "ip",
        "neigh",
        "add",
        "proxy",
        &GATEWAY.to_string(),
        "dev",
        &q,
    ]);

    let leftovers = links::leftover_links(&cfg).unwrap();
    assert!(
        leftovers.contains(&r) && leftovers.contains(&q),
        "{leftovers:?}"
    );
    assert!(
        leftovers.iter().all(|l| l.starts_with("ht")),
        "{leftovers:?}"
    );

    links::release(&cfg, &r, ip).unwrap();
    assert!(
        try_run(&["ip", "link", "show", "dev", &r]).is_err(),
        "{r} remains"
    );
    assert_eq!(
        run(&["ip", "route", "show", "exact", &format!("{ip}/32")]).trim(),
        "",
        "route remains"
    );
    assert!(!run(&["ip", "neigh", "show", "proxy"]).contains(&format!("dev {r} ")));
    // The other device's route and entry are untouched, even when released with its IP.
    links::release(&cfg, &r, other_ip).unwrap();
    assert!(run(&["ip", "route", "show", "exact", &format!("{other_ip}/32")]).contains(&q));
    assert!(run(&["ip", "neigh", "show", "proxy", "dev", &q]).contains(&GATEWAY.to_string()));
    assert!(!links::leftover_links(&cfg).unwrap().contains(&r));

    // Twice is fine.
    links::release(&cfg, &r, ip).unwrap();
    links::release(&cfg, &q, other_ip).unwrap();
    assert!(try_run(&["ip", "link", "show", "dev", &q]).is_err());
}

/// A namespace with a veth to the root namespace, set up like LXC's router mode does it.
struct Guest {
    netns: String,
    veth: String,
    ip: Ipv4Addr,
}

/// The container side as LXC configures it: a /32 on eth0, an on-link route to the
/// gateway, a default route through it. The host side as LXC does it: link up, forwarding
/// on the veth, a route to the container's /32 and a proxy neighbour entry so the host
/// answers the container's ARP for the gateway. (No proxy_arp sysctl: LXC does not set it
/// for IPv4 and the proxy entry alone suffices.)
fn add_guest(undo: &mut Undo, tag: char, host_byte: u8) -> Guest {
    let netns = format!("htest-{tag}-{}", pid());
    let veth = format!("ht{tag}{}", pid());
    let ip = Ipv4Addr::new(10, 199, octet(), host_byte);
    add_netns_with_veth(undo, &netns, &veth);
    let ns = |args: &[&str]| {
        let mut full = vec!["ip", "-n", &netns];
        full.extend_from_slice(args);
        run(&full)
    };
    ns(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    ns(&[
        "route",
        "add",
        &GATEWAY.to_string(),
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    ns(&[
        "route",
        "add",
        "default",
        "via",
        &GATEWAY.to_string(),
        "dev",
        "eth0",
    ]);
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{veth}/forwarding"), "1").unwrap();
    run(&[
        "ip",
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        &veth,
        "scope",
        "link",
    ]);
    run(&[
        "ip",
        "neigh",
        "add",
        "proxy",
        &GATEWAY.to_string(),
        "dev",
        &veth,
    ]);
    Guest { netns, veth, ip }
}

/// A namespace whose `eth0` is paired with `veth` in the root namespace, both up, IPv6
/// DAD off so link-local addresses are usable at once.
fn add_netns_with_veth(undo: &mut Undo, netns: &str, veth: &str) {
    undo.push(&["ip", "netns", "del", netns]);
    run(&["ip", "netns", "add", netns]);
    undo.push(&["ip", "link", "del", veth]);
    run(&[
        "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    if ipv6() {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{veth}/accept_dad"), "0");
        let _ = try_run(&[
            "ip",
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.eth0.accept_dad=0",
        ]);
    }
    run(&["ip", "-n", netns, "link", "set", "lo", "up"]);
    run(&["ip", "-n", netns, "link", "set", "eth0", "up"]);
    run(&["ip", "link", "set", veth, "up"]);
}

fn ipv6() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// The usable (not tentative) IPv6 link-local address of `dev` (in `netns` if given),
/// waiting a little for it to appear.
fn link_local(netns: Option<&str>, dev: &str) -> Option<Ipv6Addr> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut args = vec!["ip"];
        if let Some(ns) = netns {
            args.extend(["-n", ns]);
        }
        args.extend(["-6", "-o", "addr", "show", "dev", dev, "scope", "link"]);
        let text = try_run(&args).unwrap_or_default();
        let found = text
            .lines()
            .filter(|l| !l.contains("tentative"))
            .find_map(|l| {
                let addr = l.split_whitespace().nth(3)?;
                addr.split('/').next()?.parse().ok()
            });
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The root namespace's own IPv4 addresses, loopback excluded (a container's 127.0.0.1
/// is its own).
fn host_ipv4_addrs() -> Vec<Ipv4Addr> {
    run(&["ip", "-o", "-4", "addr", "show"])
        .lines()
        .filter_map(|l| {
            let addr = l.split_whitespace().nth(3)?;
            addr.split('/').next()?.parse::<Ipv4Addr>().ok()
        })
        .filter(|a| !a.is_loopback())
        .collect()
}

/// Runs `f` on a thread that has joined network namespace `netns` (the root namespace
/// when `None`). Network namespaces are per thread, so the rest of the test is unaffected.
fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = netns.map(|n| format!("/run/netns/{n}"));
    std::thread::spawn(move || {
        if let Some(path) = path {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        }
        f()
    })
}

fn listen_in(netns: Option<&str>, addr: &str) -> TcpListener {
    let addr = addr.to_owned();
    in_netns(netns, move || {
        TcpListener::bind(addr.as_str()).expect("bind listener")
    })
    .join()
    .expect("listener thread")
}

/// A TCP connection attempt and whether it should succeed.
struct Probe {
    what: String,
    from: Option<String>,
    to: Target,
    expect: bool,
}

#[derive(Clone)]
enum Target {
    V4(SocketAddr),
    /// A link-local address, scoped to the prober's `eth0`.
    LinkLocal(Ipv6Addr, u16),
}

fn probe(what: impl Into<String>, from: Option<&str>, to: Target, expect: bool) -> Probe {
    Probe {
        what: what.into(),
        from: from.map(str::to_owned),
        to,
        expect,
    }
}

/// Runs every probe in parallel (a dropped SYN costs the whole timeout) and fails the
/// test listing each one that did not go as expected.
fn check(probes: Vec<Probe>) {
    let handles: Vec<_> = probes
        .into_iter()
        .map(|p| {
            let to = p.to.clone();
            let h = in_netns(p.from.as_deref(), move || {
                let addr = match to {
                    Target::V4(a) => a,
                    Target::LinkLocal(a, port) => {
                        // SAFETY: a valid NUL-terminated name; the lookup is done in this
                        // thread's network namespace, where the probe runs.
                        let scope = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
                        SocketAddr::V6(SocketAddrV6::new(a, port, 0, scope))
                    }
                };
                (addr, TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
            });
            (p, h)
        })
        .collect();
    let mut wrong = Vec::new();
    for (p, h) in handles {
        let (addr, result) = h.join().expect("probe thread");
        let from = p.from.as_deref().unwrap_or("host");
        match (&result, p.expect) {
            (Ok(_), true) => {}
            (Err(_), false) => {}
            (Ok(_), false) => wrong.push(format!(
                "{}: {from} -> {addr} connected but must not",
                p.what
            )),
            (Err(e), true) => wrong.push(format!("{}: {from} -> {addr} failed: {e}", p.what)),
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// The peer address of the next connection `listener` accepts.
fn accepted_peer(listener: &TcpListener) -> SocketAddr {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match listener.accept() {
            Ok((_, peer)) => return peer,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn v4(ip: Ipv4Addr, port: u16) -> Target {
    Target::V4(SocketAddr::from((ip, port)))
}

#[test]
fn containers_reach_out_but_not_each_other_or_the_host() {
    if !is_root() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = test_cfg("-e2e");
    let mut undo = Undo::default();
    undo.push(&["nft", "delete", "table", "inet", &cfg.table]);

    let a = add_guest(&mut undo, 'a', 2);
    let b = add_guest(&mut undo, 'b', 3);
    // An outside machine (the internet, or a LAN neighbour that routes the container
    // range at this host) on an ordinary interface that does not carry the prefix.
    let outside_ns = format!("htest-c-{}", pid());
    let outside_link = format!("hxc{}", pid());
    let outside_host_ip = Ipv4Addr::new(10, 198, octet(), 1);
    let outside_ip = Ipv4Addr::new(10, 198, octet(), 2);
    add_netns_with_veth(&mut undo, &outside_ns, &outside_link);
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{outside_host_ip}/24"),
        "dev",
        &outside_link,
    ]);
    run(&[
        "ip",
        "-n",
        &outside_ns,
        "addr",
        "add",
        &format!("{outside_ip}/24"),
        "dev",
        "eth0",
    ]);
    run(&[
        "ip",
        "-n",
        &outside_ns,
        "route",
        "add",
        "default",
        "via",
        &outside_host_ip.to_string(),
    ]);

    let host_v4 = listen_in(None, "0.0.0.0:0");
    let host_port = host_v4.local_addr().unwrap().port();
    let in_b = listen_in(Some(&b.netns), "0.0.0.0:0");
    let b_port = in_b.local_addr().unwrap().port();
    let outside = listen_in(Some(&outside_ns), "0.0.0.0:0");
    let outside_port = outside.local_addr().unwrap().port();
    // The host's IPv6 link-local address on A's veth: on the same link as A, so reachable
    // unless the (inet) table drops it.
    let host_v6 = if ipv6() {
        let ll = link_local(None, &a.veth);
        let a_ll = link_local(Some(&a.netns), "eth0");
        match (ll, a_ll) {
            (Some(ll), Some(_)) => {
                let l = listen_in(None, "[::]:0");
                let port = l.local_addr().unwrap().port();
                Some((l, ll, port))
            }
            _ => {
                eprintln!("note: no IPv6 link-local addresses; skipping the IPv6 probes");
                None
            }
        }
    } else {
        None
    };
    let host_addrs = host_ipv4_addrs();
    assert!(
        host_addrs.contains(&outside_host_ip),
        "host addresses {host_addrs:?}"
    );

    firewall::ensure(&cfg).unwrap();

    let an = Some(a.netns.as_str());
    let mut probes = vec![
        probe("container to container", an, v4(b.ip, b_port), false),
        probe(
            "container to the gateway address",
            an,
            v4(GATEWAY, host_port),
            false,
        ),
        probe(
            "host to container (the host's proxy)",
            None,
            v4(b.ip, b_port),
            true,
        ),
        probe("container egress", an, v4(outside_ip, outside_port), true),
        probe(
            "unsolicited from outside to a container",
            Some(&outside_ns),
            v4(b.ip, b_port),
            false,
        ),
    ];
    for addr in &host_addrs {
        probes.push(probe(
            format!("container to the host at {addr}"),
            an,
            v4(*addr, host_port),
            false,
        ));
    }
    if let Some((_, ll, port)) = &host_v6 {
        probes.push(probe(
            "container to the host's IPv6 link-local",
            an,
            Target::LinkLocal(*ll, *port),
            false,
        ));
    }
    check(probes);
    assert_eq!(
        accepted_peer(&outside).ip(),
        outside_host_ip,
        "egress is not masqueraded behind the host"
    );

    // Control: without the table the same paths are open, so the failures above were the
    // table's doing and not an artefact of the setup.
    firewall::remove(&cfg).unwrap();
    assert!(table_listing(&cfg.table).is_none());
    let mut probes = vec![
        probe("container to container", an, v4(b.ip, b_port), true),
        probe(
            "container to outside",
            an,
            v4(outside_ip, outside_port),
            true,
        ),
        probe(
            "outside to a container",
            Some(&outside_ns),
            v4(b.ip, b_port),
            true,
        ),
    ];
    for addr in &host_addrs {
        probes.push(probe(
            format!("container to the host at {addr}"),
            an,
            v4(*addr, host_port),
            true,
        ));
    }
    if let Some((_, ll, port)) = &host_v6 {
        probes.push(probe(
            "container to the host's IPv6 link-local",
            an,
            Target::LinkLocal(*ll, *port),
            true,
        ));
    }
    check(probes);
    assert_eq!(accepted_peer(&outside).ip(), a.ip, "NAT without the table?");
}

#[test]
fn resolv_conf_from_the_host() {
    // Depends on the machine's resolver set-up, so only what holds everywhere is checked:
    // either nameservers a container can use, or an error telling the operator what to set.
    match hearth_host::net::resolv_conf(&NetConfig::default()) {
        Ok(text) => {
            let servers: Vec<Ipv4Addr> = text
                .lines()
                .filter_map(|l| l.strip_prefix("nameserver ")?.parse().ok())
                .collect();
            assert!((1..=3).contains(&servers.len()), "{text}");
            assert!(servers.iter().all(|s| !s.is_loopback()), "{text}");
        }
        Err(NetError::Config(msg)) => assert!(msg.contains("set dns"), "{msg}"),
        Err(e) => panic!("{e}"),
    }
}
