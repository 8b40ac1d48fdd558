//! `cargo xtask frontier`: the training-free baselines' quality frontier on a dense model: for
//! each method (static, CATS, TEAL) and FFN budget, thresholds calibrated on the fetched
//! calibration text (the tails of its files, as `ladimo sparsify` does), held-out perplexity per
//! language and the share of the FFN actually read there. Prints a markdown table, writes JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ladimo_convert::evaluate::{BaselineRow, baseline};
use ladimo_data::{Part, take_tokens};
use ladimo_model::Transformer;
use ladimo_moe::SparsityMethod;

#[derive(Args)]
pub struct FrontierArgs {
    /// A dense model (directory, .gguf, or a known name).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    #[arg(long, value_delimiter = ',', default_value = "static,cats,teal")]
    methods: Vec<SparsityMethod>,
    /// FFN budgets (share of the FFN's parameters read per token).
    #[arg(long, value_delimiter = ',', default_value = "0.875,0.75,0.625,0.5")]
    budgets: Vec<f64>,
    /// Calibration tokens from the tail of each calibration file.
    #[arg(long, default_value_t = 2048)]
    tokens_per_file: usize,
    /// Held-out tokens per language (the head of the held-out files).
    #[arg(long, default_value_t = 16_384)]
    heldout_tokens: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Where the JSON goes.
    #[arg(long, default_value = "out/frontier.json")]
    out: PathBuf,
}

pub fn frontier(a: FrontierArgs) -> Result<()> {
    let start = Instant::now();
    let path = ladimo_convert::pipeline::resolve_model(&a.model)?;
    let ckpt = ladimo_io::Checkpoint::open(&path)?;
    let tok = ckpt.tokenizer()?;
    let data = ladimo_data::fetch_data()?;
    let mut cal_files = data.calibration_en.clone();
    cal_files.push(data.calibration_en_docs.clone());
    cal_files.push(data.calibration_ko.clone());
    let mut cal = Vec::new();
    for f in &cal_files {
        cal.push(
            take_tokens(tok, std::slice::from_ref(f), a.tokens_per_file, Part::Tail)
                .with_context(|| format!("calibration text {}", f.display()))?,
        );
    }
    let windows: Vec<&[u32]> = cal
        .iter()
        .flat_map(|t| t.chunks(a.seq_len))
        .filter(|w| w.len() > 1)
        .collect();
    let held = data.heldout_sets(tok, a.heldout_tokens)?;
    let mut model = Transformer::from_checkpoint(&ckpt, &ladimo_backend::device())?;
    let mut dense = Vec::new();
    for (tag, ids) in &held {
        let r = ladimo_model::perplexity::perplexity(&model, ids, a.seq_len, |_, _| {})?;
        eprintln!("dense {tag}: PPL {:.3} on {} tokens", r.perplexity, ids.len());
        dense.push(r.perplexity);
    }
    let mut rows: Vec<BaselineRow> = Vec::new();
    for &budget in &a.budgets {
        for &method in &a.methods {
            if let Err(e) = method.sparsity_for(budget) {
                eprintln!("{} at {budget}: skipped ({e})", method.name());
                continue;
            }
            let t = Instant::now();
            let r = baseline(&mut model, method, budget, &windows, &held, a.seq_len, None, |d, n| {
                eprint!("\r{} at {budget}: {d}/{n}   ", method.name());
            })?;
            eprintln!("({:.0} s)", t.elapsed().as_secs_f64());
            rows.push(r);
        }
    }
    println!(
        "\n{} on {} calibration tokens; held-out {} tokens per language, seq {}\n",
        path.display(),
        windows.iter().map(|w| w.len()).sum::<usize>(),
        a.heldout_tokens,
        a.seq_len
    );
    let tags: Vec<&str> = held.iter().map(|(t, _)| t.as_str()).collect();
    print_table_head(&[], &tags, &dense);
    for r in &rows {
        let ppl: Vec<f64> = r.langs.iter().map(|l| l.ppl).collect();
        let share: Vec<f64> = r.langs.iter().map(|l| l.ffn_share).collect();
        let c = table_cells(&ppl, &dense, &share);
        println!("| {:.1}% | {} |{c}", 100.0 * r.budget, r.method.name());
    }
    let json = serde_json::json!({
        "model": path.display().to_string(),
        "calibration_files": cal_files,
        "heldout_tokens": a.heldout_tokens,
        "seq_len": a.seq_len,
        "dense": tags.iter().zip(&dense).map(|(t, d)| (t.to_string(), *d)).collect::<std::collections::BTreeMap<_, _>>(),
        "rows": rows,
    });
    ladimo_io::atomic::write_atomic(&a.out, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("\nwrote {} ({:.0} s)", a.out.display(), start.elapsed().as_secs_f64());
    Ok(())
}

/// The markdown head of a frontier table: FFN budget, method, the `extra` columns, then per
/// held-out set its PPL (against dense) and the FFN share read; and the dense row.
pub(crate) fn print_table_head(extra: &[&str], tags: &[&str], dense: &[f64]) {
    let extra_head: String = extra.iter().map(|e| format!(" {e} |")).collect();
    let head: String = tags
        .iter()
        .map(|t| format!(" {t} PPL (vs dense) | {t} FFN read |"))
        .collect();
    println!("| FFN budget | method |{extra_head}{head}");
    println!(
        "|---|---|{}{}",
        "---|".repeat(extra.len()),
        "---|---|".repeat(tags.len())
    );
    let dense_cells: String = dense.iter().map(|d| format!(" {d:.3} | 100% |")).collect();
    println!("| 100% | dense |{}{dense_cells}", " |".repeat(extra.len()));
}

/// One row's cells per held-out set: PPL (change against dense) and the FFN share read.
pub(crate) fn table_cells(ppl: &[f64], dense: &[f64], share: &[f64]) -> String {
    ppl.iter()
        .zip(dense)
        .zip(share)
        .map(|((p, d), s)| format!(" {p:.3} ({:+.1}%) | {:.1}% |", 100.0 * (p / d - 1.0), 100.0 * s))
        .collect()
}
