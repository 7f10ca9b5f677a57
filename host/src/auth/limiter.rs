//! Failed-credential rate limiting, per client address, in memory.
//!
//! A sliding window: a client that failed `max_failures` times within the last `window`
//! is refused until its oldest failure in the window ages out. Only presented-but-wrong
//! credentials count (a guessed token, a forged or stale link); a browser that simply
//! has none yet is not guessing. Memory is bounded: past `max_clients` addresses the
//! ones that failed longest ago are forgotten first, so a flood of addresses costs at
//! most that many entries.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct Limiter {
    max_failures: usize,
    window: Duration,
    max_clients: usize,
    clients: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// An IPv6 client usually owns a whole /64, so counting per address would give it 2^64
/// fresh allowances; an IPv4-mapped address is the IPv4 client it maps.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Limiter {
    pub(crate) fn new(max_failures: usize, window: Duration, max_clients: usize) -> Limiter {
        Limiter {
            max_failures: max_failures.max(1),
            window,
            max_clients: max_clients.max(1),
            clients: Mutex::default(),
        }
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, VecDeque<Instant>>> {
        // A panic mid-update leaves at worst a stale count; keep limiting.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(retry_after)` while `ip` is over its allowance.
    pub(crate) fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = client_key(ip);
        let mut clients = self.clients();
        let Some(failures) = clients.get_mut(&key) else {
            return Ok(());
        };
        self.expire(failures, now);
        if failures.is_empty() {
            clients.remove(&key);
            return Ok(());
        }
        if failures.len() < self.max_failures {
            return Ok(());
        }
        // Invariant: not empty (checked above).
        let oldest = failures.front().copied().unwrap_or(now);
        Err((oldest + self.window).saturating_duration_since(now))
    }

    pub(crate) fn record_failure(&self, ip: IpAddr, now: Instant) {
        let key = client_key(ip);
        let mut clients = self.clients();
        if !clients.contains_key(&key) && clients.len() >= self.max_clients {
            self.evict(&mut clients, now);
        }
        let failures = clients.entry(key).or_default();
        self.expire(failures, now);
        failures.push_back(now);
        // More than the allowance changes nothing, so it need not be kept.
        while failures.len() > self.max_failures {
            failures.pop_front();
        }
    }

    fn expire(&self, failures: &mut VecDeque<Instant>, now: Instant) {
        while failures
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            failures.pop_front();
        }
    }

    /// Makes room: first whatever has aged out, then (still full) the tenth of the
    /// clients whose last failure is oldest, so the O(n) pass runs once per n/10 new
    /// addresses rather than for each.
    fn evict(&self, clients: &mut HashMap<IpAddr, VecDeque<Instant>>, now: Instant) {
        clients.retain(|_, failures| {
            self.expire(failures, now);
            !failures.is_empty()
        });
        if clients.len() < self.max_clients {
            return;
        }
        let mut last: Vec<(Instant, IpAddr)> = clients
            .iter()
            .filter_map(|(ip, f)| f.back().map(|&t| (t, *ip)))
            .collect();
        let drop = (self.max_clients / 10).max(1).min(last.len());
        last.select_nth_unstable(drop - 1);
        for (_, ip) in &last[..drop] {
            clients.remove(ip);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.clients().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const WINDOW: Duration = Duration::from_secs(60);

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn window_slides() {
        let l = Limiter::new(3, WINDOW, 100);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in [0, 10, 20] {
            assert!(l.check(ip(1), at(s)).is_ok());
            l.record_failure(ip(1), at(s));
        }
        // Three failures in the window: refused until the first one is 60 s old.
        assert_eq!(l.check(ip(1), at(30)), Err(Duration::from_secs(30)));
        assert!(
            l.check(ip(2), at(30)).is_ok(),
            "other clients are not affected"
        );
        assert_eq!(l.check(ip(1), at(59)), Err(Duration::from_secs(1)));
        assert!(l.check(ip(1), at(60)).is_ok());
        l.record_failure(ip(1), at(60));
        // 10, 20 and 60 are in the window now; 10 ages out at 70.
        assert_eq!(l.check(ip(1), at(65)), Err(Duration::from_secs(5)));
        assert!(l.check(ip(1), at(70)).is_ok());
        // Everything aged out: the entry is dropped.
        assert!(l.check(ip(1), at(200)).is_ok());
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let l = Limiter::new(2, WINDOW, 100);
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        l.record_failure(a, now);
        l.record_failure(b, now);
        assert!(l.check(a, now).is_err());
        assert!(l.check(other, now).is_ok());

        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        l.record_failure(v4, now);
        l.record_failure(mapped, now);
        assert!(l.check(v4, now).is_err());
    }

    #[test]
    fn memory_is_bounded_and_the_stalest_go_first() {
        let l = Limiter::new(2, WINDOW, 100);
        let t0 = Instant::now();
        for n in 0..100 {
            l.record_failure(ip(n), t0 + Duration::from_millis(u64::from(n)));
        }
        assert_eq!(l.len(), 100);
        let late = t0 + Duration::from_secs(1);
        l.record_failure(ip(500), late);
        l.record_failure(ip(500), late);
        assert!(l.len() <= 100);
        assert!(l.check(ip(500), late).is_err(), "the newcomer is counted");
        // The ten oldest were evicted, the most recent kept.
        let kept = l.clients();
        assert!(!kept.contains_key(&ip(0)));
        assert!(kept.contains_key(&ip(99)));
        drop(kept);

        // Aged-out entries are dropped before anyone still counting.
        let l = Limiter::new(2, WINDOW, 3);
        for n in 1..=3 {
            l.record_failure(ip(n), t0);
        }
        l.record_failure(ip(4), t0 + Duration::from_secs(120));
        assert_eq!(l.len(), 1);
    }
}
