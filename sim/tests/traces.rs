//! The real device traces of the shared data folder load and look like their README says.

mod common;

use common::shared_data;
use shoal_sim::traces::{AI_SCORES, HSDPA_DIR, load_ai_scores, load_bandwidth_traces};

#[test]
fn the_phone_scores_span_two_orders_of_magnitude() {
    let scores = load_ai_scores(&shared_data().join(AI_SCORES)).expect("scores load");
    assert_eq!(scores.len(), 307);
    let lo = scores.iter().map(|s| s.score).min().expect("non-empty");
    let hi = scores.iter().map(|s| s.score).max().expect("non-empty");
    assert_eq!((lo, hi), (212, 76_206));
}

#[test]
fn the_hsdpa_traces_load_with_their_documented_ranges() {
    let traces = load_bandwidth_traces(&shared_data().join(HSDPA_DIR)).expect("traces load");
    assert_eq!(traces.len(), 142);
    let rows: usize = traces.iter().map(|t| t.times_s.len()).sum();
    assert_eq!(rows, 28_973);
    for t in &traces {
        assert!(
            t.bytes_per_s
                .iter()
                .all(|&b| (0.15e6 / 8.0 * 0.99..=8.03e6 / 8.0 * 1.01).contains(&b)),
            "{}",
            t.name
        );
        assert!(
            (43.0..=320.0).contains(&t.period_s()),
            "{}: {} s",
            t.name,
            t.period_s()
        );
    }
}

#[test]
fn a_missing_trace_folder_is_a_clear_error() {
    let err = load_bandwidth_traces(&shared_data().join("no-such-folder")).expect_err("missing");
    assert!(err.to_string().contains("no-such-folder"), "{err}");
}
