//! `cargo xtask bench forward --sparse`: decode tokens/s of SmolLM2 on the host decode path
//! (ladimo-kernel), dense and sparse, in each weight type, against burn's dense f32 decode and
//! llama.cpp's dense decode of the same GGUF, every variant timed once per round and the rounds
//! repeated, so a noisy neighbour slows all of them alike (medians).
//!
//! Sparse variants: TEAL calibrated on calibration text at each FFN budget, and "experts of S
//! neurons": each FFN cut into contiguous blocks of S neurons, of which each token runs a share
//! equal to the budget, chosen pseudo-randomly per token and layer (no router: what the kernel
//! turns a block choice into, whatever chooses it; the output is not the model's).
//!
//! Columns: "x dense" divides by the FASTEST dense path of the same dtype (in f32 that is the
//! faster of burn's dense decode and the kernel's dense decode, so a sparse variant is not
//! flattered by a slow kernel baseline); "x kdense" divides by the kernel's own dense decode of
//! that dtype (what the sparse kernel gains over the dense kernel); "bound" is the speed-up the
//! bytes skipped allow (weights read per token, dense over sparse) and "of bound" is "x dense"
//! over it; "x burn" divides by burn's dense f32 decode; "prefill/dense" is the prompt's prefill
//! speed (burn, --prompt-len tokens) over the dense model's, for TEAL (the expert variants here
//! have no router and prefill with the dense FFN: `bench moe` times expert prefill). The closing lines give each dtype's
//! kernel dense decode over the fastest dense f32 decode and over llama.cpp's F16 decode.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Tensor;
use ladimo_io::{Checkpoint, fetch};
use ladimo_kernel::{FfnKernel, GateUpLayout, Selection};
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{DenseFfn, Dtype, FeedForward, FfnError, KernelFfn, KvCache, Transformer};
use ladimo_moe::sparsity::{Method, SparseFfn, Sparsity, calibrate};

use crate::bench::{median, prompt_ids};

/// SmolLM2's parameters read per token outside the FFNs: attention 26.5M, the tied head 28.3M.
fn fixed_params(model: &Transformer) -> f64 {
    let c = &model.config;
    (c.num_layers * c.attention_params() + c.vocab_size * c.hidden_size) as f64
}

#[derive(Debug, Clone)]
enum Variant {
    /// burn's dense f32 path (the baseline before this kernel).
    Burn,
    /// The host path, dense FFN kernels.
    Dense,
    /// TEAL at this budget (per-layer thresholds).
    Teal(f64, Vec<Sparsity>),
    /// Experts of `size` neurons, a `budget` share of them per token.
    Experts { size: usize, budget: f64 },
}

impl Variant {
    fn name(&self) -> String {
        match self {
            Variant::Burn => "burn dense".into(),
            Variant::Dense => "kernel dense".into(),
            Variant::Teal(b, _) => format!("TEAL {:.1}%", b * 100.0),
            Variant::Experts { size, budget } => format!("experts of {size}, {:.1}%", budget * 100.0),
        }
    }
}

/// A bench-only FFN: blocks of `size` neurons, `keep` of them per token chosen pseudo-randomly.
#[derive(Debug)]
struct BlockBench {
    dense: DenseFfn,
    kernel: FfnKernel,
    size: usize,
    keep: usize,
    step: AtomicU64,
}

impl BlockBench {
    fn new(dense: &DenseFfn, size: usize, budget: f64, dtype: Dtype) -> Self {
        let kernel = ladimo_model::ffn_kernel(dense, dtype, GateUpLayout::NeuronMajor).expect("no biases");
        let experts = kernel.inter / size;
        Self {
            dense: dense.clone(),
            size,
            keep: ((budget * experts as f64).round() as usize).clamp(1, experts),
            kernel,
            step: AtomicU64::new(1),
        }
    }

    /// `keep` distinct blocks, in memory order (a partial Fisher-Yates shuffle).
    fn choose(&self) -> Vec<(Range<usize>, f32)> {
        let experts = self.kernel.inter / self.size;
        let mut x = self
            .step
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E3779B97F4A7C15)
            | 1;
        let mut order: Vec<usize> = (0..experts).collect();
        for i in 0..self.keep {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = i + (x % (experts - i) as u64) as usize;
            order.swap(i, j);
        }
        let mut chosen = order[..self.keep].to_vec();
        chosen.sort_unstable();
        chosen
            .into_iter()
            .map(|e| (e * self.size..(e + 1) * self.size, 1.0))
            .collect()
    }
}

