//! Framing: a `u32` little-endian body length, then a postcard body.
//!
//! The length is checked against a hard cap before any buffer grows, so a peer cannot make
//! us allocate by lying about a length. Bulk data never rides in frames: it goes over
//! stream channels, so the cap can stay small.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame body either side accepts. Exec output and small file reads are chunked
/// well below this; anything bigger belongs on a stream channel.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Frame size used by senders that chunk data (exec output, small reads) so that one
/// chunk plus its envelope always fits in a frame.
pub const MAX_CHUNK: usize = 256 * 1024;

const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames through its own buffer, so that many small frames cost one `read`.
///
/// When a connection switches from frames to raw bytes (a stream channel), whatever was
/// read ahead is handed back by [`FrameReader::into_parts`]; nothing is lost.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    pos: usize,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_FRAME_LEN)
    }

    /// Resumes reading frames from `inner` after `buffered`, bytes that an earlier reader
    /// had read ahead (see [`FrameReader::into_parts`]).
    pub fn from_parts(inner: R, buffered: Vec<u8>) -> Self {
        FrameReader {
            inner,
            buf: buffered,
            pos: 0,
            max: MAX_FRAME_LEN,
        }
    }

    pub fn with_limit(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            max,
        }
    }

    /// Reads exactly `n` raw bytes (used for the preamble, which precedes framing).
    /// Returns `None` on a clean EOF before the first byte.
    pub async fn read_raw(&mut self, n: usize) -> Result<Option<Vec<u8>>, FrameError> {
        if !self.fill(n).await? {
            return Ok(None);
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(Some(out))
    }

    /// Reads and decodes one frame. `Ok(None)` means the peer closed cleanly between
    /// frames.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if !self.fill(4).await? {
            return Ok(None);
        }
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&self.buf[self.pos..self.pos + 4]);
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if !self.fill(4 + len).await? {
            return Err(FrameError::Truncated);
        }
        let body = &self.buf[self.pos + 4..self.pos + 4 + len];
        let value = postcard::from_bytes(body)?;
        self.pos += 4 + len;
        Ok(Some(value))
    }

    /// Makes sure `n` unconsumed bytes are buffered. `Ok(false)` on EOF with nothing
    /// buffered; `Truncated` on EOF with a partial unit.
    async fn fill(&mut self, n: usize) -> Result<bool, FrameError> {
        if self.buf.len() - self.pos >= n {
            return Ok(true);
        }
        // Compact so the buffer only ever holds one partial frame plus read-ahead.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        while self.buf.len() < n {
            // `read_buf` fills spare capacity without zeroing it first.
            let want = (n - self.buf.len()).max(READ_CHUNK);
            self.buf.reserve(want);
            let got = self.inner.read_buf(&mut self.buf).await?;
            if got == 0 {
                return if self.buf.is_empty() {
                    Ok(false)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
        Ok(true)
    }

    /// The underlying reader and the bytes already read from it but not consumed.
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        self.buf.drain(..self.pos);
        (self.inner, self.buf)
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Encodes frames into a reused buffer and writes each with a single `write_all`.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Appends one frame to the pending buffer without writing it, so several frames can
    /// go out in one syscall with [`FrameWriter::flush`].
    pub fn push<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        encode_into(&mut self.buf, msg)
    }

    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if !self.buf.is_empty() {
            let res = self.inner.write_all(&self.buf).await;
            self.buf.clear();
            res?;
        }
        Ok(())
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.push(msg)?;
        self.flush().await
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Appends `msg` as one frame to `buf`. Refuses to produce a frame the peer would reject.
pub fn encode_into<T: Serialize>(buf: &mut Vec<u8>, msg: &T) -> Result<(), FrameError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 4]);
    let res = postcard::to_io(msg, &mut *buf).map(|_| ());
    if let Err(e) = res {
        buf.truncate(start);
        return Err(e.into());
    }
    let len = buf.len() - start - 4;
    if len > MAX_FRAME_LEN {
        buf.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // The cap above is far below u32::MAX, so the cast is lossless.
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Encodes one frame into a fresh buffer.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    encode_into(&mut buf, msg)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{ClientMsg, Request};

    #[tokio::test]
    async fn round_trips_pipelined_frames() {
        let mut bytes = Vec::new();
        for id in 0..100u64 {
            encode_into(
                &mut bytes,
                &ClientMsg::Call {
                    id,
                    req: Request::Ping,
                },
            )
            .unwrap();
        }
        bytes.extend_from_slice(b"raw tail");
        let mut r = FrameReader::new(&bytes[..]);
        for id in 0..100u64 {
            let msg: ClientMsg = r.read().await.unwrap().unwrap();
            assert_eq!(
                msg,
                ClientMsg::Call {
                    id,
                    req: Request::Ping
                }
            );
        }
        let (_, rest) = r.into_parts();
        assert_eq!(rest, b"raw tail");
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let bytes = u32::MAX.to_le_bytes();
        let mut r = FrameReader::new(&bytes[..]);
        let err = r.read::<ClientMsg>().await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(r.buf.capacity() <= READ_CHUNK + 4);
    }

    #[tokio::test]
    async fn eof_between_frames_is_clean_and_inside_is_truncated() {
        let mut r = FrameReader::new(&[][..]);
        assert!(r.read::<ClientMsg>().await.unwrap().is_none());
        let frame = encode(&ClientMsg::Cancel { id: 7 }).unwrap();
        let mut r = FrameReader::new(&frame[..frame.len() - 1]);
        assert!(matches!(
            r.read::<ClientMsg>().await,
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn encoder_refuses_frames_over_the_cap() {
        let big = Request::WriteFile {
            path: "/x".into(),
            data: vec![0; MAX_FRAME_LEN + 1],
            opts: Default::default(),
        };
        assert!(matches!(
            encode(&ClientMsg::Call { id: 1, req: big }),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
