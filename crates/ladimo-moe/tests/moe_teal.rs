//! TEAL thresholds inside MoE experts: the block against a host loop written from the rule (tiny
//! random shapes), the parameters-read count against a weight-by-weight count, thresholds of 0
//! against the plain block, calibration over the experts that run, policy files, bad input.

use burn::tensor::{Tensor, TensorData};
use ladimo_io::{Checkpoint, HostTensor};
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{FeedForward, FfnError, Transformer};
use ladimo_moe::export::{ExportOptions, Format, export};
use ladimo_moe::policy_file::{LayerPolicy, PolicyFile, model_fingerprint};
use ladimo_moe::sparsity::{Method, Sparsity, abs_quantile, calibrate, set_sparsity};
use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, Policy, moe_block};
use ladimo_tests::{random_ffn, random_host, rel_err};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 16;
const SIZES: [usize; 4] = [6, 8, 10, 12];

/// A tiny block's host weights: router `[4, 16]` with bias, experts of 6, 8, 10 and 12 neurons,
/// optionally 5 shared neurons.
struct Weights {
    router: HostTensor,
    bias: HostTensor,
    experts: Vec<HostFfn>,
    shared: Option<HostFfn>,
}

fn weights(shared: bool, seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    Weights {
        router: random_host(&mut rng, vec![SIZES.len(), HIDDEN], 1.0),
        bias: random_host(&mut rng, vec![SIZES.len()], 0.2),
        experts: SIZES.iter().map(|&f| random_ffn(&mut rng, f, HIDDEN)).collect(),
        shared: shared.then(|| random_ffn(&mut rng, 5, HIDDEN)),
    }
}

const COMBINE: Combine = Combine {
    weights: CombineWeights::Renormalized,
    scale: 1.25,
};

fn block(w: &Weights, k: usize) -> MoeBlock {
    MoeBlock::new(
        &w.router,
        Some(&w.bias),
        &w.experts,
        w.shared.as_ref(),
        COMBINE,
        Policy::TopK { k },
        &ladimo_backend::device(),
    )
    .unwrap()
}

/// One expert by hand on a thresholded input: `h_j = silu(gate_j . x) * (up_j . x)`, zeroed where
/// `|h_j| < th`; returns `down h` and the weights read, counted one by one (a gate/up weight
/// `(j, i)` is read when `x_i != 0`, a down weight `(r, j)` when `h_j != 0`).
fn host_expert(f: &HostFfn, x: &[f32], th: f32) -> (Vec<f32>, u64) {
    let inter = f.intermediate_size();
    let mut read = 0u64;
    let mut h = vec![0f32; inter];
    for (j, hj) in h.iter_mut().enumerate() {
        let (mut g, mut u) = (0f32, 0f32);
        for (i, &xi) in x.iter().enumerate() {
            if xi != 0.0 {
                g += f.gate.data[j * HIDDEN + i] * xi;
                u += f.up.data[j * HIDDEN + i] * xi;
                read += 2;
            }
        }
        let v = g / (1.0 + (-g).exp()) * u;
        *hj = if v.abs() < th { 0.0 } else { v };
    }
    let mut y = vec![0f32; HIDDEN];
    for (r, yr) in y.iter_mut().enumerate() {
        for (j, &hj) in h.iter().enumerate() {
            if hj != 0.0 {
                *yr += f.down.data[r * inter + j] * hj;
                read += 1;
            }
        }
    }
    (y, read)
}

/// The thresholded block by hand, token by token: router softmax on the raw x, the top-k
/// (ties: lower index), weights renormalised over the chosen and scaled, x thresholded once,
/// every run expert by [`host_expert`]. Returns the output and the parameters read in all
/// (router and bias included).
fn host_block(w: &Weights, k: usize, x: &[f32], tx: f32, th: f32) -> (Vec<f32>, u64) {
    let e = SIZES.len();
    let mut out = Vec::with_capacity(x.len());
    let mut read = 0u64;
    for xt in x.chunks(HIDDEN) {
        let logits: Vec<f32> = (0..e)
            .map(|i| w.bias.data[i] + (0..HIDDEN).map(|c| w.router.data[i * HIDDEN + c] * xt[c]).sum::<f32>())
            .collect();
        read += (e * HIDDEN + e) as u64;
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let ex: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
        let sum: f32 = ex.iter().sum();
        let p: Vec<f32> = ex.iter().map(|v| v / sum).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let chosen = &order[..k];
        let norm: f32 = chosen.iter().map(|&i| p[i]).sum();
        let xm: Vec<f32> = xt.iter().map(|&v| if v.abs() < tx { 0.0 } else { v }).collect();
        let mut y = vec![0f32; HIDDEN];
        if let Some(s) = &w.shared {
            let (ys, r) = host_expert(s, &xm, th);
            read += r;
            y.iter_mut().zip(&ys).for_each(|(a, b)| *a += b);
        }
        for &i in chosen {
            let (ye, r) = host_expert(&w.experts[i], &xm, th);
            read += r;
            let wt = p[i] / norm * COMBINE.scale;
            y.iter_mut().zip(&ye).for_each(|(a, b)| *a += wt * b);
        }
        out.extend(y);
    }
    (out, read)
}

