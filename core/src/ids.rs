//! Identifiers: clients, global model versions, and tasks.
//!
//! Newtypes over `u64`, so a client id is never mistaken for a version number.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<u64> for $name {
            fn from(value: u64) -> Self {
                Self(value)
            }
        }
    };
}

id_type!(
    /// A device taking part in training, stable across reconnections.
    ClientId,
    "client-"
);
id_type!(
    /// A committed global model version; version 0 is the initial model.
    ModelVersion,
    "v"
);
id_type!(
    /// One unit of work handed to a client; uploads are deduplicated by it.
    TaskId,
    "task-"
);

impl ModelVersion {
    /// The version that follows this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }

    /// How many versions `self` lags behind `current` (0 when it is current or newer).
    pub fn staleness(self, current: ModelVersion) -> u64 {
        current.0.saturating_sub(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_display_with_their_kind() {
        assert_eq!(ClientId(7).to_string(), "client-7");
        assert_eq!(ModelVersion(3).to_string(), "v3");
        assert_eq!(TaskId(11).to_string(), "task-11");
    }

    #[test]
    fn staleness_counts_versions_behind_and_never_underflows() {
        assert_eq!(ModelVersion(3).staleness(ModelVersion(7)), 4);
        assert_eq!(ModelVersion(7).staleness(ModelVersion(3)), 0);
        assert_eq!(ModelVersion(3).next(), ModelVersion(4));
    }

    #[test]
    fn ids_serialize_as_plain_numbers() {
        assert_eq!(serde_json::to_string(&ClientId(42)).unwrap(), "42");
        let v: ModelVersion = serde_json::from_str("9").unwrap();
        assert_eq!(v, ModelVersion(9));
    }
}
