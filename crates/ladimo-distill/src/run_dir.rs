//! A stage-1 run folder: what is in it, what is finished, and how a killed run goes on.
//!
//! ```text
//! layerNNN.moe.safetensors   a layer's trained block (ladimo-moe's block file)
//! layerNNN.json              its LayerReport, written after the block: the layer is finished
//! summary.json               per-layer loss and relative error, rewritten at the end of a run
//! teacher-topK.safetensors   the teacher's top K next tokens (student-input runs, for a polish)
//! finetune.json              a polish's FinetuneReport, written last: the polish is finished
//! resume/                    an unfinished polish's last checkpoint (blocks, AdamW states,
//!                            state.json); resume.part/ while the next one is being written
//! ```
//!
//! Layer-wise training ([`train`](crate::train), [`sequential`](crate::sequential)) skips layers
//! that are finished with the same settings; the polish ([`finetune`](crate::finetune)) goes on
//! from `resume/` and stops at once when `finetune.json` holds the same settings.

use std::path::{Path, PathBuf};

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Tensor};
use ladimo_model::Transformer;
use ladimo_moe::policy_file::LayerPolicy;
use ladimo_moe::{MoeBlock, Policy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::DistillError;
use crate::finetune::{FinetuneConfig, FinetuneReport, moe_mut};
use crate::train::LayerReport;

/// Where a run keeps layer `layer`'s block (a [`ladimo_moe::block_file`]).
pub fn block_path(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer{layer:03}.moe.safetensors"))
}

/// Where a run keeps layer `layer`'s [`LayerReport`].
pub fn report_path(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer{layer:03}.json"))
}

/// Write a trained block (ladimo-moe's block file) and then its report, each through a
/// temporary name: a layer whose report is there is complete.
pub fn save_layer(dir: &Path, block: &MoeBlock, report: &LayerReport) -> Result<(), DistillError> {
    std::fs::create_dir_all(dir).map_err(|e| DistillError::io(dir, e))?;
    ladimo_moe::block_file::save_block(&block_path(dir, report.layer), block)
        .map_err(|e| DistillError::Invalid(e.to_string()))?;
    write_report(&report_path(dir, report.layer), report)
}

/// A finished layer's report, if the layer is complete in `dir`.
pub fn finished(dir: &Path, layer: usize) -> Option<LayerReport> {
    read_finished(&block_path(dir, layer), &report_path(dir, layer))
}

/// Write a layer's report (pretty JSON) through a temporary name, after the weights it vouches
/// for: a layer whose report is there is complete (also for [`thresholded`](crate::thresholded)).
pub(crate) fn write_report(path: &Path, report: &impl Serialize) -> Result<(), DistillError> {
    ladimo_io::atomic::write_atomic(path, &serde_json::to_vec_pretty(report).unwrap())?;
    Ok(())
}

/// The report at `report` when the `weights` it vouches for are there too (else `None`).
pub(crate) fn read_finished<R: DeserializeOwned>(weights: &Path, report: &Path) -> Option<R> {
    if !weights.exists() {
        return None;
    }
    serde_json::from_str(&std::fs::read_to_string(report).ok()?).ok()
}

/// Load a saved block with `policy` (validated against its experts), combined as the run's
/// settings say.
pub fn load_layer_block(dir: &Path, layer: usize, policy: Policy, device: &Device) -> Result<MoeBlock, DistillError> {
    let report = finished(dir, layer)
        .ok_or_else(|| DistillError::Invalid(format!("{}: layer {layer} is not finished", dir.display())))?;
    let mut block = ladimo_moe::block_file::load_block(&block_path(dir, layer), policy, device)
        .map_err(|e| DistillError::Invalid(e.to_string()))?;
    block.combine = report.config.combine;
    Ok(block)
}

/// `summary.json`: per-layer final loss, relative error before/after and seconds.
pub(crate) fn write_summary(out_dir: &Path, reports: &[LayerReport]) -> Result<(), DistillError> {
    let summary: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            serde_json::json!({"layer": r.layer, "final_loss": r.loss_curve.last().map(|x| x.1),
                "val_rel_error_init": r.val_rel_error_init, "val_rel_error": r.val_rel_error, "seconds": r.seconds})
        })
        .collect();
    let p = out_dir.join("summary.json");
    Ok(ladimo_io::atomic::write_atomic(
        &p,
        &serde_json::to_vec_pretty(&summary).unwrap(),
    )?)
}

