//! Stage 1 on the student's own hidden states (`inputs = "student"`): a resumed run ends with
//! the same blocks as an uninterrupted one, aiming at the teacher's residual stream brings the
//! converted model's last hidden state closer to the teacher's than independent layers do, and
//! bad settings are clear errors.

mod common;

use ladimo_distill::capture::capture;
use ladimo_distill::run_dir::{block_path, load_layer_block};
use ladimo_distill::sequential::run_layers_sequential;
use ladimo_distill::train::{Inputs, TrainConfig, run_layers};
use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_moe::Policy;

/// `||h_moe - h_dense|| / ||h_dense||` of the final hidden states on `tokens` (windows of 64),
/// with every layer's block from `dir` at top-2.
fn final_hidden_error(ckpt: &Checkpoint, dense: &Transformer, dir: &std::path::Path, tokens: &[u32]) -> f64 {
    let device = ladimo_backend::device();
    let mut moe = Transformer::from_checkpoint(ckpt, &device).unwrap();
    for l in 0..moe.layers.len() {
        moe.layers[l].ffn = Box::new(load_layer_block(dir, l, Policy::TopK { k: 2 }, &device).unwrap());
    }
    let (mut num, mut den) = (0f64, 0f64);
    for w in tokens.chunks_exact(64) {
        let run = |m: &Transformer| {
            to_vec(
                m.forward_hidden(ids_tensor(w, 1, &device), &mut Default::default())
                    .unwrap(),
            )
        };
        let (a, b) = (run(&moe), run(dense));
        num += a.iter().zip(&b).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        den += b.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
    }
    (num / den).sqrt()
}

#[test]
fn student_inputs_resume_equal_uninterrupted_and_correction_tracks_the_teacher() {
    let (ckpt, model, tokens) = common::tiny("tiny-llama3", 1024);
    let device = ladimo_backend::device();
    let dir = tempfile::tempdir().unwrap();
    let student = common::unit_top2(Inputs::Student, 1.0);

    let full = dir.path().join("full");
    let reports = run_layers_sequential(&ckpt, &model, &tokens, 64, &full, 0..2, &student, 0, |_, _, _, _| {}).unwrap();
    assert_eq!(reports.iter().map(|r| r.layer).collect::<Vec<_>>(), [0, 1]);
    for r in &reports {
        assert!(r.val_rel_error < r.val_rel_error_init, "layer {}: {r:?}", r.layer);
    }

    // "Killed" after layer 0: the second run replays layer 0, trains only layer 1, ends the same.
    let resumed = dir.path().join("resumed");
    run_layers_sequential(&ckpt, &model, &tokens, 64, &resumed, 0..1, &student, 0, |_, _, _, _| {}).unwrap();
    let mut trained = Vec::new();
    run_layers_sequential(&ckpt, &model, &tokens, 64, &resumed, 0..2, &student, 0, |l, s, _, _| {
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
    // A range that starts later replays the earlier layers from the folder.
    let later =
        run_layers_sequential(&ckpt, &model, &tokens, 64, &resumed, 1..2, &student, 0, |_, _, _, _| {}).unwrap();
    assert_eq!(later.len(), 1);

    // The same blocks trained on the teacher's hidden states, layers independent.
    let cap = dir.path().join("capture");
    capture(&model, &tokens, 64, 0..2, &cap, |_, _| {}).unwrap();
    let independent = dir.path().join("independent");
    run_layers(
        &ckpt,
        &cap,
        &independent,
        0..2,
        &common::unit_top2(Inputs::Teacher, 0.0),
        &device,
        |_, _, _, _| {},
    )
    .unwrap();
    let e_teacher = final_hidden_error(&ckpt, &model, &independent, &tokens);
    let e_student = final_hidden_error(&ckpt, &model, &full, &tokens);
    eprintln!(
        "final hidden state rel error: teacher inputs {e_teacher:.4}, student inputs + correction {e_student:.4}"
    );
    assert!(
        e_student < e_teacher,
        "aiming at the teacher's residual stream should track it better: {e_student} vs {e_teacher}"
    );
}

#[test]
fn bad_student_settings_are_clear_errors() {
    let (ckpt, model, tokens) = common::tiny("tiny-llama3", 1024);
    let dir = tempfile::tempdir().unwrap();
    let run = |cfg: &TrainConfig, layers: std::ops::Range<usize>, tokens: &[u32]| {
        run_layers_sequential(&ckpt, &model, tokens, 64, dir.path(), layers, cfg, 0, |_, _, _, _| {})
            .unwrap_err()
            .to_string()
    };
    let e = run(&common::unit_top2(Inputs::Student, 1.5), 0..2, &tokens);
    assert!(e.contains("residual_correction 1.5"), "{e}");
    let e = run(&common::unit_top2(Inputs::Student, 0.0), 1..2, &tokens);
    assert!(
        e.contains("needs layers 0..1 finished") && e.contains("layer 0 is not"),
        "{e}"
    );
    let e = run(&common::unit_top2(Inputs::Student, 0.0), 0..3, &tokens);
    assert!(e.contains("outside the model's 2 layers"), "{e}");
    let e = run(&common::unit_top2(Inputs::Student, 0.0), 0..1, &tokens[..10]);
    assert!(e.contains("fewer than one sequence"), "{e}");
    let e = run(&common::unit_top2(Inputs::Teacher, 0.0), 0..1, &tokens);
    assert!(e.contains("inputs = \"student\""), "{e}");
    // The capture-based runner refuses student inputs rather than silently ignoring them.
    let e = run_layers(
        &ckpt,
        dir.path(),
        dir.path(),
        0..1,
        &common::unit_top2(Inputs::Student, 0.0),
        &model.device,
        |_, _, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("run_layers_sequential"), "{e}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "no partial output"
    );

    // Peri-LN: the FFN output passes a norm before the residual add, so no correction target.
    let (ckpt, model, tokens) = common::tiny("tiny-hcx", 1024);
    let e = run_layers_sequential(
        &ckpt,
        &model,
        &tokens,
        64,
        dir.path(),
        0..1,
        &common::unit_top2(Inputs::Student, 0.5),
        0,
        |_, _, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("use_post_norm"), "{e}");
    // Without the correction a Peri-LN model trains on its own hidden states as well.
    let ok = dir.path().join("hcx");
    let r = run_layers_sequential(
        &ckpt,
        &model,
        &tokens,
        64,
        &ok,
        0..3,
        &common::unit_top2(Inputs::Student, 0.0),
        0,
        |_, _, _, _| {},
    )
    .unwrap();
    assert_eq!(r.len(), 3);
}
