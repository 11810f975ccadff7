//! The codec chain: what a configuration says and what a payload names.
//!
//! A chain is written as stages joined by `|`, in order sparsifier → quantizer → encoder → zstd,
//! each optional:
//!
//! | stage | meaning |
//! |---|---|
//! | `topk(z)` | keep the `⌈z·m⌉` largest magnitudes of each layer (exact k, lower index wins ties) |
//! | `randk(z)` | keep `⌈z·m⌉` entries drawn from a seed the payload carries, scaled by `m/k` (unbiased) |
//! | `kmeans(k)` | 1-D k-means: 0 pinned as an exact centroid, `k − 1` centroids on the non-zeros |
//! | `kmeans(k, official)` | FedZip's code: `k` centroids over all entries, init min/mid/max, 4 iterations |
//! | `qsgd(s)` | stochastic uniform quantisation on `s` levels of the layer's L2 norm (unbiased) |
//! | `sign` | scaled sign: `sign(v) · mean|v|` |
//! | `fp16`, `bf16`, `int8` | casts (`int8`: affine min/max per layer) |
//! | `huffman` | canonical Huffman over the quantizer's symbols (absent entries are a symbol) |
//! | `positions` | kept positions as fixed-width `⌈log₂ m⌉`-bit indices |
//! | `gaps` | kept positions as LEB128 gaps |
//! | `smallest` | whichever of `huffman`, `positions`, `gaps` is smallest, per layer (FedZip) |
//! | `zstd(level)` | zstd over the whole body |
//! | `dense1d` | leave 1-D tensors (biases) dense f32 |
//!
//! `fedzip` stands for `topk(0.2) | kmeans(3) | smallest | dense1d`; `identity` (or an empty chain)
//! sends dense f32. In TOML a chain is a string (`codec = "topk(0.2) | kmeans(3) | huffman"`) or a
//! table with a list of stages (`[codec]` / `stages = ["topk(0.2)", "kmeans(3)", "huffman"]`).

use crate::error::CodecError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Which entries of a layer are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsifier {
    /// The largest magnitudes, a fraction `z` of each layer.
    TopK(f64),
    /// Entries drawn from the payload's seed, a fraction `z`, scaled by `m/k`.
    RandK(f64),
}

/// How kept values are represented.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantizer {
    /// 1-D k-means with `clusters` centroids.
    KMeans {
        /// Number of centroids, the exact zero included in the pinned mode.
        clusters: u8,
        /// FedZip's reference behaviour instead of the pinned-zero mode.
        official: bool,
    },
    /// QSGD with `levels` levels.
    Qsgd {
        /// Levels `s ≥ 1`.
        levels: u16,
    },
    /// Scaled sign.
    Sign,
    /// IEEE half precision.
    Fp16,
    /// bfloat16.
    Bf16,
    /// 8-bit affine (min/max per layer).
    Int8,
}

impl Quantizer {
    /// True when the quantizer produces symbols from a small alphabet (so Huffman applies).
    pub fn is_symbolic(&self) -> bool {
        matches!(
            self,
            Quantizer::KMeans { .. } | Quantizer::Qsgd { .. } | Quantizer::Sign | Quantizer::Int8
        )
    }
}

/// How the kept positions and symbols are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoder {
    /// Positions as u32, symbols bit-packed, raw values little-endian.
    #[default]
    Packed,
    /// Canonical Huffman over symbols.
    Huffman,
    /// Fixed-width positions.
    Positions,
    /// Gap-coded positions.
    Gaps,
    /// The smallest of Huffman, positions and gaps, per layer.
    Smallest,
}

/// A parsed codec chain.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CodecSpec {
    /// The sparsifier stage.
    pub sparsifier: Option<Sparsifier>,
    /// The quantizer stage.
    pub quantizer: Option<Quantizer>,
    /// The encoder stage.
    pub encoder: Encoder,
    /// zstd level of the final stage.
    pub zstd: Option<i32>,
    /// Leave 1-D tensors dense.
    pub dense_1d: bool,
}