fn tokens(n: usize, seed: u64) -> (Tensor<2>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * HIDDEN).map(|_| rng.random_range(-1.0..1.0)).collect();
    let t = Tensor::<2>::from_data(TensorData::new(v.clone(), [n, HIDDEN]), &ladimo_backend::device());
    (t, v)
}

/// `h` of every expert on `x` (thresholded by `tx`), unthresholded: to set `th` at a quantile
/// that really zeroes entries.
fn all_h(w: &Weights, x: &[f32], tx: f32) -> Vec<f32> {
    let mut hs = Vec::new();
    for xt in x.chunks(HIDDEN) {
        let xm: Vec<f32> = xt.iter().map(|&v| if v.abs() < tx { 0.0 } else { v }).collect();
        for f in w.experts.iter().chain(&w.shared) {
            for j in 0..f.intermediate_size() {
                let g: f32 = (0..HIDDEN).map(|i| f.gate.data[j * HIDDEN + i] * xm[i]).sum();
                let u: f32 = (0..HIDDEN).map(|i| f.up.data[j * HIDDEN + i] * xm[i]).sum();
                hs.push(g / (1.0 + (-g).exp()) * u);
            }
        }
    }
    hs
}

#[test]
fn teal_inside_experts_equals_a_masked_host_loop_and_counts_each_weight_read() {
    for shared in [false, true] {
        let w = weights(shared, 7);
        for k in [1, 2] {
            for n in [1, 2, 7] {
                let (x, xv) = tokens(n, 100 + n as u64);
                let tx = 0.45;
                let th = abs_quantile(&all_h(&w, &xv, tx), 0.4);
                let mut moe = block(&w, k);
                moe.set_sparsity(Some(Sparsity::Teal { x: tx, h: th })).unwrap();
                let got = to_vec(moe.forward_tokens(x.clone()).unwrap());
                let (want, read) = host_block(&w, k, &xv, tx, th);
                let e = rel_err(&got, &want);
                let what = format!("shared {shared}, top-{k}, {n} token(s)");
                assert!(e <= 1e-5, "{what}: relative error {e}");
                // The thresholds zeroed something, so the count is a real test.
                let full = host_block(&w, k, &xv, 0.0, 0.0).1;
                assert!(read < full, "{what}: {read} of {full}");
                let per_token = read as f64 / n as f64;
                let active = moe.active_params_per_token();
                assert!(
                    (active - per_token).abs() <= 1e-9 * per_token,
                    "{what}: block counts {active}, weight by weight {per_token}"
                );
                let st = moe.stats();
                assert_eq!(st.tokens as usize, n);
                assert!(st.threshold_saved > 0.0, "{what}");
                // The host kernel (gate/up input-major) runs the same thresholds, counts the same
                // weights read, and is what the block's decode path takes.
                moe.prepare_host(ladimo_kernel::Dtype::F32);
                moe.reset_stats();
                let on_kernel = moe.forward_host(&xv, n).expect("a host kernel").unwrap();
                let e = rel_err(&on_kernel, &want);
                assert!(e <= 1e-5, "{what}: host kernel relative error {e}");
                // (Its sums run in another order: an h entry at the threshold may fall the other
                // way, a down row of HIDDEN weights; allow two.)
                let active = moe.active_params_per_token();
                assert!(
                    (active - per_token).abs() <= (2 * HIDDEN) as f64,
                    "{what}: kernel counts {active}, weight by weight {per_token}"
                );
                assert_eq!(to_vec(moe.forward_tokens(x.clone()).unwrap()), on_kernel, "{what}");
                // Removing the thresholds puts the kernel back to neuron-major, the plain block.
                moe.set_sparsity(None).unwrap();
                let plain = moe.forward_host(&xv, n).expect("a host kernel").unwrap();
                let (want_plain, _) = host_block(&w, k, &xv, 0.0, 0.0);
                assert!(rel_err(&plain, &want_plain) <= 1e-5, "{what}: without thresholds");
            }
        }
    }
}

