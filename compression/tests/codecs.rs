//! Round trips of every codec chain through the payload format (ALGORITHMS.md §7.5, §9.4), edge
//! cases included, unbiasedness of the random stages, error-feedback conservation, and the decoder
//! fed 100 000 mutated or arbitrary payloads without a panic.

use proptest::prelude::*;
use shoal_compression::feedback::{Ef21, ErrorFeedback};
use shoal_compression::{CodecCompressor, CodecError, CodecSpec, DecodeError, DecodeLimits, decode, encode};
use shoal_core::{Compressor, IdentityCompressor, Layout, LayoutBuilder, SegmentKind};
use std::sync::Arc;

fn layout(sizes: &[(usize, bool)]) -> Layout {
    let mut b = LayoutBuilder::new();
    for (k, &(n, one_d)) in sizes.iter().enumerate() {
        let shape = if one_d { vec![n] } else { vec![1, n] };
        b.push(format!("l{k}"), &shape, SegmentKind::Trainable)
            .expect("valid layout");
    }
    b.build()
}

fn round_trip(spec: &str, layout: &Layout, v: &[f32]) -> Vec<f32> {
    let spec: CodecSpec = spec.parse().expect("valid chain");
    let bytes = encode(&spec, layout, v, 7).expect("encodes");
    let (out, info) = decode(&bytes, layout, &DecodeLimits::for_dim(layout.len())).expect("decodes");
    assert_eq!(info.codec, spec);
    assert_eq!(info.bytes, bytes.len());
    out
}

/// Layers of values with the edge cases mixed in: all zeros, all equal, one value, huge and tiny.
fn arb_layers() -> impl Strategy<Value = Vec<Vec<f32>>> {
    let layer = prop_oneof![
        4 => prop::collection::vec(-10f32..10.0, 1..120),
        1 => (1usize..50).prop_map(|n| vec![0.0; n]),
        1 => (1usize..50, -5f32..5.0).prop_map(|(n, v)| vec![v; n]),
        1 => (-5f32..5.0).prop_map(|v| vec![v]),
        1 => prop::collection::vec(prop_oneof![-1e30f32..1e30, -1e-30f32..1e-30, Just(0.0)], 1..60),
    ];
    prop::collection::vec(layer, 1..4)
}

