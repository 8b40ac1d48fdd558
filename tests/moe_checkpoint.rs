//! MoE checkpoints (save, load, Mixtral or not), policy files, and the stage-2 profiler and solver,
//! on the committed tiny models.

use std::path::Path;

use ladimo_io::{Checkpoint, HostTensor};
use ladimo_kernel::testdata::uniform;
use ladimo_model::Transformer;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_moe::policy_file::LayerPolicy;
use ladimo_moe::{
    Combine, CombineWeights, HostFfn, MoeBlock, Policy, PolicyFile, load_model, model_fingerprint, moe_block,
    save_moe_checkpoint,
};
use ladimo_profile::{
    Budget, BudgetKind, Cost, LayerProfile, Profile, ProfileConfig, SensitivityContext, add_sensitivity,
    predict_ppl_ratio, profile_model, solve_profile, uniform_cost,
};
use ladimo_tests::{fixture, max_abs_diff};

fn device() -> burn::tensor::Device {
    ladimo_backend::device()
}

/// Layer `layer` of `ckpt` cut into `n` contiguous experts (plus `shared` neurons from the end).
fn block(ckpt: &Checkpoint, layer: usize, n: usize, shared: usize, combine: Combine, policy: Policy) -> MoeBlock {
    let ffn = HostFfn::from_checkpoint(ckpt, layer).unwrap();
    let (h, f) = (ffn.hidden_size(), ffn.intermediate_size());
    let routed = f - shared;
    let experts: Vec<HostFfn> = (0..n)
        .map(|e| ffn.select_neurons(&(e * routed / n..(e + 1) * routed / n).collect::<Vec<_>>()))
        .collect();
    let shared = (shared > 0).then(|| ffn.select_neurons(&(routed..f).collect::<Vec<_>>()));
    let router = HostTensor::new(vec![n, h], uniform(n * h, 0.5, layer as u64 + 7));
    MoeBlock::new(&router, None, &experts, shared.as_ref(), combine, policy, &device()).unwrap()
}

fn renorm(scale: f32) -> Combine {
    Combine {
        weights: CombineWeights::Renormalized,
        scale,
    }
}

fn logits(model: &Transformer, ids: &[u32]) -> Vec<f32> {
    to_vec(model.forward(ids_tensor(ids, 1, &model.device)).unwrap())
}

const IDS: [u32; 12] = [1, 5, 9, 17, 33, 2, 8, 40, 3, 11, 60, 7];

/// Build the MoE model in memory, save it, load it back: same logits; returns the saved section.
fn roundtrip(name: &str, blocks: impl Fn(&Checkpoint, usize) -> Option<MoeBlock>) -> ladimo_moe::MoeSection {
    let ckpt = Checkpoint::open(fixture(name)).unwrap();
    let mut model = Transformer::from_checkpoint(&ckpt, &device()).unwrap();
    let made: Vec<Option<MoeBlock>> = (0..ckpt.config.num_layers).map(|l| blocks(&ckpt, l)).collect();
    let refs: Vec<Option<&MoeBlock>> = made.iter().map(Option::as_ref).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("moe");
    let section = save_moe_checkpoint(&ckpt, &refs, &out).unwrap();
    // Saving again into an existing folder is refused, and leaves it as it was.
    let err = save_moe_checkpoint(&ckpt, &refs, &out).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    for (l, b) in made.into_iter().enumerate() {
        if let Some(b) = b {
            model.layers[l].ffn = Box::new(b);
        }
    }
    let want = logits(&model, &IDS);
    let loaded = load_model(&out, &device()).unwrap();
    let got = logits(&loaded, &IDS);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_abs_diff(&got, &want) / scale;
    assert!(d < 1e-5, "{name}: reloaded MoE logits differ by {d} (relative)");
    assert_eq!(model_fingerprint(&model), model_fingerprint(&loaded));
    // Loaded with f16 weights (`--dtype f16` rounds the routers as it reads them) it is the same
    // model to a policy file or profile.
    let f16 = ladimo_model::open_rounded(&out, ladimo_model::Dtype::F16).unwrap();
    let f16 = ladimo_moe::checkpoint::load_model_from(&f16, &device()).unwrap();
    assert_eq!(model_fingerprint(&f16), model_fingerprint(&loaded), "{name}");
    assert!(
        ladimo_moe::fingerprint_matches(&f16, &model_fingerprint(&model)),
        "{name}"
    );
    // No temporary folder is left beside the output.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    section
}

