//! `ladimo`: convert LLaMA-family / HyperCLOVA X checkpoints into MoE models (`convert`), and
//! inspect, run and score dense or MoE checkpoints.
//!
//! MODEL is a Hugging Face directory, a `.gguf` file, or the name of a known model
//! (`smollm2-135m`), which is fetched into the cache on first use.

mod bars;
mod eval;
mod export;
mod sparsify;
mod stage2;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ladimo_io::{Checkpoint, DType};
use ladimo_model::Transformer;
use ladimo_model::generate::{SamplingConfig, generate};
use ladimo_model::perplexity::perplexity;

#[derive(Parser)]
#[command(
    name = "ladimo",
    version,
    about = "Layer-wise distillation MoEfier for LLaMA-family models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, hyperparameters, parameter counts and tensor dtypes of a checkpoint.
    Inspect { model: String },
    /// Generate text after a prompt (streaming, KV cache).
    Generate {
        model: String,
        /// A policy file (TOML, from `ladimo solve` or `ladimo sparsify`).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Wrap the prompt in the checkpoint's chat template (ChatML) as one user turn.
        #[arg(long)]
        chat: bool,
        /// Weights rounded to f16 / bf16 (or kept f32) as they load, and decode on the host
        /// kernels with weights stored in that type (f32 accumulation). Default: f32 on burn.
        #[arg(long)]
        dtype: Option<ladimo_model::Dtype>,
    },
    /// Perplexity of a text file: non-overlapping windows, each scored on its own, no BOS.
    Perplexity {
        model: String,
        /// A policy file (TOML, from `ladimo solve` or `ladimo sparsify`).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Use only the first N tokens of the file.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Weights rounded to f16 / bf16 (or kept f32) as they load, and decode on the host
        /// kernels with weights stored in that type (f32 accumulation). Default: f32 on burn.
        #[arg(long)]
        dtype: Option<ladimo_model::Dtype>,
    },
    /// Write the logits of every position of a prompt (safetensors: `ids` i64, `logits` f32
    /// `[tokens, vocab]`), for comparisons with other implementations.
    Logits {
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Keep only the prompt's first N tokens.
        #[arg(long)]
        max_tokens: Option<usize>,
        #[arg(long)]
        out: PathBuf,
        /// Weights rounded to f16 / bf16 (or kept f32) as they load, and decode on the host
        /// kernels with weights stored in that type (f32 accumulation). Default: f32 on burn.
        #[arg(long)]
        dtype: Option<ladimo_model::Dtype>,
    },
    /// Zero-shot accuracy on ARC-Easy, ARC-Challenge, PIQA, HellaSwag (dense or MoE models).
    Eval(eval::EvalArgs),
    /// Stage 2: profile an MoE model's routing and each candidate policy's cost per layer.
    Profile(stage2::ProfileArgs),
    /// Stage 2: choose one routing policy per layer under a budget (exact), write a policy file.
    Solve(stage2::SolveArgs),
    /// Training-free activation sparsity (static, CATS, TEAL) on a dense model, or TEAL inside
    /// an MoE model's experts: calibrate per-layer thresholds for an FFN budget, write a policy
    /// file.
    Sparsify(sparsify::SparsifyArgs),
    /// A model in another format: mixtral, granitemoe (transformers, vLLM), hf-remote
    /// (transformers with trust_remote_code), gguf (llama.cpp), or ladimo's own.
    Export(export::ExportArgs),
    /// The whole pipeline: stage 1, stage 2, export, evaluation and report (resumable).
    Convert(ladimo_convert::ConvertArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", ladimo_convert::error_message(&e));
        std::process::exit(1);
    }
}

pub(crate) fn open(arg: &str) -> Result<Checkpoint> {
    open_as(arg, None)
}

/// [`open`], with the weights rounded to `dtype` as they are read (see `--dtype`).
pub(crate) fn open_as(arg: &str, dtype: Option<ladimo_model::Dtype>) -> Result<Checkpoint> {
    let path = ladimo_convert::pipeline::resolve_model(arg)?;
    Ok(ladimo_model::open_rounded(&path, dtype.unwrap_or_default())?)
}

