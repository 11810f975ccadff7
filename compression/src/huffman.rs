//! Canonical Huffman coding of small-alphabet symbol streams (cluster ids, quantisation levels) —
//! FedZip's first encoder (ALGORITHMS.md §7.2a), as real Huffman: with FedZip's three symbols the
//! code lengths are {1, 2, 2} and the most frequent symbol costs one bit.
//!
//! Only code lengths travel (one byte per symbol of the alphabet); both sides rebuild the same
//! canonical codes. Lengths are limited to [`MAX_CODE_LEN`] bits. A decoder is built only from
//! lengths that form a valid prefix code (Kraft sum exactly 1, or one symbol of length 1).

use crate::bits::{BitReader, BitWriter};
use crate::error::DecodeError;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Longest code the encoder produces and the decoder accepts.
pub const MAX_CODE_LEN: u8 = 24;

/// Huffman code lengths for symbol frequencies (0 for unused symbols), at most [`MAX_CODE_LEN`].
/// A single used symbol gets length 1.
pub fn code_lengths(freqs: &[u64]) -> Vec<u8> {
    let mut freqs: Vec<u64> = freqs.to_vec();
    loop {
        let lengths = unlimited_lengths(&freqs);
        if lengths.iter().all(|&l| l <= MAX_CODE_LEN) {
            return lengths;
        }
        // Flatten the distribution and try again; converges since equal weights give ⌈log₂ n⌉.
        for f in freqs.iter_mut().filter(|f| **f > 0) {
            *f = (*f >> 1).max(1);
        }
    }
}

fn unlimited_lengths(freqs: &[u64]) -> Vec<u8> {
    let mut lengths = vec![0u8; freqs.len()];
    let used: Vec<usize> = (0..freqs.len()).filter(|&s| freqs[s] > 0).collect();
    match used.len() {
        0 => return lengths,
        1 => {
            lengths[used[0]] = 1;
            return lengths;
        }
        _ => {}
    }
    // Nodes: leaves 0..n, internal nodes after; ties broken by node index for determinism.
    let mut parent: Vec<usize> = vec![usize::MAX; used.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = used
        .iter()
        .enumerate()
        .map(|(node, &s)| Reverse((freqs[s], node)))
        .collect();
    while heap.len() > 1 {
        let (Some(Reverse((fa, a))), Some(Reverse((fb, b)))) = (heap.pop(), heap.pop()) else {
            break;
        };
        let node = parent.len();
        parent.push(usize::MAX);
        parent[a] = node;
        parent[b] = node;
        heap.push(Reverse((fa.saturating_add(fb), node)));
    }
    for (leaf, &s) in used.iter().enumerate() {
        let mut depth = 0u32;
        let mut node = leaf;
        while parent[node] != usize::MAX {
            node = parent[node];
            depth += 1;
        }
        lengths[s] = depth.min(255) as u8;
    }
    lengths
}

/// Canonical codes for `lengths`: per symbol, the code bit-reversed (for the LSB-first writer).
fn canonical_codes(lengths: &[u8]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&s| lengths[s] > 0).collect();
    order.sort_by_key(|&s| (lengths[s], s));
    let mut codes = vec![0u32; lengths.len()];
    let mut code = 0u32;
    let mut prev_len = 0u8;
    for &s in &order {
        let len = lengths[s];
        code <<= len - prev_len;
        prev_len = len;
        codes[s] = code.reverse_bits() >> (32 - u32::from(len));
        code += 1;
    }
    codes
}

/// Writes symbols with the canonical code of `lengths`.
#[derive(Debug)]
pub struct Encoder {
    codes: Vec<u32>,
    lengths: Vec<u8>,
}

impl Encoder {
    /// The encoder for these code lengths (from [`code_lengths`]).
    pub fn new(lengths: &[u8]) -> Self {
        Self {
            codes: canonical_codes(lengths),
            lengths: lengths.to_vec(),
        }
    }

    /// Writes `symbol`, which must have a code.
    pub fn write(&self, writer: &mut BitWriter, symbol: usize) {
        writer.write(u64::from(self.codes[symbol]), u32::from(self.lengths[symbol]));
    }

    /// Bits the symbols with these frequencies take: `Σ count · length`.
    pub fn cost(&self, freqs: &[u64]) -> u64 {
        freqs
            .iter()
            .zip(&self.lengths)
            .map(|(&f, &l)| f * u64::from(l))
            .sum()
    }
}

/// Reads symbols of a canonical code.
#[derive(Debug)]
pub struct Decoder {
    /// Per length 1..=MAX: first canonical code, number of codes, index of the first symbol.
    first: Vec<u32>,
    count: Vec<u32>,
    offset: Vec<u32>,
    symbols: Vec<u16>,
    max_len: u8,
}

