//! `cargo xtask bench backends`: the forward, MoE and training-step benchmarks side by side on
//! every backend compiled into this xtask (build it with e.g. `--features wgpu` to add WGPU beside
//! the default CPU backend), as one table. Medians of `--repeats` after a warm-up run.
//!
//! The sizes default to a run that also finishes on a software Vulkan driver (lavapipe) in a few
//! minutes; `--prompt-len 512 --decode-tokens 64` gives `bench forward`'s figures.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use ladimo_distill::train::{TrainConfig, train_step};
use ladimo_io::{Checkpoint, fetch};

use crate::bench::{MOE_HIDDEN, bench_ffn, bench_parts, forward_on, median, moe_on, prompt_ids};
use ladimo_kernel::testdata::uniform;

#[derive(Args)]
pub struct BackendsArgs {
    /// Backends to run (default: every compiled one: `ladimo_backend::compiled()`).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// SmolLM2 prefill length (tokens).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// SmolLM2 decode steps after a 16-token prompt.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Tokens through the dense FFN and the MoE block (8 experts, top-2).
    #[arg(long, default_value_t = 512)]
    moe_tokens: usize,
    /// Tokens per distillation step (SmolLM2-sized block laid out as the default TrainConfig).
    #[arg(long, default_value_t = 512)]
    train_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip the SmolLM2 forward benchmark (no model needed).
    #[arg(long)]
    no_forward: bool,
}

struct Row {
    backend: String,
    prefill: f64,
    decode: f64,
    dense_ms: f64,
    moe_ms: f64,
    train_ms: f64,
}

/// Median seconds of one distillation step (`train_step`, the default TrainConfig: its shared
/// neurons, routed experts and training policy) on a SmolLM2-sized FFN, `n_tok` tokens per step.
fn train_on(n_tok: usize, repeats: usize, device: &Device) -> Result<f64> {
    let cfg = TrainConfig::default();
    let dense = bench_ffn();
    let parts = bench_parts(&dense, cfg.shared_neurons(dense.intermediate_size()), cfg.experts);
    let ad = device.clone().autodiff();
    let block = parts.block(cfg.combine, cfg.train_policy.clone(), &ad)?;
    let mut params = block.params;
    let mut optim = AdamWConfig::new().init();
    let h = MOE_HIDDEN;
    let x = Tensor::<2>::from_data(TensorData::new(uniform(n_tok * h, 1.0, 11), [n_tok, h]), &ad);
    let y = Tensor::<2>::from_data(TensorData::new(uniform(n_tok * h, 0.1, 12), [n_tok, h]), &ad);
    let mut times = Vec::new();
    for i in 0..=repeats {
        let t = Instant::now();
        let (next, loss) = train_step(params, &mut optim, &cfg, &cfg.train_policy, x.clone(), y.clone(), 1e-4)?;
        params = next;
        if !loss.is_finite() {
            bail!("training-step benchmark: loss {loss}");
        }
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

pub fn run(a: BackendsArgs) -> Result<()> {
    let compiled = ladimo_backend::compiled();
    let names: Vec<String> = if a.backends.is_empty() {
        compiled.iter().map(|s| s.to_string()).collect()
    } else {
        a.backends.clone()
    };
    let ckpt = if a.no_forward {
        None
    } else {
        Some(Checkpoint::open(fetch::fetch_model(&fetch::SMOLLM2_135M)?)?)
    };
    let dense = bench_ffn();
    let mut rows = Vec::new();
    for name in &names {
        let Some(device) = ladimo_backend::device_named(name) else {
            bail!("backend {name} is not compiled in (compiled: {compiled:?}); build xtask with --features {name}");
        };
        eprintln!("bench backends: {name}...");
        let (prefill, decode) = match &ckpt {
            Some(c) => {
                let ids = prompt_ids(a.prompt_len.max(17), c.config.vocab_size);
                forward_on(c, &ids, &device, a.decode_tokens, a.repeats)?
            }
            None => (f64::NAN, f64::NAN),
        };
        let m = moe_on(&dense, a.moe_tokens, 8, 0, 2, a.repeats, &device)?;
        let train = train_on(a.train_tokens, a.repeats, &device)?;
        rows.push(Row {
            backend: name.clone(),
            prefill,
            decode,
            dense_ms: m.dense * 1e3,
            moe_ms: m.moe * 1e3,
            train_ms: train * 1e3,
        });
    }
    let t = TrainConfig::default();
    println!(
        "SmolLM2-135M f32: prefill {} tokens, decode {} tokens; FFN 576x1536 on {} tokens, MoE 8 experts top-2; \
         distillation step: {} shared neurons + {} experts, {}, {} tokens; median of {}",
        a.prompt_len.max(17),
        a.decode_tokens,
        a.moe_tokens,
        t.shared_neurons(crate::bench::MOE_FFN),
        t.experts,
        t.train_policy,
        a.train_tokens,
        a.repeats
    );
    println!(
        "| {:<8} | {:>13} | {:>12} | {:>13} | {:>15} | {:>13} |",
        "backend", "prefill tok/s", "decode tok/s", "dense FFN ms", "MoE top-2/8 ms", "train step ms"
    );
    println!(
        "|{:-<10}|{:->15}|{:->14}|{:->15}|{:->17}|{:->15}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<8} | {:>13.1} | {:>12.1} | {:>13.2} | {:>15.2} | {:>13.1} |",
            r.backend, r.prefill, r.decode, r.dense_ms, r.moe_ms, r.train_ms
        );
    }
    Ok(())
}
