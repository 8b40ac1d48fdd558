//! `cargo xtask fuzz`: the parsers' mutation fuzzing (ladimo-fuzz) for a given time rather than
//! the test suite's fixed count: every target gets an equal share of `--minutes`, from a seed
//! that changes per run unless `--seed` fixes it. Failing inputs are written to `--out` with
//! their case numbers; `--case` reruns one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use ladimo_fuzz::{Budget, Outcome, targets};

#[derive(Args)]
pub struct FuzzArgs {
    /// Total time, shared equally among the targets.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Targets to run (default: all): gguf, safetensors, safetensors-index, config, tokenizer,
    /// policy, convert, jsonl.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// The run's seed (default: the current time, printed so the run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Rerun one case (a number from a failure report, e.g. 0x9d75ffe63b0199b1) of the one target
    /// given with --targets, and write its input to --out.
    #[arg(long, value_parser = parse_case)]
    case: Option<u64>,
    /// Where failing inputs are written.
    #[arg(long, default_value = "out/fuzz")]
    out: PathBuf,
}

fn parse_case(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("`{s}` is not a case number: {e}"))
}

/// SmolLM2's tokenizer as tokenizer.json, when the model is already in the cache (never fetched
/// here): a real 49,152-token seed for the tokenizer target.
fn real_tokenizer() -> Option<Vec<u8>> {
    let path = ladimo_io::fetch::model_path(&ladimo_io::fetch::SMOLLM2_135M);
    let ckpt = ladimo_io::Checkpoint::open(&path).ok()?;
    ckpt.tokenizer().ok()?.to_json().ok().map(String::into_bytes)
}

pub fn run(a: FuzzArgs) -> Result<()> {
    let chosen: Vec<targets::Target> = if a.targets.is_empty() {
        targets::all()
    } else {
        a.targets
            .iter()
            .map(|n| targets::by_name(n).with_context(|| format!("unknown fuzz target `{n}`")))
            .collect::<Result<_>>()?
    };
    let real = real_tokenizer();
    println!(
        "tokenizer seeds: {}",
        if real.is_some() {
            "the tiny ones and SmolLM2's"
        } else {
            "the tiny ones (SmolLM2 is not in the cache)"
        }
    );
    if let Some(case) = a.case {
        let [target] = chosen.as_slice() else {
            bail!("--case needs exactly one target in --targets");
        };
        let (seed, bytes, outcome) = ladimo_fuzz::run_case(target, real, case);
        let path = save(&a.out, target.name, case, &bytes)?;
        println!(
            "{} case {case:#018x} (from {seed}; input in {}):",
            target.name,
            path.display()
        );
        match outcome {
            Ok(Outcome::Accepted) => println!("  accepted"),
            Ok(Outcome::Rejected(e)) => println!("  refused: {e}"),
            Ok(Outcome::Violation(v)) | Err(v) => println!("  FAILURE: {v}"),
        }
        return Ok(());
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let share = Duration::from_secs_f64(a.minutes * 60.0 / chosen.len() as f64);
    println!(
        "fuzzing {} targets for {:.1} min ({:.0} s each), seed {seed}",
        chosen.len(),
        a.minutes,
        share.as_secs_f64()
    );
    let start = Instant::now();
    let mut total = (0, 0);
    println!("| target | mutants | refused | accepted | mutants/s | failures |");
    println!("|---|---|---|---|---|---|");
    for target in &chosen {
        let stats = ladimo_fuzz::fuzz(target, seed, real.clone(), Budget::Until(Instant::now() + share));
        println!(
            "| {} | {} | {} | {} | {:.0} | {} |",
            stats.target,
            stats.mutants,
            stats.rejected,
            stats.accepted,
            stats.mutants as f64 / stats.elapsed.as_secs_f64(),
            stats.failures.len()
        );
        for f in &stats.failures {
            println!("    {f}");
            if let Some(case) = f.case {
                let (_, bytes, _) = ladimo_fuzz::run_case(target, real.clone(), case);
                save(&a.out, target.name, case, &bytes)?;
            }
        }
        total = (total.0 + stats.mutants, total.1 + stats.failures.len());
    }
    println!(
        "{} mutants in {:.0} s, {} failures{}",
        total.0,
        start.elapsed().as_secs_f64(),
        total.1,
        if total.1 > 0 {
            format!(" (inputs in {})", a.out.display())
        } else {
            String::new()
        }
    );
    if total.1 > 0 {
        bail!("{} fuzz failures", total.1);
    }
    Ok(())
}

/// Write a case's input to `out/<target>-<case>.bin` (through a temporary name).
fn save(out: &std::path::Path, target: &str, case: u64, bytes: &[u8]) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the folder", out.display()))?;
    let path = out.join(format!("{target}-{case:016x}.bin"));
    ladimo_io::atomic::write_atomic(&path, bytes)?;
    Ok(path)
}
