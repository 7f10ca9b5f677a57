//! Address allocation. Pure functions over the set of addresses in use: the daemon's
//! database is the source of truth for which addresses are taken, so there is no state
//! here to get out of sync with it.

use super::NetError;
use ipnet::Ipv4Net;
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// The lowest free address of `cidr`. Never the network or broadcast address (some
/// stacks treat them specially even on /32 links), nor the first host address, which is
/// kept back for the host in case it ever needs an address of its own in the range.
/// Lowest-first keeps addresses small and predictable and reuses freed ones.
pub fn allocate(cidr: Ipv4Net, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, NetError> {
    let network = u32::from(cidr.network());
    let broadcast = u32::from(cidr.broadcast());
    // A /31 or /32 has no room; `validate` rejects them but this stays total regardless.
    let first = network.saturating_add(2);
    (first..broadcast)
        .map(Ipv4Addr::from)
        .find(|a| !used.contains(a))
        .ok_or(NetError::Exhausted { cidr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn starts_after_the_reserved_address() {
        let a = allocate(net("10.88.0.0/16"), &HashSet::new()).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 88, 0, 2));
    }

    #[test]
    fn lowest_free_and_reuses_gaps() {
        let used: HashSet<_> = [
            Ipv4Addr::new(10, 88, 0, 2),
            Ipv4Addr::new(10, 88, 0, 3),
            Ipv4Addr::new(10, 88, 0, 5),
        ]
        .into();
        assert_eq!(
            allocate(net("10.88.0.0/16"), &used).unwrap(),
            Ipv4Addr::new(10, 88, 0, 4)
        );
    }

    #[test]
    fn crosses_octet_boundaries() {
        let cidr = net("10.88.0.0/16");
        let used: HashSet<_> = (2..=255).map(|i| Ipv4Addr::new(10, 88, 0, i)).collect();
        // 10.88.0.255 and 10.88.1.0 are ordinary host addresses inside a /16.
        assert_eq!(allocate(cidr, &used).unwrap(), Ipv4Addr::new(10, 88, 1, 0));
    }

    #[test]
    fn a_slash_29_holds_five_then_is_exhausted() {
        let cidr = net("192.168.7.8/29");
        let mut used = HashSet::new();
        for want in 10..=14 {
            let a = allocate(cidr, &used).unwrap();
            assert_eq!(a, Ipv4Addr::new(192, 168, 7, want));
            used.insert(a);
        }
        assert!(matches!(
            allocate(cidr, &used),
            Err(NetError::Exhausted { cidr: c }) if c == cidr
        ));
        used.remove(&Ipv4Addr::new(192, 168, 7, 12));
        assert_eq!(
            allocate(cidr, &used).unwrap(),
            Ipv4Addr::new(192, 168, 7, 12)
        );
    }

    #[test]
    fn ignores_a_host_cidr_and_tiny_ranges() {
        // Host bits set in the config: the range is still the whole network.
        let cidr = net("10.1.2.77/24");
        assert_eq!(
            allocate(cidr, &HashSet::new()).unwrap(),
            Ipv4Addr::new(10, 1, 2, 2)
        );
        assert_eq!(
            allocate(net("10.0.0.0/30"), &HashSet::new()).unwrap(),
            Ipv4Addr::new(10, 0, 0, 2)
        );
        for tiny in ["10.0.0.0/31", "10.0.0.0/32"] {
            assert!(allocate(net(tiny), &HashSet::new()).is_err());
        }
    }
}
