//! End-to-end polish after layer-wise distillation: train every block's experts at once so that
//! the whole MoE model's next-token distribution matches the dense teacher's.
//!
//! Layer-wise distillation leaves each block with an error of its own (about 0.3 of the FFN
//! output's norm on SmolLM2 at 75% of the FFN), and the errors add up over the layers. Here the
//! MoE model runs as a whole on the calibration windows, the loss is the KL divergence from the
//! teacher's next-token distribution to the student's, and its gradient flows back through every
//! layer into the experts' (and shared neurons') weights:
//!
//! ```text
//! p_t = softmax(teacher(ids))                    dense model, no gradient
//! loss = mean_tokens sum_v p_t * (log p_t - log_softmax(student(ids)))
//! student = the model with every MoE block under policies[step % policies.len()]
//! ```
//!
//! With `teacher_top_k = K` the teacher runs once, before the first step, and keeps each
//! token's K most likely next tokens; the loss is then the KL over those K tokens plus one
//! bucket for the rest (see [`FinetuneConfig::teacher_top_k`]). `max_steps = N` ends the run
//! after N steps, its learning-rate schedule spread over them (a polish cut to a time budget).
//!
//! Attention, norms and embeddings stay frozen; with `Unit` combine weights the router gets no
//! gradient from this loss and keeps its layer-wise training, unless `train_router` turns on a
//! straight-through estimator for it. [`finetune_under`] trains instead under fixed per-layer
//! policies with TEAL thresholds inside the experts (stage 2's choice: the polish of the model
//! that will run, zeroed entries passing no gradient). Every 20th window is held back to
//! measure the KL before and after. The result is written like a stage-1 run (one
//! `layerNNN.moe.safetensors` + `layerNNN.json` per layer, temporary names, then renamed) plus
//! `finetune.json`, written last: a folder with `finetune.json` for the same settings is finished
//! and is not trained again. About 20 times per run a checkpoint (blocks, AdamW states, step) is
//! written to `resume/`; a killed run goes on from the last one and ends with the same weights as
//! an uninterrupted run. The folder's layout and the checkpoint are [`run_dir`](crate::run_dir)'s;
//! the teacher's side of the loss is [`teacher_topk`](crate::teacher_topk)'s.

use std::any::Any;
use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use ladimo_io::Checkpoint;
use ladimo_model::util::to_vec;
use ladimo_model::{ModelError, Transformer};
use ladimo_moe::policy_file::LayerPolicy;
use ladimo_moe::{CombineWeights, MoeBlock, Policy, RoutingPolicy, Sparsity};
use serde::{Deserialize, Serialize};

use crate::DistillError;
use crate::run_dir::{
    CollectIds, ResumeState, SetIds, finished, finished_finetune, load_layer_block, load_resume, optim_path,
    report_file, resume_dir, save_layer, save_resume,
};
use crate::teacher_topk::{TeacherTopK, kl, teacher_top_k_path};
use crate::train::{LayerReport, warmup_cosine};

/// Settings of the end-to-end polish. Every field has a default; unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Passes over the calibration windows; 0 = no polish.
    pub epochs: usize,
    /// 0: every step of `epochs` passes. N > 0: stop after N steps (at most `epochs` passes),
    /// with the learning-rate schedule spread over those N: a polish cut to a time budget.
    pub max_steps: usize,
    /// Routing policies the steps take turns with, the same in every layer (the first also
    /// measures the KL). Empty: each block's stage-1 training policy.
    pub policies: Vec<Policy>,
    /// Windows (of the calibration's sequence length) per optimiser step.
    pub batch_windows: usize,
    pub lr: f64,
    pub warmup_frac: f64,
    pub min_lr_frac: f64,
    pub weight_decay: f32,
    pub seed: u64,
    /// Also train the routers of blocks with `Unit` combine weights, through a straight-through
    /// estimator (`CombineWeights::UnitStraightThrough`); the forward pass is unchanged.
    pub train_router: bool,
    /// 0: the teacher runs on every batch and the loss is the exact KL. K > 0: the teacher runs
    /// once over the training windows before the first step and keeps, per token, its K most
    /// likely next tokens' log-probabilities (8 bytes each); the loss is then the KL between
    /// the two distributions coarsened to those K tokens plus one bucket for all the others (a
    /// lower bound of the exact KL, equal to it at K = vocab). Saves the teacher's forward
    /// pass in every step of every epoch. The held-back KL is always the exact one.
    pub teacher_top_k: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 0,
            max_steps: 0,
            policies: Vec::new(),
            batch_windows: 2,
            lr: 3e-4,
            warmup_frac: 0.05,
            min_lr_frac: 0.1,
            weight_decay: 0.0,
            seed: 0,
            train_router: false,
            teacher_top_k: 0,
        }
    }
}

