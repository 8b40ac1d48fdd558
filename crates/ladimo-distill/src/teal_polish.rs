//! End-to-end polish of a dense model under its TEAL thresholds: every layer's FFN trained at
//! once, with the thresholds in the loop, so that the whole sparse model's next-token
//! distribution matches the dense teacher's.
//!
//! Layer-wise training under thresholds ([`thresholded`](crate::thresholded)) aims each FFN at
//! the dense FFN's output on its own inputs; what the masks drop there is many small terms that
//! no weight change on that layer can predict. Here the loss is the model's: the KL from the
//! teacher's next-token distribution to the student's, and its gradient reaches every FFN through
//! every later layer, so a layer can also make up for what the layers before it dropped:
//!
//! ```text
//! p_t  = softmax(teacher(ids))                        dense model, no gradient
//! student = the model with FFN_l(x) = down(mask_h(silu(gate x') * up x')),  x' = mask_x(x)
//!           mask_x zeroes |x_i| < t_x(l), mask_h zeroes |h_j| < t_h(l)   (no gradient where zeroed)
//! loss = mean_tokens KL(p_t || softmax(student(ids)))        (teacher's top K + a rest bucket)
//! ```
//!
//! Attention, norms and embeddings stay frozen; only gate, up and down of every layer train
//! (AdamW, warm-up then cosine). The thresholds come in calibrated (on calibration text, by the
//! caller) and are not trained; after the polish the caller calibrates them again on the new
//! weights, so the model keeps its budget. Every 20th window is held back to measure the KL
//! before and after.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Tensor;
use ladimo_io::Checkpoint;
use ladimo_model::util::to_vec;
use ladimo_model::{DenseFfn, FeedForward, FfnError, Transformer};
use ladimo_moe::sparsity::{Sparsity, dense_ffn, teal_forward};
use serde::{Deserialize, Serialize};

use crate::DistillError;
use crate::teacher_topk::{TeacherTopK, kl};
use crate::train::warmup_cosine;

/// Settings of the polish under thresholds: the one definition. Every field has a default
/// ([`TealPolishConfig::default`]); `ladimo sparsify --polish` and `cargo xtask thresholds` take
/// them as `--polish-*` flags (clap), config files as TOML (serde). The clap ids are `polish_*`, so the flags can sit beside a
/// command's own `--epochs` or `--lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TealPolishConfig {
    /// Passes over the training windows.
    #[arg(id = "polish_epochs", long = "polish-epochs", default_value_t = TealPolishConfig::default().epochs)]
    pub epochs: usize,
    /// Windows per optimiser step.
    #[arg(id = "polish_batch_windows", long = "polish-batch-windows", default_value_t = TealPolishConfig::default().batch_windows)]
    pub batch_windows: usize,
    /// AdamW peak learning rate, warm-up share, cosine decay to `lr * min_lr_frac`. The default,
    /// 3e-5, is the lowest held-back calibration KL among 1e-4, 5e-5 and 3e-5 at 66% and 75% of
    /// the FFN on SmolLM2 (docs/reports/teal-polish.md); held-out text was not used to choose it.
    #[arg(id = "polish_lr", long = "polish-lr", default_value_t = TealPolishConfig::default().lr)]
    pub lr: f64,
    #[arg(id = "polish_warmup_frac", long = "polish-warmup-frac", default_value_t = TealPolishConfig::default().warmup_frac)]
    pub warmup_frac: f64,
    #[arg(id = "polish_min_lr_frac", long = "polish-min-lr-frac", default_value_t = TealPolishConfig::default().min_lr_frac)]
    pub min_lr_frac: f64,
    #[arg(id = "polish_weight_decay", long = "polish-weight-decay", default_value_t = TealPolishConfig::default().weight_decay)]
    pub weight_decay: f32,
    /// The teacher's K most likely next tokens per position make the loss (plus one bucket for
    /// the rest), computed once before the first step.
    #[arg(id = "polish_top_k", long = "polish-top-k", default_value_t = TealPolishConfig::default().teacher_top_k)]
    pub teacher_top_k: usize,
    #[arg(id = "polish_seed", long = "polish-seed", default_value_t = TealPolishConfig::default().seed)]
    pub seed: u64,
}

impl Default for TealPolishConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_windows: 2,
            lr: 3e-5,
            warmup_frac: 0.05,
            min_lr_frac: 0.1,
            weight_decay: 0.0,
            teacher_top_k: 128,
            seed: 0,
        }
    }
}