impl CodecSpec {
    /// FedZip at its defaults: `topk(0.2) | kmeans(3) | smallest | dense1d`.
    pub fn fedzip() -> Self {
        Self {
            sparsifier: Some(Sparsifier::TopK(0.2)),
            quantizer: Some(Quantizer::KMeans {
                clusters: 3,
                official: false,
            }),
            encoder: Encoder::Smallest,
            zstd: None,
            dense_1d: true,
        }
    }

    /// Dense f32: lossless, no compression.
    pub fn identity() -> Self {
        Self::default()
    }

    /// True when every stage is lossless.
    pub fn is_lossless(&self) -> bool {
        self.sparsifier.is_none() && self.quantizer.is_none()
    }

    /// True when `E[decode(encode(v))] = v`: only rand-k and QSGD (or nothing) are lossy.
    pub fn is_unbiased(&self) -> bool {
        !matches!(self.sparsifier, Some(Sparsifier::TopK(_)))
            && matches!(self.quantizer, None | Some(Quantizer::Qsgd { .. }))
    }

    fn check(&self, text: &str) -> Result<(), CodecError> {
        let fail = |reason: String| {
            Err(CodecError::Spec {
                spec: text.to_string(),
                reason,
            })
        };
        if let Some(Sparsifier::TopK(z) | Sparsifier::RandK(z)) = self.sparsifier
            && !(z.is_finite() && z > 0.0 && z <= 1.0)
        {
            return fail(format!("the kept fraction must be in (0, 1], got {z}"));
        }
        match self.quantizer {
            Some(Quantizer::KMeans { clusters, official }) => {
                let min = if official { 1 } else { 2 };
                if !(min..=16).contains(&clusters) {
                    return fail(format!("kmeans needs {min} to 16 clusters, got {clusters}"));
                }
            }
            Some(Quantizer::Qsgd { levels }) if levels == 0 || levels > 1024 => {
                return fail(format!("qsgd needs 1 to 1024 levels, got {levels}"));
            }
            _ => {}
        }
        if self.encoder == Encoder::Huffman && !self.quantizer.is_some_and(|q| q.is_symbolic()) {
            return fail("huffman codes quantizer symbols: put kmeans, qsgd, sign or int8 before it".into());
        }
        if let Some(level) = self.zstd
            && !(1..=22).contains(&level)
        {
            return fail(format!("zstd level must be 1 to 22, got {level}"));
        }
        Ok(())
    }
}

fn parse_args(stage: &str) -> Result<(&str, Vec<&str>), String> {
    match stage.split_once('(') {
        None => Ok((stage, Vec::new())),
        Some((name, rest)) => {
            let inner = rest
                .strip_suffix(')')
                .ok_or_else(|| format!("`{stage}` lacks a closing parenthesis"))?;
            Ok((name.trim(), inner.split(',').map(str::trim).collect()))
        }
    }
}

fn number<T: FromStr>(stage: &str, args: &[&str]) -> Result<T, String> {
    match args {
        [one] => one
            .parse()
            .map_err(|_| format!("`{stage}`: `{one}` is not a valid number")),
        _ => Err(format!("`{stage}` takes one number")),
    }
}

impl FromStr for CodecSpec {
    type Err = CodecError;

    fn from_str(text: &str) -> Result<Self, CodecError> {
        let stages: Vec<&str> = text.split('|').map(str::trim).filter(|s| !s.is_empty()).collect();
        Self::from_stages(text, &stages)
    }
}

