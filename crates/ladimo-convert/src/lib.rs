//! The whole LaDiMo conversion in one call: dense checkpoint + calibration text in, a converted
//! MoE checkpoint and a report out. `ladimo convert` and `cargo xtask convert` are thin shells
//! around [`run`].
//!
//! - [`config`]: the TOML config (`configs/*.toml`), every field defaulted and documented.
//! - [`pipeline`]: [`convert`], the steps top to bottom (stage 1, stage 2, export, evaluation,
//!   report), one function each, in `stage1`, `stage2` and `measure`.
//! - [`step`]: a resumable step of the work folder (key, record, timing) and how keys are derived
//!   from the settings.
//! - [`evaluate`]: zero-shot scoring, held-out perplexity and tokens/s, dense vs MoE.
//! - [`report`]: `report.json` and `report.md`.
//!
//! - [`progress`]: how far the long steps have got, told to the caller's [`Progress`].
//!
//! The caller picks the device and how progress is shown ([`Compute`]); this crate never depends
//! on a backend, and draws nothing itself.

pub mod config;
pub mod evaluate;
mod measure;
pub mod pause;
pub mod pipeline;
pub mod progress;
pub mod report;
mod stage1;
mod stage2;
pub mod step;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

pub use config::ConvertConfig;
pub use pipeline::{Compute, Paths, convert};
pub use progress::{Progress, Silent, Tracker};
pub use report::Report;

/// The message a command prints for `e`: its text and its causes' joined by ": ", leaving out a
/// cause whose text the message already ends with (our error types put their source's text in
/// their own message, so `{e:#}` would say "No such file or directory" twice).
pub fn error_message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.ends_with(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Command-line arguments shared by `ladimo convert` and `cargo xtask convert`.
#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// A TOML config (see configs/). Without one: the built-in default (= configs/default.toml):
    /// SmolLM2-135M, 100K calibration tokens of Austen + Korean, 384 shared neurons + 6 routed
    /// experts per layer, 75% FFN budget.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The dense model (path or known name); overrides the config's `model`.
    #[arg(long)]
    pub model: Option<String>,
    /// Output folder (must not exist, unless --force). Default: out/<config name>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Work folder for intermediate results and resuming. Default: <out>.work beside the output.
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Replace an existing output folder; the old one is renamed to <out>.replaced-<time>.
    #[arg(long)]
    pub force: bool,
    /// Override a config field, `section.key=value` (TOML value), repeatable; e.g.
    /// `--set stage2.budget.fraction=0.6 --set stage1.train.experts=16`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Load the config, pick the folders and run the conversion on `on`; prints where the result is.
pub fn run(args: ConvertArgs, on: &Compute) -> Result<Report> {
    let mut overrides = args.set.clone();
    if let Some(m) = &args.model {
        overrides.push(format!("model={}", toml::Value::String(m.clone())));
    }
    let cfg = ConvertConfig::load(args.config.as_deref(), &overrides)?;
    let name = args
        .config
        .as_ref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "default".into());
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("out").join(&name));
    let work = args.work.clone().unwrap_or_else(|| {
        let file = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        out.with_file_name(format!("{file}.work"))
    });
    let paths = Paths {
        out: out.clone(),
        work,
        force: args.force,
    };
    let report = convert(&cfg, &name, &paths, on)?;
    let h = report.headline();
    println!(
        "wrote {} in {:.0} s: activated parameters {:.1}% fewer, held-out PPL {:+.1}%, zero-shot {:+.2} points, \
         decode x{:.2}; headline target {}. See {}/report.md",
        out.display(),
        report.wall_seconds,
        100.0 * h.active_params_cut,
        100.0 * h.ppl_change,
        h.accuracy_change_points,
        h.decode_speedup,
        if h.met { "met" } else { "not met" },
        out.display()
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::error_message;

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::from(ladimo_io::Error::io(std::path::Path::new("m/config.json"), io()));
        assert_eq!(
            format!("{e:#}"),
            "m/config.json: No such file or directory: No such file or directory"
        );
        assert_eq!(error_message(&e), "m/config.json: No such file or directory");
        // A context that does not repeat its cause keeps it.
        let e = e.context("opening the model");
        assert_eq!(
            error_message(&e),
            "opening the model: m/config.json: No such file or directory"
        );
    }
}
