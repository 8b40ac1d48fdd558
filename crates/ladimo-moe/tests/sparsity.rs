//! Activation sparsity (static, CATS, TEAL) on real SmolLM2 layers: the masked burn path against a
//! plain host loop, the parameters-read count, calibration hitting its budget, policy files, bad
//! input.

use burn::tensor::Tensor;
use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_moe::policy_file::{LayerPolicy, PolicyFile, model_fingerprint};
use ladimo_moe::sparsity::{Method, SparseFfn, Sparsity, calibrate, dense_ffn, set_sparsity};
use ladimo_moe::{HostFfn, MoeBlock, Policy};
use ladimo_tests::smol;

const TEXT: &str = "It was a truth universally acknowledged that a single man in possession of a good fortune \
                    must be in want of a wife. However little known the feelings or views of such a man may be \
                    on his first entering a neighbourhood, this truth is so well fixed in the minds of the \
                    surrounding families. 대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 \
                    권력은 국민으로부터 나온다. fn main() { println!(\"{}\", 42); }";

/// The real input of layer `layer`'s FFN on TEXT: `[tokens, hidden]`, and its host copy.
fn ffn_input(layer: usize) -> (Tensor<2>, Vec<f32>) {
    let x = ladimo_tests::smol_ffn_input(TEXT, layer);
    let v = to_vec(x.clone());
    (x, v)
}

/// The sparse FFN by hand, one token at a time, from the checkpoint's weights (gate/up `[inter,
/// hidden]`, down `[hidden, inter]`, as Hugging Face stores them): output and parameters read.
fn host_reference(ffn: &HostFfn, x: &[f32], s: &Sparsity) -> (Vec<f32>, f64) {
    let (gate, up, down) = (&ffn.gate.data, &ffn.up.data, &ffn.down.data);
    let inter = ffn.intermediate_size();
    let hidden = ffn.gate.shape[1];
    let tokens = x.len() / hidden;
    let mut y = vec![0f32; x.len()];
    let mut read = 0f64;
    for t in 0..tokens {
        let mut xt = x[t * hidden..(t + 1) * hidden].to_vec();
        if let Sparsity::Teal { x: tx, .. } = s {
            for v in &mut xt {
                if v.abs() < *tx {
                    *v = 0.0;
                }
            }
        }
        let kept_x = xt.iter().filter(|v| **v != 0.0).count();
        let dot = |w: &[f32], j: usize| -> f32 { (0..hidden).map(|i| w[j * hidden + i] * xt[i]).sum() };
        let mut kept_h = 0;
        for j in 0..inter {
            let g = dot(gate, j);
            let a = g / (1.0 + (-g).exp());
            let keep = match s {
                Sparsity::Static { keep } => keep.contains(&(j as u32)),
                Sparsity::Cats { gate: t } => a.abs() >= *t,
                Sparsity::Teal { .. } => true,
            };
            if !keep {
                continue;
            }
            let h = a * dot(up, j);
            if let Sparsity::Teal { h: th, .. } = s
                && h.abs() < *th
            {
                continue;
            }
            kept_h += 1;
            for i in 0..hidden {
                y[t * hidden + i] += down[i * inter + j] * h;
            }
        }
        read += match s {
            Sparsity::Static { keep } => (3 * hidden * keep.len()) as f64,
            Sparsity::Cats { .. } => (hidden * inter + 2 * hidden * kept_h) as f64,
            Sparsity::Teal { .. } => (2 * inter * kept_x + hidden * kept_h) as f64,
        };
    }
    (y, read)
}

#[test]
fn each_method_equals_a_host_loop_and_counts_what_it_reads() {
    let s = smol();
    let layer = 11;
    let (x, xv) = ffn_input(layer);
    let dense = dense_ffn(&s.model, layer).unwrap();
    let host = HostFfn::from_checkpoint(&s.ckpt, layer).unwrap();
    let keep: Vec<u32> = (0..1536).filter(|j| j % 3 != 1).collect();
    for sp in [
        Sparsity::Static { keep },
        Sparsity::Cats { gate: 0.05 },
        Sparsity::Teal { x: 0.02, h: 0.004 },
        Sparsity::Teal { x: 0.0, h: 0.0 },
    ] {
        let f = SparseFfn::new(dense, sp.clone()).unwrap();
        let (got, read) = f.forward_tokens(x.clone());
        let got = to_vec(got);
        let (want, want_read) = host_reference(&host, &xv, &sp);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = ladimo_tests::max_abs_diff(&got, &want) / scale;
        let tokens = xv.len() / 576;
        let share = read / (tokens * f.dense_params()) as f64;
        eprintln!(
            "{sp}: relative max error {err:.2e}, reads {:.1}% of the FFN",
            100.0 * share
        );
        assert!(err < 1e-4, "{sp}: {err}");
        // A value right at a threshold may fall either way between the two sums: allow a few.
        assert!(
            (read - want_read).abs() <= 4.0 * 1536.0,
            "{sp}: counted {read}, host loop {want_read}"
        );
        if matches!(sp, Sparsity::Teal { x, h } if x == 0.0 && h == 0.0) {
            // Zero thresholds drop only exact zeros: the whole FFN is read.
            assert!(share > 0.999, "{share}");
        } else {
            assert!(share < 0.95, "{sp} saves nothing: {share}");
        }
    }
}

