//! The `[algorithm]` table — local work, `[algorithm.rule]` (which method runs, with which
//! parameters) and `[algorithm.scheduler]` — shared by fl-sim and fl-server.
//!
//! ```toml
//! [algorithm.rule]
//! rule = "scallion"      # fedavg | fedavgm | fedavg-m | scaffold | scaffold-m | scallion | scafcom
//!                        # | fedasync | fedbuff | fedfix | fedcompass
//! global_lr = 1.0
//! alpha = 0.1
//! ```

use crate::coordinator::Coordinator;
use crate::rule::{ClientRule, LocalTask, ServerRule};
use crate::rules::fedasync::{FedAsyncServer, ModelUploadClient};
use crate::rules::fedavg::{FedAvgServer, LocalSgdClient};
use crate::rules::fedavg_m::{FedAvgMomentumClient, FedAvgMomentumServer};
use crate::rules::fedavgm::FedAvgMServer;
use crate::rules::fedbuff::FedBuffServer;
use crate::rules::fedcompass::FedCompassServer;
use crate::rules::fedfix::FedFixServer;
use crate::rules::scafcom::{ScafcomClient, ScafcomServer};
use crate::rules::scaffold::{ScaffoldClient, ScaffoldServer, Uplink};
use crate::rules::scaffold_m::{ScaffoldMomentumClient, ScaffoldMomentumServer};
use crate::rules::scallion::{AlphaPlacement, ScallionClient, ScallionServer};
use crate::schedulers::sync::SyncConfig;
use crate::schedulers::{SchedulerConfig, check_pairing};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use thiserror::Error;

/// A configuration that cannot run, and why.
#[derive(Debug, Error, Clone, PartialEq)]
#[error("invalid {subject}: {reason}")]
pub struct ConfigError {
    /// What is misconfigured (a rule, a scheduler, or a pairing of the two).
    pub subject: String,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    /// An error about `subject`.
    pub fn new(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            reason: reason.into(),
        }
    }
}

/// A method and its parameters, tagged by `rule = "…"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", deny_unknown_fields)]
pub enum RuleConfig {
    /// FedAvg with a server learning rate (§1).
    #[serde(rename = "fedavg")]
    FedAvg {
        /// Server learning rate `η_g` (1 = plain FedAvg).
        #[serde(default = "one")]
        server_lr: f32,
    },
    /// FedAvgM: FedAvg with server momentum (§1).
    #[serde(rename = "fedavgm")]
    FedAvgM {
        /// Server learning rate `η_g`.
        #[serde(default = "one")]
        server_lr: f32,
        /// Server momentum `μ`.
        #[serde(default = "default_server_momentum")]
        momentum: f32,
    },
    /// FedAvg-M: global direction blended into local steps (§2.1, §2.3).
    #[serde(rename = "fedavg-m")]
    FedAvgMomentum {
        /// Weight β of the fresh gradient (1 = FedAvg).
        beta: f32,
        /// Global step γ (`η K` makes β = 1 exactly FedAvg).
        global_step: f32,
        /// FedAvg-M-VR.
        #[serde(default)]
        variance_reduced: bool,
    },
    /// SCAFFOLD (§3.1, §3.2).
    #[serde(rename = "scaffold")]
    Scaffold {
        /// Global learning rate `η_g`.
        #[serde(default = "one")]
        global_lr: f32,
        /// `two_vectors` (original) or `halved`.
        #[serde(default)]
        uplink: Uplink,
    },
    /// SCAFFOLD-M (§2.2, §2.3).
    #[serde(rename = "scaffold-m")]
    ScaffoldMomentum {
        /// Weight β of the fresh corrected gradient (1 = SCAFFOLD).
        beta: f32,
        /// Global step γ.
        global_step: f32,
        /// `two_vectors` or `halved`.
        #[serde(default)]
        uplink: Uplink,
        /// SCAFFOLD-M-VR.
        #[serde(default)]
        variance_reduced: bool,
    },
    /// SCALLION: unbiased compression (§3.3).
    #[serde(rename = "scallion")]
    Scallion {
        /// Global learning rate `η_g`.
        #[serde(default = "one")]
        global_lr: f32,
        /// Scaling factor α ∈ (0, 1].
        alpha: f32,
        /// `control_variates` (default) or `payload`.
        #[serde(default)]
        alpha_placement: AlphaPlacement,
    },
    /// SCAFCOM: biased compression with local momentum (§3.4).
    #[serde(rename = "scafcom")]
    Scafcom {
        /// Global learning rate `η_g`.
        #[serde(default = "one")]
        global_lr: f32,
        /// Local momentum β ∈ (0, 1].
        #[serde(default = "default_scafcom_beta")]
        beta: f32,
    },
    /// FedAsync: each arrival mixed into the model with weight `α s(staleness)` (§4.3).
    #[serde(rename = "fedasync")]
    FedAsync,
    /// FedBuff: buffered deltas averaged over the buffer (§4.2).
    #[serde(rename = "fedbuff")]
    FedBuff {
        /// Server learning rate `η_g`.
        #[serde(default = "one")]
        server_lr: f32,
    },
    /// FedFix: deltas summed with period-corrected weights every `Δt` (§4.1).
    #[serde(rename = "fedfix")]
    FedFix {
        /// Server learning rate `η_g`.
        #[serde(default = "one")]
        server_lr: f32,
    },
    /// FedCompass: group aggregation with weights `α s(staleness) / N` (§5.6).
    #[serde(rename = "fedcompass")]
    FedCompass,
}

