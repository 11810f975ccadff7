//! One layer through the chain: sparsify → quantize → encode, and back.
//!
//! A coded layer is: its length `m`, a *fill* value for the entries not sent (0, or the dominant
//! centroid of official k-means), the *support* (all entries, explicit indices, or a seed that
//! regenerates rand-k's indices), and one value or symbol per supported entry. Entries whose coded
//! value equals the fill are dropped from an explicit support, so top-k followed by pinned k-means
//! sends only its non-zero clusters, and FedZip's position encoders code only those.
//!
//! The decoder checks everything a peer controls — counts against the layer length, indices
//! strictly increasing and in range, symbols within the alphabet, parameters finite, the body
//! consumed exactly — and never allocates beyond the layer's length.

use crate::activation::AffineParams;
use crate::bits::{BitReader, BitWriter, bits_for, read_varint, write_varint};
use crate::error::DecodeError;
use crate::huffman;
use crate::quantize::{self, Clustered};
use crate::sparsify;
use crate::spec::{CodecSpec, Encoder, Quantizer, Sparsifier};
use serde::{Deserialize, Serialize};

/// Which entries are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum SupportHeader {
    /// Every entry.
    Dense,
    /// `count` explicit indices.
    Indices { count: u32 },
    /// `count` indices drawn from `seed` (rand-k).
    Seeded { count: u32, seed: u64 },
}

/// How the sent values are represented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ValuesHeader {
    F32,
    F16,
    Bf16,
    Int8 { params: AffineParams },
    Sign { scale: f32 },
    Qsgd { norm: f32, levels: u16 },
    Clusters { centroids: Vec<f32> },
}

/// How the body is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum BodyEncoding {
    Packed,
    Huffman,
    Positions,
    Gaps,
}

/// What the payload header says of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TensorHeader {
    pub len: u32,
    pub fill: f32,
    pub support: SupportHeader,
    pub values: ValuesHeader,
    pub encoding: BodyEncoding,
    pub body_len: u32,
}

/// Largest k-means alphabet a decoder accepts.
const MAX_CENTROIDS: usize = 256;

impl ValuesHeader {
    /// Alphabet size of a symbolic representation.
    fn alphabet(&self) -> Option<usize> {
        match self {
            ValuesHeader::Int8 { .. } => Some(256),
            ValuesHeader::Sign { .. } => Some(2),
            ValuesHeader::Qsgd { levels, .. } => Some(2 * usize::from(*levels) + 1),
            ValuesHeader::Clusters { centroids } => Some(centroids.len()),
            _ => None,
        }
    }

    /// The value of `symbol` (which must be within the alphabet).
    fn value(&self, symbol: u16) -> f32 {
        match self {
            ValuesHeader::Int8 { params } => params.dequantize(symbol as u8),
            ValuesHeader::Sign { scale } => {
                if symbol == 1 {
                    -scale
                } else {
                    *scale
                }
            }
            ValuesHeader::Qsgd { norm, levels } => {
                quantize::qsgd_value(*norm, *levels, i32::from(symbol) - i32::from(*levels))
            }
            ValuesHeader::Clusters { centroids } => centroids[usize::from(symbol)],
            _ => 0.0,
        }
    }

    /// Refuses parameters a peer could use to produce non-finite or out-of-range values.
    fn validate(&self) -> Result<(), DecodeError> {
        let finite = |v: f32, what: &str| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(DecodeError::corrupt(format!("{what} is not finite")))
            }
        };
        match self {
            ValuesHeader::F32 | ValuesHeader::F16 | ValuesHeader::Bf16 => Ok(()),
            ValuesHeader::Int8 { params } => {
                finite(params.scale, "int8 scale")?;
                // 255 steps from the zero point must stay finite.
                finite(params.scale * 255.0, "int8 range")
            }
            ValuesHeader::Sign { scale } => finite(*scale, "sign scale"),
            ValuesHeader::Qsgd { norm, levels } => {
                if *levels == 0 || *levels > 1024 {
                    return Err(DecodeError::corrupt("qsgd levels out of range"));
                }
                finite(*norm, "qsgd norm")
            }
            ValuesHeader::Clusters { centroids } => {
                if centroids.is_empty() || centroids.len() > MAX_CENTROIDS {
                    return Err(DecodeError::corrupt("k-means alphabet out of range"));
                }
                centroids.iter().try_for_each(|&c| finite(c, "centroid"))
            }
        }
    }
}

/// The coded values of the supported entries.
enum ValueData {
    F32(Vec<f32>),
    Half(Vec<u16>),
    Symbols(Vec<u16>),
}