/// The cost of a layer's TopK { k } candidate in `costs` (one per candidate, as `Cost::table` gives).
fn topk_cost(layer: &LayerProfile, costs: &[f64], k: usize) -> f64 {
    let i = layer
        .candidates
        .iter()
        .position(|c| c.policy == Policy::TopK { k })
        .unwrap_or_else(|| panic!("layer {}: no top-{k} candidate", layer.layer));
    costs[i]
}

/// A budget of `fraction` of the dense FFN's activated parameters.
fn ffn_budget(fraction: f64) -> Budget {
    Budget {
        kind: BudgetKind::FfnParams,
        fraction: Some(fraction),
        absolute: None,
    }
}

#[test]
fn uniform_topk_renormalised_is_saved_as_mixtral() {
    let s = roundtrip("tiny-llama3", |c, l| {
        Some(block(c, l, 4, 0, renorm(2.0), Policy::TopK { k: 2 }))
    });
    assert!(s.mixtral_exact, "{:?}", s.why_not_mixtral);
}

#[test]
fn mixtral_config_and_names() {
    let ckpt = Checkpoint::open(fixture("tiny-llama3")).unwrap();
    let made: Vec<MoeBlock> = (0..ckpt.config.num_layers)
        .map(|l| block(&ckpt, l, 4, 0, renorm(1.0), Policy::TopK { k: 2 }))
        .collect();
    let refs: Vec<Option<&MoeBlock>> = made.iter().map(Some).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    save_moe_checkpoint(&ckpt, &refs, &out).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "MixtralForCausalLM");
    assert_eq!(cfg["num_local_experts"], 4);
    assert_eq!(cfg["num_experts_per_tok"], 2);
    assert_eq!(cfg["intermediate_size"], 40);
    let c = Checkpoint::open(&out).unwrap();
    for n in [
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.3.w1.weight",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "model.layers.1.block_sparse_moe.experts.3.w3.weight",
    ] {
        assert!(c.has(n), "{n}");
    }
    assert!(!c.has("model.layers.0.mlp.gate_proj.weight"));
    assert!(out.join("tokenizer.json").exists());
}

#[test]
fn shared_experts_mixed_policies_and_dense_layers_are_not_mixtral_but_load() {
    let s = roundtrip("tiny-llama3", |c, l| {
        (l == 1).then(|| {
            block(
                c,
                l,
                4,
                32,
                Combine {
                    weights: CombineWeights::Unit,
                    scale: 1.0,
                },
                Policy::TopP {
                    p: 0.6,
                    min_k: 1,
                    max_k: 3,
                },
            )
        })
    });
    assert!(!s.mixtral_exact);
    assert!(s.why_not_mixtral.unwrap().contains("dense"));
    let s = roundtrip("tiny-llama3", |c, l| {
        Some(block(c, l, 4, 16, renorm(3.0), Policy::TopK { k: 2 }))
    });
    assert!(s.why_not_mixtral.unwrap().contains("shared"));
}

#[test]
fn hyperclova_x_base_roundtrips() {
    let s = roundtrip("tiny-hcx", |c, l| {
        Some(block(c, l, 4, 0, renorm(2.0), Policy::TopK { k: 3 }))
    });
    assert!(!s.mixtral_exact);
    assert!(s.why_not_mixtral.unwrap().contains("HyperClovaX"));
}

fn tiny_moe(unit: bool) -> (Transformer, Transformer) {
    let ckpt = Checkpoint::open(fixture("tiny-llama3")).unwrap();
    let dense = Transformer::from_checkpoint(&ckpt, &device()).unwrap();
    let mut moe = Transformer::from_checkpoint(&ckpt, &device()).unwrap();
    let combine = if unit {
        Combine {
            weights: CombineWeights::Unit,
            scale: 1.0,
        }
    } else {
        renorm(4.0)
    };
    for l in 0..ckpt.config.num_layers {
        moe.layers[l].ffn = Box::new(block(&ckpt, l, 4, 0, combine, Policy::TopK { k: 4 }));
    }
    (dense, moe)
}

