//! What the proxy keeps per client connection, so that the requests of a keep-alive
//! connection after its first repeat none of the first one's work: the
//! `X-Forwarded-For` value, the grant its credentials earned, the container its host
//! name resolved to, and the guest connection it used.

use super::forward::Pinned;
use crate::auth::ConnectionGrant;
use crate::store::ContainerRow;
use hyper::header::HeaderValue;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub struct Peer {
    pub ip: IpAddr,
    pub(super) forwarded_for: Option<HeaderValue>,
    pub(super) grant: ConnectionGrant,
    resolved: Mutex<Option<(String, Arc<ContainerRow>, Instant)>>,
    pinned: Mutex<Pinned>,
}

impl Peer {
    pub fn new(ip: IpAddr) -> Peer {
        Peer {
            ip,
            forwarded_for: HeaderValue::from_str(&ip.to_string()).ok(),
            grant: ConnectionGrant::default(),
            resolved: Mutex::new(None),
            pinned: Mutex::new(Pinned::Vacant),
        }
    }

    pub(super) fn pinned(&self) -> MutexGuard<'_, Pinned> {
        self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The container this connection last resolved `prefix` to, if that was less than
    /// `ttl` ago.
    pub(super) fn resolved(&self, prefix: &str, ttl: Duration) -> Option<Arc<ContainerRow>> {
        let last = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((p, c, at)) if p == prefix && at.elapsed() < ttl => Some(c.clone()),
            _ => None,
        }
    }

    pub(super) fn remember_resolved(&self, prefix: &str, c: Arc<ContainerRow>, at: Instant) {
        *self.resolved.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((prefix.to_string(), c, at));
    }

    /// Forgets the resolved container (it stopped answering: ask the store again).
    pub(super) fn forget_resolved(&self) {
        *self.resolved.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
