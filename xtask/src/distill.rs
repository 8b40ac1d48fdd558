//! `cargo xtask distill`: the stage-1 experiment on SmolLM2-135M with the Austen/Korean data:
//! capture, distil every layer, then held-out perplexity of dense vs MoE at several top-k, with and
//! without distillation, and the activated parameters per token. Prints a table and writes
//! `results.json` in the output folder. Resumes: a finished capture and finished layers are reused.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ladimo_data::{Part, heldout_tokens, take_tokens};
use ladimo_distill::partition::{calibrate_router, router_from_partition};
use ladimo_distill::train::{Inputs, TrainConfig, finished, load_layer_block, run_layers};
use ladimo_io::{Checkpoint, fetch};
use ladimo_model::Transformer;
use ladimo_model::perplexity::perplexity;
use ladimo_moe::{HostFfn, MoeBlock, Policy};

#[derive(Args)]
pub struct DistillArgs {
    /// Calibration tokens (English novels except Persuasion, then Korean help pages).
    #[arg(long, default_value_t = 100_000)]
    tokens: usize,
    /// The Korean help pages' share of --tokens (the rest is English).
    #[arg(long, default_value_t = 0.2)]
    ko_share: f64,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 0)]
    shared: usize,
    #[arg(long, default_value = "kmeans")]
    strategy: String,
    /// Top-k used while training.
    #[arg(long, default_value_t = 6)]
    k_train: usize,
    /// Also train at these top-k, taking turns with --k-train (one step each).
    #[arg(long, value_delimiter = ',')]
    also_k: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 512)]
    batch: usize,
    #[arg(long, default_value_t = 0.0)]
    cosine: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Combine weights: renormalized (times k_train) or unit (the router only selects).
    #[arg(long, default_value = "renormalized")]
    combine: String,
    /// Weight of the router's expert-output-norm loss (0: off).
    #[arg(long, default_value_t = 0.0)]
    router_norm: f64,
    /// Held-out tokens scored per language (windows of --seq-len).
    #[arg(long, default_value_t = 16_384)]
    eval_tokens: usize,
    /// Top-k values to evaluate.
    #[arg(long, value_delimiter = ',', default_value = "4,5,6,7")]
    eval_k: Vec<usize>,
    /// Also evaluate the blocks before training (partition + centroid router) at these k.
    #[arg(long, value_delimiter = ',', default_value = "6,7")]
    untrained_k: Vec<usize>,
    /// Skip the Korean evaluation (English only).
    #[arg(long)]
    no_korean: bool,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only these layers, `START..END` (to split a model across processes); evaluation then
    /// needs every layer finished in --out and is skipped until they are.
    #[arg(long, value_parser = parse_range)]
    layers: Option<std::ops::Range<usize>>,
    /// Train on the teacher's hidden states (layers independent, from a capture) or on the
    /// student's own (layers in order; see ladimo_distill::sequential).
    #[arg(long, default_value = "teacher")]
    inputs: String,
    /// With --inputs student: how far each block aims at the teacher's residual stream (0..1).
    #[arg(long, default_value_t = 0.0)]
    correction: f64,
    /// Stop after training and export (no perplexity evaluation).
    #[arg(long)]
    no_eval: bool,
    /// After the layer-wise pass, polish every block end to end (KL to the teacher's next-token
    /// distribution, `ladimo_distill::finetune`) at this learning rate; the evaluation then
    /// scores the polished blocks (and skips the untrained rows).
    #[arg(long)]
    finetune_lr: Option<f64>,
    #[arg(long, default_value_t = 1)]
    finetune_epochs: usize,
    /// Stop the polish after this many steps (its schedule spread over them); 0: all of
    /// --finetune-epochs. For a polish cut to a time budget.
    #[arg(long, default_value_t = 0)]
    finetune_steps: usize,
    /// Top-k the polish trains at, taking turns (default: --k-train).
    #[arg(long, value_delimiter = ',')]
    finetune_k: Vec<usize>,
    /// Windows of --seq-len per polish step.
    #[arg(long, default_value_t = 2)]
    finetune_batch: usize,
    /// Let the polish train Unit-weighted routers too (straight-through estimator).
    #[arg(long)]
    finetune_router: bool,
    /// Run the teacher once before the polish and keep each token's K most likely next tokens
    /// (the loss becomes the KL over those K plus one bucket for the rest); 0: the teacher runs
    /// in every step and the loss is the exact KL.
    #[arg(long, default_value_t = 0)]
    finetune_teacher_top_k: usize,
}

