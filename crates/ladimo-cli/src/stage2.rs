//! `ladimo profile` and `ladimo solve`: LaDiMo stage 2 from the command line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use ladimo_convert::evaluate::write_json;
use ladimo_data::{Part, take_tokens};
use ladimo_model::perplexity::perplexity;
use ladimo_profile::{
    Budget, Cost, Profile, ProfileConfig, SensitivityContext, add_sensitivity, predict_ppl_ratio, profile_model,
    solve_profile, uniform_cost, write_plots,
};

use crate::{load, open};

#[derive(Args)]
pub struct ProfileArgs {
    /// The MoE checkpoint (stage-1 output).
    pub model: String,
    /// The dense model it was made from (the teacher whose FFN outputs are the reference).
    #[arg(long)]
    pub dense: String,
    /// Calibration text as TAG=FILE (.txt or .jsonl), repeatable; the tag names the language.
    /// Default: the fetched calibration sets, en=Austen novels, ko=LibreOffice help.
    #[arg(long = "text", value_parser = parse_tagged)]
    pub texts: Vec<(String, Vec<PathBuf>)>,
    /// What to profile and how (the same settings as a convert config's `[stage2]`).
    #[command(flatten)]
    pub settings: ProfileConfig,
    /// Only measure the layer sensitivity and add it to the existing OUT/profile.json (rewritten
    /// in place, atomically), keeping everything else in it.
    #[arg(long)]
    pub sensitivity_only: bool,
    /// Output folder: profile.json and plots/.
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_tagged(s: &str) -> Result<(String, Vec<PathBuf>), String> {
    let (tag, file) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected TAG=FILE"))?;
    if tag.is_empty() || tag == "all" {
        return Err(format!("`{s}`: the tag must be a non-empty name other than `all`"));
    }
    Ok((tag.to_string(), vec![PathBuf::from(file)]))
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    let start = Instant::now();
    let ckpt = open(&a.model)?;
    let dense_ckpt = open(&a.dense)?;
    let tok = dense_ckpt.tokenizer()?;
    let mut texts = a.texts.clone();
    if texts.is_empty() {
        let data = ladimo_data::fetch_data()?;
        texts = vec![
            ("en".into(), data.calibration_en.clone()),
            ("ko".into(), vec![data.calibration_ko.clone()]),
        ];
    }
    let mut tagged = Vec::new();
    for (tag, files) in &texts {
        let ids = take_tokens(tok, files, a.settings.tokens, Part::Tail)
            .with_context(|| format!("calibration text `{tag}`"))?;
        tagged.push((tag.clone(), ids));
    }
    let mut moe = load(&ckpt, None, None)?;
    let dense = load(&dense_ckpt, None, None)?;
    let cfg = &a.settings;
    let show = |stage: &str, d: usize, t: usize| {
        eprint!("\r{stage}: {d}/{t}      ");
        if d == t {
            eprintln!();
        }
    };
    let p = a.out.join("profile.json");
    let profile = if a.sensitivity_only {
        let mut profile = Profile::read(&p)?;
        add_sensitivity(&mut profile, &mut moe, &dense, &tagged, cfg, show)?;
        profile
    } else {
        let mut profile = profile_model(&mut moe, &dense, &tagged, cfg, &a.model, show)?;
        profile.backend = ladimo_backend::name().to_string();
        std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
        profile
    };
    profile.write(&p)?;
    let plots = write_plots(&profile, &a.out.join("plots"), None)?;
    print_profile(&profile);
    println!(
        "wrote {} and {} plots in {:.0} s",
        p.display(),
        plots.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_profile(p: &Profile) {
    println!(
        "{:>5} {:>8} {:>8} {:>8} | rel MSE at top-k, k = 1..N",
        "layer", "top1", "entropy", "ln N"
    );
    for l in &p.layers {
        let d = &l.routing["all"];
        let topk: Vec<String> = l
            .candidates
            .iter()
            .filter(|c| matches!(c.policy, ladimo_moe::Policy::TopK { .. }) && c.is_plain())
            .map(|c| format!("{:.3}", c.rel_mse))
            .collect();
        println!(
            "{:>5} {:>8.3} {:>8.3} {:>8.3} | {}",
            l.layer,
            d.cum_topk_mean.first().copied().unwrap_or(0.0),
            d.entropy_mean,
            (l.num_experts as f64).ln(),
            topk.join(" ")
        );
    }
    println!("calibration ppl: dense {:.3}", p.dense_ppl);
    for u in &p.uniform {
        println!(
            "  uniform {}: ppl {:.3} (sum rel MSE {:.3}, sum resid MSE {:.4})",
            u.policy, u.ppl, u.sum_rel_mse, u.sum_resid_mse
        );
    }
    if let Some(s) = &p.sensitivity {
        println!(
            "layer sensitivity on {:?} tokens ({:.0} s): calibration ln-PPL change with one layer probed, \
             the rest {}; weight = fitted ln-PPL per unit rel MSE",
            s.tokens,
            s.seconds,
            match s.context {
                SensitivityContext::Dense => "dense".to_string(),
                SensitivityContext::Moe => format!(
                    "the MoE under its own policies (itself ppl x{:.3} of dense)",
                    s.context_offset().exp()
                ),
            }
        );
        for l in &s.layers {
            let probes: Vec<String> = l
                .probes
                .iter()
                .map(|q| {
                    let kl = q.kl.map(|kl| format!(" KL {kl:.4}")).unwrap_or_default();
                    format!("{} {:+.4}{kl} (rel {:.3})", q.policy, q.delta_ln_ppl, q.rel_mse)
                })
                .collect();
            println!("{:>5} w {:>7.4} | {}", l.layer, l.weight, probes.join("  "));
        }
        let cost = Cost::default_for(p);
        for u in &p.uniform {
            if let Some((c, _)) = uniform_cost(p, &u.policy, cost) {
                println!(
                    "  uniform {}: summed {cost:?} predicts ppl x{:.3} of dense; measured x{:.3}",
                    u.policy,
                    predict_ppl_ratio(p, cost, c),
                    u.ppl / p.dense_ppl
                );
            }
        }
    }
}

#[derive(Args)]
pub struct SolveArgs {
    /// profile.json from `ladimo profile`.
    pub profile: PathBuf,
    /// The budget: --budget FRACTION of the dense value or --max VALUE, of --of.
    #[command(flatten)]
    pub budget: Budget,
    /// The per-layer cost to minimise: sensitivity-kl (the sensitivity probes' KL to the dense
    /// model, interpolated by experts run; the default when the profile has it), sensitivity
    /// (the probes' measured ln-PPL changes; the default for probes without KL),
    /// sensitivity-linear (fitted weight x rel MSE), rel-mse (error relative to the FFN output;
    /// the default otherwise) or
    /// resid-mse (relative to the residual stream).
    #[arg(long, value_enum)]
    pub cost: Option<Cost>,
    /// The policy file to write (TOML).
    #[arg(long)]
    pub out: PathBuf,
    /// Check the prediction: the MoE model and held-out text to measure perplexity on.
    #[arg(long, requires = "check_text")]
    pub check_model: Option<String>,
    #[arg(long, requires = "check_dense")]
    pub check_text: Option<PathBuf>,
    /// The dense model, for the held-out dense perplexity the prediction scales.
    #[arg(long)]
    pub check_dense: Option<String>,
    #[arg(long, default_value_t = 16_384)]
    pub check_tokens: usize,
}

pub fn solve(a: SolveArgs) -> Result<()> {
    let profile = Profile::read(&a.profile)?;
    if a.budget.fraction.is_none() && a.budget.absolute.is_none() {
        bail!("give a budget: --budget FRACTION or --max VALUE");
    }
    let cost = a.cost.unwrap_or_else(|| Cost::default_for(&profile));
    let s = solve_profile(&profile, &a.budget, cost)?;
    s.policies.write(&a.out)?;
    let sidecar = a.out.with_extension("solve.json");
    write_json(&sidecar, &s)?;
    if let Some(dir) = a.profile.parent() {
        write_plots(&profile, &dir.join("plots"), Some(&s))?;
    }
    println!(
        "budget {:.4e} {} ({:.1}% of dense); chosen policies use {:.4e} ({:.1}%)",
        s.budget_value,
        s.unit,
        100.0 * s.budget_value / s.dense_value,
        s.used,
        100.0 * s.used / s.dense_value
    );
    println!(
        "predicted: summed {:?} {:.4}, perplexity x{:.3} of dense, {:.0} activated parameters per token (FFN {:.0})",
        cost, s.cost, s.predicted_ppl_ratio, s.predicted_params, s.predicted_ffn_params
    );
    if let Some((experts, thresholds)) = s.ffn_saving_split() {
        println!(
            "FFN saving per token: {experts:.0} by experts not read, {thresholds:.0} by TEAL thresholds inside the experts that run (of {:.0} dense)",
            s.dense_ffn_params
        );
    }
    for lp in &s.policies.layers {
        print!("L{}: {lp}  ", lp.layer);
    }
    println!("\nwrote {} and {}", a.out.display(), sidecar.display());
    if let (Some(m), Some(text), Some(dense)) = (&a.check_model, &a.check_text, &a.check_dense) {
        check(&s, m, dense, text, a.check_tokens, &a.out)?;
    }
    Ok(())
}

fn check(s: &ladimo_profile::Solved, model: &str, dense: &str, text: &Path, n: usize, policy: &Path) -> Result<()> {
    let ckpt = open(model)?;
    let ids = take_tokens(ckpt.tokenizer()?, &[text.to_path_buf()], n, Part::Head)?;
    let dense_model = load(&open(dense)?, None, None)?;
    let d = perplexity(&dense_model, &ids, 512, |_, _| {})?.perplexity;
    drop(dense_model);
    let m = load(&ckpt, Some(policy), None)?;
    let r = perplexity(&m, &ids, 512, |_, _| {})?.perplexity;
    let c = m.param_counts();
    println!(
        "check on {} ({n} tokens): dense ppl {d:.3}; predicted {:.3}, measured {r:.3} ({:+.1}% vs dense); \
         activated parameters predicted {:.0}, measured {:.0} (FFN {:.0})",
        text.display(),
        d * s.predicted_ppl_ratio,
        100.0 * (r / d - 1.0),
        s.predicted_params,
        c.active(),
        c.ffn_active
    );
    Ok(())
}
