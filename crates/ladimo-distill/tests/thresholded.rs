//! Thresholds in the loop (`thresholded`): the forward the training runs equals a host loop
//! of the TEAL masks and the parameters-read reference (`SparseFfn`), and training under the
//! thresholds brings every layer's error on held-back calibration tokens down on the tiny model.

mod common;

use burn::tensor::{Tensor, TensorData};
use ladimo_distill::thresholded::{ThresholdTrainConfig, apply_run, load_thresholded, run_thresholded};
use ladimo_model::Transformer;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_moe::sparsity::{Method, SparseFfn, Sparsity, calibrate, dense_ffn, teal_forward};

/// TEAL by hand, one token at a time: `x_i = 0` where `|x_i| < tx`, `h_j` dropped where `|h_j| <
/// th`, from burn-layout weights (gate/up `[hidden, inter]`, down `[inter, hidden]`).
fn host_teal(gate: &[f32], up: &[f32], down: &[f32], hidden: usize, x: &[f32], tx: f32, th: f32) -> Vec<f32> {
    let inter = gate.len() / hidden;
    let mut y = vec![0f32; x.len()];
    for (t, xt) in x.chunks(hidden).enumerate() {
        let xt: Vec<f32> = xt.iter().map(|&v| if v.abs() < tx { 0.0 } else { v }).collect();
        for j in 0..inter {
            let g: f32 = (0..hidden).map(|i| gate[i * inter + j] * xt[i]).sum();
            let u: f32 = (0..hidden).map(|i| up[i * inter + j] * xt[i]).sum();
            let h = g / (1.0 + (-g).exp()) * u;
            if h.abs() < th {
                continue;
            }
            for i in 0..hidden {
                y[t * hidden + i] += down[j * hidden + i] * h;
            }
        }
    }
    y
}

/// Layer `layer`'s FFN input on `ids`, `[tokens, hidden]` on the host.
fn ffn_input(model: &Transformer, ids: &[u32], layer: usize) -> Vec<f32> {
    let mut h = model.embed(ids_tensor(ids, 1, &model.device));
    for l in &model.layers[..layer] {
        h = l.forward(h, &model.rope, &mut None).unwrap();
    }
    let (_, x) = model.layers[layer].attention_part(h, &model.rope, &mut None);
    to_vec(x)
}

fn teal_at(model: &mut Transformer, tokens: &[u32], budget: f64) -> Vec<Sparsity> {
    let windows: Vec<&[u32]> = tokens.chunks(64).collect();
    calibrate(model, &windows, Method::Teal, budget, |_, _| {}).unwrap()
}

#[test]
fn the_training_forward_equals_a_host_loop_and_the_masked_reference() {
    let (_, mut model, tokens) = common::tiny("tiny-llama3", 512);
    let sparsity = teal_at(&mut model, &tokens, 0.6);
    let Sparsity::Teal { x: tx, h: th } = sparsity[1].clone() else {
        panic!("TEAL calibrates TEAL thresholds")
    };
    assert!(tx > 0.0 && th > 0.0, "thresholds {tx} {th} drop nothing");
    let ffn = dense_ffn(&model, 1).unwrap().clone();
    let hidden = ffn.hidden_size();
    let xv = ffn_input(&model, &tokens[..64], 1);
    let n = xv.len() / hidden;
    // The training path: the FFN on an autodiff device, as train_thresholded_layer holds it.
    let ad = model.device.clone().autodiff();
    let ffn_ad = ladimo_moe::HostFfn::from_dense(&ffn).to_dense(&ad);
    let x_ad = Tensor::<2>::from_data(TensorData::new(xv.clone(), [n, hidden]), &ad);
    let got = to_vec(teal_forward(&ffn_ad, x_ad, tx, th));
    let want = host_teal(
        &to_vec(ffn.gate_proj.weight.val()),
        &to_vec(ffn.up_proj.weight.val()),
        &to_vec(ffn.down_proj.weight.val()),
        hidden,
        &xv,
        tx,
        th,
    );
    let x = Tensor::<2>::from_data(TensorData::new(xv.clone(), [n, hidden]), &model.device);
    let (reference, read) = SparseFfn::new(&ffn, sparsity[1].clone()).unwrap().forward_tokens(x);
    let reference = to_vec(reference);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (e_host, e_ref) = (
        ladimo_tests::max_abs_diff(&got, &want) / scale,
        ladimo_tests::max_abs_diff(&got, &reference) / scale,
    );
    eprintln!("training forward vs host loop {e_host:.2e}, vs SparseFfn {e_ref:.2e}");
    assert!(e_host < 1e-4, "{e_host}");
    assert!(e_ref < 1e-5, "{e_ref}");
    // The thresholds do drop entries here: the comparison is not of two dense FFNs.
    let share = read / (n * 3 * hidden * ffn.intermediate_size()) as f64;
    assert!(share < 0.9, "reads {share} of the FFN");
}

