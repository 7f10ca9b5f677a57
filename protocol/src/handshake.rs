//! The handshake: who speaks which version, with which features, and proof that the
//! client holds the guest's secret.
//!
//! The preamble (magic + version) is raw bytes, not a postcard frame, so that a future
//! version can change every structure after it and still be told apart cleanly.

use serde::{Deserialize, Serialize};
use std::fmt;

/// First bytes of every connection.
pub const MAGIC: [u8; 4] = *b"HRTH";

/// Bumped on any incompatible change (anything but appending an enum variant).
pub const PROTOCOL_VERSION: u16 = 1;

/// Preamble length: magic plus little-endian version.
pub const PREAMBLE_LEN: usize = 6;

/// Feature bits, for capabilities that can be negotiated without a version bump.
pub mod features {
    /// The agent runs commands on a pseudo-terminal.
    pub const PTY: u64 = 1 << 0;
    /// The agent serves bulk file reads and writes over stream channels.
    pub const FILE_STREAMS: u64 = 1 << 1;
    /// Exec stdio can be attached as a raw stream.
    pub const EXEC_STREAMS: u64 = 1 << 2;
}

pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let v = PROTOCOL_VERSION.to_le_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1]]
}

/// Splits a received preamble. `None` if the magic is wrong (not our protocol at all).
pub fn parse_preamble(bytes: &[u8]) -> Option<u16> {
    if bytes.len() != PREAMBLE_LEN || bytes[..4] != MAGIC {
        return None;
    }
    Some(u16::from_le_bytes([bytes[4], bytes[5]]))
}

/// The guest's 32-byte secret. Provisioned by the host at create time; the agent reads it
/// from a file only root can read.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(pub [u8; 32]);

impl Secret {
    /// Accepts either 32 raw bytes or 64 hex digits (optionally followed by a newline), the
    /// two forms a provisioning script is likely to write.
    pub fn parse(bytes: &[u8]) -> Result<Secret, SecretError> {
        if bytes.len() == 32 {
            let mut s = [0u8; 32];
            s.copy_from_slice(bytes);
            return Ok(Secret(s));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| SecretError::Format)?;
        let text = text.trim();
        if text.len() != 64 {
            return Err(SecretError::Format);
        }
        let mut s = [0u8; 32];
        for (i, out) in s.iter_mut().enumerate() {
            *out =
                u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| SecretError::Format)?;
        }
        Ok(Secret(s))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Compares without an early exit, so timing does not reveal how many leading bytes
    /// of a guess were right.
    pub fn matches(&self, other: &Secret) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        // black_box keeps the optimiser from turning the loop into an early-exit compare.
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("a secret is 32 raw bytes or 64 hex digits")]
    Format,
}

/// Sent by the client right after the preamble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub features: u64,
    pub secret: Secret,
}

/// The agent's answer to the preamble and [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted {
        version: u16,
        /// Features both sides support (the intersection).
        features: u64,
        agent_version: String,
    },
    Refused(Refusal),
}

/// Why the agent turned a connection away. The agent closes the connection after sending
/// one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("protocol version {client} is not supported (agent speaks {agent})")]
    Version { client: u16, agent: u16 },
    #[error("wrong secret")]
    BadSecret,
    #[error("malformed handshake")]
    Malformed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_parses_raw_and_hex_and_refuses_junk() {
        let raw = [7u8; 32];
        let s = Secret::parse(&raw).unwrap();
        let hex = format!("{}\n", s.to_hex());
        assert_eq!(Secret::parse(hex.as_bytes()).unwrap(), s);
        assert!(Secret::parse(b"short").is_err());
        assert!(Secret::parse(&[b'z'; 64]).is_err());
        assert!(s.matches(&Secret(raw)));
        assert!(!s.matches(&Secret([8u8; 32])));
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn preamble_carries_version_and_rejects_foreign_magic() {
        assert_eq!(parse_preamble(&preamble()), Some(PROTOCOL_VERSION));
        assert_eq!(parse_preamble(b"GET / "), None);
    }
}
