//! Runs a target on its seeds, then on mutants, and records what went wrong: a panic, an
//! allocation larger than the input can justify, or a broken property. Every mutant is made from
//! one 64-bit case number, so a failure is rerun from its target and case alone ([`run_case`]).

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;

use crate::mutate::{Seed, mutate};
use crate::targets::{Outcome, Target};

/// The most one allocation may take while a parser reads `input_bytes` of files: a fixed
/// allowance for the parser's own tables, plus 16 bytes per input byte (a Q4 tensor
/// dequantizes to about 7 bytes of f32 per stored byte).
pub fn alloc_limit(input_bytes: usize) -> usize {
    (64 << 20) + 16 * input_bytes
}

/// How long to fuzz one target.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Mutants(usize),
    Until(Instant),
}

/// One input that broke a rule.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The case number (`None`: an unmutated seed).
    pub case: Option<u64>,
    /// The seed it was made from.
    pub seed: String,
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.case {
            Some(c) => write!(f, "case {c:#018x} (from {}): {}", self.seed, self.what),
            None => write!(f, "seed {}: {}", self.seed, self.what),
        }
    }
}

/// What fuzzing one target found.
#[derive(Debug, Clone)]
pub struct Stats {
    pub target: &'static str,
    pub mutants: usize,
    /// Mutants the parser refused with an error.
    pub rejected: usize,
    /// Mutants the parser read without complaint.
    pub accepted: usize,
    pub failures: Vec<Failure>,
    pub elapsed: Duration,
}

impl Stats {
    /// One line: `gguf: 2000 mutants (1890 rejected, 110 accepted) in 4.2 s, 0 failures`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} mutants ({} rejected, {} accepted) in {:.1} s, {} failures",
            self.target,
            self.mutants,
            self.rejected,
            self.accepted,
            self.elapsed.as_secs_f64(),
            self.failures.len()
        )
    }
}

thread_local! {
    /// While a case runs on this thread: the message of the last panic (instead of printing it).
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Install (once) a panic hook that keeps the message of a panic inside a running case for the
/// report instead of printing it, and leaves every other panic to the previous hook.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(|c| c.get()) {
                let msg = match info.payload().downcast_ref::<&str>() {
                    Some(s) => s.to_string(),
                    None => info.payload().downcast_ref::<String>().cloned().unwrap_or_default(),
                };
                let at = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
                PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Run `target` on `input` in `dir` under the allocation limit, catching panics; `tag` is printed
/// if an allocation must be refused outright. A panic, an allocation over the limit or a
/// violation comes back as `Err`.
pub fn check(target: &Target, dir: &Path, input: &[u8], tag: u64) -> Result<Outcome, String> {
    install_panic_hook();
    let written =
        (target.write)(dir, input).map_err(|e| format!("cannot write the input into {}: {e}", dir.display()))?;
    let limit = alloc_limit(written);
    CATCHING.with(|c| c.set(true));
    ladimo_backend::alloc_limit::set(Some(limit), tag);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| (target.parse)(dir)));
    let over = ladimo_backend::alloc_limit::take_violation();
    ladimo_backend::alloc_limit::set(None, 0);
    CATCHING.with(|c| c.set(false));
    let panic = PANIC.with(|p| p.borrow_mut().take());
    match (result, over) {
        (Err(_), _) => Err(format!("panic: {}", panic.unwrap_or_default())),
        (Ok(_), Some(size)) => Err(format!(
            "allocated {size} bytes at once, over the limit of {limit} for {written} bytes of input"
        )),
        (Ok(Outcome::Violation(v)), None) => Err(v),
        (Ok(o), None) => Ok(o),
    }
}

/// The case number of the `i`-th mutant of `target` in a run seeded with `seed` (splitmix64).
pub fn case_number(seed: u64, target: &str, i: u64) -> u64 {
    let name = target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut z = (seed ^ name).wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The mutant of case `case`: its seed's name and bytes.
pub fn mutant(seeds: &[Seed], case: u64) -> (String, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(case);
    let seed = seeds.choose(&mut rng).expect("a target has seeds");
    (seed.name.clone(), mutate(seed, &mut rng))
}

/// Rerun one case: the mutant's seed name, its bytes and what the target made of it.
pub fn run_case(
    target: &Target,
    real_tokenizer: Option<Vec<u8>>,
    case: u64,
) -> (String, Vec<u8>, Result<Outcome, String>) {
    let seeds = (target.seeds)(real_tokenizer);
    let (seed, bytes) = mutant(&seeds, case);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let outcome = check(target, dir.path(), &bytes, case);
    (seed, bytes, outcome)
}

/// Fuzz one target: every seed unmutated (each must be accepted), then mutants until the budget
/// is spent.
pub fn fuzz(target: &Target, seed: u64, real_tokenizer: Option<Vec<u8>>, budget: Budget) -> Stats {
    let start = Instant::now();
    let seeds = (target.seeds)(real_tokenizer);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut stats = Stats {
        target: target.name,
        mutants: 0,
        rejected: 0,
        accepted: 0,
        failures: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for s in &seeds {
        match check(target, dir.path(), &s.bytes, 0) {
            Ok(Outcome::Accepted) => {}
            Ok(o) => stats.failures.push(Failure {
                case: None,
                seed: s.name.clone(),
                what: format!("the valid seed was not accepted: {o:?}"),
            }),
            Err(what) => stats.failures.push(Failure {
                case: None,
                seed: s.name.clone(),
                what,
            }),
        }
    }
    for i in 0.. {
        match budget {
            Budget::Mutants(n) if stats.mutants >= n => break,
            Budget::Until(t) if Instant::now() >= t => break,
            _ => {}
        }
        let case = case_number(seed, target.name, i);
        let (seed_name, bytes) = mutant(&seeds, case);
        stats.mutants += 1;
        match check(target, dir.path(), &bytes, case) {
            Ok(Outcome::Accepted) => stats.accepted += 1,
            Ok(_) => stats.rejected += 1,
            Err(what) => stats.failures.push(Failure {
                case: Some(case),
                seed: seed_name,
                what,
            }),
        }
    }
    stats.elapsed = start.elapsed();
    stats
}
