//! Everything a client or server sends goes through this crate (ALGORITHMS.md §7, §8.0, §9, §10.1).
//!
//! - [`spec`]: the codec chain — `topk(0.2) | kmeans(3) | huffman | zstd(1)` — parsed from a string
//!   or a TOML table; [`CodecSpec::fedzip`] is FedZip at its defaults.
//! - [`sparsify`], [`quantize`], [`huffman`]: the stages — top-k and rand-k; k-means (official and
//!   pinned-zero), QSGD, scaled sign, fp16/bf16/int8; canonical Huffman. Positions and gaps are
//!   coded in [`tensor`] with the bit and varint I/O of [`bits`].
//! - [`payload`]: the self-describing, versioned, checksummed payload, and its decoder that refuses
//!   bad bytes with a [`DecodeError`] within caller-set [`DecodeLimits`].
//! - [`partial`]: the wire format of a partial aggregate (f64 sums and total weight) that a leaf
//!   fl-server forwards to the top.
//! - [`feedback`]: classic error feedback and EF21 around any compressor.
//! - [`activation`]: 8-bit affine quantisation of split-learning activations and gradients;
//!   [`cut`]: their wire format at a split cut (with the minibatch's labels).
//! - [`CodecCompressor`]: the core `Compressor` trait over a chain, for the client rules.

pub mod activation;
pub mod bits;
mod compressor;
pub mod cut;
mod error;
pub mod feedback;
pub mod huffman;
pub mod partial;
pub mod payload;
pub mod quantize;
pub mod sparsify;
pub mod spec;
mod tensor;

pub use compressor::CodecCompressor;
pub use error::{CodecError, DecodeError};
pub use payload::{DecodeLimits, PayloadInfo, decode, decode_into, encode};
pub use spec::CodecSpec;
