//! What the fl-sim test files share: where the shared data folder is.

use std::path::PathBuf;

/// `../shared/data` relative to the repository root, or a panic that says what is missing.
pub fn shared_data() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    assert!(
        root.join("mnist/train-images-idx3-ubyte.gz").is_file(),
        "MNIST is missing: expected the IDX files under {} (the shared data folder beside the checkout)",
        root.join("mnist").display()
    );
    root
}
