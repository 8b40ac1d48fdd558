//! Benchmarks. Figures are medians of repeated runs, printed side by side with a reference run in
//! the same command (PyTorch on the same machine, when installed), since these machines are noisy.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use ladimo_io::{Checkpoint, fetch};
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{KvCache, Transformer};

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
        /// Python with torch + transformers for the reference run (default: $LADIMO_PYTHON, python3).
        #[arg(long)]
        python: Option<String>,
    },
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Forward {
            prompt_len,
            decode_tokens,
            repeats,
            python,
        } => forward(prompt_len, decode_tokens, repeats, python),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic pseudo-random token ids (no special tokens).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
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
        let model = Transformer::from_checkpoint(&ckpt, &device)?;
        let run_prefill = || {
            let mut cache = KvCache::new(model.layers.len());
            let t = Instant::now();
            let l = model.forward_last(ids_tensor(&ids, 1, &device), &mut cache);
            let _ = to_vec(l.expect("forward"));
            t.elapsed().as_secs_f64()
        };
        run_prefill(); // warm-up
        let prefill = prompt_len as f64 / median((0..repeats).map(|_| run_prefill()).collect());
        let run_decode = || {
            let mut cache = KvCache::new(model.layers.len());
            let _ = to_vec(
                model
                    .forward_last(ids_tensor(&ids[..16], 1, &device), &mut cache)
                    .expect("forward"),
            );
            let t = Instant::now();
            let mut next = ids[16];
            for _ in 0..decode_tokens {
                let l = to_vec(
                    model
                        .forward_last(ids_tensor(&[next], 1, &device), &mut cache)
                        .expect("forward"),
                );
                next = ladimo_model::generate::argmax(&l);
            }
            t.elapsed().as_secs_f64()
        };
        run_decode();
        let decode = decode_tokens as f64 / median((0..repeats).map(|_| run_decode()).collect());
        println!("{name:<10} {prefill:>14.1} {decode:>14.1}");
        ours.push((name, prefill, decode));
    }
    let python = python
        .or_else(|| std::env::var("LADIMO_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
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
