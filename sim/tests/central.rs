//! End-to-end checks of `fl-sim central`: learning happens, runs are reproducible, outputs are
//! complete, and bad input is a clear error.

use shoal_model::data::TrainTest;
use shoal_model::data::mnist;
use shoal_model::data::synthetic::{SyntheticConfig, generate};
use shoal_model::train::SgdConfig;
use shoal_sim::central::{CentralConfig, Quiet, run, write_outputs};
mod common;

use common::shared_data;
use std::process::Command;

fn config(model: &str, epochs: usize, lr: f32, max_train_samples: Option<usize>) -> CentralConfig {
    CentralConfig {
        model: model.to_string(),
        epochs,
        batch_size: 32,
        sgd: SgdConfig {
            lr,
            momentum: 0.9,
            weight_decay: 0.0,
        },
        cosine_lr: true,
        seed: 1,
        max_train_samples,
        eval_batch_size: 500,
    }
}

fn synthetic() -> TrainTest {
    generate(&SyntheticConfig {
        alpha: 0.0,
        beta: 0.0,
        num_clients: 10,
        seed: 1,
        ..Default::default()
    })
    .expect("synthetic data generates")
}

#[test]
fn logistic_regression_learns_synthetic_data_and_runs_are_reproducible() {
    let data = synthetic();
    let cfg = config("logreg", 10, 0.05, None);
    let a = run(&cfg, &data, &mut Quiet).unwrap();
    let b = run(&cfg, &data, &mut Quiet).unwrap();
    let chance = 1.0 / 10.0;
    assert!(
        a.final_accuracy > 3.0 * chance,
        "accuracy {} barely above chance",
        a.final_accuracy
    );
    assert!(a.per_epoch.last().unwrap().train_loss < a.per_epoch[0].train_loss);
    let metrics = |s: &shoal_sim::central::CentralSummary| {
        s.per_epoch
            .iter()
            .map(|r| (r.train_loss, r.test_accuracy, r.test_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(metrics(&a), metrics(&b), "same seed, different results");
}

#[test]
fn mlp_learns_mnist_from_a_few_thousand_samples() {
    let data = mnist::load(&shared_data()).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (60_000, 10_000));
    let summary = run(&config("mlp", 1, 0.02, Some(4000)), &data, &mut Quiet).unwrap();
    assert_eq!(summary.test_samples, 10_000);
    assert!(
        summary.final_accuracy > 0.88,
        "2NN on 4,000 MNIST samples reached only {}",
        summary.final_accuracy
    );
}

#[test]
fn lenet5_learns_mnist_from_a_few_thousand_samples() {
    let data = mnist::load(&shared_data()).unwrap();
    let mut cfg = config("lenet5", 1, 0.01, Some(3000));
    cfg.eval_batch_size = 250;
    let summary = run(&cfg, &data, &mut Quiet).unwrap();
    assert!(
        summary.final_accuracy > 0.85,
        "LeNet-5 on 3,000 MNIST samples reached only {}",
        summary.final_accuracy
    );
}

#[test]
fn the_cli_writes_a_complete_summary() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_fl-sim"))
        .args([
            "central",
            "--dataset",
            "synthetic",
            "--model",
            "mlp",
            "--epochs",
            "2",
            "--synthetic-clients",
            "5",
        ])
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "fl-sim failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains("epoch 2/2") && stdout.contains("test accuracy"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap()).unwrap();
    let accuracy = summary["final_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    assert_eq!(summary["epochs"], 2);
    assert!(summary["samples_per_s"].as_f64().unwrap() > 0.0);
    assert!(summary["wall_time_s"].as_f64().unwrap() > 0.0);
    let csv = std::fs::read_to_string(out.path().join("epochs.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "header and one line per epoch:\n{csv}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("epochs.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
}

#[test]
fn a_missing_data_directory_is_a_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fl-sim"))
        .args(["central", "--dataset", "mnist", "--model", "mlp"])
        .arg("--data-dir")
        .arg(empty.path())
        .arg("--out")
        .arg(empty.path().join("out"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("train-images-idx3-ubyte") && stderr.contains("--data-dir"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn no_data_directory_at_all_says_how_to_give_one() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fl-sim"))
        .args(["central", "--dataset", "mnist", "--model", "mlp", "--out"])
        .arg(out.path())
        .env_remove("SHOAL_DATA")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--data-dir") && stderr.contains("SHOAL_DATA"),
        "{stderr}"
    );
}

#[test]
fn an_unusable_configuration_is_an_error_not_a_panic() {
    let data = synthetic();
    assert!(
        run(&config("cnn", 1, 0.01, None), &data, &mut Quiet).is_err(),
        "cnn needs images"
    );
    let mut cfg = config("logreg", 1, 0.01, None);
    cfg.batch_size = 0;
    assert!(run(&cfg, &data, &mut Quiet).is_err());
    let summary = run(&config("logreg", 1, 0.01, None), &data, &mut Quiet).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    assert!(
        write_outputs(&summary, file.path()).is_err(),
        "a file is not a directory"
    );
}