/// Write the finished run `run_dir` (every layer of the model must be finished there) with the
/// rest of `ckpt` as an MoE checkpoint folder `out`, every layer under `policy`.
pub fn export_run(
    ckpt: &ladimo_io::Checkpoint,
    run_dir: &Path,
    policy: Policy,
    out: &Path,
    device: &Device,
) -> Result<ladimo_moe::MoeSection, DistillError> {
    let n = ckpt.config.num_layers;
    let missing: Vec<usize> = (0..n).filter(|&l| finished(run_dir, l).is_none()).collect();
    if !missing.is_empty() {
        return Err(DistillError::Invalid(format!(
            "{}: layers {missing:?} are not finished; cannot export",
            run_dir.display()
        )));
    }
    let blocks = (0..n)
        .map(|l| load_layer_block(run_dir, l, policy.clone(), device))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<Option<&MoeBlock>> = blocks.iter().map(Some).collect();
    ladimo_moe::save_moe_checkpoint(ckpt, &refs, out).map_err(|e| DistillError::Invalid(e.to_string()))
}

/// Where a polish writes its [`FinetuneReport`].
pub(crate) fn report_file(dir: &Path) -> PathBuf {
    dir.join("finetune.json")
}

/// A finished polish in `dir` (its `finetune.json`), if any.
pub fn finished_finetune(dir: &Path) -> Option<FinetuneReport> {
    serde_json::from_str(&std::fs::read_to_string(report_file(dir)).ok()?).ok()
}

/// Where an unfinished polish keeps its last checkpoint.
pub(crate) fn resume_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("resume")
}

pub(crate) fn optim_path(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer{layer:03}.adamw.bpk"))
}

/// What a checkpoint needs besides the blocks and the optimiser states: the settings it belongs
/// to, how far it got, and the parameter ids the optimiser states are keyed by.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ResumeState {
    pub config: FinetuneConfig,
    /// `finetune_under`'s per-layer policies (empty for `finetune`).
    #[serde(default)]
    pub under: Vec<LayerPolicy>,
    pub seq_len: usize,
    pub train_windows: usize,
    /// Optimiser steps done.
    pub step: usize,
    pub val_kl_init: f64,
    pub loss_curve: Vec<(usize, f64)>,
    pub seconds: f64,
    /// Per layer, the ids of the block's parameters in visiting order.
    pub param_ids: Vec<Vec<u64>>,
}

/// Save a checkpoint: everything into `resume.part/` (the state file last), then swapped in for
/// the previous `resume/`. A crash at any point leaves one complete checkpoint (or none yet).
/// Not an `AtomicDir`: `resume.part/` with its state file is itself a recovery point
/// ([`load_resume`]), and the old checkpoint must go before the new one takes its name.
pub(crate) fn save_resume(
    out_dir: &Path,
    student: &mut Transformer,
    optims: &[ModuleOptimizer],
    reports: &[LayerReport],
    state: &ResumeState,
) -> Result<(), DistillError> {
    let dir = resume_dir(out_dir);
    let part = dir.with_extension("part");
    if part.exists() {
        std::fs::remove_dir_all(&part).map_err(|e| DistillError::io(&part, e))?;
    }
    for (l, report) in reports.iter().enumerate() {
        save_layer(&part, moe_mut(student, l), report)?;
        let path = optim_path(&part, l);
        optims[l]
            .save(&path)
            .map_err(|e| DistillError::Invalid(format!("{}: {e}", path.display())))?;
    }
    let p = part.join("state.json");
    std::fs::write(&p, serde_json::to_vec(state).unwrap()).map_err(|e| DistillError::io(&p, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| DistillError::io(&dir, e))?;
    }
    std::fs::rename(&part, &dir).map_err(|e| DistillError::io(&dir, e))
}

/// The last complete checkpoint in `out_dir` for these settings: `resume/`, or `resume.part/`
/// when a crash fell between removing the old one and renaming the new (its state file, written
/// last, says it is complete). A checkpoint of other settings is ignored (and later replaced).
pub(crate) fn load_resume(
    out_dir: &Path,
    cfg: &FinetuneConfig,
    under: &[LayerPolicy],
    seq_len: usize,
    train_windows: usize,
) -> Option<(PathBuf, ResumeState)> {
    let dir = resume_dir(out_dir);
    [dir.clone(), dir.with_extension("part")].into_iter().find_map(|d| {
        let state: ResumeState = serde_json::from_str(&std::fs::read_to_string(d.join("state.json")).ok()?).ok()?;
        if state.config != *cfg
            || state.under != under
            || state.seq_len != seq_len
            || state.train_windows != train_windows
        {
            tracing::warn!("{}: a checkpoint of other settings; starting over", d.display());
            return None;
        }
        Some((d, state))
    })
}

/// Collects the ids of a module's float parameters, in visiting order.
pub(crate) struct CollectIds(pub Vec<u64>);

impl ModuleVisitor for CollectIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.id.val());
    }
}

/// Gives a module's float parameters the ids `CollectIds` found, in the same order.
pub(crate) struct SetIds<'a, I: Iterator<Item = &'a u64>>(pub &'a mut I);

impl<'a, I: Iterator<Item = &'a u64>> ModuleMapper for SetIds<'a, I> {
    fn map_float<const D: usize>(&mut self, mut param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if let Some(&id) = self.0.next() {
            param.id = ParamId::from(id);
        }
        param
    }
}
