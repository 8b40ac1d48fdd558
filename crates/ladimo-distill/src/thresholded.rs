//! Stage 1 with thresholds in the loop: each layer's dense FFN trained under the TEAL sparsity it
//! will run with.
//!
//! A training-free TEAL policy zeroes the FFN input entries `|x_i| < t_x` and the intermediate
//! entries `|h_j| < t_h` (`ladimo_moe::sparsity`); the weights never saw those zeros. Here, layer
//! by layer in order (as [`sequential`](crate::sequential) does for MoE blocks), the block is the
//! layer's dense FFN, starting from the dense weights, run under its thresholds
//! ([`teal_forward`]: masked entries pass no gradient, the rest do) and trained with AdamW on the
//! relative MSE to the dense FFN's output:
//!
//! ```text
//! h_s  student residual stream at layer l's input (layers 0..l already trained, under TEAL)
//! (a_s, x) = attention_part(h_s)
//! y = ffn_dense(x) + c * ((h_t' - a_s) / residual_multiplier - ffn_dense(x))   (c: residual_correction)
//! train ffn_l on (x, y) under TEAL(t_x, t_h); then t_h is set again so that the share of h it
//! keeps on the training tokens is what the dense weights kept (the budget holds after training)
//! h_s' = a_s + residual_multiplier * teal(ffn_l)(x)
//! ```
//!
//! The thresholds come in calibrated (on calibration text, by the caller); each finished layer is
//! written to `layerNNN.teal.safetensors` (gate/up/down, PyTorch layout) and `layerNNN.teal.json`
//! (its report, the thresholds it ends with) under temporary names, then renamed. A rerun replays
//! finished layers of the same config and input thresholds, so a killed run resumes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use ladimo_io::HostTensor;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{DenseFfn, FeedForward, Transformer};
use ladimo_moe::HostFfn;
use ladimo_moe::checkpoint::linear_host_weight;
use ladimo_moe::sparsity::{SparseFfn, Sparsity, abs_quantile, dense_ffn, teal_forward};
use serde::{Deserialize, Serialize};

use crate::DistillError;
use crate::run_dir::{read_finished, write_report};
use crate::stream::{batch_schedule, ffn_err, put, rows, window};
use crate::train::warmup_cosine;

/// How each layer is trained under its thresholds. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThresholdTrainConfig {
    pub epochs: usize,
    pub batch_tokens: usize,
    pub lr: f64,
    /// Fraction of the steps spent warming the learning rate up linearly.
    pub warmup_frac: f64,
    /// The cosine schedule decays to `lr * min_lr_frac`.
    pub min_lr_frac: f64,
    pub weight_decay: f32,
    /// Fraction of each layer's tokens kept out of training to measure the relative error.
    pub val_frac: f64,
    /// As `TrainConfig::residual_correction`: 0 aims each layer at the dense FFN on its own
    /// inputs, 1 at the teacher's residual stream.
    pub residual_correction: f64,
    /// Record the training loss every this many steps.
    pub log_every: usize,
    pub seed: u64,
}

impl Default for ThresholdTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_tokens: 512,
            lr: 1e-4,
            warmup_frac: 0.05,
            min_lr_frac: 0.1,
            weight_decay: 0.0,
            val_frac: 0.05,
            residual_correction: 0.0,
            log_every: 10,
            seed: 0,
        }
    }
}

/// What training one layer did; saved as `layerNNN.teal.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdLayerReport {
    pub layer: usize,
    pub config: ThresholdTrainConfig,
    /// The thresholds the layer came in with (calibrated on the dense weights).
    pub initial: Sparsity,
    /// The thresholds it ends with (`h` set again on the trained weights).
    pub sparsity: Sparsity,
    /// Share of `h` entries kept on the training tokens (held after training).
    pub h_keep: f64,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub steps: usize,
    /// (step, training loss).
    pub loss_curve: Vec<(usize, f64)>,
    /// `||teal(ffn)(x) - y|| / ||y||` on the held-back tokens, before and after training.
    pub val_rel_error_init: f64,
    pub val_rel_error: f64,
    pub seconds: f64,
}

fn teal_of(s: &Sparsity, layer: usize) -> Result<(f32, f32), DistillError> {
    match s {
        Sparsity::Teal { x, h } => Ok((*x, *h)),
        other => Err(DistillError::Invalid(format!(
            "layer {layer}: thresholds in the loop train TEAL policies only, not {other}"
        ))),
    }
}