#[test]
fn the_dense_masked_prefill_path_equals_the_dispatch_and_counts_the_same() {
    let combines = [
        COMBINE,
        Combine {
            weights: CombineWeights::Raw,
            scale: 1.0,
        },
        Combine {
            weights: CombineWeights::Unit,
            scale: 0.5,
        },
    ];
    for shared in [false, true] {
        let w = weights(shared, 13);
        let (x, xv) = tokens(9, 300);
        let th = abs_quantile(&all_h(&w, &xv, 0.3), 0.4);
        for teal in [None, Some(Sparsity::Teal { x: 0.3, h: th })] {
            for combine in combines {
                for policy in [
                    Policy::TopK { k: 1 },
                    Policy::TopK { k: 3 },
                    Policy::TopP {
                        p: 0.6,
                        min_k: 1,
                        max_k: 3,
                    },
                ] {
                    let what = format!("shared {shared}, {teal:?}, {combine:?}, {policy:?}");
                    let make = |masked: Option<usize>| {
                        let mut b = MoeBlock::new(
                            &w.router,
                            Some(&w.bias),
                            &w.experts,
                            w.shared.as_ref(),
                            combine,
                            policy.clone(),
                            &ladimo_backend::device(),
                        )
                        .unwrap();
                        b.set_sparsity(teal.clone()).unwrap();
                        assert!(b.set_masked_from(masked));
                        b
                    };
                    let (dispatch, masked) = (make(None), make(Some(3)));
                    assert!(masked.masked_at(3) && !masked.masked_at(2) && !dispatch.masked_at(9));
                    let want = to_vec(dispatch.forward_tokens(x.clone()).unwrap());
                    let got = to_vec(masked.forward_tokens(x.clone()).unwrap());
                    let e = rel_err(&got, &want);
                    assert!(e <= 1e-5, "{what}: relative error {e}");
                    let (a, b) = (dispatch.stats(), masked.stats());
                    assert_eq!(a.load, b.load, "{what}");
                    assert!(
                        (a.routed_params - b.routed_params).abs() <= 1e-9 * a.routed_params,
                        "{what}"
                    );
                    assert!(
                        (a.threshold_saved - b.threshold_saved).abs() <= 1e-6 * a.routed_params,
                        "{what}: saved {} vs {}",
                        a.threshold_saved,
                        b.threshold_saved
                    );
                    if teal.is_some() {
                        assert!(b.threshold_saved > 0.0, "{what}");
                    }
                }
            }
        }
    }
    // Below its threshold the block keeps the dispatch; choosing by timing leaves the function alone.
    let w = weights(true, 17);
    let (x, _) = tokens(9, 301);
    let mut b = block(&w, 2);
    let want = to_vec(b.forward_tokens(x.clone()).unwrap());
    let timings = b.choose_prefill_path();
    assert_eq!(timings.len(), ladimo_moe::PREFILL_PROBES.len());
    assert!(timings.iter().all(|&(_, d, m)| d > 0.0 && m > 0.0));
    assert!(rel_err(&to_vec(b.forward_tokens(x).unwrap()), &want) <= 1e-5);
}

#[test]
fn thresholds_of_zero_give_the_plain_block_bit_for_bit() {
    for shared in [false, true] {
        let w = weights(shared, 11);
        for n in [1, 2, 7] {
            let (x, _) = tokens(n, 200 + n as u64);
            let plain = block(&w, 2);
            let mut zero = block(&w, 2);
            zero.set_sparsity(Some(Sparsity::Teal { x: 0.0, h: 0.0 })).unwrap();
            let a = to_vec(plain.forward_tokens(x.clone()).unwrap());
            let b = to_vec(zero.forward_tokens(x).unwrap());
            assert_eq!(a, b, "shared {shared}, {n} token(s)");
            assert_eq!(zero.stats().threshold_saved, 0.0);
            assert_eq!(plain.active_params_per_token(), zero.active_params_per_token());
            // Removing the thresholds gives the plain block back.
            zero.set_sparsity(None).unwrap();
            assert!(zero.sparsity().is_none());
        }
    }
}

