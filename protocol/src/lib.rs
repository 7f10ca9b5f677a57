//! The wire between the hearth host and the agent inside each guest.
//!
//! A connection is: a 6-byte preamble (magic and version, so a mismatch is caught before
//! any structured decoding), a [`Hello`] frame carrying the guest's secret, then one
//! [`Open`] frame choosing what the connection is for — a multiplexed [`rpc`] channel or a
//! raw byte [`Stream`](channel::Open::Stream). A client may pipeline all three without
//! waiting, so a fresh connection costs one round trip.
//!
//! Compatibility rule: adding an enum variant at the end is the only compatible change.
//! Anything else bumps [`PROTOCOL_VERSION`].

pub mod channel;
pub mod endpoint;
pub mod error;
pub mod exec;
pub mod files;
pub mod frame;
pub mod handshake;
pub mod info;
pub mod rpc;

pub use channel::{Open, OpenReply, Opened, StreamTarget};
pub use endpoint::{Conn, Endpoint, EndpointError, Listener};
pub use error::{Error, ErrorKind};
pub use frame::{FrameError, FrameReader, FrameWriter, MAX_FRAME_LEN};
pub use handshake::{Hello, HelloReply, Refusal, Secret, PROTOCOL_VERSION};
pub use rpc::{ClientMsg, Event, Request, Response, ServerMsg};
