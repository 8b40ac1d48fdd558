//! Log-likelihood of continuations given a context: what zero-shot multiple-choice evaluation
//! (ARC, PIQA, HellaSwag, ...) ranks choices by.
//!
//! The context runs once; its KV cache is then repeated along the batch axis and every
//! continuation runs in one batched forward (right-padded). Token ids
//! are the caller's: this project tokenizes context and continuation separately and concatenates
//! the ids, with no BOS, as OLMo's evaluator does for tokenizers without one.

use burn::tensor::activation::log_softmax;

use crate::util::{ids_tensor, to_vec};
use crate::{KvCache, ModelError, Transformer};

/// For each continuation, the summed log-probability of its tokens after `context` (natural log).
/// `context` and every continuation must be non-empty.
pub fn continuation_logliks(
    model: &Transformer,
    context: &[u32],
    continuations: &[Vec<u32>],
) -> Result<Vec<f64>, ModelError> {
    if context.is_empty() {
        return Err(ModelError::Invalid("empty context".into()));
    }
    if let Some(i) = continuations.iter().position(Vec::is_empty) {
        return Err(ModelError::Invalid(format!("continuation {i} is empty")));
    }
    let v = model.config.vocab_size;
    let device = &model.device;
    let mut cache = KvCache::new(model.layers.len());
    let h = model.forward_hidden(ids_tensor(context, 1, device), &mut cache)?;
    let n = context.len();
    let last = log_softmax(model.logits(h.narrow(1, n - 1, 1)), 2);
    let first = to_vec(last);
    let mut out: Vec<f64> = continuations.iter().map(|c| first[c[0] as usize] as f64).collect();
    // The continuations longer than one token run together, one batch row each, right-padded:
    // under the causal mask a padding token only affects the positions after it, which are not
    // read. One batched forward costs far less than one forward per continuation on short texts.
    let multi: Vec<usize> = (0..continuations.len())
        .filter(|&i| continuations[i].len() > 1)
        .collect();
    if multi.is_empty() {
        return Ok(out);
    }
    let len = multi.iter().map(|&i| continuations[i].len() - 1).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(multi.len() * len);
    for &i in &multi {
        let c = &continuations[i][..continuations[i].len() - 1];
        ids.extend_from_slice(c);
        ids.extend(std::iter::repeat_n(c[0], len - c.len()));
    }
    let mut c = cache.repeat_batch(multi.len());
    let h = model.forward_hidden(ids_tensor(&ids, multi.len(), device), &mut c)?;
    let lp = to_vec(log_softmax(model.logits(h), 2));
    for (row, &i) in multi.iter().enumerate() {
        for (pos, &t) in continuations[i][1..].iter().enumerate() {
            out[i] += lp[(row * len + pos) * v + t as usize] as f64;
        }
    }
    Ok(out)
}
