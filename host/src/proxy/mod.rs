//! The HTTPS front door: every kit service and every port a guest listens on has its own
//! host name under `{node}.{domain}`; the proxy turns that name into a guest and a
//! stream to open on the guest's agent channel ([`route`], [`forward`]), after
//! authorisation ([`crate::auth`]), and keeps a per-container access log
//! ([`access_log`]). `api.{node}.{domain}` serves the REST API ([`server`]).

pub mod access_log;
pub mod forward;
pub mod peer;
pub mod route;
pub mod server;