#[test]
fn policy_files_apply_and_bad_ones_are_refused() {
    let (_, mut moe) = tiny_moe(false);
    let fp = model_fingerprint(&moe);
    let file = |layers: Vec<(usize, Policy)>, model: &str| PolicyFile {
        model: model.into(),
        note: String::new(),
        layers: layers
            .into_iter()
            .map(|(layer, policy)| LayerPolicy {
                layer,
                policy: Some(policy),
                sparsity: None,
            })
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    let good = file(vec![(0, Policy::TopK { k: 1 }), (1, Policy::TopK { k: 3 })], &fp);
    good.write(&p).unwrap();
    let back = PolicyFile::read(&p).unwrap();
    assert_eq!(back, good);
    back.apply(&mut moe, &p).unwrap();
    assert_eq!(moe_block(&moe, 1).unwrap().policy, Policy::TopK { k: 3 });
    let bad = [
        (
            file(vec![(0, Policy::TopK { k: 1 })], &fp),
            "no policy for MoE layers [1]",
        ),
        (
            file(
                vec![
                    (0, Policy::TopK { k: 1 }),
                    (1, Policy::TopK { k: 1 }),
                    (5, Policy::TopK { k: 1 }),
                ],
                &fp,
            ),
            "layer 5",
        ),
        (
            file(vec![(0, Policy::TopK { k: 9 }), (1, Policy::TopK { k: 1 })], &fp),
            "layer 0",
        ),
        (
            file(
                vec![(0, Policy::TopK { k: 1 }), (1, Policy::TopK { k: 1 })],
                "0123456789abcdef",
            ),
            "made for model",
        ),
    ];
    for (f, want) in bad {
        let err = f.apply(&mut moe, &p).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("p.toml"), "{err}");
        // Nothing changed.
        assert_eq!(moe_block(&moe, 1).unwrap().policy, Policy::TopK { k: 3 });
    }
    std::fs::write(&p, "model = \"x\"\nlayers = []\nextra = 1\n").unwrap();
    let err = PolicyFile::read(&p).unwrap_err().to_string();
    assert!(err.contains("p.toml") && err.contains("extra"), "{err}");
}

fn texts() -> Vec<(String, Vec<u32>)> {
    let ids = |seed: u64| -> Vec<u32> {
        uniform(64, 1.0, seed)
            .into_iter()
            .map(|v| ((v + 1.0) * 60.0) as u32 % 120)
            .collect()
    };
    vec![("en".into(), ids(1)), ("ko".into(), ids(2))]
}

fn small_cfg() -> ProfileConfig {
    ProfileConfig {
        seq_len: 16,
        latency_tokens: 16,
        latency_repeats: 1,
        chunk_tokens: 40,
        uniform_k: Some(vec![2, 3]),
        sensitivity_k: Some(vec![]),
        ..Default::default()
    }
}

