//! Stage 2 over the threshold policy space: how much each layer's TEAL sparsity costs, and a
//! per-layer budget under a global one (TEAL's greedy allocation, solved exactly here).
//!
//! ```text
//! dense model + calibration windows (thresholds) + probe windows (calibration text too)
//!   -> calibrate_budgets: every layer's TEAL thresholds at every probe budget, one pass
//!   -> per layer l, per budget b: layer l under TEAL(b), every other layer dense, on the probe
//!      windows (each layer's input cached once, so a probe runs layers l.. and the head):
//!      the calibration ln-PPL change and the share of layer l's FFN actually read
//!   -> TealProfile (JSON)
//!   -> allocate(profile, B): one budget per layer (exact multiple-choice knapsack, ladimo-solve)
//!      minimising the summed ln-PPL change with the FFN parameters read <= B of all FFNs
//! ```
//! The costs add up layer by layer as if the layers' errors were independent: the same
//! assumption as stage 2's routing sensitivity. Nothing here reads held-out text: the caller
//! passes calibration windows only.

use std::time::Instant;

use burn::tensor::Tensor;
use ladimo_model::util::ids_tensor;
use ladimo_model::{ModelError, Transformer};
use ladimo_moe::sparsity::{Method, Sparsity, calibrate_budgets, set_sparsity};
use serde::{Deserialize, Serialize};

use crate::ProfileError;
use crate::profile::hidden_nll;

