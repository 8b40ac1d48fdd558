//! MoE blocks against the dense FFN they were cut from (on real SmolLM2 weights and hidden states),
//! sparse dispatch against the dense reference path, bad input, and MoE layers inside a model.

use burn::tensor::{Tensor, TensorData};
use ladimo_io::{Checkpoint, HostTensor};
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{FeedForward, Transformer};
use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, MoeError, Policy};
use ladimo_tests::{rel_err, smol};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const TEXT: &str = "It was a truth universally acknowledged that a single man in possession of a good fortune \
                    must be in want of a wife. 대한민국은 민주공화국이다. fn main() { println!(\"{}\", 42); }";

/// The real input of layer `layer`'s FFN on TEXT: `[tokens, hidden]`.
fn ffn_input(layer: usize) -> Tensor<2> {
    ladimo_tests::smol_ffn_input(TEXT, layer)
}

fn random_router(n: usize, h: usize, seed: u64) -> HostTensor {
    let mut rng = StdRng::seed_from_u64(seed);
    HostTensor::new(vec![n, h], (0..n * h).map(|_| rng.random_range(-0.1..0.1)).collect())
}

fn contiguous(f: usize, n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|e| (e * f / n..(e + 1) * f / n).collect()).collect()
}

fn random_partition(idx: Vec<usize>, n: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut idx = idx;
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let f = idx.len();
    (0..n).map(|e| idx[e * f / n..(e + 1) * f / n].to_vec()).collect()
}

fn unit_all(n: usize) -> (Combine, Policy) {
    (
        Combine {
            weights: CombineWeights::Unit,
            scale: 1.0,
        },
        Policy::TopK { k: n },
    )
}

#[test]
fn experts_cut_from_a_real_ffn_with_every_expert_routed_reproduce_it() {
    let s = smol();
    let device = &s.model.device;
    let layer = 7;
    let dense = HostFfn::from_checkpoint(&s.ckpt, layer).unwrap();
    let x = ffn_input(layer);
    let want = to_vec(dense.to_dense(device).forward_any(x.clone()));
    let f = dense.intermediate_size();
    for (name, parts) in [
        ("contiguous 8", contiguous(f, 8)),
        ("random 16", random_partition((0..f).collect(), 16, 1)),
    ] {
        let experts: Vec<HostFfn> = parts.iter().map(|p| dense.select_neurons(p)).collect();
        let (combine, policy) = unit_all(parts.len());
        let router = random_router(parts.len(), 576, 2);
        let moe = MoeBlock::new(&router, None, &experts, None, combine, policy, device).unwrap();
        let got = to_vec(moe.forward_tokens(x.clone()).unwrap());
        let e = rel_err(&got, &want);
        eprintln!("{name}: relative max error {e:.2e}");
        assert!(e <= 1e-5, "{name}: {e}");
        assert_eq!(moe.stats().tokens as usize, x.dims()[0]);
    }
    // With 256 shared neurons (always on) and the rest split into 8 routed experts.
    let mut all: Vec<usize> = (0..f).collect();
    all.shuffle(&mut StdRng::seed_from_u64(3));
    let shared = dense.select_neurons(&all[..256]);
    let parts = random_partition(all[256..].to_vec(), 8, 4);
    let experts: Vec<HostFfn> = parts.iter().map(|p| dense.select_neurons(p)).collect();
    let (combine, policy) = unit_all(8);
    let moe = MoeBlock::new(
        &random_router(8, 576, 5),
        None,
        &experts,
        Some(&shared),
        combine,
        policy,
        device,
    )
    .unwrap();
    let e = rel_err(&to_vec(moe.forward_tokens(x).unwrap()), &want);
    eprintln!("shared 256 + 8 routed: relative max error {e:.2e}");
    assert!(e <= 1e-5, "shared: {e}");
}

