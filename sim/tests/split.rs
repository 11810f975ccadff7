//! `mode = "split"` end to end on synthetic data: SplitFed V1 and V2 learn, report what crossed
//! the cut and what the device runs, repeat exactly under the same seed, and bad split
//! experiments are refused with the reason.

mod common;

use common::without_wall_clock;
use shoal_sim::experiment::{ExperimentConfig, Quiet, run};

fn split_experiment(variant: &str, extra: &str) -> String {
    format!(
        r#"
        name = "split-{variant}"
        seed = 2
        mode = "split"
        [data]
        dataset = "synthetic"
        [data.synthetic]
        num_clients = 6
        alpha = 0.5
        beta = 0.5
        [model]
        name = "mlp"
        batch_size = 10
        [split]
        cut = "relu1"
        bottleneck = {{ channels = 16, decoder_relu = true }}
        variant = "{variant}"
        momentum = 0.0
        {extra}
        [algorithm]
        local_steps = 15
        local_lr = 0.02
        [algorithm.rule]
        rule = "fedavg"
        [algorithm.scheduler]
        scheduler = "sync"
        clients_per_round = 4
        [fleet]
        base_step_time_s = 0.01
        compute = {{ kind = "lognormal", sigma = 0.5 }}
        up = {{ kind = "constant", mbit_s = 1 }}
        [stop]
        rounds = 12
        "#
    )
}

fn parse(text: &str) -> ExperimentConfig {
    let config: ExperimentConfig = toml::from_str(text).expect("the test experiment parses");
    config
}

#[test]
fn splitfed_v1_and_v2_learn_and_report_the_cut() {
    for variant in ["v1", "v2"] {
        let config = parse(&split_experiment(variant, ""));
        let out = run(&config, None, &mut Quiet).expect("the split run completes");
        let first = out.records[0].accuracy.expect("evaluated");
        let last = out.summary.totals.final_accuracy.expect("evaluated");
        assert!(last > first + 0.2, "{variant}: accuracy {first} → {last}");
        assert_eq!(out.summary.totals.rounds, 12);
        let split = out
            .summary
            .split
            .as_ref()
            .expect("split runs have a split summary");
        // 16 int8 levels per sample plus a label and the per-batch header and scales.
        assert!(
            (16.0..40.0).contains(&split.bytes_up_per_sample),
            "{variant}: {} B/sample up",
            split.bytes_up_per_sample
        );
        // Gradients come back as f32: 64 bytes per sample plus the header.
        assert!((64.0..80.0).contains(&split.bytes_down_per_sample));
        assert_eq!(split.cut_f32_bytes_per_sample, 800.0);
        assert!(split.cut_encoded_bytes_per_sample > split.inference.bytes_per_sample);
        assert_eq!(split.raw_input_bytes_per_sample, 240.0);
        // Head: fc1 (60×200 + 200) and the encoder (200×16 + 16).
        assert_eq!(split.profile.head_params, 60 * 200 + 200 + 200 * 16 + 16);
        assert!(split.profile.head_forward_flops > 0);
        assert!((split.inference.accuracy - last).abs() < 1e-12);
        assert!(split.inference.latency_s.p50 > 0.0);
        // Every folded sample crossed the cut once each way, and both ways are in the totals.
        // (The last minibatch of a local epoch may be short.)
        assert!(
            (6500..=7200).contains(&split.traffic.samples),
            "{}",
            split.traffic.samples
        );
        assert!(out.summary.totals.bytes_up > split.traffic.forward_bytes);
        assert!(out.summary.totals.bytes_down > split.traffic.gradient_bytes);
        let again = run(&config, None, &mut Quiet).unwrap();
        assert_eq!(
            without_wall_clock(&out.records),
            without_wall_clock(&again.records)
        );
    }
}

#[test]
fn v2_serves_clients_in_turn_so_rounds_take_longer() {
    let slow_server = "[server]\ngflops = 0.05\nlanes = 4";
    let with = |variant: &str| {
        let text =
            split_experiment(variant, "").replace("[algorithm]\n", &format!("{slow_server}\n[algorithm]\n"));
        run(&parse(&text), None, &mut Quiet).unwrap().summary
    };
    let (v1, v2) = (with("v1"), with("v2"));
    // Server time per step dominates: four clients in turn take about four times as long as
    // four lanes in parallel.
    assert!(
        v2.totals.time_s > 2.5 * v1.totals.time_s,
        "{} vs {}",
        v2.totals.time_s,
        v1.totals.time_s
    );
}

#[test]
fn bad_split_experiments_are_refused_with_the_reason() {
    let refuse = |text: String, needle: &str| {
        let config = parse(&text);
        let err = format!("{:#}", config.validate().expect_err("refused"));
        assert!(err.contains(needle), "`{err}` should mention `{needle}`");
    };
    refuse(
        split_experiment("v1", "").replace("cut = \"relu1\"", "cut = \"conv9\""),
        "conv9",
    );
    refuse(
        split_experiment("v1", "").replace(
            "scheduler = \"sync\"\n        clients_per_round = 4",
            "scheduler = \"fedbuff\"",
        ),
        "sync",
    );
    refuse(
        split_experiment("v1", "").replace("mode = \"split\"", ""),
        "mode = \"split\"",
    );
    refuse(split_experiment("v1", "pipeline = 0"), "pipeline");
    let no_table = split_experiment("v1", "");
    let start = no_table.find("[split]").unwrap();
    let end = no_table.find("[algorithm]").unwrap();
    refuse(format!("{}{}", &no_table[..start], &no_table[end..]), "[split]");
}
