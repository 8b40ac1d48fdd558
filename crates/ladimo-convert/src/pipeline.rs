//! The conversion, top to bottom:
//!
//! ```text
//! dense checkpoint + calibration text
//!   -> stage 1: capture teacher FFN inputs/outputs -> partition + distil each layer  (work/stage1)
//!   -> stage 2: profile routers and candidate policies -> solve one policy per layer (work/stage2)
//!   -> export: MoE checkpoint (Mixtral when exact) + policy.toml                      (work/final)
//!   -> evaluate dense vs MoE: held-out PPL, zero-shot tasks, params, tokens/s         (work/eval)
//!   -> report.md + report.json + plots                                                (work/final)
//!   -> rename work/final -> OUT
//! ```
//! Every step writes under temporary names and records what it was made from (a key hashing
//! the model digest, the token ids and the step's config), so a killed run resumes where it
//! stopped, and a changed config redoes only the steps it affects. OUT appears only when complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ladimo_data::{Part, Task, take_tokens};
use ladimo_distill::finetune::{finetune, finished_finetune, progress_bar};
use ladimo_distill::train::{Inputs, finished, load_layer_block, run_layers};
use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_model::perplexity::perplexity;
use ladimo_moe::moe_block;
use ladimo_profile::{Budget, Profile, ProfileConfig, Solved, profile_model, solve_profile, write_plots};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ConvertConfig, TextSet};
use crate::evaluate::{self, TaskResult, write_json};
use crate::report::{self, LangPpl, ModelSide, Report, StageTime, TaskRow};

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

fn bar(len: usize, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template("{msg:<28} [{bar:30}] {pos}/{len} {elapsed_precise} left {eta_precise}")
            .expect("template"),
    );
    b.set_message(msg.to_string());
    b
}

fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn ids_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|t| t.to_le_bytes()).collect()
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
        .map(|f| ladimo_io::fetch::sha256_file(f))
        .collect::<Result<Vec<_>, _>>()?;
    if files.len() == 1 {
        return Ok(sums[0][..16].to_string());
    }
    Ok(hash(&sums.iter().map(|s| s.as_bytes()).collect::<Vec<_>>()))
}

/// A step's record in the work folder: what it was made from and how long it took.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepRecord {
    key: String,
    seconds: f64,
}

fn read_record(dir: &Path) -> Option<StepRecord> {
    serde_json::from_slice(&std::fs::read(dir.join("done.json")).ok()?).ok()
}