impl FinetuneConfig {
    /// Whether these settings can polish blocks of `experts` routed experts on `windows`
    /// calibration windows of `seq_len` tokens (one in 20 is held back); the message names the
    /// problem, led by the field it concerns. Called by [`finetune`] and, before any long work,
    /// by a converter's config check.
    pub fn check(&self, experts: usize, windows: usize, seq_len: usize) -> Result<(), String> {
        self.check_run(windows, seq_len)?;
        self.check_policies(experts)
    }

    /// The settings that concern the whole run: positive epochs, batch and lr, and enough windows.
    pub fn check_run(&self, windows: usize, seq_len: usize) -> Result<(), String> {
        if self.epochs == 0 || self.batch_windows == 0 || !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!(
                "epochs ({}), batch_windows ({}) and lr ({}) must be positive",
                self.epochs, self.batch_windows, self.lr
            ));
        }
        if windows < 20 || windows - windows / 20 < self.batch_windows {
            return Err(format!(
                "batch_windows ({}): {windows} windows of {seq_len} calibration tokens are too few; \
                 the polish needs at least 20 (one in 20 is held back) and one batch",
                self.batch_windows
            ));
        }
        Ok(())
    }

    /// Whether blocks of `experts` routed experts can run every policy.
    pub fn check_policies(&self, experts: usize) -> Result<(), String> {
        for p in &self.policies {
            p.validate(experts).map_err(|e| format!("policies: {p}: {e}"))?;
        }
        Ok(())
    }
}

/// What the polish did; saved as `finetune.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneReport {
    pub config: FinetuneConfig,
    pub seq_len: usize,
    pub train_windows: usize,
    pub val_windows: usize,
    pub steps: usize,
    /// (step, KL of the batch in nats per token).
    pub loss_curve: Vec<(usize, f64)>,
    /// Mean KL(teacher || student) per token on the held-back windows, before and after.
    pub val_kl_init: f64,
    pub val_kl: f64,
    pub seconds: f64,
    /// Of `seconds`, the teacher's pass over the training windows (`teacher_top_k` > 0; 0
    /// otherwise, and in reports written before it existed).
    #[serde(default)]
    pub teacher_seconds: f64,
    /// [`finetune_under`]: the per-layer policies (and thresholds) it trained under; empty for
    /// [`finetune`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub under: Vec<LayerPolicy>,
}

/// Attention, norms and the final norm of `student` take no gradient: only the FFN blocks train
/// (the embeddings get no optimiser step either).
pub(crate) fn freeze_all_but_ffns(student: &mut Transformer) {
    for layer in &mut student.layers {
        let a = &mut layer.self_attn;
        for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            *lin = lin.clone().no_grad();
        }
        for norm in [&mut layer.input_layernorm, &mut layer.post_attention_layernorm] {
            *norm = norm.clone().no_grad();
        }
        for norm in [&mut layer.post_norm1, &mut layer.post_norm2].into_iter().flatten() {
            *norm = norm.clone().no_grad();
        }
    }
    student.norm = student.norm.clone().no_grad();
}

pub(crate) fn moe_mut(model: &mut Transformer, layer: usize) -> &mut MoeBlock {
    let ffn: &mut dyn Any = model.layers[layer].ffn.as_mut();
    ffn.downcast_mut::<MoeBlock>().expect("every layer holds an MoE block")
}

/// One layer's policy for a step: routing, and TEAL thresholds inside the experts (or none).
type Turn = (Policy, Option<Sparsity>);

/// `block` under `turn`'s routing policy and thresholds.
fn set_turn(block: &mut MoeBlock, (policy, sparsity): &Turn) -> Result<(), ladimo_moe::MoeError> {
    block.set_policy(policy.clone())?;
    block.set_sparsity(sparsity.clone())
}

fn set_policies(model: &mut Transformer, turn: &[Turn]) -> Result<(), DistillError> {
    for (l, t) in turn.iter().enumerate() {
        set_turn(moe_mut(model, l), t)?;
    }
    Ok(())
}

/// Polish the finished stage-1 run in `run_dir` (every layer of `ckpt` finished there) on
/// `tokens`, cut into windows of `seq_len`, writing the polished blocks to `out_dir`. `teacher`
/// is the dense model. `progress(step, total, kl)` is called after every step.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    ckpt: &Checkpoint,
    teacher: &Transformer,
    run_dir: &Path,
    out_dir: &Path,
    tokens: &[u32],
    seq_len: usize,
    cfg: &FinetuneConfig,
    progress: impl FnMut(usize, usize, f64),
) -> Result<FinetuneReport, DistillError> {
    finetune_under(ckpt, teacher, run_dir, out_dir, tokens, seq_len, cfg, &[], progress)
}

