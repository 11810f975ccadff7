//! What the fl-sim test files share: where the shared data folder is, and metrics without the
//! wall clock.

use shoal_sim::experiment::MetricRecord;
use std::path::PathBuf;

/// `../shared/data` relative to the repository root, or a panic that says what is missing.
#[allow(dead_code)]
pub fn shared_data() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    assert!(
        root.join("mnist/train-images-idx3-ubyte.gz").is_file(),
        "MNIST is missing: expected the IDX files under {} (the shared data folder beside the checkout)",
        root.join("mnist").display()
    );
    root
}

/// The records with their only run-dependent field, `wall_s`, blanked.
#[allow(dead_code)]
pub fn without_wall_clock(records: &[MetricRecord]) -> Vec<MetricRecord> {
    records
        .iter()
        .map(|r| MetricRecord {
            wall_s: 0.0,
            ..r.clone()
        })
        .collect()
}
