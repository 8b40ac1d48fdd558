//! Benchmarks. Figures are medians of repeated runs, printed side by side with a reference run in
//! the same command (PyTorch on the same machine, when installed), since these machines are noisy.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Subcommand;
use ladimo_io::{Checkpoint, fetch};
use ladimo_kernel::testdata::uniform;
use ladimo_model::Transformer;
use ladimo_model::util::to_vec;

#[derive(Subcommand)]
pub enum Bench {
    /// SmolLM2 prefill (one prompt of --prompt-len tokens) and decode tokens/s.
    Forward {
        #[arg(long, default_value_t = 512)]
        prompt_len: usize,
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Python with torch + transformers (and llama-cpp-python, for --sparse) for the reference
        /// runs (default: $LADIMO_PYTHON, else ~/.cache/ladimo/pyenv/bin/python, else python3).
        #[arg(long)]
        python: Option<String>,
        /// A converted MoE checkpoint (e.g. out/default): time it against its dense SmolLM2
        /// instead, dense and MoE alternating, on the default backend.
        #[arg(long)]
        moe: Option<std::path::PathBuf>,
        /// With --moe: replace every layer's policy by this one (TOML, e.g. `{type="TopK",k=6}`).
        #[arg(long, requires = "moe")]
        policy: Option<String>,
        /// With --moe: apply this policy file (e.g. OUT/policy.toml: per-layer routing, and TEAL
        /// thresholds inside the experts, which ladimo's checkpoint format does not hold).
        #[arg(long, requires = "moe", conflicts_with = "policy")]
        policy_file: Option<std::path::PathBuf>,
        /// With --moe: both models' weights in this type (rounded as they load), decode on the
        /// host kernels, as `ladimo --dtype` and convert's report (eval.dtype). Default: burn, f32.
        #[arg(long, requires = "moe")]
        dtype: Option<ladimo_model::Dtype>,
        /// Decode on the host kernels instead: burn dense f32, kernel dense, TEAL and experts of
        /// each --sizes at each --budgets, per --dtypes, beside llama.cpp (see xtask/src/decode.rs).
        #[arg(long, conflicts_with = "moe")]
        sparse: bool,
        /// With --sparse: weight types.
        #[arg(long, value_delimiter = ',', default_value = "f32,f16")]
        dtypes: Vec<ladimo_model::Dtype>,
        /// With --sparse: FFN budgets (share of the FFN's parameters read per token).
        #[arg(long, value_delimiter = ',', default_value = "0.75,0.625,0.5")]
        budgets: Vec<f64>,
        /// With --sparse: expert sizes in neurons.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        sizes: Vec<usize>,
    },
    /// SmolLM2-sized MoE blocks: dense FFN vs sparse dispatch at top-k of 8 and 16 experts (`--experts`).
    Moe {
        #[arg(long, value_delimiter = ',', default_value = "512,2048")]
        tokens: Vec<usize>,
        /// Routed expert counts; each runs top-k at 1/4, 1/2 and 3/4 of them.
        #[arg(long, value_delimiter = ',', default_value = "8,16")]
        experts: Vec<usize>,
        /// Always-on shared neurons, cut out before the rest is split into experts (0: none).
        #[arg(long, default_value_t = 0)]
        shared: usize,
        #[arg(long, default_value_t = 11)]
        repeats: usize,
    },
    /// Forward, MoE and training-step benchmarks on every compiled backend, one table.
    Backends(crate::backends::BackendsArgs),
}

/// The Python the reference runs use: `$LADIMO_PYTHON`, else the virtual environment the tests
/// and fixture scripts set up (`~/.cache/ladimo/pyenv`), else `python3`.
pub fn default_python() -> String {
    if let Some(p) = std::env::var("LADIMO_PYTHON").ok().filter(|p| !p.is_empty()) {
        return p;
    }
    let venv = fetch::cache_dir().join("pyenv/bin/python");
    if venv.is_file() {
        return venv.to_string_lossy().into_owned();
    }
    "python3".into()
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Forward {
            prompt_len,
            decode_tokens,
            repeats,
            python,
            moe,
            policy,
            policy_file,
            dtype,
            sparse,
            dtypes,
            budgets,
            sizes,
        } => match moe {
            None if sparse => crate::decode::run(crate::decode::Args {
                prompt_len,
                decode: decode_tokens,
                repeats,
                dtypes,
                budgets,
                sizes,
                python,
            }),
            Some(dir) => forward_moe(
                &dir,
                policy.as_deref(),
                policy_file.as_deref(),
                dtype,
                prompt_len,
                decode_tokens,
                repeats,
            ),
            None => forward(prompt_len, decode_tokens, repeats, python),
        },
        Bench::Moe {
            tokens,
            experts,
            shared,
            repeats,
        } => moe(&tokens, &experts, shared, repeats),
        Bench::Backends(a) => crate::backends::run(a),
    }
}