/// The committed tiny Llama (2 layers, hidden 64, FFN 160) with its FFNs cut into 4 experts of
/// 40 neurons (layer 1 also keeps 32 of them as a shared expert and routes 4 of 32), top-2.
fn tiny_moe() -> (Transformer, Vec<u32>) {
    let (_, model, tokens) = tiny_moe_ckpt();
    (model, tokens)
}

/// [`tiny_moe`] and the checkpoint it was loaded from.
fn tiny_moe_ckpt() -> (Checkpoint, Transformer, Vec<u32>) {
    let ckpt = Checkpoint::open(ladimo_tests::fixture("tiny-llama3")).unwrap();
    let device = ladimo_backend::device();
    let mut model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let combine = Combine {
        weights: CombineWeights::Renormalized,
        scale: 1.0,
    };
    for layer in 0..2 {
        let dense = HostFfn::from_checkpoint(&ckpt, layer).unwrap();
        let (shared, first, size) = if layer == 0 {
            (None, 0, 40)
        } else {
            (Some(dense.select_neurons(&(0..32).collect::<Vec<_>>())), 32, 32)
        };
        let experts: Vec<HostFfn> = (0..4)
            .map(|e| dense.select_neurons(&(first + e * size..first + (e + 1) * size).collect::<Vec<_>>()))
            .collect();
        let router = random_host(&mut rng, vec![4, 64], 1.0);
        model.layers[layer].ffn = Box::new(
            MoeBlock::new(
                &router,
                None,
                &experts,
                shared.as_ref(),
                combine,
                Policy::TopK { k: 2 },
                &device,
            )
            .unwrap(),
        );
    }
    let tokens: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 13) % 500 + 1).collect();
    (ckpt, model, tokens)
}

fn windows(ids: &[u32]) -> Vec<&[u32]> {
    ids.chunks(64).collect()
}

/// Per layer, on `windows` through the plain model: the share of `x` entries under `tx` and of
/// `h` entries (of the experts that run under the layer's routing) under `th`.
fn zeroed_shares(model: &Transformer, windows: &[&[u32]], layer: usize, tx: f32, th: f32) -> (f64, f64) {
    let b = moe_block(model, layer).unwrap();
    let (mut x_under, mut x_all, mut h_under, mut h_all) = (0usize, 0usize, 0usize, 0usize);
    for w in windows {
        let mut h = model.embed(ids_tensor(w, 1, &model.device));
        for l in &model.layers[..layer] {
            h = l.forward(h, &model.rope, &mut None).unwrap();
        }
        let (_, x) = model.layers[layer].attention_part(h, &model.rope, &mut None);
        let [_, t, d] = x.dims();
        let x = x.reshape([t, d]);
        let xv = to_vec(x.clone());
        x_under += xv.iter().filter(|v| v.abs() < tx).count();
        x_all += xv.len();
        let routes = b.route(&b.router_probs(x.clone()).unwrap());
        for (tok, route) in routes.iter().enumerate() {
            let xt = x.clone().narrow(0, tok, 1);
            let run = route.iter().map(|&(i, _)| &b.params.experts[i]).chain(&b.params.shared);
            for f in run {
                let hv = to_vec(f.activation(xt.clone()));
                h_under += hv.iter().filter(|v| v.abs() < th).count();
                h_all += hv.len();
            }
        }
    }
    (x_under as f64 / x_all as f64, h_under as f64 / h_all as f64)
}