#[test]
fn training_under_the_thresholds_lowers_every_layers_error_and_resumes() {
    let (_, mut model, tokens) = common::tiny("tiny-llama3", 4096);
    // Thresholds from the first half; training on the second half.
    let sparsity = teal_at(&mut model, &tokens[..2048], 0.5);
    let cfg = ThresholdTrainConfig {
        epochs: 4,
        batch_tokens: 64,
        lr: 2e-3,
        val_frac: 0.1,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let reports = run_thresholded(
        &model,
        &tokens[2048..],
        64,
        &sparsity,
        &cfg,
        dir.path(),
        |_, _, _, _| {},
    )
    .unwrap();
    assert_eq!(reports.len(), model.layers.len());
    for r in &reports {
        let first = r.loss_curve.first().unwrap().1;
        let last = r.loss_curve.last().unwrap().1;
        eprintln!(
            "layer {}: loss {first:.4} -> {last:.4}, held-back rel error {:.4} -> {:.4}, h keeps {:.3}",
            r.layer, r.val_rel_error_init, r.val_rel_error, r.h_keep
        );
        assert!(last < 0.8 * first, "layer {}: loss {first} -> {last}", r.layer);
        // 30K weights on under 2K tokens overfit: on held-back tokens the error need only fall.
        assert!(
            r.val_rel_error < r.val_rel_error_init,
            "layer {}: {} -> {}",
            r.layer,
            r.val_rel_error_init,
            r.val_rel_error
        );
        assert!(
            matches!(r.sparsity, Sparsity::Teal { x, .. } if x == match r.initial { Sparsity::Teal { x, .. } => x, _ => f32::NAN })
        );
    }
    // A rerun replays the finished layers: the same reports, the same weights.
    let before = to_vec(
        load_thresholded(dir.path(), 1, &model.device)
            .unwrap()
            .0
            .down_proj
            .weight
            .val(),
    );
    let again = run_thresholded(
        &model,
        &tokens[2048..],
        64,
        &sparsity,
        &cfg,
        dir.path(),
        |_, _, _, _| panic!("a finished layer was trained again"),
    )
    .unwrap();
    // (JSON keeps f64s to the last digit or so: compare what identifies the result.)
    let key = |r: &Vec<_>| -> Vec<(usize, Sparsity, usize)> {
        r.iter()
            .map(|r: &ladimo_distill::thresholded::ThresholdLayerReport| (r.layer, r.sparsity.clone(), r.steps))
            .collect()
    };
    assert_eq!(key(&again), key(&reports));
    let after = to_vec(
        load_thresholded(dir.path(), 1, &model.device)
            .unwrap()
            .0
            .down_proj
            .weight
            .val(),
    );
    assert_eq!(before, after);
    // The run applies to a fresh model as SparseFfn layers.
    let mut student = Transformer::from_checkpoint(&common::tiny("tiny-llama3", 1).0, &model.device).unwrap();
    apply_run(&mut student, dir.path()).unwrap();
    assert!(student.layers.iter().all(|l| l.ffn.describe().contains("TEAL")));
}

#[test]
fn non_teal_policies_are_refused_by_name() {
    let (_, model, tokens) = common::tiny("tiny-llama3", 256);
    let mut s = vec![Sparsity::Teal { x: 0.0, h: 0.0 }; model.layers.len()];
    s[1] = Sparsity::Cats { gate: 0.1 };
    let cfg = ThresholdTrainConfig {
        batch_tokens: 64,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let err = run_thresholded(&model, &tokens, 64, &s, &cfg, dir.path(), |_, _, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 1") && err.contains("TEAL"), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "wrote something"
    );
}

#[test]
fn the_polish_under_thresholds_lowers_the_held_back_kl_and_keeps_the_model_shape() {
    use ladimo_distill::teal_polish::{TealPolishConfig, dense_ffns, polish_thresholded};
    // 1,280 tokens: 40 windows of 32, every 20th held back (2), 38 trained.
    let (ckpt, mut model, tokens) = common::tiny("tiny-llama3", 1280);
    let sparsity = teal_at(&mut model, &tokens[..512], 0.5);
    let start = dense_ffns(&model).unwrap();
    let cfg = TealPolishConfig {
        epochs: 3,
        batch_windows: 2,
        lr: 1e-3,
        // The tiny model's whole vocabulary: the loss is the exact KL the check measures.
        teacher_top_k: 100_000,
        ..Default::default()
    };
    let (ffns, report) = polish_thresholded(&ckpt, &model, &start, &sparsity, &tokens, 32, &cfg, |_| {}).unwrap();
    assert_eq!(ffns.len(), model.layers.len());
    assert_eq!((report.train_windows, report.val_windows), (38, 2));
    assert_eq!(report.steps, 3 * 19);
    assert!(report.val_kl_init > 0.0, "the thresholds change the model");
    assert!(
        report.val_kl < report.val_kl_init,
        "held-back KL {} -> {}",
        report.val_kl_init,
        report.val_kl
    );
    // Weights changed, shapes did not.
    let before = to_vec(start[0].gate_proj.weight.val());
    let after = to_vec(ffns[0].gate_proj.weight.val());
    assert_eq!(before.len(), after.len());
    assert!(before.iter().zip(&after).any(|(a, b)| a != b));

    // Only TEAL policies train; a wrong count of layers is refused.
    let cats = vec![Sparsity::Cats { gate: 0.1 }; model.layers.len()];
    let e = polish_thresholded(&ckpt, &model, &start, &cats, &tokens, 32, &cfg, |_| {}).unwrap_err();
    assert!(e.to_string().contains("TEAL"), "{e}");
    let e = polish_thresholded(&ckpt, &model, &start[..1], &sparsity, &tokens, 32, &cfg, |_| {}).unwrap_err();
    assert!(e.to_string().contains("layers"), "{e}");
    // Too few windows to hold one back.
    let e = polish_thresholded(&ckpt, &model, &start, &sparsity, &tokens[..64], 32, &cfg, |_| {}).unwrap_err();
    assert!(e.to_string().contains("too few"), "{e}");
}
