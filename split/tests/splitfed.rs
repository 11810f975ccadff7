//! SplitFed against the unsplit model (ALGORITHMS.md §8.3 invariants): the gradient at the cut,
//! one client ≡ centralised SGD under both variants, identical clients average to themselves,
//! 8-bit activations stay close to float, pipelining, split inference, and refused messages.
#![allow(clippy::unwrap_used)]

use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_compression::cut::{CutCodec, encode_cut};
use shoal_model::data::Dataset;
use shoal_model::loss::softmax_cross_entropy;
use shoal_model::split::{BottleneckSpec, SplitModel};
use shoal_model::train::{Sgd, SgdConfig, evaluate, train_epoch};
use shoal_model::{Model, zoo};
use shoal_split::inference;
use shoal_split::{BatchOrder, HeadRunner, SplitConfig, SplitServer, SplitVariant, run_task};
use std::sync::Arc;

/// Separable 10-class images: class `k` brightens row band `k`, plus deterministic noise.
fn images(n: usize, side: usize, seed: u32) -> Dataset {
    let mut features = Vec::with_capacity(n * side * side);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i * 7 + seed as usize) % 10;
        for r in 0..side {
            for c in 0..side {
                let noise =
                    (((i * side * side + r * side + c) as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000;
                let band = (r * 10 / side == label) as u8 as f32;
                features.push(band + noise as f32 / 2000.0 - 0.25);
            }
        }
        labels.push(label as u32);
    }
    Dataset::new("bands", vec![side, side, 1], 10, features, labels).unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1e-3 + x.abs().max(y.abs())))
        .fold(0.0, f32::max)
}

fn exact(cut: &str, variant: SplitVariant, momentum: f32) -> SplitConfig {
    SplitConfig {
        variant,
        activations: CutCodec::EXACT,
        gradients: CutCodec::EXACT,
        momentum,
        ..SplitConfig::new(cut)
    }
}

/// One round of one client's split training from `whole`'s weights: (head, tail) afterwards.
#[allow(clippy::too_many_arguments)]
fn one_round(
    model: &Model,
    whole: &[f32],
    config: &SplitConfig,
    data: &Dataset,
    lr: f32,
    batch: usize,
    steps: u32,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let split = Arc::new(config.cut_model(model).unwrap());
    let whole = shoal_core::Params::from_vec(model.layout().clone(), whole.to_vec()).unwrap();
    let (head0, tail0) = split.params_from_whole(&whole, 0);
    let mut server = SplitServer::new(
        split.clone(),
        head0.into_vec(),
        tail0.into_vec(),
        config,
        lr,
        batch,
    )
    .unwrap();
    let mut head = config.head_runner(split.clone(), server.head().to_vec(), lr, batch);
    let mut order = BatchOrder::new((0..data.len()).collect(), batch, seed);
    let session = match config.variant {
        SplitVariant::V1 => {
            let mut s = server.session().unwrap();
            run_task(&mut head, &mut s, data, &mut order, steps, config.pipeline).unwrap();
            Some(s)
        }
        SplitVariant::V2 => {
            let s = server.shared_session().unwrap();
            run_task(&mut head, s, data, &mut order, steps, config.pipeline).unwrap();
            None
        }
    };
    server.fold(&head.delta(), session.as_ref(), 1.0).unwrap();
    assert!(server.aggregate());
    (server.head().to_vec(), server.tail().to_vec())
}

#[test]
fn one_client_splitfed_v1_and_v2_equal_centralised_sgd() {
    let data = images(96, 12, 1);
    let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
    let init = model.init_params(4);
    let (lr, batch) = (0.05, 16);
    let sgd = SgdConfig {
        lr,
        momentum: 0.9,
        weight_decay: 0.0,
    };
    let mut central = init.as_slice().to_vec();
    let mut opt = Sgd::new(sgd, model.layout());
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let stats = train_epoch(
        &model,
        &mut central,
        &data,
        &indices,
        batch,
        &mut opt,
        &mut rng,
        |_| {},
    )
    .unwrap();
    assert_eq!(stats.steps, 6);
    for cut in ["pool1", "relu3"] {
        for variant in [SplitVariant::V1, SplitVariant::V2] {
            let config = exact(cut, variant, 0.9);
            let (head, tail) = one_round(&model, init.as_slice(), &config, &data, lr, batch, 6, 7);
            let joined: Vec<f32> = head.into_iter().chain(tail).collect();
            let d = max_rel_diff(&joined, &central);
            assert!(d < 1e-4, "cut {cut}, {variant:?}: relative difference {d}");
            // Training moved the weights: the equality is not that of two untouched copies.
            assert!(max_rel_diff(&joined, init.as_slice()) > 1e-2);
        }
    }
}