fn one() -> f32 {
    1.0
}
fn default_server_momentum() -> f32 {
    0.9
}
fn default_scafcom_beta() -> f32 {
    0.2
}

/// Both halves of a configured method.
#[derive(Debug)]
pub struct Algorithm {
    /// The server half.
    pub server: Arc<dyn ServerRule>,
    /// The client half.
    pub client: Box<dyn ClientRule>,
}

/// The `[algorithm]` table: a rule, the scheduler it runs under, and the local work of a task.
///
/// ```toml
/// [algorithm]
/// local_steps = 20        # K (FedCompass picks its own within [q_min, q_max])
/// local_lr = 0.05
///
/// [algorithm.rule]
/// rule = "fedavg"
///
/// [algorithm.scheduler]
/// scheduler = "sync"
/// clients_per_round = 10
/// deadline_s = 120
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgorithmConfig {
    /// Local steps per task `K` where the scheduler does not choose them.
    #[serde(default = "default_local_steps")]
    pub local_steps: u32,
    /// Local learning rate `η_l`.
    #[serde(default = "default_local_lr")]
    pub local_lr: f32,
    /// Failed tasks in a row after which a client is evicted (0: never).
    #[serde(default = "default_evict_after_failures")]
    pub evict_after_failures: u32,
    /// The most training samples a client may declare; a larger declaration counts as this many
    /// (a device's count is its own claim, and the default weights follow it).
    #[serde(default = "default_max_samples_per_client")]
    pub max_samples_per_client: u64,
    /// Seconds a task may run, from its assignment, before it fails and its client is told to drop
    /// it (none: no limit). It counts as a failed task toward `evict_after_failures`. fl-server's
    /// template sets it, so that a client that takes a task and never answers cannot hold a round;
    /// in fl-sim it cuts off the slowest devices as a deployment would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_timeout_s: Option<f64>,
    /// The method.
    pub rule: RuleConfig,
    /// When and with what weights it aggregates.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
}

fn default_local_steps() -> u32 {
    10
}
fn default_local_lr() -> f32 {
    0.01
}
fn default_evict_after_failures() -> u32 {
    3
}
/// 10⁹ samples: more than any single device holds, and 10⁶ such clients still sum within u64.
fn default_max_samples_per_client() -> u64 {
    1_000_000_000
}

impl AlgorithmConfig {
    /// The rule under the scheduler, with defaults for everything else.
    pub fn new(rule: RuleConfig, scheduler: SchedulerConfig) -> Self {
        Self {
            local_steps: default_local_steps(),
            local_lr: default_local_lr(),
            evict_after_failures: default_evict_after_failures(),
            max_samples_per_client: default_max_samples_per_client(),
            task_timeout_s: None,
            rule,
            scheduler,
        }
    }

    /// The local task of a [`Command::Train`](crate::Command::Train) asking for `local_steps`.
    pub fn local_task(&self, local_steps: u32) -> LocalTask {
        LocalTask {
            local_steps,
            lr: self.local_lr,
        }
    }

    /// Both halves of the rule and a Coordinator running the scheduler, with `seed` for every
    /// random choice; fails with a reason when the parameters or the pairing cannot run.
    pub fn build(&self, seed: u64) -> Result<(Algorithm, Coordinator), ConfigError> {
        if self.local_steps == 0 {
            return Err(ConfigError::new(
                "`[algorithm]`",
                "local_steps must be at least 1",
            ));
        }
        if !(self.local_lr.is_finite() && self.local_lr > 0.0) {
            return Err(ConfigError::new(
                "`[algorithm]`",
                format!("local_lr must be a positive number, got {}", self.local_lr),
            ));
        }
        if self.max_samples_per_client == 0 {
            return Err(ConfigError::new(
                "`[algorithm]`",
                "max_samples_per_client must be at least 1",
            ));
        }
        if let Some(t) = self.task_timeout_s
            && !(t.is_finite() && t > 0.0 && t <= 1e9)
        {
            return Err(ConfigError::new(
                "`[algorithm]`",
                format!("task_timeout_s must be a positive number of seconds (at most 1e9), got {t}"),
            ));
        }
        let algorithm = self.rule.build()?;
        let aggregation = algorithm.server.aggregation();
        check_pairing(self.rule.name(), aggregation, &self.scheduler)?;
        let scheduler = self.scheduler.build(aggregation, self.local_steps)?;
        Ok((
            algorithm,
            Coordinator::new(scheduler, seed, self.evict_after_failures)
                .with_sample_cap(self.max_samples_per_client)
                .with_task_timeout(self.task_timeout_s),
        ))
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig::Sync(SyncConfig::default())
    }
}

