//! `ladimo export`: a converted (or dense) model in a format other tools run.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use ladimo_io::gguf_write::GgmlType;
use ladimo_moe::export::{ExportOptions, Format, GgufArch, export};

#[derive(Args)]
pub struct ExportArgs {
    /// The model: a ladimo MoE checkpoint folder (or any model ladimo loads).
    model: String,
    /// ladimo, mixtral, granitemoe, hf-remote or gguf.
    #[arg(long)]
    format: Format,
    /// A policy file whose routing policies and sparsity the export takes.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Storage of the GGUF's matrices: f16 or q8_0.
    #[arg(long, default_value = "f16")]
    gguf_type: String,
    /// llama.cpp architecture of the GGUF (default: granitemoe with shared experts, else llama).
    #[arg(long)]
    gguf_arch: Option<GgufArch>,
    /// For mixtral / granitemoe / gguf: write the nearest stock form when it cannot be exact.
    #[arg(long)]
    approximate: bool,
    /// The output folder (must not exist; written whole or not at all).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let gguf_type = match a.gguf_type.to_ascii_lowercase().as_str() {
        "f16" => GgmlType::F16,
        "q8_0" => GgmlType::Q8_0,
        other => bail!("--gguf-type {other}: one of f16, q8_0"),
    };
    let ckpt = crate::open(&a.model)?;
    let model = crate::load(&ckpt, a.policy.as_deref(), None)?;
    let opts = ExportOptions {
        format: a.format,
        gguf_type,
        gguf_arch: a.gguf_arch,
        approximate: a.approximate,
    };
    let r = export(&ckpt, &model, &opts, &a.out)?;
    println!("wrote {} ({}): {}", a.out.display(), r.target, r.files.join(", "));
    if r.exact() {
        println!("exact: computes the same function as ladimo");
    } else {
        println!("approximate:");
        for n in &r.approximations {
            println!("  - {n}");
        }
    }
    Ok(())
}
