//! Length-prefixed frames: `u32` little-endian length, then a postcard-encoded message.
//!
//! [`FrameDecoder`] is sans-IO: feed it whatever bytes arrived, take whole messages out. A length
//! above the limit is refused before any of its bytes are buffered, and a body that does not decode
//! is a typed error — never a panic, whatever a peer sends.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// Bytes of the length prefix.
pub const PREFIX_BYTES: usize = 4;

/// A frame that cannot be accepted.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum FrameError {
    /// The announced length exceeds the limit.
    #[error("a frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        limit: u32,
    },
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message too large to frame (sender side).
    #[error("a message of {0} bytes cannot be framed")]
    Unframeable(usize),
}

/// Encodes `message` as one frame.
pub fn encode<M: Serialize>(message: &M) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::Unframeable(body.len()))?;
    let mut frame = Vec::with_capacity(PREFIX_BYTES + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    limit: u32,
    buffer: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `limit` bytes.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            buffer: Vec::new(),
        }
    }

    /// Appends bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next whole message, `None` if more bytes are needed. After an error the stream is
    /// unusable (its framing is lost) and should be closed.
    pub fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        let Some(prefix) = self.buffer.first_chunk::<PREFIX_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*prefix);
        if len > self.limit {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                limit: self.limit,
            });
        }
        let end = PREFIX_BYTES + len as usize;
        if self.buffer.len() < end {
            return Ok(None);
        }
        let message = postcard::from_bytes(&self.buffer[PREFIX_BYTES..end])
            .map_err(|e| FrameError::Malformed(e.to_string()));
        self.buffer.drain(..end);
        message.map(Some)
    }
}
