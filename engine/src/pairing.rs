//! Which codecs suit which rules, checked when a configuration is loaded so a run that could not
//! keep its method's invariants never starts — in fl-sim and fl-server alike.
//!
//! | rule | needs | why |
//! |---|---|---|
//! | `scaffold`, `scaffold-m` | a lossless codec | the client adds its exact `δ_i` to `c_i`; the server adds what it decodes to `c`, so a lossy codec breaks `c = mean c_i` |
//! | `scallion` | an unbiased codec (rand-k, QSGD, or none) | its model step is unbiased only for `E[C(v)] = v` (ALGORITHMS.md §3.3); for biased ones use `scafcom` |
//! | `fedasync` | no sparsifier | it uploads a whole model: top-k or rand-k would zero most weights |
//! | `scafcom` and the FedAvg family | any codec | SCAFCOM's momentum tracking absorbs a biased compressor (§3.4); FedAvg-family deltas take any |
//!
//! Error feedback (`feedback = "ef"` or `"ef21"`) wraps the codec of a dense upload, so it needs a
//! lossy codec (with a lossless one it does nothing) and a rule whose upload the codec encodes:
//! not SCALLION or SCAFCOM, which compress inside the rule with their own correction, nor FedAsync,
//! which uploads a model rather than an update.

use shoal_aggregators::{AlgorithmConfig, ConfigError, RuleConfig};
use shoal_compression::CodecSpec;
use shoal_compression::feedback::Feedback;
use thiserror::Error;

/// Error feedback a rule and codec cannot take.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("feedback `{feedback}` cannot run with rule `{rule}` and codec `{codec}`: {reason}")]
pub struct FeedbackError {
    /// The feedback asked for.
    pub feedback: Feedback,
    /// The rule.
    pub rule: &'static str,
    /// The codec chain, as written canonically.
    pub codec: String,
    /// Why not.
    pub reason: &'static str,
}

/// Checks that `feedback` can wrap `codec` for `rule`.
pub fn check_feedback(rule: &RuleConfig, codec: &CodecSpec, feedback: Feedback) -> Result<(), FeedbackError> {
    if feedback == Feedback::None {
        return Ok(());
    }
    let reason = match rule {
        RuleConfig::Scallion { .. } | RuleConfig::Scafcom { .. } => Some(
            "the rule compresses its own upload inside its update, with its own correction of the compression              error; set feedback = \"none\"",
        ),
        RuleConfig::FedAsync => Some(
            "fedasync uploads the whole local model, not an update, and error feedback carries an update's              dropped part into the next one",
        ),
        _ if codec.is_lossless() => Some(
            "the codec is lossless, so there is no compression error to feed back; add a sparsifier or a              quantizer (e.g. topk(0.01)) or set feedback = \"none\"",
        ),
        _ => None,
    };
    match reason {
        Some(reason) => Err(FeedbackError {
            feedback,
            rule: rule.name(),
            codec: codec.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

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

/// Why a method — `[algorithm]`, `codec`, `feedback` — cannot run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MethodError {
    /// The `[algorithm]` table does not build.
    #[error("[algorithm]: {0}")]
    Algorithm(#[from] ConfigError),
    /// The codec does not suit the rule.
    #[error(transparent)]
    Codec(#[from] PairingError),
    /// The feedback does not suit the rule and codec.
    #[error(transparent)]
    Feedback(#[from] FeedbackError),
    /// Error feedback was asked of a split-learning run.
    #[error("error feedback applies to federated uploads, not to split runs; set feedback = \"none\"")]
    FeedbackOnSplit,
}

/// Checks a method as fl-sim and fl-server both load it: the `[algorithm]` table builds with
/// `seed`, the codec suits the rule, and the feedback suits both (and is off in a `split` run).
pub fn check_method(
    algorithm: &AlgorithmConfig,
    codec: &CodecSpec,
    feedback: Feedback,
    seed: u64,
    split: bool,
) -> Result<(), MethodError> {
    check_codec(&algorithm.rule, codec)?;
    check_feedback(&algorithm.rule, codec, feedback)?;
    if split && feedback != Feedback::None {
        return Err(MethodError::FeedbackOnSplit);
    }
    algorithm.build(seed)?;
    Ok(())
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

    #[test]
    fn feedback_needs_a_lossy_codec_on_a_dense_upload() {
        for feedback in [Feedback::Ef, Feedback::Ef21] {
            for r in [
                "rule = \"fedavg\"",
                "rule = \"fedbuff\"",
                "rule = \"fedavg-m\"\nbeta = 0.5\nglobal_step = 1.0",
            ] {
                assert_eq!(
                    check_feedback(&rule(r), &codec("topk(0.01)"), feedback),
                    Ok(()),
                    "{r}"
                );
            }
            for (r, c, why) in [
                ("rule = \"fedavg\"", "identity", "lossless"),
                ("rule = \"scaffold\"", "zstd(1)", "lossless"),
                ("rule = \"scafcom\"", "topk(0.01)", "its own upload"),
                (
                    "rule = \"scallion\"\nalpha = 0.5",
                    "randk(0.01)",
                    "its own upload",
                ),
                ("rule = \"fedasync\"", "qsgd(8)", "whole local model"),
            ] {
                let r = rule(r);
                let text = check_feedback(&r, &codec(c), feedback)
                    .expect_err("refused")
                    .to_string();
                for needle in [r.name(), &codec(c).to_string(), &feedback.to_string(), why] {
                    assert!(text.contains(needle), "{text} lacks {needle}");
                }
            }
            for r in every_rule() {
                assert_eq!(check_feedback(&r, &codec("identity"), Feedback::None), Ok(()));
            }
        }
    }

    #[test]
    fn a_method_is_checked_whole() {
        #[derive(serde::Deserialize)]
        struct Wrap {
            algorithm: AlgorithmConfig,
        }
        let algorithm = |text: &str| -> AlgorithmConfig {
            toml::from_str::<Wrap>(&format!("[algorithm]\n{text}"))
                .expect("a valid table")
                .algorithm
        };
        let fedavg = algorithm("local_steps = 2\nlocal_lr = 0.1\n[algorithm.rule]\nrule = \"fedavg\"");
        assert_eq!(
            check_method(&fedavg, &codec("topk(0.1)"), Feedback::Ef, 0, false),
            Ok(())
        );
        assert_eq!(
            check_method(&fedavg, &codec("topk(0.1)"), Feedback::Ef, 0, true),
            Err(MethodError::FeedbackOnSplit)
        );
        assert!(matches!(
            check_method(&fedavg, &codec("identity"), Feedback::Ef, 0, false),
            Err(MethodError::Feedback(_))
        ));
        let no_steps = algorithm("local_steps = 0\nlocal_lr = 0.1\n[algorithm.rule]\nrule = \"fedavg\"");
        let err = check_method(&no_steps, &codec("identity"), Feedback::None, 0, false).expect_err("refused");
        assert!(
            matches!(err, MethodError::Algorithm(_)) && err.to_string().starts_with("[algorithm]"),
            "{err}"
        );
    }
}
