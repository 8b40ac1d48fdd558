//! `cargo xtask thresholds`: the levers on TEAL's frontier (issue 26, part 2), measured in one
//! run against uniform TEAL at the same FFN budgets, on held-out text per language:
//!
//! - `uniform`: TEAL, every layer at the global budget (what `xtask frontier` measures);
//! - `alloc`: TEAL with a budget per layer ([`ladimo_profile::teal_alloc`]: each layer's
//!   calibration ln-PPL cost at each probed budget, exact knapsack under the global budget);
//! - `loop`: uniform TEAL thresholds, then every layer's dense FFN trained under them, in order on
//!   the student's own hidden states ([`ladimo_distill::thresholded`]);
//! - `alloc-loop`: the same training on the allocated per-layer thresholds;
//! - `polish`: uniform TEAL thresholds, then every layer's FFN trained at once under them to match
//!   the dense model's next-token distribution ([`ladimo_distill::teal_polish`]), then the
//!   thresholds calibrated again on the new weights (the same budget);
//! - `loop-polish`: the same polish starting from `loop`'s trained layers.
//!
//! Everything before the held-out scoring reads calibration text only: thresholds and the
//! allocation's probes from the tails of the calibration files (as `ladimo sparsify` and `xtask
//! frontier`), training from their heads (as stage 1). Profiles and trained layers go under
//! `--work` and are reused by a rerun with the same settings. Prints a markdown table, writes JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use ladimo_distill::teal_polish::{PolishProgress, TealPolishConfig, dense_ffns, polish_thresholded};
use ladimo_distill::thresholded::{ThresholdTrainConfig, apply_run, run_thresholded};
use ladimo_model::Transformer;
use ladimo_moe::sparsity::{Method, Sparsity, calibrate, set_sparsity};
use ladimo_profile::teal_alloc::{TealProfile, allocate, profile_teal};

#[derive(Args)]
pub struct ThresholdsArgs {
    /// A dense model (directory, .gguf, or a known name).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Global FFN budgets (share of the FFN's parameters read per token).
    #[arg(long, value_delimiter = ',', default_value = "0.75")]
    budgets: Vec<f64>,
    /// Which levers to measure: uniform, alloc, loop, alloc-loop, polish, loop-polish.
    #[arg(long, value_delimiter = ',', default_value = "uniform,alloc,loop")]
    methods: Vec<String>,
    /// Threshold calibration tokens from the tail of each calibration file.
    #[arg(long, default_value_t = 2048)]
    tokens_per_file: usize,
    /// Allocation: the per-layer budgets probed (1.0, dense, is always a choice).
    #[arg(long, value_delimiter = ',', default_value = "0.4,0.5,0.625,0.75,0.875")]
    probe_budgets: Vec<f64>,
    /// Allocation: calibration tokens each probe scores (whole windows of the threshold
    /// calibration text, one file after another, Korean first).
    #[arg(long, default_value_t = 2048)]
    probe_tokens: usize,
    /// Training: calibration tokens (the head of the files; Korean's share below, English the rest).
    #[arg(long, default_value_t = 16_384)]
    train_tokens: usize,
    #[arg(long, default_value_t = 0.2)]
    ko_share: f64,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 0.0)]
    residual_correction: f64,
    /// Polish: passes over the training tokens, peak learning rate, the teacher's top K, ...
    #[command(flatten)]
    polish: TealPolishConfig,
    /// Held-out tokens per language (the head of the held-out files).
    #[arg(long, default_value_t = 16_384)]
    heldout_tokens: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Where profiles and trained layers are kept (reused by a rerun with the same settings).
    #[arg(long, default_value = "out/thresholds.work")]
    work: PathBuf,
    /// Where the JSON goes.
    #[arg(long, default_value = "out/thresholds.json")]
    out: PathBuf,
}

#[derive(serde::Serialize)]
struct Row {
    budget: f64,
    method: String,
    /// Per held-out tag: perplexity and the share of the FFN read there.
    langs: Vec<(String, f64, f64)>,
    seconds: f64,
}

