//! Capture and layer-wise distillation on a tiny model: the loss falls, and a resumed run ends
//! with the same result as an uninterrupted one.

mod common;

use ladimo_distill::capture::capture;
use ladimo_distill::run_dir::block_path;
use ladimo_distill::train::{Inputs, TrainConfig, run_layers};
use ladimo_moe::{Combine, CombineWeights, Policy};

fn cfg() -> TrainConfig {
    TrainConfig {
        experts: 4,
        shared_fraction: 0.0,
        strategy: "kmeans".into(),
        train_policy: Policy::TopK { k: 2 },
        also_train_with: Vec::new(),
        router_norm_weight: 0.0,
        combine: Combine {
            weights: CombineWeights::Renormalized,
            scale: 2.0,
        },
        epochs: 8,
        batch_tokens: 64,
        lr: 2e-3,
        log_every: 1,
        // LaDiMo's layer-wise distillation from a capture (student inputs: tests/sequential.rs).
        inputs: Inputs::Teacher,
        ..Default::default()
    }
}

#[test]
fn distillation_loss_falls_and_resume_equals_uninterrupted() {
    let (ckpt, model, tokens) = common::tiny("tiny-llama3", 1024);
    let device = ladimo_backend::device();
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("capture");
    let meta = capture(&model, &tokens, 64, 0..2, &cap, |_, _| {}).unwrap();
    assert_eq!(meta.tokens, 1024);
    // A second capture of the same inputs is reused, not recomputed.
    let again = capture(&model, &tokens, 64, 0..2, &cap, |_, _| {}).unwrap();
    assert_eq!(again, meta);

    let full = dir.path().join("full");
    let reports = run_layers(&ckpt, &cap, &full, 0..2, &cfg(), &device, |_, _, _, _| {}).unwrap();
    for r in &reports {
        let first = r.loss_curve.first().unwrap().1;
        let last = r.loss_curve.last().unwrap().1;
        eprintln!(
            "layer {}: loss {first:.3e} -> {last:.3e}, val rel error {:.3} -> {:.3}",
            r.layer, r.val_rel_error_init, r.val_rel_error
        );
        assert!(last < 0.7 * first, "layer {}: loss {first} -> {last}", r.layer);
        assert!(r.val_rel_error < r.val_rel_error_init, "layer {}", r.layer);
    }

    // "Killed" after layer 0: a second run over 0..2 trains only layer 1 and ends the same.
    let resumed = dir.path().join("resumed");
    run_layers(&ckpt, &cap, &resumed, 0..1, &cfg(), &device, |_, _, _, _| {}).unwrap();
    let mut trained = Vec::new();
    run_layers(&ckpt, &cap, &resumed, 0..2, &cfg(), &device, |l, s, _, _| {
        if s == 1 {
            trained.push(l)
        }
    })
    .unwrap();
    assert_eq!(trained, [1], "only the unfinished layer is trained");
    for layer in 0..2 {
        ladimo_tests::assert_same_bytes(
            &block_path(&full, layer),
            &block_path(&resumed, layer),
            &format!("layer {layer}, resumed vs uninterrupted"),
        );
    }
}

#[test]
fn bad_ranges_and_budgets_are_clear_errors() {
    let (_ckpt, model, tokens) = common::tiny("tiny-llama3", 1024);
    let dir = tempfile::tempdir().unwrap();
    let e = capture(&model, &tokens, 64, 0..3, dir.path(), |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("outside the model's 2 layers"), "{e}");
    let e = capture(&model, &tokens[..10], 64, 0..1, dir.path(), |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("fewer than one sequence"), "{e}");
}

/// `also_train_with` trains under each listed policy in turn: a block trained at top-2 and top-1
/// is better at top-1 than one trained at top-2 alone, and still close at top-2.
#[test]
fn training_under_several_policies_prepares_the_block_for_each() {
    use ladimo_distill::capture::load_layer;
    use ladimo_distill::train::train_layer;
    use ladimo_model::util::to_vec;
    use ladimo_moe::HostFfn;

    let (ckpt, model, tokens) = common::tiny("tiny-llama3", 1024);
    let device = ladimo_backend::device();
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("capture");
    let meta = capture(&model, &tokens, 64, 0..1, &cap, |_, _| {}).unwrap();
    let (x, y) = load_layer(&cap, &meta, 0).unwrap();
    let ffn = HostFfn::from_checkpoint(&ckpt, 0).unwrap();
    let h = ffn.hidden_size();
    let n = x.len() / h;
    let xt = burn::tensor::Tensor::<2>::from_data(burn::tensor::TensorData::new(x.clone(), [n, h]), &device);
    let rel = |block: &mut ladimo_moe::MoeBlock, k: usize| {
        block.set_policy(Policy::TopK { k }).unwrap();
        let got = to_vec(block.forward_tokens(xt.clone()).unwrap());
        let num: f64 = got.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = y.iter().map(|b| (*b as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let unit = Combine {
        weights: CombineWeights::Unit,
        scale: 1.0,
    };
    let only = TrainConfig { combine: unit, ..cfg() };
    let both = TrainConfig {
        also_train_with: vec![Policy::TopK { k: 1 }],
        ..only.clone()
    };
    let (mut a, _) = train_layer(0, &ffn, &x, &y, &only, &device, |_, _, _| {}).unwrap();
    let (mut b, _) = train_layer(0, &ffn, &x, &y, &both, &device, |_, _, _| {}).unwrap();
    let (a1, b1, a2, b2) = (rel(&mut a, 1), rel(&mut b, 1), rel(&mut a, 2), rel(&mut b, 2));
    eprintln!("rel error at top-1: top-2 only {a1:.3}, both {b1:.3}; at top-2: {a2:.3}, {b2:.3}");
    assert!(b1 < a1, "top-1 error {b1} (trained at top-1 too) >= {a1} (top-2 only)");
    assert!(b2 < 1.5 * a2, "top-2 error {b2} vs {a2}");
}
