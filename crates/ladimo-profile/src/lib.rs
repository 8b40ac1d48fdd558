//! LaDiMo stage 2: profile how each MoE layer routes, what each candidate routing policy costs,
//! and choose one policy per layer under a budget.
//!
//! ```text
//! MoE model + dense teacher + calibration text (tagged by language)
//!   -> profile (profile.json, SVG plots)          [profile.rs]
//!        per layer: routing-weight statistics, and per candidate policy the relative error of
//!        the block's output against the dense FFN on the teacher's inputs, the experts run per
//!        token, the activated parameters and the measured time
//!   -> solve under a budget (exact multiple-choice knapsack, ladimo-solve)   [solve.rs]
//!        -> a policy file (TOML, ladimo_moe::PolicyFile) + the whole Pareto frontier
//! ```
//! [`teal_alloc`] does the same over TEAL thresholds on a dense model: per-layer budgets under a
//! global one. With `ProfileConfig::teal_sparsities` (off by default), each MoE layer's
//! candidates also include every top-k with TEAL thresholds inside the experts that run, so the
//! solver combines expert routing and thresholds per layer.
//!
//! The profile carries the MoE model's fingerprint, so a profile of another model is refused.

mod plots;
mod profile;
mod solve;
pub mod teal_alloc;

pub use plots::write_plots;
pub use profile::{ProfileConfig, add_sensitivity, candidates, profile_model};
pub use solve::{Budget, BudgetKind, Cost, Solved, predict_ppl_ratio, solve_profile, uniform_cost};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ladimo_moe::Policy;
use ladimo_moe::Sparsity;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] ladimo_model::ModelError),
    #[error(transparent)]
    Moe(#[from] ladimo_moe::MoeError),
    #[error(transparent)]
    Solve(#[from] ladimo_solve::SolveError),
    #[error(transparent)]
    Plot(#[from] ladimo_plot::PlotError),
}

/// Statistics of a layer's routing weights over some tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingDistribution {
    pub tokens: usize,
    /// Histogram (counts, [`HIST_BINS`] equal bins over [0, 1]) of the top-1 probability.
    pub top1_hist: Vec<f64>,
    /// For k = 1..=N, the mean cumulative probability of the k most probable experts.
    pub cum_topk_mean: Vec<f64>,
    /// For k = 1..=N, the histogram of that cumulative probability.
    pub cum_topk_hist: Vec<Vec<f64>>,
    /// Mean entropy of the routing distribution (nats; uniform is ln N).
    pub entropy_mean: f64,
    /// Histogram of the entropy over [0, ln N].
    pub entropy_hist: Vec<f64>,
    /// Share of tokens whose top-1 expert is each expert.
    pub top1_load: Vec<f64>,
    /// Mean routing probability of each expert.
    pub mean_prob: Vec<f64>,
}

/// Bins of every histogram in a profile.
pub const HIST_BINS: usize = 20;

/// What one policy costs on one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateCost {
    pub policy: Policy,
    /// TEAL thresholds inside the experts that run, with the routing policy (only with
    /// `ProfileConfig::teal_sparsities`; absent: the policy alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<Sparsity>,
    /// `||moe(x) - ffn(x)||^2 / ||ffn(x)||^2` over all profiled tokens (all languages).
    pub rel_mse: f64,
    /// `||moe(x) - ffn(x)||^2 / ||h||^2`, h the residual stream after the layer: the error as a
    /// share of what flows on to the next layer.
    pub resid_mse: f64,
    /// `rel_mse` per language tag.
    pub rel_mse_by_lang: BTreeMap<String, f64>,
    /// Mean number of routed experts run per token.
    pub mean_experts: f64,
    /// Mean FFN parameters activated per token (router + shared + routed experts that ran, less
    /// what the thresholds kept from being read).
    pub active_params: f64,
    /// Mean parameters per token of the experts that ran which the thresholds kept from being
    /// read (0 without thresholds): the part of the FFN saving due to thresholds, the rest being
    /// experts not read.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub threshold_saved: f64,
    /// Measured time of the block per token (median of repeats; seconds); 0 when the profile
    /// measured no latency (`Profile::latency_measured`).
    pub seconds_per_token: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl CandidateCost {
    /// The routing policy alone (no thresholds).
    pub fn is_plain(&self) -> bool {
        self.sparsity.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    pub layer: usize,
    pub num_experts: usize,
    /// Parameters of each routed expert.
    pub expert_params: Vec<usize>,
    /// Router + shared-expert parameters (used by every token).
    pub fixed_params: usize,
    /// The dense FFN this block replaces: parameters, and measured seconds per token (0 when the
    /// profile measured no latency).
    pub dense_params: usize,
    pub dense_seconds_per_token: f64,
    /// Routing statistics per language tag, and over all tokens (`"all"`).
    pub routing: BTreeMap<String, RoutingDistribution>,
    pub candidates: Vec<CandidateCost>,
}

/// Calibration-set perplexity of the MoE under a uniform policy, used to map summed layer cost
/// to perplexity (the solver's prediction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniformPoint {
    pub policy: Policy,
    pub sum_rel_mse: f64,
    pub sum_resid_mse: f64,
    pub ppl: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub format: u32,
    /// `ladimo_moe::model_fingerprint` of the profiled MoE model.
    pub model: String,
    pub model_path: String,
    pub backend: String,
    /// Tokens profiled per language tag.
    pub tokens: BTreeMap<String, usize>,
    /// Parameters every token activates outside the FFNs (embeddings, attention, norms).
    pub non_ffn_params: f64,
    pub layers: Vec<LayerProfile>,
    /// Dense calibration perplexity and the uniform-policy points.
    pub dense_ppl: f64,
    pub uniform: Vec<UniformPoint>,
    /// End-to-end layer sensitivities (absent in profiles made before they existed, or when
    /// `ProfileConfig::sensitivity_k` is empty); see [`add_sensitivity`].
    #[serde(default)]
    pub sensitivity: Option<Sensitivity>,
    /// Whether the candidates' and the dense FFNs' seconds per token were measured
    /// (`ProfileConfig::latency_repeats` > 0); only a latency budget needs them. Profiles made
    /// before this field always measured them.
    #[serde(default = "measured")]
    pub latency_measured: bool,
}

fn measured() -> bool {
    true
}

/// What one probe policy on one layer does to the calibration perplexity when that layer alone
/// runs the MoE and every other layer stays dense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityProbe {
    pub policy: Policy,
    /// The candidate's `rel_mse` and `mean_experts` in the profile (for the fit).
    pub rel_mse: f64,
    pub mean_experts: f64,
    /// ln(ppl) - ln(dense ppl) on the sensitivity tokens (all languages), and per language tag.
    pub delta_ln_ppl: f64,
    pub delta_ln_ppl_by_lang: BTreeMap<String, f64>,
    /// Mean KL(dense || probed) of the next-token distributions over the same tokens, in nats
    /// per token (never negative; measured with the dense context only; absent in profiles made
    /// before it was recorded). What `Cost::SensitivityKl` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSensitivity {
    pub layer: usize,
    pub probes: Vec<SensitivityProbe>,
    /// Least squares through the origin of `delta_ln_ppl` against `rel_mse` over the probes:
    /// ln-PPL change per unit of relative MSE on this layer.
    pub weight: f64,
}