#[test]
fn the_gradient_at_the_cut_is_the_whole_models() {
    let model = zoo::build("lenet5", &[12, 12, 1], 10).unwrap();
    let whole = model.init_params(3);
    let split = Arc::new(model.split("pool1", None).unwrap());
    let (head, tail) = split.params_from_whole(&whole, 0);
    let data = images(4, 12, 3);
    let (x, y) = data.batch(&[2]);
    let a = split
        .head
        .forward(head.as_slice(), x, &mut split.head.workspace(), false)
        .unwrap();
    let shape = a.shape().to_vec();
    let values = a.as_standard_layout().as_slice().unwrap().to_vec();
    // The tail's answer through the real message path, learning rate 0 so it does not move.
    let config = exact("pool1", SplitVariant::V1, 0.0);
    let server = SplitServer::new(
        split.clone(),
        head.into_vec(),
        tail.as_slice().to_vec(),
        &config,
        0.0,
        8,
    )
    .unwrap();
    let mut session = server.session().unwrap();
    let served = session
        .serve(&encode_cut(&CutCodec::EXACT, &shape, &values, &y).unwrap())
        .unwrap();
    let g = shoal_compression::cut::decode_cut(&served.gradient, &session.limits()).unwrap();
    assert_eq!(g.shape, shape);
    // Central differences of the whole model's loss, as a function of the cut activations. A probe
    // may cross a ReLU kink or swap a max-pool winner downstream, so a few may miss; f32 rounding
    // of the loss bounds the rest.
    let loss = |v: &[f32]| {
        let a = ArrayD::from_shape_vec(IxDyn(&shape), v.to_vec()).unwrap();
        let logits = split
            .tail
            .forward(tail.as_slice(), a, &mut split.tail.workspace(), false)
            .unwrap();
        f64::from(softmax_cross_entropy(&logits, &y, false).0.mean_loss)
    };
    let (mut checked, mut agreed) = (0, 0);
    for i in 0..values.len() {
        let h = 3e-3f32;
        let (mut up, mut down) = (values.clone(), values.clone());
        up[i] += h;
        down[i] -= h;
        let numeric = (loss(&up) - loss(&down)) / (2.0 * f64::from(h));
        let analytic = f64::from(g.values[i]);
        if (numeric - analytic).abs() <= 0.05 * analytic.abs() + 3e-4 {
            agreed += 1;
        }
        checked += 1;
    }
    assert!(checked > 100);
    assert!(
        agreed * 100 >= checked * 95,
        "{agreed} of {checked} coordinates agree"
    );
    assert!(g.values.iter().any(|v| v.abs() > 1e-4));
}

#[test]
fn identical_clients_average_to_one_clients_result() {
    let data = images(40, 12, 5);
    let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
    let init = model.init_params(1);
    let config = exact("pool1", SplitVariant::V1, 0.0);
    let (lr, batch) = (0.05, 8);
    let (h1, t1) = one_round(&model, init.as_slice(), &config, &data, lr, batch, 5, 2);
    let split = Arc::new(config.cut_model(&model).unwrap());
    let (head0, tail0) = split.params_from_whole(&init, 0);
    let mut server = SplitServer::new(
        split.clone(),
        head0.into_vec(),
        tail0.into_vec(),
        &config,
        lr,
        batch,
    )
    .unwrap();
    for weight in [3.0, 1.0] {
        let mut head = config.head_runner(split.clone(), server.head().to_vec(), lr, batch);
        let mut session = server.session().unwrap();
        let mut order = BatchOrder::new((0..data.len()).collect(), batch, 2);
        run_task(&mut head, &mut session, &data, &mut order, 5, 1).unwrap();
        server.fold(&head.delta(), Some(&session), weight).unwrap();
    }
    assert!(server.aggregate());
    assert!(max_rel_diff(server.head(), &h1) < 1e-5);
    assert!(max_rel_diff(server.tail(), &t1) < 1e-5);
}

