//! Seeded mutation fuzzing of every parser a user hands a file to: GGUF, a safetensors file and a
//! sharded index, `config.json`, `tokenizer.json`, policy TOML, convert TOML and JSONL text.
//!
//! No nightly toolchain or `cargo fuzz`: each target ([`targets`]) starts from small valid files
//! ([`seeds`]), makes mutants from them with a seeded generator ([`mutate`]: bit flips, byte
//! sets, truncations, insertions, hostile lengths, counts, dimensions, type codes and offsets in
//! binary headers, structural edits of JSON and TOML), and runs the real parser on each
//! ([`driver`]). Every input must end in a result or an error: a panic, an allocation larger than
//! `64 MiB + 16 x` the input's size (checked by the global allocator, `ladimo-backend`'s
//! `alloc-limit` feature), or a broken property (a shard read from outside the model's folder)
//! is a failure, reported with the case number that remakes the input.
//!
//! `cargo test --release -p ladimo-fuzz --test fuzz` runs a fixed number of mutants per target;
//! `cargo xtask fuzz --minutes N` runs longer.

pub mod driver;
pub mod mutate;
pub mod seeds;
pub mod targets;

pub use driver::{Budget, Failure, Stats, fuzz, run_case};
pub use targets::{Outcome, Target};