/// Make `dir` hold results for `key`: keep it when its record or its `key.txt` says `key`, else
/// empty it (the work folder is ours; nothing of the user's lives there).
fn prepare_step(dir: &Path, key: &str) -> Result<()> {
    let key_file = dir.join("key.txt");
    let same = std::fs::read_to_string(&key_file).is_ok_and(|k| k.trim() == key);
    if dir.exists() && !same {
        tracing::warn!("{}: made from other inputs; starting this step again", dir.display());
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    std::fs::write(&key_file, key).with_context(|| format!("{}: cannot write", key_file.display()))?;
    Ok(())
}

fn finish_step(dir: &Path, key: &str, seconds: f64) -> Result<()> {
    write_json(
        &dir.join("done.json"),
        &StepRecord {
            key: key.into(),
            seconds,
        },
    )
}

/// Resolved text sets: (tag, files, share).
fn calibration_sets(cfg: &ConvertConfig) -> Result<(Vec<TextSet>, Vec<TextSet>)> {
    let (mut cal, mut held) = (cfg.data.calibration.clone(), cfg.data.heldout.clone());
    if cal.is_empty() || held.is_empty() {
        let d = ladimo_data::fetch_data().context("fetching the default calibration and held-out text")?;
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
    Ok((cal, held))
}

/// The first `n` held-out tokens of `set`; the error names the set and the config field.
fn heldout_ids(tok: &ladimo_io::Tokenizer, set: &TextSet, n: usize, field: &str) -> Result<Vec<u32>> {
    ladimo_data::heldout_tokens(tok, &set.files, n)
        .with_context(|| format!("held-out set `{}` ({field} = {n})", set.tag))
}

/// Run the whole conversion; returns the report (also written to `paths.out`).
pub fn convert(cfg: &ConvertConfig, config_name: &str, paths: &Paths) -> Result<Report> {
    let start = Instant::now();
    // Refuse an existing output before any long work.
    if paths.out.exists() && !paths.force {
        bail!(
            "{}: already exists; choose another --out, or --force to replace it (the old folder is moved aside, not deleted)",
            paths.out.display()
        );
    }
    let work = &paths.work;
    std::fs::create_dir_all(work).with_context(|| format!("{}: cannot create the work folder", work.display()))?;
    std::fs::write(work.join("convert.toml"), cfg.to_toml())
        .with_context(|| format!("{}: cannot write", work.display()))?;
    let device = ladimo_backend::device();
    let mut times: Vec<StageTime> = Vec::new();

    // ---- Inputs -------------------------------------------------------------------------------
    let model_path = resolve_model(&cfg.model)?;
    let ckpt =
        Checkpoint::open(&model_path).with_context(|| format!("{}: cannot open the model", model_path.display()))?;
    let tok = ckpt.tokenizer()?;
    let digest = weights_digest(&model_path)?;
    let (cal_sets, held_sets) = calibration_sets(cfg)?;
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
    let dense = Transformer::from_checkpoint(&ckpt, &device)?;
    let n_layers = ckpt.config.num_layers;

    // ---- Stage 1: capture, then distil every layer -------------------------------------------
    let train = &cfg.stage1.train;
    let key1 = hash(&[
        digest.as_bytes(),
        &ids_bytes(&calib),
        &cfg.stage1.seq_len.to_le_bytes(),
        &serde_json::to_vec(train)?,
    ]);
    let s1 = work.join("stage1");
    let cap = work.join("capture");
    let t = Instant::now();
    match read_record(&s1).filter(|r| r.key == key1) {
        Some(r) => {
            tracing::info!("stage 1: reusing {} (finished earlier)", s1.display());
            times.push(StageTime::earlier("stage 1 (capture + distillation)", r.seconds));
        }
        None => {
            prepare_step(&s1, &key1)?;
            // Teacher inputs: capture every layer's FFN input/output once, then train the layers
            // independently. Student inputs: layers in order on the partly converted model's own
            // hidden states, no capture (`ladimo_distill::sequential`).
            let mut capture_s = None;
            if train.inputs == Inputs::Teacher {
                let pb = bar(calib.len() / cfg.stage1.seq_len, "1/4 stage 1: capture");
                let meta =
                    ladimo_distill::capture::capture(&dense, &calib, cfg.stage1.seq_len, 0..n_layers, &cap, |d, _| {
                        pb.set_position(d as u64)
                    })?;
                pb.finish();
                tracing::info!("capture: {} tokens in {:.0} s", meta.tokens, meta.seconds);
                capture_s = Some(t.elapsed().as_secs_f64());
            }
            let overall = bar(n_layers, "1/4 stage 1: layers");
            let layer_bar = bar(1, "layer");
            let already = (0..n_layers)
                .filter(|&l| finished(&s1, l).is_some_and(|r| r.config == *train))
                .count();
            overall.set_position(already as u64);
            let show = |l: usize, s: usize, total: usize, loss: f64| {
                layer_bar.set_length(total as u64);
                layer_bar.set_position(s as u64);
                layer_bar.set_message(format!("layer {l} loss {loss:.2e}"));
                if s == total {
                    overall.inc(1);
                }
            };
            let t_train = Instant::now();
            match train.inputs {
                Inputs::Teacher => run_layers(&ckpt, &cap, &s1, 0..n_layers, train, &device, show)?,
                // With a polish that keeps the teacher's top K, stage 1 writes them from the
                // teacher's stream it carries (the polish then skips its teacher pass).
                Inputs::Student => ladimo_distill::sequential::run_layers_sequential(
                    &ckpt,
                    &dense,
                    &calib,
                    cfg.stage1.seq_len,
                    &s1,
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
            layer_bar.finish_and_clear();
            overall.finish();
            if let Some(capture_s) = capture_s {
                times.push(StageTime::now("stage 1: capture", capture_s));
            }
            times.push(StageTime::now("stage 1: distillation", t_train.elapsed().as_secs_f64()));
            finish_step(&s1, &key1, t.elapsed().as_secs_f64())?;
            if !cfg.stage1.keep_capture && cap.exists() {
                std::fs::remove_dir_all(&cap)
                    .with_context(|| format!("{}: cannot remove the capture", cap.display()))?;
            }
        }
    }
    // ---- Stage 1, optional: polish every block end to end (KL to the teacher) ---------------
    let ft = &cfg.stage1.finetune;
    let (blocks_dir, key1, polish) = if ft.epochs > 0 {
        let key_f = hash(&[key1.as_bytes(), &serde_json::to_vec(ft)?]);
        let sf = work.join("stage1-finetune");
        let polish = match read_record(&sf).filter(|r| r.key == key_f) {
            Some(r) => {
                times.push(StageTime::earlier("stage 1: end-to-end polish", r.seconds));
                finished_finetune(&sf).with_context(|| format!("{}: finetune.json is unreadable", sf.display()))?
            }
            None => {
                prepare_step(&sf, &key_f)?;
                let pb = bar(1, "1/4 stage 1: polish");
                let r = finetune(
                    &ckpt,
                    &dense,
                    &s1,
                    &sf,
                    &calib,
                    cfg.stage1.seq_len,
                    ft,
                    progress_bar(&pb, "1/4 stage 1: polish"),
                )?;
                pb.finish();
                tracing::info!(
                    "polish: held-back KL {:.4} -> {:.4} nats/token in {:.0} s",
                    r.val_kl_init,
                    r.val_kl,
                    r.seconds
                );
                times.push(StageTime::now("stage 1: end-to-end polish", r.seconds));
                finish_step(&sf, &key_f, r.seconds)?;
                r
            }
        };
        (sf, key_f, Some(polish))
    } else {
        (s1.clone(), key1, None)
    };
    let layer_reports: Vec<_> = (0..n_layers)
        .map(|l| finished(&s1, l).with_context(|| format!("{}: layer {l} is not finished", s1.display())))
        .collect::<Result<_>>()?;
    let mut moe = Transformer::from_checkpoint_with(&ckpt, &device, |l| {
        let b = load_layer_block(&blocks_dir, l, train.train_policy.clone(), &device)
            .map_err(|e| ladimo_model::ModelError::Invalid(e.to_string()))?;
        Ok(Box::new(b))
    })?;

    // ---- Stage 2: profile, then solve --------------------------------------------------------
    let s2cfg = &cfg.stage2;
    let mut texts = Vec::new();
    for set in &cal_sets {
        let ids = take_tokens(tok, &set.files, s2cfg.tokens, Part::Tail)
            .with_context(|| format!("calibration set `{}` for stage 2 (stage2.tokens)", set.tag))?;
        texts.push((set.tag.clone(), ids));
    }
    let mut key2_parts: Vec<Vec<u8>> = vec![key1.clone().into_bytes(), serde_json::to_vec(&profile_part(s2cfg))?];
    key2_parts.extend(
        texts
            .iter()
            .map(|(tag, ids)| [tag.as_bytes(), &ids_bytes(ids)].concat()),
    );
    let key2 = hash(&key2_parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let s2 = work.join("stage2");
    let profile_path = s2.join("profile.json");
    let t = Instant::now();
    let profile = match read_record(&s2).filter(|r| r.key == key2) {
        Some(r) => {
            times.push(StageTime::earlier("stage 2: profile", r.seconds));
            Profile::read(&profile_path)?
        }
        None => {
            prepare_step(&s2, &key2)?;
            let pcfg = ProfileConfig {
                seq_len: s2cfg.seq_len,
                top_p_grid: s2cfg.top_p_grid.clone(),
                tau_grid: s2cfg.tau_grid.clone(),
                latency_tokens: s2cfg.latency_tokens,
                latency_repeats: s2cfg.latency_repeats,
                uniform_k: s2cfg.uniform_k.clone(),
                // Measured as a step of its own below.
                sensitivity_k: vec![],
                ..ProfileConfig::default()
            };
            let mut pb: Option<(String, ProgressBar)> = None;
            let mut p = profile_model(&mut moe, &dense, &texts, &pcfg, &cfg.model, |stage, d, total| {
                if pb.as_ref().is_none_or(|(s, _)| s != stage) {
                    if let Some((_, b)) = pb.take() {
                        b.finish();
                    }
                    pb = Some((stage.to_string(), bar(total, &format!("2/4 stage 2: {stage}"))));
                }
                if let Some((_, b)) = &pb {
                    b.set_position(d as u64);
                }
            })?;
            if let Some((_, b)) = pb {
                b.finish();
            }
            p.backend = ladimo_backend::name().to_string();
            p.write(&profile_path)?;
            let secs = t.elapsed().as_secs_f64();
            times.push(StageTime::now("stage 2: profile", secs));
            finish_step(&s2, &key2, secs)?;
            p
        }
    };
    // Stage 2, layer sensitivity: its own step, so that changing its settings keeps the profile.
    let mut profile = profile;
    if !s2cfg.sensitivity_k.is_empty() {
        let key_s = hash(&[
            key2.as_bytes(),
            &serde_json::to_vec(&(&s2cfg.sensitivity_k, s2cfg.sensitivity_tokens))?,
            // Absent for the dense context, so a finished dense-context step keeps its key.
            &match s2cfg.sensitivity_context {
                ladimo_profile::SensitivityContext::Dense => Vec::new(),
                c => serde_json::to_vec(&c)?,
            },
        ]);
        let record = s2.join("sensitivity");
        match read_record(&record).filter(|r| r.key == key_s && profile.sensitivity.is_some()) {
            Some(r) => times.push(StageTime::earlier("stage 2: layer sensitivity", r.seconds)),
            None => {
                let t = Instant::now();
                let pcfg = ProfileConfig {
                    seq_len: s2cfg.seq_len,
                    sensitivity_k: s2cfg.sensitivity_k.clone(),
                    sensitivity_tokens: s2cfg.sensitivity_tokens,
                    sensitivity_context: s2cfg.sensitivity_context,
                    ..ProfileConfig::default()
                };
                let mut pb: Option<ProgressBar> = None;
                ladimo_profile::add_sensitivity(&mut profile, &mut moe, &dense, &texts, &pcfg, |_, d, total| {
                    let b = pb.get_or_insert_with(|| bar(total, "2/4 stage 2: sensitivity"));
                    b.set_position(d as u64);
                })?;
                if let Some(b) = pb {
                    b.finish();
                }
                profile.write(&profile_path)?;
                let secs = t.elapsed().as_secs_f64();
                times.push(StageTime::now("stage 2: layer sensitivity", secs));
                std::fs::create_dir_all(&record).with_context(|| format!("{}: cannot create", record.display()))?;
                finish_step(&record, &key_s, secs)?;
            }
        }
    }
    let budget = Budget {
        kind: s2cfg.budget.of,
        fraction: s2cfg.budget.fraction,
        absolute: s2cfg.budget.max,
    };
    let solved = match &s2cfg.fixed_policy {
        None => {
            solve_profile(&profile, &budget, s2cfg.cost).context("stage 2: solving for the budget in stage2.budget")?
        }
        Some(p) => fixed(&profile, p, &budget, s2cfg.cost)?,
    };
    let policy_path = s2.join("policy.toml");
    solved.policies.write(&policy_path)?;
    solved.policies.apply(&mut moe, &policy_path)?;

    // ---- Export -------------------------------------------------------------------------------
    let fin = work.join("final");
    if fin.exists() {
        std::fs::remove_dir_all(&fin).with_context(|| format!("{}: cannot clear", fin.display()))?;
    }
    let t = Instant::now();
    let blocks: Vec<_> = (0..n_layers).map(|l| moe_block(&moe, l)).collect();
    let section = ladimo_moe::save_moe_checkpoint(&ckpt, &blocks, &fin)?;
    solved.policies.write(&fin.join("policy.toml"))?;
    eprintln!("{}", ladimo_moe::export::write_stock_beside(&ckpt, &moe, &fin)?);
    std::fs::write(fin.join("convert.toml"), cfg.to_toml())
        .with_context(|| format!("{}: cannot write", fin.display()))?;
    times.push(StageTime::now("export", t.elapsed().as_secs_f64()));
    drop(moe);

    // ---- Evaluate dense vs MoE ---------------------------------------------------------------
    let t = Instant::now();
    // The MoE model as a user loads it: from the exported folder.
    let moe_ckpt = Checkpoint::open(&fin)?;
    let moe = ladimo_moe::checkpoint::load_model_from(&moe_ckpt, &device)?;
    let policy_text = std::fs::read(fin.join("policy.toml")).unwrap_or_default();
    let key_e = hash(&[key2.as_bytes(), &policy_text, &serde_json::to_vec(&cfg.eval)?]);
    let ev = work.join("eval");
    if read_record(&ev).is_none_or(|r| r.key != key_e) {
        prepare_step(&ev, &key_e)?;
    }
    let mut ppl = Vec::new();
    let mut held_ids = Vec::new();
    let mut first_ids = None;
    for set in &held_sets {
        let ids = heldout_ids(tok, set, cfg.eval.ppl_tokens, "eval.ppl_tokens")?;
        let file = ev.join(format!("ppl-{}.json", set.tag));
        let row: LangPpl = match std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            Some(r) => r,
            None => {
                let pb = bar(
                    ids.len().div_ceil(cfg.eval.seq_len) * 2,
                    &format!("4/4 eval: perplexity {}", set.tag),
                );
                let d = perplexity(&dense, &ids, cfg.eval.seq_len, |i, _| pb.set_position(i as u64))?;
                reset_stats(&moe);
                let m = perplexity(&moe, &ids, cfg.eval.seq_len, |i, n| pb.set_position((n + i) as u64))?;
                pb.finish();
                let r = LangPpl {
                    tag: set.tag.clone(),
                    tokens: ids.len(),
                    dense: d.perplexity,
                    moe: m.perplexity,
                    moe_active_params: moe.param_counts().active(),
                    moe_active_ffn_params: moe.param_counts().ffn_active,
                };
                write_json(&file, &r)?;
                r
            }
        };
        ppl.push(row);
        held_ids.push((set.tag.clone(), ids.clone()));
        first_ids.get_or_insert(ids);
    }
    // Activated parameters per token: measured while scoring the first held-out set.
    let dc = dense.param_counts();
    let (moe_active, moe_ffn_active) = ppl
        .first()
        .map(|r| (r.moe_active_params, r.moe_active_ffn_params))
        .unwrap_or((moe.param_counts().active(), moe.param_counts().ffn_active));

    // Training-free baselines on the dense model at the MoE's measured FFN share, calibrated on
    // the stage-2 calibration text (never the held-out text).
    let budget = moe_ffn_active / dc.ffn_active;
    let cal_windows: Vec<&[u32]> = texts
        .iter()
        .flat_map(|(_, ids)| ids.chunks(cfg.eval.seq_len))
        .filter(|w| w.len() > 1)
        .collect();
    let mut baselines = Vec::new();
    let mut base_model = None;
    for &method in &cfg.eval.baselines {
        if let Err(e) = method.sparsity_for(budget) {
            tracing::warn!("baseline {}: skipped ({e})", method.name());
            continue;
        }
        let file = ev.join(format!("baseline-{}.json", method.name()));
        let cached: Option<evaluate::BaselineRow> =
            std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let row = match cached.filter(|r| r.budget == budget) {
            Some(r) => r,
            None => {
                let m = match &mut base_model {
                    Some(m) => m,
                    None => base_model.insert(Transformer::from_checkpoint(&ckpt, &device)?),
                };
                let pb = bar(1, &format!("4/4 eval: baseline {}", method.name()));
                let r = evaluate::baseline(m, method, budget, &cal_windows, &held_ids, cfg.eval.seq_len, |d, t| {
                    pb.set_length(t as u64);
                    pb.set_position(d as u64);
                })?;
                pb.finish();
                write_json(&file, &r)?;
                r
            }
        };
        baselines.push(row);
    }
    drop(base_model);

    if !cfg.eval.tasks.is_empty() {
        ladimo_data::fetch_tasks().context("fetching the zero-shot task files")?;
    }
    let mut tasks = Vec::new();
    for name in &cfg.eval.tasks {
        let task: Task = name.parse().map_err(anyhow::Error::msg)?;
        let items = ladimo_data::load_task(task, Some(cfg.eval.task_limit))?;
        let dense_file = evaluate::dense_cache_file(&digest, task, cfg.eval.task_limit);
        let moe_file = ev.join(format!("{}-{}.json", task.name(), cfg.eval.task_limit));
        let run = |m: &Transformer, file: &Path, who: &str| -> Result<TaskResult> {
            if let Some(r) = evaluate::read_cached(file).filter(|r| r.items == items.len()) {
                return Ok(r);
            }
            let pb = bar(items.len(), &format!("4/4 eval: {task} ({who})"));
            let r = evaluate::score_task(m, tok, task, &items, |d, _| pb.set_position(d as u64))?;
            pb.finish();
            write_json(file, &vec![r.clone()])?;
            Ok(r)
        };
        let d = run(&dense, &dense_file, "dense")?;
        let m = run(&moe, &moe_file, "moe")?;
        tasks.push(TaskRow::new(task, d, m));
    }
    // The speed prompt: the start of the first held-out set (tokenized above when long enough).
    let speed_ids = match first_ids.filter(|ids| ids.len() >= cfg.eval.prefill_tokens) {
        Some(ids) => ids,
        None => heldout_ids(tok, &held_sets[0], cfg.eval.prefill_tokens, "eval.prefill_tokens")?,
    };
    let speed_ids = &speed_ids[..cfg.eval.prefill_tokens];
    let pb = bar(cfg.eval.speed_repeats, "4/4 eval: tokens/s");
    let ((dp, dd), (mp, md)) = evaluate::speed_side_by_side(
        &dense,
        &moe,
        speed_ids,
        cfg.eval.decode_tokens,
        cfg.eval.speed_repeats,
        || pb.inc(1),
    )?;
    pb.finish();
    times.push(StageTime::now("evaluation", t.elapsed().as_secs_f64()));
    finish_step(&ev, &key_e, t.elapsed().as_secs_f64())?;

    // ---- Report and publish ------------------------------------------------------------------
    let plots_dir = fin.join("plots");
    let plots = write_plots(&profile, &plots_dir, Some(&solved))?;
    let rep = Report {
        model: model_path.display().to_string(),
        model_digest: digest,
        architecture: format!("{:?}", ckpt.config.architecture),
        config_name: config_name.to_string(),
        config: cfg.clone(),
        seed: train.seed,
        backend: ladimo_backend::name().to_string(),
        calibration_tokens: calib_counts,
        calibration_files: cal_sets.iter().map(|s| (s.tag.clone(), s.files.clone())).collect(),
        heldout_files: held_sets.iter().map(|s| (s.tag.clone(), s.files.clone())).collect(),
        stage1_val_rel_error: layer_reports.iter().map(|r| r.val_rel_error).collect(),
        stage1_polish_kl: polish.map(|r| (r.val_kl_init, r.val_kl)),
        solved: {
            let mut sv = solved_summary(&solved);
            if let Some(p) = &s2cfg.fixed_policy {
                sv.cost = format!("none: stage2.fixed_policy = {p} on every layer");
            }
            sv
        },
        mixtral_exact: section.mixtral_exact,
        why_not_mixtral: section.why_not_mixtral.clone(),
        dense: ModelSide {
            total_params: dc.total() as f64,
            active_params: dc.active(),
            active_ffn_params: dc.ffn_active,
            prefill_tok_s: dp,
            decode_tok_s: dd,
        },
        moe: ModelSide {
            total_params: moe.param_counts().total() as f64,
            active_params: moe_active,
            active_ffn_params: moe_ffn_active,
            prefill_tok_s: mp,
            decode_tok_s: md,
        },
        ppl,
        baselines,
        tasks,
        times,
        wall_seconds: start.elapsed().as_secs_f64(),
        plots: plots
            .iter()
            .filter_map(|p| p.strip_prefix(&fin).ok().map(|p| p.display().to_string()))
            .collect(),
    };
    write_json(&fin.join("report.json"), &rep)?;
    let md = report::markdown(&rep);
    std::fs::write(fin.join("report.md"), md).with_context(|| format!("{}: cannot write the report", fin.display()))?;
    publish(&fin, paths)?;
    Ok(rep)
}

/// `policy` on every profiled layer, reported like a solver answer (the frontier is the solver's
/// for the configured budget, when that budget is feasible).
fn fixed(
    profile: &Profile,
    policy: &ladimo_moe::Policy,
    budget: &Budget,
    cost: ladimo_profile::Cost,
) -> Result<Solved> {
    let mut solved = match solve_profile(profile, budget, cost) {
        Ok(s) => s,
        Err(_) => solve_profile(
            profile,
            &Budget {
                fraction: Some(1.0),
                absolute: None,
                ..*budget
            },
            cost,
        )?,
    };
    let Some((c, params)) = ladimo_profile::uniform_cost(profile, policy, cost) else {
        bail!("stage2.fixed_policy {policy} is not among the profiled candidates of every layer");
    };
    let ffn = params - profile.non_ffn_params;
    solved.used = match budget.kind {
        ladimo_profile::BudgetKind::FfnParams => ffn,
        ladimo_profile::BudgetKind::Params => params,
        ladimo_profile::BudgetKind::Latency => f64::NAN,
    };
    solved.predicted_ppl_ratio = profile
        .uniform
        .iter()
        .find(|u| &u.policy == policy)
        .map(|u| u.ppl / profile.dense_ppl)
        .unwrap_or(f64::NAN);
    solved.cost = c;
    solved.predicted_params = params;
    solved.predicted_ffn_params = ffn;
    solved.policies.note = format!("fixed policy {policy} on every layer (stage2.fixed_policy)");
    for l in &mut solved.policies.layers {
        l.policy = Some(policy.clone());
    }
    Ok(solved)
}

/// The parts of the stage-2 config the profile depends on (not the budget or cost).
fn profile_part(s: &crate::config::Stage2Config) -> serde_json::Value {
    serde_json::json!({
        "tokens": s.tokens, "seq_len": s.seq_len, "top_p_grid": s.top_p_grid, "tau_grid": s.tau_grid,
        "latency_tokens": s.latency_tokens, "latency_repeats": s.latency_repeats, "uniform_k": s.uniform_k,
    })
}

fn reset_stats(model: &Transformer) {
    for l in &model.layers {
        l.ffn.reset_stats();
    }
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
        policies: s
            .policies
            .layers
            .iter()
            .map(|l| (l.layer, l.to_string()))
            .collect(),
    }
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
    if std::fs::rename(fin, out).is_err() {
        let tmp = out.with_file_name(format!(
            "{}.partial",
            out.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        ));
        copy_dir(fin, &tmp).with_context(|| format!("copying {} to {}", fin.display(), tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename into place", out.display()))?;
        std::fs::remove_dir_all(fin).ok();
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
        }
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