/// Load a dense or MoE checkpoint; `policy` (a policy file) overrides its MoE layers' policies;
/// with `dtype`, the host decode path is built with weights in that type.
pub(crate) fn load(
    ckpt: &Checkpoint,
    policy: Option<&Path>,
    dtype: Option<ladimo_model::Dtype>,
) -> Result<Transformer> {
    let t = Instant::now();
    let mut model = ladimo_moe::checkpoint::load_model_from(ckpt, &ladimo_backend::device())?;
    if let Some(p) = policy {
        ladimo_moe::PolicyFile::read(p)?.apply(&mut model, p)?;
    } else if ckpt.path.join("policy.toml").is_file() {
        // convert and sparsify write the thresholds (and per-layer routing) there, which the
        // checkpoint itself may not hold: say so rather than run another model silently.
        let beside = ckpt.path.join("policy.toml");
        tracing::warn!(
            "{} is not applied: the model runs as its checkpoint stores it (`--policy {}` runs it as \
             convert / sparsify measured it)",
            beside.display(),
            beside.display()
        );
    }
    model.prepare_prefill();
    if let Some(d) = dtype {
        model.prepare_host_decode(d)?;
    }
    tracing::info!(
        "loaded {} in {:.2?} on {}",
        ckpt.path.display(),
        t.elapsed(),
        ladimo_backend::name()
    );
    Ok(model)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model } => inspect(&open(&model)?),
        Cmd::Profile(a) => stage2::profile(a),
        Cmd::Convert(a) => bars::convert(a),
        Cmd::Eval(a) => eval::eval(a),
        Cmd::Export(a) => export::run(a),
        Cmd::Logits {
            model,
            prompt,
            policy,
            max_tokens,
            out,
            dtype,
        } => {
            let ckpt = open_as(&model, dtype)?;
            let mut ids = ckpt.tokenizer()?.encode(&prompt)?;
            ids.truncate(max_tokens.unwrap_or(usize::MAX));
            if ids.is_empty() {
                bail!("the prompt is empty after tokenization");
            }
            let m = load(&ckpt, policy.as_deref(), dtype)?;
            let logits = ladimo_model::util::to_vec(m.forward(ladimo_model::util::ids_tensor(&ids, 1, &m.device))?);
            let id_bytes: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
            let l_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
            let views = vec![
                (
                    "ids",
                    safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![ids.len()], &id_bytes)?,
                ),
                (
                    "logits",
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        vec![ids.len(), m.config.vocab_size],
                        &l_bytes,
                    )?,
                ),
            ];
            safetensors::serialize_to_file(views, None, &out).with_context(|| format!("{}", out.display()))?;
            println!("wrote {} ({} tokens)", out.display(), ids.len());
            Ok(())
        }
        Cmd::Solve(a) => stage2::solve(a),
        Cmd::Sparsify(a) => sparsify::sparsify(a),
        Cmd::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            chat,
            policy,
            dtype,
        } => {
            let ckpt = open_as(&model, dtype)?;
            let tok = ckpt.tokenizer()?;
            let text = if chat {
                tok.apply_chat_template(&prompt)
                    .context("the checkpoint has no ChatML chat template")?
            } else {
                prompt.clone()
            };
            let ids = tok.encode(&text)?;
            if ids.is_empty() {
                bail!("the prompt is empty after tokenization");
            }
            let model = load(&ckpt, policy.as_deref(), dtype)?;
            let mut stop = ckpt.config.eos_token_ids.clone();
            if chat && let Some(id) = tok.token_to_id("<|im_end|>") {
                stop.push(id);
            }
            let cfg = SamplingConfig {
                temperature,
                top_p,
                seed,
                max_new_tokens,
                stop_tokens: stop,
            };
            if chat {
                println!("{prompt}");
            } else {
                print!("{prompt}");
            }
            std::io::stdout().flush()?;
            let mut out = Vec::new();
            let mut shown = 0;
            let t = Instant::now();
            let stops = cfg.stop_tokens.clone();
            let n = generate(&model, &ids, &cfg, |id| {
                if stops.contains(&id) {
                    return;
                }
                out.push(id);
                // Decode everything so far and print what is new, holding back an incomplete UTF-8 tail.
                if let Ok(s) = tok.decode(&out)
                    && !s.ends_with('\u{FFFD}')
                    && s.len() > shown
                {
                    print!("{}", &s[shown..]);
                    let _ = std::io::stdout().flush();
                    shown = s.len();
                }
            })?
            .len();
            // The generation is over: whatever tail was held back is printed as it decodes.
            if let Ok(s) = tok.decode(&out)
                && s.len() > shown
                && s.is_char_boundary(shown)
            {
                print!("{}", &s[shown..]);
            }
            println!();
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "[{n} tokens in {secs:.2} s, {:.1} tokens/s, backend {}]",
                n as f64 / secs,
                ladimo_backend::name()
            );
            Ok(())
        }
        Cmd::Perplexity {
            model,
            text,
            seq_len,
            max_tokens,
            policy,
            dtype,
        } => {
            if seq_len < 2 {
                bail!("--seq-len must be at least 2");
            }
            let bytes = std::fs::read(&text).with_context(|| format!("{}: cannot read", text.display()))?;
            let s =
                String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", text.display()))?;
            if s.trim().is_empty() {
                bail!("{}: the text is empty", text.display());
            }
            let ckpt = open_as(&model, dtype)?;
            let mut ids = ckpt.tokenizer()?.encode(&s)?;
            if let Some(m) = max_tokens {
                if m > ids.len() {
                    tracing::warn!(
                        "{}: --max-tokens {m} but the text has only {} tokens",
                        text.display(),
                        ids.len()
                    );
                }
                ids.truncate(m);
            }
            if ids.len() < 2 {
                bail!(
                    "{}: only {} token(s); perplexity needs at least 2",
                    text.display(),
                    ids.len()
                );
            }
            let model = load(&ckpt, policy.as_deref(), dtype)?;
            let t = Instant::now();
            let r = perplexity(&model, &ids, seq_len, |done, total| eprint!("\rwindow {done}/{total}"))?;
            eprintln!();
            println!("perplexity: {:.4}", r.perplexity);
            println!(
                "tokens: {} ({} predicted, {} windows of up to {seq_len}, {:.1} s)",
                ids.len(),
                r.predicted_tokens,
                r.windows,
                t.elapsed().as_secs_f64()
            );
            let c = model.param_counts();
            println!(
                "active parameters per token: {:.0} ({:.1}% of {}), FFN {:.0}",
                c.active(),
                100.0 * c.active() / c.total() as f64,
                c.total(),
                c.ffn_active
            );
            Ok(())
        }
    }
}