impl CodecSpec {
    /// Parses a list of stages (the TOML table form).
    fn from_stages(text: &str, stages: &[&str]) -> Result<Self, CodecError> {
        let fail = |reason: String| CodecError::Spec {
            spec: text.to_string(),
            reason,
        };
        let mut spec = CodecSpec::default();
        // 0 sparsifier, 1 quantizer, 2 encoder, 3 zstd: stages must come in this order.
        let mut last_rank = None;
        for &stage in stages {
            let (name, args) = parse_args(stage).map_err(&fail)?;
            let rank = match name {
                "fedzip" | "identity" | "f32" | "dense1d" => None,
                "topk" | "randk" => Some(0),
                "kmeans" | "qsgd" | "sign" | "fp16" | "bf16" | "int8" => Some(1),
                "huffman" | "positions" | "gaps" | "smallest" => Some(2),
                "zstd" => Some(3),
                other => return Err(fail(format!("unknown stage `{other}`"))),
            };
            if let Some(rank) = rank {
                if last_rank.is_some_and(|last| last >= rank) {
                    return Err(fail(format!(
                        "`{stage}` is out of place: the order is sparsifier | quantizer | encoder | zstd, one of each"
                    )));
                }
                last_rank = Some(rank);
            }
            if !args.is_empty() && !matches!(name, "topk" | "randk" | "kmeans" | "qsgd" | "zstd") {
                return Err(fail(format!("`{name}` takes no arguments")));
            }
            match name {
                "fedzip" => {
                    if last_rank.is_some() {
                        return Err(fail(
                            "`fedzip` is a whole chain; only `zstd(level)` may follow it".into(),
                        ));
                    }
                    spec = CodecSpec::fedzip();
                    last_rank = Some(2);
                }
                "dense1d" => spec.dense_1d = true,
                "topk" => spec.sparsifier = Some(Sparsifier::TopK(number(stage, &args).map_err(&fail)?)),
                "randk" => spec.sparsifier = Some(Sparsifier::RandK(number(stage, &args).map_err(&fail)?)),
                "kmeans" => {
                    let (clusters, official) = match args.as_slice() {
                        [k] => (*k, false),
                        [k, "official"] => (*k, true),
                        [k, "pinned"] => (*k, false),
                        _ => return Err(fail(format!("`{stage}`: write kmeans(k) or kmeans(k, official)"))),
                    };
                    let clusters = number(stage, &[clusters]).map_err(&fail)?;
                    spec.quantizer = Some(Quantizer::KMeans { clusters, official });
                }
                "qsgd" => {
                    spec.quantizer = Some(Quantizer::Qsgd {
                        levels: number(stage, &args).map_err(&fail)?,
                    })
                }
                "sign" => spec.quantizer = Some(Quantizer::Sign),
                "fp16" => spec.quantizer = Some(Quantizer::Fp16),
                "bf16" => spec.quantizer = Some(Quantizer::Bf16),
                "int8" => spec.quantizer = Some(Quantizer::Int8),
                "huffman" => spec.encoder = Encoder::Huffman,
                "positions" => spec.encoder = Encoder::Positions,
                "gaps" => spec.encoder = Encoder::Gaps,
                "smallest" => spec.encoder = Encoder::Smallest,
                "zstd" => spec.zstd = Some(number(stage, &args).map_err(&fail)?),
                // "identity" and "f32" add nothing; unknown names were refused above.
                _ => {}
            }
        }
        spec.check(text)?;
        Ok(spec)
    }
}

