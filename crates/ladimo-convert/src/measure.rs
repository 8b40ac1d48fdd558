//! The evaluation step of the pipeline: the exported MoE checkpoint, reloaded as a user loads
//! it, against the dense model: held-out perplexity per tag, the training-free baselines at the
//! MoE's measured FFN share, zero-shot tasks, activated parameters and tokens/s. Each result is
//! cached in work/eval (dense task scores under the weights digest), so a rerun scores only
//! what is missing.

use std::path::Path;

use anyhow::{Context, Result};
use ladimo_data::Task;
use ladimo_model::perplexity::perplexity;
use ladimo_model::{Transformer, open_rounded};

use crate::config::ConvertConfig;
use crate::evaluate::{self, BaselineRow, TaskResult, write_json};
use crate::pipeline::{Compute, Inputs};
use crate::report::{LangPpl, ModelSide, StageTime, TaskRow};
use crate::stage2::Stage2;
use crate::step::{Step, step_key};

/// The evaluation's results, as the report holds them.
pub(crate) struct Measured {
    pub dense: ModelSide,
    pub moe: ModelSide,
    pub ppl: Vec<LangPpl>,
    pub baselines: Vec<BaselineRow>,
    pub tasks: Vec<TaskRow>,
}

/// Evaluate the checkpoint in `fin` against the dense model (work/eval).
pub(crate) fn evaluate(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    s2: &Stage2,
    fin: &Path,
    work: &Path,
    times: &mut Vec<StageTime>,
    on: &Compute,
) -> Result<Measured> {
    let policy_text = std::fs::read(fin.join("policy.toml")).unwrap_or_default();
    let key = step_key("eval", &[s2.key.as_bytes(), &policy_text], &cfg.eval)?;
    // Never reused whole: the results inside are cached one by one.
    Step::new(work.join("eval"), "evaluation", key).run(
        times,
        |_| Ok(None),
        |ev, _| {
            // The MoE model as a user loads it: from the exported folder (weights in eval.dtype).
            let mut moe = ladimo_moe::checkpoint::load_model_from(&open_rounded(fin, cfg.eval.dtype)?, on.device)?;
            // The checkpoint carries the routing; TEAL thresholds inside experts (stage 2 with
            // `teal_sparsities`) live in policy.toml only.
            for lp in &s2.solved.policies.layers {
                if let Some(s) = &lp.sparsity {
                    ladimo_moe::sparsity::set_sparsity(&mut moe, lp.layer, Some(s.clone()))?;
                }
            }
            measure(cfg, inputs, s2, &mut moe, ev, on)
        },
    )
}