fn inspect(ckpt: &Checkpoint) -> Result<()> {
    let c = &ckpt.config;
    println!("file:          {} ({:?})", ckpt.path.display(), ckpt.format);
    println!("architecture:  {:?}", c.architecture);
    println!("layers:        {}", c.num_layers);
    println!("hidden:        {}", c.hidden_size);
    println!("ffn:           {}", c.intermediate_size);
    println!(
        "heads:         {} (kv {}, head_dim {})",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocab:         {}", c.vocab_size);
    println!("rope:          theta {} scaling {:?}", c.rope_theta, c.rope_scaling);
    println!("rms eps:       {}", c.rms_norm_eps);
    println!("context:       {}", c.max_position_embeddings);
    println!("tied emb:      {}", c.tie_word_embeddings);
    if c.architecture == ladimo_io::Architecture::HyperClovaX {
        println!(
            "muP:           embedding x{} attention x{} residual x{} logits x{}; post-norm {}",
            c.embedding_multiplier, c.attention_multiplier, c.residual_multiplier, c.logits_scaling, c.use_post_norm
        );
    }
    let m = |x: usize| format!("{:>12} ({:.1} M)", x, x as f64 / 1e6);
    println!("parameters:");
    println!("  total        {}", m(c.total_params()));
    println!("  embeddings   {}", m(c.embedding_params()));
    println!("  attention    {}", m(c.num_layers * c.attention_params()));
    println!("  ffn          {}", m(c.num_layers * c.ffn_params()));
    println!("  norms        {}", m(c.num_layers * c.norm_params() + c.hidden_size));
    let infos = ckpt.weights.infos();
    let in_file: usize = infos.iter().map(|i| i.shape.iter().product::<usize>()).sum();
    println!("  in file      {} in {} tensors", m(in_file), infos.len());
    let mut by_dtype: std::collections::BTreeMap<DType, (usize, usize)> = Default::default();
    for i in &infos {
        let e = by_dtype.entry(i.dtype).or_default();
        e.0 += 1;
        e.1 += i.shape.iter().product::<usize>();
    }
    println!("dtypes:");
    for (d, (n, p)) in by_dtype {
        println!("  {d:<6} {n:>4} tensors {}", m(p));
    }
    match ckpt.tokenizer() {
        Ok(t) => println!("tokenizer:     {} tokens", t.vocab_size()),
        Err(e) => println!("tokenizer:     none ({e})"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks (duplicate argument ids from flattened settings structs,
    /// defaults that do not parse, ...), which otherwise fail only when the command runs.
    #[test]
    fn the_command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
