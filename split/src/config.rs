//! The `[split]` table of fl-sim experiments and fl-server configurations.
//!
//! ```toml
//! [split]
//! cut = "pool1"                        # the layer after which the model is cut
//! bottleneck = { channels = 3 }        # optional encoder/decoder pair at the cut
//! variant = "v1"                       # v1: a tail copy per client, averaged; v2: one tail, clients in turn
//! activations = "int8 | zstd(1)"       # cut codec of the forward message (f32, int8, int8-tensor; | zstd(L))
//! gradients = "f32"                    # cut codec of the returned gradient
//! momentum = 0.0                       # SGD momentum on both sides (learning rate: [algorithm] local_lr)
//! weight_decay = 0.0
//! pipeline = 1                         # batches a device keeps in flight (fl-client)
//! ```

use crate::error::SplitError;
use crate::head::HeadRunner;
use crate::server::TailSession;
use serde::{Deserialize, Serialize};
use shoal_aggregators::{AlgorithmConfig, RuleConfig, SchedulerConfig};
use shoal_compression::cut::CutCodec;
use shoal_model::Model;
use shoal_model::split::{BottleneckSpec, SplitModel};
use shoal_model::train::SgdConfig;
use std::sync::Arc;

/// SplitFed's two ways of serving many clients (ALGORITHMS.md §8.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitVariant {
    /// A server-side tail copy per client, trained in parallel and averaged each round.
    #[default]
    V1,
    /// One server-side tail, updated after every minibatch, serving clients in turn.
    V2,
}

fn default_pipeline() -> usize {
    1
}

/// `[split]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Name of the layer after which the model is cut.
    pub cut: String,
    /// A learned bottleneck at the cut (1×1 convolution for image tensors, dense for vectors).
    #[serde(default)]
    pub bottleneck: Option<BottleneckSpec>,
    /// SplitFed V1 or V2.
    #[serde(default)]
    pub variant: SplitVariant,
    /// Codec of the activations sent forward.
    #[serde(default = "CutCodec::default_activations")]
    pub activations: CutCodec,
    /// Codec of the gradients sent back.
    #[serde(default = "CutCodec::default_gradients")]
    pub gradients: CutCodec,
    /// SGD momentum of both sides.
    #[serde(default)]
    pub momentum: f32,
    /// SGD weight decay of both sides.
    #[serde(default)]
    pub weight_decay: f32,
    /// Batches a device keeps in flight before it waits for a gradient.
    #[serde(default = "default_pipeline")]
    pub pipeline: usize,
}

impl SplitConfig {
    /// A V1 configuration cutting after `cut`, with the default codecs and plain SGD.
    pub fn new(cut: impl Into<String>) -> Self {
        Self {
            cut: cut.into(),
            bottleneck: None,
            variant: SplitVariant::V1,
            activations: CutCodec::default_activations(),
            gradients: CutCodec::default_gradients(),
            momentum: 0.0,
            weight_decay: 0.0,
            pipeline: 1,
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), SplitError> {
        if self.pipeline == 0 {
            return Err(SplitError::Config("pipeline must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(SplitError::Config(format!(
                "momentum must be in [0, 1), got {}",
                self.momentum
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(SplitError::Config(format!(
                "weight_decay must be non-negative, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }

    /// Checks that `[algorithm]` can drive split training: heads (and V1 tails) are averaged as
    /// SplitFed does — FedAvg at server learning rate 1 — in synchronous rounds.
    pub fn check_algorithm(&self, algorithm: &AlgorithmConfig) -> Result<(), SplitError> {
        if !matches!(algorithm.rule, RuleConfig::FedAvg { server_lr } if server_lr == 1.0) {
            return Err(SplitError::Config(
                "split runs average heads (and V1 tails) as SplitFed does: [algorithm.rule] must be \
                 `fedavg` with server_lr = 1"
                    .into(),
            ));
        }
        if !matches!(algorithm.scheduler, SchedulerConfig::Sync(_)) {
            return Err(SplitError::Config(
                "split runs train in synchronous rounds: [algorithm.scheduler] must be `sync`".into(),
            ));
        }
        Ok(())
    }

    /// Cuts `whole` as configured.
    pub fn cut_model(&self, whole: &Model) -> Result<SplitModel, SplitError> {
        self.validate()?;
        Ok(whole.split(&self.cut, self.bottleneck.as_ref())?)
    }

    /// The device side of a task: `model`'s head from `params`, training at `lr`, sending with
    /// the activation codec, for minibatches of at most `max_batch`.
    pub fn head_runner(
        &self,
        model: Arc<SplitModel>,
        params: Vec<f32>,
        lr: f32,
        max_batch: usize,
    ) -> HeadRunner {
        HeadRunner::new(model, params, self.sgd(lr), self.activations, max_batch)
    }

    /// A server-side tail from `params`, training at `lr`, answering with the gradient codec, for
    /// minibatches of at most `max_batch`.
    pub fn tail_session(
        &self,
        model: Arc<SplitModel>,
        params: Vec<f32>,
        lr: f32,
        max_batch: usize,
    ) -> TailSession {
        TailSession::new(model, params, self.sgd(lr), self.gradients, max_batch)
    }

    /// The optimiser of both sides at learning rate `lr`.
    pub fn sgd(&self, lr: f32) -> SgdConfig {
        SgdConfig {
            lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_parses_with_defaults_and_refuses_nonsense() {
        let c: SplitConfig = toml::from_str("cut = \"pool1\"\nbottleneck = { channels = 3 }").unwrap();
        assert_eq!(c.variant, SplitVariant::V1);
        assert_eq!(c.activations.to_string(), "int8 | zstd(1)");
        assert_eq!(c.gradients.to_string(), "f32");
        assert_eq!(c.bottleneck.as_ref().map(|b| b.channels), Some(3));
        let v2: SplitConfig =
            toml::from_str("cut = \"fc1\"\nvariant = \"v2\"\ngradients = \"int8\"").unwrap();
        assert_eq!(v2.variant, SplitVariant::V2);
        assert!(toml::from_str::<SplitConfig>("cut = \"a\"\nvariant = \"v3\"").is_err());
        assert!(toml::from_str::<SplitConfig>("cut = \"a\"\nactivations = \"int4\"").is_err());
        assert!(toml::from_str::<SplitConfig>("cut = \"a\"\nspeed = 1").is_err());
        let mut bad = SplitConfig::new("a");
        bad.pipeline = 0;
        assert!(bad.validate().is_err());
    }
}
