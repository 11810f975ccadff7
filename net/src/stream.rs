//! Messages and payloads over quinn streams: framed control messages on the bidirectional control
//! stream, and one unidirectional stream per large transfer — a [`StreamHeader`] frame followed by
//! exactly the bytes it announces. Every read is bounded: a frame above the control limit, a body
//! above the payload limit, a stream that ends early or runs on past its announced size is a
//! typed error.

use crate::framing::{self, FrameDecoder, FrameError, PREFIX_BYTES};
use crate::protocol::{BroadcastVector, ClientMessage, StreamHeader};
use quinn::{Connection, RecvStream, SendStream};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_core::{TaskId, UpdateMeta};
use std::time::Duration;
use thiserror::Error;

/// A stream that could not be read or written.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The connection or stream failed while reading.
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadError),
    /// The connection or stream failed while writing.
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    /// A stream could not be opened.
    #[error("opening a stream: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The stream was already finished or reset.
    #[error("the stream is closed")]
    Closed,
    /// A frame was oversized or malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A body larger than allowed was announced.
    #[error("a body of {announced} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced size.
        announced: u64,
        /// The limit.
        limit: u64,
    },
    /// The stream ended before the bytes it announced.
    #[error("truncated: {got} of {expected} bytes arrived")]
    Truncated {
        /// Announced.
        expected: u64,
        /// Received.
        got: u64,
    },
    /// More bytes followed the announced body.
    #[error("more bytes than the {expected} announced")]
    TrailingBytes {
        /// Announced.
        expected: u64,
    },
    /// A stream that is not the one expected.
    #[error("unexpected stream: {0}")]
    Unexpected(String),
    /// Nothing came in time.
    #[error("no {0} in time")]
    TimedOut(&'static str),
}

impl From<quinn::ClosedStream> for StreamError {
    fn from(_: quinn::ClosedStream) -> Self {
        StreamError::Closed
    }
}

impl From<quinn::ReadExactError> for StreamError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(got) => StreamError::Truncated {
                expected: 0,
                got: got as u64,
            },
            quinn::ReadExactError::ReadError(e) => StreamError::Read(e),
        }
    }
}

/// Writes one framed message.
pub async fn write_message<M: Serialize>(send: &mut SendStream, message: &M) -> Result<(), StreamError> {
    let frame = framing::encode(message)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads framed messages from a control stream.
#[derive(Debug)]
pub struct MessageReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl MessageReader {
    /// Reads `recv`, refusing frames over `limit` bytes.
    pub fn new(recv: RecvStream, limit: u32) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(limit),
            buf: vec![0; 16 * 1024],
        }
    }

    /// The next message; `None` when the peer finished the stream cleanly between messages.
    pub async fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, StreamError> {
        loop {
            if let Some(message) = self.decoder.next_message()? {
                return Ok(Some(message));
            }
            match self.recv.read(&mut self.buf).await? {
                Some(n) => self.decoder.push(&self.buf[..n]),
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => {
                    return Err(StreamError::Truncated {
                        expected: 0,
                        got: self.decoder.buffered() as u64,
                    });
                }
            }
        }
    }
}

/// Reads the header frame of a unidirectional stream, and not one byte more.
pub async fn read_header(recv: &mut RecvStream, limit: u32) -> Result<StreamHeader, StreamError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    recv.read_exact(&mut prefix).await?;
    let len = u32::from_le_bytes(prefix);
    if len > limit {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            limit,
        }
        .into());
    }
    let mut frame = vec![0u8; PREFIX_BYTES + len as usize];
    frame[..PREFIX_BYTES].copy_from_slice(&prefix);
    recv.read_exact(&mut frame[PREFIX_BYTES..]).await?;
    let mut decoder = FrameDecoder::new(limit);
    decoder.push(&frame);
    decoder.next_message()?.ok_or(StreamError::Truncated {
        expected: u64::from(len),
        got: 0,
    })
}

