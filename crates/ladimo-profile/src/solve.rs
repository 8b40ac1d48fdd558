//! From a profile and a budget to one policy per layer (exact, via ladimo-solve), a policy file,
//! the Pareto frontier, and a perplexity prediction.

use ladimo_moe::policy_file::LayerPolicy;
use ladimo_moe::{Policy, PolicyFile};
use ladimo_solve::Choice;
use serde::{Deserialize, Serialize};

use crate::{CandidateCost, LayerSensitivity, Profile, ProfileError, SensitivityContext, SensitivityProbe};

/// What the budget limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetKind {
    /// Activated FFN parameters per token (router + shared + routed experts that run).
    FfnParams,
    /// Activated parameters per token, whole model (the non-FFN part is fixed).
    Params,
    /// Measured FFN time per token (the attention and the rest are not counted).
    Latency,
}

/// A budget: a fraction of the dense model's value of `of`, or an absolute value (`max`). The
/// one definition: the convert config's `[stage2.budget]` (serde) and `ladimo solve`'s flags
/// (clap) are this struct.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Budget {
    /// What the budget limits: ffn-params (activated FFN parameters per token), params (whole
    /// model) or latency (measured FFN seconds per token).
    #[serde(rename = "of", alias = "kind")]
    #[arg(long = "of", value_enum, default_value_t = Budget::default().kind)]
    pub kind: BudgetKind,
    /// The budget as a fraction of the dense model's value (e.g. 0.75).
    #[arg(long = "budget", conflicts_with = "absolute")]
    pub fraction: Option<f64>,
    /// The budget as an absolute value (parameters per token, or FFN seconds per token for
    /// latency).
    #[serde(rename = "max", alias = "absolute")]
    #[arg(long = "max")]
    pub absolute: Option<f64>,
}

impl Default for Budget {
    /// 75% of the dense model's activated FFN parameters.
    fn default() -> Self {
        Self {
            kind: BudgetKind::FfnParams,
            fraction: Some(0.75),
            absolute: None,
        }
    }
}

impl Budget {
    /// Exactly one of `fraction` (in (0, 1]) and `max` (> 0); the message names the field.
    pub fn check(&self) -> Result<(), String> {
        match (self.fraction, self.absolute) {
            (Some(_), Some(_)) => Err("give `fraction` or `max`, not both".into()),
            (None, None) => Err("give `fraction` or `max`".into()),
            (Some(f), None) if !(f > 0.0 && f <= 1.0) => Err(format!("fraction = {f}: expected 0 < f <= 1")),
            (None, Some(m)) if m.is_nan() || m <= 0.0 => Err(format!("max = {m}: expected > 0")),
            _ => Ok(()),
        }
    }
}

/// Which per-layer quality cost the solver minimises (summed over layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Cost {
    /// Squared error relative to the dense FFN output.
    RelMse,
    /// Squared error relative to the residual stream after the layer.
    ResidMse,
    /// Predicted calibration ln-PPL change: the layer's measured end-to-end sensitivity probes
    /// (`Profile::sensitivity`) interpolated by the mean number of experts run (see
    /// `by_experts`). Rel MSE does not order a layer's policies reliably (a block trained at
    /// top-6 can be further from the dense FFN at top-7 yet better end to end), experts run do.
    Sensitivity,
    /// Predicted calibration ln-PPL change `w_l * rel_mse`, `w_l` the layer's least-squares
    /// sensitivity weight (`LayerSensitivity::weight`).
    SensitivityLinear,
    /// As `Sensitivity`, with each probe's KL from the dense model's next-token distribution
    /// (`SensitivityProbe::kl`) in place of its measured ln-PPL change, and for thresholds the
    /// least-squares KL per unit of relative MSE over the probes. The KL is never negative and
    /// has far less variance on the same tokens than a difference of two perplexities (which,
    /// on 2,048 tokens, is noise for SmolLM2's middle layers). Needs the dense context.
    SensitivityKl,
}

/// Which of a probe's measurements a sensitivity cost interpolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    LnPpl,
    Kl,
}

impl Measure {
    fn of(self, p: &SensitivityProbe) -> f64 {
        match self {
            Measure::LnPpl => p.delta_ln_ppl,
            Measure::Kl => p.kl.unwrap_or(f64::NAN),
        }
    }

