//! `ladimo sparsify`: calibrate a training-free activation-sparsity method (static pruning,
//! CATS, TEAL) on a dense model, or TEAL on an MoE model (thresholds inside the experts that run
//! under each MoE layer's current routing policy), and write its per-layer thresholds as a policy
//! file that `perplexity`, `generate`, `eval` and `logits` take with `--policy`.
//!
//! With `--polish` (TEAL on a dense model) it then trains every layer's FFN under those
//! thresholds to match the dense model's next-token distribution
//! ([`ladimo_distill::teal_polish`]), calibrates the thresholds again on the new weights (same
//! budget), and writes a model folder: the polished dense checkpoint (`config.json` the source's,
//! so stock loaders read it as the dense model it is), `policy.toml` (the thresholds, for
//! ladimo's `--policy`, or `ladimo export --format hf-remote --policy` for transformers) and
//! `polish.json` (what the training did). When the polish does not lower the KL to the dense model
//! on the calibration windows it holds back (at high budgets, where TEAL loses little, it can
//! raise it), the folder gets the dense weights under TEAL's thresholds instead, and
//! `polish.json` says so. The folder is written whole or not at all; the trained
//! FFNs are kept in `OUT.work/` until then, so a rerun after a crash past the training reuses
//! them (a crash during the training starts it again).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use ladimo_data::{Part, take_tokens};
use ladimo_distill::teal_polish::{PolishProgress, TealPolishConfig, TealPolishReport, dense_ffns, polish_thresholded};
use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_moe::policy_file::{LayerPolicy, PolicyFile, model_fingerprint};
use ladimo_moe::sparsity::{Method, Sparsity, calibrate};
use ladimo_moe::{HostFfn, moe_block};

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
    /// Where to write the policy file (TOML); with --polish, the model folder (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// TEAL on a dense model: train every layer's FFN under the thresholds against the dense
    /// model (minutes to an hour on a CPU), calibrate again, write a model folder to --out.
    #[arg(long)]
    pub polish: bool,
    /// Polish: training tokens, from the head of the calibration files (the thresholds use their
    /// tails); with --text, the head of those files, in order.
    #[arg(long, default_value_t = 32_768)]
    pub train_tokens: usize,
    /// Polish, default texts: the Korean share of the training tokens (English novels the rest).
    #[arg(long, default_value_t = 0.2)]
    pub ko_share: f64,
    #[command(flatten)]
    pub polish_cfg: TealPolishConfig,
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
    if a.polish {
        return polish(&a, &ckpt, &mut model, &windows, &files);
    }
    let layers = calibrate(&mut model, &windows, a.method, a.budget, |d, t| {
        eprint!("\rcalibrating {}: window {d}/{t}   ", a.method.name());
        if d == t {
            eprintln!();
        }
    })?;
    let file = policy_file(&model, a.method, a.budget, layers, tokens, files.len());
    file.write(&a.out)?;
    println!(
        "wrote {} ({} layers, {tokens} calibration tokens, {:.1} s)",
        a.out.display(),
        file.layers.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The policy file of per-layer sparsities `layers` calibrated on `model`.
fn policy_file(
    model: &Transformer,
    method: Method,
    budget: f64,
    layers: Vec<Sparsity>,
    tokens: usize,
    files: usize,
) -> PolicyFile {
    PolicyFile {
        model: model_fingerprint(model),
        note: format!(
            "{} at {:.1}% of the FFN, calibrated on {tokens} tokens of {files} file(s)",
            method.name(),
            100.0 * budget,
        ),
        layers: layers
            .into_iter()
            .enumerate()
            .map(|(layer, s)| LayerPolicy {
                layer,
                // An MoE layer keeps the routing policy the thresholds were calibrated under.
                policy: moe_block(model, layer).map(|b| b.policy.clone()),
                sparsity: Some(s),
            })
            .collect(),
    }
}

/// What `polish.json` in the output folder says.
#[derive(serde::Serialize, serde::Deserialize)]
struct PolishRecord {
    source: String,
    budget: f64,
    train_tokens: usize,
    ko_share: Option<f64>,
    threshold_calibration_tokens: usize,
    polish: TealPolishReport,
    /// False when the polish did not lower the held-back KL: the folder then holds the dense
    /// weights under TEAL's thresholds (the polish never makes the result worse on the one
    /// measure of calibration text it holds back).
    polished_weights_kept: bool,
}

/// `--polish`: thresholds, the polish under them, thresholds again, the model folder.
fn polish(
    a: &SparsifyArgs,
    ckpt: &Checkpoint,
    model: &mut Transformer,
    windows: &[&[u32]],
    files: &[PathBuf],
) -> Result<()> {
    let start = Instant::now();
    if a.method != Method::Teal {
        bail!(
            "--polish trains under TEAL thresholds only (--method teal), not {}",
            a.method.name()
        );
    }
    if let Some(l) = (0..model.layers.len()).find(|&l| moe_block(model, l).is_some()) {
        bail!(
            "--polish trains a dense model's FFNs; layer {l} of {} is an MoE block",
            a.model
        );
    }
    if a.out.exists() {
        bail!(
            "{}: already exists; --polish writes a new model folder there",
            a.out.display()
        );
    }
    if !(0.0..1.0).contains(&a.ko_share) {
        bail!("--ko-share must be in [0, 1)");
    }
    let tok = ckpt.tokenizer()?;
    let (train_ids, ko_share) = if a.texts.is_empty() {
        let data = ladimo_data::fetch_data()?;
        let cal = ladimo_data::calibration_tokens(tok, &data, 1, a.train_tokens, a.ko_share, a.seq_len)?;
        (cal.train, Some(a.ko_share))
    } else {
        (take_tokens(tok, &a.texts, a.train_tokens, Part::Head)?, None)
    };
    let threshold_tokens: usize = windows.iter().map(|w| w.len()).sum();

    let uniform = calibrate(model, windows, Method::Teal, a.budget, |d, t| {
        eprint!("\rcalibrating TEAL: window {d}/{t}   ");
        if d == t {
            eprintln!();
        }
    })?;

    // The trained FFNs are kept in OUT.work/, named by everything they depend on.
    let key = ladimo_io::hash::content_hash([
        model_fingerprint(model).as_bytes(),
        format!("{:?}", ckpt.path).as_bytes(),
        serde_json::to_string(&a.polish_cfg)?.as_bytes(),
        serde_json::to_string(&uniform)?.as_bytes(),
        &train_ids.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>(),
        &(a.seq_len as u64).to_le_bytes(),
    ]);
    let work = PathBuf::from(format!("{}.work", a.out.display()));
    let cached = work.join(format!("polished-{key}"));
    let report_file = work.join(format!("polished-{key}.json"));
    let (ffns, report): (Vec<HostFfn>, TealPolishReport) = match std::fs::read(&report_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|_| cached.is_dir())
    {
        Some(report) => {
            eprintln!("reusing the polished FFNs in {}", cached.display());
            let c = Checkpoint::open(&cached)?;
            let ffns = (0..model.layers.len())
                .map(|l| HostFfn::from_checkpoint(&c, l))
                .collect::<Result<_, _>>()?;
            (ffns, report)
        }
        None => {
            let (trained, report) = polish_thresholded(
                ckpt,
                model,
                &dense_ffns(model)?,
                &uniform,
                &train_ids,
                a.seq_len,
                &a.polish_cfg,
                |p| match p {
                    PolishProgress::Teacher { done, total } => {
                        eprint!("\rthe dense model's top next tokens: window {done}/{total}   ");
                        if done == total {
                            eprintln!();
                        }
                    }
                    PolishProgress::Step { step, total, kl } => {
                        eprint!(
                            "\rpolish under TEAL {:.1}%: step {step}/{total}, KL {kl:.4}   ",
                            100.0 * a.budget
                        );
                        if step == total {
                            eprintln!();
                        }
                    }
                },
            )?;
            let ffns: Vec<HostFfn> = trained.iter().map(HostFfn::from_dense).collect();
            std::fs::create_dir_all(&work).with_context(|| format!("{}: cannot create", work.display()))?;
            let dir = ladimo_io::atomic::AtomicDir::new(&cached)?;
            ladimo_moe::write_dense_checkpoint(ckpt, &ffns, dir.path())?;
            dir.commit()?;
            ladimo_io::atomic::write_atomic(&report_file, serde_json::to_string_pretty(&report)?.as_bytes())?;
            (ffns, report)
        }
    };
    eprintln!(
        "held-back KL to the dense model: {:.4} under the thresholds before, {:.4} after ({} steps)",
        report.val_kl_init, report.val_kl, report.steps
    );
    // Keep the trained weights only if they moved the sparse model towards the dense one on the
    // held-back calibration windows; else the dense weights under their thresholds (TEAL itself).
    let kept = report.val_kl < report.val_kl_init;
    let (ffns, layers) = if kept {
        // The polished model, its thresholds calibrated again on the same text at the same budget.
        for (l, f) in ffns.iter().enumerate() {
            model.layers[l].ffn = Box::new(f.to_dense(&model.device));
        }
        (ffns, calibrate(model, windows, Method::Teal, a.budget, |_, _| {})?)
    } else {
        eprintln!(
            "the polish did not lower the held-back KL: writing the dense weights under TEAL's thresholds instead"
        );
        let dense = (0..model.layers.len())
            .map(|l| HostFfn::from_checkpoint(ckpt, l))
            .collect::<Result<Vec<_>, _>>()?;
        (dense, uniform)
    };
    let file = policy_file(model, Method::Teal, a.budget, layers, threshold_tokens, files.len());
    let record = PolishRecord {
        source: a.model.clone(),
        budget: a.budget,
        train_tokens: train_ids.len(),
        ko_share,
        threshold_calibration_tokens: threshold_tokens,
        polish: report,
        polished_weights_kept: kept,
    };
    let dir = ladimo_io::atomic::AtomicDir::new(&a.out)?;
    ladimo_moe::write_dense_checkpoint(ckpt, &ffns, dir.path())?;
    file.write(&dir.path().join("policy.toml"))?;
    std::fs::write(dir.path().join("polish.json"), serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("{}: cannot write polish.json", a.out.display()))?;
    dir.commit()?;
    std::fs::remove_dir_all(&work).with_context(|| format!("{}: cannot remove", work.display()))?;
    println!(
        "wrote {} (TEAL at {:.1}% of the FFN, {} on {} tokens, {:.0} s): run it with --policy {}",
        a.out.display(),
        100.0 * a.budget,
        if kept {
            "polished"
        } else {
            "not polished: the polish did not help"
        },
        train_ids.len(),
        start.elapsed().as_secs_f64(),
        a.out.join("policy.toml").display()
    );
    Ok(())
}
