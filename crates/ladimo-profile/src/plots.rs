//! SVG plots of a profile (and of a solver's frontier).

use std::path::{Path, PathBuf};

use ladimo_moe::Policy;
use ladimo_plot::{Series, histograms, line_chart};

use crate::{Profile, ProfileError, Solved};

/// Write the profile's plots into `dir`; returns the files written.
/// - `routing_top1_<tag>.svg`: per layer, the histogram of the top-1 routing probability;
/// - `cost_curves.svg`: per layer (every few), relative error vs experts run, for top-k;
/// - `frontier.svg` (with `solved`): predicted perplexity ratio vs budget, the solver's frontier.
pub fn write_plots(profile: &Profile, dir: &Path, solved: Option<&Solved>) -> Result<Vec<PathBuf>, ProfileError> {
    std::fs::create_dir_all(dir).map_err(|source| ProfileError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    let tags: Vec<String> = profile
        .layers
        .first()
        .map(|l| l.routing.keys().cloned().collect())
        .unwrap_or_default();
    for tag in tags {
        let panels: Vec<(String, Vec<f64>, (f64, f64))> = profile
            .layers
            .iter()
            .filter_map(|l| {
                l.routing
                    .get(&tag)
                    .map(|d| (format!("layer {}", l.layer), d.top1_hist.clone(), (0.0, 1.0)))
            })
            .collect();
        let p = dir.join(format!("routing_top1_{tag}.svg"));
        histograms(
            &p,
            &format!("Top-1 routing probability per layer ({tag} calibration tokens)"),
            "top-1 probability",
            &panels,
            6,
        )?;
        written.push(p);
    }
    let step = (profile.layers.len() / 6).max(1);
    let series: Vec<Series> = profile
        .layers
        .iter()
        .filter(|l| l.layer % step == 0 || l.layer + 1 == profile.layers.len())
        .map(|l| Series {
            name: format!("layer {}", l.layer),
            points: l
                .candidates
                .iter()
                .filter(|c| matches!(c.policy, Policy::TopK { .. }) && c.is_plain() && c.rel_mse > 0.0)
                .map(|c| (c.mean_experts, c.rel_mse))
                .collect(),
        })
        .collect();
    let p = dir.join("cost_curves.svg");
    line_chart(
        &p,
        "Top-k: error vs experts run (relative MSE to the dense FFN)",
        "experts run per token",
        "relative MSE",
        &series,
        true,
    )?;
    written.push(p);
    if let Some(s) = solved {
        let mut series = vec![Series {
            name: "solver frontier (predicted)".into(),
            // Budgets so small that the predicted ratio explodes would flatten the rest of the
            // log axis: keep the readable part (ratio <= 1000).
            points: s
                .frontier
                .iter()
                .filter(|f| f.predicted_ppl_ratio <= 1e3)
                .map(|f| (f.fraction_of_dense, f.predicted_ppl_ratio))
                .collect(),
        }];
        let uni: Vec<(f64, f64)> = profile
            .uniform
            .iter()
            .filter_map(|u| {
                crate::solve::uniform_cost(profile, &u.policy, s.cost_kind).map(|(_, params)| {
                    let frac = match s.budget.kind {
                        crate::BudgetKind::Params => params / s.dense_value,
                        _ => (params - profile.non_ffn_params) / profile.dense_ffn_params(),
                    };
                    (frac, u.ppl / profile.dense_ppl)
                })
            })
            .collect();
        if !uni.is_empty() {
            series.push(Series {
                name: "uniform top-k (measured, calibration)".into(),
                points: uni,
            });
        }
        let p = dir.join("frontier.svg");
        line_chart(
            &p,
            "Routing-policy frontier: perplexity / dense vs activated share",
            &format!("{} (fraction of dense)", s.unit),
            "perplexity / dense",
            &series,
            true,
        )?;
        written.push(p);
    }
    Ok(written)
}