#[test]
fn profile_costs_are_exact_where_known_and_solver_meets_budgets() {
    // Unit combine: all experts together are the dense FFN, so top-4 of 4 costs nothing.
    let (dense, mut moe) = tiny_moe(true);
    let p = profile_model(&mut moe, &dense, &texts(), &small_cfg(), "tiny", |_, _, _| {}).unwrap();
    assert_eq!(p.layers.len(), 2);
    assert_eq!(p.tokens["en"], 64);
    for l in &p.layers {
        let all = l.candidates.iter().find(|c| c.policy == Policy::TopK { k: 4 }).unwrap();
        assert!(
            all.rel_mse < 1e-9,
            "layer {}: top-4 of 4 rel MSE {}",
            l.layer,
            all.rel_mse
        );
        assert!((all.mean_experts - 4.0).abs() < 1e-12);
        assert_eq!(
            all.active_params,
            (l.fixed_params + l.expert_params.iter().sum::<usize>()) as f64
        );
        let one = l.candidates.iter().find(|c| c.policy == Policy::TopK { k: 1 }).unwrap();
        assert!(one.rel_mse > 1e-3 && (one.mean_experts - 1.0).abs() < 1e-12);
        // The routing histograms count every token once.
        let d = &l.routing["all"];
        assert_eq!(d.top1_hist.iter().sum::<f64>() as usize, 128);
        assert_eq!(l.routing["en"].tokens, 64);
        assert!((d.cum_topk_mean[3] - 1.0).abs() < 1e-5);
        // Every candidate's per-language errors are consistent with the total.
        for c in &l.candidates {
            assert!(c.rel_mse_by_lang.values().all(|v| v.is_finite() && *v >= 0.0));
        }
    }
    assert_eq!(p.uniform.len(), 2);
    for frac in [0.5, 0.75, 0.9] {
        let b = ffn_budget(frac);
        let s = solve_profile(&p, &b, Cost::RelMse).unwrap();
        assert!(
            s.used <= s.budget_value * (1.0 + 1e-12),
            "{frac}: {} > {}",
            s.used,
            s.budget_value
        );
        // Brute force over the 2 layers' candidates: nothing cheaper fits.
        let (l0, l1) = (&p.layers[0].candidates, &p.layers[1].candidates);
        let best = l0
            .iter()
            .flat_map(|a| {
                l1.iter()
                    .map(move |b| (a.active_params + b.active_params, a.rel_mse + b.rel_mse))
            })
            .filter(|(w, _)| *w <= s.budget_value)
            .map(|(_, c)| c)
            .fold(f64::INFINITY, f64::min);
        assert!(
            (s.cost - best).abs() <= 1e-12 * best.max(1.0),
            "{frac}: {} vs brute force {best}",
            s.cost
        );
        s.policies.apply(&mut moe, Path::new("solved.toml")).unwrap();
    }
    let too_small = ffn_budget(0.01);
    let err = solve_profile(&p, &too_small, Cost::RelMse).unwrap_err().to_string();
    assert!(
        err.contains("below the cheapest") && err.contains("% of dense"),
        "{err}"
    );
}

#[test]
fn a_profile_without_latency_keeps_every_other_figure_and_refuses_a_latency_budget() {
    let (dense, mut moe) = tiny_moe(true);
    let timed = profile_model(&mut moe, &dense, &texts(), &small_cfg(), "tiny", |_, _, _| {}).unwrap();
    let cfg = ProfileConfig {
        latency_repeats: 0,
        ..small_cfg()
    };
    let untimed = profile_model(&mut moe, &dense, &texts(), &cfg, "tiny", |_, _, _| {}).unwrap();
    assert!(timed.latency_measured && !untimed.latency_measured);
    assert!(timed.layers.iter().all(|l| l.dense_seconds_per_token > 0.0));
    for (a, b) in timed.layers.iter().zip(&untimed.layers) {
        assert_eq!(b.dense_seconds_per_token, 0.0);
        for (ca, cb) in a.candidates.iter().zip(&b.candidates) {
            assert_eq!(cb.seconds_per_token, 0.0);
            let zero = |c: &ladimo_profile::CandidateCost| ladimo_profile::CandidateCost {
                seconds_per_token: 0.0,
                ..c.clone()
            };
            assert_eq!(zero(ca), *cb);
        }
    }
    // Parameter budgets solve the same; a latency budget is refused with the reason.
    let b = ffn_budget(0.75);
    assert_eq!(
        solve_profile(&timed, &b, Cost::RelMse).unwrap().policies,
        solve_profile(&untimed, &b, Cost::RelMse).unwrap().policies
    );
    // (Generous: a tiny block's timing is mostly overhead, so a tight one may not fit.)
    let lat = Budget {
        kind: BudgetKind::Latency,
        fraction: Some(100.0),
        absolute: None,
    };
    assert!(solve_profile(&timed, &lat, Cost::RelMse).is_ok());
    let err = solve_profile(&untimed, &lat, Cost::RelMse).unwrap_err().to_string();
    assert!(err.contains("latency_repeats = 0"), "{err}");
}

#[test]
fn profile_refuses_a_text_shorter_than_a_window() {
    let (dense, mut moe) = tiny_moe(false);
    let mut t = texts();
    t[1].1.truncate(8);
    let err = profile_model(&mut moe, &dense, &t, &small_cfg(), "tiny", |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("[\"ko\"]") && err.contains("fewer tokens"), "{err}");
}

