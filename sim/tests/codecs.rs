//! FedZip on a real update: the MNIST `cnn` model's change after one local epoch on one client's
//! shard must compress at least 25× with FedZip's defaults, and decode to the same top-z support.

use shoal_compression::{CodecSpec, DecodeLimits, decode, encode};
use shoal_model::data::mnist;
use shoal_sim::codec_bench::{UpdateConfig, make_update, measure};
mod common;

use common::shared_data;

#[test]
fn fedzip_compresses_a_real_cnn_update_at_least_25_times() {
    let data = mnist::load(&shared_data()).expect("MNIST loads");
    let config = UpdateConfig {
        model: "cnn".into(),
        clients: 100,
        batch_size: 10,
        lr: 0.05,
        seed: 0,
    };
    let (layout, update) = make_update(&config, &data).expect("one local epoch");
    let figures =
        measure(&[CodecSpec::identity(), CodecSpec::fedzip()], &layout, &update, 1).expect("measures");
    assert!(
        (figures[0].ratio - 1.0).abs() < 0.01,
        "the dense payload is the baseline"
    );
    assert_eq!(figures[0].relative_l2_error, 0.0);
    let fedzip = &figures[1];
    assert!(fedzip.ratio >= 25.0, "FedZip reached only {:.1}×", fedzip.ratio);
    // Top-20 % keeps most of the update's energy; clustering costs a bounded error.
    assert!(
        fedzip.relative_l2_error < 0.8,
        "error {}",
        fedzip.relative_l2_error
    );
    // Every weight FedZip sends sits where the update was largest: decoded non-zeros of each 2-D+
    // layer are at most 20 % of it.
    let bytes = encode(&CodecSpec::fedzip(), &layout, &update, 0).expect("encodes");
    let (decoded, _) = decode(&bytes, &layout, &DecodeLimits::for_dim(layout.len())).expect("decodes");
    for segment in layout.segments().iter().filter(|s| s.shape.len() > 1) {
        let nonzero = decoded[segment.range()].iter().filter(|x| **x != 0.0).count();
        assert!(
            nonzero <= segment.len().div_ceil(5),
            "{}: {nonzero} of {}",
            segment.name,
            segment.len()
        );
    }
}
