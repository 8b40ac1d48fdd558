//! Token generation with a KV cache: greedy, or sampled with temperature and nucleus (top-p).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::llama::{KvCache, ModelError, Transformer};
use crate::util::{ids_tensor, to_vec};

#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Generation stops after any of these.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 42,
            max_new_tokens: 64,
            stop_tokens: vec![],
        }
    }
}

/// Pick the next token from a row of logits.
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (((l - max) / cfg.temperature) as f64).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut cum = 0.0;
    let mut keep = probs.len();
    for (i, p) in probs.iter().enumerate() {
        cum += p.1;
        if cum >= cfg.top_p as f64 {
            keep = i + 1;
            break;
        }
    }
    probs.truncate(keep);
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * total;
    for (id, p) in &probs {
        u -= p;
        if u <= 0.0 {
            return *id;
        }
    }
    probs.last().unwrap().0
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate after `prompt`, calling `on_token` with each new id as soon as it is chosen.
/// Returns the generated ids (the stop token included if one was hit).
pub fn generate(
    model: &Transformer,
    prompt: &[u32],
    cfg: &SamplingConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, ModelError> {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::new(model.layers.len());
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..cfg.max_new_tokens {
        if cache.len() + input.len() > model.rope.max_positions {
            break;
        }
        let logits = to_vec(model.forward_last(ids_tensor(&input, 1, &model.device), &mut cache)?);
        let next = sample(&logits, cfg, &mut rng);
        out.push(next);
        on_token(next);
        if cfg.stop_tokens.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