#[test]
fn calibrated_thresholds_zero_the_requested_share_over_the_experts_that_run() {
    let (mut model, ids) = tiny_moe();
    let w = windows(&ids);
    let budget = 0.6;
    let before = to_vec(model.forward(ids_tensor(w[0], 1, &model.device)).unwrap());
    let layers = calibrate(&mut model, &w, Method::Teal, budget, |_, _| {}).unwrap();
    let after = to_vec(model.forward(ids_tensor(w[0], 1, &model.device)).unwrap());
    assert_eq!(before, after, "calibrate changed the model");
    for (layer, s) in layers.iter().enumerate() {
        let Sparsity::Teal { x: tx, h: th } = *s else {
            panic!("layer {layer}: {s:?}")
        };
        let (xs, hs) = zeroed_shares(&model, &w, layer, tx, th);
        eprintln!("layer {layer}: {s}: x zeroed {xs:.4}, h zeroed {hs:.4}");
        assert!((xs - (1.0 - budget)).abs() < 0.01, "layer {layer}: x zeroed {xs}");
        assert!((hs - (1.0 - budget)).abs() < 0.01, "layer {layer}: h zeroed {hs}");
    }
    // With the thresholds set, the run experts read about the budget of their weights (not
    // exactly: h is now computed from the thresholded x, and layer 1 sees layer 0's thresholded
    // output).
    let full: Vec<f64> = (0..2).map(|l| model.layers[l].ffn.active_params_per_token()).collect();
    for (l, s) in layers.iter().enumerate() {
        set_sparsity(&mut model, l, Some(s.clone())).unwrap();
        model.layers[l].ffn.reset_stats();
    }
    for win in &w {
        model.forward(ids_tensor(win, 1, &model.device)).unwrap();
    }
    for (l, _) in full.iter().enumerate() {
        let b = moe_block(&model, l).unwrap();
        let st = b.stats();
        let run = st.tokens as f64 * b.fixed_params() as f64 + st.routed_params;
        let router = (st.tokens as usize * b.params.router.weight.dims().iter().product::<usize>()) as f64;
        let share = (run - st.threshold_saved - router) / (run - router);
        eprintln!("layer {l}: the run experts read {share:.4} of their weights");
        assert!((share - budget).abs() < 0.02, "layer {l}: read {share}");
    }
}

#[test]
fn a_policy_file_carries_teal_inside_moe_layers() {
    let (ckpt, mut model, ids) = tiny_moe_ckpt();
    let w = windows(&ids);
    let layers = calibrate(&mut model, &w, Method::Teal, 0.5, |_, _| {}).unwrap();
    let file = PolicyFile {
        model: model_fingerprint(&model),
        note: "test".into(),
        layers: layers
            .iter()
            .enumerate()
            .map(|(layer, s)| LayerPolicy {
                layer,
                policy: Some(Policy::TopK { k: 1 + layer }),
                sparsity: Some(s.clone()),
            })
            .collect(),
    };
    assert!(file.layers[0].to_string().contains("top-1, TEAL"), "{}", file.layers[0]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("moe-teal.toml");
    file.write(&p).unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("Teal") && text.contains("TopK"), "{text}");
    let back = PolicyFile::read(&p).unwrap();
    assert_eq!(back, file);
    back.apply(&mut model, &p).unwrap();
    for (l, s) in layers.iter().enumerate() {
        let b = moe_block(&model, l).unwrap();
        assert_eq!(b.sparsity(), Some(s));
        assert_eq!(b.policy, Policy::TopK { k: 1 + l });
    }
    let ids0 = ids_tensor(w[0], 1, &model.device);
    let via_file = to_vec(model.forward(ids0.clone()).unwrap());
    let thresholded = model.param_counts().ffn_active;
    // The same by hand gives the same logits; without thresholds they differ and read more.
    let mut direct = tiny_moe().0;
    for (l, s) in layers.iter().enumerate() {
        ladimo_moe::moe_block_mut(&mut direct, l)
            .unwrap()
            .set_policy(Policy::TopK { k: 1 + l })
            .unwrap();
        set_sparsity(&mut direct, l, Some(s.clone())).unwrap();
    }
    assert_eq!(to_vec(direct.forward(ids0.clone()).unwrap()), via_file);
    // Only hf-remote carries the thresholds (tests/export.rs runs it in transformers): every
    // other format refuses, naming the layers, and writes nothing.
    let remote = dir.path().join("export-remote");
    export(&ckpt, &model, &ExportOptions::new(Format::HfRemote), &remote).unwrap();
    let config = std::fs::read_to_string(remote.join("config.json")).unwrap();
    assert!(config.contains("\"Teal\""), "{config}");
    for format in Format::ALL.into_iter().filter(|f| *f != Format::HfRemote) {
        let out = dir.path().join(format!("export-{format:?}"));
        let err = export(&ckpt, &model, &ExportOptions::new(format), &out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 0 has thresholds inside its MoE experts (TEAL")
                && err.contains("layer 1 has thresholds")
                && err.contains("--policy"),
            "{format:?}: {err}"
        );
        assert!(!out.exists(), "{format:?}");
    }
    // Nor does convert's stock export beside the checkpoint: it says so and writes none.
    let beside = dir.path().join("beside");
    std::fs::create_dir(&beside).unwrap();
    let said = ladimo_moe::export::write_stock_beside(&ckpt, &model, &beside).unwrap();
    assert!(
        said.contains("No stock format carries TEAL thresholds")
            && said.contains("layer 1")
            && said.contains("hf-remote"),
        "{said}"
    );
    assert_eq!(std::fs::read_dir(&beside).unwrap().count(), 1, "only stock-export.txt");
    let mut plain = file.clone();
    plain.layers.iter_mut().for_each(|l| l.sparsity = None);
    plain.apply(&mut model, &p).unwrap();
    model.layers.iter().for_each(|l| l.ffn.reset_stats());
    assert_ne!(to_vec(model.forward(ids0).unwrap()), via_file);
    assert!(model.param_counts().ffn_active > thresholded);
    // Static and CATS inside experts, and a bad threshold, are refused naming layer and method.
    for (s, want) in [
        (Sparsity::Cats { gate: 0.1 }, "cats inside MoE experts"),
        (Sparsity::Static { keep: vec![0, 1] }, "static inside MoE experts"),
        (Sparsity::Teal { x: f32::NAN, h: 0.0 }, "finite"),
    ] {
        let mut f = file.clone();
        f.layers[1].sparsity = Some(s.clone());
        let err = f.apply(&mut model, &p).unwrap_err().to_string();
        assert!(
            err.contains("layer 1") && err.contains(want) && err.contains("moe-teal.toml"),
            "{err}"
        );
        let err = set_sparsity(&mut model, 1, Some(s)).unwrap_err().to_string();
        assert!(err.contains("layer 1") && err.contains(want), "{err}");
    }
}

/// A feed-forward block that is not SwiGLU: `down(gelu(up x))` (tanh GELU).
#[derive(Debug)]
struct GeluMlp {
    up: Tensor<2>,
    down: Tensor<2>,
}

impl FeedForward for GeluMlp {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, h] = x.dims();
        let u = x.reshape([b * s, h]).matmul(self.up.clone());
        let g = u.clone()
            * (u.clone() + u.powf_scalar(3.0).mul_scalar(0.044715))
                .mul_scalar(0.797_884_6)
                .tanh()
                .add_scalar(1.0)
                .mul_scalar(0.5);
        Ok(g.matmul(self.down.clone()).reshape([b, s, h]))
    }
    fn total_params(&self) -> usize {
        self.up.dims().iter().product::<usize>() * 2
    }
    fn active_params_per_token(&self) -> f64 {
        self.total_params() as f64
    }
    fn describe(&self) -> String {
        "gelu mlp".into()
    }
}