impl FeedForward for BlockBench {
    /// Prefill (not timed here) runs the dense FFN.
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        Ok(self.dense.forward_any(x))
    }
    fn forward_host(&self, x: &[f32], n: usize) -> Option<Result<Vec<f32>, FfnError>> {
        let routes: Vec<_> = (0..n).map(|_| self.choose()).collect();
        let mut y = vec![0f32; x.len()];
        self.kernel.forward(x, n, &Selection::Blocks(&routes), &mut y);
        Some(Ok(y))
    }
    fn total_params(&self) -> usize {
        self.dense.num_params()
    }
    fn active_params_per_token(&self) -> f64 {
        (self.dense.num_params() * self.keep * self.size / self.kernel.inter) as f64
    }
    fn describe(&self) -> String {
        format!("bench blocks of {}, {} per token", self.size, self.keep)
    }
}

/// Decode tokens/s: a `prompt` (its prefill timed too), then `decode` greedy single-token steps,
/// and the share of the FFN parameters the steps read. Returns (decode tok/s, share, prefill tok/s).
fn decode_speed(model: &Transformer, prompt: &[u32], decode: usize) -> Result<(f64, f64, f64)> {
    let mut cache = KvCache::new(model.layers.len());
    let t = Instant::now();
    let l = to_vec(model.forward_last(ids_tensor(prompt, 1, &model.device), &mut cache)?);
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let mut next = ladimo_model::generate::argmax(&l);
    model.layers.iter().for_each(|l| l.ffn.reset_stats());
    let t = Instant::now();
    for _ in 0..decode {
        let l = to_vec(model.forward_last(ids_tensor(&[next], 1, &model.device), &mut cache)?);
        next = ladimo_model::generate::argmax(&l);
    }
    let secs = t.elapsed().as_secs_f64();
    let pc = model.param_counts();
    Ok((decode as f64 / secs, pc.ffn_active / pc.ffn_total as f64, prefill))
}

/// Swap the variant's FFNs (and path) in; returns what to put back.
fn install(model: &mut Transformer, v: &Variant, dtype: Dtype) -> Vec<Box<dyn FeedForward>> {
    let dense = |f: &dyn FeedForward| -> DenseFfn {
        let any: &dyn std::any::Any = f;
        any.downcast_ref::<KernelFfn>()
            .expect("prepared dense model")
            .dense
            .clone()
    };
    let mut saved = Vec::new();
    for l in 0..model.layers.len() {
        let new: Option<Box<dyn FeedForward>> = match v {
            Variant::Burn | Variant::Dense => None,
            Variant::Teal(_, th) => {
                let mut s = SparseFfn::new(&dense(model.layers[l].ffn.as_ref()), th[l].clone()).expect("thresholds");
                s.prepare_host(dtype);
                Some(Box::new(s))
            }
            Variant::Experts { size, budget } => Some(Box::new(BlockBench::new(
                &dense(model.layers[l].ffn.as_ref()),
                *size,
                *budget,
                dtype,
            ))),
        };
        if let Some(f) = new {
            saved.push(std::mem::replace(&mut model.layers[l].ffn, f));
        }
    }
    saved
}

fn uninstall(model: &mut Transformer, saved: Vec<Box<dyn FeedForward>>) {
    for (l, f) in saved.into_iter().enumerate() {
        model.layers[l].ffn = f;
    }
}

/// burn's path for a timing: no host decoder, dense FFNs on burn.
fn set_burn(model: &mut Transformer, host: &mut Option<ladimo_model::HostDecoder>, on: bool, limit: usize) {
    if on {
        *host = model.host.take();
    } else if host.is_some() {
        model.host = host.take();
    }
    for l in &mut model.layers {
        let any: &mut dyn std::any::Any = l.ffn.as_mut();
        if let Some(k) = any.downcast_mut::<KernelFfn>() {
            k.max_tokens = if on { 0 } else { limit };
        }
    }
}

