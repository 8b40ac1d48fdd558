//! The fuzz targets: one per parser a user hands a file to. Each writes a mutant (and the valid
//! files that go beside it) into a work folder and calls the real public entry point on it, the
//! way `ladimo` would, going on past the first step where it can (a GGUF whose config is refused
//! still has its tokenizer and every tensor read).

use std::path::Path;
use std::sync::OnceLock;

use ladimo_io::{Checkpoint, GgufFile, ModelConfig, Tokenizer, WeightSource};
use ladimo_moe::RoutingPolicy;

use crate::mutate::Seed;
use crate::seeds;

/// What a parser made of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Read without complaint.
    Accepted,
    /// Refused with this error (what a broken file should get).
    Rejected(String),
    /// Read, but a property every input must keep was broken (this is a failure).
    Violation(String),
}

/// A parser under test.
pub struct Target {
    pub name: &'static str,
    /// What it reads, for reports.
    pub about: &'static str,
    /// The valid files its mutants are made from; `real_tokenizer` adds a real tokenizer.json.
    pub seeds: fn(real_tokenizer: Option<Vec<u8>>) -> Vec<Seed>,
    /// Write the input (and its fixed companions) into the folder; the bytes written.
    pub write: fn(&Path, &[u8]) -> std::io::Result<usize>,
    /// Run the parser on what `write` left in the folder.
    pub parse: fn(&Path) -> Outcome,
}

/// Every target, in a fixed order.
pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "gguf",
            about: "GGUF file: header, metadata, tensor directory, config, tokenizer, every tensor",
            seeds: |_| vec![seeds::tiny_gguf()],
            write: |dir, b| write(dir, "model.gguf", b),
            parse: parse_gguf,
        },
        Target {
            name: "safetensors",
            about: "model.safetensors header and data, through Checkpoint::open and every tensor",
            seeds: |_| vec![seeds::tiny_safetensors()],
            write: |dir, b| {
                let model = model_dir(dir)?;
                Ok(write_once(&model, "config.json", seeds::TINY_HF_CONFIG.as_bytes())?
                    + write(&model, "model.safetensors", b)?)
            },
            parse: |dir| parse_hf(&dir.join("model")),
        },
        Target {
            name: "safetensors-index",
            about: "model.safetensors.index.json and the shards it names",
            seeds: |_| vec![seeds::tiny_index()],
            write: |dir, b| {
                static SHARDS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
                static OUTSIDE_BYTES: OnceLock<Vec<u8>> = OnceLock::new();
                let model = model_dir(dir)?;
                let mut n = write_once(&model, "config.json", seeds::TINY_HF_CONFIG.as_bytes())?;
                for (name, bytes) in SHARDS.get_or_init(seeds::tiny_shards) {
                    n += write_once(&model, name, bytes)?;
                }
                // A valid safetensors file outside the model's folder: an index must not reach it.
                n += write_once(
                    dir,
                    OUTSIDE,
                    OUTSIDE_BYTES.get_or_init(|| seeds::tiny_safetensors().bytes),
                )?;
                Ok(n + write(&model, "model.safetensors.index.json", b)?)
            },
            parse: |dir| parse_hf(&dir.join("model")),
        },
        Target {
            name: "config",
            about: "config.json: ModelConfig and the ladimo MoE section",
            seeds: |_| seeds::configs(),
            write: |dir, b| write(dir, "config.json", b),
            parse: parse_config,
        },
        Target {
            name: "tokenizer",
            about: "tokenizer.json, then encode and decode",
            seeds: seeds::tokenizers,
            write: |dir, b| write(dir, "tokenizer.json", b),
            parse: parse_tokenizer,
        },
        Target {
            name: "policy",
            about: "policy TOML (ladimo solve / sparsify output), each layer's policy checked",
            seeds: |_| seeds::policies(),
            write: |dir, b| write(dir, "policy.toml", b),
            parse: parse_policy,
        },
        Target {
            name: "convert",
            about: "convert config TOML (configs/*.toml), loaded and checked",
            seeds: |_| seeds::convert_configs(),
            write: |dir, b| write(dir, "convert.toml", b),
            parse: |dir| match ladimo_convert::ConvertConfig::load(Some(&dir.join("convert.toml")), &[]) {
                Ok(cfg) => {
                    let _ = cfg.to_toml();
                    Outcome::Accepted
                }
                Err(e) => Outcome::Rejected(format!("{e:#}")),
            },
        },
        Target {
            name: "jsonl",
            about: "users' JSONL text files",
            seeds: |_| seeds::jsonl(),
            write: |dir, b| write(dir, "texts.jsonl", b),
            parse: |dir| match ladimo_data::read_texts(&dir.join("texts.jsonl")) {
                Ok(_) => Outcome::Accepted,
                Err(e) => Outcome::Rejected(e.to_string()),
            },
        },
    ]
}

