//! Stage 2 of the pipeline: profile the stage-1 model's routers and candidate policies on
//! calibration text (the tail of the files, away from what stage 1 trained on), measure each
//! layer's sensitivity, and solve for one policy per layer within the budget
//! ([`ladimo_profile`]).

use std::path::Path;

use anyhow::{Context, Result, bail};
use ladimo_data::{Part, take_tokens};
use ladimo_distill::finetune::FinetuneReport;
use ladimo_distill::run_dir::finished_finetune;
use ladimo_model::Transformer;
use ladimo_profile::{Budget, Profile, ProfileConfig, Solved, profile_model, solve_profile};

use crate::config::ConvertConfig;
use crate::pipeline::{Compute, Inputs};
use crate::progress::Tracker;
use crate::report::StageTime;
use crate::stage1::{Stage1, polish_blocks};
use crate::step::{Step, ids_bytes, step_key};

/// What stage 2 measured: [`profile`]'s result.
pub(crate) struct Profiled {
    /// The key of the profile (with the sensitivity, when measured).
    pub key: String,
    /// The stage-2 calibration tokens per tag (the training-free baselines calibrate on them too).
    pub texts: Vec<(String, Vec<u32>)>,
    pub profile: Profile,
}

/// What stage 2 made: the profile and the policies solved from it.
pub(crate) struct Stage2 {
    /// What the evaluation's key starts from (with the policy file's text).
    pub key: String,
    pub texts: Vec<(String, Vec<u32>)>,
    pub profile: Profile,
    pub solved: Solved,
    /// The polish under the chosen policies, when it ran, and whether its blocks were kept.
    pub polish: Option<(FinetuneReport, bool)>,
}

