//! A few thousand seeded mutants per parser: each must be accepted or refused with an error,
//! never a panic, an abort, or one allocation past `64 MiB + 16 x` the input's size.
//! `LADIMO_FUZZ_MUTANTS` changes the count (default 2000); `cargo xtask fuzz` runs longer.

use ladimo_fuzz::{Budget, fuzz, targets};

/// The run's seed: the same mutants every time.
const SEED: u64 = 23;

fn mutants() -> usize {
    std::env::var("LADIMO_FUZZ_MUTANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn run(name: &str) {
    let target = targets::by_name(name).expect("a known target");
    let stats = fuzz(&target, SEED, None, Budget::Mutants(mutants()));
    println!("{}", stats.summary());
    let failures: Vec<String> = stats.failures.iter().map(|f| f.to_string()).collect();
    assert!(
        failures.is_empty(),
        "{name}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(stats.mutants, mutants());
    // The mutants must reach the parser's error paths, not only its happy path.
    assert!(
        stats.rejected > stats.mutants / 10,
        "{name}: only {} of {} mutants were refused",
        stats.rejected,
        stats.mutants
    );
}

#[test]
fn gguf() {
    run("gguf");
}

#[test]
fn safetensors() {
    run("safetensors");
}

#[test]
fn safetensors_index() {
    run("safetensors-index");
}

#[test]
fn config() {
    run("config");
}

#[test]
fn tokenizer() {
    run("tokenizer");
}

#[test]
fn policy() {
    run("policy");
}

#[test]
fn convert() {
    run("convert");
}

#[test]
fn jsonl() {
    run("jsonl");
}

/// Every target is tested above.
#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = targets::all().iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "gguf",
            "safetensors",
            "safetensors-index",
            "config",
            "tokenizer",
            "policy",
            "convert",
            "jsonl"
        ]
    );
}
