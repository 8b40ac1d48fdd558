//! Every compiled backend against the CPU backend (Flex), in one process, so a backend bug cannot
//! hide: the tiny models' logits, an MoE block's output (and its routing), and one distillation
//! step's loss and updated weights. f32 everywhere; the bound is max |diff| <= 1e-4 relative to
//! the largest reference value (at least 1).
//!
//! Built with the default features this binary holds one backend: the tests are then ignored
//! (`--ignored` with `LADIMO_COMPARE_BACKENDS=cpu,cpu` still exercises the comparison code).
//! With `--features wgpu` it compares WGPU (Mesa's lavapipe, a software Vulkan driver, where there
//! is no GPU; README "Backends" has the environment) with CPU; CI runs it that way through
//! `cargo test-all`. Without a Vulkan driver, running as root on Debian, the tests install lavapipe
//! (`mesa-vulkan-drivers`) first. `LADIMO_COMPARE_BACKENDS=wgpu,cpu` limits or orders the backends
//! compared (the first is the reference).

use burn::optim::AdamWConfig;
use burn::tensor::{Device, Tensor, TensorData};
use ladimo_distill::train::{TrainConfig, train_step};
use ladimo_io::{Checkpoint, HostTensor};
use ladimo_kernel::testdata::uniform;
use ladimo_model::Transformer;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_moe::{Combine, CombineWeights, HostFfn, MoeBlock, MoeParams, Policy};
use ladimo_tests::{fixture, max_abs_diff};

const TOL: f32 = 1e-4;

/// WGPU needs a Vulkan driver; where there is none, install Debian's software one (lavapipe) when
/// running as root with apt-get, once per test binary. Otherwise say what is missing (the WGPU
/// comparisons then fail with wgpu's own error).
fn ensure_vulkan_driver() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let have = std::fs::read_dir("/usr/share/vulkan/icd.d").is_ok_and(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        });
        if have {
            return;
        }
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let installed = root
            && std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "mesa-vulkan-drivers"])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !installed {
            eprintln!("no Vulkan driver: install mesa-vulkan-drivers (as root) for the WGPU comparison");
        }
    });
}

/// (name, device) of each backend to compare, the reference first.
fn backends() -> Vec<(&'static str, Device)> {
    let compiled = ladimo_backend::compiled();
    let mut names: Vec<&'static str> = match std::env::var("LADIMO_COMPARE_BACKENDS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                *compiled
                    .iter()
                    .find(|c| **c == n.trim())
                    .unwrap_or_else(|| panic!("LADIMO_COMPARE_BACKENDS: {n} is not compiled in ({compiled:?})"))
            })
            .collect(),
        Err(_) => compiled.clone(),
    };
    // The CPU backend is the reference when it is there.
    if let Some(i) = names.iter().position(|n| *n == "cpu")
        && std::env::var("LADIMO_COMPARE_BACKENDS").is_err()
    {
        names.swap(0, i);
    }
    if names.contains(&"wgpu") {
        ensure_vulkan_driver();
    }
    if names.len() < 2 {
        eprintln!(
            "only one backend compiled in ({names:?}): nothing to compare; build with `--features wgpu` \
             (or cuda) to compare backends"
        );
    }
    names
        .into_iter()
        .map(|n| (n, ladimo_backend::device_named(n).expect("compiled in")))
        .collect()
}

/// Check `got` against `want` (relative to max |want|, at least 1) and report the figure.
fn check(what: &str, backend: &str, reference: &str, want: &[f32], got: &[f32]) -> f32 {
    assert_eq!(want.len(), got.len(), "{what}: {backend} vs {reference}: lengths");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: {backend} gave non-finite values"
    );
    let d = max_abs_diff(want, got);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    eprintln!(
        "backends: {what:<34} {backend:>6} vs {reference:<6} max |diff| {d:.3e}  relative {:.3e}",
        d / scale
    );
    assert!(
        d <= TOL * scale,
        "{what}: {backend} vs {reference}: max |diff| {d} > {TOL} x {scale}"
    );
    d / scale
}

/// Run `f` on every backend and compare each result to the reference's, output by output.
fn compare(what: &str, f: impl Fn(&Device) -> Vec<(String, Vec<f32>)>) {
    let mut all = backends().into_iter();
    let (ref_name, ref_dev) = all.next().expect("at least one backend");
    let want = f(&ref_dev);
    for (name, device) in all {
        let got = f(&device);
        for ((label, w), (_, g)) in want.iter().zip(&got) {
            check(&format!("{what} {label}"), name, ref_name, w, g);
        }
    }
}

fn tiny_logits(dir: &str) {
    compare(&format!("{dir} logits"), |device| {
        let ckpt = Checkpoint::open(fixture(dir)).unwrap();
        let model = Transformer::from_checkpoint(&ckpt, device).unwrap();
        let ids: Vec<u32> = (0..24u32)
            .map(|i| (i * 37 + 5) % ckpt.config.vocab_size as u32)
            .collect();
        vec![(
            String::new(),
            to_vec(model.forward(ids_tensor(&ids, 2, device)).unwrap()),
        )]
    });
}