#[test]
fn eight_bit_activations_stay_close_to_float_and_cost_a_quarter() {
    let data = images(64, 12, 9);
    let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
    let init = model.init_params(2);
    let float = exact("pool1", SplitVariant::V1, 0.0);
    let int8 = SplitConfig {
        activations: CutCodec::default_activations(),
        gradients: "int8".parse().unwrap(),
        ..float.clone()
    };
    let split = Arc::new(float.cut_model(&model).unwrap());
    let (head0, tail0) = split.params_from_whole(&init, 0);
    let mut losses = Vec::new();
    let mut bytes = Vec::new();
    for config in [&float, &int8] {
        let server = SplitServer::new(
            split.clone(),
            head0.as_slice().to_vec(),
            tail0.as_slice().to_vec(),
            config,
            0.05,
            16,
        )
        .unwrap();
        let mut head = config.head_runner(split.clone(), server.head().to_vec(), 0.05, 16);
        let mut session = server.session().unwrap();
        let mut order = BatchOrder::new((0..data.len()).collect(), 16, 4);
        let trace = run_task(&mut head, &mut session, &data, &mut order, 4, 1).unwrap();
        losses.push(trace.mean_loss);
        bytes.push((
            trace.up_bytes.iter().sum::<u64>(),
            trace.down_bytes.iter().sum::<u64>(),
        ));
    }
    assert!((losses[0] - losses[1]).abs() < 0.02 * losses[0], "{losses:?}");
    assert!(bytes[1].0 * 4 < bytes[0].0, "{bytes:?}");
    assert!(bytes[1].1 * 3 < bytes[0].1, "{bytes:?}");
}

#[test]
fn pipelined_heads_still_train() {
    let data = images(96, 12, 11);
    let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
    let init = model.init_params(6);
    let sequential = exact("pool1", SplitVariant::V2, 0.0);
    let pipelined = SplitConfig {
        pipeline: 3,
        ..sequential.clone()
    };
    let (h1, _) = one_round(&model, init.as_slice(), &sequential, &data, 0.05, 8, 24, 3);
    let (h3, t3) = one_round(&model, init.as_slice(), &pipelined, &data, 0.05, 8, 24, 3);
    // Stale gradients change the path but not the destination much.
    assert!(max_rel_diff(&h1, &h3) > 1e-6);
    let split = Arc::new(pipelined.cut_model(&model).unwrap());
    let before = inference::evaluate(
        &split,
        &split.params_from_whole(&init, 0).0.into_vec(),
        &split.params_from_whole(&init, 0).1.into_vec(),
        &CutCodec::EXACT,
        &data,
        32,
    )
    .unwrap();
    let after = inference::evaluate(&split, &h3, &t3, &CutCodec::EXACT, &data, 32).unwrap();
    assert!(after.loss < before.loss * 0.8, "{} → {}", before.loss, after.loss);
}

#[test]
fn split_inference_matches_the_whole_model_and_counts_bytes() {
    let data = images(50, 12, 13);
    let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
    let whole = model.init_params(8);
    let split = Arc::new(model.split("pool1", None).unwrap());
    let (head, tail) = split.params_from_whole(&whole, 0);
    let reference = evaluate(&model, whole.as_slice(), &data, 16).unwrap();
    let exact = inference::evaluate(
        &split,
        head.as_slice(),
        tail.as_slice(),
        &CutCodec::EXACT,
        &data,
        16,
    )
    .unwrap();
    assert_eq!(exact.accuracy, reference.accuracy);
    assert!((exact.loss - reference.loss).abs() < 1e-6);
    // 6 × 6 × 32 f32 values per sample, plus a header per batch.
    assert!(exact.bytes_per_sample >= (6 * 6 * 32 * 4) as f64);
    let int8 = inference::evaluate(
        &split,
        head.as_slice(),
        tail.as_slice(),
        &"int8".parse().unwrap(),
        &data,
        16,
    )
    .unwrap();
    assert!(int8.bytes_per_sample < exact.bytes_per_sample / 3.5);
    assert!((int8.loss - reference.loss).abs() < 0.02 * reference.loss);
    let profile = inference::SplitProfile::of(&split);
    assert_eq!(profile.head_params + profile.tail_params, model.num_params());
    assert_eq!(profile.wire_values, 6 * 6 * 32);
}