/// Held-out perplexity and FFN share read per language, the model as it is.
pub(crate) fn score(
    model: &Transformer,
    held: &[(String, Vec<u32>)],
    seq_len: usize,
) -> Result<Vec<(String, f64, f64)>> {
    let mut out = Vec::new();
    for (tag, ids) in held {
        for l in &model.layers {
            l.ffn.reset_stats();
        }
        let r = ladimo_model::perplexity::perplexity(model, ids, seq_len, |_, _| {})?;
        let c = model.param_counts();
        out.push((tag.clone(), r.perplexity, c.ffn_active / c.ffn_total as f64));
    }
    Ok(out)
}

/// The key of token ids: names a training run (and a cached dense score) by its inputs.
fn ids_key(ids: &[u32]) -> String {
    ladimo_io::hash::content_hash([ladimo_convert::step::ids_bytes(ids).as_slice()])
}

fn set_all(model: &mut Transformer, s: &[Option<Sparsity>]) -> Result<()> {
    for (l, s) in s.iter().enumerate() {
        set_sparsity(model, l, s.clone())?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    Ok(ladimo_io::atomic::write_atomic(
        path,
        serde_json::to_string_pretty(v)?.as_bytes(),
    )?)
}

/// `loop`: every layer's dense FFN trained in order under `start` (reused from `--work` when a
/// run of the same settings finished there); returns the model with the trained layers.
fn train_loop(
    a: &ThresholdsArgs,
    ckpt: &ladimo_io::Checkpoint,
    model: &mut Transformer,
    train_ids: &[u32],
    method: &str,
    budget: f64,
    start: &[Sparsity],
) -> Result<Transformer> {
    let cfg = ThresholdTrainConfig {
        epochs: a.epochs,
        lr: a.lr,
        residual_correction: a.residual_correction,
        ..Default::default()
    };
    let dir = a.work.join(format!(
        "{method}-{budget}-{}tok-{}-lr{}-e{}-c{}",
        a.train_tokens,
        ids_key(train_ids),
        a.lr,
        a.epochs,
        a.residual_correction
    ));
    set_all(model, &vec![None; model.layers.len()])?;
    let reports = run_thresholded(model, train_ids, a.seq_len, start, &cfg, &dir, |l, s, n, loss| {
        eprint!("\r{method} at {budget}: layer {l} step {s}/{n} loss {loss:.4}   ");
    })?;
    eprintln!();
    for r in &reports {
        eprintln!(
            "  layer {:2}: val rel error {:.4} -> {:.4} ({:.0} s)",
            r.layer, r.val_rel_error_init, r.val_rel_error, r.seconds
        );
    }
    let mut trained = Transformer::from_checkpoint(ckpt, &model.device)?;
    apply_run(&mut trained, &dir)?;
    Ok(trained)
}

/// The TEAL thresholds layer `l` of `model` runs with.
fn sparsity_of(model: &Transformer, l: usize) -> Result<Sparsity> {
    let ffn: &dyn std::any::Any = model.layers[l].ffn.as_ref();
    ffn.downcast_ref::<ladimo_moe::sparsity::SparseFfn>()
        .map(|s| s.sparsity().clone())
        .with_context(|| format!("layer {l} has no thresholds"))
}

pub fn thresholds(a: ThresholdsArgs) -> Result<()> {
    let start = Instant::now();
    for m in &a.methods {
        if !["uniform", "alloc", "loop", "alloc-loop", "polish", "loop-polish"].contains(&m.as_str()) {
            bail!("--methods: unknown `{m}` (uniform, alloc, loop, alloc-loop, polish, loop-polish)");
        }
    }
    for &b in &a.budgets {
        Method::Teal.sparsity_for(b).context("--budgets")?;
    }
    if !(0.0..1.0).contains(&a.ko_share) {
        bail!("--ko-share must be in [0, 1)");
    }
    let path = ladimo_convert::pipeline::resolve_model(&a.model)?;
    let ckpt = ladimo_io::Checkpoint::open(&path)?;
    let tok = ckpt.tokenizer()?;
    let data = ladimo_data::fetch_data()?;
    // Calibration text only, up to the held-out scoring.
    let mut cal_files = data.calibration_en.clone();
    cal_files.push(data.calibration_ko.clone());
    let cal = ladimo_data::calibration_tokens(tok, &data, a.tokens_per_file, a.train_tokens, a.ko_share, a.seq_len)?;
    let (tails, train_ids) = (cal.tails, cal.train);
    let windows: Vec<&[u32]> = tails
        .iter()
        .flat_map(|t| t.chunks(a.seq_len))
        .filter(|w| w.len() > 1)
        .collect();
    // Probe windows: whole windows, one file after another in turn.
    let per_file: Vec<Vec<&[u32]>> = tails.iter().map(|t| t.chunks_exact(a.seq_len).collect()).collect();
    let mut probe: Vec<&[u32]> = Vec::new();
    'fill: for i in 0.. {
        let mut any = false;
        // The Korean file first: a short probe still covers both languages.
        for w in per_file.iter().rev() {
            if probe.len() * a.seq_len >= a.probe_tokens.max(1) {
                break 'fill;
            }
            if let Some(w) = w.get(i) {
                probe.push(w);
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let held = data.heldout_sets(tok, a.heldout_tokens)?;
    let mut model = Transformer::from_checkpoint(&ckpt, &ladimo_backend::device())?;
    let n_layers = model.layers.len();
    let t = Instant::now();
    // The dense scores depend only on the held-out ids: kept in --work for the next run.
    let held_key = ids_key(&held.iter().flat_map(|(_, ids)| ids.iter().copied()).collect::<Vec<_>>());
    let dense_file = a.work.join(format!("dense-{held_key}-seq{}.json", a.seq_len));
    let dense: Vec<(String, f64, f64)> = match std::fs::read(&dense_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(d) => d,
        None => {
            let d = score(&model, &held, a.seq_len)?;
            write_json(&dense_file, &d)?;
            d
        }
    };
    eprintln!(
        "dense: {} ({:.0} s)",
        dense
            .iter()
            .map(|(t, p, _)| format!("{t} {p:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        t.elapsed().as_secs_f64()
    );

    let want = |m: &str| a.methods.iter().any(|x| x == m);
    let profile: Option<TealProfile> = if want("alloc") || want("alloc-loop") {
        let p = a.work.join(format!(
            "teal-profile-{}x{}-probe{}-{}.json",
            a.tokens_per_file,
            cal_files.len(),
            a.probe_tokens,
            a.probe_budgets
                .iter()
                .map(|b| format!("{b}"))
                .collect::<Vec<_>>()
                .join("_")
        ));
        match std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            Some(prof) => {
                eprintln!("reusing {}", p.display());
                Some(prof)
            }
            None => {
                let prof = profile_teal(&mut model, &windows, &probe, &a.probe_budgets, |stage, d, n| {
                    eprint!("\rallocation profile, {stage}: {d}/{n}   ");
                })?;
                eprintln!("({:.0} s)", prof.seconds);
                write_json(&p, &prof)?;
                Some(prof)
            }
        }
    } else {
        None
    };

    let mut rows: Vec<Row> = Vec::new();
    for &budget in &a.budgets {
        let uniform = calibrate(&mut model, &windows, Method::Teal, budget, |_, _| {})?;
        let allocated: Option<Vec<Option<Sparsity>>> = match &profile {
            Some(p) => {
                let picks = allocate(p, budget)?;
                eprintln!(
                    "allocation at {budget}: per-layer budgets {}",
                    picks
                        .iter()
                        .map(|p| format!("{}", p.budget))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                Some(picks.into_iter().map(|p| p.sparsity).collect())
            }
            None => None,
        };
        for method in &a.methods {
            let t = Instant::now();
            let langs = match method.as_str() {
                "uniform" => {
                    set_all(&mut model, &uniform.iter().cloned().map(Some).collect::<Vec<_>>())?;
                    score(&model, &held, a.seq_len)?
                }
                "alloc" => {
                    set_all(&mut model, allocated.as_ref().expect("profiled above"))?;
                    score(&model, &held, a.seq_len)?
                }
                "loop" | "alloc-loop" => {
                    let start_s: Vec<Sparsity> = if method == "loop" {
                        uniform.clone()
                    } else {
                        // Dense layers (budget 1.0) train under thresholds that keep everything.
                        allocated
                            .as_ref()
                            .expect("profiled above")
                            .iter()
                            .map(|s| s.clone().unwrap_or(Sparsity::Teal { x: 0.0, h: 0.0 }))
                            .collect()
                    };
                    let trained = train_loop(&a, &ckpt, &mut model, &train_ids, method, budget, &start_s)?;
                    score(&trained, &held, a.seq_len)?
                }
                "polish" | "loop-polish" => {
                    // The start: the dense weights under uniform thresholds, or `loop`'s layers
                    // under the thresholds they ended with.
                    let (start, start_s) = if method == "polish" {
                        (dense_ffns(&model)?, uniform.clone())
                    } else {
                        let trained = train_loop(&a, &ckpt, &mut model, &train_ids, "loop", budget, &uniform)?;
                        let s = (0..n_layers)
                            .map(|l| sparsity_of(&trained, l))
                            .collect::<Result<Vec<_>>>()?;
                        (dense_ffns(&trained)?, s)
                    };
                    set_all(&mut model, &vec![None; n_layers])?;
                    let cfg = a.polish.clone();
                    let (ffns, rep) = polish_thresholded(
                        &ckpt,
                        &model,
                        &start,
                        &start_s,
                        &train_ids,
                        a.seq_len,
                        &cfg,
                        |p| match p {
                            PolishProgress::Teacher { done, total } => {
                                eprint!("\r{method} at {budget}: teacher window {done}/{total}   ")
                            }
                            PolishProgress::Step { step, total, kl } => {
                                eprint!("\r{method} at {budget}: step {step}/{total} KL {kl:.4}   ")
                            }
                        },
                    )?;
                    eprintln!(
                        "\n{method} at {budget}: held-back KL {:.4} -> {:.4} ({} steps, {:.0} s)",
                        rep.val_kl_init, rep.val_kl, rep.steps, rep.seconds
                    );
                    let mut polished = Transformer::from_checkpoint(&ckpt, &model.device)?;
                    for (l, f) in ffns.into_iter().enumerate() {
                        polished.layers[l].ffn = Box::new(f);
                    }
                    // Thresholds again on the new weights (calibration text), at the same budget.
                    let th = calibrate(&mut polished, &windows, Method::Teal, budget, |_, _| {})?;
                    set_all(&mut polished, &th.into_iter().map(Some).collect::<Vec<_>>())?;
                    score(&polished, &held, a.seq_len)?
                }
                _ => unreachable!("checked above"),
            };
            set_all(&mut model, &vec![None; n_layers])?;
            let row = Row {
                budget,
                method: method.clone(),
                langs,
                seconds: t.elapsed().as_secs_f64(),
            };
            eprintln!(
                "{method} at {budget}: {} ({:.0} s)",
                row.langs
                    .iter()
                    .zip(&dense)
                    .map(|((t, p, s), d)| format!(
                        "{t} {p:.3} ({:+.1}%, FFN read {:.1}%)",
                        100.0 * (p / d.1 - 1.0),
                        100.0 * s
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                row.seconds
            );
            rows.push(row);
            // The rows so far, so that a run cut short keeps what it measured.
            write_json(&a.out.with_extension("partial.json"), &rows)?;
        }
    }
    println!(
        "\n{}: thresholds on {} calibration tokens, training on {}; held-out {} tokens per language, seq {}\n",
        path.display(),
        windows.iter().map(|w| w.len()).sum::<usize>(),
        train_ids.len(),
        a.heldout_tokens,
        a.seq_len
    );
    let head: String = dense
        .iter()
        .map(|(t, _, _)| format!(" {t} PPL (vs dense) | {t} FFN read |"))
        .collect();
    println!("| FFN budget | method |{head}");
    println!("|---|---|{}", "---|---|".repeat(dense.len()));
    let cells: String = dense.iter().map(|(_, p, _)| format!(" {p:.3} | 100% |")).collect();
    println!("| 100% | dense |{cells}");
    for r in &rows {
        let c: Vec<String> = r
            .langs
            .iter()
            .zip(&dense)
            .map(|((_, p, s), d)| format!("{p:.3} ({:+.1}%) | {:.1}%", 100.0 * (p / d.1 - 1.0), 100.0 * s))
            .collect();
        println!("| {:.1}% | {} | {} |", 100.0 * r.budget, r.method, c.join(" | "));
    }
    let json = serde_json::json!({
        "model": path.display().to_string(),
        "calibration_files": cal_files,
        "train_tokens": train_ids.len(),
        "heldout_tokens": a.heldout_tokens,
        "seq_len": a.seq_len,
        "dense": dense,
        "rows": rows,
    });
    write_json(&a.out, &json)?;
    println!("\nwrote {} ({:.0} s)", a.out.display(), start.elapsed().as_secs_f64());
    Ok(())
}