/// Reads exactly `len` bytes (at most `limit`) and checks that the stream ends there. Memory grows
/// with what arrives, not with what was announced.
pub async fn read_body(recv: &mut RecvStream, len: u64, limit: u64) -> Result<Vec<u8>, StreamError> {
    if len > limit {
        return Err(StreamError::TooLarge {
            announced: len,
            limit,
        });
    }
    let mut body = Vec::with_capacity(len.min(16 << 20) as usize);
    while (body.len() as u64) < len {
        let want = (len - body.len() as u64) as usize;
        match recv.read_chunk(want, true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(StreamError::Truncated {
                    expected: len,
                    got: body.len() as u64,
                });
            }
        }
    }
    expect_end(recv, len).await?;
    Ok(body)
}

/// Fills `out` exactly from the stream (zero-copy into the caller's buffer) and checks that the
/// stream ends there.
pub async fn read_body_into(recv: &mut RecvStream, out: &mut [u8]) -> Result<(), StreamError> {
    let expected = out.len() as u64;
    recv.read_exact(out)
        .await
        .map_err(|e| match StreamError::from(e) {
            StreamError::Truncated { got, .. } => StreamError::Truncated { expected, got },
            other => other,
        })?;
    expect_end(recv, expected).await
}

async fn expect_end(recv: &mut RecvStream, expected: u64) -> Result<(), StreamError> {
    match recv.read_chunk(1, true).await? {
        None => Ok(()),
        Some(_) => Err(StreamError::TrailingBytes { expected }),
    }
}

/// Opens a unidirectional stream, sends `header` and the `body` slices, and finishes it.
pub async fn send_stream(
    conn: &Connection,
    header: &StreamHeader,
    body: &[&[u8]],
) -> Result<(), StreamError> {
    let mut send = conn.open_uni().await?;
    write_message(&mut send, header).await?;
    for part in body {
        send.write_all(part).await?;
    }
    send.finish()?;
    Ok(())
}

/// The vectors of a model stream, in the order it announced them.
pub type ModelVectors = Vec<(BroadcastVector, Vec<f32>)>;

/// Accepts the model stream of `task` (within `wait`) and reads its vectors of `dim` values each
/// straight into their own memory. A stream for another task or dimension, without the model
/// first, or with more than the model and its three companion vectors is refused before anything
/// is allocated.
pub async fn read_model(
    conn: &Connection,
    task: TaskId,
    dim: usize,
    wait: Duration,
) -> Result<ModelVectors, StreamError> {
    let mut stream = tokio::time::timeout(wait, conn.accept_uni())
        .await
        .map_err(|_| StreamError::TimedOut("model stream"))??;
    let header = read_header(&mut stream, 1 << 16).await?;
    let StreamHeader::Model {
        task: sent_task,
        vectors,
        dim: sent_dim,
        ..
    } = header
    else {
        return Err(StreamError::Unexpected("expected a model stream".into()));
    };
    if sent_task != task
        || sent_dim != dim as u64
        || vectors.first() != Some(&BroadcastVector::Model)
        || vectors.len() > 4
    {
        return Err(StreamError::Unexpected(format!(
            "the model stream ({sent_task}, {} vectors of {sent_dim}) does not match {task} with {dim} parameters",
            vectors.len()
        )));
    }
    let mut values: Vec<Vec<f32>> = vectors.iter().map(|_| vec![0.0f32; dim]).collect();
    let count = values.len();
    for (i, v) in values.iter_mut().enumerate() {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(v.as_mut_slice());
        if i + 1 == count {
            read_body_into(&mut stream, bytes).await?;
        } else {
            stream.read_exact(bytes).await?;
        }
    }
    Ok(vectors.into_iter().zip(values).collect())
}

/// Announces an update on the control stream (`UpdateReady`) and sends its payloads, one per
/// uploaded vector, on their own stream.
pub async fn send_update(
    conn: &Connection,
    control: &mut SendStream,
    meta: &UpdateMeta,
    parts: &[&[u8]],
) -> Result<(), StreamError> {
    let payload_bytes = parts.iter().map(|p| p.len() as u64).sum();
    write_message(
        control,
        &ClientMessage::UpdateReady {
            meta: meta.clone(),
            payload_bytes,
        },
    )
    .await?;
    let header = StreamHeader::Update {
        task: meta.task,
        part_bytes: parts.iter().map(|p| p.len() as u64).collect(),
    };
    send_stream(conn, &header, parts).await
}
