//! The end-to-end polish (`finetune`): it lowers the held-back KL to the teacher, a finished
//! folder is not trained again, a crashed polish resumes to the same weights, and bad settings
//! are clear errors that write nothing; `finetune_under` trains under fixed per-layer policies
//! with the TEAL thresholds in the loop.

mod common;

use std::path::{Path, PathBuf};

use ladimo_distill::finetune::{FinetuneConfig, FinetuneReport, finetune, finetune_under};
use ladimo_distill::run_dir::{block_path, finished, finished_finetune, load_layer_block};
use ladimo_distill::sequential::run_layers_sequential;
use ladimo_distill::teacher_topk::teacher_top_k_path;
use ladimo_distill::train::{Inputs, TrainConfig};
use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_model::util::to_vec;
use ladimo_moe::policy_file::LayerPolicy;
use ladimo_moe::{CombineWeights, Policy, Sparsity};

/// A tiny model's finished stage-1 run in `tmp/stage1` (tmp is a fresh temporary folder):
/// `(tmp, run, ckpt, model, tokens)`.
fn stage1() -> (tempfile::TempDir, PathBuf, Checkpoint, Transformer, Vec<u32>) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("stage1");
    let (ckpt, model, tokens) = common::tiny("tiny-llama3", 2560);
    let cfg = TrainConfig {
        epochs: 1,
        ..common::unit_top2(Inputs::Student, 0.0)
    };
    let n = ckpt.config.num_layers;
    run_layers_sequential(&ckpt, &model, &tokens[..1024], 64, &run, 0..n, &cfg, 0, |_, _, _, _| {}).unwrap();
    (tmp, run, ckpt, model, tokens)
}

/// Polish settings for the tiny model: `epochs` passes, top-2 and top-1 in turns, lr 1e-3.
fn top2_top1(epochs: usize) -> FinetuneConfig {
    FinetuneConfig {
        epochs,
        policies: vec![Policy::TopK { k: 2 }, Policy::TopK { k: 1 }],
        batch_windows: 2,
        lr: 1e-3,
        ..Default::default()
    }
}

/// Polish the stage-1 run `run` of `model` into `out` on `tokens` (windows of 64): the report and
/// every step's loss, in order.
fn polish(
    (ckpt, model): (&Checkpoint, &Transformer),
    run: &Path,
    out: &Path,
    tokens: &[u32],
    cfg: &FinetuneConfig,
) -> (FinetuneReport, Vec<f64>) {
    let mut kls = Vec::new();
    let r = finetune(ckpt, model, run, out, tokens, 64, cfg, |_, _, kl| kls.push(kl)).unwrap();
    (r, kls)
}

#[test]
fn finetune_lowers_the_kl_and_a_finished_folder_is_kept() {
    let (dir, run, ckpt, model, tokens) = stage1();
    let n = ckpt.config.num_layers;
    let cfg = top2_top1(3);
    let out = dir.path().join("polished");
    let r = finetune(&ckpt, &model, &run, &out, &tokens, 64, &cfg, |_, _, _| {}).unwrap();
    assert_eq!((r.train_windows, r.val_windows), (38, 2));
    assert_eq!(r.steps, 3 * 19);
    assert!(r.val_kl_init > 0.0 && r.val_kl.is_finite());
    assert!(r.val_kl < 0.8 * r.val_kl_init, "KL {} -> {}", r.val_kl_init, r.val_kl);
    for l in 0..n {
        // Written like a stage-1 run: same partition, the stage-1 policy, new weights.
        let (a, b) = (finished(&run, l).unwrap(), finished(&out, l).unwrap());
        assert_eq!(a, b);
        assert_ne!(
            std::fs::read(block_path(&run, l)).unwrap(),
            std::fs::read(block_path(&out, l)).unwrap()
        );
    }
    let saved = finished_finetune(&out).unwrap();
    assert_eq!((saved.config, saved.steps), (cfg.clone(), r.steps));
    assert!((saved.val_kl - r.val_kl).abs() <= 1e-12 * r.val_kl);
    // Finished: the same call returns the saved report without training again.
    let again = finetune(&ckpt, &model, &run, &out, &tokens, 64, &cfg, |_, _, _| {
        panic!("a finished folder must not train again")
    })
    .unwrap();
    assert_eq!(again.seconds, finished_finetune(&out).unwrap().seconds);
}