#[test]
fn threshold_methods_on_a_non_swiglu_ffn_and_budgets_no_method_meets_are_refused() {
    let (mut model, ids) = tiny_moe();
    let w = windows(&ids);
    let device = model.device.clone();
    model.layers[1].ffn = Box::new(GeluMlp {
        up: Tensor::zeros([64, 128], &device),
        down: Tensor::zeros([128, 64], &device),
    });
    for m in Method::ALL {
        let err = calibrate(&mut model, &w, m, 0.5, |_, _| {}).unwrap_err().to_string();
        // Layer 0 is MoE: static and CATS stop there; TEAL reaches the GELU layer.
        let want = match m {
            Method::Teal => "layer 1: is neither a dense SwiGLU FFN nor an MoE block (gelu mlp), so teal",
            Method::Static => "layer 0: static inside MoE experts",
            Method::Cats => "layer 0: cats inside MoE experts",
        };
        assert!(err.contains(want), "{m:?}: {err}");
    }
    let err = set_sparsity(&mut model, 1, Some(Sparsity::Teal { x: 0.1, h: 0.1 }))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 1") && err.contains("gelu mlp"), "{err}");
    // A checkpoint whose FFN is not SwiGLU does not load at all.
    let dir = ladimo_tests::copy_fixture_dir("tiny-llama3");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"silu\"", "\"gelu\"");
    std::fs::write(&cfg, text).unwrap();
    let Err(err) = Checkpoint::open(dir.path()) else {
        panic!("a checkpoint with hidden_act gelu loaded")
    };
    let err = err.to_string();
    assert!(err.contains("hidden_act `gelu`") && err.contains("silu"), "{err}");
    // Budgets no method meets, refused before any work and naming the budget.
    for (m, b, want) in [
        (Method::Cats, 0.2, "budget of 0.2 (under 1/3)"),
        (Method::Teal, 0.0, "budget 0 must be in (0, 1]"),
        (Method::Teal, 1.5, "budget 1.5 must be in (0, 1]"),
    ] {
        let err = calibrate(&mut model, &w, m, b, |_, _| panic!("ran"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{m:?} {b}: {err}");
    }
}