/// Least squares through the origin of `y(probe)` against the probes' `rel_mse`: a layer's cost
/// per unit of relative MSE (`LayerSensitivity::weight` for the ln-PPL changes; 0 without error).
pub(crate) fn weight_of(probes: &[SensitivityProbe], y: impl Fn(&SensitivityProbe) -> f64) -> f64 {
    let (num, den) = probes.iter().fold((0.0, 0.0), |(n, d), p| {
        (n + y(p) * p.rel_mse, d + p.rel_mse * p.rel_mse)
    });
    if den > 0.0 { num / den } else { 0.0 }
}

/// End-to-end layer sensitivities measured on calibration text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    /// Tokens per language tag the probes ran on, and the window length.
    pub tokens: BTreeMap<String, usize>,
    pub seq_len: usize,
    /// Dense ln(ppl) on those tokens.
    pub dense_ln_ppl: f64,
    /// What the layers other than the probed one ran (see [`SensitivityContext`]).
    #[serde(default)]
    pub context: SensitivityContext,
    /// ln(ppl) of the context model itself (`Moe`: every layer under its own policy), which
    /// the probes' `delta_ln_ppl` are measured from; `None` for `Dense` (= `dense_ln_ppl`).
    #[serde(default)]
    pub context_ln_ppl: Option<f64>,
    /// Wall-clock seconds the measurement took.
    pub seconds: f64,
    pub layers: Vec<LayerSensitivity>,
}

/// What the other layers run while one layer is probed (`ProfileConfig::sensitivity_context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SensitivityContext {
    /// The dense teacher: each layer's cost on its own, as if the others were not converted.
    #[default]
    Dense,
    /// The MoE model as loaded (every layer under its stage-1 training policy): each layer's
    /// cost around that operating point. Right for blocks trained on each other's outputs
    /// (stage 1 with student inputs), whose errors do not add up independently.
    Moe,
}

impl Sensitivity {
    /// ln(context ppl / dense ppl): what the summed probe deltas are measured on top of.
    pub fn context_offset(&self) -> f64 {
        self.context_ln_ppl.map_or(0.0, |c| c - self.dense_ln_ppl)
    }
}

impl Profile {
    pub fn read(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text)
            .map_err(|e| ProfileError::Invalid(format!("{}: not a profile: {e}", path.display())))
    }

    /// Write atomically (`ladimo_io::atomic`).
    pub fn write(&self, path: &Path) -> Result<(), ProfileError> {
        ladimo_io::atomic::write_atomic(path, &serde_json::to_vec_pretty(self).unwrap()).map_err(|e| {
            let (path, source) = e.into_io();
            ProfileError::Io { path, source }
        })
    }

    /// Dense FFN parameters per token, summed over the profiled layers.
    pub fn dense_ffn_params(&self) -> f64 {
        self.layers.iter().map(|l| l.dense_params as f64).sum()
    }

    pub fn dense_ffn_seconds(&self) -> f64 {
        self.layers.iter().map(|l| l.dense_seconds_per_token).sum()
    }
}
