//! Error feedback for biased compressors (ALGORITHMS.md §9), as wrappers around any
//! [`Compressor`] that keep a client's state across rounds.
//!
//! - [`ErrorFeedback`] (classic EF): `p = u + e`, send `s = C(p)`, keep `e ← p − s`. Nothing is
//!   lost: after `T` rounds `Σ s + e = Σ u` (the memory holds everything not yet sent).
//! - [`Ef21`]: keeps `h`, sends `c = C(u − h)`, `h ← h + c`; the receiver, keeping the same `h`,
//!   reconstructs `h`. With the identity compressor `h = u` after every round.
//!
//! [`Feedback`] is the `feedback` key of an fl-sim experiment and of `server.toml`, which picks one
//! of them for every upload; the memories persist across a client's tasks.

use serde::{Deserialize, Serialize};
use shoal_core::{CompressError, Compressor};
use std::fmt;
use std::str::FromStr;

/// Error feedback on the uploads: the `feedback` configuration key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Feedback {
    /// None: each upload is compressed on its own (the default).
    #[default]
    None,
    /// Classic error feedback ([`ErrorFeedback`]): what compression dropped is added to the next
    /// upload.
    Ef,
    /// EF21 ([`Ef21`]): the device sends the compressed change of its state `h_i`; the server keeps
    /// the same `h_i` per client and folds it.
    Ef21,
}

impl fmt::Display for Feedback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Feedback::None => "none",
            Feedback::Ef => "ef",
            Feedback::Ef21 => "ef21",
        })
    }
}

impl FromStr for Feedback {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Feedback::None),
            "ef" => Ok(Feedback::Ef),
            "ef21" => Ok(Feedback::Ef21),
            other => Err(format!("unknown feedback `{other}` (none, ef, ef21)")),
        }
    }
}

fn check_len(state: &mut Vec<f32>, len: usize) -> Result<(), CompressError> {
    if state.is_empty() {
        state.resize(len, 0.0);
    }
    if state.len() != len {
        return Err(CompressError::Length {
            expected: state.len(),
            actual: len,
        });
    }
    Ok(())
}

/// Classic error feedback around a compressor.
#[derive(Debug, Clone)]
pub struct ErrorFeedback<C> {
    inner: C,
    memory: Vec<f32>,
}

impl<C: Compressor> ErrorFeedback<C> {
    /// `inner` with an empty (zero) memory.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            memory: Vec::new(),
        }
    }

    /// `inner` with the memory `e` a previous upload left (empty: zero).
    pub fn with_memory(inner: C, memory: Vec<f32>) -> Self {
        Self { inner, memory }
    }

    /// The error memory `e`.
    pub fn memory(&self) -> &[f32] {
        &self.memory
    }

    /// The compressor and the memory, to keep for the next upload.
    pub fn into_parts(self) -> (C, Vec<f32>) {
        (self.inner, self.memory)
    }
}

impl<C: Compressor> Compressor for ErrorFeedback<C> {
    /// Replaces `u` by `s = C(u + e)` and keeps `e ← (u + e) − s`.
    fn compress(&mut self, u: &mut [f32]) -> Result<(), CompressError> {
        check_len(&mut self.memory, u.len())?;
        let p: Vec<f32> = u.iter().zip(&self.memory).map(|(a, e)| a + e).collect();
        u.copy_from_slice(&p);
        self.inner.compress(u)?;
        for ((e, p), s) in self.memory.iter_mut().zip(&p).zip(u.iter()) {
            *e = p - s;
        }
        Ok(())
    }

    fn is_unbiased(&self) -> bool {
        false
    }
}

/// EF21 around a compressor.
#[derive(Debug, Clone)]
pub struct Ef21<C> {
    inner: C,
    h: Vec<f32>,
    last_message: Vec<f32>,
}

impl<C: Compressor> Ef21<C> {
    /// `inner` with `h = 0`.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            h: Vec::new(),
            last_message: Vec::new(),
        }
    }

    /// `inner` with the state `h` a previous upload left (empty: zero).
    pub fn with_state(inner: C, h: Vec<f32>) -> Self {
        Self {
            inner,
            h,
            last_message: Vec::new(),
        }
    }

    /// The state `h` (what the receiver holds for this sender).
    pub fn h(&self) -> &[f32] {
        &self.h
    }

    /// The compressor and the state `h`, to keep for the next upload.
    pub fn into_parts(self) -> (C, Vec<f32>) {
        (self.inner, self.h)
    }

    /// The last message sent, `c = C(u − h)`.
    pub fn last_message(&self) -> &[f32] {
        &self.last_message
    }
}

impl<C: Compressor> Compressor for Ef21<C> {
    /// Sends `c = C(u − h)`, sets `h ← h + c`, and replaces `u` by `h`.
    fn compress(&mut self, u: &mut [f32]) -> Result<(), CompressError> {
        check_len(&mut self.h, u.len())?;
        let mut c: Vec<f32> = u.iter().zip(&self.h).map(|(a, h)| a - h).collect();
        self.inner.compress(&mut c)?;
        for (h, c) in self.h.iter_mut().zip(&c) {
            *h += c;
        }
        u.copy_from_slice(&self.h);
        self.last_message = c;
        Ok(())
    }

    fn is_unbiased(&self) -> bool {
        false
    }
}

/// The receiver's half of EF21: the server keeps `h_i` for each sender and, for a message `c`,
/// sets `h_i ← h_i + c` and folds `h_i`. Fails when `c` has another length than `h_i`.
pub fn ef21_receive(h: &mut Vec<f32>, message: &[f32]) -> Result<(), CompressError> {
    check_len(h, message.len())?;
    for (h, c) in h.iter_mut().zip(message) {
        *h += c;
    }
    Ok(())
}