#[test]
fn sparse_dispatch_equals_the_dense_reference_for_every_policy() {
    let s = smol();
    let device = &s.model.device;
    let dense = HostFfn::from_checkpoint(&s.ckpt, 2).unwrap();
    let x = ffn_input(2);
    let n = 8;
    let experts: Vec<HostFfn> = contiguous(1536, n).iter().map(|p| dense.select_neurons(p)).collect();
    let router = random_router(n, 576, 9);
    let bias = HostTensor::new(vec![n], (0..n).map(|i| i as f32 * 0.05).collect());
    let policies = [
        Policy::TopK { k: 2 },
        Policy::TopP {
            p: 0.5,
            min_k: 1,
            max_k: 6,
        },
        Policy::Confidence {
            tau: 0.15,
            k_low: 1,
            k_high: 4,
        },
    ];
    for policy in policies {
        for weights in [
            CombineWeights::Raw,
            CombineWeights::Renormalized,
            CombineWeights::Unit,
            CombineWeights::UnitStraightThrough,
        ] {
            let combine = Combine { weights, scale: 1.3 };
            let moe = MoeBlock::new(&router, Some(&bias), &experts, None, combine, policy.clone(), device).unwrap();
            let sparse = to_vec(moe.forward_tokens(x.clone()).unwrap());
            let reference = to_vec(moe.forward_dense(x.clone()).unwrap());
            let e = rel_err(&sparse, &reference);
            assert!(e <= 1e-5, "{policy} {weights:?}: {e}");
            // The decode path (one or two tokens at a time) gives the same rows.
            for few in 1..=ladimo_moe::FEW_TOKENS {
                let xs = x.clone().narrow(0, 3, few);
                let got = to_vec(moe.forward_tokens(xs.clone()).unwrap());
                let want = to_vec(moe.forward_dense(xs).unwrap());
                let e = rel_err(&got, &want);
                assert!(e <= 1e-5, "{policy} {weights:?}, {few} token(s): {e}");
            }
        }
    }
}

/// `UnitStraightThrough` gives the same output as `Unit`, bit for bit, but the router gets a
/// gradient from a loss on that output (with `Unit` it gets none).
#[test]
fn straight_through_unit_weights_train_the_router_without_changing_the_output() {
    let s = smol();
    let device = s.model.device.clone().autodiff();
    let dense = HostFfn::from_checkpoint(&s.ckpt, 2).unwrap();
    let x = Tensor::<2>::from_data(ffn_input(2).into_data(), &device);
    let experts: Vec<HostFfn> = contiguous(1536, 6).iter().map(|p| dense.select_neurons(p)).collect();
    let router = random_router(6, 576, 3);
    let run = |weights| {
        let combine = Combine { weights, scale: 1.0 };
        let moe = MoeBlock::new(&router, None, &experts, None, combine, Policy::TopK { k: 3 }, &device).unwrap();
        let (y, _) = moe.params.forward_sparse(&moe.combine, &moe.policy, x.clone()).unwrap();
        let grads = (y.clone() * y.clone()).sum().backward();
        let g = moe.params.router.weight.val().grad(&grads).map(to_vec);
        (to_vec(y), g)
    };
    let (unit, unit_grad) = run(CombineWeights::Unit);
    let (st, st_grad) = run(CombineWeights::UnitStraightThrough);
    assert_eq!(unit, st, "the straight-through forward pass must equal Unit's exactly");
    assert!(unit_grad.is_none_or(|g| g.iter().all(|&v| v == 0.0)));
    let g = st_grad.expect("the router has a gradient");
    assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|&v| v != 0.0));
}

