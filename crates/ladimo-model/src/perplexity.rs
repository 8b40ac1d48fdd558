//! Perplexity over non-overlapping windows, each scored on its own.

use burn::tensor::{Int, Tensor, TensorData, activation::log_softmax};

use crate::llama::{ModelError, Transformer};
use crate::util::{ids_tensor, to_vec};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerplexityResult {
    pub perplexity: f64,
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    /// Tokens whose probability was scored (each window's first token is context only).
    pub predicted_tokens: usize,
    pub windows: usize,
}

/// Sum of NLL and count of predicted tokens for one window.
pub fn window_nll(model: &Transformer, window: &[u32]) -> Result<(f64, usize), ModelError> {
    let n = window.len();
    if n < 2 {
        return Ok((0.0, 0));
    }
    let logits = model.forward(ids_tensor(window, 1, &model.device))?;
    let logp = log_softmax(logits.narrow(1, 0, n - 1), 2);
    let targets: Vec<i64> = window[1..].iter().map(|&t| t as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n - 1]), &model.device).reshape([1, n - 1, 1]);
    let picked = to_vec(logp.gather(2, targets));
    Ok((-picked.iter().map(|&x| x as f64).sum::<f64>(), n - 1))
}

/// Cut `tokens` into windows of `seq_len` (the last may be shorter; one of a single token is
/// dropped), score each, and return exp(mean NLL over every predicted token).
/// `on_window(done, total)` reports progress.
pub fn perplexity(
    model: &Transformer,
    tokens: &[u32],
    seq_len: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<PerplexityResult, ModelError> {
    assert!(seq_len >= 2, "seq_len must be at least 2");
    let windows: Vec<&[u32]> = tokens.chunks(seq_len).filter(|w| w.len() >= 2).collect();
    let (mut nll, mut count) = (0.0, 0);
    for (i, w) in windows.iter().enumerate() {
        let (s, c) = window_nll(model, w)?;
        nll += s;
        count += c;
        on_window(i + 1, windows.len());
    }
    let mean = if count > 0 { nll / count as f64 } else { f64::NAN };
    Ok(PerplexityResult {
        perplexity: mean.exp(),
        mean_nll: mean,
        predicted_tokens: count,
        windows: windows.len(),
    })
}
