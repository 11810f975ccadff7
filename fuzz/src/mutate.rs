//! The inputs a fuzz run feeds a decoder: mostly valid encodings bent the ways a broken or hostile
//! peer bends them (bit flips, boundary values written over length fields, truncations,
//! insertions, splices of two encodings, runs of varint continuation bytes), and some plain
//! random bytes. A sealed encoding is sealed again after most mutations, so they reach the
//! decoder past its checksum. Every choice comes from the caller's seeded generator.

use rand::rngs::StdRng;
use rand::{Rng, RngExt};

const INTERESTING_U8: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];
const INTERESTING_U32: [u32; 8] = [0, 1, 0x7f, 0x80, 0xffff, 0x7fff_ffff, 0x8000_0000, u32::MAX];
const INTERESTING_U64: [u64; 6] = [0, 1, 1 << 32, 1 << 40, i64::MAX as u64, u64::MAX];

/// Bytes of the checksum that ends a sealed encoding (xxh3 of everything before it).
const CHECKSUM_BYTES: usize = 8;

/// Writes into `out` the next input: one in sixteen is random bytes, the rest a valid encoding
/// from `seeds` with one to four mutations. For `sealed` encodings (ending in an xxh3 checksum of
/// the rest, which any peer can compute) seven in eight mutate what the checksum covers and seal
/// it again, so the input reaches the decoder past its checksum.
pub fn next_input(rng: &mut StdRng, seeds: &[Vec<u8>], sealed: bool, out: &mut Vec<u8>) {
    out.clear();
    if seeds.is_empty() || rng.random_range(0..16) == 0 {
        let len = rng.random_range(0..256);
        out.resize(len, 0);
        rng.fill_bytes(out);
        return;
    }
    out.extend_from_slice(&seeds[rng.random_range(0..seeds.len())]);
    let reseal = sealed && out.len() >= CHECKSUM_BYTES && rng.random_range(0..8) != 0;
    if reseal {
        out.truncate(out.len() - CHECKSUM_BYTES);
    }
    for _ in 0..rng.random_range(1..=4) {
        mutate(rng, seeds, out);
    }
    if reseal {
        let checksum = xxhash_rust::xxh3::xxh3_64(out);
        out.extend_from_slice(&checksum.to_le_bytes());
    }
}

/// A random position in `bytes` (0 when it is empty).
fn position(rng: &mut StdRng, bytes: &[u8]) -> usize {
    if bytes.is_empty() {
        0
    } else {
        rng.random_range(0..bytes.len())
    }
}

/// Applies one mutation to `bytes`.
fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], bytes: &mut Vec<u8>) {
    let at = position(rng, bytes);
    match rng.random_range(0..10) {
        0 if !bytes.is_empty() => bytes[at] ^= 1 << rng.random_range(0..8),
        1 if !bytes.is_empty() => bytes[at] = INTERESTING_U8[rng.random_range(0..INTERESTING_U8.len())],
        2 => {
            let value = INTERESTING_U32[rng.random_range(0..INTERESTING_U32.len())];
            overwrite(bytes, at, &value.to_le_bytes());
        }
        3 => {
            let value = INTERESTING_U64[rng.random_range(0..INTERESTING_U64.len())];
            overwrite(bytes, at, &value.to_le_bytes());
        }
        4 => bytes.truncate(at),
        5 => {
            let mut insert = vec![0u8; rng.random_range(1..=16)];
            rng.fill_bytes(&mut insert);
            bytes.splice(at..at, insert);
        }
        6 if !bytes.is_empty() => {
            let end = (at + rng.random_range(1..=32)).min(bytes.len());
            bytes.drain(at..end);
        }
        7 => {
            let other = &seeds[rng.random_range(0..seeds.len())];
            let from = position(rng, other);
            bytes.truncate(at);
            bytes.extend_from_slice(&other[from..]);
        }
        8 if !bytes.is_empty() => {
            let end = (at + rng.random_range(1..=64)).min(bytes.len());
            let chunk = bytes[at..end].to_vec();
            bytes.splice(at..at, chunk);
        }
        _ => {
            // A run of varint continuation bytes: a length or count of absurd size.
            let run = vec![0xffu8; rng.random_range(1..=10)];
            bytes.splice(at..at, run);
        }
    }
}

/// Writes `value` over `bytes` from `at`, growing `bytes` if it is too short.
fn overwrite(bytes: &mut Vec<u8>, at: usize, value: &[u8]) {
    if bytes.len() < at + value.len() {
        bytes.resize(at + value.len(), 0);
    }
    bytes[at..at + value.len()].copy_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn inputs_are_mutations_of_the_seeds_and_repeat_with_the_seed() {
        let seeds = vec![vec![7u8; 40], (0..60).collect::<Vec<u8>>()];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut out = Vec::new();
            (0..200)
                .map(|_| {
                    next_input(&mut rng, &seeds, false, &mut out);
                    out.clone()
                })
                .collect::<Vec<_>>()
        };
        let inputs = draw(3);
        assert_eq!(inputs, draw(3), "the same seed, the same inputs");
        assert_ne!(inputs, draw(4));
        let changed = inputs.iter().filter(|i| !seeds.contains(i)).count();
        assert!(
            changed > 150,
            "most inputs differ from every seed: {changed} of 200"
        );
        assert!(inputs.iter().any(|i| i.len() < 40), "some are truncated");
        assert!(inputs.iter().any(|i| i.len() > 60), "some are extended");
    }
}