#[test]
fn bad_forward_messages_are_refused_and_change_nothing() {
    let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
    let split: Arc<SplitModel> = Arc::new(
        model
            .split(
                "pool1",
                Some(&BottleneckSpec {
                    channels: 2,
                    decoder_relu: true,
                }),
            )
            .unwrap(),
    );
    let config = SplitConfig::new("pool1");
    let (head0, tail0) = split.params_from_whole(&model.init_params(0), 0);
    let server =
        SplitServer::new(split.clone(), head0.into_vec(), tail0.into_vec(), &config, 0.1, 4).unwrap();
    let mut session = server.session().unwrap();
    let before = session.params().to_vec();
    let codec = CutCodec::default_activations();
    let wrong_shape = encode_cut(&codec, &[2, 6, 6, 3], &[0.5; 216], &[1, 2]).unwrap();
    let no_labels = encode_cut(&codec, &[2, 6, 6, 2], &[0.5; 144], &[]).unwrap();
    let bad_label = encode_cut(&codec, &[2, 6, 6, 2], &[0.5; 144], &[1, 12]).unwrap();
    let too_big = encode_cut(&codec, &[5, 6, 6, 2], &[0.5; 360], &[0; 5]).unwrap();
    for message in [
        wrong_shape,
        no_labels,
        bad_label,
        too_big,
        b"garbage".to_vec(),
        Vec::new(),
    ] {
        assert!(session.serve(&message).is_err());
    }
    assert_eq!(session.params(), &before[..]);
    assert_eq!(session.steps(), 0);
    let good = encode_cut(&codec, &[2, 6, 6, 2], &[0.5; 144], &[1, 2]).unwrap();
    assert!(session.serve(&good).is_ok());
    let mut head = HeadRunner::new(split, server.head().to_vec(), config.sgd(0.1), codec, 4);
    assert!(head.backward(&[1, 2, 3]).is_err());
}

#[test]
fn two_stage_training_distils_the_bottleneck_then_fine_tunes_the_server_side() {
    use shoal_split::distill::{TwoStageConfig, two_stage};
    let data = images(256, 12, 21);
    let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
    // The teacher: the whole model trained for a few epochs.
    let mut teacher = model.init_params(3).into_vec();
    let sgd = SgdConfig {
        lr: 0.02,
        momentum: 0.9,
        weight_decay: 0.0,
    };
    let mut opt = Sgd::new(sgd, model.layout());
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..4 {
        train_epoch(
            &model,
            &mut teacher,
            &data,
            &indices,
            16,
            &mut opt,
            &mut rng,
            |_| {},
        )
        .unwrap();
    }
    let teacher_eval = evaluate(&model, &teacher, &data, 64).unwrap();
    assert!(teacher_eval.accuracy > 0.9, "{teacher_eval:?}");

    let spec = BottleneckSpec {
        channels: 3,
        decoder_relu: true,
    };
    let split = Arc::new(model.split("pool1", Some(&spec)).unwrap());
    let whole = shoal_core::Params::from_vec(model.layout().clone(), teacher.clone()).unwrap();
    let (raw_head, raw_tail) = split.params_from_whole(&whole, 5);
    let untrained = inference::evaluate(
        &split,
        raw_head.as_slice(),
        raw_tail.as_slice(),
        &"int8".parse().unwrap(),
        &data,
        64,
    )
    .unwrap();
    let config = TwoStageConfig {
        distill_steps: 150,
        finetune_steps: 80,
        batch_size: 16,
        distill_sgd: SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
        },
        finetune_sgd: sgd,
        seed: 5,
    };
    let (head, tail, report) = two_stage(&model, &teacher, &split, &data, &indices, &config).unwrap();
    assert!(
        report.distill_mse_end < 0.7 * report.distill_mse_start,
        "{report:?}"
    );
    assert!(
        report.finetune_loss_end < report.finetune_loss_start,
        "{report:?}"
    );
    // The teacher's own head layers are never trained.
    let head_params = shoal_core::Params::from_vec(split.head.layout().clone(), head.clone()).unwrap();
    assert_eq!(
        head_params.segment("conv1.weight").unwrap(),
        whole.segment("conv1.weight").unwrap()
    );
    let after = inference::evaluate(&split, &head, &tail, &"int8".parse().unwrap(), &data, 64).unwrap();
    assert!(
        after.accuracy > untrained.accuracy + 0.2,
        "{untrained:?} → {after:?}"
    );
    assert!(
        after.accuracy > teacher_eval.accuracy - 0.1,
        "{after:?} vs the teacher's {teacher_eval:?}"
    );
}