/// `||teal(ffn)(x) - y|| / ||y||` over tokens `idx`, in batches.
fn rel_error(ffn: &DenseFfn, tx: f32, th: f32, x: &[f32], y: &[f32], hidden: usize, idx: &[usize]) -> f64 {
    let device = ffn.gate_proj.weight.device();
    let (mut num, mut den) = (0f64, 0f64);
    for chunk in idx.chunks(512) {
        let out = teal_forward(ffn, rows(x, hidden, chunk, &device), tx, th);
        let want = rows(y, hidden, chunk, &device);
        num += to_vec((out - want.clone()).powf_scalar(2.0).sum())[0] as f64;
        den += to_vec(want.powf_scalar(2.0).sum())[0] as f64;
    }
    (num / den.max(1e-30)).sqrt()
}

/// `|h|` of `ffn` on tokens `idx` with the `x` threshold applied (what the `h` threshold cuts).
fn abs_h(ffn: &DenseFfn, tx: f32, x: &[f32], hidden: usize, idx: &[usize]) -> Vec<f32> {
    let device = ffn.gate_proj.weight.device();
    let mut out = Vec::new();
    for chunk in idx.chunks(512) {
        let xb = rows(x, hidden, chunk, &device);
        let xb = xb.clone().mask_fill(xb.abs().lower_elem(tx), 0.0);
        out.extend(to_vec(ffn.activation(xb).abs()));
    }
    out
}

/// One training step under the thresholds: relative MSE of `teal(ffn)(xb)` to `yb`, backward,
/// AdamW at `lr`. Returns the updated FFN and the loss before the step.
pub fn threshold_step(
    ffn: DenseFfn,
    optim: &mut burn::optim::ModuleOptimizer,
    (tx, th): (f32, f32),
    xb: Tensor<2>,
    yb: Tensor<2>,
    lr: f64,
) -> (DenseFfn, f64) {
    let out = teal_forward(&ffn, xb, tx, th);
    let loss = (out - yb.clone()).powf_scalar(2.0).mean() / yb.powf_scalar(2.0).mean().detach().add_scalar(1e-12);
    let value = to_vec(loss.clone())[0] as f64;
    let grads = GradientsParams::from_grads(loss.backward(), &ffn);
    (optim.step(lr, ffn, grads), value)
}