/// What the polish did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TealPolishReport {
    pub config: TealPolishConfig,
    pub train_windows: usize,
    pub val_windows: usize,
    pub steps: usize,
    /// (step, training KL) every 5 steps.
    pub loss_curve: Vec<(usize, f64)>,
    /// Mean KL(teacher || student) per token on the held-back windows, before and after.
    pub val_kl_init: f64,
    pub val_kl: f64,
    pub seconds: f64,
}

/// Where the polish is, for a progress display (the library draws none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PolishProgress {
    /// The teacher's top K computed for `done` of `total` training windows (before step 1).
    Teacher { done: usize, total: usize },
    /// Optimiser step `step` of `total` done, at training KL `kl`.
    Step { step: usize, total: usize, kl: f64 },
}

/// A dense FFN under fixed TEAL thresholds, differentiable ([`teal_forward`]): the student's
/// layers while it trains.
#[derive(Debug)]
struct TealTrainFfn {
    ffn: DenseFfn,
    tx: f32,
    th: f32,
}

impl FeedForward for TealTrainFfn {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, h] = x.dims();
        Ok(teal_forward(&self.ffn, x.reshape([b * s, h]), self.tx, self.th).reshape([b, s, h]))
    }

    fn total_params(&self) -> usize {
        3 * self.ffn.hidden_size() * self.ffn.intermediate_size()
    }

    fn active_params_per_token(&self) -> f64 {
        self.total_params() as f64
    }

    fn describe(&self) -> String {
        format!("TEAL (training) |x| >= {}, |h| >= {}", self.tx, self.th)
    }
}

fn teal_layer(model: &mut Transformer, layer: usize) -> &mut TealTrainFfn {
    let ffn: &mut dyn std::any::Any = model.layers[layer].ffn.as_mut();
    ffn.downcast_mut::<TealTrainFfn>()
        .expect("every student layer is a TealTrainFfn")
}