/// A layer between quantisation and encoding.
struct Coded {
    len: usize,
    fill: f32,
    support: Option<Vec<u32>>,
    seeded: Option<(u32, u64)>,
    header: ValuesHeader,
    data: ValueData,
}

impl Coded {
    fn count(&self) -> usize {
        match &self.data {
            ValueData::F32(v) => v.len(),
            ValueData::Half(v) => v.len(),
            ValueData::Symbols(v) => v.len(),
        }
    }

    /// The decoded value of the `i`-th sent entry.
    fn value(&self, i: usize) -> f32 {
        match &self.data {
            ValueData::F32(v) => v[i],
            ValueData::Half(v) => half_value(&self.header, v[i]),
            ValueData::Symbols(v) => self.header.value(v[i]),
        }
    }

    /// Drops explicit entries whose value is the fill, and a centroid nobody uses any more that
    /// equals the fill (so the position encoders need one bit less).
    fn compact(&mut self) {
        let Some(support) = self.support.take() else {
            return;
        };
        let keep: Vec<bool> = (0..support.len()).map(|i| self.value(i) != self.fill).collect();
        let mut support = support;
        retain_by_mask(&mut support, &keep);
        match &mut self.data {
            ValueData::F32(v) => retain_by_mask(v, &keep),
            ValueData::Half(v) => retain_by_mask(v, &keep),
            ValueData::Symbols(v) => retain_by_mask(v, &keep),
        }
        self.support = Some(support);
        if let (ValuesHeader::Clusters { centroids }, ValueData::Symbols(symbols)) =
            (&mut self.header, &mut self.data)
            && centroids.len() > 1
            && let Some(drop) = centroids.iter().position(|&c| c == self.fill)
            && !symbols.iter().any(|&s| usize::from(s) == drop)
        {
            centroids.remove(drop);
            for s in symbols.iter_mut() {
                if usize::from(*s) > drop {
                    *s -= 1;
                }
            }
        }
    }
}

/// Keeps the elements whose `keep` flag is set.
fn retain_by_mask<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    v.retain(|_| flags.next().copied().unwrap_or(true));
}

fn half_value(header: &ValuesHeader, bits: u16) -> f32 {
    match header {
        ValuesHeader::Bf16 => quantize::from_bf16(bits),
        _ => quantize::from_f16(bits),
    }
}

/// Codes one layer. `seed` drives rand-k and QSGD for this layer.
pub(crate) fn encode(
    spec: &CodecSpec,
    values: &[f32],
    one_dimensional: bool,
    seed: u64,
) -> (TensorHeader, Vec<u8>) {
    let len = values.len();
    let leave_dense = spec.dense_1d && one_dimensional;
    let (sparsifier, quantizer) = if leave_dense {
        (None, None)
    } else {
        (spec.sparsifier, spec.quantizer)
    };
    // Sparsify.
    let (support, seeded, kept) = match sparsifier {
        None => (None, None, values.to_vec()),
        Some(Sparsifier::TopK(z)) => {
            let idx = sparsify::top_k(values, sparsify::kept(len, z));
            let kept = idx.iter().map(|&i| values[i as usize]).collect();
            (Some(idx), None, kept)
        }
        Some(Sparsifier::RandK(z)) => {
            let k = sparsify::kept(len, z);
            let idx = sparsify::rand_k(len, k, seed);
            let scale = len as f64 / k as f64;
            let kept = idx
                .iter()
                .map(|&i| (f64::from(values[i as usize]) * scale) as f32)
                .collect();
            (None, Some((k as u32, seed)), kept)
        }
    };
    let mut coded = quantize_kept(quantizer, len, support, seeded, kept, seed);
    coded.compact();
    let encoder = if leave_dense {
        Encoder::Packed
    } else {
        spec.encoder
    };
    let candidates: &[BodyEncoding] = match encoder {
        Encoder::Packed => &[BodyEncoding::Packed],
        Encoder::Huffman => &[BodyEncoding::Huffman],
        Encoder::Positions => &[BodyEncoding::Positions],
        Encoder::Gaps => &[BodyEncoding::Gaps],
        Encoder::Smallest => &[BodyEncoding::Huffman, BodyEncoding::Positions, BodyEncoding::Gaps],
    };
    let symbolic = matches!(coded.data, ValueData::Symbols(_));
    let mut best: Option<(BodyEncoding, Vec<u8>)> = None;
    for &encoding in candidates {
        let encoding = if encoding == BodyEncoding::Huffman && !symbolic {
            BodyEncoding::Packed
        } else {
            encoding
        };
        let body = write_body(&coded, encoding);
        if best.as_ref().is_none_or(|(_, b)| body.len() < b.len()) {
            best = Some((encoding, body));
        }
    }
    let (encoding, body) = best.unwrap_or((BodyEncoding::Packed, Vec::new()));
    let support = match (&coded.support, coded.seeded) {
        (Some(idx), _) => SupportHeader::Indices {
            count: idx.len() as u32,
        },
        (None, Some((count, seed))) => SupportHeader::Seeded { count, seed },
        (None, None) => SupportHeader::Dense,
    };
    let header = TensorHeader {
        len: len as u32,
        fill: coded.fill,
        support,
        values: coded.header.clone(),
        encoding,
        body_len: body.len() as u32,
    };
    (header, body)
}

