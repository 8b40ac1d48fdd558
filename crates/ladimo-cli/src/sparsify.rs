//! `ladimo sparsify`: calibrate a training-free activation-sparsity method (static pruning,
//! CATS, TEAL) on a dense model, or TEAL on an MoE model (thresholds inside the experts that run
//! under each MoE layer's current routing policy), and write its per-layer thresholds as a policy
//! file that `perplexity`, `generate`, `eval` and `logits` take with `--policy`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use ladimo_data::{Part, take_tokens};
use ladimo_moe::moe_block;
use ladimo_moe::policy_file::{LayerPolicy, PolicyFile, model_fingerprint};
use ladimo_moe::sparsity::{Method, calibrate};

use crate::{load, open};

#[derive(Args)]
pub struct SparsifyArgs {
    /// A dense model, or an MoE model for teal (directory, .gguf, or a known name).
    pub model: String,
    /// static, cats or teal.
    #[arg(long)]
    pub method: Method,
    /// Share of the FFN's parameters read per token, in (0, 1] (CATS: at least 1/3).
    #[arg(long)]
    pub budget: f64,
    /// Calibration text file (repeatable); default: the fetched calibration sets (English novels
    /// and Korean help text, the tails of their files; never the held-out texts).
    #[arg(long = "text")]
    pub texts: Vec<PathBuf>,
    /// Calibration tokens taken from each file.
    #[arg(long, default_value_t = 2048)]
    pub tokens_per_file: usize,
    /// Window length of the calibration forward passes.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Where to write the policy file (TOML).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn sparsify(a: SparsifyArgs) -> Result<()> {
    let start = Instant::now();
    // Refuse a bad budget before any work.
    a.method.sparsity_for(a.budget).context("--budget")?;
    if a.seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    if a.tokens_per_file == 0 {
        bail!("--tokens-per-file must be at least 1");
    }
    let ckpt = open(&a.model)?;
    let tok = ckpt.tokenizer()?;
    let files = if a.texts.is_empty() {
        let data = ladimo_data::fetch_data()?;
        let mut f = data.calibration_en.clone();
        f.push(data.calibration_en_docs.clone());
        f.push(data.calibration_ko.clone());
        f
    } else {
        a.texts.clone()
    };
    let mut ids = Vec::new();
    for f in &files {
        // The tail, as stage 2 does: the head of the same files is what stage 1 trains on.
        let part = take_tokens(tok, std::slice::from_ref(f), a.tokens_per_file, Part::Tail)
            .with_context(|| format!("calibration text {}", f.display()))?;
        ids.push(part);
    }
    let windows: Vec<&[u32]> = ids
        .iter()
        .flat_map(|t| t.chunks(a.seq_len))
        .filter(|w| w.len() > 1)
        .collect();
    let tokens: usize = windows.iter().map(|w| w.len()).sum();
    let mut model = load(&ckpt, None, None)?;
    let layers = calibrate(&mut model, &windows, a.method, a.budget, |d, t| {
        eprint!("\rcalibrating {}: window {d}/{t}   ", a.method.name());
        if d == t {
            eprintln!();
        }
    })?;
    let file = PolicyFile {
        model: model_fingerprint(&model),
        note: format!(
            "{} at {:.1}% of the FFN, calibrated on {tokens} tokens of {} file(s)",
            a.method.name(),
            100.0 * a.budget,
            files.len()
        ),
        layers: layers
            .into_iter()
            .enumerate()
            .map(|(layer, s)| LayerPolicy {
                layer,
                // An MoE layer keeps the routing policy the thresholds were calibrated under.
                policy: moe_block(&model, layer).map(|b| b.policy.clone()),
                sparsity: Some(s),
            })
            .collect(),
    };
    file.write(&a.out)?;
    println!(
        "wrote {} ({} layers, {tokens} calibration tokens, {:.1} s)",
        a.out.display(),
        file.layers.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