fn measure(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    s2: &Stage2,
    moe: &mut Transformer,
    ev: &Path,
    on: &Compute,
) -> Result<Measured> {
    let dtype = cfg.eval.dtype;
    // The dense model in eval.dtype, a copy of the evaluation's own: its host decode path is
    // built on it for the speed rows at the end.
    let mut dense = Transformer::from_checkpoint(&open_rounded(&inputs.model_path, dtype)?, on.device)?;
    let tok = inputs.tokenizer()?;
    let mut ppl = Vec::new();
    let mut held_ids = Vec::new();
    let mut first_ids = None;
    for set in &inputs.held_sets {
        let ids = inputs.heldout_ids(set, cfg.eval.ppl_tokens, "eval.ppl_tokens")?;
        let file = ev.join(format!("ppl-{}.json", set.tag));
        let row: LangPpl = match std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            Some(r) => r,
            None => {
                let pb = on.progress.start(
                    ids.len().div_ceil(cfg.eval.seq_len) * 2,
                    &format!("4/4 eval: perplexity {}", set.tag),
                );
                let d = perplexity(&dense, &ids, cfg.eval.seq_len, |i, _| pb.set_position(i))?;
                reset_stats(moe);
                let m = perplexity(moe, &ids, cfg.eval.seq_len, |i, n| pb.set_position(n + i))?;
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

    // Zero-shot task items, loaded once: the dense model, the MoE and the baselines in
    // `eval.baseline_tasks` score the same items.
    if !cfg.eval.tasks.is_empty() {
        ladimo_data::fetch_tasks().context("fetching the zero-shot task files")?;
    }
    let mut task_items = Vec::new();
    for name in &cfg.eval.tasks {
        let task: Task = name.parse().map_err(anyhow::Error::msg)?;
        task_items.push((task, ladimo_data::load_task(task, Some(cfg.eval.task_limit))?));
    }

    // Training-free baselines on the dense model at the MoE's measured FFN share, calibrated on
    // the stage-2 calibration text (never the held-out text).
    let budget = moe_ffn_active / dc.ffn_active;
    let cal_windows: Vec<&[u32]> = s2
        .texts
        .iter()
        .flat_map(|(_, ids)| ids.chunks(cfg.eval.seq_len))
        .filter(|w| w.len() > 1)
        .collect();
    let mut baselines = Vec::new();
    for &method in &cfg.eval.baselines {
        if let Err(e) = method.sparsity_for(budget) {
            tracing::warn!("baseline {}: skipped ({e})", method.name());
            continue;
        }
        let file = ev.join(format!("baseline-{}.json", method.name()));
        let cached: Option<BaselineRow> = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let with_tasks = cfg.eval.baseline_tasks.contains(&method) && !task_items.is_empty();
        let row = match cached.filter(|r| r.budget == budget && (!with_tasks || r.tasks.len() == task_items.len())) {
            Some(r) => r,
            None => {
                // The dense model itself: `baseline` gives its FFNs back dense on return.
                let m = &mut dense;
                let pb = on.progress.start(1, &format!("4/4 eval: baseline {}", method.name()));
                let score_tasks = |m: &Transformer| -> Result<Vec<evaluate::BaselineTask>> {
                    let mut out = Vec::new();
                    for (task, items) in &task_items {
                        pb.set_label(&format!("4/4 eval: baseline {} on {task}", method.name()));
                        let r = evaluate::score_task(m, tok, *task, items, |_, _| {})?;
                        out.push(evaluate::BaselineTask {
                            task: task.name().into(),
                            items: r.items,
                            primary: r.primary(),
                        });
                    }
                    Ok(out)
                };
                let tasks: Option<evaluate::ScoreTasks> = if with_tasks { Some(&score_tasks) } else { None };
                let r = evaluate::baseline(
                    m,
                    method,
                    budget,
                    &cal_windows,
                    &held_ids,
                    cfg.eval.seq_len,
                    tasks,
                    |d, t| {
                        pb.set_len(t);
                        pb.set_position(d);
                    },
                )?;
                pb.finish();
                write_json(&file, &r)?;
                r
            }
        };
        baselines.push(row);
    }

    let mut tasks = Vec::new();
    for (task, items) in &task_items {
        let task = *task;
        let dense_file = evaluate::dense_cache_file(&inputs.digest, dtype, task, cfg.eval.task_limit);
        let moe_file = ev.join(format!("{}-{}.json", task.name(), cfg.eval.task_limit));
        let run = |m: &Transformer, file: &Path, who: &str| -> Result<TaskResult> {
            if let Some(r) = evaluate::read_cached(file).filter(|r| r.items == items.len()) {
                return Ok(r);
            }
            let pb = on.progress.start(items.len(), &format!("4/4 eval: {task} ({who})"));
            let r = evaluate::score_task(m, tok, task, items, |d, _| pb.set_position(d))?;
            pb.finish();
            write_json(file, &vec![r.clone()])?;
            Ok(r)
        };
        let d = run(&dense, &dense_file, "dense")?;
        let m = run(moe, &moe_file, "moe")?;
        tasks.push(TaskRow::new(task, d, m));
    }
    // The speed prompt: the start of the first held-out set (tokenized above when long enough).
    let speed_ids = match first_ids.filter(|ids| ids.len() >= cfg.eval.prefill_tokens) {
        Some(ids) => ids,
        None => inputs.heldout_ids(&inputs.held_sets[0], cfg.eval.prefill_tokens, "eval.prefill_tokens")?,
    };
    let speed_ids = &speed_ids[..cfg.eval.prefill_tokens];
    // Speed as `ladimo --dtype` loads the models: each block's prefill path chosen by timing it
    // here, and decode on the host kernels with weights stored in eval.dtype. Only now: the
    // paths agree to rounding, not bit for bit, and a timing-dependent choice before the
    // perplexities and tasks would make a resumed conversion's report differ in the last digits
    // (tests/kill.rs).
    dense.prepare_host_decode(dtype)?;
    let moe = {
        moe.prepare_prefill();
        moe.prepare_host_decode(dtype)?;
        &*moe
    };
    let pb = on.progress.start(cfg.eval.speed_repeats, "4/4 eval: tokens/s");
    let ((dp, dd), (mp, md)) = evaluate::speed_side_by_side(
        &dense,
        moe,
        speed_ids,
        cfg.eval.decode_tokens,
        cfg.eval.speed_repeats,
        || pb.inc(1),
    )?;
    pb.finish();
    Ok(Measured {
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
    })
}

fn reset_stats(model: &Transformer) {
    for l in &model.layers {
        l.ffn.reset_stats();
    }
}
