//! Codecs for everything a client or server sends (filled by the compression issue).
//!
//! This crate will hold the codec chain (top-k and rand-k sparsifiers; k-means, QSGD, sign and cast
//! quantizers; Huffman, position and zstd encoders), FedZip, error feedback (EF, EF21), the 8-bit
//! activation quantizer for split learning, and the self-describing, versioned payload format.
