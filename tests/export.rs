//! Exports (`ladimo export`): stock GraniteMoeShared / Mixtral folders, the trust_remote_code
//! folder, GGUF, and the refusals, on the committed tiny Llama. Whether transformers and
//! llama.cpp compute what ladimo computes is checked by scripts/check_hf_export.py and
//! scripts/check_gguf_export.py, run here when a Python with torch, transformers and
//! llama-cpp-python is found (`$LADIMO_PYTHON`, else ~/.cache/ladimo/pyenv/bin/python) and the
//! `ladimo` binary was built beside this test; otherwise those checks are skipped with the reason
//! printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use ladimo_io::{Checkpoint, HostTensor};
use ladimo_model::Transformer;
use ladimo_moe::export::{ExportOptions, Format, GgufArch, export};
use ladimo_moe::policy_file::LayerPolicy;
use ladimo_moe::sparsity::{Method, calibrate};
use ladimo_moe::{
    Combine, CombineWeights, HostFfn, MoeBlock, Policy, PolicyFile, model_fingerprint, save_moe_checkpoint,
};
use ladimo_tests::fixture;

fn device() -> burn::tensor::Device {
    ladimo_backend::device()
}

/// Layer `layer` cut into `n` contiguous experts plus `shared` neurons from the end, with a
/// deterministic router.
fn block(
    ckpt: &Checkpoint,
    layer: usize,
    n: usize,
    shared: usize,
    weights: CombineWeights,
    policy: Policy,
) -> MoeBlock {
    let ffn = HostFfn::from_checkpoint(ckpt, layer).unwrap();
    let (h, f) = (ffn.hidden_size(), ffn.intermediate_size());
    let routed = f - shared;
    let experts: Vec<HostFfn> = (0..n)
        .map(|e| ffn.select_neurons(&(e * routed / n..(e + 1) * routed / n).collect::<Vec<_>>()))
        .collect();
    let shared = (shared > 0).then(|| ffn.select_neurons(&(routed..f).collect::<Vec<_>>()));
    let router: Vec<f32> = (0..n * h)
        .map(|i| ((i * 7919 + layer * 31) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let router = HostTensor::new(vec![n, h], router);
    let combine = Combine { weights, scale: 1.0 };
    MoeBlock::new(&router, None, &experts, shared.as_ref(), combine, policy, &device()).unwrap()
}

/// An MoE checkpoint of the tiny Llama saved in `dir/name` (ladimo's format), every layer MoE.
fn moe_checkpoint(dir: &Path, name: &str, weights: CombineWeights, policies: &[Policy]) -> PathBuf {
    let ckpt = Checkpoint::open(fixture("tiny-llama3")).unwrap();
    let blocks: Vec<MoeBlock> = (0..ckpt.config.num_layers)
        .map(|l| block(&ckpt, l, 4, 32, weights, policies[l % policies.len()].clone()))
        .collect();
    let refs: Vec<Option<&MoeBlock>> = blocks.iter().map(Some).collect();
    let out = dir.join(name);
    save_moe_checkpoint(&ckpt, &refs, &out).unwrap();
    out
}

fn load(path: &Path) -> (Checkpoint, Transformer) {
    let ckpt = Checkpoint::open(path).unwrap();
    let model = ladimo_moe::checkpoint::load_model_from(&ckpt, &device()).unwrap();
    (ckpt, model)
}

fn opts(format: Format) -> ExportOptions {
    ExportOptions::new(format)
}

/// The Python and `ladimo` binary the proof scripts need, or why they are not here.
fn tools() -> Result<(PathBuf, PathBuf), String> {
    let py = std::env::var_os("LADIMO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| ladimo_io::fetch::cache_dir().join("pyenv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import torch, transformers, llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Err(format!(
            "{} cannot import torch, transformers and llama_cpp",
            py.display()
        ));
    }
    // target/<profile>/deps/export-HASH -> target/<profile>/ladimo
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).map(|p| p.join("ladimo")).unwrap();
    if !bin.is_file() {
        return Err(format!(
            "{} is not built (cargo build --release -p ladimo-cli)",
            bin.display()
        ));
    }
    Ok((py, bin))
}

/// Run a proof script; returns its last line (a JSON object) or `None` when the tools are missing.
fn script(name: &str, args: &[&str]) -> Option<serde_json::Value> {
    let (py, bin) = match tools() {
        Ok(t) => t,
        Err(why) => {
            println!("skipping {name}: {why}");
            return None;
        }
    };
    let path = ladimo_tests::repo_root().join("scripts").join(name);
    let out = Command::new(py)
        .arg(path)
        .args(args)
        .env("LADIMO_BIN", bin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_str(stdout.lines().last().unwrap()).unwrap())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A proof script's verdict on an exact export: logits within 1e-3 and the same greedy text.
fn assert_exact(r: &serde_json::Value) {
    assert!(
        r["max_abs_diff"].as_f64().unwrap() < 1e-3 && r["greedy_equal"] == true,
        "{r}"
    );
}

/// TEAL thresholds calibrated on one window to zero 40% of each layer's x and h (inside the
/// experts that run, in an MoE layer), with `policy(layer)` as the routing, written to
/// `dir/policy.toml` and applied to `model`. Returns the file's path.
fn apply_teal_policy(model: &mut Transformer, dir: &Path, policy: impl Fn(usize) -> Option<Policy>) -> PathBuf {
    let window: Vec<u32> = (0..128).map(|i| (i * 37 % 500) as u32).collect();
    let sp = calibrate(model, &[&window], Method::Teal, 0.6, |_, _| {}).unwrap();
    let file = PolicyFile {
        model: model_fingerprint(model),
        note: "test".into(),
        layers: sp
            .into_iter()
            .enumerate()
            .map(|(layer, s)| LayerPolicy {
                layer,
                policy: policy(layer),
                sparsity: Some(s),
            })
            .collect(),
    };
    let pf = dir.join("policy.toml");
    file.write(&pf).unwrap();
    file.apply(model, &pf).unwrap();
    pf
}

#[test]
fn renormalized_uniform_top_k_with_shared_experts_exports_exactly_to_granitemoe_remote_and_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let src = moe_checkpoint(
        dir.path(),
        "moe",
        CombineWeights::Renormalized,
        &[Policy::TopK { k: 2 }],
    );
    let (ckpt, model) = load(&src);
    assert_eq!(ladimo_moe::export::best_stock_format(&model), Ok(Format::GraniteMoe));
    // Mixtral has no shared experts: refused, naming what is missing and what can carry it.
    let err = export(&ckpt, &model, &opts(Format::Mixtral), &dir.path().join("mixtral"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("shared experts") && err.contains("granitemoe"), "{err}");
    assert!(!dir.path().join("mixtral").exists());

    let granite = dir.path().join("granite");
    let r = export(&ckpt, &model, &opts(Format::GraniteMoe), &granite).unwrap();
    assert!(r.exact());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(granite.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "GraniteMoeSharedForCausalLM");
    assert_eq!(cfg["shared_intermediate_size"], 32);
    assert_eq!(cfg["num_experts_per_tok"], 2);
    assert_eq!(cfg["attention_multiplier"], 0.25, "1/sqrt(head_dim 16)");
    let remote = dir.path().join("remote");
    export(&ckpt, &model, &opts(Format::HfRemote), &remote).unwrap();
    assert!(remote.join("modeling_ladimo.py").is_file());
    let gguf = dir.path().join("gguf");
    let r = export(&ckpt, &model, &opts(Format::Gguf), &gguf).unwrap();
    assert!(r.target.starts_with("granitemoe"), "{}", r.target);
    // The guard: llama.cpp's `llama` would load the shared experts and never run them.
    let mut o = opts(Format::Gguf);
    o.gguf_arch = Some(GgufArch::Llama);
    let err = export(&ckpt, &model, &o, &dir.path().join("llama"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("silently skip"), "{err}");
    assert!(!dir.path().join("llama").exists());
    // An existing output folder is refused.
    let err = export(&ckpt, &model, &opts(Format::GraniteMoe), &granite)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    // No temporary folder is left behind.
    assert!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.'))
    );

    for folder in [&granite, &remote] {
        if let Some(r) = script("check_hf_export.py", &[s(&src), s(folder)]) {
            assert_exact(&r);
        }
    }
    let text = ladimo_io::fetch::cache_dir().join("data/en/persuasion.txt");
    let text = if text.is_file() {
        text
    } else {
        fixture("tiny-llama3/config.json")
    };
    // llama.cpp's perplexity on 1,024 tokens within 1% of ladimo's (skipped without the tools).
    let check_gguf = |g: &Path, what: &str| {
        let args = [
            s(&src),
            s(g),
            "--text",
            s(&text),
            "--tokens",
            "1024",
            "--seq-len",
            "128",
            "--threads",
            "2",
        ];
        if let Some(r) = script("check_gguf_export.py", &args) {
            assert!(r["rel_diff"].as_f64().unwrap() < 0.01, "{what}: {r}");
        }
    };
    check_gguf(&gguf.join("model.gguf"), "F16");
    // Q8_0 matrices: within 1% of ladimo's f32 perplexity as well.
    let q8 = dir.path().join("gguf-q8");
    let mut o = opts(Format::Gguf);
    o.gguf_type = ladimo_io::gguf_write::GgmlType::Q8_0;
    export(&ckpt, &model, &o, &q8).unwrap();
    check_gguf(&q8.join("model.gguf"), "Q8_0");
}

#[test]
fn unit_weights_and_per_layer_policies_need_hf_remote_or_an_approximation() {
    let dir = tempfile::tempdir().unwrap();
    let policies = [
        Policy::TopK { k: 3 },
        Policy::TopP {
            p: 0.6,
            min_k: 1,
            max_k: 3,
        },
    ];
    let src = moe_checkpoint(dir.path(), "moe", CombineWeights::Unit, &policies);
    let (ckpt, model) = load(&src);
    assert!(ladimo_moe::export::best_stock_format(&model).is_err());
    for f in [Format::GraniteMoe, Format::Gguf] {
        let err = export(&ckpt, &model, &opts(f), &dir.path().join("x"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Unit") && err.contains("top-p") && err.contains("hf-remote"),
            "{err}"
        );
        assert!(!dir.path().join("x").exists());
    }
    let remote = dir.path().join("remote");
    export(&ckpt, &model, &opts(Format::HfRemote), &remote).unwrap();
    let approx = dir.path().join("approx");
    let mut o = opts(Format::GraniteMoe);
    o.approximate = true;
    let r = export(&ckpt, &model, &o, &approx).unwrap();
    assert!(
        r.approximations.iter().any(|a| a.contains("top-3")),
        "{:?}",
        r.approximations
    );
    if let Some(r) = script("check_hf_export.py", &[s(&src), s(&remote)]) {
        assert_exact(&r);
    }
    // The approximation's cost is measured, not bounded.
    script("check_hf_export.py", &[s(&src), s(&approx), "--approximate"]);
}

#[test]
fn dense_layers_with_teal_sparsity_export_to_hf_remote_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("tiny-llama3");
    let ckpt = Checkpoint::open(&path).unwrap();
    let mut model = ladimo_moe::checkpoint::load_model_from(&ckpt, &device()).unwrap();
    let pf = apply_teal_policy(&mut model, dir.path(), |_| None);
    // ladimo's format keeps sparsity in the policy file: refused, pointing at hf-remote.
    let err = export(&ckpt, &model, &opts(Format::Ladimo), &dir.path().join("l"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sparsity") && err.contains("hf-remote"), "{err}");
    let remote = dir.path().join("remote");
    export(&ckpt, &model, &opts(Format::HfRemote), &remote).unwrap();
    if let Some(r) = script("check_hf_export.py", &[s(&path), s(&remote), "--policy", s(&pf)]) {
        assert_exact(&r);
    }
}

#[test]
fn teal_thresholds_inside_moe_experts_export_to_hf_remote_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let policies = [
        Policy::TopK { k: 2 },
        Policy::Confidence {
            tau: 0.4,
            k_low: 1,
            k_high: 3,
        },
    ];
    let src = moe_checkpoint(dir.path(), "moe", CombineWeights::Unit, &policies);
    let (ckpt, mut model) = load(&src);
    let pf = apply_teal_policy(&mut model, dir.path(), |l| Some(policies[l % policies.len()].clone()));
    let remote = dir.path().join("remote");
    export(&ckpt, &model, &opts(Format::HfRemote), &remote).unwrap();
    if let Some(r) = script("check_hf_export.py", &[s(&src), s(&remote), "--policy", s(&pf)]) {
        assert_exact(&r);
    }
    // The thresholds matter: the same export without them computes something else.
    let plain = dir.path().join("plain");
    let (ckpt, model) = load(&src);
    export(&ckpt, &model, &opts(Format::HfRemote), &plain).unwrap();
    if let Some(r) = script(
        "check_hf_export.py",
        &[s(&src), s(&plain), "--policy", s(&pf), "--approximate"],
    ) {
        assert!(r["max_abs_diff"].as_f64().unwrap() > 1e-2, "{r}");
    }
}