#[test]
fn teacher_top_k_at_the_whole_vocab_is_the_exact_kl_and_a_small_k_still_polishes() {
    let (dir, run, ckpt, model, tokens) = stage1();
    let vocab = ckpt.config.vocab_size;
    let exact = top2_top1(1);
    // The report and the first step's loss (same weights and, with the same seed, the same
    // batch in every run).
    let curve = |cfg: &FinetuneConfig, name: &str| {
        let (r, kls) = polish((&ckpt, &model), &run, &dir.path().join(name), &tokens, cfg);
        (r, kls[0])
    };
    let (a, a1) = curve(&exact, "exact");
    // K = vocab: the rest bucket is empty and the coarsened KL is the KL; only float rounding
    // (a gather instead of a full-vocabulary sum) tells the two runs apart.
    let (b, b1) = curve(
        &FinetuneConfig {
            teacher_top_k: vocab,
            ..exact.clone()
        },
        "whole-vocab",
    );
    assert_eq!((a.teacher_seconds, a.loss_curve.len()), (0.0, b.loss_curve.len()));
    assert!(b.teacher_seconds > 0.0);
    assert!((a1 - b1).abs() <= 1e-3 * a1, "step 1: KL {a1} exact, {b1} cached");
    for (&(s, x), &(t, y)) in a.loss_curve.iter().zip(&b.loss_curve) {
        assert_eq!(s, t);
        assert!(
            (x - y).abs() <= 1e-3 * x.abs().max(1e-3),
            "step {s}: KL {x} exact, {y} cached"
        );
    }
    assert!(
        (a.val_kl - b.val_kl).abs() <= 1e-3 * a.val_kl,
        "{} vs {}",
        a.val_kl,
        b.val_kl
    );
    // K = 64 of 512: a lower bound of the KL, still a loss that polishes (the held-back KL is
    // the exact one). The tiny model's next-token distributions are flat: at K = 8 the rest
    // bucket holds most of the mass and three epochs take only 10% off the KL.
    let (c, c1) = curve(
        &FinetuneConfig {
            teacher_top_k: 64,
            ..top2_top1(3)
        },
        "top64",
    );
    assert!(c.val_kl < 0.8 * c.val_kl_init, "KL {} -> {}", c.val_kl_init, c.val_kl);
    // At the same weights and batch (step 1), the coarsened KL is below the exact one.
    assert!(c1 <= a1 + 1e-6, "step 1: the top-64 KL {c1} is above the exact {a1}");
}

#[test]
fn max_steps_cuts_the_run_and_its_teacher_pass_covers_the_windows_it_uses() {
    let (dir, run, ckpt, model, tokens) = stage1();
    // Every step's loss and the report.
    let losses = |cfg: &FinetuneConfig, name: &str| polish((&ckpt, &model), &run, &dir.path().join(name), &tokens, cfg);
    // The whole vocabulary cached: the cut run's teacher pass covers only the windows of its
    // 10 steps (20 of the 38 training windows), and a step on a window it skipped would panic.
    let whole = FinetuneConfig {
        teacher_top_k: ckpt.config.vocab_size,
        ..top2_top1(1)
    };
    let (a, a_kls) = losses(&whole, "whole");
    let cut = FinetuneConfig {
        max_steps: 10,
        ..whole.clone()
    };
    let (b, b_kls) = losses(&cut, "cut");
    assert_eq!((a.steps, b.steps, b_kls.len()), (19, 10, 10));
    // Step 1: the same weights and batch; afterwards the schedules (over 19 and 10 steps) differ.
    assert_eq!(a_kls[0], b_kls[0]);
    assert!(b.val_kl < b.val_kl_init, "KL {} -> {}", b.val_kl_init, b.val_kl);
    assert!(
        b.val_kl > a.val_kl,
        "10 steps polish less than 19: {} vs {}",
        b.val_kl,
        a.val_kl
    );
    // A cap above the epochs' steps changes nothing; the report keeps the setting.
    let (c, _) = losses(
        &FinetuneConfig {
            max_steps: 1000,
            ..top2_top1(1)
        },
        "capped",
    );
    assert_eq!((c.steps, c.config.max_steps), (19, 1000));
}

