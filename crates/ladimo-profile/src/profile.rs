//! The profiler: teacher activations per layer, routing statistics, and per-candidate costs.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use ladimo_model::perplexity::perplexity;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{ModelError, Transformer};
use ladimo_moe::sparsity::{Histogram, Sparsity, teal_saved};
use ladimo_moe::{MoeBlock, Policy, moe_block, moe_block_mut};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{
    CandidateCost, HIST_BINS, LayerProfile, LayerSensitivity, Profile, ProfileError, RoutingDistribution, Sensitivity,
    SensitivityContext, SensitivityProbe, UniformPoint,
};

/// What to profile and how: the one definition of the stage-2 profiling settings. The convert
/// config's `[stage2]` embeds it (serde), `ladimo profile` takes it as flags (clap), and both
/// take their defaults from [`ProfileConfig::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct ProfileConfig {
    /// Profiling tokens per calibration tag (taken from the end of the files, away from what
    /// stage 1 trained on).
    #[arg(long, default_value_t = ProfileConfig::default().tokens)]
    pub tokens: usize,
    /// Window length of the teacher passes.
    #[arg(long, default_value_t = ProfileConfig::default().seq_len)]
    pub seq_len: usize,
    /// Candidate policies besides TopK 1..N: TopP at these p (min_k 1, max_k N).
    #[arg(long, value_delimiter = ',', default_values_t = ProfileConfig::default().top_p_grid)]
    pub top_p_grid: Vec<f32>,
    /// Confidence candidates at these tau, with (k_low, k_high) = (k, k + 1) and (k, k + 2).
    #[arg(long, value_delimiter = ',', default_values_t = ProfileConfig::default().tau_grid)]
    pub tau_grid: Vec<f32>,
    /// Tokens the latency of each policy is measured on, and repeats (median; one warm-up).
    /// Repeats 0: no latency is measured (on SmolLM2's default stage 1 the profile took 139 s
    /// instead of 308 s); the profile then serves parameter budgets only.
    #[arg(long, default_value_t = ProfileConfig::default().latency_tokens)]
    pub latency_tokens: usize,
    #[arg(long, default_value_t = ProfileConfig::default().latency_repeats)]
    pub latency_repeats: usize,
    /// Token chunk for computing expert outputs (bounds memory: chunk x experts x hidden floats);
    /// not a setting of the config file.
    #[serde(skip, default = "chunk_tokens")]
    #[arg(skip = chunk_tokens())]
    pub chunk_tokens: usize,
    /// Uniform top-k models whose calibration perplexity calibrates the cost -> PPL prediction.
    /// Absent: 2 to N - 1, N the fewest experts of a layer ([`ProfileConfig::uniform_ks`]).
    #[arg(long, value_delimiter = ',')]
    pub uniform_k: Option<Vec<usize>>,
    /// Probe policies of the layer sensitivity: top-k for these k (those above a layer's expert
    /// count are skipped); empty: no sensitivity is measured. Absent: 2 to N - 1, N the layer's
    /// experts ([`ProfileConfig::sensitivity_ks`]). See [`add_sensitivity`].
    #[arg(long, value_delimiter = ',')]
    pub sensitivity_k: Option<Vec<usize>>,
    /// Calibration tokens the sensitivity probes run on (whole windows of `seq_len`, taken in
    /// turn from each language's text; at least one window).
    #[arg(long, default_value_t = ProfileConfig::default().sensitivity_tokens)]
    pub sensitivity_tokens: usize,
    /// What the other layers run while one layer is probed: dense (the teacher; each layer's
    /// cost on its own) or moe (the MoE model under its loaded policies; for stage 1 with
    /// student inputs, whose blocks are tuned to each other). See [`crate::SensitivityContext`].
    #[arg(long, value_enum, default_value_t = ProfileConfig::default().sensitivity_context)]
    pub sensitivity_context: SensitivityContext,
    /// Candidates with TEAL inside the experts (empty, the default: none): every top-k also with
    /// thresholds that zero these shares (each in (0, 1)) of the layer's x and of h over the
    /// experts that run, calibrated per layer on the profiled tokens. See [`profile_model`].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub teal_sparsities: Vec<f64>,
}

fn chunk_tokens() -> usize {
    2048
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            tokens: 4096,
            seq_len: 512,
            top_p_grid: vec![0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98],
            tau_grid: vec![0.3, 0.4, 0.5, 0.6, 0.7],
            latency_tokens: 512,
            latency_repeats: 5,
            chunk_tokens: chunk_tokens(),
            uniform_k: None,
            sensitivity_k: None,
            sensitivity_tokens: 2048,
            sensitivity_context: SensitivityContext::Dense,
            teal_sparsities: Vec::new(),
        }
    }
}