#[test]
fn layer_sensitivity_is_zero_when_lossless_and_drives_an_exact_solver() {
    // Unit combine: top-4 of 4 is the dense FFN, so that probe changes nothing; top-1 loses.
    let (dense, mut moe) = tiny_moe(true);
    let mut cfg = small_cfg();
    let p0 = profile_model(&mut moe, &dense, &texts(), &cfg, "tiny", |_, _, _| {}).unwrap();
    assert!(p0.sensitivity.is_none());
    // A profile written before sensitivity existed still reads, without it.
    let mut old = serde_json::to_value(&p0).unwrap();
    old.as_object_mut().unwrap().remove("sensitivity");
    let old: Profile = serde_json::from_value(old).unwrap();
    assert_eq!(old, p0);
    assert_eq!(Cost::default_for(&old), Cost::RelMse);
    let b = ffn_budget(0.75);
    let err = solve_profile(&old, &b, Cost::Sensitivity).unwrap_err().to_string();
    assert!(err.contains("no sensitivity data"), "{err}");

    // k = 9 exceeds the 4 experts and is skipped; 3 windows of 16 tokens, en/ko/en.
    cfg.sensitivity_k = Some(vec![1, 2, 4, 9]);
    cfg.sensitivity_tokens = 40;
    let mut p = p0.clone();
    let mut stages = Vec::new();
    add_sensitivity(&mut p, &mut moe, &dense, &texts(), &cfg, |s, d, t| {
        stages.push((s.to_string(), d, t))
    })
    .unwrap();
    assert_eq!(stages.last().unwrap(), &("sensitivity".to_string(), 6, 6));
    // Probing restores the model's policies.
    assert!((0..2).all(|l| moe_block(&moe, l).unwrap().policy == Policy::TopK { k: 4 }));
    let s = p.sensitivity.as_ref().unwrap();
    assert_eq!(s.tokens["en"], 32);
    assert_eq!(s.tokens["ko"], 16);
    assert_eq!(s.layers.len(), 2);
    for l in &s.layers {
        assert_eq!(l.probes.len(), 3);
        let all = l.probes.iter().find(|q| q.policy == Policy::TopK { k: 4 }).unwrap();
        assert!(
            all.delta_ln_ppl.abs() < 1e-4,
            "layer {}: top-4 of 4 {}",
            l.layer,
            all.delta_ln_ppl
        );
        // Top-1 is lossy: it moves the perplexity (the fixture's weights are random, so it may
        // move it either way).
        let one = l.probes.iter().find(|q| q.policy == Policy::TopK { k: 1 }).unwrap();
        assert!(
            one.delta_ln_ppl.abs() > 1e-3,
            "layer {}: top-1 {}",
            l.layer,
            one.delta_ln_ppl
        );
        assert!(one.delta_ln_ppl_by_lang.values().all(|v| v.is_finite()));
        assert!(l.weight.is_finite());
        // The KL to the dense model: recorded with the dense context, about 0 where the block
        // is the dense FFN, positive where it is lossy, and never negative (unlike the ln-PPL
        // change, which is a difference of two sampled losses).
        let kl = |q: &ladimo_profile::SensitivityProbe| q.kl.expect("KL with the dense context");
        assert!(kl(all).abs() < 1e-5, "layer {}: top-4 of 4 KL {}", l.layer, kl(all));
        assert!(kl(one) > 1e-4, "layer {}: top-1 KL {}", l.layer, kl(one));
        assert!(l.probes.iter().all(|q| kl(q) >= -1e-6));
    }
    // The same probes measured inside profile_model.
    let p2 = profile_model(&mut moe, &dense, &texts(), &cfg, "tiny", |_, _, _| {}).unwrap();
    let s2 = p2.sensitivity.as_ref().unwrap();
    for (a, b) in s.layers.iter().zip(&s2.layers) {
        for (x, y) in a.probes.iter().zip(&b.probes) {
            assert!((x.delta_ln_ppl - y.delta_ln_ppl).abs() < 1e-5);
        }
    }
    // Sensitivity data with its KL makes the KL cost the default; the prediction is the summed
    // cost itself.
    assert_eq!(Cost::default_for(&p), Cost::SensitivityKl);
    for cost in [Cost::Sensitivity, Cost::SensitivityLinear, Cost::SensitivityKl] {
        let table = cost.table(&p).unwrap();
        for (l, costs) in p.layers.iter().zip(&table) {
            let at = |k: usize| topk_cost(l, costs, k);
            assert!(at(4).abs() < 1e-4, "{cost:?} layer {}", l.layer);
            if cost != Cost::SensitivityLinear {
                // Non-increasing in experts run and non-negative.
                assert!(at(1) >= at(2) && at(2) >= at(4) && at(4) >= 0.0, "layer {}", l.layer);
            }
        }
        for frac in [0.5, 0.75, 0.9] {
            let b = ffn_budget(frac);
            let sol = solve_profile(&p, &b, cost).unwrap();
            assert!(sol.used <= sol.budget_value * (1.0 + 1e-12));
            assert!((sol.predicted_ppl_ratio - sol.cost.exp()).abs() < 1e-12);
            let (l0, l1) = (&p.layers[0].candidates, &p.layers[1].candidates);
            let mut best = f64::INFINITY;
            for (i, a) in l0.iter().enumerate() {
                for (j, b) in l1.iter().enumerate() {
                    if a.active_params + b.active_params <= sol.budget_value {
                        best = best.min(table[0][i] + table[1][j]);
                    }
                }
            }
            assert!(
                (sol.cost - best).abs() <= 1e-12 * best.abs().max(1.0),
                "{cost:?} {frac}: {} vs brute force {best}",
                sol.cost
            );
        }
    }
    // A profile of another model is refused.
    let (_, mut other) = tiny_moe(false);
    let mut q = p0.clone();
    q.model = "0123456789abcdef".into();
    let err = add_sensitivity(&mut q, &mut other, &dense, &texts(), &cfg, |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("not of this one"), "{err}");
}