#[test]
fn activated_parameters_are_counted_exactly() {
    let device = ladimo_backend::device();
    let (h, n) = (8, 4);
    let mut rng = StdRng::seed_from_u64(0);
    let mut r = |s: Vec<usize>| {
        HostTensor::new(
            s.clone(),
            (0..s.iter().product()).map(|_| rng.random_range(-1.0..1.0)).collect(),
        )
    };
    // experts of different sizes: 2, 4, 6, 8 neurons
    let experts: Vec<HostFfn> = (1..=n)
        .map(|i| HostFfn {
            gate: r(vec![2 * i, h]),
            up: r(vec![2 * i, h]),
            down: r(vec![h, 2 * i]),
        })
        .collect();
    // A router that sends every token to expert 3 first, then 2.
    let mut router = HostTensor::new(vec![n, h], vec![0.0; n * h]);
    let bias = HostTensor::new(vec![n], vec![0.0, 1.0, 2.0, 3.0]);
    router.data.iter_mut().for_each(|v| *v = 0.0);
    let moe = MoeBlock::new(
        &router,
        Some(&bias),
        &experts,
        None,
        Combine::default(),
        Policy::TopK { k: 2 },
        &device,
    )
    .unwrap();
    let x = Tensor::<2>::from_data(TensorData::new(vec![0.5f32; 5 * h], [5, h]), &device);
    moe.forward_tokens(x).unwrap();
    let st = moe.stats();
    assert_eq!(st.load, [0, 0, 5, 5]);
    let router_params = n * h + n;
    let want = router_params as f64 + (3 * h * 6 + 3 * h * 8) as f64;
    assert_eq!(moe.active_params_per_token(), want);
    assert_eq!(
        moe.total_params(),
        router_params + (1..=n).map(|i| 3 * h * 2 * i).sum::<usize>()
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let device = ladimo_backend::device();
    let h = 8;
    let z = |s: Vec<usize>| HostTensor::new(s.clone(), vec![0.1; s.iter().product()]);
    let e = |f: usize| HostFfn {
        gate: z(vec![f, h]),
        up: z(vec![f, h]),
        down: z(vec![h, f]),
    };
    let ok = [e(4), e(4)];
    let c = Combine::default();
    let top1 = Policy::TopK { k: 1 };
    // shapes that disagree
    let bad = HostFfn {
        gate: z(vec![4, h]),
        up: z(vec![5, h]),
        down: z(vec![h, 4]),
    };
    let err = MoeBlock::new(&z(vec![2, h]), None, &[e(4), bad], None, c, top1.clone(), &device).unwrap_err();
    assert!(err.to_string().contains("expert 1"), "{err}");
    // router of the wrong width
    let err = MoeBlock::new(&z(vec![2, h + 1]), None, &ok, None, c, top1.clone(), &device).unwrap_err();
    assert!(err.to_string().contains("router is [2, 9]"), "{err}");
    let err = MoeBlock::new(&z(vec![3, h]), None, &ok, None, c, top1.clone(), &device).unwrap_err();
    assert!(err.to_string().contains("2 experts"), "{err}");
    // a policy naming more experts than exist
    let err = MoeBlock::new(&z(vec![2, h]), None, &ok, None, c, Policy::TopK { k: 3 }, &device).unwrap_err();
    assert!(matches!(err, MoeError::Policy { .. }), "{err}");
    // NaN router logits
    let mut nan = z(vec![2, h]);
    nan.data[3] = f32::NAN;
    let moe = MoeBlock::new(&nan, None, &ok, None, c, top1, &device).unwrap();
    let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32; 3 * h], [3, h]), &device);
    let err = moe.forward_tokens(x).unwrap_err();
    assert_eq!(err, MoeError::NonFiniteRouter { bad: 3, tokens: 3 });
}