fn quantize_kept(
    quantizer: Option<Quantizer>,
    len: usize,
    support: Option<Vec<u32>>,
    seeded: Option<(u32, u64)>,
    kept: Vec<f32>,
    seed: u64,
) -> Coded {
    let mut support = support;
    // Each path builds one `Coded`, so the support moves in rather than being copied.
    let mut coded = |header, data| Coded {
        len,
        fill: 0.0,
        support: support.take(),
        seeded,
        header,
        data,
    };
    let symbols_of = |c: Clustered| {
        (
            ValuesHeader::Clusters {
                centroids: c.centroids,
            },
            c.symbols,
        )
    };
    match quantizer {
        None => coded(ValuesHeader::F32, ValueData::F32(kept)),
        Some(Quantizer::Fp16) => coded(
            ValuesHeader::F16,
            ValueData::Half(kept.iter().map(|&v| quantize::to_f16(v)).collect()),
        ),
        Some(Quantizer::Bf16) => coded(
            ValuesHeader::Bf16,
            ValueData::Half(kept.iter().map(|&v| quantize::to_bf16(v)).collect()),
        ),
        Some(Quantizer::Int8) => {
            let q = crate::activation::quantize(&kept, 1);
            let params = q.params.first().copied().unwrap_or(AffineParams::fit(0.0, 0.0));
            coded(
                ValuesHeader::Int8 { params },
                ValueData::Symbols(q.levels.iter().map(|&l| u16::from(l)).collect()),
            )
        }
        Some(Quantizer::Sign) => {
            let (scale, negative) = quantize::sign(&kept);
            coded(
                ValuesHeader::Sign { scale },
                ValueData::Symbols(negative.iter().map(|&n| u16::from(n)).collect()),
            )
        }
        Some(Quantizer::Qsgd { levels }) => {
            let (norm, q) = quantize::qsgd(&kept, levels, seed ^ 0x9e37_79b9_7f4a_7c15);
            let symbols = q.iter().map(|&l| (l + i32::from(levels)) as u16).collect();
            coded(ValuesHeader::Qsgd { norm, levels }, ValueData::Symbols(symbols))
        }
        Some(Quantizer::KMeans {
            clusters,
            official: false,
        }) => {
            let (header, symbols) = symbols_of(quantize::kmeans_pinned(&kept, usize::from(clusters)));
            coded(header, ValueData::Symbols(symbols))
        }
        Some(Quantizer::KMeans {
            clusters,
            official: true,
        }) => {
            // FedZip's reference clusters every entry of the sparsified layer, zeros included, and
            // the dominant cluster becomes the fill.
            let mut dense = vec![0.0f32; len];
            let positions: Vec<u32> = match (&mut support, seeded) {
                (Some(idx), _) => std::mem::take(idx),
                (None, Some((count, seed))) => sparsify::rand_k(len, count as usize, seed),
                (None, None) => (0..len as u32).collect(),
            };
            for (&i, &v) in positions.iter().zip(&kept) {
                dense[i as usize] = v;
            }
            let clustered = quantize::kmeans_official(&dense, usize::from(clusters));
            let mut counts = vec![0usize; clustered.centroids.len()];
            for &s in &clustered.symbols {
                counts[usize::from(s)] += 1;
            }
            let dominant = (0..counts.len())
                .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
                .unwrap_or(0);
            let fill = clustered.centroids.get(dominant).copied().unwrap_or(0.0);
            let (header, symbols) = symbols_of(clustered);
            Coded {
                len,
                fill,
                support: Some((0..len as u32).collect()),
                seeded: None,
                header,
                data: ValueData::Symbols(symbols),
            }
        }
    }
}

