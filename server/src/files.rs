//! Files that must survive `kill -9` (written through `shoal_core::durable`: a reader sees the old
//! file or the whole new one, never a torn write), with the server's errors. Model states are
//! stored as raw little-endian f32 behind a small header.

use serde::{Deserialize, Serialize};
use shoal_aggregators::ServerState;
use shoal_core::durable::{self, DurableError};
use std::fs;
use std::path::Path;
use thiserror::Error;

#[cfg(target_endian = "big")]
compile_error!("model files and wire payloads are little-endian f32 viewed in place");

/// Errors reading or writing durable files.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what its index says (damaged or replaced).
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl From<DurableError> for FileError {
    fn from(e: DurableError) -> Self {
        FileError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Writes `parts` back to back to `path` atomically and durably.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), FileError> {
    Ok(durable::write_atomic(path, parts)?)
}

/// Makes a directory's entries (a rename, a removal) durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    Ok(durable::sync_dir(dir)?)
}

pub use durable::content_hash;

/// Reads a whole file and checks its hash.
pub fn read_checked(path: &Path, hash: u64) -> Result<Vec<u8>, FileError> {
    let bytes = fs::read(path).map_err(io(path))?;
    if content_hash(&[&bytes]) != hash {
        return Err(FileError::Corrupt {
            path: path.display().to_string(),
            reason: "content does not match the hash in the index".into(),
        });
    }
    Ok(bytes)
}

const STATE_MAGIC: &[u8; 8] = b"SHOALMS1";

/// Which vectors a stored server state holds.
#[derive(Debug, Serialize, Deserialize)]
struct StateHeader {
    dim: u64,
    c: bool,
    g: bool,
    momentum: bool,
    x_prev: bool,
}

/// Encodes a server state as bytes: magic, length-prefixed postcard header, then each vector.
pub fn encode_state(state: &ServerState) -> Vec<u8> {
    let header = StateHeader {
        dim: state.x.len() as u64,
        c: state.c.is_some(),
        g: state.g.is_some(),
        momentum: state.momentum.is_some(),
        x_prev: state.x_prev.is_some(),
    };
    let header = postcard::to_stdvec(&header).unwrap_or_default();
    let vectors = [
        Some(&state.x),
        state.c.as_ref(),
        state.g.as_ref(),
        state.momentum.as_ref(),
        state.x_prev.as_ref(),
    ];
    let mut out =
        Vec::with_capacity(16 + header.len() + vectors.iter().flatten().count() * state.x.len() * 4);
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for v in vectors.into_iter().flatten() {
        out.extend_from_slice(bytemuck::cast_slice(v));
    }
    out
}

/// Decodes what [`encode_state`] wrote.
pub fn decode_state(bytes: &[u8], what: &Path) -> Result<ServerState, FileError> {
    let corrupt = |reason: &str| FileError::Corrupt {
        path: what.display().to_string(),
        reason: reason.into(),
    };
    let rest = bytes
        .strip_prefix(STATE_MAGIC)
        .ok_or_else(|| corrupt("not a Shoal model state"))?;
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("truncated header"))?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(corrupt("truncated header"));
    }
    let (header, mut body) = rest.split_at(len);
    let header: StateHeader = postcard::from_bytes(header).map_err(|_| corrupt("bad header"))?;
    let dim = usize::try_from(header.dim).map_err(|_| corrupt("dimension too large"))?;
    let count = 1 + [header.c, header.g, header.momentum, header.x_prev]
        .iter()
        .filter(|&&b| b)
        .count();
    if body.len() != count.saturating_mul(dim).saturating_mul(4) {
        return Err(corrupt("size does not match the header"));
    }
    let mut take = |present: bool| {
        present.then(|| {
            let (v, rest) = body.split_at(dim * 4);
            body = rest;
            v.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>()
        })
    };
    let x = take(true).unwrap_or_default();
    Ok(ServerState {
        x,
        c: take(header.c),
        g: take(header.g),
        momentum: take(header.momentum),
        x_prev: take(header.x_prev),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_damage_is_detected() {
        let state = ServerState {
            x: vec![1.0, -2.5, 3.25],
            c: Some(vec![0.5, 0.0, -1.0]),
            g: None,
            momentum: Some(vec![9.0, 8.0, 7.0]),
            x_prev: None,
        };
        let bytes = encode_state(&state);
        assert_eq!(decode_state(&bytes, Path::new("t")).unwrap(), state);
        for cut in [0, 5, 12, bytes.len() - 1] {
            assert!(decode_state(&bytes[..cut], Path::new("t")).is_err());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.bin");
        write_atomic(&path, &[&bytes]).unwrap();
        let hash = content_hash(&[&bytes]);
        assert_eq!(read_checked(&path, hash).unwrap(), bytes);
        assert!(read_checked(&path, hash ^ 1).is_err());
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}