fn flatten(layers: &[Vec<f32>]) -> (Layout, Vec<f32>) {
    let sizes: Vec<(usize, bool)> = layers
        .iter()
        .enumerate()
        .map(|(k, l)| (l.len(), k % 2 == 1))
        .collect();
    (layout(&sizes), layers.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Lossless chains are bit-exact.
    #[test]
    fn lossless_chains_are_bit_exact(layers in arb_layers()) {
        let (layout, v) = flatten(&layers);
        for chain in ["identity", "zstd(3)", "positions", "gaps | zstd(1)"] {
            let out = round_trip(chain, &layout, &v);
            prop_assert!(out.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()), "{chain}");
        }
    }

    /// The three FedZip encoders (and the packed form) are lossless on the quantised layer: every
    /// encoder decodes to the bit-identical vector (ALGORITHMS.md §7.5.4).
    #[test]
    fn every_encoder_decodes_the_same_quantised_values(layers in arb_layers(), z in 0.05f64..1.0) {
        let (layout, v) = flatten(&layers);
        for quantizer in ["kmeans(3)", "kmeans(3, official)", "qsgd(8)", "sign", "int8", "fp16"] {
            let reference = round_trip(&format!("topk({z}) | {quantizer}"), &layout, &v);
            for encoder in ["positions", "gaps", "smallest", "smallest | zstd(1)"] {
                let out = round_trip(&format!("topk({z}) | {quantizer} | {encoder}"), &layout, &v);
                prop_assert!(out.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{quantizer} | {encoder}");
            }
            if quantizer != "fp16" {
                let out = round_trip(&format!("topk({z}) | {quantizer} | huffman"), &layout, &v);
                prop_assert!(out.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{quantizer} | huffman");
            }
        }
    }

    /// Top-k keeps exactly its entries' values and zeroes the rest; pinned k-means leaves at most
    /// 3 distinct values per layer and keeps zeros exactly zero.
    #[test]
    fn sparsified_and_clustered_layers_keep_their_shape(layers in arb_layers(), z in 0.05f64..1.0) {
        let (layout, v) = flatten(&layers);
        let out = round_trip(&format!("topk({z})"), &layout, &v);
        for segment in layout.segments() {
            let (a, b) = (&v[segment.range()], &out[segment.range()]);
            let k = ((z * a.len() as f64).ceil() as usize).clamp(1, a.len());
            prop_assert!(b.iter().filter(|x| **x != 0.0).count() <= k);
            prop_assert!(a.iter().zip(b).all(|(x, y)| *y == 0.0 || x == y));
        }
        let out = round_trip(&format!("topk({z}) | kmeans(3) | huffman"), &layout, &v);
        for segment in layout.segments() {
            let (a, b) = (&v[segment.range()], &out[segment.range()]);
            let mut distinct: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert!(distinct.len() <= 3, "{} distinct values", distinct.len());
            prop_assert!(a.iter().zip(b).all(|(x, y)| *x != 0.0 || *y == 0.0), "zeros stay zero");
        }
    }

    /// Lossy stages within their bounds: casts to their precision, int8 within half a step of the
    /// layer's range, sign to ±mean|v|, QSGD on the grid of norm/s.
    #[test]
    fn lossy_stages_stay_within_their_bounds(layers in arb_layers()) {
        let (layout, v) = flatten(&layers);
        let fp16 = round_trip("fp16", &layout, &v);
        let bf16 = round_trip("bf16", &layout, &v);
        for ((x, h), b) in v.iter().zip(&fp16).zip(&bf16) {
            let clamped = x.clamp(-65504.0, 65504.0);
            prop_assert!((h - clamped).abs() <= clamped.abs() * 1e-3 + 6e-8, "fp16 {x} → {h}");
            prop_assert!((b - x).abs() <= x.abs() * 4e-3 + 1e-38, "bf16 {x} → {b}");
        }
        let int8 = round_trip("int8", &layout, &v);
        let sign = round_trip("sign", &layout, &v);
        let qsgd = round_trip("qsgd(4)", &layout, &v);
        for segment in layout.segments() {
            let a = &v[segment.range()];
            let lo = a.iter().copied().fold(0.0f32, f32::min);
            let hi = a.iter().copied().fold(0.0f32, f32::max);
            let step = (f64::from(hi) - f64::from(lo)) / 255.0;
            for (x, y) in a.iter().zip(&int8[segment.range()]) {
                prop_assert!((f64::from(*x) - f64::from(*y)).abs() <= step / 2.0 * 1.001 + 1e-37, "int8 {x} → {y}");
            }
            let mean_abs = a.iter().map(|x| f64::from(x.abs())).sum::<f64>() / a.len() as f64;
            for y in &sign[segment.range()] {
                prop_assert!((f64::from(y.abs()) - mean_abs).abs() <= mean_abs * 1e-6 + 1e-37);
            }
            let norm = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            for y in &qsgd[segment.range()] {
                prop_assert!(f64::from(y.abs()) <= norm * (1.0 + 1e-6) + 1e-37);
                if norm > 1e-30 {
                    let level = f64::from(*y) / norm * 4.0;
                    prop_assert!((level - level.round()).abs() < 1e-3, "{y} is not on the grid");
                }
            }
        }
    }
}

#[test]
fn non_finite_input_is_refused() {
    let layout = layout(&[(4, false)]);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = encode(&CodecSpec::fedzip(), &layout, &[1.0, bad, 0.0, 2.0], 0).expect_err("refused");
        assert!(matches!(err, CodecError::NonFinite { .. }), "{err}");
    }
    assert!(matches!(
        encode(&CodecSpec::identity(), &layout, &[1.0], 0),
        Err(CodecError::Length {
            expected: 4,
            actual: 1
        })
    ));
}

#[test]
fn rand_k_and_qsgd_are_unbiased() {
    let layout = layout(&[(40, false)]);
    let v: Vec<f32> = (0..40).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.5).collect();
    for chain in ["randk(0.25)", "qsgd(2)", "randk(0.5) | qsgd(4) | huffman"] {
        let spec: CodecSpec = chain.parse().expect("valid");
        assert!(spec.is_unbiased());
        let trials = 4000;
        let mut mean = vec![0.0f64; v.len()];
        for seed in 0..trials {
            let bytes = encode(&spec, &layout, &v, seed).expect("encodes");
            let (out, _) = decode(&bytes, &layout, &DecodeLimits::for_dim(40)).expect("decodes");
            for (m, x) in mean.iter_mut().zip(&out) {
                *m += f64::from(*x) / trials as f64;
            }
        }
        // Variance per entry is at most (m/k)·|v|²-scale; compare with a generous 6σ bound.
        let norm2: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum();
        let sigma = (4.0 * norm2 / trials as f64).sqrt();
        for (m, x) in mean.iter().zip(&v) {
            assert!(
                (m - f64::from(*x)).abs() < 6.0 * sigma,
                "{chain}: mean {m} vs {x}"
            );
        }
    }
}