fn parse_range(s: &str) -> Result<std::ops::Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}`: expected START..END"))?;
    let a: usize = a.parse().map_err(|_| format!("`{s}`: bad start"))?;
    let b: usize = b.parse().map_err(|_| format!("`{s}`: bad end"))?;
    if a >= b {
        return Err(format!("`{s}`: empty range"));
    }
    Ok(a..b)
}

/// `--out` keeps finished layers and polishes, and a rerun reuses them: they must come from the
/// same calibration tokens. The first run writes their fingerprint (hash of the token ids, the
/// model's shape and --seq-len) to `calibration.txt`; a rerun with other tokens (another
/// --tokens, --ko-share or --seq-len) is an error that names the folder, before any work.
fn check_calibration(out: &std::path::Path, fingerprint: &str, layers: usize) -> Result<()> {
    let file = out.join("calibration.txt");
    match std::fs::read_to_string(&file) {
        Ok(old) if old.trim() == fingerprint => Ok(()),
        Ok(old) => anyhow::bail!(
            "{}: this folder's layers were trained on other calibration tokens (fingerprint {}, \
             now {fingerprint}: --tokens, --ko-share or --seq-len changed); give another --out or remove it",
            out.display(),
            old.trim()
        ),
        Err(_) => {
            if (0..layers).any(|l| finished(out, l).is_some()) {
                tracing::warn!(
                    "{}: finished layers without a calibration fingerprint (an older run); \
                     assuming they match this run's tokens",
                    out.display()
                );
            }
            ladimo_io::atomic::write_atomic(&file, fingerprint.as_bytes())?;
            Ok(())
        }
    }
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}").unwrap());
    b.set_message(msg.to_string());
    b
}

pub fn run(a: DistillArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.ko_share) {
        anyhow::bail!("--ko-share {} is not between 0 and 1", a.ko_share);
    }
    let total_start = Instant::now();
    let device = ladimo_backend::device();
    let model_path = fetch::fetch_model(&fetch::SMOLLM2_135M)?;
    let data = ladimo_data::fetch_data()?;
    let ckpt = Checkpoint::open(&model_path)?;
    let tok = ckpt.tokenizer()?;
    let out = a.out.clone().unwrap_or_else(|| {
        fetch::cache_dir().join(format!(
            "runs/smollm2-{}e-{}-s{}-k{}",
            a.experts, a.strategy, a.shared, a.k_train
        ))
    });
    let en_budget = a.tokens - (a.tokens as f64 * a.ko_share).round() as usize;
    // The head of each file: `ladimo profile` measures on the tail.
    let mut calib = take_tokens(tok, &data.calibration_en, en_budget, Part::Head)
        .context("the English calibration text, for its share of --tokens")?;
    calib.extend(
        take_tokens(
            tok,
            std::slice::from_ref(&data.calibration_ko),
            a.tokens - en_budget,
            Part::Head,
        )
        .context("the Korean calibration text, for its share of --tokens")?,
    );
    let all_layers = 0..ckpt.config.num_layers;
    let layers = a.layers.clone().unwrap_or(all_layers.clone());
    if layers.end > all_layers.end {
        anyhow::bail!("--layers {layers:?} is outside the model's {} layers", all_layers.end);
    }
    let mut model = Transformer::from_checkpoint(&ckpt, &device)?;
    let fingerprint = ladimo_distill::capture::fingerprint(&model, &calib, a.seq_len);
    check_calibration(&out, &fingerprint, all_layers.end)?;

    let cfg = TrainConfig {
        experts: a.experts,
        shared_neurons: a.shared,
        strategy: a.strategy.clone(),
        seed: a.seed,
        train_policy: Policy::TopK { k: a.k_train },
        also_train_with: a.also_k.iter().map(|&k| Policy::TopK { k }).collect(),
        combine: match a.combine.as_str() {
            "renormalized" => ladimo_moe::Combine {
                weights: ladimo_moe::CombineWeights::Renormalized,
                scale: a.k_train as f32,
            },
            "unit" => ladimo_moe::Combine {
                weights: ladimo_moe::CombineWeights::Unit,
                scale: 1.0,
            },
            other => anyhow::bail!("--combine {other}: expected renormalized or unit"),
        },
        router_norm_weight: a.router_norm,
        epochs: a.epochs,
        batch_tokens: a.batch,
        lr: a.lr,
        cosine_weight: a.cosine,
        inputs: match a.inputs.as_str() {
            "teacher" => Inputs::Teacher,
            "student" => Inputs::Student,
            other => anyhow::bail!("--inputs {other}: expected teacher or student"),
        },
        residual_correction: a.correction,
        ..Default::default()
    };
    let cap_dir = fetch::cache_dir().join(format!("capture/smollm2-{}-{}", a.tokens, a.seq_len));
    // Student inputs need no capture (the untrained rows then read none either: skipped).
    let mut meta = None;
    let mut capture_s = 0.0;
    if cfg.inputs == Inputs::Teacher {
        let t = Instant::now();
        let pb = bar((calib.len() / a.seq_len) as u64, "capture");
        let m = ladimo_distill::capture::capture(&model, &calib, a.seq_len, layers.clone(), &cap_dir, |d, _| {
            pb.set_position(d as u64)
        })?;
        pb.finish();
        capture_s = if t.elapsed().as_secs_f64() < 1.0 {
            m.seconds
        } else {
            t.elapsed().as_secs_f64()
        };
        meta = Some(m);
    }

    let t = Instant::now();
    let overall = bar(layers.len() as u64, "layers");
    let layer_bar = bar(1, "layer");
    let show = |l: usize, s: usize, total: usize, loss: f64| {
        layer_bar.set_length(total as u64);
        layer_bar.set_position(s as u64);
        layer_bar.set_message(format!("L{l} {loss:.2e}"));
        if s == total {
            overall.inc(1);
        }
    };
    let reports = match cfg.inputs {
        Inputs::Teacher => run_layers(&ckpt, &cap_dir, &out, layers.clone(), &cfg, &device, show)?,
        Inputs::Student => ladimo_distill::sequential::run_layers_sequential(
            &ckpt,
            &model,
            &calib,
            a.seq_len,
            &out,
            layers.clone(),
            &cfg,
            if a.finetune_lr.is_some() {
                a.finetune_teacher_top_k
            } else {
                0
            },
            show,
        )?,
    };
    layer_bar.finish();
    overall.finish();
    let train_s: f64 = reports.iter().map(|r| r.seconds).sum();
    tracing::info!(
        "training wall time this run {:.0} s; sum of per-layer times {train_s:.0} s",
        t.elapsed().as_secs_f64()
    );

    if let Some(missing) = all_layers.clone().find(|&l| finished(&out, l).is_none()) {
        println!(
            "layer {missing} is not finished in {}: evaluation skipped until every layer is",
            out.display()
        );
        return Ok(());
    }
    // The stage-1 model as a checkpoint folder (top-k_train everywhere), for stage 2.
    let export = out.join("model");
    if !export.exists() {
        let s = ladimo_distill::train::export_run(&ckpt, &out, Policy::TopK { k: a.k_train }, &export, &device)?;
        println!(
            "wrote {} (Mixtral-exact: {}{})",
            export.display(),
            s.mixtral_exact,
            s.why_not_mixtral.map(|w| format!(", {w}")).unwrap_or_default()
        );
    }
    // Optional end-to-end polish; the evaluation then reads the polished blocks.
    let mut blocks_dir = out.clone();
    if let Some(lr) = a.finetune_lr {
        let ks = if a.finetune_k.is_empty() {
            vec![a.k_train]
        } else {
            a.finetune_k.clone()
        };
        let fcfg = ladimo_distill::finetune::FinetuneConfig {
            epochs: a.finetune_epochs,
            max_steps: a.finetune_steps,
            policies: ks.iter().map(|&k| Policy::TopK { k }).collect(),
            batch_windows: a.finetune_batch,
            lr,
            train_router: a.finetune_router,
            teacher_top_k: a.finetune_teacher_top_k,
            ..Default::default()
        };
        let ks_name: Vec<String> = ks.iter().map(|k| k.to_string()).collect();
        blocks_dir = out.join(format!(
            "finetune-lr{lr:e}-e{}{}-k{}-b{}{}{}",
            a.finetune_epochs,
            match a.finetune_steps {
                0 => String::new(),
                n => format!("-s{n}"),
            },
            ks_name.join("_"),
            a.finetune_batch,
            if a.finetune_router { "-router" } else { "" },
            match a.finetune_teacher_top_k {
                0 => String::new(),
                k => format!("-tk{k}"),
            }
        ));
        let pb = bar(1, "finetune");
        let r = ladimo_distill::finetune::finetune(
            &ckpt,
            &model,
            &out,
            &blocks_dir,
            &calib,
            a.seq_len,
            &fcfg,
            ladimo_distill::finetune::progress_bar(&pb, "finetune"),
        )?;
        pb.finish();
        println!(
            "finetune: {} steps, held-back KL {:.4} -> {:.4} nats/token, {:.0} s (teacher pass {:.0} s); blocks in {}",
            r.steps,
            r.val_kl_init,
            r.val_kl,
            r.seconds,
            r.teacher_seconds,
            blocks_dir.display()
        );
    }
    if a.no_eval {
        return Ok(());
    }
    // Evaluation.
    let mut sets = vec![(
        "en",
        heldout_tokens(tok, std::slice::from_ref(&data.heldout_en), a.eval_tokens)?,
    )];
    if !a.no_korean {
        let ko = heldout_tokens(tok, &data.heldout_ko, a.eval_tokens.min(16_384))?;
        sets.push(("ko", ko));
    }
    let dense_counts = model.param_counts();
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let eval = |model: &Transformer, name: String, rows: &mut Vec<serde_json::Value>| -> Result<()> {
        let mut row = serde_json::json!({"model": name});
        for (lang, ids) in &sets {
            let t = Instant::now();
            let r = perplexity(model, ids, a.seq_len, |_, _| {})?;
            row[format!("ppl_{lang}")] = r.perplexity.into();
            tracing::info!(
                "{name} {lang}: ppl {:.3} ({:.0} s)",
                r.perplexity,
                t.elapsed().as_secs_f64()
            );
        }
        let c = model.param_counts();
        row["active_params"] = c.active().into();
        row["active_ffn_params"] = c.ffn_active.into();
        println!("{row}");
        rows.push(row);
        Ok(())
    };
    eval(&model, "dense".into(), &mut rows)?;
    let set_blocks = |model: &mut Transformer, k: usize, trained: bool| -> Result<()> {
        for layer in all_layers.clone() {
            let block = if trained {
                load_layer_block(&blocks_dir, layer, Policy::TopK { k }, &device)?
            } else {
                let r = finished(&out, layer).context("layer report")?;
                let ffn = HostFfn::from_checkpoint(&ckpt, layer)?;
                let experts: Vec<HostFfn> = r.partition.experts.iter().map(|p| ffn.select_neurons(p)).collect();
                let shared = (!r.partition.shared.is_empty()).then(|| ffn.select_neurons(&r.partition.shared));
                // The same initial router as training starts from.
                let meta = meta.as_ref().context("the untrained rows read the capture")?;
                let (x, _) = ladimo_distill::capture::load_layer(&cap_dir, meta, layer)?;
                let n = (x.len() / ffn.hidden_size()).min(1024);
                let mut router = router_from_partition(&ffn, &r.partition);
                calibrate_router(&mut router, &x[..n * ffn.hidden_size()], n, r.config.router_init_std);
                MoeBlock::new(
                    &router,
                    None,
                    &experts,
                    shared.as_ref(),
                    r.config.combine,
                    Policy::TopK { k },
                    &device,
                )?
            };
            model.layers[layer].ffn = Box::new(block);
        }
        Ok(())
    };
    let what = if a.finetune_lr.is_some() {
        "distilled+finetuned"
    } else {
        "distilled"
    };
    for &k in &a.eval_k {
        set_blocks(&mut model, k, true)?;
        eval(&model, format!("moe top-{k}/{} {what}", a.experts), &mut rows)?;
    }
    for &k in a
        .untrained_k
        .iter()
        .filter(|_| meta.is_some() && a.finetune_lr.is_none())
    {
        set_blocks(&mut model, k, false)?;
        eval(&model, format!("moe top-{k}/{} not distilled", a.experts), &mut rows)?;
    }
    let results = serde_json::json!({
        "config": cfg, "calibration_tokens": calib.len(), "ko_share": a.ko_share, "eval_tokens": a.eval_tokens, "seq_len": a.seq_len,
        "capture_seconds": capture_s, "train_seconds_sum": train_s,
        "dense_params": {"total": dense_counts.total(), "ffn": dense_counts.ffn_total},
        "rows": rows, "wall_seconds": total_start.elapsed().as_secs_f64(),
    });
    let p = blocks_dir.join("results.json");
    ladimo_io::atomic::write_atomic(&p, &serde_json::to_vec_pretty(&results)?)?;
    println!(
        "\n{:<32} {:>10} {:>10} {:>14} {:>12}",
        "model", "ppl en", "ppl ko", "active params", "active ffn"
    );
    let dense_en = rows[0]["ppl_en"].as_f64().unwrap_or(f64::NAN);
    for r in &rows {
        let en = r["ppl_en"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<32} {:>10.3} {:>10.3} {:>13.1}M {:>11.1}M   ({:+.1}% en)",
            r["model"].as_str().unwrap_or(""),
            en,
            r["ppl_ko"].as_f64().unwrap_or(f64::NAN),
            r["active_params"].as_f64().unwrap_or(0.0) / 1e6,
            r["active_ffn_params"].as_f64().unwrap_or(0.0) / 1e6,
            (en / dense_en - 1.0) * 100.0
        );
    }
    println!(
        "capture {capture_s:.0} s, training (sum over layers) {train_s:.0} s; results in {}",
        p.display()
    );
    Ok(())
}