/// 2 to n - 1: the top-k worth probing in a layer of n experts (top-1 is far off, top-n is
/// every expert).
fn probe_ks(n: usize) -> Vec<usize> {
    (2..n).collect()
}

impl ProfileConfig {
    /// The uniform top-k points for a model whose smallest MoE layer has `n` experts.
    pub fn uniform_ks(&self, n: usize) -> Vec<usize> {
        self.uniform_k.clone().unwrap_or_else(|| probe_ks(n))
    }

    /// The sensitivity probes' k for a layer of `n` experts.
    pub fn sensitivity_ks(&self, n: usize) -> Vec<usize> {
        let ks = self.sensitivity_k.clone().unwrap_or_else(|| probe_ks(n));
        ks.into_iter().filter(|&k| k >= 1 && k <= n).collect()
    }

    /// Refuses TEAL shares outside (0, 1).
    pub fn check_teal(&self) -> Result<(), String> {
        match self.teal_sparsities.iter().find(|s| !(**s > 0.0 && **s < 1.0)) {
            Some(s) => Err(format!("teal_sparsities: {s} is not a share in (0, 1)")),
            None => Ok(()),
        }
    }

    /// Whether the layer sensitivity is measured at all (`sensitivity_k` is not empty).
    pub fn measures_sensitivity(&self) -> bool {
        self.sensitivity_k.as_ref().is_none_or(|k| !k.is_empty())
    }
}

/// The candidate policies for a layer of `n` experts.
pub fn candidates(n: usize, cfg: &ProfileConfig) -> Vec<Policy> {
    let mut c: Vec<Policy> = (1..=n).map(|k| Policy::TopK { k }).collect();
    for &p in &cfg.top_p_grid {
        c.push(Policy::TopP { p, min_k: 1, max_k: n });
    }
    for &tau in &cfg.tau_grid {
        for k in 1..n {
            for d in [1, 2] {
                if k + d <= n {
                    c.push(Policy::Confidence {
                        tau,
                        k_low: k,
                        k_high: k + d,
                    });
                }
            }
        }
    }
    c
}

/// The teacher's FFN inputs and outputs at one layer, for every profiled token.
struct LayerData {
    x: Vec<f32>,
    y: Vec<f32>,
    /// Squared norm of the residual stream after the layer, per token.
    resid2: Vec<f32>,
}

fn teacher_pass(
    dense: &Transformer,
    texts: &[(String, Vec<u32>)],
    seq_len: usize,
    progress: &mut impl FnMut(&str, usize, usize),
) -> Result<(Vec<LayerData>, Vec<usize>), ProfileError> {
    let n_layers = dense.layers.len();
    let mut data: Vec<LayerData> = (0..n_layers)
        .map(|_| LayerData {
            x: vec![],
            y: vec![],
            resid2: vec![],
        })
        .collect();
    let mut lang_of = Vec::new();
    let windows: Vec<(usize, &[u32])> = texts
        .iter()
        .enumerate()
        .flat_map(|(i, (_, ids))| ids.chunks_exact(seq_len).map(move |w| (i, w)))
        .collect();
    for (wi, (lang, ids)) in windows.iter().enumerate() {
        let mut h = dense.embed(ids_tensor(ids, 1, &dense.device));
        for (l, layer) in dense.layers.iter().enumerate() {
            let (h_attn, x) = layer.attention_part(h, &dense.rope, &mut None);
            let y = layer
                .ffn
                .forward(x.clone())
                .map_err(|source| ModelError::Ffn { layer: l, source })?;
            h = layer.ffn_residual(h_attn, y.clone());
            let r2 = to_vec((h.clone() * h.clone()).sum_dim(2));
            let d = &mut data[l];
            d.x.extend(to_vec(x));
            d.y.extend(to_vec(y));
            d.resid2.extend(r2);
        }
        lang_of.extend(std::iter::repeat_n(*lang, ids.len()));
        progress("teacher", wi + 1, windows.len());
    }
    Ok((data, lang_of))
}

fn hist_add(h: &mut [f64], v: f64, lo: f64, hi: f64) {
    let b = (((v - lo) / (hi - lo)) * h.len() as f64).floor();
    let b = (b.max(0.0) as usize).min(h.len() - 1);
    h[b] += 1.0;
}

