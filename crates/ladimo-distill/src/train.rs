//! Distil one layer's MoE block to reproduce the dense FFN output on the teacher's hidden states.
//!
//! Per layer: partition the FFN's neurons, copy the weights into experts, initialise the router
//! from the partition, then train router and experts with AdamW (linear warm-up, cosine decay) to
//! minimise `MSE(moe(x), y)` (optionally plus `w * (1 - cos)`) under the training routing policy.
//! The last `val_frac` of the captured tokens are held back to report the relative error
//! `||moe(x) - y|| / ||y||` before and after training. Each finished layer is written to the run
//! folder ([`run_dir`](crate::run_dir): `layerNNN.moe.safetensors` + `layerNNN.json`); a run skips
//! layers already finished, so a killed run resumes and ends with the same result.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use ladimo_model::util::to_vec;
use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, MoeParams, Policy, RoutingPolicy};
use serde::{Deserialize, Serialize};

use crate::DistillError;
use crate::partition::{
    ActivationSample, Partition, build_partition, calibrate_router, router_from_partition, strategy_by_name,
};
use crate::run_dir::{finished, save_layer, write_summary};
use crate::stream::{batch_schedule, rows};

/// How each layer is cut and trained. Every field has a default; unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Routed experts per layer.
    pub experts: usize,
    /// The share of the FFN's neurons that are always on (the most often active ones; see
    /// [`TrainConfig::shared_neurons`]); the rest are split into experts.
    pub shared_fraction: f64,
    /// Partition strategy: contiguous, random, kmeans, coactivation.
    pub strategy: String,
    pub seed: u64,
    /// The routing policy used while training (and to measure the validation error).
    pub train_policy: Policy,
    /// More policies to train under, taking turns with `train_policy` (step `i` uses entry
    /// `i mod (1 + len)` of `[train_policy, also_train_with..]`), so that a block holds up under
    /// the range of policies stage 2 chooses from. Empty: train under `train_policy` only.
    pub also_train_with: Vec<Policy>,
    /// How expert outputs combine (saved with the block).
    pub combine: Combine,
    pub epochs: usize,
    pub batch_tokens: usize,
    pub lr: f64,
    /// Fraction of the steps spent warming the learning rate up linearly.
    pub warmup_frac: f64,
    /// The cosine schedule decays to `lr * min_lr_frac`.
    pub min_lr_frac: f64,
    pub weight_decay: f32,
    /// Loss = MSE + cosine_weight * (1 - cosine similarity).
    pub cosine_weight: f64,
    /// Fraction of the captured tokens kept out of training to measure the relative error.
    pub val_frac: f64,
    /// Record the training loss every this many steps.
    pub log_every: usize,
    /// The centroid router is scaled so its logits have this standard deviation on the
    /// calibration sample (see `partition::calibrate_router`).
    pub router_init_std: f32,
    /// Weight of the router loss: cross-entropy between the router's softmax and the experts'
    /// output norms (`softmax(log ||expert_e(x)|| / router_norm_temp)`), so the router learns to
    /// pick the experts that matter most for each token (0 = the router learns only through the
    /// combine weights). Most useful with `Unit` combine weights, where the router only selects.
    pub router_norm_weight: f64,
    pub router_norm_temp: f64,
    /// Which hidden states the blocks learn on. `Teacher`: the dense model's (every layer
    /// independent, trained from a capture, in parallel or across processes). `Student`: layer by
    /// layer in order, each layer's inputs coming from the model whose earlier layers are the
    /// blocks already trained (see `sequential`), so a block learns on the inputs it will see.
    pub inputs: Inputs,
    /// With `Student` inputs: how much of the residual stream's accumulated error a block is
    /// trained to undo. The target is `y_dense(x) + c * (h_teacher_next - h_student_attn -
    /// y_dense(x)) / residual_multiplier`: 0 imitates the dense FFN on the student's inputs, 1
    /// aims the layer's output at the teacher's residual stream. Not with Peri-LN post norms.
    pub residual_correction: f64,
}

