//! The hearth node control plane. This crate holds the host's client for guest agents
//! ([`agents`]) and the benchmarks; `hearthd`'s services join it as they are built.

pub mod agents;
pub mod auth;
pub mod bench;
pub mod config;
pub mod control;
pub mod net;
pub mod node;
pub mod pool;
pub mod proxy;
pub mod runtime;
pub mod store;
pub mod subid;
pub mod tls;
