//! What the stage-1 tests share: the committed tiny Llama and its calibration tokens, and a small
//! training config on it.
#![allow(dead_code)] // each test file uses its own part

use ladimo_distill::train::{Inputs, TrainConfig};
use ladimo_io::Checkpoint;
use ladimo_model::Transformer;
use ladimo_moe::{Combine, CombineWeights, Policy};

/// A committed tiny model (`tiny-llama3`: 2 layers, hidden 64, FFN 160; `tiny-hcx`: the same
/// with HyperCLOVA X's multipliers and Peri-LN) as a checkpoint and a dense model, and `n`
/// deterministic calibration tokens.
pub fn tiny(fixture: &str, n: u32) -> (Checkpoint, Transformer, Vec<u32>) {
    let ckpt = Checkpoint::open(ladimo_tests::fixture(fixture)).unwrap();
    let model = Transformer::from_checkpoint(&ckpt, &ladimo_backend::device()).unwrap();
    let tokens: Vec<u32> = (0..n).map(|i| (i * 7919 + 13) % 500 + 1).collect();
    (ckpt, model, tokens)
}

/// 4 routed experts, no shared neurons, top-2 with Unit weights, 8 epochs of 64-token batches.
pub fn unit_top2(inputs: Inputs, residual_correction: f64) -> TrainConfig {
    TrainConfig {
        experts: 4,
        shared_fraction: 0.0,
        train_policy: Policy::TopK { k: 2 },
        also_train_with: Vec::new(),
        combine: Combine {
            weights: CombineWeights::Unit,
            scale: 1.0,
        },
        epochs: 8,
        batch_tokens: 64,
        lr: 2e-3,
        inputs,
        residual_correction,
        ..Default::default()
    }
}