/// Which hidden states stage 1 trains each block on (`TrainConfig::inputs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Inputs {
    /// The dense teacher's (LaDiMo's layer-wise distillation; layers independent).
    #[default]
    Teacher,
    /// The partly converted model's own, layer by layer in order.
    Student,
}

impl TrainConfig {
    /// The shared neurons of an FFN of `intermediate` neurons: `shared_fraction` of them, rounded.
    pub fn shared_neurons(&self, intermediate: usize) -> usize {
        (self.shared_fraction * intermediate as f64).round() as usize
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            experts: 6,
            // 384 of SmolLM2's 1536.
            shared_fraction: 0.25,
            strategy: "kmeans".into(),
            seed: 0,
            train_policy: Policy::TopK { k: 4 },
            also_train_with: [2, 3, 5, 6].map(|k| Policy::TopK { k }).to_vec(),
            combine: Combine {
                weights: CombineWeights::Unit,
                scale: 1.0,
            },
            epochs: 1,
            batch_tokens: 512,
            lr: 1e-3,
            warmup_frac: 0.05,
            min_lr_frac: 0.1,
            weight_decay: 0.0,
            cosine_weight: 0.0,
            val_frac: 0.05,
            log_every: 10,
            router_init_std: 0.1,
            router_norm_weight: 1.0,
            router_norm_temp: 1.0,
            inputs: Inputs::Teacher,
            residual_correction: 0.0,
        }
    }
}

/// What training one layer did; saved as `layerNNN.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    pub config: TrainConfig,
    pub partition: Partition,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub steps: usize,
    /// (step, training loss).
    pub loss_curve: Vec<(usize, f64)>,
    /// Relative error on the validation tokens under the training policy, before and after.
    pub val_rel_error_init: f64,
    pub val_rel_error: f64,
    pub seconds: f64,
}