impl fmt::Display for CodecSpec {
    /// The canonical chain, which parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut stages: Vec<String> = Vec::new();
        match self.sparsifier {
            Some(Sparsifier::TopK(z)) => stages.push(format!("topk({z})")),
            Some(Sparsifier::RandK(z)) => stages.push(format!("randk({z})")),
            None => {}
        }
        match self.quantizer {
            Some(Quantizer::KMeans { clusters, official }) => stages.push(if official {
                format!("kmeans({clusters}, official)")
            } else {
                format!("kmeans({clusters})")
            }),
            Some(Quantizer::Qsgd { levels }) => stages.push(format!("qsgd({levels})")),
            Some(Quantizer::Sign) => stages.push("sign".into()),
            Some(Quantizer::Fp16) => stages.push("fp16".into()),
            Some(Quantizer::Bf16) => stages.push("bf16".into()),
            Some(Quantizer::Int8) => stages.push("int8".into()),
            None => {}
        }
        match self.encoder {
            Encoder::Packed => {}
            Encoder::Huffman => stages.push("huffman".into()),
            Encoder::Positions => stages.push("positions".into()),
            Encoder::Gaps => stages.push("gaps".into()),
            Encoder::Smallest => stages.push("smallest".into()),
        }
        if let Some(level) = self.zstd {
            stages.push(format!("zstd({level})"));
        }
        if self.dense_1d {
            stages.push("dense1d".into());
        }
        if stages.is_empty() {
            return f.write_str("identity");
        }
        f.write_str(&stages.join(" | "))
    }
}

impl Serialize for CodecSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CodecSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Table { stages: Vec<String> },
        }
        match Repr::deserialize(deserializer)? {
            Repr::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Repr::Table { stages } => {
                let refs: Vec<&str> = stages.iter().map(|s| s.trim()).collect();
                CodecSpec::from_stages(&stages.join(" | "), &refs).map_err(serde::de::Error::custom)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_parse_and_print_back() {
        for text in [
            "identity",
            "topk(0.2) | kmeans(3) | huffman | zstd(1)",
            "randk(0.1) | qsgd(16) | huffman",
            "topk(0.05) | kmeans(4, official) | gaps",
            "sign | huffman",
            "fp16 | zstd(3)",
            "topk(0.2) | kmeans(3) | smallest | dense1d",
            "int8 | positions",
        ] {
            let spec: CodecSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
            assert_eq!(spec.to_string().parse::<CodecSpec>().unwrap(), spec);
        }
        assert_eq!("fedzip".parse::<CodecSpec>().unwrap(), CodecSpec::fedzip());
        assert_eq!("fedzip | zstd(1)".parse::<CodecSpec>().unwrap().zstd, Some(1));
        assert_eq!("".parse::<CodecSpec>().unwrap(), CodecSpec::identity());
    }

    #[test]
    fn bad_chains_say_what_is_wrong() {
        for (text, why) in [
            ("topk(1.5)", "(0, 1]"),
            ("kmeans(3) | topk(0.2)", "out of place"),
            ("huffman", "quantizer symbols"),
            ("fp16 | huffman", "quantizer symbols"),
            ("topk(x)", "not a valid number"),
            ("lz4", "unknown stage"),
            ("kmeans(1)", "2 to 16"),
            ("qsgd(0)", "1 to 1024"),
            ("zstd(40)", "1 to 22"),
            ("topk(0.2", "closing parenthesis"),
            ("sign(2)", "no arguments"),
        ] {
            let err = text.parse::<CodecSpec>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn reads_from_toml_as_a_string_or_a_table() {
        #[derive(Deserialize)]
        struct Config {
            codec: CodecSpec,
        }
        let a: Config = toml::from_str("codec = \"topk(0.2) | kmeans(3) | huffman\"").unwrap();
        let b: Config =
            toml::from_str("[codec]\nstages = [\"topk(0.2)\", \"kmeans(3)\", \"huffman\"]").unwrap();
        assert_eq!(a.codec, b.codec);
        assert!(toml::from_str::<Config>("codec = \"topk(2)\"").is_err());
    }

    #[test]
    fn bias_and_unbiasedness_follow_the_stages() {
        assert!("randk(0.1) | qsgd(4)".parse::<CodecSpec>().unwrap().is_unbiased());
        assert!(!"topk(0.1)".parse::<CodecSpec>().unwrap().is_unbiased());
        assert!(!"sign".parse::<CodecSpec>().unwrap().is_unbiased());
        assert!("zstd(1)".parse::<CodecSpec>().unwrap().is_lossless());
    }
}