#[test]
fn error_feedback_loses_nothing_and_ef21_with_identity_tracks_the_input() {
    let layout = Arc::new(layout(&[(30, false), (10, true)]));
    let mut ef = ErrorFeedback::new(CodecCompressor::new(
        "topk(0.1)".parse().expect("valid"),
        layout.clone(),
        3,
    ));
    let mut sent = vec![0.0f64; 40];
    let mut raw = vec![0.0f64; 40];
    for t in 0..25 {
        let u: Vec<f32> = (0..40)
            .map(|i| ((i * 31 + t * 17) % 23) as f32 * 0.1 - 1.1)
            .collect();
        let mut s = u.clone();
        ef.compress(&mut s).expect("compresses");
        for i in 0..40 {
            raw[i] += f64::from(u[i]);
            sent[i] += f64::from(s[i]);
        }
        assert!(
            s.iter().filter(|x| **x != 0.0).count() <= 4,
            "top-10 % of each layer"
        );
    }
    // Σ s + e = Σ u: everything not sent is still in the memory.
    for i in 0..40 {
        let total = sent[i] + f64::from(ef.memory()[i]);
        assert!((total - raw[i]).abs() < 1e-4, "entry {i}: {total} vs {}", raw[i]);
    }
    let mut ef21 = Ef21::new(IdentityCompressor);
    for t in 0..5 {
        let u: Vec<f32> = (0..8).map(|i| (i + t) as f32).collect();
        let mut out = u.clone();
        ef21.compress(&mut out).expect("compresses");
        assert_eq!(out, u);
        assert_eq!(ef21.h(), u.as_slice());
    }
}

#[test]
fn bad_payloads_get_typed_errors() {
    let layout = layout(&[(100, false), (10, true)]);
    let v: Vec<f32> = (0..110).map(|i| i as f32 * 0.01).collect();
    let bytes = encode(&CodecSpec::fedzip(), &layout, &v, 1).expect("encodes");
    let limits = DecodeLimits::for_dim(layout.len());
    let decode_err = |b: &[u8], l: &Layout, lim: &DecodeLimits| decode(b, l, lim).expect_err("refused");
    assert!(matches!(
        decode_err(&bytes[..10], &layout, &limits),
        DecodeError::Truncated(_)
    ));
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(decode_err(&bad, &layout, &limits), DecodeError::BadMagic);
    let mut bad = bytes.clone();
    bad[4] = 9;
    assert_eq!(
        decode_err(&bad, &layout, &limits),
        DecodeError::UnsupportedVersion(9)
    );
    let mut bad = bytes.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x40;
    assert_eq!(decode_err(&bad, &layout, &limits), DecodeError::Checksum);
    let tight = DecodeLimits {
        max_payload_bytes: 16,
        max_body_bytes: 16,
    };
    assert!(matches!(
        decode_err(&bytes, &layout, &tight),
        DecodeError::TooLarge { .. }
    ));
    let other = self::layout(&[(110, false)]);
    assert!(matches!(
        decode_err(&bytes, &other, &limits),
        DecodeError::LayoutMismatch { .. }
    ));
}

/// Re-seals a mutated payload with a valid checksum, so the mutation reaches the parser.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() >= 8 {
        let n = bytes.len() - 8;
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes[..n]);
        bytes[n..].copy_from_slice(&sum.to_le_bytes());
    }
}

fn seeds() -> Vec<(Layout, Vec<u8>)> {
    let layout = layout(&[(64, false), (8, true), (3, false)]);
    let v: Vec<f32> = (0..75).map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.07).collect();
    [
        "identity",
        "fedzip",
        "topk(0.2) | kmeans(3) | huffman",
        "topk(0.3) | kmeans(4, official) | gaps",
        "topk(0.2) | kmeans(3) | positions | zstd(1)",
        "randk(0.3) | qsgd(4) | huffman",
        "sign | huffman",
        "int8 | gaps",
        "bf16 | zstd(2)",
    ]
    .iter()
    .map(|chain| {
        let bytes = encode(&chain.parse().expect("valid"), &layout, &v, 5).expect("encodes");
        (layout.clone(), bytes)
    })
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// 100 000 payloads — valid ones with bytes flipped, cut, inserted or appended, most re-sealed
    /// with a correct checksum so the damage reaches the header and layer decoders, and arbitrary
    /// bytes behind a valid frame — never panic; what decodes is finite.
    #[test]
    fn the_decoder_survives_arbitrary_payloads(
        which in 0usize..9,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
        arbitrary in prop::collection::vec(any::<u8>(), 0..200),
        mode in 0u8..8,
    ) {
        thread_local! {
            static SEEDS: Vec<(Layout, Vec<u8>)> = seeds();
        }
        SEEDS.with(|seeds| {
            let (layout, original) = &seeds[which];
            let mut bytes = if mode == 0 {
                let mut framed = b"SHOL\x01".to_vec();
                framed.extend(&arbitrary);
                framed.extend([0u8; 8]);
                framed
            } else {
                original.clone()
            };
            for (at, byte, kind) in &edits {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match kind {
                    0 => bytes[i] = *byte,
                    1 => bytes.truncate(i),
                    2 => bytes.insert(i, *byte),
                    _ => bytes.extend_from_slice(&arbitrary[..arbitrary.len().min(16)]),
                }
            }
            if mode != 7 {
                reseal(&mut bytes);
            }
            let limits = DecodeLimits::for_dim(layout.len());
            if let Ok((out, _)) = decode(&bytes, layout, &limits) {
                assert!(out.iter().all(|x| x.is_finite()));
            }
        });
    }
}