#[test]
fn a_student_input_stage_1_writes_the_teachers_top_k_and_the_polish_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("stage1");
    let (ckpt, model, tokens) = common::tiny("tiny-llama3", 2560);
    let cfg = TrainConfig {
        epochs: 1,
        ..common::unit_top2(Inputs::Student, 1.0)
    };
    let n = ckpt.config.num_layers;
    let k = 64;
    run_layers_sequential(&ckpt, &model, &tokens, 64, &run, 0..n, &cfg, k, |_, _, _, _| {}).unwrap();
    let file = teacher_top_k_path(&run, k);
    assert!(file.exists());
    // Step 1's loss: the same weights and batch in every run below.
    let cfg1 = FinetuneConfig {
        teacher_top_k: k,
        max_steps: 1,
        ..top2_top1(1)
    };
    let first_on =
        |tokens: &[u32], name: &str| polish((&ckpt, &model), &run, &tmp.path().join(name), tokens, &cfg1).1[0];
    let first = |name: &str| first_on(&tokens, name);
    let from_file = first("from-file");
    // Without the file the polish runs the teacher itself, on whole windows instead of layer by
    // layer: the same top K up to float rounding.
    let moved = tmp.path().join("moved.safetensors");
    std::fs::rename(&file, &moved).unwrap();
    let own = first("own-pass");
    assert!(
        (from_file - own).abs() <= 1e-4 * own,
        "step 1: {from_file} from the file, {own} own pass"
    );
    // The file is what the first run read: with its probabilities changed, step 1 changes too.
    let bytes = std::fs::read(&moved).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let logp: Vec<u8> = st
        .tensor("logp")
        .unwrap()
        .data()
        .chunks_exact(4)
        .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) - 1.0).to_le_bytes())
        .collect();
    let keep = |name: &str| st.tensor(name).unwrap();
    let views = vec![
        ("ids", keep("ids")),
        ("rest", keep("rest")),
        (
            "logp",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, keep("logp").shape().to_vec(), &logp)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, header.metadata().clone(), &file).unwrap();
    let tampered = first("tampered");
    assert!(
        (tampered - own).abs() > 1e-3 * own,
        "step 1: {tampered} with changed probabilities, {own} own pass"
    );
    // A file of other tokens is not used: with the changed file in place, a polish on other
    // tokens starts where one without any file does.
    let other = tokens
        .iter()
        .map(|t| (t + 1) % ckpt.config.vocab_size as u32)
        .collect::<Vec<_>>();
    let stale = first_on(&other, "stale");
    std::fs::remove_file(&file).unwrap();
    assert_eq!(stale, first_on(&other, "other-own-pass"));
}

#[test]
fn train_router_moves_the_unit_routers_and_the_kl_still_falls() {
    let (dir, run, ckpt, model, tokens) = stage1();
    let cfg = FinetuneConfig {
        epochs: 2,
        policies: vec![Policy::TopK { k: 2 }],
        lr: 1e-3,
        train_router: true,
        ..Default::default()
    };
    let out = dir.path().join("polished");
    let r = finetune(&ckpt, &model, &run, &out, &tokens, 64, &cfg, |_, _, _| {}).unwrap();
    // 0.082 -> 0.068 here (two epochs at top-2 only).
    assert!(r.val_kl < 0.9 * r.val_kl_init, "KL {} -> {}", r.val_kl_init, r.val_kl);
    let router = |dir: &std::path::Path, l| {
        let b = load_layer_block(dir, l, Policy::TopK { k: 2 }, &model.device).unwrap();
        // Saved with the stage-1 combine rule (Unit), not the training-time variant.
        assert_eq!(b.combine.weights, CombineWeights::Unit);
        to_vec(b.params.router.weight.val())
    };
    for l in 0..ckpt.config.num_layers {
        assert_ne!(router(&run, l), router(&out, l), "layer {l}'s router did not move");
    }
}

#[test]
fn a_crashed_finetune_resumes_to_the_same_weights() {
    let (dir, run, ckpt, model, tokens) = stage1();
    let cfg = top2_top1(2);
    let whole = dir.path().join("whole");
    let full = finetune(&ckpt, &model, &run, &whole, &tokens, 64, &cfg, |_, _, _| {}).unwrap();
    // 38 steps, a checkpoint every 38 / 20 = 1 step; the "crash" comes after step 23, in the
    // second epoch, so the resumed run also replays the first epoch's shuffle.
    let out = dir.path().join("crashed");
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        finetune(&ckpt, &model, &run, &out, &tokens, 64, &cfg, |step, _, _| {
            assert!(step < 23, "simulated crash at step {step}");
        })
    }));
    assert!(crashed.is_err());
    assert!(out.join("resume/state.json").exists() && finished_finetune(&out).is_none());
    let mut steps = Vec::new();
    let resumed = finetune(&ckpt, &model, &run, &out, &tokens, 64, &cfg, |step, _, _| {
        steps.push(step)
    })
    .unwrap();
    // Step 23's checkpoint was written before its progress call crashed: the run goes on at 24.
    assert_eq!(steps.first(), Some(&24));
    assert_eq!((resumed.steps, resumed.val_kl_init), (full.steps, full.val_kl_init));
    // The curve holds f32 losses; serde_json may read an f64 back one ulp off, f32 not.
    let f32s = |c: &[(usize, f64)]| c.iter().map(|&(s, v)| (s, v as f32)).collect::<Vec<_>>();
    assert_eq!(f32s(&resumed.loss_curve), f32s(&full.loss_curve));
    for l in 0..ckpt.config.num_layers {
        ladimo_tests::assert_same_bytes(&block_path(&whole, l), &block_path(&out, l), "resumed polish");
    }
    assert!(
        !out.join("resume").exists(),
        "the checkpoint is removed once the polish is done"
    );
}