/// With the MoE as context, each probe is measured around the model's own policies: the probe
/// at that policy changes nothing, and the solver's prediction starts from the MoE's own
/// perplexity (the context offset), not the dense one.
#[test]
fn sensitivity_around_the_moe_operating_point() {
    use ladimo_moe::moe_block_mut;
    let (dense, mut moe) = tiny_moe(true);
    for l in 0..2 {
        moe_block_mut(&mut moe, l)
            .unwrap()
            .set_policy(Policy::TopK { k: 2 })
            .unwrap();
    }
    let mut cfg = small_cfg();
    let mut p = profile_model(&mut moe, &dense, &texts(), &cfg, "tiny", |_, _, _| {}).unwrap();
    cfg.sensitivity_k = Some(vec![1, 2, 3]);
    cfg.sensitivity_tokens = 40;
    cfg.sensitivity_context = SensitivityContext::Moe;
    add_sensitivity(&mut p, &mut moe, &dense, &texts(), &cfg, |_, _, _| {}).unwrap();
    assert!((0..2).all(|l| moe_block(&moe, l).unwrap().policy == Policy::TopK { k: 2 }));
    let s = p.sensitivity.clone().unwrap();
    assert_eq!(s.context, SensitivityContext::Moe);
    let offset = s.context_offset();
    assert!(offset.abs() > 1e-3, "top-2 of 4 everywhere is lossy: offset {offset}");
    for l in &s.layers {
        let own = l.probes.iter().find(|q| q.policy == Policy::TopK { k: 2 }).unwrap();
        assert!(
            own.delta_ln_ppl.abs() < 1e-6,
            "layer {}: the probe at the model's own policy",
            l.layer
        );
    }
    // Deltas below the context's own perplexity are kept (lifted, not cut at 0): every layer's
    // cost curve is non-negative, touches 0, and never rises with more experts.
    for (l, costs) in p.layers.iter().zip(Cost::Sensitivity.table(&p).unwrap()) {
        let at = |k: usize| topk_cost(l, &costs, k);
        assert!(costs.iter().all(|&c| c >= 0.0), "layer {}", l.layer);
        assert!(at(1) >= at(2) && at(2) >= at(3) && at(3) >= at(4), "layer {}", l.layer);
        assert!(
            costs.iter().cloned().fold(f64::INFINITY, f64::min) < 1e-12,
            "layer {}",
            l.layer
        );
    }
    let (c2, _) = uniform_cost(&p, &Policy::TopK { k: 2 }, Cost::Sensitivity).unwrap();
    assert!(predict_ppl_ratio(&p, Cost::Sensitivity, c2).is_finite());
    let b = ffn_budget(0.6);
    let sol = solve_profile(&p, &b, Cost::Sensitivity).unwrap();
    assert!((sol.predicted_ppl_ratio - predict_ppl_ratio(&p, Cost::Sensitivity, sol.cost)).abs() < 1e-12);
    // The KL is measured against the dense model only: not with the MoE as context, and the
    // KL cost says so instead of reading missing probes as free.
    assert!(s.layers.iter().all(|l| l.probes.iter().all(|q| q.kl.is_none())));
    assert_eq!(Cost::default_for(&p), Cost::Sensitivity);
    let err = solve_profile(&p, &b, Cost::SensitivityKl).unwrap_err().to_string();
    assert!(err.contains("sensitivity-kl") && err.contains("no KL"), "{err}");
    // A profile from before the context existed reads as dense-context.
    let mut old = serde_json::to_value(&p).unwrap();
    let so = old["sensitivity"].as_object_mut().unwrap();
    so.remove("context");
    so.remove("context_ln_ppl");
    let old: Profile = serde_json::from_value(old).unwrap();
    let so = old.sensitivity.unwrap();
    assert_eq!((so.context, so.context_offset()), (SensitivityContext::Dense, 0.0));
}