/// [`finetune`] under `under`: one routing policy and, optionally, TEAL thresholds per layer
/// (a solved policy file's layers), in every step and in the held-back KL, instead of
/// `cfg.policies` (which must then be empty). The thresholds are fixed: zeroed entries pass no
/// gradient. Empty `under` is [`finetune`]. The saved blocks are as [`finetune`] saves them;
/// the policies stay the caller's to apply.
#[allow(clippy::too_many_arguments)]
pub fn finetune_under(
    ckpt: &Checkpoint,
    teacher: &Transformer,
    run_dir: &Path,
    out_dir: &Path,
    tokens: &[u32],
    seq_len: usize,
    cfg: &FinetuneConfig,
    under: &[LayerPolicy],
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<FinetuneReport, DistillError> {
    let start = Instant::now();
    let n_layers = ckpt.config.num_layers;
    let fixed = under_turn(under, n_layers, cfg)?;
    if out_dir == run_dir {
        return Err(DistillError::Invalid(format!(
            "finetune would overwrite the stage-1 run {}: give another output folder",
            run_dir.display()
        )));
    }
    // The stage-1 reports (partition, training policy), read once.
    let reports: Vec<LayerReport> = (0..n_layers).filter_map(|l| finished(run_dir, l)).collect();
    if reports.len() < n_layers {
        let missing: Vec<usize> = (0..n_layers).filter(|&l| finished(run_dir, l).is_none()).collect();
        return Err(DistillError::Invalid(format!(
            "{}: layers {missing:?} are not finished; finetune starts from a whole stage-1 run",
            run_dir.display()
        )));
    }
    let windows: Vec<&[u32]> = tokens.chunks_exact(seq_len.max(1)).collect();
    cfg.check_run(windows.len(), seq_len)
        .map_err(|e| DistillError::Invalid(format!("finetune: {e}")))?;
    for r in &reports {
        cfg.check_policies(r.partition.experts.len())
            .map_err(|e| DistillError::Invalid(format!("finetune, layer {}: {e}", r.layer)))?;
    }
    let val: Vec<&[u32]> = windows.iter().skip(19).step_by(20).copied().collect();
    // The training windows' indices among all windows (every 20th is held back).
    let train_idx: Vec<usize> = (0..windows.len()).filter(|i| i % 20 != 19).collect();
    let train: Vec<&[u32]> = train_idx.iter().map(|&i| windows[i]).collect();
    if let Some(r) = finished_finetune(out_dir)
        && r.config == *cfg
        && r.under == under
        && r.seq_len == seq_len
        && (0..n_layers).all(|l| finished(out_dir, l).is_some())
    {
        tracing::info!("finetune already finished in {}", out_dir.display());
        return Ok(r);
    }

    // Per layer, the policies the steps take turns with.
    let turns: Vec<Vec<Turn>> = if let Some(turn) = fixed {
        vec![turn]
    } else if cfg.policies.is_empty() {
        vec![reports.iter().map(|r| (r.config.train_policy.clone(), None)).collect()]
    } else {
        cfg.policies.iter().map(|p| vec![(p.clone(), None); n_layers]).collect()
    };
    // A checkpoint of an interrupted polish with these settings, if any: training goes on from it.
    let resume = load_resume(out_dir, cfg, under, seq_len, train.len());
    let src = resume.as_ref().map_or(run_dir.to_path_buf(), |(dir, _)| dir.clone());
    // The student: the teacher's attention, norms and embeddings (frozen) with the blocks.
    let ad = teacher.device.clone().autodiff();
    let mut student = Transformer::from_checkpoint_with(ckpt, &ad, |l| {
        let invalid = |e: &dyn std::fmt::Display| ModelError::Invalid(format!("layer {l}: {e}"));
        let mut block = load_layer_block(&src, l, turns[0][l].0.clone(), &ad).map_err(|e| invalid(&e))?;
        set_turn(&mut block, &turns[0][l]).map_err(|e| invalid(&e))?;
        Ok(Box::new(block))
    })?;
    freeze_all_but_ffns(&mut student);
    if cfg.train_router {
        for l in 0..n_layers {
            let block = moe_mut(&mut student, l);
            if block.combine.weights == CombineWeights::Unit {
                block.combine.weights = CombineWeights::UnitStraightThrough;
            }
        }
    }

    // The held-back KL runs on a copy without autodiff (the teacher's device, the blocks'
    // current weights): on the autodiff device every window kept its graph alive (SmolLM2, 9
    // windows of 512: a 19 GB peak against 6.4 GB this way).
    let val_kl = |student: &mut Transformer| -> Result<f64, DistillError> {
        let plain = Transformer::from_checkpoint_with(ckpt, &teacher.device, |l| {
            let b = moe_mut(student, l);
            let mut plain = MoeBlock::from_params(b.params.valid(), b.combine, turns[0][l].0.clone());
            set_turn(&mut plain, &turns[0][l]).map_err(|e| ModelError::Invalid(format!("layer {l}: {e}")))?;
            Ok(Box::new(plain))
        })?;
        let mut sum = 0.0;
        for w in &val {
            sum += to_vec(kl(teacher, &plain, w, 1)?)[0] as f64;
        }
        Ok(sum / val.len() as f64)
    };
    let steps_per_epoch = train.len() / cfg.batch_windows;
    let total = match cfg.max_steps {
        0 => steps_per_epoch * cfg.epochs,
        n => n.min(steps_per_epoch * cfg.epochs),
    };
    let mut optims: Vec<ModuleOptimizer> = (0..n_layers)
        .map(|_| AdamWConfig::new().with_weight_decay(cfg.weight_decay).init())
        .collect();
    let (mut state, done) = match resume {
        Some((dir, state)) => {
            // The optimiser state is keyed by parameter id: give the reloaded blocks the ids
            // they had when it was saved.
            for (l, optim) in optims.iter_mut().enumerate() {
                let block = moe_mut(&mut student, l);
                let mut ids = state.param_ids[l].iter();
                block.params = block.params.clone().map(&mut SetIds(&mut ids));
                // burn reads the state onto `Device::default()` (the first backend compiled in)
                // and moves it to the parameters' device at the next step.
                let path = optim_path(&dir, l);
                *optim = optim
                    .clone()
                    .load(&path)
                    .map_err(|e| DistillError::Invalid(format!("{}: {e}", path.display())))?;
            }
            tracing::info!(step = state.step, total, "finetune: resuming from {}", dir.display());
            let done = state.step;
            (state, done)
        }
        None => {
            let val_kl_init = val_kl(&mut student)?;
            tracing::info!(val_kl_init, "finetune: KL before");
            let param_ids = (0..n_layers)
                .map(|l| {
                    let mut ids = CollectIds(Vec::new());
                    moe_mut(&mut student, l).params.visit(&mut ids);
                    ids.0
                })
                .collect();
            let state = ResumeState {
                config: cfg.clone(),
                under: under.to_vec(),
                seq_len,
                train_windows: train.len(),
                step: 0,
                val_kl_init,
                loss_curve: Vec::new(),
                seconds: 0.0,
                param_ids,
            };
            (state, 0)
        }
    };
    // The batches of every step, in order: the windows are shuffled in every epoch (the same
    // order on a resumed run), and `max_steps` may end the schedule early.
    let schedule: Vec<Vec<usize>> = {
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.seed);
        let mut schedule = Vec::with_capacity(total);
        for _ in 0..cfg.epochs {
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
            schedule.extend(order.chunks_exact(cfg.batch_windows).map(<[usize]>::to_vec));
        }
        schedule.truncate(total);
        schedule
    };
    // The training windows that some step uses (all of them unless `max_steps` cuts the run).
    let used: Vec<usize> = {
        let mut seen = vec![false; train.len()];
        schedule.iter().flatten().for_each(|&w| seen[w] = true);
        (0..train.len()).filter(|&w| seen[w]).collect()
    };
    // The teacher's top K on every training window that a step uses, once (recomputed after a
    // crash: it is deterministic, and its time counts again).
    // A student-input stage 1 may have written it from the teacher's stream already.
    let (cache, teacher_seconds) = if cfg.teacher_top_k > 0 {
        let t = Instant::now();
        let k = cfg.teacher_top_k.min(teacher.config.vocab_size);
        let path = teacher_top_k_path(run_dir, k);
        let fp = crate::capture::fingerprint(teacher, &tokens[..windows.len() * seq_len], seq_len);
        let c = match TeacherTopK::load(&path, k, seq_len, windows.len(), &fp) {
            Some(mut all) => {
                tracing::info!("finetune: the teacher's top {k} from {}", path.display());
                // Indexed by training window, like a cache computed here.
                all.slot = train_idx.clone();
                all
            }
            None => {
                let tenth = used.len().div_ceil(10).max(1);
                TeacherTopK::new(teacher, &train, &used, k, |done, all| {
                    if done % tenth == 0 || done == all {
                        tracing::info!(done, windows = all, "finetune: teacher pass");
                    }
                })?
            }
        };
        (Some(c), t.elapsed().as_secs_f64())
    } else {
        (None, 0.0)
    };
    // Time spent before a crash counts too (added, not subtracted from `start`: an `Instant`
    // cannot go back past the machine's boot, and a resume may follow a reboot).
    let earlier = state.seconds;
    // A checkpoint about 20 times per run (every step on tiny runs).
    let save_every = (total / 20).max(1);
    let mut step = 0;
    for batch in &schedule {
        if step < done {
            step += 1;
            continue;
        }
        set_policies(&mut student, &turns[step % turns.len()])?;
        let ids: Vec<u32> = batch.iter().flat_map(|&i| train[i].iter().copied()).collect();
        let loss = match &cache {
            Some(c) => c.kl(&student, &ids, batch)?,
            None => kl(teacher, &student, &ids, batch.len())?,
        };
        let value = to_vec(loss.clone())[0] as f64;
        if !value.is_finite() {
            return Err(DistillError::Invalid(format!(
                "finetune: the KL became {value} at step {step}; try a lower lr (now {})",
                cfg.lr
            )));
        }
        let mut grads = loss.backward();
        let lr = warmup_cosine(cfg.lr, cfg.warmup_frac, cfg.min_lr_frac, step, total);
        for (l, optim) in optims.iter_mut().enumerate() {
            let block = moe_mut(&mut student, l);
            let g = GradientsParams::from_module(&mut grads, &block.params);
            block.params = optim.step(lr, block.params.clone(), g);
        }
        step += 1;
        if step % 5 == 0 || step == total {
            state.loss_curve.push((step, value));
            tracing::debug!(step, kl = value, lr, "finetune step");
        }
        if step % save_every == 0 && step < total {
            state.step = step;
            state.seconds = earlier + start.elapsed().as_secs_f64();
            save_resume(out_dir, &mut student, &optims, &reports, &state)?;
        }
        progress(step, total, value);
    }
    let val_kl_after = val_kl(&mut student)?;
    tracing::info!(
        val_kl_init = state.val_kl_init,
        val_kl = val_kl_after,
        "finetune: KL after"
    );

    for (l, report) in reports.iter().enumerate() {
        let block = moe_mut(&mut student, l);
        block.set_policy(report.config.train_policy.clone())?;
        block.set_sparsity(None)?;
        block.combine = report.config.combine;
        save_layer(out_dir, block, report)?;
    }
    let report = FinetuneReport {
        config: cfg.clone(),
        seq_len,
        train_windows: train.len(),
        val_windows: val.len(),
        steps: step,
        loss_curve: state.loss_curve,
        val_kl_init: state.val_kl_init,
        val_kl: val_kl_after,
        seconds: earlier + start.elapsed().as_secs_f64(),
        teacher_seconds,
        under: under.to_vec(),
    };
    let p = report_file(out_dir);
    ladimo_io::atomic::write_atomic(&p, &serde_json::to_vec_pretty(&report).unwrap())?;
    for dir in [resume_dir(out_dir), resume_dir(out_dir).with_extension("part")] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| DistillError::io(&dir, e))?;
        }
    }
    Ok(report)
}

/// `under` as one turn of per-layer policies (`None` when empty); refused when it does not give
/// every layer a routing policy or when `cfg.policies` would compete with it.
fn under_turn(under: &[LayerPolicy], n_layers: usize, cfg: &FinetuneConfig) -> Result<Option<Vec<Turn>>, DistillError> {
    if under.is_empty() {
        return Ok(None);
    }
    if !cfg.policies.is_empty() {
        return Err(DistillError::Invalid(
            "policies: must be empty when the polish trains under fixed per-layer policies".into(),
        ));
    }
    let mut turn: Vec<Option<Turn>> = vec![None; n_layers];
    for l in under {
        let (Some(slot), Some(policy)) = (turn.get_mut(l.layer), &l.policy) else {
            return Err(DistillError::Invalid(format!(
                "layer {}: {l} is not a routing policy of one of the model's {n_layers} MoE layers",
                l.layer
            )));
        };
        *slot = Some((policy.clone(), l.sparsity.clone()));
    }
    turn.into_iter()
        .enumerate()
        .map(|(l, t)| t.ok_or_else(|| DistillError::Invalid(format!("layer {l}: no policy to train under"))))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