    /// The layer's cost per unit of relative MSE: least squares through the origin over its
    /// probes (`LayerSensitivity::weight` for ln-PPL).
    fn weight(self, s: &LayerSensitivity) -> f64 {
        match self {
            Measure::LnPpl => s.weight,
            Measure::Kl => crate::weight_of(&s.probes, |p| self.of(p)),
        }
    }
}

impl Cost {
    /// Whether the summed cost is itself a predicted ln(ppl / dense ppl).
    pub fn is_ln_ppl(&self) -> bool {
        matches!(self, Cost::Sensitivity | Cost::SensitivityLinear | Cost::SensitivityKl)
    }

    /// The default for a profile: `SensitivityKl` where its sensitivity probes have their KL,
    /// `Sensitivity` where they have none (the MoE context, or an older profile), else `RelMse`.
    pub fn default_for(profile: &Profile) -> Cost {
        match &profile.sensitivity {
            Some(s) if s.layers.iter().all(|l| l.probes.iter().all(|p| p.kl.is_some())) => Cost::SensitivityKl,
            Some(_) => Cost::Sensitivity,
            None => Cost::RelMse,
        }
    }

    /// The cost of every candidate of every profiled layer, in `profile.layers` order.
    pub fn table(&self, profile: &Profile) -> Result<Vec<Vec<f64>>, ProfileError> {
        profile
            .layers
            .iter()
            .map(|l| match self {
                Cost::RelMse => Ok(l.candidates.iter().map(|c| c.rel_mse).collect()),
                Cost::ResidMse => Ok(l.candidates.iter().map(|c| c.resid_mse).collect()),
                Cost::Sensitivity | Cost::SensitivityLinear | Cost::SensitivityKl => {
                    let s = profile
                        .sensitivity
                        .as_ref()
                        .and_then(|s| s.layers.iter().find(|s| s.layer == l.layer))
                        .ok_or_else(|| {
                            ProfileError::Invalid(format!(
                                "the profile has no sensitivity data for layer {} (add it with \
                                 `ladimo profile ... --sensitivity-only`)",
                                l.layer
                            ))
                        })?;
                    if *self == Cost::SensitivityKl && s.probes.iter().any(|p| p.kl.is_none()) {
                        return Err(ProfileError::Invalid(format!(
                            "cost sensitivity-kl: the sensitivity probes of layer {} have no KL (measured with \
                             sensitivity_context = \"moe\", or by an older ladimo); measure the sensitivity again \
                             with the dense context",
                            l.layer
                        )));
                    }
                    Ok(l.candidates
                        .iter()
                        .map(|c| match self {
                            Cost::SensitivityLinear => s.weight * c.rel_mse,
                            Cost::SensitivityKl => sensitivity_cost(s, &l.candidates, c, 0.0, Measure::Kl),
                            _ => sensitivity_cost(s, &l.candidates, c, lift(profile, s), Measure::LnPpl),
                        })
                        .collect())
                }
            })
            .collect()
    }
}

/// The sensitivity probes of a layer as a function of the mean number of experts run, evaluated
/// at candidate `c`: piecewise linear between the probes, made non-increasing in experts (more
/// experts never hurt; a measured rise is noise) and non-negative. Outside the probes the delta
/// follows the layer's own error: below the fewest experts probed, that probe's delta scaled up by
/// the candidate's rel MSE relative to the probe's (never below the probe's delta); above the most,
/// scaled down the same way (never above it), so a policy that runs every expert of a block that
/// sums back to its FFN costs about nothing.
///
/// With the MoE as context the deltas are measured from the MoE's own perplexity, so policies
/// above the operating point have negative deltas; `lift` (see [`lift`]) raises the layer's curve
/// so that its lowest probe is 0, which keeps that shape (a constant per layer does not change
/// which policies the solver picks) and is added back in the prediction (`ppl_intercept`).
/// The `Sensitivity` cost of candidate `c` among a layer's `candidates`. The probes vary the
/// routing only, so a candidate with thresholds costs its routing's interpolated ln-PPL
/// ([`by_experts`] on the candidate with the same policy and no thresholds) plus the layer's
/// ln-PPL per unit of relative MSE (`s.weight`) times the error the thresholds add.
/// `m` picks what the probes measured (ln-PPL change, or KL for `Cost::SensitivityKl`).
fn sensitivity_cost(
    s: &LayerSensitivity,
    candidates: &[CandidateCost],
    c: &CandidateCost,
    lift: f64,
    m: Measure,
) -> f64 {
    let plain = c
        .sparsity
        .as_ref()
        .and_then(|_| candidates.iter().find(|p| p.policy == c.policy && p.is_plain()));
    match plain {
        Some(p) => by_experts(s, p, lift, m) + m.weight(s) * (c.rel_mse - p.rel_mse).max(0.0),
        None => by_experts(s, c, lift, m),
    }
}