pub use ladimo_model::timing::median;

/// Deterministic pseudo-random token ids (no special tokens).
pub fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (17 + x % (vocab as u64 - 17)) as u32
        })
        .collect()
}

/// Prefill tokens/s (one prompt of `ids.len()` tokens) and decode tokens/s (`decode_tokens` after
/// a 16-token prompt) of the model on `device`: medians of `repeats` after a warm-up.
pub fn forward_on(
    ckpt: &Checkpoint,
    ids: &[u32],
    device: &Device,
    decode_tokens: usize,
    repeats: usize,
) -> Result<(f64, f64)> {
    let model = Transformer::from_checkpoint(ckpt, device)?;
    ladimo_convert::evaluate::speed(&model, ids, decode_tokens, repeats)
}

fn forward(prompt_len: usize, decode_tokens: usize, repeats: usize, python: Option<String>) -> Result<()> {
    let path = fetch::fetch_model(&fetch::SMOLLM2_135M)?;
    let ckpt = Checkpoint::open(&path)?;
    let ids = prompt_ids(prompt_len, ckpt.config.vocab_size);
    println!(
        "SmolLM2-135M, f32, prefill {prompt_len} tokens, decode {decode_tokens} tokens after a 16-token prompt, median of {repeats}"
    );
    println!("{:<10} {:>14} {:>14}", "backend", "prefill tok/s", "decode tok/s");
    let mut ours = Vec::new();
    for name in ladimo_backend::compiled() {
        let device = ladimo_backend::device_named(name).unwrap();
        let (prefill, decode) = forward_on(&ckpt, &ids, &device, decode_tokens, repeats)?;
        println!("{name:<10} {prefill:>14.1} {decode:>14.1}");
        ours.push((name, prefill, decode));
    }
    let python = python.unwrap_or_else(default_python);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench_torch_forward.py");
    let out = Command::new(&python)
        .args([
            script,
            "--gguf",
            &path.to_string_lossy(),
            "--prefill-len",
            &prompt_len.to_string(),
        ])
        .args([
            "--decode-new",
            &decode_tokens.to_string(),
            "--repeats",
            &repeats.to_string(),
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout);
            let v: serde_json::Value =
                serde_json::from_str(line.lines().last().unwrap_or("")).context("torch bench output")?;
            let (tp, td) = (
                v["prefill_tok_s"].as_f64().unwrap_or(f64::NAN),
                v["decode_tok_s"].as_f64().unwrap_or(f64::NAN),
            );
            println!(
                "{:<10} {tp:>14.1} {td:>14.1}   (torch {}, {} threads)",
                "pytorch", v["torch"], v["threads"]
            );
            for (name, p, d) in ours {
                println!("ratio {name}/pytorch: prefill {:.2}x, decode {:.2}x", p / tp, d / td);
            }
        }
        Ok(o) => println!(
            "pytorch reference skipped: {}",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("failed")
        ),
        Err(e) => println!("pytorch reference skipped: cannot run {python}: {e}"),
    }
    Ok(())
}