#[test]
fn a_model_mixing_moe_and_dense_layers_runs_perplexity_and_generation() {
    // Its own copy of the model: layers are replaced in place.
    let ckpt = Checkpoint::open(ladimo_tests::smollm2()).unwrap();
    let device = ladimo_backend::device();
    let mut model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
    let ids = ckpt.tokenizer().unwrap().encode(TEXT).unwrap();
    let dense_logits = to_vec(model.forward(ids_tensor(&ids, 1, &device)).unwrap());
    let prompt = ckpt.tokenizer().unwrap().encode("The capital of France is").unwrap();
    let cfg = ladimo_model::generate::SamplingConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let dense_gen = ladimo_model::generate::generate(&model, &prompt, &cfg, |_| {}).unwrap();
    // Exact MoE blocks (every expert routed, unit weights) in layers 0, 10 and 20.
    for layer in [0, 10, 20] {
        let dense = HostFfn::from_checkpoint(&ckpt, layer).unwrap();
        let experts: Vec<HostFfn> = contiguous(1536, 8).iter().map(|p| dense.select_neurons(p)).collect();
        let (combine, policy) = unit_all(8);
        model.layers[layer].ffn = Box::new(
            MoeBlock::new(
                &random_router(8, 576, layer as u64),
                None,
                &experts,
                None,
                combine,
                policy,
                &device,
            )
            .unwrap(),
        );
    }
    let moe_logits = to_vec(model.forward(ids_tensor(&ids, 1, &device)).unwrap());
    let d = ladimo_tests::max_abs_diff(&moe_logits, &dense_logits);
    eprintln!("exact MoE in 3 layers: logits max |diff| {d:.2e}");
    assert!(d <= 1e-3, "{d}");
    let moe_gen = ladimo_model::generate::generate(&model, &prompt, &cfg, |_| {}).unwrap();
    assert_eq!(moe_gen, dense_gen, "generation with the KV cache changed");
    // Lossy routing (top-4 of 8) in those layers still runs, and counts fewer active parameters.
    let before = model.param_counts();
    for layer in [0, 10, 20] {
        let dense = HostFfn::from_checkpoint(&ckpt, layer).unwrap();
        let experts: Vec<HostFfn> = contiguous(1536, 8).iter().map(|p| dense.select_neurons(p)).collect();
        let combine = Combine {
            weights: CombineWeights::Unit,
            scale: 1.0,
        };
        model.layers[layer].ffn = Box::new(
            MoeBlock::new(
                &random_router(8, 576, 7),
                None,
                &experts,
                None,
                combine,
                Policy::TopK { k: 4 },
                &device,
            )
            .unwrap(),
        );
    }
    let r = ladimo_model::perplexity::perplexity(&model, &ids, 32, |_, _| {}).unwrap();
    assert!(r.perplexity.is_finite() && r.perplexity > 1.0, "{r:?}");
    let after = model.param_counts();
    let saved = before.ffn_active - after.ffn_active;
    let per_layer_half = (3 * 576 * 1536 / 2) as f64;
    assert!(
        (saved - 3.0 * per_layer_half).abs() < 3.0 * 8.0 * 576.0 + 1.0,
        "saved {saved}"
    );
    eprintln!(
        "top-4 of 8 in 3 layers: perplexity {:.2}, active FFN params {:.0} -> {:.0}",
        r.perplexity, before.ffn_active, after.ffn_active
    );
}

#[test]
fn a_block_file_reads_back_the_block_bit_for_bit_with_its_combine_rule() {
    let s = smol();
    let device = &s.model.device;
    let dense = HostFfn::from_checkpoint(&s.ckpt, 3).unwrap();
    let f = dense.intermediate_size();
    let parts = contiguous(f - 64, 4);
    let experts: Vec<HostFfn> = parts.iter().map(|p| dense.select_neurons(p)).collect();
    let shared = dense.select_neurons(&((f - 64)..f).collect::<Vec<_>>());
    let router = random_router(4, dense.hidden_size(), 7);
    // A scale other than 1: a block file keeps it as it is (a checkpoint folds it into w2).
    let combine = Combine {
        weights: CombineWeights::Renormalized,
        scale: 1.5,
    };
    let block = MoeBlock::new(
        &router,
        None,
        &experts,
        Some(&shared),
        combine,
        Policy::TopK { k: 2 },
        device,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.moe.safetensors"),
        dir.path().join("b.moe.safetensors"),
    );
    ladimo_moe::block_file::save_block(&a, &block).unwrap();
    let back = ladimo_moe::block_file::load_block(&a, Policy::TopK { k: 3 }, device).unwrap();
    assert_eq!(back.combine, combine);
    assert_eq!(back.policy, Policy::TopK { k: 3 }, "the reader gives the policy");
    assert_eq!(back.num_experts(), 4);
    ladimo_moe::block_file::save_block(&b, &back).unwrap();
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "read back bit for bit"
    );
    // Not a block file: refused, naming the file.
    let dense_file = dir.path().join("dense.safetensors");
    let t = std::collections::BTreeMap::from([("w".to_string(), router.clone())]);
    ladimo_io::write_safetensors(&dense_file, &t, None).unwrap();
    let e = ladimo_moe::block_file::load_block(&dense_file, Policy::TopK { k: 2 }, device).unwrap_err();
    assert!(e.to_string().contains("dense.safetensors"), "{e}");
}