impl RuleConfig {
    /// The configured method's name.
    pub fn name(&self) -> &'static str {
        match self {
            RuleConfig::FedAvg { .. } => "fedavg",
            RuleConfig::FedAvgM { .. } => "fedavgm",
            RuleConfig::FedAvgMomentum { .. } => "fedavg-m",
            RuleConfig::Scaffold { .. } => "scaffold",
            RuleConfig::ScaffoldMomentum { .. } => "scaffold-m",
            RuleConfig::Scallion { .. } => "scallion",
            RuleConfig::Scafcom { .. } => "scafcom",
            RuleConfig::FedAsync => "fedasync",
            RuleConfig::FedBuff { .. } => "fedbuff",
            RuleConfig::FedFix { .. } => "fedfix",
            RuleConfig::FedCompass => "fedcompass",
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        let fail = |reason: String| Err(ConfigError::new(format!("`{}` rule", self.name()), reason));
        let unit = |name: &str, v: f32| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                fail(format!("{name} must be in (0, 1], got {v}"))
            }
        };
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                fail(format!("{name} must be finite, got {v}"))
            }
        };
        match *self {
            RuleConfig::FedAvg { server_lr } => finite("server_lr", server_lr),
            RuleConfig::FedAvgM { server_lr, momentum } => {
                finite("server_lr", server_lr)?;
                if (0.0..1.0).contains(&momentum) {
                    Ok(())
                } else {
                    fail(format!("momentum must be in [0, 1), got {momentum}"))
                }
            }
            RuleConfig::FedAvgMomentum {
                beta, global_step, ..
            } => {
                unit("beta", beta)?;
                finite("global_step", global_step)
            }
            RuleConfig::Scaffold { global_lr, .. } => finite("global_lr", global_lr),
            RuleConfig::ScaffoldMomentum {
                beta,
                global_step,
                uplink,
                variance_reduced,
            } => {
                unit("beta", beta)?;
                finite("global_step", global_step)?;
                if variance_reduced && uplink == Uplink::Halved {
                    return fail(
                        "the halved uplink rebuilds u_i = β(Δc_i + c) + (1 − β)g, which does not hold for the \
                         variance-reduced direction; use uplink = \"two_vectors\""
                            .into(),
                    );
                }
                Ok(())
            }
            RuleConfig::Scallion { global_lr, alpha, .. } => {
                finite("global_lr", global_lr)?;
                unit("alpha", alpha)
            }
            RuleConfig::Scafcom { global_lr, beta } => {
                finite("global_lr", global_lr)?;
                unit("beta", beta)
            }
            RuleConfig::FedBuff { server_lr } | RuleConfig::FedFix { server_lr } => {
                finite("server_lr", server_lr)
            }
            RuleConfig::FedAsync | RuleConfig::FedCompass => Ok(()),
        }
    }

    /// Builds both halves; fails with a reason when the parameters cannot run.
    pub fn build(&self) -> Result<Algorithm, ConfigError> {
        self.check()?;
        let (server, client): (Box<dyn ServerRule>, Box<dyn ClientRule>) = match *self {
            RuleConfig::FedAvg { server_lr } => {
                (Box::new(FedAvgServer { server_lr }), Box::new(LocalSgdClient))
            }
            RuleConfig::FedAvgM { server_lr, momentum } => (
                Box::new(FedAvgMServer { server_lr, momentum }),
                Box::new(LocalSgdClient),
            ),
            RuleConfig::FedAvgMomentum {
                beta,
                global_step,
                variance_reduced,
            } => (
                Box::new(FedAvgMomentumServer {
                    global_step,
                    variance_reduced,
                }),
                Box::new(FedAvgMomentumClient {
                    beta,
                    variance_reduced,
                }),
            ),
            RuleConfig::Scaffold { global_lr, uplink } => (
                Box::new(ScaffoldServer { global_lr, uplink }),
                Box::new(ScaffoldClient { uplink }),
            ),
            RuleConfig::ScaffoldMomentum {
                beta,
                global_step,
                uplink,
                variance_reduced,
            } => (
                Box::new(ScaffoldMomentumServer {
                    beta,
                    global_step,
                    uplink,
                    variance_reduced,
                }),
                Box::new(ScaffoldMomentumClient {
                    beta,
                    uplink,
                    variance_reduced,
                }),
            ),
            RuleConfig::Scallion {
                global_lr,
                alpha,
                alpha_placement,
            } => (
                Box::new(ScallionServer {
                    global_lr,
                    alpha,
                    placement: alpha_placement,
                }),
                Box::new(ScallionClient {
                    alpha,
                    placement: alpha_placement,
                }),
            ),
            RuleConfig::Scafcom { global_lr, beta } => (
                Box::new(ScafcomServer { global_lr }),
                Box::new(ScafcomClient { beta }),
            ),
            RuleConfig::FedAsync => (Box::new(FedAsyncServer), Box::new(ModelUploadClient)),
            RuleConfig::FedBuff { server_lr } => {
                (Box::new(FedBuffServer { server_lr }), Box::new(LocalSgdClient))
            }
            RuleConfig::FedFix { server_lr } => {
                (Box::new(FedFixServer { server_lr }), Box::new(LocalSgdClient))
            }
            RuleConfig::FedCompass => (Box::new(FedCompassServer), Box::new(LocalSgdClient)),
        };
        Ok(Algorithm {
            server: server.into(),
            client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_reads_from_toml_with_defaults() {
        let cases = [
            ("rule = \"fedavg\"", RuleConfig::FedAvg { server_lr: 1.0 }),
            (
                "rule = \"fedavgm\"\nmomentum = 0.5",
                RuleConfig::FedAvgM {
                    server_lr: 1.0,
                    momentum: 0.5,
                },
            ),
            (
                "rule = \"fedavg-m\"\nbeta = 0.2\nglobal_step = 0.5",
                RuleConfig::FedAvgMomentum {
                    beta: 0.2,
                    global_step: 0.5,
                    variance_reduced: false,
                },
            ),
            (
                "rule = \"scaffold\"\nuplink = \"halved\"",
                RuleConfig::Scaffold {
                    global_lr: 1.0,
                    uplink: Uplink::Halved,
                },
            ),
            (
                "rule = \"scaffold-m\"\nbeta = 0.5\nglobal_step = 1.0\nvariance_reduced = true",
                RuleConfig::ScaffoldMomentum {
                    beta: 0.5,
                    global_step: 1.0,
                    uplink: Uplink::TwoVectors,
                    variance_reduced: true,
                },
            ),
            (
                "rule = \"scallion\"\nalpha = 0.1\nalpha_placement = \"payload\"",
                RuleConfig::Scallion {
                    global_lr: 1.0,
                    alpha: 0.1,
                    alpha_placement: AlphaPlacement::Payload,
                },
            ),
            (
                "rule = \"scafcom\"",
                RuleConfig::Scafcom {
                    global_lr: 1.0,
                    beta: 0.2,
                },
            ),
            ("rule = \"fedasync\"", RuleConfig::FedAsync),
            (
                "rule = \"fedbuff\"\nserver_lr = 0.5",
                RuleConfig::FedBuff { server_lr: 0.5 },
            ),
            ("rule = \"fedfix\"", RuleConfig::FedFix { server_lr: 1.0 }),
            ("rule = \"fedcompass\"", RuleConfig::FedCompass),
        ];
        for (text, expected) in cases {
            let parsed: RuleConfig = toml::from_str(text).unwrap();
            assert_eq!(parsed, expected);
            let algorithm = parsed.build().unwrap();
            assert_eq!(algorithm.server.name(), expected.name());
        }
    }

    #[test]
    fn unknown_rules_fields_and_bad_values_are_errors_that_say_why() {
        assert!(toml::from_str::<RuleConfig>("rule = \"fedprox\"").is_err());
        assert!(toml::from_str::<RuleConfig>("rule = \"fedavg\"\nserver_lr = 1.0\nlr = 2.0").is_err());
        let bad = RuleConfig::Scallion {
            global_lr: 1.0,
            alpha: 0.0,
            alpha_placement: AlphaPlacement::ControlVariates,
        };
        assert!(bad.build().unwrap_err().to_string().contains("alpha"));
        let vr_halved = RuleConfig::ScaffoldMomentum {
            beta: 0.5,
            global_step: 1.0,
            uplink: Uplink::Halved,
            variance_reduced: true,
        };
        assert!(vr_halved.build().unwrap_err().to_string().contains("two_vectors"));
        assert!(
            RuleConfig::FedAvgM {
                server_lr: 1.0,
                momentum: 1.0
            }
            .build()
            .is_err()
        );
    }
}