/// The target of this name.
pub fn by_name(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// The file outside the model folder that a hostile index may try to name.
const OUTSIDE: &str = "outside.safetensors";

fn model_dir(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    Ok(model)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<usize> {
    std::fs::write(dir.join(name), bytes)?;
    Ok(bytes.len())
}

/// [`write`] for a file that never changes between cases: written once per folder.
fn write_once(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<usize> {
    let path = dir.join(name);
    if !path.exists() {
        std::fs::write(path, bytes)?;
    }
    Ok(bytes.len())
}

fn rejected(e: impl std::fmt::Display) -> Outcome {
    Outcome::Rejected(e.to_string())
}

/// Text a tokenizer is asked to encode: ASCII, digits, Korean, an emoji, a special token.
const PROBE_TEXT: &str = "Hello world 123, \u{C548}\u{B155}\u{D558}\u{C138}\u{C694} \u{1F600} <|endoftext|>";

fn exercise_tokenizer(tok: &Tokenizer) -> Result<(), String> {
    let ids = tok.encode(PROBE_TEXT).map_err(|e| e.to_string())?;
    tok.decode(&ids).map_err(|e| e.to_string())?;
    // Ids the vocabulary may not have.
    let _ = tok.decode(&[0, 1, 5, 1 << 20, u32::MAX]);
    let _ = tok.vocab_size();
    Ok(())
}

fn parse_gguf(dir: &Path) -> Outcome {
    let path = dir.join("model.gguf");
    let file = match GgufFile::open(&path) {
        Ok(f) => f,
        Err(e) => return rejected(e),
    };
    let mut problems = Vec::new();
    if let Err(e) = file.model_config() {
        problems.push(e.to_string());
    }
    match Tokenizer::from_gguf(&file) {
        Ok(tok) => {
            if let Err(e) = exercise_tokenizer(&tok) {
                problems.push(e);
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    let weights = file.into_weights();
    for info in weights.infos() {
        if let Err(e) = weights.load(&info.name) {
            problems.push(e.to_string());
        }
    }
    if let Err(e) = Checkpoint::open(&path) {
        problems.push(e.to_string());
    }
    match problems.into_iter().next() {
        None => Outcome::Accepted,
        Some(p) => Outcome::Rejected(p),
    }
}

/// A Hugging Face folder: open it, read every tensor, and check that every tensor came from a
/// file inside the folder.
fn parse_hf(model: &Path) -> Outcome {
    let ckpt = match Checkpoint::open(model) {
        Ok(c) => c,
        Err(e) => return rejected(e),
    };
    let mut first_error = None;
    for info in ckpt.weights.infos() {
        let file = ckpt.weights.file_of(&info.name);
        if file.parent() != Some(model) {
            return Outcome::Violation(format!(
                "tensor `{}` read from {}, outside the model folder {}",
                info.name,
                file.display(),
                model.display()
            ));
        }
        if let Err(e) = ckpt.weights.load(&info.name) {
            first_error.get_or_insert(e.to_string());
        }
    }
    match first_error {
        None => Outcome::Accepted,
        Some(e) => Outcome::Rejected(e),
    }
}

fn parse_config(dir: &Path) -> Outcome {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return rejected(format!("{}: {e}", path.display())),
    };
    let config = ModelConfig::from_hf_json(&text, &path);
    let section = ladimo_moe::checkpoint::read_section(dir);
    match (config, section) {
        (Ok(c), Ok(_)) => {
            let _ = c.to_hf_json();
            Outcome::Accepted
        }
        (Err(e), _) => rejected(e),
        (_, Err(e)) => rejected(e),
    }
}

fn parse_tokenizer(dir: &Path) -> Outcome {
    match Tokenizer::from_hf_dir(dir) {
        Ok(tok) => match exercise_tokenizer(&tok) {
            Ok(()) => Outcome::Accepted,
            Err(e) => Outcome::Rejected(e),
        },
        Err(e) => rejected(e),
    }
}

/// Experts per MoE layer assumed when checking a policy file's routing policies.
const POLICY_EXPERTS: usize = 6;

fn parse_policy(dir: &Path) -> Outcome {
    let file = match ladimo_moe::PolicyFile::read(&dir.join("policy.toml")) {
        Ok(f) => f,
        Err(e) => return rejected(e),
    };
    for lp in &file.layers {
        let _ = lp.to_string();
        if let Some(p) = &lp.policy
            && let Err(e) = p.validate(POLICY_EXPERTS)
        {
            return rejected(e);
        }
    }
    Outcome::Accepted
}