impl Decoder {
    /// A decoder for `lengths`; refuses lengths that are not a complete prefix code.
    pub fn new(lengths: &[u8]) -> Result<Self, DecodeError> {
        if lengths.len() > usize::from(u16::MAX) {
            return Err(DecodeError::corrupt("Huffman alphabet too large"));
        }
        let max_len = lengths.iter().copied().max().unwrap_or(0);
        if max_len == 0 {
            return Err(DecodeError::corrupt("Huffman table has no symbols"));
        }
        if max_len > MAX_CODE_LEN {
            return Err(DecodeError::corrupt("Huffman code longer than the limit"));
        }
        let used = lengths.iter().filter(|&&l| l > 0).count();
        // Kraft sum in units of 2^-MAX_CODE_LEN.
        let kraft: u64 = lengths
            .iter()
            .filter(|&&l| l > 0)
            .map(|&l| 1u64 << (MAX_CODE_LEN - l))
            .sum();
        let complete = kraft == 1u64 << MAX_CODE_LEN;
        let single = used == 1 && max_len == 1;
        if !(complete || single) {
            return Err(DecodeError::corrupt(
                "Huffman lengths are not a complete prefix code",
            ));
        }
        let mut symbols: Vec<u16> = (0..lengths.len() as u16)
            .filter(|&s| lengths[usize::from(s)] > 0)
            .collect();
        symbols.sort_by_key(|&s| (lengths[usize::from(s)], s));
        let n = usize::from(max_len) + 1;
        let (mut first, mut count, mut offset) = (vec![0u32; n], vec![0u32; n], vec![0u32; n]);
        for &s in &symbols {
            count[usize::from(lengths[usize::from(s)])] += 1;
        }
        let (mut code, mut index) = (0u32, 0u32);
        for len in 1..n {
            code <<= 1;
            first[len] = code;
            offset[len] = index;
            code += count[len];
            index += count[len];
        }
        Ok(Self {
            first,
            count,
            offset,
            symbols,
            max_len,
        })
    }

    /// Reads one symbol.
    pub fn read(&self, reader: &mut BitReader<'_>) -> Result<u16, DecodeError> {
        let mut code = 0u32;
        for len in 1..=usize::from(self.max_len) {
            code |= reader.bit()? as u32;
            let delta = code.wrapping_sub(self.first[len]);
            if delta < self.count[len] {
                return Ok(self.symbols[(self.offset[len] + delta) as usize]);
            }
            code <<= 1;
        }
        Err(DecodeError::corrupt("invalid Huffman code"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fedzips_three_symbols_get_lengths_one_two_two() {
        assert_eq!(code_lengths(&[800, 100, 100]), vec![1, 2, 2]);
        assert_eq!(code_lengths(&[0, 5, 0]), vec![0, 1, 0]);
        assert_eq!(code_lengths(&[0, 0]), vec![0, 0]);
    }

    #[test]
    fn skewed_frequencies_stay_within_the_length_limit() {
        // Fibonacci frequencies make the deepest unlimited tree.
        let mut fib = vec![1u64, 1];
        while fib.len() < 60 {
            let n = fib[fib.len() - 1] + fib[fib.len() - 2];
            fib.push(n);
        }
        let lengths = code_lengths(&fib);
        assert!(lengths.iter().all(|&l| (1..=MAX_CODE_LEN).contains(&l)));
        Decoder::new(&lengths).expect("a complete code");
    }

    #[test]
    fn incomplete_or_oversubscribed_tables_are_refused() {
        assert!(Decoder::new(&[1, 1, 1]).is_err());
        assert!(Decoder::new(&[2, 2, 2]).is_err());
        assert!(Decoder::new(&[0, 0]).is_err());
        assert!(Decoder::new(&[30, 1]).is_err());
        assert!(Decoder::new(&[1]).is_ok());
    }

    proptest! {
        /// Symbols round-trip, and the stream takes exactly Σ count · length bits.
        #[test]
        fn streams_round_trip_at_the_predicted_size(symbols in prop::collection::vec(0usize..12, 1..500)) {
            let mut freqs = vec![0u64; 12];
            for &s in &symbols {
                freqs[s] += 1;
            }
            let lengths = code_lengths(&freqs);
            let encoder = Encoder::new(&lengths);
            let mut w = BitWriter::default();
            for &s in &symbols {
                encoder.write(&mut w, s);
            }
            let bits = encoder.cost(&freqs);
            let bytes = w.finish();
            prop_assert_eq!(bytes.len() as u64, bits.div_ceil(8));
            let decoder = Decoder::new(&lengths).unwrap();
            let mut r = BitReader::new(&bytes);
            for &s in &symbols {
                prop_assert_eq!(usize::from(decoder.read(&mut r).unwrap()), s);
            }
        }
    }
}