/// Profile `moe` against the dense model into work/stage2/profile.json, then, as a step of its
/// own (so that changing its settings keeps the profile), the layer sensitivity.
pub(crate) fn profile(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    s1: &Stage1,
    moe: &mut Transformer,
    work: &Path,
    times: &mut Vec<StageTime>,
    on: &Compute,
) -> Result<Profiled> {
    let s2cfg = &cfg.stage2;
    let mut texts = Vec::new();
    for set in &inputs.cal_sets {
        let ids = take_tokens(inputs.tokenizer()?, &set.files, s2cfg.profile.tokens, Part::Tail)
            .with_context(|| format!("calibration set `{}` for stage 2 (stage2.tokens)", set.tag))?;
        texts.push((set.tag.clone(), ids));
    }
    let text_parts: Vec<Vec<u8>> = texts
        .iter()
        .map(|(tag, ids)| [tag.as_bytes(), &ids_bytes(ids)].concat())
        .collect();
    // Latencies are timed only for a latency budget (the default profile: 139 s instead of 308 s);
    // the key is of the settings the profile runs with, so it says whether they were.
    let mut run_cfg = s2cfg.clone();
    if s2cfg.budget.kind != ladimo_profile::BudgetKind::Latency {
        run_cfg.profile.latency_repeats = 0;
    }
    let parts: Vec<&[u8]> = std::iter::once(s1.key.as_bytes())
        .chain(text_parts.iter().map(Vec::as_slice))
        .collect();
    let step = Step::new(
        work.join("stage2"),
        "stage 2: profile",
        step_key("profile", &parts, &run_cfg)?,
    );
    let profile_path = step.dir.join("profile.json");
    let mut profile = step.run(
        times,
        |_| Ok(Some(Profile::read(&profile_path)?)),
        |_, _| {
            // The sensitivity is measured as a step of its own below.
            let pcfg = ProfileConfig {
                sensitivity_k: Some(vec![]),
                ..run_cfg.profile.clone()
            };
            let mut pb: Option<(String, Box<dyn Tracker + '_>)> = None;
            let mut p = profile_model(moe, &inputs.dense, &texts, &pcfg, &cfg.model, |stage, d, total| {
                crate::pause::pause_point("stage2-profile");
                if pb.as_ref().is_none_or(|(s, _)| s != stage) {
                    if let Some((_, b)) = pb.take() {
                        b.finish();
                    }
                    pb = Some((
                        stage.to_string(),
                        on.progress.start(total, &format!("2/4 stage 2: {stage}")),
                    ));
                }
                if let Some((_, b)) = &pb {
                    b.set_position(d);
                }
            })?;
            if let Some((_, b)) = pb {
                b.finish();
            }
            p.backend = on.backend.to_string();
            p.write(&profile_path)?;
            Ok(p)
        },
    )?;
    let mut key = step.key.clone();
    if s2cfg.profile.measures_sensitivity() {
        let sens = Step::new(
            step.dir.join("sensitivity"),
            "stage 2: layer sensitivity",
            // "kl": probes measured before they recorded their KL are measured again.
            step_key("sensitivity", &[step.key.as_bytes(), b"kl"], s2cfg)?,
        );
        // A profile made again (its step was cut short) has lost the sensitivity.
        let have = profile.sensitivity.is_some();
        sens.run(
            times,
            |_| Ok(have.then_some(())),
            |_, _| {
                let mut pb: Option<Box<dyn Tracker + '_>> = None;
                ladimo_profile::add_sensitivity(
                    &mut profile,
                    moe,
                    &inputs.dense,
                    &texts,
                    &s2cfg.profile,
                    |_, d, total| {
                        let b = pb.get_or_insert_with(|| on.progress.start(total, "2/4 stage 2: sensitivity"));
                        b.set_position(d);
                    },
                )?;
                if let Some(b) = pb {
                    b.finish();
                }
                profile.write(&profile_path)?;
                Ok(())
            },
        )?;
        key = sens.key;
    }
    Ok(Profiled { key, texts, profile })
}

/// Solve for one policy per layer within `stage2.budget` (or take `stage2.fixed_policy`), write
/// work/stage2/policy.toml and apply it to `moe`.
pub(crate) fn solve(cfg: &ConvertConfig, p: Profiled, moe: &mut Transformer, work: &Path) -> Result<Stage2> {
    let s2cfg = &cfg.stage2;
    let budget = s2cfg.budget;
    let solved = match &s2cfg.fixed_policy {
        None => solve_profile(&p.profile, &budget, s2cfg.cost)
            .context("stage 2: solving for the budget in stage2.budget")?,
        Some(policy) => fixed(&p.profile, policy, &budget, s2cfg.cost)?,
    };
    let policy_path = work.join("stage2").join("policy.toml");
    solved.policies.write(&policy_path)?;
    solved.policies.apply(moe, &policy_path)?;
    Ok(Stage2 {
        key: p.key,
        texts: p.texts,
        profile: p.profile,
        solved,
        polish: None,
    })
}

/// When `stage2.polish.epochs > 0`: polish every block end to end under the policies (and TEAL
/// thresholds) `s2` chose, on stage 1's calibration windows, into work/stage2-polish. The
/// polished blocks replace those in `moe` (under the same policies) only when the held-back KL
/// fell; the thresholds stay as solved.
#[allow(clippy::too_many_arguments)]
pub(crate) fn polish(
    cfg: &ConvertConfig,
    inputs: &Inputs,
    s1: &Stage1,
    s2: Stage2,
    moe: &mut Transformer,
    work: &Path,
    times: &mut Vec<StageTime>,
    on: &Compute,
) -> Result<Stage2> {
    let pcfg = &cfg.stage2.polish;
    if pcfg.epochs == 0 {
        return Ok(s2);
    }
    let under = &s2.solved.policies.layers;
    let policy_text = toml::to_string(&s2.solved.policies).context("stage 2: the policy file")?;
    let key = step_key("stage2-polish", &[s2.key.as_bytes(), policy_text.as_bytes()], pcfg)?;
    let step = Step::new(work.join("stage2-polish"), "stage 2: polish under the policies", key);
    let report = step.run(
        times,
        |dir| Ok(finished_finetune(dir)),
        |dir, _| polish_blocks(cfg, inputs, &s1.blocks, dir, pcfg, under, "2/4 stage 2: polish", on),
    )?;
    let kept = report.val_kl < report.val_kl_init;
    tracing::info!(
        "stage 2 polish: held-back KL {:.4} -> {:.4} nats/token in {:.0} s; {}",
        report.val_kl_init,
        report.val_kl,
        report.seconds,
        if kept {
            "polished blocks kept"
        } else {
            "stage-1 blocks kept (the KL did not fall)"
        }
    );
    if kept {
        *moe = crate::stage1::load_model(inputs, &step.dir, &cfg.stage1.train, on.device)?;
        let policy_path = work.join("stage2").join("policy.toml");
        s2.solved.policies.apply(moe, &policy_path)?;
    }
    Ok(Stage2 {
        key: step.key.clone(),
        polish: Some((report, kept)),
        ..s2
    })
}

/// `policy` on every profiled layer, reported like a solver answer (the frontier is the solver's
/// for the configured budget, when that budget is feasible).
fn fixed(
    profile: &Profile,
    policy: &ladimo_moe::Policy,
    budget: &Budget,
    cost: ladimo_profile::Cost,
) -> Result<Solved> {
    let mut solved = match solve_profile(profile, budget, cost) {
        Ok(s) => s,
        Err(_) => solve_profile(
            profile,
            &Budget {
                fraction: Some(1.0),
                absolute: None,
                ..*budget
            },
            cost,
        )?,
    };
    let Some((c, params)) = ladimo_profile::uniform_cost(profile, policy, cost) else {
        bail!("stage2.fixed_policy {policy} is not among the profiled candidates of every layer");
    };
    let ffn = params - profile.non_ffn_params;
    solved.used = match budget.kind {
        ladimo_profile::BudgetKind::FfnParams => ffn,
        ladimo_profile::BudgetKind::Params => params,
        ladimo_profile::BudgetKind::Latency => f64::NAN,
    };
    solved.predicted_ppl_ratio = profile
        .uniform
        .iter()
        .find(|u| &u.policy == policy)
        .map(|u| u.ppl / profile.dense_ppl)
        .unwrap_or(f64::NAN);
    solved.cost = c;
    solved.predicted_params = params;
    solved.predicted_ffn_params = ffn;
    solved.predicted_threshold_saved = 0.0;
    solved.policies.note = format!("fixed policy {policy} on every layer (stage2.fixed_policy)");
    for l in &mut solved.policies.layers {
        l.policy = Some(policy.clone());
        l.sparsity = None;
    }
    Ok(solved)
}