/// Per profiled layer, the dense teacher's FFN inputs and outputs on `texts` (windows of
/// `seq_len`), as the profiler computes them.
fn teacher_ffn(dense: &Transformer, seq_len: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut out = vec![(Vec::new(), Vec::new()); dense.layers.len()];
    for (_, ids) in texts() {
        for w in ids.chunks_exact(seq_len) {
            let mut h = dense.embed(ids_tensor(w, 1, &dense.device));
            for (l, layer) in dense.layers.iter().enumerate() {
                let (h_attn, x) = layer.attention_part(h, &dense.rope, &mut None);
                let y = layer.ffn.forward(x.clone()).unwrap();
                h = layer.ffn_residual(h_attn, y.clone());
                out[l].0.extend(to_vec(x));
                out[l].1.extend(to_vec(y));
            }
        }
    }
    out
}

#[test]
fn teal_candidates_inside_experts_are_exact_and_the_solver_combines_them() {
    use ladimo_model::FeedForward;
    // Off by default: the default config does not even serialise the field (stage keys stay).
    assert!(
        !serde_json::to_string(&ProfileConfig::default())
            .unwrap()
            .contains("teal")
    );
    let (dense, mut moe) = tiny_moe(false);
    let plain = profile_model(&mut moe, &dense, &texts(), &small_cfg(), "tiny", |_, _, _| {}).unwrap();
    let json = serde_json::to_string(&plain).unwrap();
    assert!(!json.contains("sparsity") && !json.contains("threshold_saved"));
    let cfg = ProfileConfig {
        teal_sparsities: vec![0.3, 0.6],
        ..small_cfg()
    };
    let p = profile_model(&mut moe, &dense, &texts(), &cfg, "tiny", |_, _, _| {}).unwrap();
    // The profiler restored the blocks.
    assert!((0..2).all(|l| moe_block(&moe, l).unwrap().sparsity().is_none()));
    let teacher = teacher_ffn(&dense, cfg.seq_len);
    let h = dense.config.hidden_size;
    for (lp, lp0) in p.layers.iter().zip(&plain.layers) {
        // The plain candidates are those of a profile without thresholds; each top-k follows
        // with two levels.
        let plain_here: Vec<_> = lp.candidates.iter().filter(|c| c.is_plain()).collect();
        assert_eq!(plain_here.len(), lp0.candidates.len());
        for (a, b) in plain_here.iter().zip(&lp0.candidates) {
            assert_eq!(
                (&a.policy, a.rel_mse, a.active_params),
                (&b.policy, b.rel_mse, b.active_params)
            );
        }
        let teal: Vec<_> = lp.candidates.iter().filter(|c| !c.is_plain()).collect();
        assert_eq!(teal.len(), 4 * 2, "layer {}", lp.layer);
        let (x, y) = &teacher[lp.layer];
        let n = x.len() / h;
        let xt = burn::tensor::Tensor::<2>::from_data(burn::tensor::TensorData::new(x.clone(), [n, h]), &device());
        for c in teal {
            // The block itself, under the candidate's routing and thresholds, on the teacher's
            // inputs: the profiled error and parameters read are its own.
            let mut b = ladimo_moe::moe_block_mut(&mut moe, lp.layer).unwrap();
            b.set_policy(c.policy.clone()).unwrap();
            b.set_sparsity(c.sparsity.clone()).unwrap();
            b.reset_stats();
            let got = to_vec(b.forward_tokens(xt.clone()).unwrap());
            let err: f64 = got.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let y2: f64 = y.iter().map(|v| (*v as f64).powi(2)).sum();
            let what = format!("layer {} {} {:?}", lp.layer, c.policy, c.sparsity);
            assert!(
                (err / y2 - c.rel_mse).abs() <= 1e-4 * c.rel_mse,
                "{what}: {} vs {}",
                err / y2,
                c.rel_mse
            );
            let active = b.active_params_per_token();
            assert!(
                (active - c.active_params).abs() <= 1e-9 * active,
                "{what}: {active} vs {}",
                c.active_params
            );
            let st = b.stats();
            assert!(
                (st.threshold_saved / n as f64 - c.threshold_saved).abs() <= 1e-9 * c.threshold_saved,
                "{what}"
            );
            let same_k = lp0.candidates.iter().find(|p| p.policy == c.policy).unwrap();
            assert!(
                c.threshold_saved > 0.0 && c.active_params < same_k.active_params,
                "{what}"
            );
            b = ladimo_moe::moe_block_mut(&mut moe, lp.layer).unwrap();
            b.set_sparsity(None).unwrap();
            b.set_policy(Policy::TopK { k: 4 }).unwrap();
        }
    }
    // The solver picks among all candidates (brute force over the two layers agrees), writes the
    // thresholds it chose into the policy file, and splits the FFN saving.
    let mut picked_teal = false;
    for frac in [0.3, 0.45, 0.6, 0.75, 0.9] {
        let s = solve_profile(&p, &ffn_budget(frac), Cost::RelMse).unwrap();
        let (l0, l1) = (&p.layers[0].candidates, &p.layers[1].candidates);
        let best = l0
            .iter()
            .flat_map(|a| {
                l1.iter()
                    .map(move |b| (a.active_params + b.active_params, a.rel_mse + b.rel_mse))
            })
            .filter(|(w, _)| *w <= s.budget_value)
            .map(|(_, c)| c)
            .fold(f64::INFINITY, f64::min);
        assert!(
            (s.cost - best).abs() <= 1e-12 * best.max(1.0),
            "{frac}: {} vs {best}",
            s.cost
        );
        let saved_by_thresholds: f64 = s
            .policies
            .layers
            .iter()
            .zip(&p.layers)
            .map(|(lpol, lp)| {
                let c = lp
                    .candidates
                    .iter()
                    .find(|c| Some(&c.policy) == lpol.policy.as_ref() && c.sparsity == lpol.sparsity)
                    .expect("the file's choice is a candidate");
                c.threshold_saved
            })
            .sum();
        assert!((s.predicted_threshold_saved - saved_by_thresholds).abs() <= 1e-9 * s.dense_ffn_params);
        match s.ffn_saving_split() {
            Some((experts, thresholds)) => {
                picked_teal = true;
                assert_eq!(thresholds, saved_by_thresholds);
                let total = s.dense_ffn_params - s.predicted_ffn_params;
                assert!(
                    (experts + thresholds - total).abs() <= 1e-9 * s.dense_ffn_params,
                    "{frac}"
                );
            }
            None => assert_eq!(saved_by_thresholds, 0.0),
        }
        s.policies.apply(&mut moe, Path::new("solved.toml")).unwrap();
        for (lpol, l) in s.policies.layers.iter().zip(0..) {
            assert_eq!(moe_block(&moe, l).unwrap().sparsity(), lpol.sparsity.as_ref());
        }
    }
    assert!(
        picked_teal,
        "no budget chose thresholds: the test does not test the split"
    );
    // Shares outside (0, 1) are refused by name.
    let bad = ProfileConfig {
        teal_sparsities: vec![0.5, 1.5],
        ..small_cfg()
    };
    let err = profile_model(&mut moe, &dense, &texts(), &bad, "tiny", |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("teal_sparsities: 1.5"), "{err}");
}