/// What TEAL at each budget costs each layer, measured on calibration text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TealProfile {
    /// The budgets probed (share of the FFN read), ascending; 1.0 (dense) is always among them.
    pub budgets: Vec<f64>,
    /// Tokens the thresholds were calibrated on and tokens the probes scored.
    pub calibration_tokens: usize,
    pub probe_tokens: usize,
    /// Calibration ln-perplexity of the dense model on the probe windows.
    pub dense_ln_ppl: f64,
    pub layers: Vec<TealLayer>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TealLayer {
    pub layer: usize,
    /// Parameters of this layer's dense FFN (what its share is a share of).
    pub ffn_params: usize,
    /// One point per probed budget, in the order of `TealProfile::budgets`.
    pub points: Vec<TealPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TealPoint {
    /// The budget the thresholds were calibrated for (1.0: dense, no sparsity).
    pub budget: f64,
    /// `None` at budget 1.0.
    pub sparsity: Option<Sparsity>,
    /// Share of the FFN read on the probe windows (measured).
    pub ffn_share: f64,
    /// Calibration ln-PPL with this layer alone sparse, minus the dense one.
    pub delta_ln_ppl: f64,
}

/// Measure [`TealProfile`] on `model` (every layer a dense FFN; dense again on return):
/// thresholds from `calibration` windows, costs on `probe` windows (both calibration text).
/// `progress(stage, done, total)`.
pub fn profile_teal(
    model: &mut Transformer,
    calibration: &[&[u32]],
    probe: &[&[u32]],
    budgets: &[f64],
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<TealProfile, ProfileError> {
    let start = Instant::now();
    if probe.is_empty() || probe.iter().any(|w| w.len() < 2) {
        return Err(ProfileError::Invalid(
            "the probe needs windows of at least 2 tokens".into(),
        ));
    }
    let mut budgets: Vec<f64> = budgets.iter().copied().filter(|&b| b < 1.0).collect();
    budgets.sort_by(f64::total_cmp);
    budgets.dedup();
    let sparse = calibrate_budgets(model, calibration, Method::Teal, &budgets, |d, n| {
        progress("thresholds", d, n)
    })
    .map_err(|e| ProfileError::Invalid(format!("TEAL calibration: {e}")))?;
    budgets.push(1.0);
    let n_layers = model.layers.len();
    // Each layer's dense input per probe window, and the dense NLL.
    let mut inputs: Vec<Vec<Tensor<3>>> = Vec::with_capacity(probe.len());
    let mut dense_nll = 0.0;
    for (i, ids) in probe.iter().enumerate() {
        let mut h = model.embed(ids_tensor(ids, 1, &model.device));
        let mut hs = Vec::with_capacity(n_layers);
        for (l, layer) in model.layers.iter().enumerate() {
            hs.push(h.clone());
            h = layer
                .forward(h, &model.rope, &mut None)
                .map_err(|source| ModelError::Ffn { layer: l, source })?;
        }
        dense_nll += hidden_nll(model, h, ids);
        inputs.push(hs);
        progress("dense probe", i + 1, probe.len());
    }
    let count: usize = probe.iter().map(|w| w.len() - 1).sum();
    let dense_ln_ppl = dense_nll / count as f64;
    let total = n_layers * (budgets.len() - 1);
    let mut done = 0;
    let mut layers = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let ffn_params = model.layers[l].ffn.total_params();
        let mut points = Vec::with_capacity(budgets.len());
        for (bi, s) in sparse.iter().enumerate() {
            let s = s[l].clone();
            set_sparsity(model, l, Some(s.clone())).map_err(|e| ProfileError::Invalid(e.to_string()))?;
            let mut nll = 0.0;
            let run = |nll: &mut f64| -> Result<(), ProfileError> {
                for (ids, hs) in probe.iter().zip(&inputs) {
                    let mut h = hs[l].clone();
                    for (j, layer) in model.layers.iter().enumerate().skip(l) {
                        h = layer
                            .forward(h, &model.rope, &mut None)
                            .map_err(|source| ModelError::Ffn { layer: j, source })?;
                    }
                    *nll += hidden_nll(model, h, ids);
                }
                Ok(())
            };
            let ran = run(&mut nll);
            let share = model.layers[l].ffn.active_params_per_token() / ffn_params as f64;
            set_sparsity(model, l, None).map_err(|e| ProfileError::Invalid(e.to_string()))?;
            ran?;
            points.push(TealPoint {
                budget: budgets[bi],
                sparsity: Some(s),
                ffn_share: share,
                delta_ln_ppl: nll / count as f64 - dense_ln_ppl,
            });
            done += 1;
            progress("probes", done, total);
        }
        points.push(TealPoint {
            budget: 1.0,
            sparsity: None,
            ffn_share: 1.0,
            delta_ln_ppl: 0.0,
        });
        layers.push(TealLayer {
            layer: l,
            ffn_params,
            points,
        });
    }
    Ok(TealProfile {
        budgets,
        calibration_tokens: calibration.iter().map(|w| w.len()).sum(),
        probe_tokens: probe.iter().map(|w| w.len()).sum(),
        dense_ln_ppl,
        layers,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Per layer, the probed point that minimises the summed ln-PPL change with the FFN parameters
/// read (measured shares times each layer's size) at most `budget` of all FFN parameters.
/// The points are in layer order.
pub fn allocate(profile: &TealProfile, budget: f64) -> Result<Vec<TealPoint>, ProfileError> {
    if !(budget > 0.0 && budget <= 1.0) {
        return Err(ProfileError::Invalid(format!("budget {budget} must be in (0, 1]")));
    }
    let groups: Vec<Vec<ladimo_solve::Choice>> = profile
        .layers
        .iter()
        .map(|l| {
            l.points
                .iter()
                .map(|p| ladimo_solve::Choice {
                    cost: p.delta_ln_ppl,
                    weight: p.ffn_share * l.ffn_params as f64,
                })
                .collect()
        })
        .collect();
    let total: f64 = profile.layers.iter().map(|l| l.ffn_params as f64).sum();
    let sol = ladimo_solve::solve(&groups, budget * total).map_err(|e| {
        ProfileError::Invalid(format!(
            "FFN budget {budget}: {e} (the lowest probed budget bounds what can be met)"
        ))
    })?;
    Ok(sol
        .picks
        .iter()
        .zip(&profile.layers)
        .map(|(&p, l)| l.points[p].clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(budget: f64, share: f64, cost: f64) -> TealPoint {
        TealPoint {
            budget,
            sparsity: None,
            ffn_share: share,
            delta_ln_ppl: cost,
        }
    }

    /// Two layers of equal size: one cheap to sparsify, one dear.
    fn profile() -> TealProfile {
        let layer = |l: usize, cost_half: f64| TealLayer {
            layer: l,
            ffn_params: 100,
            points: vec![
                point(0.5, 0.5, cost_half),
                point(0.75, 0.75, cost_half / 4.0),
                point(1.0, 1.0, 0.0),
            ],
        };
        TealProfile {
            budgets: vec![0.5, 0.75, 1.0],
            calibration_tokens: 0,
            probe_tokens: 0,
            dense_ln_ppl: 0.0,
            layers: vec![layer(0, 0.01), layer(1, 0.2)],
            seconds: 0.0,
        }
    }

    #[test]
    fn the_cheap_layer_gives_up_more_and_the_budget_holds() {
        let picks = allocate(&profile(), 0.75).unwrap();
        // Uniform 0.75 costs 0.0025 + 0.05; the cheap layer at 0.5 and the dear one dense, 0.01.
        assert_eq!(picks.iter().map(|p| p.budget).collect::<Vec<_>>(), [0.5, 1.0]);
        let read: f64 = picks.iter().map(|p| p.ffn_share).sum::<f64>() / 2.0;
        assert!(read <= 0.75 + 1e-12, "{read}");
    }

    #[test]
    fn a_budget_under_every_probe_is_an_error_naming_it() {
        let e = allocate(&profile(), 0.4).unwrap_err().to_string();
        assert!(e.contains("FFN budget 0.4"), "{e}");
        assert!(allocate(&profile(), 1.5).is_err());
    }
}