/// Writes support then values with `encoding`.
fn write_body(coded: &Coded, encoding: BodyEncoding) -> Vec<u8> {
    let count = coded.count();
    let mut out = Vec::new();
    if encoding == BodyEncoding::Huffman {
        if let ValueData::Symbols(symbols) = &coded.data {
            write_huffman(coded, symbols, &mut out);
        }
        return out;
    }
    if let Some(support) = &coded.support {
        match encoding {
            BodyEncoding::Positions => {
                let width = bits_for(coded.len as u64);
                let mut w = BitWriter::with_capacity(support.len() * width as usize);
                for &i in support {
                    w.write(u64::from(i), width);
                }
                out.extend(w.finish());
            }
            BodyEncoding::Gaps => {
                let mut previous: Option<u32> = None;
                for &i in support {
                    write_varint(&mut out, u64::from(previous.map_or(i, |p| i - p - 1)));
                    previous = Some(i);
                }
            }
            _ => {
                for &i in support {
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
        }
    }
    match &coded.data {
        ValueData::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        ValueData::Half(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        ValueData::Symbols(v) => {
            let width = bits_for(coded.header.alphabet().unwrap_or(1) as u64);
            let mut w = BitWriter::with_capacity(count * width as usize);
            for &s in v {
                w.write(u64::from(s), width);
            }
            out.extend(w.finish());
        }
    }
    out
}

/// Huffman body: alphabet size (u16), one code length per symbol, then the stream — over all `m`
/// entries with symbol 0 for "not sent" when the support is explicit, else over the sent entries.
fn write_huffman(coded: &Coded, symbols: &[u16], out: &mut Vec<u8>) {
    let base = coded.header.alphabet().unwrap_or(1);
    let explicit = coded.support.as_ref();
    let alphabet = base + usize::from(explicit.is_some());
    let stream: Vec<u16> = match explicit {
        Some(support) => {
            let mut dense = vec![0u16; coded.len];
            for (&i, &s) in support.iter().zip(symbols) {
                dense[i as usize] = s + 1;
            }
            dense
        }
        None => symbols.to_vec(),
    };
    let mut freqs = vec![0u64; alphabet];
    for &s in &stream {
        freqs[usize::from(s)] += 1;
    }
    if freqs.iter().all(|&f| f == 0) {
        freqs[0] = 1;
    }
    let lengths = huffman::code_lengths(&freqs);
    out.extend_from_slice(&(alphabet as u16).to_le_bytes());
    out.extend_from_slice(&lengths);
    let encoder = huffman::Encoder::new(&lengths);
    let mut w = BitWriter::with_capacity(encoder.cost(&freqs) as usize);
    for &s in &stream {
        encoder.write(&mut w, usize::from(s));
    }
    out.extend(w.finish());
}

/// Decodes one layer into `out` (its length is the layer's).
pub(crate) fn decode(header: &TensorHeader, body: &[u8], out: &mut [f32]) -> Result<(), DecodeError> {
    let len = out.len();
    if header.len as usize != len {
        return Err(DecodeError::corrupt(format!(
            "layer of {} values, the layout says {len}",
            header.len
        )));
    }
    if !header.fill.is_finite() {
        return Err(DecodeError::corrupt("fill value is not finite"));
    }
    header.values.validate()?;
    let alphabet = header.values.alphabet();
    let count = match header.support {
        SupportHeader::Dense => len,
        SupportHeader::Indices { count } | SupportHeader::Seeded { count, .. } => count as usize,
    };
    if count > len {
        return Err(DecodeError::corrupt("more entries sent than the layer holds"));
    }
    out.fill(header.fill);
    if header.encoding == BodyEncoding::Huffman {
        let Some(base) = alphabet else {
            return Err(DecodeError::corrupt("Huffman over non-symbolic values"));
        };
        return decode_huffman(header, base, count, body, out);
    }
    let mut pos = 0usize;
    let support: Option<Vec<u32>> = match header.support {
        SupportHeader::Dense => None,
        SupportHeader::Seeded { count, seed } => Some(sparsify::rand_k(len, count as usize, seed)),
        SupportHeader::Indices { count } => {
            let count = count as usize;
            let mut idx = Vec::with_capacity(count);
            match header.encoding {
                BodyEncoding::Positions => {
                    let width = bits_for(len as u64);
                    let mut r = BitReader::new(body);
                    for _ in 0..count {
                        idx.push(r.read(width)?);
                    }
                    pos = r.bytes_consumed();
                }
                BodyEncoding::Gaps => {
                    let mut previous: Option<u64> = None;
                    for _ in 0..count {
                        let gap = read_varint(body, &mut pos)?;
                        let i = match previous {
                            None => gap,
                            Some(p) => p
                                .checked_add(gap)
                                .and_then(|v| v.checked_add(1))
                                .ok_or_else(|| DecodeError::corrupt("gap overflows"))?,
                        };
                        idx.push(i);
                        previous = Some(i);
                    }
                }
                _ => {
                    let bytes = body.get(..count * 4).ok_or(DecodeError::Truncated("indices"))?;
                    idx.extend(
                        bytes
                            .chunks_exact(4)
                            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                    );
                    pos = count * 4;
                }
            }
            Some(check_indices(idx, len)?)
        }
    };
    let rest = &body[pos.min(body.len())..];
    let target = |k: usize| support.as_ref().map_or(k, |s| s[k] as usize);
    match &header.values {
        ValuesHeader::F32 | ValuesHeader::F16 | ValuesHeader::Bf16 => {
            let width = if header.values == ValuesHeader::F32 { 4 } else { 2 };
            if rest.len() != count * width {
                return Err(DecodeError::corrupt("value bytes do not match the count"));
            }
            for (k, c) in rest.chunks_exact(width).enumerate() {
                let v = if width == 4 {
                    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
                } else {
                    half_value(&header.values, u16::from_le_bytes([c[0], c[1]]))
                };
                if !v.is_finite() {
                    return Err(DecodeError::corrupt("a value is not finite"));
                }
                out[target(k)] = v;
            }
        }
        values => {
            let alphabet = alphabet.unwrap_or(1);
            let width = bits_for(alphabet as u64);
            let mut r = BitReader::new(rest);
            for k in 0..count {
                let s = r.read(width)? as usize;
                if s >= alphabet {
                    return Err(DecodeError::corrupt("symbol outside the alphabet"));
                }
                out[target(k)] = values.value(s as u16);
            }
            if r.bytes_consumed() != rest.len() {
                return Err(DecodeError::corrupt("trailing bytes after the symbols"));
            }
        }
    }
    Ok(())
}

fn check_indices(idx: Vec<u64>, len: usize) -> Result<Vec<u32>, DecodeError> {
    let mut previous: Option<u64> = None;
    for &i in &idx {
        if i >= len as u64 || previous.is_some_and(|p| i <= p) {
            return Err(DecodeError::corrupt("indices out of range or not increasing"));
        }
        previous = Some(i);
    }
    Ok(idx.into_iter().map(|i| i as u32).collect())
}

fn decode_huffman(
    header: &TensorHeader,
    base: usize,
    count: usize,
    body: &[u8],
    out: &mut [f32],
) -> Result<(), DecodeError> {
    let explicit = matches!(header.support, SupportHeader::Indices { .. });
    let alphabet = base + usize::from(explicit);
    let size = body.get(..2).ok_or(DecodeError::Truncated("Huffman table"))?;
    if usize::from(u16::from_le_bytes([size[0], size[1]])) != alphabet {
        return Err(DecodeError::corrupt("Huffman alphabet does not match the values"));
    }
    let lengths = body
        .get(2..2 + alphabet)
        .ok_or(DecodeError::Truncated("Huffman table"))?;
    let decoder = huffman::Decoder::new(lengths)?;
    let stream = &body[2 + alphabet..];
    let mut r = BitReader::new(stream);
    match header.support {
        SupportHeader::Indices { .. } => {
            let mut sent = 0usize;
            for (i, slot) in out.iter_mut().enumerate() {
                let s = decoder.read(&mut r)?;
                if s > 0 {
                    sent += 1;
                    if sent > count {
                        return Err(DecodeError::corrupt(format!(
                            "more sent entries than declared at {i}"
                        )));
                    }
                    *slot = header.values.value(s - 1);
                }
            }
            if sent != count {
                return Err(DecodeError::corrupt("fewer sent entries than declared"));
            }
        }
        SupportHeader::Dense | SupportHeader::Seeded { .. } => {
            let support = match header.support {
                SupportHeader::Seeded { count, seed } => {
                    Some(sparsify::rand_k(out.len(), count as usize, seed))
                }
                _ => None,
            };
            for k in 0..count {
                let s = decoder.read(&mut r)?;
                let i = support.as_ref().map_or(k, |s| s[k] as usize);
                out[i] = header.values.value(s);
            }
        }
    }
    if r.bytes_consumed() != stream.len() {
        return Err(DecodeError::corrupt("trailing bytes after the Huffman stream"));
    }
    Ok(())
}
