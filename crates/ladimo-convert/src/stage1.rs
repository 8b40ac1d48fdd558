//! Stage 1 of the pipeline: cut every FFN into experts and distil each block
//! ([`ladimo_distill`]), then optionally polish all blocks end to end on KL to the teacher.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::Device;
use ladimo_distill::finetune::{FinetuneConfig, FinetuneReport, finetune_under};
use ladimo_distill::run_dir::{finished, finished_finetune, load_layer_block};
use ladimo_distill::train::{Inputs as TrainInputs, LayerReport, TrainConfig, run_layers};
use ladimo_model::Transformer;
use ladimo_moe::policy_file::LayerPolicy;

use crate::config::ConvertConfig;
use crate::pipeline::{Compute, Inputs};
use crate::report::StageTime;
use crate::step::{Step, ids_bytes, step_key};

/// What stage 1 made: the folder every later step loads the blocks from, and its key.
pub(crate) struct Stage1 {
    pub key: String,
    pub blocks: PathBuf,
    /// Per layer, the layer-wise training's report (from work/stage1).
    pub layers: Vec<LayerReport>,
    /// The end-to-end polish, when it ran.
    pub polish: Option<FinetuneReport>,
}

/// Train every layer's MoE block in work/stage1: on captured teacher activations
/// (`inputs = "teacher"`), or in order on the student's own hidden states (`"student"`).
pub(crate) fn distil(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    work: &Path,
    times: &mut Vec<StageTime>,
    on: &Compute,
) -> Result<Stage1> {
    let device = on.device;
    let train = &cfg.stage1.train;
    let n_layers = inputs.ckpt.config.num_layers;
    let key = step_key(
        "stage1",
        &[inputs.digest.as_bytes(), &ids_bytes(&inputs.calib)],
        &cfg.stage1,
    )?;
    let step = Step::new(work.join("stage1"), "stage 1 (capture + distillation)", key);
    let cap = work.join("capture");
    step.run(
        times,
        |_| Ok(Some(())),
        |s1, times| {
            let t = Instant::now();
            if train.inputs == TrainInputs::Teacher {
                let pb = on
                    .progress
                    .start(inputs.calib.len() / cfg.stage1.seq_len, "1/4 stage 1: capture");
                let meta = ladimo_distill::capture::capture(
                    &inputs.dense,
                    &inputs.calib,
                    cfg.stage1.seq_len,
                    0..n_layers,
                    &cap,
                    |d, _| pb.set_position(d),
                )?;
                pb.finish();
                tracing::info!("capture: {} tokens in {:.0} s", meta.tokens, meta.seconds);
                times.push(StageTime::now("stage 1: capture", t.elapsed().as_secs_f64()));
            }
            let overall = on.progress.start(n_layers, "1/4 stage 1: layers");
            let layer_bar = on.progress.start(1, "layer");
            let already = (0..n_layers)
                .filter(|&l| finished(s1, l).is_some_and(|r| r.config == *train))
                .count();
            overall.set_position(already);
            let show = |l: usize, s: usize, total: usize, loss: f64| {
                if s == 1 {
                    crate::pause::pause_point(&format!("stage1-layer{l}"));
                }
                layer_bar.set_len(total);
                layer_bar.set_position(s);
                layer_bar.set_label(&format!("layer {l} loss {loss:.2e}"));
                if s == total {
                    overall.inc(1);
                }
            };
            let t_train = Instant::now();
            match train.inputs {
                TrainInputs::Teacher => run_layers(&inputs.ckpt, &cap, s1, 0..n_layers, train, device, show)?,
                // With a polish that keeps the teacher's top K, stage 1 writes them from the
                // teacher's stream it carries (the polish then skips its teacher pass).
                TrainInputs::Student => ladimo_distill::sequential::run_layers_sequential(
                    &inputs.ckpt,
                    &inputs.dense,
                    &inputs.calib,
                    cfg.stage1.seq_len,
                    s1,
                    0..n_layers,
                    train,
                    if cfg.stage1.finetune.epochs > 0 {
                        cfg.stage1.finetune.teacher_top_k
                    } else {
                        0
                    },
                    show,
                )?,
            };
            layer_bar.clear();
            overall.finish();
            times.push(StageTime::now("stage 1: distillation", t_train.elapsed().as_secs_f64()));
            if !cfg.stage1.keep_capture && cap.exists() {
                std::fs::remove_dir_all(&cap)
                    .with_context(|| format!("{}: cannot remove the capture", cap.display()))?;
            }
            Ok(())
        },
    )?;
    let layers = (0..n_layers)
        .map(|l| finished(&step.dir, l).with_context(|| format!("{}: layer {l} is not finished", step.dir.display())))
        .collect::<Result<_>>()?;
    Ok(Stage1 {
        key: step.key.clone(),
        blocks: step.dir.clone(),
        layers,
        polish: None,
    })
}

/// When `stage1.finetune.epochs > 0`: polish every block end to end (KL to the teacher) into
/// work/stage1-finetune, which then holds the blocks later steps load.
pub(crate) fn polish(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    s1: Stage1,
    work: &Path,
    times: &mut Vec<StageTime>,
    on: &Compute,
) -> Result<Stage1> {
    let ft = &cfg.stage1.finetune;
    if ft.epochs == 0 {
        return Ok(s1);
    }
    let key = step_key("polish", &[s1.key.as_bytes()], ft)?;
    let step = Step::new(work.join("stage1-finetune"), "stage 1: end-to-end polish", key);
    let report = step.run(
        times,
        |dir| Ok(finished_finetune(dir)),
        |dir, _| {
            let r = polish_blocks(cfg, inputs, &s1.blocks, dir, ft, &[], "1/4 stage 1: polish", on)?;
            tracing::info!(
                "polish: held-back KL {:.4} -> {:.4} nats/token in {:.0} s",
                r.val_kl_init,
                r.val_kl,
                r.seconds
            );
            Ok(r)
        },
    )?;
    Ok(Stage1 {
        key: step.key.clone(),
        blocks: step.dir.clone(),
        polish: Some(report),
        ..s1
    })
}

/// Polish the blocks in `blocks` end to end into `dir` on stage 1's calibration windows, under
/// `under` (per-layer policies and thresholds; empty: `ft.policies`), with a progress bar
/// labelled `label`: what stage 1's polish and stage 2's share.
#[allow(clippy::too_many_arguments)]
pub(crate) fn polish_blocks(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    blocks: &Path,
    dir: &Path,
    ft: &FinetuneConfig,
    under: &[LayerPolicy],
    label: &str,
    on: &Compute,
) -> Result<FinetuneReport> {
    let pb = on.progress.start(1, label);
    let r = finetune_under(
        &inputs.ckpt,
        &inputs.dense,
        blocks,
        dir,
        &inputs.calib,
        cfg.stage1.seq_len,
        ft,
        under,
        |step, total, kl| {
            pb.set_len(total);
            pb.set_position(step);
            pb.set_label(&format!("{label}, KL {kl:.3}"));
        },
    )?;
    pb.finish();
    Ok(r)
}

/// The dense model with every FFN replaced by its block from `blocks` (a stage-1 or polish
/// folder), under the training policy.
pub(crate) fn load_model(inputs: &Inputs, blocks: &Path, train: &TrainConfig, device: &Device) -> Result<Transformer> {
    Ok(Transformer::from_checkpoint_with(&inputs.ckpt, device, |l| {
        let b = load_layer_block(blocks, l, train.train_policy.clone(), device)
            .map_err(|e| ladimo_model::ModelError::Invalid(e.to_string()))?;
        Ok(Box::new(b))
    })?)
}