fn windows(ids: &[u32]) -> Vec<&[u32]> {
    ids.chunks(64).filter(|w| w.len() > 1).collect()
}

#[test]
fn calibrated_thresholds_read_the_budget_on_the_calibration_text() {
    let ckpt = Checkpoint::open(ladimo_tests::smollm2()).unwrap();
    let device = ladimo_backend::device();
    let mut model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
    let ids = ckpt.tokenizer().unwrap().encode(TEXT).unwrap();
    let w = windows(&ids);
    let dense_logits = to_vec(model.forward(ids_tensor(&ids, 1, &device)).unwrap());
    for (method, budget, tol) in [
        (Method::Static, 0.75, 0.002),
        (Method::Cats, 0.75, 0.01),
        // TEAL's h threshold is a quantile of the dense h; under a sparse x, h moves a little.
        (Method::Teal, 0.75, 0.03),
        (Method::Teal, 0.5, 0.03),
    ] {
        let layers = calibrate(&mut model, &w, method, budget, |_, _| {}).unwrap();
        assert_eq!(layers.len(), 30);
        // calibrate restored the dense model.
        let after = to_vec(model.forward(ids_tensor(&ids, 1, &device)).unwrap());
        assert_eq!(after, dense_logits, "{method:?}: calibrate changed the model");
        for (l, s) in layers.iter().enumerate() {
            set_sparsity(&mut model, l, Some(s.clone())).unwrap();
        }
        for l in &model.layers {
            l.ffn.reset_stats();
        }
        for win in &w {
            model.forward(ids_tensor(win, 1, &device)).unwrap();
        }
        let dense_params = (3 * 576 * 1536) as f64;
        let shares: Vec<f64> = model
            .layers
            .iter()
            .map(|l| l.ffn.active_params_per_token() / dense_params)
            .collect();
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        eprintln!(
            "{method:?} at {budget}: reads {:.2}% on average, layers {:.3?}",
            100.0 * mean,
            &shares[..5]
        );
        assert!((mean - budget).abs() <= tol, "{method:?} {budget}: mean share {mean}");
        for (l, sh) in shares.iter().enumerate() {
            assert!(
                (sh - budget).abs() <= 3.0 * tol + 0.01,
                "{method:?} {budget}: layer {l} reads {sh}"
            );
        }
        for l in 0..30 {
            set_sparsity(&mut model, l, None).unwrap();
        }
    }
}

#[test]
fn a_policy_file_round_trips_and_applies_the_same_sparsity() {
    let ckpt = Checkpoint::open(ladimo_tests::smollm2()).unwrap();
    let device = ladimo_backend::device();
    let mut model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
    let ids = ckpt.tokenizer().unwrap().encode(TEXT).unwrap();
    let layers = calibrate(&mut model, &windows(&ids), Method::Teal, 0.6, |_, _| {}).unwrap();
    let file = PolicyFile {
        model: model_fingerprint(&model),
        note: "test".into(),
        layers: layers
            .iter()
            .enumerate()
            .map(|(layer, s)| LayerPolicy {
                layer,
                policy: None,
                sparsity: Some(s.clone()),
            })
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("teal.toml");
    file.write(&p).unwrap();
    let back = PolicyFile::read(&p).unwrap();
    assert_eq!(back, file);
    back.apply(&mut model, &p).unwrap();
    let via_file = to_vec(model.forward(ids_tensor(&ids, 1, &device)).unwrap());
    for (l, s) in layers.iter().enumerate() {
        set_sparsity(&mut model, l, Some(s.clone())).unwrap();
    }
    let direct = to_vec(model.forward(ids_tensor(&ids, 1, &device)).unwrap());
    assert_eq!(via_file, direct);
    // A routing policy on a dense layer, a layer named twice and a bad threshold are refused.
    for (bad, want) in [
        (
            LayerPolicy {
                layer: 3,
                policy: Some(Policy::TopK { k: 2 }),
                sparsity: None,
            },
            "which is dense",
        ),
        (
            LayerPolicy {
                layer: 0,
                policy: None,
                sparsity: Some(Sparsity::Cats { gate: 0.1 }),
            },
            "twice",
        ),
        (
            LayerPolicy {
                layer: 31,
                policy: None,
                sparsity: Some(Sparsity::Cats { gate: 0.1 }),
            },
            "has 30 layers",
        ),
    ] {
        let mut f = file.clone();
        // Layer 3 is already named: the dense-layer case replaces its entry, the others add one.
        if bad.layer == 3 {
            f.layers[3] = bad;
        } else {
            f.layers.push(bad);
        }
        let err = f.apply(&mut model, &p).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("teal.toml"), "{err}");
    }
    let mut f = file.clone();
    f.layers[2].sparsity = Some(Sparsity::Teal { x: f32::NAN, h: 0.0 });
    let err = f.apply(&mut model, &p).unwrap_err().to_string();
    assert!(err.contains("layer 2") && err.contains("finite"), "{err}");
    let mut f = file.clone();
    f.layers[2].sparsity = Some(Sparsity::Static { keep: vec![5, 3] });
    let err = f.apply(&mut model, &p).unwrap_err().to_string();
    assert!(err.contains("ascending"), "{err}");
}

