//! Metadata that travels with every client update: the control plane's view of it.
//!
//! The scheduler sees only this, never the tensor bytes.

use crate::{ClientId, ModelVersion, TaskId};
use serde::{Deserialize, Serialize};

/// Who computed an update, on which global version, and at what cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateMeta {
    /// The client that computed the update.
    pub client: ClientId,
    /// The task the update answers; uploads are deduplicated by it.
    pub task: TaskId,
    /// The global model version the client started from.
    pub base_version: ModelVersion,
    /// Number of training samples the client holds (`n_i`, used for sample weighting).
    pub num_samples: u64,
    /// Local optimisation steps actually run.
    pub local_steps: u32,
    /// Mean training loss over the local steps.
    pub loss: f32,
    /// Seconds the client spent on the task (training plus transfer, as measured by the client).
    pub duration_s: f64,
}

impl UpdateMeta {
    /// Versions between the update's base and `current`.
    pub fn staleness(&self, current: ModelVersion) -> u64 {
        self.base_version.staleness(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_meta_round_trips_through_serde() {
        let meta = UpdateMeta {
            client: ClientId(3),
            task: TaskId(99),
            base_version: ModelVersion(5),
            num_samples: 600,
            local_steps: 50,
            loss: 0.25,
            duration_s: 1.5,
        };
        let json = serde_json::to_string(&meta).unwrap();
        let back: UpdateMeta = serde_json::from_str(&json).unwrap();
        assert_eq!(back, meta);
        assert_eq!(meta.staleness(ModelVersion(8)), 3);
    }
}