/// Polish `start` (one dense FFN per layer, on any device, e.g. the dense weights or a
/// layer-wise thresholded run) under `sparsity` (TEAL thresholds per layer) against `teacher`
/// (the dense model) on `tokens`, cut into whole windows of `seq_len`. Returns the trained FFNs
/// (on the teacher's device) and the report; `progress` hears of the teacher pass and each step.
#[allow(clippy::too_many_arguments)]
pub fn polish_thresholded(
    ckpt: &Checkpoint,
    teacher: &Transformer,
    start: &[DenseFfn],
    sparsity: &[Sparsity],
    tokens: &[u32],
    seq_len: usize,
    cfg: &TealPolishConfig,
    mut progress: impl FnMut(PolishProgress),
) -> Result<(Vec<DenseFfn>, TealPolishReport), DistillError> {
    let t0 = Instant::now();
    let n_layers = teacher.layers.len();
    if start.len() != n_layers || sparsity.len() != n_layers {
        return Err(DistillError::Invalid(format!(
            "polish under thresholds: {} FFNs and {} sparsities for {n_layers} layers",
            start.len(),
            sparsity.len()
        )));
    }
    let thresholds: Vec<(f32, f32)> = sparsity
        .iter()
        .enumerate()
        .map(|(l, s)| match s {
            Sparsity::Teal { x, h } => Ok((*x, *h)),
            other => Err(DistillError::Invalid(format!(
                "layer {l}: the polish under thresholds trains TEAL policies only, not {other}"
            ))),
        })
        .collect::<Result<_, _>>()?;
    if cfg.batch_windows == 0 || cfg.teacher_top_k == 0 {
        return Err(DistillError::Invalid(
            "polish under thresholds: batch_windows and teacher_top_k must be at least 1".into(),
        ));
    }
    let windows: Vec<&[u32]> = tokens.chunks_exact(seq_len.max(1)).collect();
    let val: Vec<&[u32]> = windows.iter().skip(19).step_by(20).copied().collect();
    let train: Vec<&[u32]> = (0..windows.len())
        .filter(|i| i % 20 != 19)
        .map(|i| windows[i])
        .collect();
    if train.len() < cfg.batch_windows || val.is_empty() {
        return Err(DistillError::Invalid(format!(
            "polish under thresholds: {} windows of {seq_len} tokens are too few (20 at least)",
            windows.len()
        )));
    }

    // The student: the teacher's attention, norms and embeddings (frozen), the FFNs trainable.
    let ad = teacher.device.clone().autodiff();
    // Through host weights, so the parameters are new ones on the autodiff device.
    let to_ad = |f: &DenseFfn| ladimo_moe::HostFfn::from_dense(f).to_dense(&ad);
    let mut student = Transformer::from_checkpoint_with(ckpt, &ad, |l| {
        let (tx, th) = thresholds[l];
        Ok(Box::new(TealTrainFfn {
            ffn: to_ad(&start[l]),
            tx,
            th,
        }))
    })?;
    crate::finetune::freeze_all_but_ffns(&mut student);

    // The held-back KL on a copy without autodiff (the teacher's device, the current weights).
    let val_kl = |student: &mut Transformer| -> Result<f64, DistillError> {
        let plain = Transformer::from_checkpoint_with(ckpt, &teacher.device, |l| {
            let s = teal_layer(student, l);
            Ok(Box::new(TealTrainFfn {
                ffn: s.ffn.valid(),
                tx: s.tx,
                th: s.th,
            }))
        })?;
        let mut sum = 0.0;
        for w in &val {
            sum += to_vec(kl(teacher, &plain, w, 1)?)[0] as f64;
        }
        Ok(sum / val.len() as f64)
    };
    let val_kl_init = val_kl(&mut student)?;
    tracing::info!(val_kl_init, "polish under thresholds: KL before");

    let steps_per_epoch = train.len() / cfg.batch_windows;
    let total = steps_per_epoch * cfg.epochs;
    let schedule: Vec<Vec<usize>> = {
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.seed);
        let mut s = Vec::with_capacity(total);
        for _ in 0..cfg.epochs {
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
            s.extend(order.chunks_exact(cfg.batch_windows).map(<[usize]>::to_vec));
        }
        s
    };
    let used: Vec<usize> = (0..train.len()).collect();
    let cache = TeacherTopK::new(teacher, &train, &used, cfg.teacher_top_k, |done, total| {
        progress(PolishProgress::Teacher { done, total })
    })?;
    let mut optims: Vec<_> = (0..n_layers)
        .map(|_| AdamWConfig::new().with_weight_decay(cfg.weight_decay).init())
        .collect();
    let mut loss_curve = Vec::new();
    for (step, batch) in schedule.iter().enumerate() {
        let ids: Vec<u32> = batch.iter().flat_map(|&i| train[i].iter().copied()).collect();
        let loss = cache.kl(&student, &ids, batch)?;
        let value = to_vec(loss.clone())[0] as f64;
        if !value.is_finite() {
            return Err(DistillError::Invalid(format!(
                "polish under thresholds: the KL became {value} at step {step}; try a lower lr (now {})",
                cfg.lr
            )));
        }
        let mut grads = loss.backward();
        let lr = warmup_cosine(cfg.lr, cfg.warmup_frac, cfg.min_lr_frac, step, total);
        for (l, optim) in optims.iter_mut().enumerate() {
            let layer = teal_layer(&mut student, l);
            let g = GradientsParams::from_module(&mut grads, &layer.ffn);
            layer.ffn = optim.step(lr, layer.ffn.clone(), g);
        }
        if (step + 1) % 5 == 0 || step + 1 == total {
            loss_curve.push((step + 1, value));
        }
        progress(PolishProgress::Step {
            step: step + 1,
            total,
            kl: value,
        });
    }
    let val_kl_after = val_kl(&mut student)?;
    tracing::info!(val_kl_init, val_kl = val_kl_after, "polish under thresholds: KL after");
    let trained = (0..n_layers).map(|l| teal_layer(&mut student, l).ffn.valid()).collect();
    Ok((
        trained,
        TealPolishReport {
            config: cfg.clone(),
            train_windows: train.len(),
            val_windows: val.len(),
            steps: schedule.len(),
            loss_curve,
            val_kl_init,
            val_kl: val_kl_after,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// The dense FFN of every layer of `model` (dense or under activation sparsity), as a start.
pub fn dense_ffns(model: &Transformer) -> Result<Vec<DenseFfn>, DistillError> {
    (0..model.layers.len())
        .map(|l| {
            dense_ffn(model, l)
                .cloned()
                .ok_or_else(|| DistillError::Invalid(format!("layer {l} is not a dense FFN")))
        })
        .collect()
}