fn routing_stats(probs: &[f32], e: usize, dist: &mut RoutingDistribution) {
    if dist.top1_hist.is_empty() {
        *dist = RoutingDistribution {
            tokens: 0,
            top1_hist: vec![0.0; HIST_BINS],
            cum_topk_mean: vec![0.0; e],
            cum_topk_hist: vec![vec![0.0; HIST_BINS]; e],
            entropy_mean: 0.0,
            entropy_hist: vec![0.0; HIST_BINS],
            top1_load: vec![0.0; e],
            mean_prob: vec![0.0; e],
        };
    }
    let ln_n = (e as f64).ln().max(1e-9);
    let mut sorted = vec![0f32; e];
    for p in probs.chunks(e) {
        sorted.copy_from_slice(p);
        sorted.sort_by(|a, b| b.total_cmp(a));
        hist_add(&mut dist.top1_hist, sorted[0] as f64, 0.0, 1.0);
        let mut cum = 0.0;
        for (k, &v) in sorted.iter().enumerate() {
            cum += v as f64;
            dist.cum_topk_mean[k] += cum;
            hist_add(&mut dist.cum_topk_hist[k], cum, 0.0, 1.0 + 1e-9);
        }
        let ent: f64 = p
            .iter()
            .filter(|&&v| v > 0.0)
            .map(|&v| -(v as f64) * (v as f64).ln())
            .sum();
        dist.entropy_mean += ent;
        hist_add(&mut dist.entropy_hist, ent, 0.0, ln_n + 1e-9);
        let top = (0..e)
            .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        dist.top1_load[top] += 1.0;
        for (m, &v) in dist.mean_prob.iter_mut().zip(p) {
            *m += v as f64;
        }
        dist.tokens += 1;
    }
}

fn finish_stats(d: &mut RoutingDistribution) {
    let n = d.tokens.max(1) as f64;
    d.cum_topk_mean.iter_mut().for_each(|v| *v /= n);
    d.entropy_mean /= n;
    d.top1_load.iter_mut().for_each(|v| *v /= n);
    d.mean_prob.iter_mut().for_each(|v| *v /= n);
}

/// Error accumulators of one candidate.
#[derive(Clone, Default)]
struct Acc {
    err: f64,
    err_by_lang: Vec<f64>,
    experts: f64,
    params: f64,
    /// Parameters the thresholds kept from being read (shared experts included).
    saved: f64,
}

/// Per share in `cfg.teal_sparsities`, layer thresholds `(t_x, t_h)`: that share of `|x|` over
/// the profiled tokens, and of `|h|` over the neurons of the experts that run under the block's
/// loaded policy (shared ones included): the rule of `ladimo_moe::sparsity::calibrate`, on the
/// teacher's inputs.
fn teal_levels(block: &MoeBlock, xs: &[f32], h: usize, cfg: &ProfileConfig) -> Result<Vec<(f32, f32)>, ProfileError> {
    if cfg.teal_sparsities.is_empty() {
        return Ok(Vec::new());
    }
    let device = block.params.router.weight.device();
    let (mut hx, mut hh) = (Histogram::new(), Histogram::new());
    hx.add(xs);
    let n_tok = xs.len() / h;
    for start in (0..n_tok).step_by(cfg.chunk_tokens) {
        let m = cfg.chunk_tokens.min(n_tok - start);
        let x = Tensor::<2>::from_data(
            TensorData::new(xs[start * h..(start + m) * h].to_vec(), [m, h]),
            &device,
        );
        let mut groups = vec![Vec::new(); block.num_experts()];
        for (t, r) in block.route(&block.router_probs(x.clone())?).iter().enumerate() {
            for &(i, _) in r {
                groups[i].push(t as i64);
            }
        }
        if let Some(s) = &block.params.shared {
            hh.add(&to_vec(s.activation(x.clone())));
        }
        for (i, g) in groups.into_iter().enumerate() {
            if !g.is_empty() {
                let n = g.len();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(g, [n]), &device);
                hh.add(&to_vec(block.params.experts[i].activation(x.clone().select(0, idx))));
            }
        }
    }
    Ok(cfg
        .teal_sparsities
        .iter()
        .map(|&s| (hx.quantile(s), hh.quantile(s)))
        .collect())
}

/// Every expert's output on a chunk under one TEAL level, with the entries each kept.
struct LevelOutputs {
    /// Per token, the `x` entries kept.
    kept_x: Vec<f32>,
    /// Per routed expert: outputs `[m, hidden]` and, per token, the `h` entries kept.
    experts: Vec<(Vec<f32>, Vec<f32>)>,
    shared: Option<(Vec<f32>, Vec<f32>)>,
}

fn level_outputs(block: &MoeBlock, x: Tensor<2>, (tx, th): (f32, f32)) -> LevelOutputs {
    let keep_x = x.clone().abs().greater_equal_elem(tx);
    let kept_x = to_vec(keep_x.clone().float().sum_dim(1));
    let x = x.mask_fill(keep_x.bool_not(), 0.0);
    let run = |f: &ladimo_model::DenseFfn| {
        let a = f.activation(x.clone());
        let keep = a.clone().abs().greater_equal_elem(th);
        let kept = to_vec(keep.clone().float().sum_dim(1));
        (to_vec(f.down_proj.forward(a.mask_fill(keep.bool_not(), 0.0))), kept)
    };
    LevelOutputs {
        kept_x,
        experts: block.params.experts.iter().map(run).collect(),
        shared: block.params.shared.as_ref().map(run),
    }
}

