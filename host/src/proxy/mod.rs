//! The HTTPS front door: every kit service and every port a guest listens on has its own
//! host name under `{node}.{domain}`, and the proxy turns that name into a guest and a
//! stream to open on the guest's agent channel. Only the parsing of host names
//! ([`route`]) exists so far; the listener, the authorisation and the forwarding join it.

pub mod route;