/// Dense SmolLM2 against a converted MoE model, runs alternating so both see the same load.
fn forward_moe(
    dir: &std::path::Path,
    policy: Option<&str>,
    policy_file: Option<&std::path::Path>,
    dtype: Option<ladimo_model::Dtype>,
    prompt_len: usize,
    decode: usize,
    repeats: usize,
) -> Result<()> {
    let device = ladimo_backend::device();
    let path = fetch::fetch_model(&fetch::SMOLLM2_135M)?;
    let ckpt = ladimo_model::open_rounded(&path, dtype.unwrap_or_default())?;
    let mut dense = Transformer::from_checkpoint(&ckpt, &device)?;
    let mut moe =
        ladimo_moe::checkpoint::load_model_from(&ladimo_model::open_rounded(dir, dtype.unwrap_or_default())?, &device)?;
    if let Some(p) = policy {
        let p: ladimo_moe::Policy = toml::from_str::<toml::Value>(&format!("p = {p}"))
            .ok()
            .and_then(|v| v.get("p").cloned())
            .and_then(|v| v.try_into().ok())
            .with_context(|| format!("--policy `{p}` is not a policy (e.g. {{type=\"TopK\",k=6}})"))?;
        for l in 0..moe.layers.len() {
            if let Some(b) = ladimo_moe::checkpoint::moe_block_mut(&mut moe, l) {
                b.set_policy(p.clone())?;
            }
        }
    }
    if let Some(f) = policy_file {
        ladimo_moe::PolicyFile::read(f)?.apply(&mut moe, f)?;
    }
    let t = Instant::now();
    moe.prepare_prefill();
    let masked: Vec<String> = (0..moe.layers.len())
        .filter(|&l| ladimo_moe::checkpoint::moe_block_mut(&mut moe, l).is_some_and(|b| b.masked_at(prompt_len)))
        .map(|l| l.to_string())
        .collect();
    println!(
        "prefill paths chosen by timing in {:.1} s; dense-masked at {prompt_len} tokens in layers: {}",
        t.elapsed().as_secs_f64(),
        if masked.is_empty() {
            "none".into()
        } else {
            masked.join(", ")
        }
    );
    if let Some(d) = dtype {
        dense.prepare_host_decode(d)?;
        moe.prepare_host_decode(d)?;
    }
    let ids = prompt_ids(prompt_len, ckpt.config.vocab_size);
    let ((dp, dd), (mp, md)) =
        ladimo_convert::evaluate::speed_side_by_side(&dense, &moe, &ids, decode, repeats, || {})?;
    println!(
        "dense SmolLM2 vs {}, backend {}, prefill {prompt_len} tokens, decode {decode} tokens ({}), median of {repeats}",
        dir.display(),
        ladimo_backend::name(),
        match dtype {
            Some(d) => format!("host kernels, {} weights", d.name()),
            None => "burn, f32 weights".into(),
        }
    );
    println!("{:<8} {:>14} {:>14}", "model", "prefill tok/s", "decode tok/s");
    println!("{:<8} {dp:>14.1} {dd:>14.1}", "dense");
    println!("{:<8} {mp:>14.1} {md:>14.1}", "moe");
    println!("moe/dense: prefill {:.2}x, decode {:.2}x", mp / dp, md / dd);
    Ok(())
}

/// The median seconds of `f` over `repeats` runs after a warm-up.
pub fn time_median(repeats: usize, mut f: impl FnMut()) -> f64 {
    let never: Result<f64, std::convert::Infallible> = ladimo_model::timing::median_seconds(repeats, || {
        f();
        Ok(())
    });
    never.unwrap_or_else(|e| match e {})
}

/// SmolLM2's FFN sizes (hidden, intermediate).
pub const MOE_HIDDEN: usize = 576;
pub const MOE_FFN: usize = 1536;

/// A SmolLM2-sized dense FFN with deterministic random weights.
pub fn bench_ffn() -> ladimo_moe::HostFfn {
    use ladimo_io::HostTensor;
    let (h, f) = (MOE_HIDDEN, MOE_FFN);
    ladimo_moe::HostFfn {
        gate: HostTensor::new(vec![f, h], uniform(f * h, 0.05, 1)),
        up: HostTensor::new(vec![f, h], uniform(f * h, 0.05, 2)),
        down: HostTensor::new(vec![h, f], uniform(f * h, 0.05, 3)),
    }
}

/// The parts of an MoE block cut from `dense`: its first `shared` neurons as an always-on shared
/// expert (none when 0), the rest cut into `n_exp` contiguous experts, and a deterministic random
/// router.
pub struct BenchParts {
    pub shared: Option<ladimo_moe::HostFfn>,
    pub router: ladimo_io::HostTensor,
    pub experts: Vec<ladimo_moe::HostFfn>,
}

impl BenchParts {
    pub fn block(
        &self,
        combine: ladimo_moe::Combine,
        policy: ladimo_moe::Policy,
        device: &Device,
    ) -> Result<ladimo_moe::MoeBlock> {
        Ok(ladimo_moe::MoeBlock::new(
            &self.router,
            None,
            &self.experts,
            self.shared.as_ref(),
            combine,
            policy,
            device,
        )?)
    }
}

pub fn bench_parts(dense: &ladimo_moe::HostFfn, shared: usize, n_exp: usize) -> BenchParts {
    let (h, f) = (dense.hidden_size(), dense.intermediate_size());
    let routed = f - shared;
    let experts = (0..n_exp)
        .map(|e| {
            dense.select_neurons(&(shared + e * routed / n_exp..shared + (e + 1) * routed / n_exp).collect::<Vec<_>>())
        })
        .collect();
    BenchParts {
        shared: (shared > 0).then(|| dense.select_neurons(&(0..shared).collect::<Vec<_>>())),
        router: ladimo_io::HostTensor::new(vec![n_exp, h], uniform(n_exp * h, 0.2, 5 + n_exp as u64)),
        experts,
    }
}

/// One MoE timing: medians in seconds, and the fraction of the dense FFN's parameters activated.
pub struct MoeTimes {
    pub dense: f64,
    pub router: f64,
    pub moe: f64,
    pub active: f64,
    /// The path the block chose for `n_tok` tokens by timing at load: "masked" or "dispatch".
    pub path: &'static str,
}