#[test]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda")),
    ignore = "only the CPU backend is compiled in: nothing to compare (build with --features wgpu)"
)]
fn tiny_hyperclovax_logits_agree_across_backends() {
    tiny_logits("tiny-hcx");
}

#[test]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda")),
    ignore = "only the CPU backend is compiled in: nothing to compare (build with --features wgpu)"
)]
fn tiny_llama3_logits_agree_across_backends() {
    tiny_logits("tiny-llama3");
}

#[test]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda")),
    ignore = "only the CPU backend is compiled in: nothing to compare (build with --features wgpu)"
)]
fn tiny_llama_linear_logits_agree_across_backends() {
    tiny_logits("tiny-llama-linear");
}

const HIDDEN: usize = 64;
const FFN: usize = 256;
const EXPERTS: usize = 8;
const TOKENS: usize = 96;

/// A dense SwiGLU FFN cut into 8 experts of 32 neurons, 32 more shared ones, and a random router.
fn moe_weights() -> (HostTensor, Vec<HostFfn>, HostFfn) {
    let dense = HostFfn {
        gate: HostTensor::new(vec![FFN, HIDDEN], uniform(FFN * HIDDEN, 0.2, 1)),
        up: HostTensor::new(vec![FFN, HIDDEN], uniform(FFN * HIDDEN, 0.2, 2)),
        down: HostTensor::new(vec![HIDDEN, FFN], uniform(FFN * HIDDEN, 0.2, 3)),
    };
    let per = (FFN - 32) / EXPERTS;
    let experts = (0..EXPERTS)
        .map(|e| dense.select_neurons(&(e * per..(e + 1) * per).collect::<Vec<_>>()))
        .collect();
    let shared = dense.select_neurons(&(FFN - 32..FFN).collect::<Vec<_>>());
    let router = HostTensor::new(vec![EXPERTS, HIDDEN], uniform(EXPERTS * HIDDEN, 0.5, 4));
    (router, experts, shared)
}

fn tokens(device: &Device, seed: u64) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(uniform(TOKENS * HIDDEN, 1.0, seed), [TOKENS, HIDDEN]),
        device,
    )
}

#[test]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda")),
    ignore = "only the CPU backend is compiled in: nothing to compare (build with --features wgpu)"
)]
fn moe_block_agrees_across_backends() {
    let (router, experts, shared) = moe_weights();
    for (label, policy, weights) in [
        ("top-2 renorm", Policy::TopK { k: 2 }, CombineWeights::Renormalized),
        (
            "top-p 0.6 raw",
            Policy::TopP {
                p: 0.6,
                min_k: 1,
                max_k: 8,
            },
            CombineWeights::Raw,
        ),
    ] {
        compare(&format!("moe {label}"), |device| {
            let combine = Combine { weights, scale: 2.0 };
            let block = MoeBlock::new(&router, None, &experts, Some(&shared), combine, policy.clone(), device).unwrap();
            let x = tokens(device, 5);
            let probs = block.router_probs(x.clone()).unwrap();
            let routes: Vec<f32> = block
                .route(&probs)
                .iter()
                .flat_map(|r| r.iter().map(|&(e, _)| e as f32))
                .collect();
            let out = to_vec(block.forward_tokens(x).unwrap());
            vec![
                ("router probs".into(), probs),
                ("routes".into(), routes),
                ("output".into(), out),
            ]
        });
    }
}

fn params_host(p: &MoeParams) -> Vec<(String, Vec<f32>)> {
    let mut v = vec![("router".to_string(), to_vec(p.router.weight.val()))];
    for (i, e) in p.experts.iter().enumerate() {
        for (n, l) in [("gate", &e.gate_proj), ("up", &e.up_proj), ("down", &e.down_proj)] {
            v.push((format!("expert{i}.{n}"), to_vec(l.weight.val())));
        }
    }
    v
}

#[test]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda")),
    ignore = "only the CPU backend is compiled in: nothing to compare (build with --features wgpu)"
)]
fn distillation_step_agrees_across_backends() {
    let (router, experts, _) = moe_weights();
    let cfg = TrainConfig {
        experts: EXPERTS,
        train_policy: Policy::TopK { k: 4 },
        combine: Combine {
            weights: CombineWeights::Renormalized,
            scale: 4.0,
        },
        cosine_weight: 0.1,
        router_norm_weight: 0.1,
        ..TrainConfig::default()
    };
    compare("distill step", |device| {
        let ad = device.clone().autodiff();
        let block = MoeBlock::new(
            &router,
            None,
            &experts,
            None,
            cfg.combine,
            cfg.train_policy.clone(),
            &ad,
        )
        .unwrap();
        let mut optim = AdamWConfig::new().init();
        let (x, y) = (tokens(&ad, 6), tokens(&ad, 7).mul_scalar(0.1));
        let (params, loss) = train_step(block.params, &mut optim, &cfg, &cfg.train_policy, x, y, 1e-3).unwrap();
        // The loss is a few units; checked on the same relative scale as the weights.
        let mut out = vec![("loss".to_string(), vec![loss as f32])];
        out.extend(
            params_host(&params)
                .into_iter()
                .map(|(n, v)| (format!("updated {n}"), v)),
        );
        out
    });
}