/// Train one layer's FFN (`ffn`, on `device`) under its TEAL thresholds `sparsity` on `x -> y`
/// (`[tokens, hidden]`). Returns the trained FFN, its thresholds and the report.
/// `progress(step, total, loss)` after every step.
pub fn train_thresholded_layer(
    layer: usize,
    ffn: &DenseFfn,
    sparsity: &Sparsity,
    x: &[f32],
    y: &[f32],
    cfg: &ThresholdTrainConfig,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(DenseFfn, Sparsity, ThresholdLayerReport), DistillError> {
    let start = Instant::now();
    let (tx, th) = teal_of(sparsity, layer)?;
    let hidden = ffn.hidden_size();
    let tokens = x.len() / hidden;
    let val = ((tokens as f64 * cfg.val_frac) as usize).min(tokens.saturating_sub(1));
    let train_n = tokens - val;
    if cfg.batch_tokens == 0 || train_n < cfg.batch_tokens {
        return Err(DistillError::Invalid(format!(
            "layer {layer}: {train_n} training tokens are fewer than one batch of {}",
            cfg.batch_tokens
        )));
    }
    let val_idx: Vec<usize> = (train_n..tokens).collect();
    // The share of h the dense weights keep, on (up to 4096 of) the training tokens.
    let sample: Vec<usize> = (0..train_n.min(4096)).collect();
    let h0 = abs_h(ffn, tx, x, hidden, &sample);
    let h_keep = h0.iter().filter(|&&v| v >= th).count() as f64 / h0.len().max(1) as f64;
    let val_rel_error_init = rel_error(ffn, tx, th, x, y, hidden, &val_idx);

    let device = ffn.gate_proj.weight.device();
    let ad = device.clone().autodiff();
    let host = |l: &burn::nn::Linear| linear_host_weight(l);
    let mut params = HostFfn {
        gate: host(&ffn.gate_proj),
        up: host(&ffn.up_proj),
        down: host(&ffn.down_proj),
    }
    .to_dense(&ad);
    let steps_per_epoch = train_n / cfg.batch_tokens;
    let total = steps_per_epoch * cfg.epochs;
    let mut optim = AdamWConfig::new().with_weight_decay(cfg.weight_decay).init();
    let mut curve = Vec::new();
    let mut step = 0;
    for batch in &batch_schedule(train_n, cfg.batch_tokens, cfg.epochs, cfg.seed, layer) {
        let lr = warmup_cosine(cfg.lr, cfg.warmup_frac, cfg.min_lr_frac, step, total);
        let (next, value) = threshold_step(
            params,
            &mut optim,
            (tx, th),
            rows(x, hidden, batch, &ad),
            rows(y, hidden, batch, &ad),
            lr,
        );
        params = next;
        crate::train::note_step(layer, step, total, value, cfg.log_every, &mut curve)?;
        step += 1;
        progress(step, total, value);
    }
    let trained = params.valid();
    // Keep the budget: the h threshold that keeps the same share on the trained weights.
    let h1 = abs_h(&trained, tx, x, hidden, &sample);
    let th1 = abs_quantile(&h1, 1.0 - h_keep);
    let val_rel_error = rel_error(&trained, tx, th1, x, y, hidden, &val_idx);
    let out = Sparsity::Teal { x: tx, h: th1 };
    let report = ThresholdLayerReport {
        layer,
        config: cfg.clone(),
        initial: sparsity.clone(),
        sparsity: out.clone(),
        h_keep,
        train_tokens: train_n,
        val_tokens: val,
        steps: step,
        loss_curve: curve,
        val_rel_error_init,
        val_rel_error,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((trained, out, report))
}

pub fn weights_path(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer{layer:03}.teal.safetensors"))
}

pub fn report_path(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer{layer:03}.teal.json"))
}

/// Write a trained layer (weights first, then the report; temporary names, then renamed).
pub fn save_thresholded(dir: &Path, ffn: &DenseFfn, report: &ThresholdLayerReport) -> Result<(), DistillError> {
    std::fs::create_dir_all(dir).map_err(|e| DistillError::io(dir, e))?;
    let mut t: BTreeMap<String, HostTensor> = BTreeMap::new();
    t.insert("gate_proj.weight".into(), linear_host_weight(&ffn.gate_proj));
    t.insert("up_proj.weight".into(), linear_host_weight(&ffn.up_proj));
    t.insert("down_proj.weight".into(), linear_host_weight(&ffn.down_proj));
    ladimo_io::write_safetensors(&weights_path(dir, report.layer), &t, None)
        .map_err(|e| DistillError::Invalid(e.to_string()))?;
    write_report(&report_path(dir, report.layer), report)
}

/// A finished layer's report, if its weights and report are both in `dir`.
pub fn finished(dir: &Path, layer: usize) -> Option<ThresholdLayerReport> {
    read_finished(&weights_path(dir, layer), &report_path(dir, layer))
}

/// Load a finished layer: its trained FFN on `device` and its thresholds.
pub fn load_thresholded(dir: &Path, layer: usize, device: &Device) -> Result<(DenseFfn, Sparsity), DistillError> {
    let report = finished(dir, layer)
        .ok_or_else(|| DistillError::Invalid(format!("{}: layer {layer} is not finished", dir.display())))?;
    let path = weights_path(dir, layer);
    let (mut t, _) = ladimo_io::read_safetensors(&path)?;
    let mut get = |name: &str| -> Result<HostTensor, DistillError> {
        t.remove(name)
            .ok_or_else(|| DistillError::Invalid(format!("{}: no tensor `{name}`", path.display())))
    };
    let ffn = HostFfn {
        gate: get("gate_proj.weight")?,
        up: get("up_proj.weight")?,
        down: get("down_proj.weight")?,
    };
    Ok((ffn.to_dense(device), report.sparsity))
}

/// Install a finished run's layers into `model` (a dense model of the same shape): each layer's
/// trained FFN under its thresholds.
pub fn apply_run(model: &mut Transformer, dir: &Path) -> Result<(), DistillError> {
    for l in 0..model.layers.len() {
        let (ffn, s) = load_thresholded(dir, l, &model.device)?;
        let sparse = SparseFfn::new(&ffn, s).map_err(|msg| DistillError::Invalid(format!("layer {l}: {msg}")))?;
        model.layers[l].ffn = Box::new(sparse);
    }
    Ok(())
}

/// Train every layer of `model` (the dense teacher; its layers must be dense FFNs) in order under
/// `sparsity[l]` (TEAL thresholds calibrated on calibration text), on `tokens` cut into whole
/// windows of `seq_len`, writing to `out_dir` (see the module doc). Finished layers of the same
/// config and input thresholds are replayed. `progress(layer, step, total, loss)`.
pub fn run_thresholded(
    model: &Transformer,
    tokens: &[u32],
    seq_len: usize,
    sparsity: &[Sparsity],
    cfg: &ThresholdTrainConfig,
    out_dir: &Path,
    mut progress: impl FnMut(usize, usize, usize, f64),
) -> Result<Vec<ThresholdLayerReport>, DistillError> {
    let c = &model.config;
    if sparsity.len() != c.num_layers {
        return Err(DistillError::Invalid(format!(
            "{} layer sparsities for a model of {} layers",
            sparsity.len(),
            c.num_layers
        )));
    }
    for (l, s) in sparsity.iter().enumerate() {
        teal_of(s, l)?;
    }
    let corr = cfg.residual_correction;
    if !(0.0..=1.0).contains(&corr) {
        return Err(DistillError::Invalid(format!(
            "residual_correction {corr}: expected a number from 0 to 1"
        )));
    }
    if corr > 0.0 && c.use_post_norm {
        return Err(DistillError::Invalid(
            "residual_correction needs the FFN output added to the residual stream as it is; this model has \
             Peri-LN post norms: set residual_correction = 0"
                .into(),
        ));
    }
    if seq_len == 0 || tokens.len() < seq_len {
        return Err(DistillError::Invalid(format!(
            "{} calibration tokens are fewer than one sequence of {seq_len}",
            tokens.len()
        )));
    }
    let device = &model.device;
    let hidden = c.hidden_size;
    let windows = tokens.len() / seq_len;
    let n = windows * seq_len * hidden;
    let mut h_s = vec![0f32; n];
    for w in 0..windows {
        put(
            &mut h_s,
            w,
            model.embed(ids_tensor(&tokens[w * seq_len..(w + 1) * seq_len], 1, device)),
        );
    }
    let mut h_t = (corr > 0.0).then(|| h_s.clone());
    let (mut a_s, mut x, mut y) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut reports = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        let dense = dense_ffn(model, l).ok_or_else(|| {
            DistillError::Invalid(format!("layer {l}: thresholds in the loop need a dense SwiGLU FFN"))
        })?;
        let done = finished(out_dir, l).filter(|r| r.config == *cfg && r.initial == sparsity[l]);
        let t = Instant::now();
        for w in 0..windows {
            let (a, xs) = layer.attention_part(window(&h_s, w, seq_len, hidden, device), &model.rope, &mut None);
            if done.is_none() {
                let yd = dense.forward_any(xs.clone());
                let target = match h_t.as_ref() {
                    Some(h_t) => {
                        let (at, xt) =
                            layer.attention_part(window(h_t, w, seq_len, hidden, device), &model.rope, &mut None);
                        let next = layer.ffn_residual(at, dense.forward_any(xt));
                        let want = (next - a.clone()).div_scalar(c.residual_multiplier);
                        yd.clone() + (want - yd).mul_scalar(corr)
                    }
                    None => yd,
                };
                put(&mut y, w, target);
            }
            put(&mut a_s, w, a);
            put(&mut x, w, xs);
        }
        let (ffn, s) = match done {
            Some(r) => {
                tracing::info!(layer = l, "already finished, replaying");
                reports.push(r);
                load_thresholded(out_dir, l, device)?
            }
            None => {
                let (ffn, s, mut report) =
                    train_thresholded_layer(l, dense, &sparsity[l], &x, &y, cfg, |st, tot, loss| {
                        progress(l, st, tot, loss)
                    })?;
                report.seconds = t.elapsed().as_secs_f64();
                save_thresholded(out_dir, &ffn, &report)?;
                tracing::info!(
                    layer = l,
                    rel_error_init = report.val_rel_error_init,
                    rel_error = report.val_rel_error,
                    seconds = report.seconds,
                    "layer finished (thresholds in the loop)"
                );
                reports.push(report);
                (ffn, s)
            }
        };
        if l + 1 == model.layers.len() {
            break;
        }
        // Both streams after this layer: the student's under its trained, thresholded FFN.
        let block = SparseFfn::new(&ffn, s).map_err(|msg| DistillError::Invalid(format!("layer {l}: {msg}")))?;
        for w in 0..windows {
            let f = FeedForward::forward(&block, window(&x, w, seq_len, hidden, device)).map_err(ffn_err(l))?;
            put(
                &mut h_s,
                w,
                layer.ffn_residual(window(&a_s, w, seq_len, hidden, device), f),
            );
            if let Some(h_t) = h_t.as_mut() {
                let next = layer
                    .forward(window(h_t, w, seq_len, hidden, device), &model.rope, &mut None)
                    .map_err(ffn_err(l))?;
                put(h_t, w, next);
            }
        }
    }
    Ok(reports)
}