/// Time the dense FFN and a top-`k` MoE block on `n_tok` tokens on `device`: `dense`'s first
/// `shared` neurons always on, the rest cut into `n_exp` routed experts.
pub fn moe_on(
    dense: &ladimo_moe::HostFfn,
    n_tok: usize,
    n_exp: usize,
    shared: usize,
    k: usize,
    repeats: usize,
    device: &Device,
) -> Result<MoeTimes> {
    use ladimo_moe::{Combine, CombineWeights, Policy};
    let (h, f) = (dense.hidden_size(), dense.intermediate_size());
    let dense_dev = dense.to_dense(device);
    let x = Tensor::<2>::from_data(TensorData::new(uniform(n_tok * h, 1.0, 4), [n_tok, h]), device);
    let parts = bench_parts(dense, shared, n_exp);
    let combine = Combine {
        weights: CombineWeights::Renormalized,
        scale: 1.0,
    };
    let mut moe = parts.block(combine, Policy::TopK { k }, device)?;
    moe.choose_prefill_path();
    let path = if moe.masked_at(n_tok) { "masked" } else { "dispatch" };
    let t_router = time_median(repeats, || {
        let p = moe.router_probs(x.clone()).expect("router");
        let _ = moe.route(&p);
    });
    // Dense and MoE alternate, so both see the same machine load (medians of each).
    moe.reset_stats();
    let (mut td, mut tm) = (Vec::new(), Vec::new());
    for i in 0..=repeats {
        let t = Instant::now();
        let _ = to_vec(dense_dev.forward_any(x.clone()));
        let d = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = to_vec(moe.forward_tokens(x.clone()).expect("moe"));
        let m = t.elapsed().as_secs_f64();
        if i > 0 {
            td.push(d);
            tm.push(m);
        }
    }
    let st = moe.stats();
    Ok(MoeTimes {
        dense: median(td),
        router: t_router,
        moe: median(tm),
        active: (st.routed_params / st.tokens as f64 + (3 * h * shared) as f64) / (3 * h * f) as f64,
        path,
    })
}

/// SmolLM2-sized MoE blocks (hidden 576, FFN 1536: `shared` always-on neurons, the rest cut into
/// `experts` experts) against the dense FFN, at top-k for k = 1/4, 1/2 and 3/4 of the experts.
pub fn moe(tokens: &[usize], experts: &[usize], shared: usize, repeats: usize) -> Result<()> {
    if shared >= MOE_FFN {
        anyhow::bail!("--shared {shared}: must leave some of the FFN's {MOE_FFN} neurons to route");
    }
    let routed = MOE_FFN - shared;
    if let Some(&n) = experts.iter().find(|&&n| n < 4 || !routed.is_multiple_of(n)) {
        anyhow::bail!("--experts {n}: need at least 4 experts that divide the {routed} routed neurons");
    }
    let device = ladimo_backend::device();
    let (h, f) = (MOE_HIDDEN, MOE_FFN);
    let dense = bench_ffn();
    println!(
        "MoE dispatch, backend {}, hidden {h}, FFN {f} ({shared} shared), f32, median of {repeats}",
        ladimo_backend::name()
    );
    println!("target: MoE <= 1.15 x (activated fraction x dense) + router; and never slower than dense");
    println!("path: what the block chose at load by timing both (dispatch per expert, or dense-masked)");
    println!(
        "{:>6} {:>8} {:>7} {:>10} {:>10} {:>10} {:>9} {:>12} {:>8} {:>10} {:>9}",
        "tokens",
        "experts",
        "policy",
        "dense ms",
        "router ms",
        "moe ms",
        "active",
        "moe/target",
        "ok",
        "moe/dense",
        "path"
    );
    for &n_tok in tokens {
        for &n_exp in experts {
            for k in [n_exp / 4, n_exp / 2, 3 * n_exp / 4] {
                let t = moe_on(&dense, n_tok, n_exp, shared, k, repeats, &device)?;
                let target = 1.15 * t.active * t.dense + t.router;
                let ratio = t.moe / target;
                println!(
                    "{n_tok:>6} {n_exp:>8} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>8.1}% {:>12.2} {:>8} {:>10.2} {:>9}",
                    format!("top-{k}"),
                    t.dense * 1e3,
                    t.router * 1e3,
                    t.moe * 1e3,
                    t.active * 100.0,
                    ratio,
                    if ratio <= 1.0 { "yes" } else { "no" },
                    t.moe / t.dense,
                    t.path
                );
            }
        }
    }
    Ok(())
}