#[test]
fn finetune_bad_settings_are_clear_errors_and_write_nothing() {
    let (dir, run, ckpt, model, tokens) = stage1();
    let cfg = FinetuneConfig {
        epochs: 1,
        ..Default::default()
    };
    let out = dir.path().join("out");
    let err = |run: &std::path::Path, out: &std::path::Path, tokens: &[u32], cfg: &FinetuneConfig| {
        finetune(&ckpt, &model, run, out, tokens, 64, cfg, |_, _, _| {})
            .unwrap_err()
            .to_string()
    };
    let e = err(&run, &out, &tokens[..640], &cfg);
    assert!(
        e.contains("10 windows of 64") && e.contains("at least 20") && !e.contains("layer"),
        "{e}"
    );
    let e = err(&run, &out, &tokens, &FinetuneConfig { lr: 0.0, ..cfg.clone() });
    assert!(e.contains("lr (0)"), "{e}");
    let e = err(&dir.path().join("nothing"), &out, &tokens, &cfg);
    assert!(e.contains("nothing") && e.contains("not finished"), "{e}");
    let e = err(&run, &run, &tokens, &cfg);
    assert!(e.contains("overwrite the stage-1 run"), "{e}");
    assert!(!out.exists());
    // A policy the blocks cannot run (top-5 of 4 experts) fails before anything is written.
    let top5 = FinetuneConfig {
        policies: vec![Policy::TopK { k: 5 }],
        ..cfg.clone()
    };
    let e = err(&run, &out, &tokens, &top5);
    assert!(e.contains("layer 0") && e.contains("policies: top-5"), "{e}");
    assert!(!out.exists());
}

#[test]
fn finetune_under_trains_under_each_layers_policy_with_the_thresholds_in_the_loop() {
    let (dir, run, ckpt, model, tokens) = stage1();
    let cfg = FinetuneConfig {
        epochs: 1,
        batch_windows: 2,
        lr: 1e-3,
        ..Default::default()
    };
    let layer = |layer, k, sparsity| LayerPolicy {
        layer,
        policy: Some(Policy::TopK { k }),
        sparsity,
    };
    let under_with = |s0| vec![layer(0, 1, s0), layer(1, 2, None)];
    let go = |under: &[LayerPolicy], name: &str| {
        finetune_under(
            &ckpt,
            &model,
            &run,
            &dir.path().join(name),
            &tokens,
            64,
            &cfg,
            under,
            |_, _, _| {},
        )
    };
    // Layer 0 at top-1 with thresholds that zero part of x and of h: the KL falls, and the report
    // says what it trained under.
    let teal = Some(Sparsity::Teal { x: 0.3, h: 0.02 });
    let under = under_with(teal.clone());
    let r = go(&under, "teal").unwrap();
    assert_eq!(r.under, under);
    assert!(r.val_kl < r.val_kl_init, "KL {} -> {}", r.val_kl_init, r.val_kl);
    // The thresholds are applied: without them the same routing starts nearer the teacher.
    let plain = go(&under_with(None), "plain").unwrap();
    assert!(
        plain.val_kl_init < r.val_kl_init,
        "{} without thresholds, {} with",
        plain.val_kl_init,
        r.val_kl_init
    );
    // Entries zeroed pass no gradient: with every h of layer 0 under its threshold, layer 0's
    // block gets none and stays as stage 1 left it, while layer 1's trains.
    let all = go(&under_with(Some(Sparsity::Teal { x: 0.0, h: 1e30 })), "all-zero").unwrap();
    assert!(all.val_kl.is_finite());
    let out = dir.path().join("all-zero");
    ladimo_tests::assert_same_bytes(
        &block_path(&run, 0),
        &block_path(&out, 0),
        "a layer whose h is all zero",
    );
    assert_ne!(
        std::fs::read(block_path(&run, 1)).unwrap(),
        std::fs::read(block_path(&out, 1)).unwrap()
    );
    // Finished under these policies: the same call does not train again.
    let again = go(&under, "teal").unwrap();
    assert_eq!(again.seconds, r.seconds);
    // Policies that compete with `under`, or a layer left out: clear errors, nothing written.
    let two = FinetuneConfig {
        policies: vec![Policy::TopK { k: 2 }],
        ..cfg.clone()
    };
    let e = finetune_under(
        &ckpt,
        &model,
        &run,
        &dir.path().join("x"),
        &tokens,
        64,
        &two,
        &under,
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("policies: must be empty"), "{e}");
    let e = go(&under[..1], "y").unwrap_err().to_string();
    assert!(e.contains("layer 1: no policy"), "{e}");
    assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
}