/// Profile every MoE layer of `moe` against the dense teacher `dense` on `texts` (language tag,
/// token ids; each cut into whole windows of `cfg.seq_len`). `progress(stage, done, total)`.
pub fn profile_model(
    moe: &mut Transformer,
    dense: &Transformer,
    texts: &[(String, Vec<u32>)],
    cfg: &ProfileConfig,
    model_path: &str,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Profile, ProfileError> {
    if moe.config.num_layers != dense.config.num_layers || moe.config.hidden_size != dense.config.hidden_size {
        return Err(ProfileError::Invalid(format!(
            "the MoE model ({} layers, hidden {}) and the dense teacher ({} layers, hidden {}) differ",
            moe.config.num_layers, moe.config.hidden_size, dense.config.num_layers, dense.config.hidden_size
        )));
    }
    let short: Vec<&str> = texts
        .iter()
        .filter(|(_, ids)| ids.len() < cfg.seq_len)
        .map(|(l, _)| l.as_str())
        .collect();
    if !short.is_empty() {
        return Err(ProfileError::Invalid(format!(
            "calibration text {short:?} has fewer tokens than one window of {}",
            cfg.seq_len
        )));
    }
    cfg.check_teal().map_err(ProfileError::Invalid)?;
    let moe_layers: Vec<usize> = (0..moe.layers.len()).filter(|&l| moe_block(moe, l).is_some()).collect();
    if moe_layers.is_empty() {
        return Err(ProfileError::Invalid("the model has no MoE layer to profile".into()));
    }
    let fingerprint = ladimo_moe::model_fingerprint(moe);
    let (data, lang_of) = teacher_pass(dense, texts, cfg.seq_len, &mut progress)?;
    let n_lang = texts.len();
    let h = moe.config.hidden_size;
    let n_tok = lang_of.len();
    let device = moe.device.clone();
    let mut layers = Vec::new();
    for (done, &l) in moe_layers.iter().enumerate() {
        let d = &data[l];
        let block = moe_block(moe, l).expect("MoE layer");
        let e = block.num_experts();
        let levels = teal_levels(block, &d.x, h, cfg)?;
        // The policies as they are, then every top-k with each TEAL level.
        let mut cands: Vec<(Policy, Option<usize>)> = candidates(e, cfg).into_iter().map(|p| (p, None)).collect();
        for k in 1..=e {
            cands.extend((0..levels.len()).map(|li| (Policy::TopK { k }, Some(li))));
        }
        let inters: Vec<usize> = block.params.experts.iter().map(|f| f.intermediate_size()).collect();
        let shared_inter = block.params.shared.as_ref().map(|s| s.intermediate_size());
        let mut accs = vec![
            Acc {
                err_by_lang: vec![0.0; n_lang],
                ..Default::default()
            };
            cands.len()
        ];
        let mut y2 = 0f64;
        let mut y2_lang = vec![0f64; n_lang];
        let resid2: f64 = d.resid2.iter().map(|&v| v as f64).sum();
        let mut dists: Vec<RoutingDistribution> = vec![Default::default(); n_lang];
        let mut all = RoutingDistribution::default();
        for start in (0..n_tok).step_by(cfg.chunk_tokens) {
            let m = cfg.chunk_tokens.min(n_tok - start);
            let xs = &d.x[start * h..(start + m) * h];
            let ys = &d.y[start * h..(start + m) * h];
            let x = Tensor::<2>::from_data(TensorData::new(xs.to_vec(), [m, h]), &device);
            let probs = block.router_probs(x.clone())?;
            let outs: Vec<Vec<f32>> = block
                .params
                .experts
                .iter()
                .map(|ex| to_vec(ex.forward_any(x.clone())))
                .collect();
            let shared = block.params.shared.as_ref().map(|s| to_vec(s.forward_any(x.clone())));
            let level_outs: Vec<LevelOutputs> = levels.iter().map(|&t| level_outputs(block, x.clone(), t)).collect();
            for t in 0..m {
                let yt = &ys[t * h..(t + 1) * h];
                let n2: f64 = yt.iter().map(|&v| (v as f64) * (v as f64)).sum();
                y2 += n2;
                y2_lang[lang_of[start + t]] += n2;
            }
            for (lang, dist) in dists.iter_mut().enumerate() {
                let p: Vec<f32> = (0..m)
                    .filter(|&t| lang_of[start + t] == lang)
                    .flat_map(|t| probs[t * e..(t + 1) * e].iter().copied())
                    .collect();
                routing_stats(&p, e, dist);
            }
            routing_stats(&probs, e, &mut all);
            let expert_params = block.expert_params();
            cands
                .par_iter()
                .zip(accs.par_iter_mut())
                .for_each(|((policy, level), acc)| {
                    let routes = block.route_with(policy, &probs);
                    let lv = level.map(|li| &level_outs[li]);
                    let shared_out = match lv {
                        Some(lv) => lv.shared.as_ref().map(|s| &s.0),
                        None => shared.as_ref(),
                    };
                    let mut out = vec![0f32; h];
                    for (t, r) in routes.iter().enumerate() {
                        match shared_out {
                            Some(s) => out.copy_from_slice(&s[t * h..(t + 1) * h]),
                            None => out.fill(0.0),
                        }
                        let kept_x = lv.map_or(0.0, |lv| lv.kept_x[t] as f64);
                        if let (Some(si), Some((_, kept_h))) = (shared_inter, lv.and_then(|lv| lv.shared.as_ref())) {
                            acc.saved += teal_saved(h, si, 1, kept_x, kept_h[t] as f64);
                        }
                        for &(ex, w) in r {
                            let o = match lv {
                                Some(lv) => &lv.experts[ex].0[t * h..(t + 1) * h],
                                None => &outs[ex][t * h..(t + 1) * h],
                            };
                            out.iter_mut().zip(o).for_each(|(a, &b)| *a += w * b);
                            acc.params += expert_params[ex] as f64;
                            if let Some(lv) = lv {
                                acc.saved += teal_saved(h, inters[ex], 1, kept_x, lv.experts[ex].1[t] as f64);
                            }
                        }
                        acc.experts += r.len() as f64;
                        let yt = &ys[t * h..(t + 1) * h];
                        let err: f64 = out.iter().zip(yt).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
                        acc.err += err;
                        acc.err_by_lang[lang_of[start + t]] += err;
                    }
                });
        }
        let mut routing = BTreeMap::new();
        for (lang, mut dist) in dists.into_iter().enumerate() {
            finish_stats(&mut dist);
            routing.insert(texts[lang].0.clone(), dist);
        }
        finish_stats(&mut all);
        routing.insert("all".to_string(), all);

        // Latency of each policy on the first tokens, on the compiled backend.
        let lat_n = cfg.latency_tokens.min(n_tok);
        let x_lat = Tensor::<2>::from_data(TensorData::new(d.x[..lat_n * h].to_vec(), [lat_n, h]), &device);
        let dense_ffn = &dense.layers[l].ffn;
        let dense_s = latency(cfg.latency_repeats, || {
            let y = dense_ffn
                .forward(x_lat.clone().reshape([1, lat_n, h]))
                .map_err(|source| ModelError::Ffn { layer: l, source })?;
            let _ = to_vec(y.narrow(1, 0, 1));
            Ok(())
        })?;
        let fixed = block.fixed_params();
        let expert_params = block.expert_params().to_vec();
        let dense_params = dense_ffn.total_params();
        let original = block.policy.clone();
        let original_sparsity = block.sparsity().cloned();
        let mut costs = Vec::with_capacity(cands.len());
        for ((policy, level), acc) in cands.iter().zip(&accs) {
            let sparsity = level.map(|li| Sparsity::Teal {
                x: levels[li].0,
                h: levels[li].1,
            });
            let b: &mut MoeBlock = moe_block_mut(moe, l).expect("MoE layer");
            b.set_policy(policy.clone())?;
            // Thresholds run on burn's masked path (the host kernel cannot skip x columns), so
            // their measured time does not credit what they save.
            b.set_sparsity(sparsity.clone())?;
            let b: &MoeBlock = b;
            let secs = latency(cfg.latency_repeats, || {
                let y = b.forward_tokens(x_lat.clone())?;
                let _ = to_vec(y.narrow(0, 0, 1));
                Ok(())
            })?;
            let nt = n_tok as f64;
            costs.push(CandidateCost {
                policy: policy.clone(),
                sparsity,
                rel_mse: acc.err / y2.max(1e-30),
                resid_mse: acc.err / resid2.max(1e-30),
                rel_mse_by_lang: texts
                    .iter()
                    .enumerate()
                    .map(|(i, (lang, _))| (lang.clone(), acc.err_by_lang[i] / y2_lang[i].max(1e-30)))
                    .collect(),
                mean_experts: acc.experts / nt,
                active_params: fixed as f64 + (acc.params - acc.saved) / nt,
                threshold_saved: acc.saved / nt,
                seconds_per_token: secs / lat_n as f64,
            });
        }
        let b = moe_block_mut(moe, l).expect("MoE layer");
        b.set_policy(original)?;
        b.set_sparsity(original_sparsity)?;
        b.reset_stats();
        layers.push(LayerProfile {
            layer: l,
            num_experts: e,
            expert_params,
            fixed_params: fixed,
            dense_params,
            dense_seconds_per_token: dense_s / lat_n as f64,
            routing,
            candidates: costs,
        });
        progress("layers", done + 1, moe_layers.len());
    }
    drop(data);

    // Calibration perplexity under uniform policies: maps summed layer cost to perplexity.
    let calib: Vec<u32> = texts.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
    let dense_ppl = perplexity(dense, &calib, cfg.seq_len, |_, _| {})?.perplexity;
    let originals: Vec<(usize, Policy)> = moe_layers
        .iter()
        .map(|&l| (l, moe_block(moe, l).unwrap().policy.clone()))
        .collect();
    let mut uniform = Vec::new();
    let fewest = layers.iter().map(|lp| lp.num_experts).min().unwrap_or(0);
    let uniform_ks = cfg.uniform_ks(fewest);
    for (i, &k) in uniform_ks.iter().enumerate() {
        let policy = Policy::TopK { k };
        let (mut s_rel, mut s_res) = (0.0, 0.0);
        for lp in &layers {
            let c = lp
                .candidates
                .iter()
                .find(|c| c.policy == policy && c.is_plain())
                .ok_or_else(|| {
                    ProfileError::Invalid(format!("uniform top-{k} is not a candidate of layer {}", lp.layer))
                })?;
            s_rel += c.rel_mse;
            s_res += c.resid_mse;
            moe_block_mut(moe, lp.layer).unwrap().set_policy(policy.clone())?;
        }
        let ppl = perplexity(moe, &calib, cfg.seq_len, |_, _| {})?.perplexity;
        uniform.push(UniformPoint {
            policy,
            sum_rel_mse: s_rel,
            sum_resid_mse: s_res,
            ppl,
        });
        progress("uniform", i + 1, uniform_ks.len());
    }
    for (l, p) in originals {
        let b = moe_block_mut(moe, l).unwrap();
        b.set_policy(p)?;
        b.reset_stats();
    }
    let c = dense.param_counts();
    let mut profile = Profile {
        format: 1,
        model: fingerprint,
        model_path: model_path.to_string(),
        backend: String::new(),
        tokens: texts
            .iter()
            .map(|(l, ids)| (l.clone(), ids.len() / cfg.seq_len * cfg.seq_len))
            .collect(),
        non_ffn_params: c.active() - c.ffn_active,
        layers,
        dense_ppl,
        uniform,
        sensitivity: None,
        latency_measured: cfg.latency_repeats > 0,
    };
    if cfg.measures_sensitivity() {
        add_sensitivity(&mut profile, moe, dense, texts, cfg, &mut progress)?;
    }
    Ok(profile)
}

/// The median seconds of `f` over `repeats` runs after a warm-up; 0 when `repeats` is 0 (latency
/// not measured, `Profile::latency_measured`).
fn latency(repeats: usize, f: impl FnMut() -> Result<(), ProfileError>) -> Result<f64, ProfileError> {
    if repeats == 0 {
        return Ok(0.0);
    }
    ladimo_model::timing::median_seconds(repeats, f)
}

/// The sensitivity windows: whole windows of `seq_len`, one from each text in turn, until
/// `tokens` are covered (at least one window).
fn sensitivity_windows(texts: &[(String, Vec<u32>)], seq_len: usize, tokens: usize) -> Vec<(usize, &[u32])> {
    let per: Vec<Vec<&[u32]>> = texts
        .iter()
        .map(|(_, ids)| ids.chunks_exact(seq_len).collect())
        .collect();
    let mut out = Vec::new();
    for i in 0.. {
        let mut any = false;
        for (t, w) in per.iter().enumerate() {
            if let Some(w) = w.get(i)
                && (out.is_empty() || out.len() * seq_len < tokens)
            {
                out.push((t, *w));
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    out
}

/// Next-token log-probabilities `[1, n - 1, vocab]` of a window of `n` tokens, given the last
/// hidden states `h` (before the final norm).
fn hidden_logp(model: &Transformer, h: Tensor<3>, n: usize) -> Tensor<3> {
    let logits = model.logits(model.norm.forward(h));
    log_softmax(logits.narrow(1, 0, n - 1), 2)
}

/// Summed NLL of `window[1..]` under next-token log-probabilities `logp` ([`hidden_logp`]).
fn window_nll(logp: Tensor<3>, window: &[u32]) -> f64 {
    let n = window.len();
    let targets: Vec<i64> = window[1..].iter().map(|&t| t as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n - 1]), &logp.device()).reshape([1, n - 1, 1]);
    -to_vec(logp.gather(2, targets)).iter().map(|&x| x as f64).sum::<f64>()
}

/// Summed NLL of `window[1..]` given the last hidden states `h` (before the final norm).
pub(crate) fn hidden_nll(model: &Transformer, h: Tensor<3>, window: &[u32]) -> f64 {
    window_nll(hidden_logp(model, h, window.len()), window)
}

/// The dense side of a window's KL, computed once: the next-token probabilities `p` and, per
/// token, `sum_v p ln p` (minus the entropy).
struct DenseDist {
    p: Tensor<3>,
    p_ln_p: Tensor<3>,
}

impl DenseDist {
    fn new(logp: Tensor<3>) -> Self {
        let p = logp.clone().exp();
        let p_ln_p = (p.clone() * logp).sum_dim(2);
        DenseDist { p, p_ln_p }
    }

    /// Summed over the window's tokens: KL(p || q) = sum_v p ln p - sum_v p ln q, for `logq` the
    /// other model's log-probabilities (each token's sums over the vocabulary in f32, the tokens
    /// added in f64).
    fn kl(&self, logq: Tensor<3>) -> f64 {
        let per_token = self.p_ln_p.clone() - (self.p.clone() * logq).sum_dim(2);
        to_vec(per_token).iter().map(|&x| x as f64).sum()
    }
}

/// Measure, end to end on calibration text, how much each profiled MoE layer's routing error
/// costs: for each layer l and each probe policy top-k (`cfg.sensitivity_k`), the change in
/// calibration ln(perplexity) when layer l runs the MoE under that policy and every other layer
/// runs the context (`cfg.sensitivity_context`): the dense teacher (default), or the MoE under
/// its loaded policies (then the change is from the MoE's own ln-PPL, stored as
/// `context_ln_ppl`). With the dense context each probe also records its mean KL from the dense
/// model's next-token distributions on the same tokens (`SensitivityProbe::kl`, what
/// `Cost::SensitivityKl` reads). The context's hidden state at each layer input is computed once, so a
/// probe of layer l runs only layers l..L and the head. Sets `profile.sensitivity` (and
/// replaces any there); the profile's candidates (for the probes' `rel_mse`) must be of `moe`.
/// `progress(stage, done, total)`.
pub fn add_sensitivity(
    profile: &mut Profile,
    moe: &mut Transformer,
    dense: &Transformer,
    texts: &[(String, Vec<u32>)],
    cfg: &ProfileConfig,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(), ProfileError> {
    let start = Instant::now();
    if !ladimo_moe::fingerprint_matches(moe, &profile.model) {
        let fp = ladimo_moe::model_fingerprint(moe);
        return Err(ProfileError::Invalid(format!(
            "the profile is of model {}, not of this one ({fp})",
            profile.model
        )));
    }
    if moe.layers.len() != dense.layers.len() || moe.config.hidden_size != dense.config.hidden_size {
        return Err(ProfileError::Invalid(
            "the MoE model and the dense teacher differ in shape".into(),
        ));
    }
    if !cfg.measures_sensitivity() {
        return Err(ProfileError::Invalid(
            "no sensitivity probe policy (sensitivity_k is empty)".into(),
        ));
    }
    let windows = sensitivity_windows(texts, cfg.seq_len, cfg.sensitivity_tokens);
    if windows.is_empty() {
        return Err(ProfileError::Invalid(format!(
            "no calibration text has a whole window of {} tokens",
            cfg.seq_len
        )));
    }
    let n_lang = texts.len();
    let mut count_lang = vec![0usize; n_lang];
    for (t, w) in &windows {
        count_lang[*t] += w.len() - 1;
    }
    // The context model (dense teacher, or the MoE under its own policies): each layer's input
    // per window, and the NLL per language; and the dense NLL (the same pass when dense).
    let context = cfg.sensitivity_context;
    let mut inputs: Vec<Vec<Tensor<3>>> = Vec::with_capacity(windows.len());
    // With the dense context, also the dense model's next-token distribution per window (the
    // probes' KL is measured against it; 4 windows of 512 are 400 MB for SmolLM2).
    let mut dense_dist: Vec<DenseDist> = Vec::new();
    let mut dense_nll = vec![0f64; n_lang];
    let mut context_nll = vec![0f64; n_lang];
    for (wi, (t, ids)) in windows.iter().enumerate() {
        let run = |m: &Transformer, keep: bool| -> Result<(Tensor<3>, Vec<Tensor<3>>), ProfileError> {
            let mut h = m.embed(ids_tensor(ids, 1, &m.device));
            let mut hs = Vec::with_capacity(if keep { m.layers.len() } else { 0 });
            for (l, layer) in m.layers.iter().enumerate() {
                if keep {
                    hs.push(h.clone());
                }
                h = layer
                    .forward(h, &m.rope, &mut None)
                    .map_err(|source| ModelError::Ffn { layer: l, source })?;
            }
            Ok((hidden_logp(dense, h, ids.len()), hs))
        };
        let (logp, hs) = match context {
            SensitivityContext::Dense => run(dense, true)?,
            SensitivityContext::Moe => run(moe, true)?,
        };
        let nll = window_nll(logp.clone(), ids);
        context_nll[*t] += nll;
        dense_nll[*t] += match context {
            SensitivityContext::Dense => {
                dense_dist.push(DenseDist::new(logp));
                nll
            }
            SensitivityContext::Moe => window_nll(run(dense, false)?.0, ids),
        };
        inputs.push(hs);
        progress("sensitivity context", wi + 1, windows.len());
    }
    let total_count: usize = count_lang.iter().sum();
    let ln_ppl = |nll: &[f64]| nll.iter().sum::<f64>() / total_count as f64;
    let dense_ln_ppl = ln_ppl(&dense_nll);
    let context_ln_ppl = ln_ppl(&context_nll);

    let probes_of =
        |e: usize| -> Vec<Policy> { cfg.sensitivity_ks(e).into_iter().map(|k| Policy::TopK { k }).collect() };
    let total: usize = profile.layers.iter().map(|lp| probes_of(lp.num_experts).len()).sum();
    let mut done = 0;
    let mut layers = Vec::with_capacity(profile.layers.len());
    for lp in &profile.layers {
        let l = lp.layer;
        let original = moe_block(moe, l)
            .ok_or_else(|| ProfileError::Invalid(format!("layer {l} of the profile is not an MoE layer of the model")))?
            .policy
            .clone();
        let mut probes = Vec::new();
        for policy in probes_of(lp.num_experts) {
            let cand = lp
                .candidates
                .iter()
                .find(|c| c.policy == policy && c.is_plain())
                .ok_or_else(|| ProfileError::Invalid(format!("probe {policy} is not a candidate of layer {l}")))?;
            moe_block_mut(moe, l).expect("MoE layer").set_policy(policy.clone())?;
            let mut nll = vec![0f64; n_lang];
            let mut kl = 0f64;
            for (wi, ((t, ids), hs)) in windows.iter().zip(&inputs).enumerate() {
                let mut h = moe.layers[l]
                    .forward(hs[l].clone(), &moe.rope, &mut None)
                    .map_err(|source| ModelError::Ffn { layer: l, source })?;
                let rest = match context {
                    SensitivityContext::Dense => &dense.layers,
                    SensitivityContext::Moe => &moe.layers,
                };
                for (j, layer) in rest.iter().enumerate().skip(l + 1) {
                    h = layer
                        .forward(h, &dense.rope, &mut None)
                        .map_err(|source| ModelError::Ffn { layer: j, source })?;
                }
                let logq = hidden_logp(dense, h, ids.len());
                if let Some(d) = dense_dist.get(wi) {
                    kl += d.kl(logq.clone());
                }
                nll[*t] += window_nll(logq, ids);
            }
            probes.push(SensitivityProbe {
                policy: policy.clone(),
                rel_mse: cand.rel_mse,
                mean_experts: cand.mean_experts,
                delta_ln_ppl: ln_ppl(&nll) - context_ln_ppl,
                kl: (context == SensitivityContext::Dense).then(|| kl / total_count as f64),
                delta_ln_ppl_by_lang: texts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| count_lang[*i] > 0)
                    .map(|(i, (lang, _))| (lang.clone(), (nll[i] - context_nll[i]) / count_lang[i] as f64))
                    .collect(),
            });
            done += 1;
            progress("sensitivity", done, total);
        }
        let b = moe_block_mut(moe, l).expect("MoE layer");
        b.set_policy(original)?;
        b.reset_stats();
        layers.push(LayerSensitivity {
            layer: l,
            weight: crate::weight_of(&probes, |p| p.delta_ln_ppl),
            probes,
        });
    }
    profile.sensitivity = Some(Sensitivity {
        tokens: texts
            .iter()
            .enumerate()
            .filter(|(i, _)| count_lang[*i] > 0)
            .map(|(i, (lang, _))| {
                (
                    lang.clone(),
                    count_lang[i] + windows.iter().filter(|(t, _)| *t == i).count(),
                )
            })
            .collect(),
        seq_len: cfg.seq_len,
        dense_ln_ppl,
        context,
        context_ln_ppl: (context == SensitivityContext::Moe).then_some(context_ln_ppl),
        seconds: start.elapsed().as_secs_f64(),
        layers,
    });
    // The context passes ran every block: their routing counts are not the profile's.
    for l in 0..moe.layers.len() {
        if let Some(b) = moe_block(moe, l) {
            b.reset_stats();
        }
    }
    Ok(())
}