fn by_experts(s: &LayerSensitivity, c: &CandidateCost, lift: f64, m: Measure) -> f64 {
    let mut pts: Vec<(f64, f64, f64)> = s
        .probes
        .iter()
        .filter(|p| p.mean_experts.is_finite() && m.of(p).is_finite())
        .map(|p| (p.mean_experts, (m.of(p) + lift).max(0.0), p.rel_mse))
        .collect();
    if pts.is_empty() {
        return 0.0;
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    for i in (0..pts.len() - 1).rev() {
        pts[i].1 = pts[i].1.max(pts[i + 1].1);
    }
    let e = c.mean_experts;
    let (lo, hi) = (pts[0], pts[pts.len() - 1]);
    if e >= hi.0 {
        let scale = if hi.2 > 0.0 { (c.rel_mse / hi.2).min(1.0) } else { 1.0 };
        return hi.1 * scale;
    }
    if e <= lo.0 {
        let scale = if lo.2 > 0.0 { (c.rel_mse / lo.2).max(1.0) } else { 1.0 };
        return lo.1 * scale;
    }
    let w = pts.windows(2).find(|w| e <= w[1].0).expect("e within the probes");
    let ((x0, y0, _), (x1, y1, _)) = (w[0], w[1]);
    if x1 > x0 {
        y0 + (y1 - y0) * (e - x0) / (x1 - x0)
    } else {
        y1
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontierEntry {
    /// Budget units (see [`Solved::unit`]), whole-model value for `Params`.
    pub budget: f64,
    pub fraction_of_dense: f64,
    pub cost: f64,
    pub predicted_ppl_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Solved {
    pub policies: PolicyFile,
    pub budget: Budget,
    pub cost_kind: Cost,
    pub unit: String,
    /// The budget in units, and what the chosen policies use (as predicted by the profile).
    pub budget_value: f64,
    pub used: f64,
    pub dense_value: f64,
    pub cost: f64,
    /// Predicted perplexity / dense perplexity (from the uniform top-k calibration points).
    pub predicted_ppl_ratio: f64,
    /// Predicted activated parameters per token (whole model and FFN).
    pub predicted_params: f64,
    pub predicted_ffn_params: f64,
    /// Of the FFN saving (dense FFN parameters minus `predicted_ffn_params`), the part TEAL
    /// thresholds inside the experts make (per token; the rest is experts not read). 0 when no
    /// layer takes thresholds.
    #[serde(default)]
    pub predicted_threshold_saved: f64,
    /// The dense FFN parameters per token over the profiled layers (what the saving is from).
    #[serde(default)]
    pub dense_ffn_params: f64,
    pub frontier: Vec<FrontierEntry>,
}

/// ln(ppl / dense ppl) = slope * summed cost (+ `ppl_intercept`): 1 for a cost in ln-PPL units, else fitted through
/// the origin on the uniform points.
fn ppl_slope(profile: &Profile, cost: Cost) -> f64 {
    if cost.is_ln_ppl() {
        return 1.0;
    }
    ppl_slope_fitted(profile, cost)
}

/// How far a layer's sensitivity curve is raised (`by_experts`): 0 with the dense context (a
/// probe there cannot beat dense; a negative delta is noise and reads as 0); with the MoE
/// context, minus its most negative probe.
fn lift(profile: &Profile, s: &LayerSensitivity) -> f64 {
    match profile.sensitivity.as_ref().map(|x| x.context) {
        Some(SensitivityContext::Moe) => s
            .probes
            .iter()
            .map(|p| p.delta_ln_ppl)
            .filter(|d| d.is_finite())
            .fold(0.0, |m: f64, d| m.max(-d)),
        _ => 0.0,
    }
}

/// ln(ppl / dense ppl) at summed cost 0: 0 when the probes ran with every other layer dense, or
/// for costs fitted through the origin; with the MoE as context, the MoE's own ln-PPL excess
/// minus the lifts `Cost::Sensitivity` added to each layer's curve.
fn ppl_intercept(profile: &Profile, cost: Cost) -> f64 {
    match (cost, &profile.sensitivity) {
        (Cost::Sensitivity, Some(s)) => {
            s.context_offset()
                - profile
                    .layers
                    .iter()
                    .filter_map(|l| s.layers.iter().find(|x| x.layer == l.layer))
                    .map(|x| lift(profile, x))
                    .sum::<f64>()
        }
        (Cost::SensitivityLinear, Some(s)) => s.context_offset(),
        _ => 0.0,
    }
}

/// Predicted perplexity / dense perplexity of policies whose summed `cost` is `summed`.
pub fn predict_ppl_ratio(profile: &Profile, cost: Cost, summed: f64) -> f64 {
    (ppl_slope(profile, cost) * summed + ppl_intercept(profile, cost)).exp()
}

fn ppl_slope_fitted(profile: &Profile, cost: Cost) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for u in &profile.uniform {
        let c = match cost {
            Cost::ResidMse => u.sum_resid_mse,
            _ => u.sum_rel_mse,
        };
        let r = (u.ppl / profile.dense_ppl).ln();
        if c.is_finite() && r.is_finite() {
            num += c * r;
            den += c * c;
        }
    }
    if den > 0.0 { num / den } else { f64::NAN }
}

/// Pick one candidate per profiled layer minimising the summed `cost` within `budget`.
pub fn solve_profile(profile: &Profile, budget: &Budget, cost: Cost) -> Result<Solved, ProfileError> {
    if budget.kind == BudgetKind::Latency && !profile.latency_measured {
        return Err(ProfileError::Invalid(
            "a latency budget needs measured latencies, and this profile has none (it was made \
             with latency_repeats = 0, which `convert` uses unless stage2.budget.of = \"latency\"); \
             profile again with latency_repeats > 0"
                .into(),
        ));
    }
    let weight = |c: &CandidateCost| match budget.kind {
        BudgetKind::FfnParams | BudgetKind::Params => c.active_params,
        BudgetKind::Latency => c.seconds_per_token,
    };
    // The fixed part a whole-model budget carries beside the FFNs.
    let (offset, dense_value, unit) = match budget.kind {
        BudgetKind::FfnParams => (0.0, profile.dense_ffn_params(), "FFN parameters per token"),
        BudgetKind::Params => (
            profile.non_ffn_params,
            profile.non_ffn_params + profile.dense_ffn_params(),
            "parameters per token",
        ),
        BudgetKind::Latency => (0.0, profile.dense_ffn_seconds(), "FFN seconds per token"),
    };
    let budget_value = match (budget.fraction, budget.absolute) {
        (Some(f), None) if f > 0.0 && f.is_finite() => f * dense_value,
        (None, Some(a)) if a > 0.0 && a.is_finite() => a,
        _ => {
            return Err(ProfileError::Invalid(format!(
                "a budget needs exactly one positive fraction or absolute value, got {budget:?}"
            )));
        }
    };
    let table = cost.table(profile)?;
    let groups: Vec<Vec<Choice>> = profile
        .layers
        .iter()
        .zip(&table)
        .map(|(l, costs)| {
            l.candidates
                .iter()
                .zip(costs)
                .map(|(c, &cost)| Choice {
                    cost,
                    weight: weight(c),
                })
                .collect()
        })
        .collect();
    // The whole Pareto frontier (needed for the report anyway); the optimum for the budget is its
    // cheapest point that fits, which is exactly what `ladimo_solve::solve` would return.
    let front = ladimo_solve::frontier(&groups)?;
    let limit = budget_value - offset;
    let Some(sol) = front
        .iter()
        .rev()
        .find(|p| p.weight <= limit + ladimo_solve::BUDGET_REL_TOL * limit.abs())
    else {
        let min = front.first().map(|p| p.weight).unwrap_or(0.0) + offset;
        return Err(ProfileError::Invalid(format!(
            "budget {budget_value:.4e} {unit} ({:.1}% of dense) is below the cheapest choice of policies, \
             {min:.4e} ({:.1}% of dense)",
            100.0 * budget_value / dense_value,
            100.0 * min / dense_value
        )));
    };
    let (slope, intercept) = (ppl_slope(profile, cost), ppl_intercept(profile, cost));
    let chosen: Vec<&CandidateCost> = profile
        .layers
        .iter()
        .zip(&sol.picks)
        .map(|(l, &i)| &l.candidates[i])
        .collect();
    let ffn: f64 = chosen.iter().map(|c| c.active_params).sum();
    // The frontier, thinned to at most ~200 points for the JSON and the plot.
    let step = front.len().div_ceil(200).max(1);
    let frontier = front
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == front.len())
        .map(|(_, p)| FrontierEntry {
            budget: p.weight + offset,
            fraction_of_dense: (p.weight + offset) / dense_value,
            cost: p.cost,
            predicted_ppl_ratio: (slope * p.cost + intercept).exp(),
        })
        .collect();
    let policies = PolicyFile {
        model: profile.model.clone(),
        note: format!(
            "ladimo solve: {:?} <= {budget_value:.4e} {unit} ({:.1}% of dense), minimising {cost:?}",
            budget.kind,
            100.0 * budget_value / dense_value
        ),
        layers: profile
            .layers
            .iter()
            .zip(&chosen)
            .map(|(l, c)| LayerPolicy {
                layer: l.layer,
                policy: Some(c.policy.clone()),
                sparsity: c.sparsity.clone(),
            })
            .collect(),
    };
    Ok(Solved {
        policies,
        budget: *budget,
        cost_kind: cost,
        unit: unit.into(),
        budget_value,
        used: sol.weight + offset,
        dense_value,
        cost: sol.cost,
        predicted_ppl_ratio: (slope * sol.cost + intercept).exp(),
        predicted_params: profile.non_ffn_params + ffn,
        predicted_ffn_params: ffn,
        predicted_threshold_saved: chosen.iter().map(|c| c.threshold_saved).sum(),
        dense_ffn_params: profile.dense_ffn_params(),
        frontier,
    })
}

impl Solved {
    /// The predicted FFN saving per token against the dense FFN, split into `(experts not read,
    /// thresholds)`; `None` when no layer takes thresholds (the saving is all experts not read).
    pub fn ffn_saving_split(&self) -> Option<(f64, f64)> {
        (self.predicted_threshold_saved > 0.0).then(|| {
            let saved = self.dense_ffn_params - self.predicted_ffn_params;
            (saved - self.predicted_threshold_saved, self.predicted_threshold_saved)
        })
    }
}

/// The uniform policy `policy` on every layer, as the solver would report it (for comparisons).
pub fn uniform_cost(profile: &Profile, policy: &Policy, cost: Cost) -> Option<(f64, f64)> {
    let table = cost.table(profile).ok()?;
    let mut c = 0.0;
    let mut params = profile.non_ffn_params;
    for (l, costs) in profile.layers.iter().zip(&table) {
        let i = l.candidates.iter().position(|x| &x.policy == policy && x.is_plain())?;
        c += costs[i];
        params += l.candidates[i].active_params;
    }
    Some((c, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ladimo_moe::Policy;

    fn cand(k: usize, rel_mse: f64) -> CandidateCost {
        CandidateCost {
            policy: Policy::TopK { k },
            rel_mse,
            resid_mse: 0.0,
            rel_mse_by_lang: Default::default(),
            mean_experts: k as f64,
            active_params: 0.0,
            threshold_saved: 0.0,
            seconds_per_token: 0.0,
            sparsity: None,
        }
    }

    #[test]
    fn sensitivity_follows_the_layer_error_outside_the_probes() {
        // Probes at top-5 (delta 0.2, rel MSE 0.2) and top-7 (0.05, 0.1).
        let probe = |k: usize, delta: f64, rel_mse: f64| SensitivityProbe {
            policy: Policy::TopK { k },
            rel_mse,
            mean_experts: k as f64,
            delta_ln_ppl: delta,
            delta_ln_ppl_by_lang: Default::default(),
            kl: None,
        };
        let s = LayerSensitivity {
            layer: 0,
            probes: vec![probe(5, 0.2, 0.2), probe(7, 0.05, 0.1)],
            weight: 1.0,
        };
        assert!(
            (by_experts(&s, &cand(6, 0.15), 0.0, Measure::LnPpl) - 0.125).abs() < 1e-12,
            "between probes: linear"
        );
        // Every expert of a block that sums back to its FFN: about no cost, not the top-7 delta.
        assert!((by_experts(&s, &cand(8, 0.001), 0.0, Measure::LnPpl) - 0.0005).abs() < 1e-12);
        // Never above the last probe's delta, never below the first's.
        assert_eq!(by_experts(&s, &cand(8, 0.5), 0.0, Measure::LnPpl), 0.05);
        assert!((by_experts(&s, &cand(4, 0.4), 0.0, Measure::LnPpl) - 0.4).abs() < 1e-12);
        assert_eq!(by_experts(&s, &cand(4, 0.1), 0.0, Measure::LnPpl), 0.2);
    }

    #[test]
    fn thresholds_cost_the_routing_plus_the_error_they_add() {
        let probe = |k: usize, delta: f64, rel_mse: f64| SensitivityProbe {
            policy: Policy::TopK { k },
            rel_mse,
            mean_experts: k as f64,
            delta_ln_ppl: delta,
            delta_ln_ppl_by_lang: Default::default(),
            kl: None,
        };
        let s = LayerSensitivity {
            layer: 0,
            probes: vec![probe(5, 0.2, 0.2), probe(7, 0.05, 0.1)],
            weight: 2.0,
        };
        let plain = cand(6, 0.15);
        let teal = CandidateCost {
            sparsity: Some(ladimo_moe::Sparsity::Teal { x: 0.1, h: 0.01 }),
            threshold_saved: 100.0,
            ..cand(6, 0.19)
        };
        let all = [plain.clone(), teal.clone()];
        assert_eq!(
            sensitivity_cost(&s, &all, &plain, 0.0, Measure::LnPpl),
            by_experts(&s, &plain, 0.0, Measure::LnPpl)
        );
        // Same experts run, so by experts alone it would cost the same as the plain top-6.
        assert_eq!(
            by_experts(&s, &teal, 0.0, Measure::LnPpl),
            by_experts(&s, &plain, 0.0, Measure::LnPpl)
        );
        let want = 0.125 + 2.0 * (0.19 - 0.15);
        assert!((sensitivity_cost(&s, &all, &teal, 0.0, Measure::LnPpl) - want).abs() < 1e-12);
    }

    #[test]
    fn the_kl_cost_interpolates_the_probes_kl_and_fits_its_own_weight() {
        // ln-PPL changes that noise made negative at top-7; KLs that are not.
        let probe = |k: usize, delta: f64, kl: f64, rel_mse: f64| SensitivityProbe {
            policy: Policy::TopK { k },
            rel_mse,
            mean_experts: k as f64,
            delta_ln_ppl: delta,
            delta_ln_ppl_by_lang: Default::default(),
            kl: Some(kl),
        };
        let s = LayerSensitivity {
            layer: 0,
            probes: vec![probe(5, 0.001, 0.04, 0.2), probe(7, -0.002, 0.01, 0.1)],
            weight: 0.0,
        };
        // Between the probes: linear in the KLs (the ln-PPL curve is flat at 0.001 there).
        assert!((by_experts(&s, &cand(6, 0.15), 0.0, Measure::Kl) - 0.025).abs() < 1e-12);
        assert!((by_experts(&s, &cand(6, 0.15), 0.0, Measure::LnPpl) - 0.0005).abs() < 1e-12);
        // Its weight: least squares through the origin of KL on rel MSE, (0.04*0.2 + 0.01*0.1) /
        // (0.2^2 + 0.1^2) = 0.18.
        assert!((Measure::Kl.weight(&s) - 0.18).abs() < 1e-12);
        let plain = cand(6, 0.15);
        let teal = CandidateCost {
            sparsity: Some(ladimo_moe::Sparsity::Teal { x: 0.1, h: 0.01 }),
            ..cand(6, 0.19)
        };
        let all = [plain, teal.clone()];
        let want = 0.025 + 0.18 * (0.19 - 0.15);
        assert!((sensitivity_cost(&s, &all, &teal, 0.0, Measure::Kl) - want).abs() < 1e-12);
    }
}