fn lr_at(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    warmup_cosine(cfg.lr, cfg.warmup_frac, cfg.min_lr_frac, step, total)
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup_frac` of the steps, then
/// cosine decay from `lr` to `lr * min_lr_frac`.
pub(crate) fn warmup_cosine(lr: f64, warmup_frac: f64, min_lr_frac: f64, step: usize, total: usize) -> f64 {
    let warm = ((total as f64 * warmup_frac) as usize).max(1);
    if step < warm {
        return lr * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (total - warm).max(1) as f64;
    let min = lr * min_lr_frac;
    min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// `||moe(x) - y|| / ||y||` over the given tokens, in batches.
fn rel_error(
    params: &MoeParams,
    cfg: &TrainConfig,
    x: &[f32],
    y: &[f32],
    hidden: usize,
    idx: &[usize],
    device: &Device,
) -> Result<f64, DistillError> {
    let (mut num, mut den) = (0f64, 0f64);
    for chunk in idx.chunks(cfg.batch_tokens.max(1)) {
        let (out, _) = params.forward_sparse(&cfg.combine, &cfg.train_policy, rows(x, hidden, chunk, device))?;
        let want = rows(y, hidden, chunk, device);
        num += to_vec((out - want.clone()).powf_scalar(2.0).sum())
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>();
        den += to_vec(want.powf_scalar(2.0).sum())
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>();
    }
    Ok((num / den.max(1e-30)).sqrt())
}

/// One training step on a batch: the loss `train_layer` minimises (relative MSE, plus the router
/// and cosine terms when `cfg` weights them) of `params` on `xb` -> `yb` (`[tokens, hidden]`, on an
/// autodiff device), backward, then an optimiser step at `lr`. Returns the updated parameters and
/// the loss before the step (possibly non-finite: the caller decides what that means).
pub fn train_step(
    params: MoeParams,
    optim: &mut ModuleOptimizer,
    cfg: &TrainConfig,
    policy: &Policy,
    xb: Tensor<2>,
    yb: Tensor<2>,
    lr: f64,
) -> Result<(MoeParams, f64), DistillError> {
    let (out, _) = params.forward_sparse(&cfg.combine, policy, xb.clone())?;
    let diff = out.clone() - yb.clone();
    // MSE relative to the target's mean square: scale-free, so loss weights mean the same
    // in every layer (Adam itself does not care about the loss scale).
    let mut loss = diff.powf_scalar(2.0).mean() / yb.clone().powf_scalar(2.0).mean().detach().add_scalar(1e-12);
    if cfg.router_norm_weight > 0.0 {
        let xd = xb.detach();
        let norms: Vec<Tensor<2>> = params
            .experts
            .iter()
            .map(|e| e.forward_any(xd.clone()).powf_scalar(2.0).sum_dim(1).sqrt())
            .collect();
        let target = burn::tensor::activation::softmax(
            Tensor::cat(norms, 1)
                .add_scalar(1e-6)
                .log()
                .div_scalar(cfg.router_norm_temp),
            1,
        )
        .detach();
        let logp = burn::tensor::activation::log_softmax(params.router_logits(xd), 1);
        let ce = (target * logp).sum_dim(1).mean().neg();
        loss = loss + ce.mul_scalar(cfg.router_norm_weight);
    }
    if cfg.cosine_weight > 0.0 {
        let dot = (out.clone() * yb.clone()).sum_dim(1);
        let norms = (out.powf_scalar(2.0).sum_dim(1) * yb.powf_scalar(2.0).sum_dim(1))
            .sqrt()
            .add_scalar(1e-12);
        let cos = (dot / norms).mean();
        loss = loss + cos.neg().add_scalar(1.0).mul_scalar(cfg.cosine_weight);
    }
    let value = to_vec(loss.clone())[0] as f64;
    let grads = GradientsParams::from_grads(loss.backward(), &params);
    Ok((optim.step(lr, params, grads), value))
}

/// Train one layer's MoE block. `x`, `y`: the captured `[tokens, hidden]` FFN inputs and outputs.
/// `progress(step, total_steps, loss)` is called after every step.
pub fn train_layer(
    layer: usize,
    ffn: &HostFfn,
    x: &[f32],
    y: &[f32],
    cfg: &TrainConfig,
    device: &Device,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(MoeBlock, LayerReport), DistillError> {
    let start = Instant::now();
    for p in &cfg.also_train_with {
        p.validate(cfg.experts)
            .map_err(|e| DistillError::Invalid(format!("also_train_with {p}: {e}")))?;
    }
    let hidden = ffn.hidden_size();
    let tokens = x.len() / hidden;
    let val = ((tokens as f64 * cfg.val_frac) as usize).min(tokens.saturating_sub(1));
    let train_n = tokens - val;
    if train_n < cfg.batch_tokens.min(tokens) || train_n == 0 {
        return Err(DistillError::Invalid(format!(
            "{tokens} captured tokens leave none to train on"
        )));
    }
    // Partition, using the first (up to) 1024 training tokens for activation statistics.
    let sample_n = train_n.min(1024);
    let acts = ActivationSample::compute(ffn, &x[..sample_n * hidden], sample_n);
    let strategy = strategy_by_name(&cfg.strategy, cfg.seed ^ layer as u64).map_err(DistillError::Invalid)?;
    let partition = build_partition(
        ffn,
        Some(&acts),
        strategy.as_ref(),
        cfg.experts,
        cfg.shared_neurons(ffn.intermediate_size()),
    )
    .map_err(|e| DistillError::Invalid(format!("layer {layer}: {e}")))?;
    let experts: Vec<HostFfn> = partition.experts.iter().map(|p| ffn.select_neurons(p)).collect();
    let shared = (!partition.shared.is_empty()).then(|| ffn.select_neurons(&partition.shared));
    let mut router = router_from_partition(ffn, &partition);
    calibrate_router(&mut router, &x[..sample_n * hidden], sample_n, cfg.router_init_std);
    let ad = device.clone().autodiff();
    let block = MoeBlock::new(
        &router,
        None,
        &experts,
        shared.as_ref(),
        cfg.combine,
        cfg.train_policy.clone(),
        &ad,
    )?;
    let mut params = block.params;

    let val_idx: Vec<usize> = (train_n..tokens).collect();
    let val_rel_error_init = rel_error(&params.valid(), cfg, x, y, hidden, &val_idx, device)?;
    let steps_per_epoch = train_n / cfg.batch_tokens;
    let total = steps_per_epoch * cfg.epochs;
    let mut optim = AdamWConfig::new().with_weight_decay(cfg.weight_decay).init();
    let mut curve = Vec::new();
    let mut step = 0;
    for batch in &batch_schedule(train_n, cfg.batch_tokens, cfg.epochs, cfg.seed, layer) {
        let xb = rows(x, hidden, batch, &ad);
        let yb = rows(y, hidden, batch, &ad);
        let policy = match step % (1 + cfg.also_train_with.len()) {
            0 => &cfg.train_policy,
            i => &cfg.also_train_with[i - 1],
        };
        let (next, value) = train_step(params, &mut optim, cfg, policy, xb, yb, lr_at(cfg, step, total))?;
        params = next;
        if note_step(layer, step, total, value, cfg.log_every, &mut curve)? {
            tracing::debug!(layer, step, loss = value, "train");
        }
        step += 1;
        progress(step, total, value);
    }
    let params = params.valid();
    let val_rel_error = rel_error(&params, cfg, x, y, hidden, &val_idx, device)?;
    let report = LayerReport {
        layer,
        config: cfg.clone(),
        partition,
        train_tokens: train_n,
        val_tokens: val,
        steps: step,
        loss_curve: curve,
        val_rel_error_init,
        val_rel_error,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((
        MoeBlock::from_params(params, cfg.combine, cfg.train_policy.clone()),
        report,
    ))
}

/// Train layers `layers` from a capture in `capture_dir`, writing to `out_dir`; layers already
/// finished there are skipped (resume). Writes `summary.json` (per-layer loss and relative error).
/// `progress(layer, step, total, loss)` is called after every step.
pub fn run_layers(
    ckpt: &ladimo_io::Checkpoint,
    capture_dir: &Path,
    out_dir: &Path,
    layers: std::ops::Range<usize>,
    cfg: &TrainConfig,
    device: &Device,
    mut progress: impl FnMut(usize, usize, usize, f64),
) -> Result<Vec<LayerReport>, DistillError> {
    if cfg.inputs != Inputs::Teacher {
        return Err(DistillError::Invalid(
            "inputs = \"student\" trains layers in order on the student's hidden states: use sequential::run_layers_sequential, not a capture".into(),
        ));
    }
    let meta = crate::capture::read_meta(capture_dir)?;
    if layers.is_empty() || layers.start < meta.layers.start || layers.end > meta.layers.end {
        return Err(DistillError::Invalid(format!(
            "layer range {layers:?} is not inside the captured layers {:?}",
            meta.layers
        )));
    }
    let mut reports = Vec::new();
    for layer in layers {
        if let Some(r) = finished(out_dir, layer) {
            if r.config == *cfg {
                tracing::info!(layer, "already finished, skipping");
                reports.push(r);
                continue;
            }
            tracing::warn!(layer, "finished with another config; training it again");
        }
        let (x, y) = crate::capture::load_layer(capture_dir, &meta, layer)?;
        let ffn = HostFfn::from_checkpoint(ckpt, layer).map_err(ladimo_model::ModelError::from)?;
        let (block, report) = train_layer(layer, &ffn, &x, &y, cfg, device, |s, t, l| progress(layer, s, t, l))?;
        save_layer(out_dir, &block, &report)?;
        tracing::info!(
            layer,
            rel_error_init = report.val_rel_error_init,
            rel_error = report.val_rel_error,
            seconds = report.seconds,
            "layer finished"
        );
        reports.push(report);
    }
    write_summary(out_dir, &reports)?;
    Ok(reports)
}

/// After one training step of layer `layer`: refuse a loss that is not finite, and keep every
/// `log_every`-th step's loss (and the last one's) in `curve`. Returns whether it was kept.
pub(crate) fn note_step(
    layer: usize,
    step: usize,
    total: usize,
    value: f64,
    log_every: usize,
    curve: &mut Vec<(usize, f64)>,
) -> Result<bool, DistillError> {
    if !value.is_finite() {
        return Err(DistillError::Invalid(format!(
            "layer {layer}: loss became {value} at step {step}"
        )));
    }
    let keep = step.is_multiple_of(log_every.max(1)) || step + 1 == total;
    if keep {
        curve.push((step, value));
    }
    Ok(keep)
}
