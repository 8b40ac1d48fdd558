//! `cargo xtask predictor`: expert routing by the predictor router, no training (issue 26): each
//! layer's FFN cut into `E` contiguous experts, a low-rank router fitted in closed form to the
//! experts' log output norms on calibration text ([`ladimo_distill::predictor`]), then top-k
//! within each FFN budget (the predictor's parameters counted), held-out perplexity per language
//! beside TEAL's at the same budgets, in one run. Prints a markdown table, writes JSON.
//!
//! The fit reads the heads of the calibration files (as stage 1 does), TEAL's thresholds their
//! tails (as `ladimo sparsify` does); held-out text is only scored.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ladimo_convert::evaluate::baseline;
use ladimo_data::{Part, take_tokens};
use ladimo_distill::predictor::{ExpertCut, PredictorFit, Solved, collect_stats};
use ladimo_io::HostTensor;
use ladimo_model::{FeedForward, Transformer};
use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, Policy, SparsityMethod};

#[derive(Args)]
pub struct PredictorArgs {
    /// A dense model (directory, .gguf, or a known name).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Experts per layer (contiguous, equal; the FFN size for single neurons).
    #[arg(long, value_delimiter = ',', default_value = "1536,96")]
    experts: Vec<usize>,
    /// Predictor ranks.
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    ranks: Vec<usize>,
    /// FFN budgets (share of the dense FFN's parameters read per token, predictor included).
    #[arg(long, value_delimiter = ',', default_value = "0.875,0.75,0.625,0.5")]
    budgets: Vec<f64>,
    /// Fit tokens from the head of each calibration file.
    #[arg(long, default_value_t = 4096)]
    fit_tokens_per_file: usize,
    /// TEAL's threshold tokens from the tail of each calibration file (0: no TEAL rows).
    #[arg(long, default_value_t = 2048)]
    teal_tokens_per_file: usize,
    /// Held-out tokens per language (the head of the held-out files).
    #[arg(long, default_value_t = 16_384)]
    heldout_tokens: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Expert selection: `topk` (the same k for every token) and/or `share` (per token, the
    /// fewest experts whose predicted share of the layer's output norm reaches p: top-p on the
    /// predictor's softmax; each layer's p found by bisection on calibration text so that its mean
    /// k is the top-k row's k).
    #[arg(long, value_delimiter = ',', default_value = "topk")]
    select: Vec<String>,
    /// Where the JSON goes.
    #[arg(long, default_value = "out/predictor.json")]
    out: PathBuf,
}

#[derive(serde::Serialize)]
struct Row {
    method: String,
    /// How experts are chosen per token (predictor rows).
    select: String,
    budget: f64,
    experts: usize,
    rank: usize,
    k: usize,
    /// Mean over layers of the fit's loss / the constant predictor's loss.
    fit_loss_ratio: f64,
    ppl: Vec<(String, f64)>,
    ffn_share: Vec<f64>,
}

pub fn predictor(a: PredictorArgs) -> Result<()> {
    let start = Instant::now();
    let path = ladimo_convert::pipeline::resolve_model(&a.model)?;
    let ckpt = ladimo_io::Checkpoint::open(&path)?;
    let tok = ckpt.tokenizer()?;
    let cfg = ckpt.config.clone();
    let (h, inter, layers) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers);
    for &e in &a.experts {
        anyhow::ensure!(
            e > 0 && inter % e == 0,
            "--experts {e} does not divide the FFN's {inter} neurons"
        );
    }
    for &r in &a.ranks {
        ladimo_moe::check_predictor_rank(r, h).context("--ranks")?;
    }
    for sel in &a.select {
        anyhow::ensure!(
            sel == "topk" || sel == "share",
            "--select {sel}: expected topk or share"
        );
    }
    let data = ladimo_data::fetch_data()?;
    let mut cal_files = data.calibration_en.clone();
    cal_files.push(data.calibration_en_docs.clone());
    cal_files.push(data.calibration_ko.clone());
    let part = |n: usize, p: Part| -> Result<Vec<Vec<u32>>> {
        cal_files
            .iter()
            .map(|f| {
                take_tokens(tok, std::slice::from_ref(f), n, p)
                    .with_context(|| format!("calibration text {}", f.display()))
            })
            .collect()
    };
    let fit_text = part(a.fit_tokens_per_file, Part::Head)?;
    let fit_windows = windows(&fit_text, a.seq_len);
    // One window from the tail of each calibration file, for the share rows' p.
    let p_text: Vec<u32> = part(a.seq_len, Part::Tail)?.concat();
    let held = data.heldout_sets(tok, a.heldout_tokens)?;
    let device = ladimo_backend::device();
    let mut model = Transformer::from_checkpoint(&ckpt, &device)?;
    let dense_ffns: Vec<HostFfn> = (0..layers)
        .map(|l| HostFfn::from_checkpoint(&ckpt, l))
        .collect::<Result<_, _>>()?;
    let mut dense_ppl = Vec::new();
    for (tag, ids) in &held {
        let r = ladimo_model::perplexity::perplexity(&model, ids, a.seq_len, |_, _| {})?;
        eprintln!("dense {tag}: PPL {:.3} on {} tokens", r.perplexity, ids.len());
        dense_ppl.push(r.perplexity);
    }
    let ffn_params = (3 * h * inter) as f64;
    let mut rows: Vec<Row> = Vec::new();
    for &e in &a.experts {
        let size = inter / e;
        // Each layer's FFN cut into `e` contiguous experts, once: the fit and every block use it.
        let experts: Vec<Vec<HostFfn>> = dense_ffns
            .iter()
            .map(|f| {
                (0..e)
                    .map(|i| f.select_neurons(&(i * size..(i + 1) * size).collect::<Vec<_>>()))
                    .collect()
            })
            .collect();
        let t = Instant::now();
        let cuts = experts.iter().map(|x| ExpertCut::new(x, &device)).collect();
        let stats = collect_stats(&mut model, cuts, &fit_windows, |d, n| {
            eprint!("\r{e} experts: statistics {d}/{n}   ")
        })?;
        eprintln!("({:.0} s)", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let solved = stats
            .iter()
            .enumerate()
            .map(|(l, s)| {
                eprint!("\r{e} experts: solve layer {l}   ");
                s.solve()
            })
            .collect::<Result<Vec<_>, _>>()?;
        eprintln!("({:.0} s)", t.elapsed().as_secs_f64());
        drop(stats);
        // The fit loss from powers of two up to full rank (one solve gives them all).
        let full = e.min(h);
        let curve_ranks = (3..).map(|p| 1usize << p).take_while(|&r| r < full).chain([full]);
        let curve: Vec<String> = curve_ranks
            .map(|r| Ok(format!("rank {r}: {:.3}", fit_loss_ratio(&fits_at(&solved, r)?))))
            .collect::<Result<_>>()?;
        println!(
            "{e} experts, fit loss / constant loss (mean over layers): {}",
            curve.join(", ")
        );
        let mut ranks: Vec<usize> = a.ranks.iter().map(|&r| r.min(e)).collect();
        ranks.dedup();
        for r in ranks {
            let fits = fits_at(&solved, r)?;
            let ratio = fit_loss_ratio(&fits);
            // One block per layer for this rank (the policy changes per budget, the weights do
            // not), Unit weights: a chosen expert adds exactly its dense output.
            let originals: Vec<Box<dyn FeedForward>> = (0..layers)
                .map(|l| {
                    let f = &fits[l];
                    let mut b = MoeBlock::new(
                        &HostTensor::new(vec![e, h], vec![0.0; e * h]),
                        None,
                        &experts[l],
                        None,
                        Combine {
                            weights: CombineWeights::Unit,
                            scale: 1.0,
                        },
                        Policy::TopK { k: e },
                        &device,
                    )?
                    .with_predictor(&f.down, &f.up, Some(&f.bias))?;
                    // The dense-masked path computes the same function; with small experts it is
                    // the fast one for whole windows.
                    b.set_masked_from(Some(1));
                    Ok(std::mem::replace(
                        &mut model.layers[l].ffn,
                        Box::new(b) as Box<dyn FeedForward>,
                    ))
                })
                .collect::<Result<_>>()?;
            let router = (r * (h + e) + e) as f64;
            for &budget in &a.budgets {
                let k = ((budget * ffn_params - router) / (3 * h * size) as f64).floor();
                if k < 1.0 {
                    eprintln!("{e} experts, rank {r} at {budget}: skipped (the predictor alone exceeds the budget)");
                    continue;
                }
                let k = (k as usize).min(e);
                let t = Instant::now();
                for sel in &a.select {
                    let label = if sel == "share" {
                        let ps = calibrate_share(&mut model, e, k, &p_text, a.seq_len)?;
                        let mean = ps.iter().sum::<f32>() / ps.len() as f32;
                        format!("predicted share p (mean {mean:.3}), mean k {k}")
                    } else {
                        for l in 0..layers {
                            block_mut(&mut model, l).set_policy(Policy::TopK { k })?;
                        }
                        format!("top-{k}")
                    };
                    let mut ppl = Vec::new();
                    let mut share = Vec::new();
                    for (tag, ids) in &held {
                        for l in &model.layers {
                            l.ffn.reset_stats();
                        }
                        let p = ladimo_model::perplexity::perplexity(&model, ids, a.seq_len, |d, n| {
                            eprint!("\r{e} experts, rank {r}, {label} ({budget}): {tag} {d}/{n}   ")
                        })?;
                        let c = model.param_counts();
                        ppl.push((tag.clone(), p.perplexity));
                        share.push(c.ffn_active / (ffn_params * layers as f64));
                    }
                    eprintln!();
                    rows.push(Row {
                        method: "predictor".into(),
                        select: label,
                        budget,
                        experts: e,
                        rank: r,
                        k,
                        fit_loss_ratio: ratio,
                        ppl,
                        ffn_share: share,
                    });
                }
                eprintln!("({:.0} s)", t.elapsed().as_secs_f64());
            }
            for (l, o) in originals.into_iter().enumerate() {
                model.layers[l].ffn = o;
            }
        }
    }
    if a.teal_tokens_per_file > 0 {
        let teal_text = part(a.teal_tokens_per_file, Part::Tail)?;
        let windows = windows(&teal_text, a.seq_len);
        for &budget in &a.budgets {
            let t = Instant::now();
            let r = baseline(
                &mut model,
                SparsityMethod::Teal,
                budget,
                &windows,
                &held,
                a.seq_len,
                None,
                |d, n| eprint!("\rTEAL at {budget}: {d}/{n}   "),
            )?;
            eprintln!("({:.0} s)", t.elapsed().as_secs_f64());
            rows.push(Row {
                method: "TEAL".into(),
                select: String::new(),
                budget,
                experts: inter,
                rank: 0,
                k: 0,
                fit_loss_ratio: f64::NAN,
                ppl: r.langs.iter().map(|l| (l.tag.clone(), l.ppl)).collect(),
                ffn_share: r.langs.iter().map(|l| l.ffn_share).collect(),
            });
        }
    }
    println!(
        "\n{}: predictor fit on {} calibration tokens (heads); held-out {} tokens per language, seq {}\n",
        path.display(),
        fit_windows.iter().map(|w| w.len()).sum::<usize>(),
        a.heldout_tokens,
        a.seq_len
    );
    let tags: Vec<&str> = held.iter().map(|(t, _)| t.as_str()).collect();
    crate::frontier::print_table_head(&["fit loss / constant"], &tags, &dense_ppl);
    rows.sort_by(|x, y| y.budget.total_cmp(&x.budget));
    for r in &rows {
        let ppl: Vec<f64> = r.ppl.iter().map(|(_, p)| *p).collect();
        let c = crate::frontier::table_cells(&ppl, &dense_ppl, &r.ffn_share);
        let name = if r.method == "TEAL" {
            "TEAL".to_string()
        } else {
            format!(
                "predictor, {} experts of {}, rank {}, {}",
                r.experts,
                inter / r.experts,
                r.rank,
                r.select
            )
        };
        let fit = if r.fit_loss_ratio.is_finite() {
            format!("{:.3}", r.fit_loss_ratio)
        } else {
            String::new()
        };
        println!("| {:.1}% | {name} | {fit} |{c}", 100.0 * r.budget);
    }
    let json = serde_json::json!({
        "model": path.display().to_string(),
        "fit_tokens": fit_windows.iter().map(|w| w.len()).sum::<usize>(),
        "heldout_tokens": a.heldout_tokens,
        "seq_len": a.seq_len,
        "dense": tags.iter().zip(&dense_ppl).map(|(t, d)| (t.to_string(), *d)).collect::<std::collections::BTreeMap<_, _>>(),
        "rows": rows,
    });
    ladimo_io::atomic::write_atomic(&a.out, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("\nwrote {} ({:.0} s)", a.out.display(), start.elapsed().as_secs_f64());
    Ok(())
}

/// Every layer's predictor at rank `r`.
fn fits_at(solved: &[Solved], r: usize) -> Result<Vec<PredictorFit>> {
    Ok(solved.iter().map(|s| s.at_rank(r)).collect::<Result<Vec<_>, _>>()?)
}

/// The fit's loss over the constant predictor's, averaged over layers.
fn fit_loss_ratio(fits: &[PredictorFit]) -> f64 {
    fits.iter().map(|f| f.loss / f.constant_loss).sum::<f64>() / fits.len() as f64
}

/// Each layer's top-p on the predictor's softmax (the predicted share of the layer's output norm)
/// such that its mean number of experts on `text` (calibration) is `k`: bisection, all layers at
/// once (a layer's input moves a little with the p of the layers before it). Leaves the blocks on
/// the found policies.
fn calibrate_share(
    model: &mut Transformer,
    experts: usize,
    k: usize,
    text: &[u32],
    seq_len: usize,
) -> Result<Vec<f32>> {
    let layers = model.layers.len();
    let (mut lo, mut hi) = (vec![0f32; layers], vec![1f32; layers]);
    let mut mid = vec![0.5f32; layers];
    for step in 0..10 {
        for l in 0..layers {
            mid[l] = 0.5 * (lo[l] + hi[l]);
            block_mut(model, l).set_policy(Policy::TopP {
                p: mid[l],
                min_k: 1,
                max_k: experts,
            })?;
            model.layers[l].ffn.reset_stats();
        }
        ladimo_model::perplexity::perplexity(model, text, seq_len, |_, _| {})?;
        for l in 0..layers {
            let st = block_mut(model, l).stats();
            let mean_k = st.load.iter().sum::<u64>() as f64 / st.tokens.max(1) as f64;
            if mean_k > k as f64 {
                hi[l] = mid[l]
            } else {
                lo[l] = mid[l]
            }
        }
        eprint!("\rshare p for mean k {k}: step {}/10   ", step + 1);
    }
    for (l, &p) in lo.iter().enumerate() {
        // The lower end keeps the mean k at or under k: the budget is not exceeded on calibration.
        block_mut(model, l).set_policy(Policy::TopP {
            p,
            min_k: 1,
            max_k: experts,
        })?;
        model.layers[l].ffn.reset_stats();
    }
    Ok(lo)
}

fn block_mut(model: &mut Transformer, layer: usize) -> &mut MoeBlock {
    let ffn: &mut dyn std::any::Any = model.layers[layer].ffn.as_mut();
    ffn.downcast_mut::<MoeBlock>()
        .expect("the predictor rows install MoE blocks")
}

/// Each text cut into windows of `seq_len` tokens (a last window of one token is dropped: it
/// predicts nothing).
fn windows(texts: &[Vec<u32>], seq_len: usize) -> Vec<&[u32]> {
    texts
        .iter()
        .flat_map(|t| t.chunks(seq_len))
        .filter(|w| w.len() > 1)
        .collect()
}