pub struct Args {
    pub prompt_len: usize,
    pub decode: usize,
    pub repeats: usize,
    pub dtypes: Vec<Dtype>,
    pub budgets: Vec<f64>,
    pub sizes: Vec<usize>,
    pub python: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let device = ladimo_backend::device();
    let path = fetch::fetch_model(&fetch::SMOLLM2_135M)?;
    let data = ladimo_data::fetch_data()?;
    let cal = {
        let ckpt = Checkpoint::open(&path)?;
        let tok = ckpt.tokenizer()?;
        ladimo_data::take_tokens(tok, &data.calibration_en, 4096, ladimo_data::Part::Tail)
            .context("calibration text for TEAL")?
    };
    let windows: Vec<&[u32]> = cal.chunks(256).filter(|w| w.len() > 1).collect();
    let vocab = Checkpoint::open(&path)?.config.vocab_size;
    let prompt = prompt_ids(a.prompt_len, vocab);
    let python = a.python.unwrap_or_else(crate::bench::default_python);
    // llama.cpp's reference: the same weights in F16, written by ladimo's own GGUF export (the
    // fetched Q4_1 file would compare 4-bit against 16-bit weights).
    let gguf = dense_f16_gguf(&path, &device)?;
    // Per dtype: the model (weights rounded as they load) and its variants.
    let mut models = Vec::new();
    for &dtype in &a.dtypes {
        let ckpt = ladimo_model::open_rounded(&path, dtype)?;
        let mut model = Transformer::from_checkpoint(&ckpt, &device)?;
        let mut variants = vec![Variant::Dense];
        if dtype == Dtype::F32 {
            variants.insert(0, Variant::Burn);
        }
        for &b in &a.budgets {
            let th = calibrate(&mut model, &windows, Method::Teal, b, |_, _| {})?;
            variants.push(Variant::Teal(b, th));
        }
        for &s in &a.sizes {
            for &b in &a.budgets {
                variants.push(Variant::Experts { size: s, budget: b });
            }
        }
        model.prepare_host_decode(dtype)?;
        let limit = model.host.as_ref().map(|h| h.max_tokens).unwrap_or(0);
        eprintln!("{dtype}: the host decode path takes steps of up to {limit} tokens (measured)");
        models.push((dtype, model, variants));
    }
    let mut times: Vec<Vec<Vec<(f64, f64, f64)>>> = models.iter().map(|(_, _, v)| vec![Vec::new(); v.len()]).collect();
    let mut llama = Vec::new();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench_llama_cpp.py");
    for round in 0..a.repeats.max(1) {
        for (mi, (dtype, model, variants)) in models.iter_mut().enumerate() {
            let limit = model.host.as_ref().map(|h| h.max_tokens).unwrap_or(0);
            let mut parked = None;
            for (vi, v) in variants.iter().enumerate() {
                set_burn(model, &mut parked, matches!(v, Variant::Burn), limit);
                let saved = install(model, v, *dtype);
                let r = decode_speed(model, &prompt, a.decode)?;
                uninstall(model, saved);
                set_burn(model, &mut parked, false, limit);
                eprintln!("round {round}: {dtype} {}: {:.2} tok/s", v.name(), r.0);
                times[mi][vi].push(r);
            }
        }
        let out = std::process::Command::new(&python)
            .args([script, "--gguf", &gguf.to_string_lossy(), "--repeats", "1"])
            .args([
                "--prompt-len",
                &a.prompt_len.to_string(),
                "--decode-tokens",
                &a.decode.to_string(),
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let v: serde_json::Value =
                    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or(""))
                        .context("llama.cpp bench output")?;
                let d = v["decode_tok_s"].as_f64().unwrap_or(f64::NAN);
                eprintln!("round {round}: llama.cpp {d:.2} tok/s ({} threads)", v["threads"]);
                llama.push(d);
            }
            Ok(o) => eprintln!(
                "llama.cpp reference skipped: {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("failed")
            ),
            Err(e) => eprintln!("llama.cpp reference skipped: cannot run {python}: {e}"),
        }
    }
    println!(
        "SmolLM2-135M decode, prompt {} tokens, {} decode tokens, median of {} rounds (all variants alternating)",
        a.prompt_len, a.decode, a.repeats
    );
    let llama = median(llama);
    // burn's dense f32 decode, when f32 is among the dtypes (else "x burn" is NaN).
    let burn = models
        .iter()
        .zip(&times)
        .find_map(|((_, _, v), t)| v.iter().position(|v| matches!(v, Variant::Burn)).map(|i| &t[i]))
        .map(|r| median(r.iter().map(|r| r.0).collect()))
        .unwrap_or(f64::NAN);
    println!(
        "{:<6} {:<24} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>12}",
        "dtype", "variant", "tok/s", "FFN read", "x dense", "x kdense", "bound", "of bound", "x burn", "prefill/dense"
    );
    let med = |r: &[(f64, f64, f64)]| median(r.iter().map(|r| r.0).collect());
    // Per dtype: the fastest dense path (burn or kernel), the denominator of "x dense".
    let fastest: Vec<f64> = models
        .iter()
        .zip(&times)
        .map(|((_, _, variants), t)| {
            variants
                .iter()
                .zip(t)
                .filter(|(v, _)| matches!(v, Variant::Burn | Variant::Dense))
                .map(|(_, r)| med(r))
                .fold(f64::NAN, f64::max)
        })
        .collect();
    for (((dtype, model, variants), t), &best) in models.iter().zip(&times).zip(&fastest) {
        let fixed = fixed_params(model);
        let ffn = model.param_counts().ffn_total as f64;
        let dense_tps = variants
            .iter()
            .position(|v| matches!(v, Variant::Dense))
            .map(|i| median(t[i].iter().map(|r| r.0).collect()))
            .unwrap_or(f64::NAN);
        // Prefill (the prompt, on burn: longer than any host step) over the dense model's, per
        // variant; the bench's expert variants prefill with the dense FFN, so they get none.
        let dense_prefill = variants
            .iter()
            .position(|v| matches!(v, Variant::Dense))
            .map(|i| median(t[i].iter().map(|r| r.2).collect()))
            .unwrap_or(f64::NAN);
        for (v, r) in variants.iter().zip(t) {
            let tps = median(r.iter().map(|r| r.0).collect());
            let prefill = match v {
                Variant::Experts { .. } | Variant::Burn => "-".to_string(),
                _ => format!("{:.2}x", median(r.iter().map(|r| r.2).collect()) / dense_prefill),
            };
            let share = median(r.iter().map(|r| r.1).collect());
            let bound = (fixed + ffn) / (fixed + share * ffn);
            let speedup = tps / best;
            println!(
                "{:<6} {:<24} {:>8.2} {:>8.1}% {:>8.2}x {:>8.2}x {:>8.2}x {:>9.0}% {:>8.2}x {prefill:>12}",
                dtype.name(),
                v.name(),
                tps,
                share * 100.0,
                speedup,
                tps / dense_tps,
                bound,
                100.0 * speedup / bound,
                tps / burn
            );
        }
    }
    println!(
        "llama.cpp dense decode ({}, F16 weights): {llama:.2} tok/s",
        gguf.display()
    );
    for (dtype, _, variants) in &models {
        let i = variants.iter().position(|v| matches!(v, Variant::Dense)).unwrap_or(0);
        let mi = models.iter().position(|(d, _, _)| d == dtype).unwrap_or(0);
        let tps = median(times[mi][i].iter().map(|r| r.0).collect());
        println!("kernel dense {dtype} / llama.cpp F16: {:.2}x", tps / llama);
    }
    if let Some(f32_best) = models.iter().position(|(d, _, _)| *d == Dtype::F32).map(|i| fastest[i]) {
        for (mi, (dtype, _, variants)) in models.iter().enumerate() {
            if *dtype == Dtype::F32 {
                continue;
            }
            let i = variants.iter().position(|v| matches!(v, Variant::Dense)).unwrap_or(0);
            let tps = med(&times[mi][i]);
            println!("kernel dense {dtype} / fastest dense f32: {:.2}x", tps / f32_best);
        }
    }
    Ok(())
}

/// SmolLM2 as an F16 GGUF (`ladimo export --format gguf`), written once into the cache.
fn dense_f16_gguf(model: &std::path::Path, device: &burn::tensor::Device) -> Result<std::path::PathBuf> {
    let dir = fetch::cache_dir().join("bench/smollm2-135m-f16-gguf");
    let find = |dir: &std::path::Path| -> Option<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
    };
    if let Some(p) = find(&dir) {
        return Ok(p);
    }
    std::fs::create_dir_all(fetch::cache_dir().join("bench"))?;
    let ckpt = Checkpoint::open(model)?;
    let m = Transformer::from_checkpoint(&ckpt, device)?;
    let opts = ladimo_moe::export::ExportOptions::new(ladimo_moe::export::Format::Gguf);
    ladimo_moe::export::export(&ckpt, &m, &opts, &dir).with_context(|| format!("writing {}", dir.display()))?;
    find(&dir).with_context(|| format!("{}: no .gguf written", dir.display()))
}
