//! Which codecs suit which rules, checked when a configuration is loaded so a run that could not
//! keep its method's invariants never starts — in fl-sim and fl-server alike.
//!
//! | rule | needs | why |
//! |---|---|---|
//! | `scaffold`, `scaffold-m` | a lossless codec | the client adds its exact `δ_i` to `c_i`; the server adds what it decodes to `c`, so a lossy codec breaks `c = mean c_i` |
//! | `scallion` | an unbiased codec (rand-k, QSGD, or none) | its model step is unbiased only for `E[C(v)] = v` (ALGORITHMS.md §3.3); for biased ones use `scafcom` |
//! | `fedasync` | no sparsifier | it uploads a whole model: top-k or rand-k would zero most weights |
//! | `scafcom` and the FedAvg family | any codec | SCAFCOM's momentum tracking absorbs a biased compressor (§3.4); FedAvg-family deltas take any |

use shoal_aggregators::RuleConfig;
use shoal_compression::CodecSpec;
use thiserror::Error;

/// A codec a rule cannot take.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("rule `{rule}` cannot take codec `{codec}`: {needs}")]
pub struct PairingError {
    /// The rule.
    pub rule: &'static str,
    /// The codec chain, as written canonically.
    pub codec: String,
    /// What the rule needs, and why.
    pub needs: &'static str,
}

/// Checks that `codec` suits `rule`.
pub fn check_codec(rule: &RuleConfig, codec: &CodecSpec) -> Result<(), PairingError> {
    let needs = match rule {
        RuleConfig::Scaffold { .. } | RuleConfig::ScaffoldMomentum { .. } if !codec.is_lossless() => Some(
            "a lossless codec (no sparsifier or quantizer), because the client adds its exact δ_i to c_i while \
             the server adds what it decodes to c, so c would drift from the mean of the c_i; use scallion \
             (unbiased codecs) or scafcom (any codec) to compress control variates",
        ),
        RuleConfig::Scallion { .. } if !codec.is_unbiased() => Some(
            "an unbiased codec (randk, qsgd, or none), because its model step is unbiased only when E[C(v)] = v; \
             use scafcom for biased codecs such as topk or sign",
        ),
        RuleConfig::FedAsync if codec.sparsifier.is_some() => Some(
            "no sparsifier, because fedasync uploads the whole local model and topk/randk would zero most of its \
             weights; a quantizer (fp16, qsgd, kmeans) may be used",
        ),
        _ => None,
    };
    match needs {
        Some(needs) => Err(PairingError {
            rule: rule.name(),
            codec: codec.to_string(),
            needs,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rule::rule;

    fn codec(text: &str) -> CodecSpec {
        text.parse().expect("a valid codec chain")
    }

    fn every_rule() -> Vec<RuleConfig> {
        [
            "rule = \"fedavg\"",
            "rule = \"fedavgm\"",
            "rule = \"fedavg-m\"\nbeta = 0.5\nglobal_step = 1.0",
            "rule = \"scaffold\"",
            "rule = \"scaffold-m\"\nbeta = 0.5\nglobal_step = 1.0",
            "rule = \"scallion\"\nalpha = 0.5",
            "rule = \"scafcom\"",
            "rule = \"fedasync\"",
            "rule = \"fedbuff\"",
            "rule = \"fedfix\"",
            "rule = \"fedcompass\"",
        ]
        .into_iter()
        .map(rule)
        .collect()
    }

    #[test]
    fn every_rule_takes_a_lossless_codec() {
        for r in every_rule() {
            for c in ["identity", "zstd(1)"] {
                assert_eq!(check_codec(&r, &codec(c)), Ok(()), "{} with {c}", r.name());
            }
        }
    }

    #[test]
    fn refused_pairs_name_the_rule_the_codec_and_the_need() {
        for (r, c, need) in [
            ("rule = \"scaffold\"", "topk(0.1)", "lossless"),
            ("rule = \"scaffold\"", "fedzip", "lossless"),
            (
                "rule = \"scaffold-m\"\nbeta = 0.5\nglobal_step = 1.0",
                "qsgd(8)",
                "lossless",
            ),
            ("rule = \"scallion\"\nalpha = 0.5", "topk(0.01)", "unbiased"),
            ("rule = \"scallion\"\nalpha = 0.5", "sign", "unbiased"),
            ("rule = \"fedasync\"", "topk(0.2)", "no sparsifier"),
            ("rule = \"fedasync\"", "randk(0.2)", "no sparsifier"),
        ] {
            let r = rule(r);
            let err = check_codec(&r, &codec(c)).expect_err("a refused pair");
            let text = err.to_string();
            assert!(text.contains(r.name()), "{text}");
            assert!(text.contains(&codec(c).to_string()), "{text}");
            assert!(text.contains(need), "{text}");
        }
    }

    #[test]
    fn the_rules_that_compress_take_what_suits_them() {
        let ok = [
            ("rule = \"scallion\"\nalpha = 0.5", "randk(0.01)"),
            (
                "rule = \"scallion\"\nalpha = 0.5",
                "randk(0.1) | qsgd(8) | huffman",
            ),
            ("rule = \"scafcom\"", "topk(0.01)"),
            ("rule = \"scafcom\"", "sign"),
            ("rule = \"fedavg\"", "fedzip"),
            ("rule = \"fedbuff\"", "topk(0.1) | kmeans(3) | huffman"),
            ("rule = \"fedasync\"", "fp16"),
        ];
        for (r, c) in ok {
            assert_eq!(check_codec(&rule(r), &codec(c)), Ok(()), "{r} with {c}");
        }
    }
}
