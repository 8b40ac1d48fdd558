//! Log-likelihood of continuations given a context: what zero-shot multiple-choice evaluation
//! (ARC, PIQA, HellaSwag, ...) ranks choices by.
//!
//! The context runs once; its KV cache is then shared by every continuation (a clone of the
//! cache costs nothing: tensors are reference-counted and appending makes new ones). Token ids
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
    let mut out = Vec::with_capacity(continuations.len());
    for cont in continuations {
        let mut ll = first[cont[0] as usize] as f64;
        if cont.len() > 1 {
            let mut c = cache.clone();
            let h = model.forward_hidden(ids_tensor(&cont[..cont.len() - 1], 1, device), &mut c)?;
            let lp = to_vec(log_softmax(model.logits(h), 2));
            for (i, &t) in cont[1..].iter().enumerate() {
                ll += lp[i * v + t as usize] as f64;
            }
        }
        out.push(ll);
    }
    Ok(out)
}