#[test]
fn budgets_no_method_can_meet_and_moe_layers_are_refused() {
    assert!(Method::Cats.sparsity_for(0.3).unwrap_err().to_string().contains("1/3"));
    for b in [0.0, -0.5, 1.5, f64::NAN] {
        for m in Method::ALL {
            assert!(m.sparsity_for(b).is_err(), "{m:?} {b}");
        }
    }
    assert!("tael".parse::<Method>().unwrap_err().to_string().contains("teal"));
    let ckpt = Checkpoint::open(ladimo_tests::smollm2()).unwrap();
    let device = ladimo_backend::device();
    let mut model = Transformer::from_checkpoint(&ckpt, &device).unwrap();
    let dense = HostFfn::from_checkpoint(&ckpt, 4).unwrap();
    let experts: Vec<HostFfn> = (0..4)
        .map(|e| dense.select_neurons(&(e * 384..(e + 1) * 384).collect::<Vec<_>>()))
        .collect();
    let router = ladimo_io::HostTensor::new(vec![4, 576], vec![0.01; 4 * 576]);
    let combine = ladimo_moe::Combine {
        weights: ladimo_moe::CombineWeights::Unit,
        scale: 1.0,
    };
    model.layers[4].ffn =
        Box::new(MoeBlock::new(&router, None, &experts, None, combine, Policy::TopK { k: 2 }, &device).unwrap());
    let ids = ckpt.tokenizer().unwrap().encode(TEXT).unwrap();
    // Inside MoE experts only TEAL runs (tests/moe_teal.rs): static and CATS are refused by name.
    let err = calibrate(&mut model, &windows(&ids), Method::Static, 0.75, |_, _| panic!("ran"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 4") && err.contains("static inside MoE experts"),
        "{err}"
    );
    let err = set_sparsity(&mut model, 4, Some(Sparsity::Cats { gate: 0.1 }))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 4") && err.contains("cats inside MoE experts"),
        "{err}"
    );
}

/// `ladimo_model::elementwise` runs one host pass on the CPU device and tensor ops on an autodiff
/// device (where a gradient must flow): both give the same `h` and the same kept counts, for every
/// cut, on a real layer's activations.
#[test]
fn host_passes_equal_the_tensor_ops_they_replace() {
    use ladimo_model::elementwise::{Cut, on_host, swiglu, threshold};
    let (x, _) = ffn_input(7);
    let device = x.device();
    let ad = device.clone().autodiff();
    assert!(on_host(&device), "the CPU test device runs the host passes");
    assert!(!on_host(&ad), "an autodiff device keeps tensor ops");
    let ffn = dense_ffn(&smol().model, 7).unwrap();
    let g = ffn.gate_proj.forward(x.clone());
    let u = ffn.up_proj.forward(x.clone());
    let on = |t: &Tensor<2>, d| Tensor::<2>::from_data(t.to_data(), d);
    for cut in [Cut::None, Cut::H(0.05), Cut::Gate(0.1)] {
        let (h_host, k_host) = swiglu(g.clone(), u.clone(), cut);
        let (h_ops, k_ops) = swiglu(on(&g, &ad), on(&u, &ad), cut);
        let (a, b) = (to_vec(h_host), to_vec(h_ops));
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        // A value within rounding of the cut may land on either side: allow a few.
        let flips = a.iter().zip(&b).filter(|(p, q)| (*p == &0.0) != (*q == &0.0)).count();
        assert!(flips <= 2, "{cut:?}: {flips} entries cut on one path only");
        if flips == 0 {
            assert!(worst <= 1e-5 * scale, "{cut:?}: worst {worst} of {scale}");
        }
        assert!((k_host - k_ops).abs() <= 2.0, "{cut:?}: kept {k_host} vs {k_ops}");
    }
    let (xa, ka) = threshold(x.clone(), 0.5);
    let (xb, kb) = threshold(on(&x, &ad), 0.5);
    assert_eq!(to_vec(xa), to_vec(xb));
    assert_eq!(ka, kb);
}
