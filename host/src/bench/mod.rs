//! `hearth bench`: measures what the host↔agent path costs next to the bare kernel
//! primitives it is built on, so a regression shows up as a ratio rather than as an
//! absolute number that depends on the machine.

pub mod agent;
pub mod dbload;
pub mod floor;
pub mod lifecycle;
pub mod placement;
pub mod proxy;
pub mod snapshots;
pub mod stats;

pub use agent::{run_agent_bench, AgentBenchOptions};
pub use floor::run_floor_peer;
