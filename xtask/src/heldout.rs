//! `cargo xtask heldout`: held-out perplexity of models side by side, each with its own policy
//! file, on the same token ids per held-out set (English novel, English from another domain,
//! Korean; the head of the held-out files, which no calibration step reads). The first model is
//! the reference the others are compared with.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct HeldoutArgs {
    /// A model to score, `MODEL` or `MODEL:POLICY` (a policy file it runs under); repeatable,
    /// the first is the reference.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Held-out tokens per set.
    #[arg(long, default_value_t = 16_384)]
    tokens: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Also write the rows as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Row {
    model: String,
    policy: Option<String>,
    /// (set, perplexity, share of the FFN's parameters read).
    sets: Vec<(String, f64, f64)>,
}

pub fn heldout(a: HeldoutArgs) -> Result<()> {
    let specs: Vec<(String, Option<PathBuf>)> = a
        .models
        .iter()
        .map(|m| match m.split_once(':') {
            Some((m, p)) => (m.to_string(), Some(PathBuf::from(p))),
            None => (m.clone(), None),
        })
        .collect();
    let data = ladimo_data::fetch_data()?;
    let device = ladimo_backend::device();
    let mut rows: Vec<Row> = Vec::new();
    let mut held: Option<Vec<(String, Vec<u32>)>> = None;
    for (model, policy) in &specs {
        let t = Instant::now();
        let path = ladimo_convert::pipeline::resolve_model(model)?;
        let ckpt = ladimo_io::Checkpoint::open(&path)?;
        // The ids come from the first model's tokenizer; every model must share it.
        let tok = ckpt.tokenizer()?;
        let sets = data.heldout_sets(tok, a.tokens)?;
        match &held {
            None => held = Some(sets),
            Some(h) if *h != sets => bail!("{model}: its tokenizer gives other held-out ids than the first model's"),
            Some(_) => {}
        }
        let mut m = ladimo_moe::checkpoint::load_model_from(&ckpt, &device)?;
        if let Some(p) = policy {
            ladimo_moe::PolicyFile::read(p)?.apply(&mut m, p)?;
        }
        let sets = crate::thresholds::score(&m, held.as_ref().expect("set above"), a.seq_len)
            .with_context(|| format!("scoring {model}"))?;
        eprintln!(
            "{model}{}: {} ({:.0} s)",
            policy
                .as_ref()
                .map(|p| format!(" + {}", p.display()))
                .unwrap_or_default(),
            sets.iter()
                .map(|(t, p, s)| format!("{t} {p:.3} (FFN {:.1}%)", 100.0 * s))
                .collect::<Vec<_>>()
                .join(", "),
            t.elapsed().as_secs_f64()
        );
        rows.push(Row {
            model: model.clone(),
            policy: policy.as_ref().map(|p| p.display().to_string()),
            sets,
        });
    }
    println!(
        "held-out perplexity, {} tokens per set, seq {} (change against the first row)",
        a.tokens, a.seq_len
    );
    println!("| model | policy | en | en-ood | ko | FFN read |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let cells: Vec<String> = r
            .sets
            .iter()
            .zip(&rows[0].sets)
            .map(|((_, p, _), (_, p0, _))| format!("{p:.3} ({:+.1}%)", 100.0 * (p / p0 - 1.0)))
            .collect();
        println!(
            "| {} | {} | {} | {:.1}% |",
            r.model,
            r.policy.as_deref().unwrap_or("-"),
            cells.join(" | "),
            100.0 * r.sets.iter().map(|s| s.2).sum::<f64>() / r.sets.len() as f64
        );
    }
    if let Some(out) = &a.out {
        ladimo_io::atomic::write_atomic(out, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    Ok(())
}
